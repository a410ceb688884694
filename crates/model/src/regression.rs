//! The model: ordinary least squares with intercept, fitted by `linfa-linear`, and the per-message
//! prediction (a dot product over the stored coefficients, no allocation).

use crate::drift::Reference;
use linfa::traits::Fit as _;
use pipeline::dataset::Dataset;
use pipeline::messages::MessageError;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

// Re-exported here too: `regression::ModelError` is where callers have always found it.
pub use crate::error::ModelError;

/// Quality of a model on the data it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitMetrics {
    /// Coefficient of determination.
    pub r2: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// Rows used.
    pub rows: usize,
}

/// A fitted linear model: `y = intercept + Σ coefficients[i] · x[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Names of the features, in order.
    pub feature_names: Vec<String>,
    /// One coefficient per feature.
    pub coefficients: Vec<f64>,
    /// The intercept.
    pub intercept: f64,
    /// Version carried on every prediction.
    pub version: String,
    /// Statistics of the training data, for drift; `None` for an artifact written before they
    /// were recorded.
    pub reference: Option<Arc<Reference>>,
}

impl LinearModel {
    /// Fits ordinary least squares with intercept on `data` (the same model as scikit-learn's
    /// `LinearRegression().fit(X, y)`) and records the reference statistics of `data`. The version
    /// is derived from the coefficients.
    pub fn fit(data: &Dataset) -> Result<Self, ModelError> {
        let records = ndarray::Array2::from_shape_vec(
            (data.len(), data.n_features()),
            data.features().to_vec(),
        )
        .map_err(|err| ModelError::Fit(err.to_string()))?;
        let targets = ndarray::Array1::from_vec(data.targets().to_vec());
        let fitted = linfa_linear::LinearRegression::new()
            .fit(&linfa::Dataset::new(records, targets))
            .map_err(|err| ModelError::Fit(err.to_string()))?;
        let coefficients = fitted.params().to_vec();
        let intercept = fitted.intercept();
        let version = derived_version(&coefficients, intercept);
        let mut model = Self {
            feature_names: data.feature_names.clone(),
            coefficients,
            intercept,
            version,
            reference: None,
        };
        model.validate()?;
        let fit = model
            .evaluate(data)
            .map_err(|err| ModelError::Fit(err.to_string()))?;
        model.reference = Some(Arc::new(Reference::of(data, fit.mae)));
        Ok(model)
    }

    /// Checks that every number is finite and names fit coefficients.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.coefficients.is_empty() {
            return Err(ModelError::Invalid("no coefficients".to_owned()));
        }
        if self.feature_names.len() != self.coefficients.len() {
            return Err(ModelError::Invalid(format!(
                "{} feature names for {} coefficients",
                self.feature_names.len(),
                self.coefficients.len()
            )));
        }
        if !self.intercept.is_finite() || self.coefficients.iter().any(|c| !c.is_finite()) {
            return Err(ModelError::Invalid(
                "coefficients and intercept must be finite numbers".to_owned(),
            ));
        }
        if self.version.is_empty() {
            return Err(ModelError::Invalid("empty version".to_owned()));
        }
        if let Some(reference) = &self.reference {
            reference.validate(&self.feature_names)?;
        }
        Ok(())
    }

    /// Number of features the model takes.
    pub fn n_features(&self) -> usize {
        self.coefficients.len()
    }

    /// Predicts one sample; a vector of the wrong length is refused.
    pub fn predict(&self, features: &[f64]) -> Result<f64, MessageError> {
        if features.len() != self.coefficients.len() {
            return Err(MessageError::WrongLength {
                expected: self.coefficients.len(),
                got: features.len(),
            });
        }
        let dot: f64 = self
            .coefficients
            .iter()
            .zip(features)
            .map(|(c, x)| c * x)
            .sum();
        Ok(self.intercept + dot)
    }

    /// R² and mean absolute error on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<FitMetrics, MessageError> {
        let n = data.len() as f64;
        let mean = data.targets().iter().sum::<f64>() / n;
        let (mut abs, mut ss_res, mut ss_tot) = (0.0, 0.0, 0.0);
        for row in 0..data.len() {
            let y = data.target(row);
            let residual = y - self.predict(data.row(row))?;
            abs += residual.abs();
            ss_res += residual * residual;
            ss_tot += (y - mean) * (y - mean);
        }
        Ok(FitMetrics {
            r2: if ss_tot > 0.0 {
                1.0 - ss_res / ss_tot
            } else {
                0.0
            },
            mae: abs / n,
            rows: data.len(),
        })
    }
}

/// `ols-` and the first 12 hex digits of the SHA-256 of the parameters' bits: the same model
/// always gets the same version.
pub fn derived_version(coefficients: &[f64], intercept: f64) -> String {
    let mut hasher = Sha256::new();
    for value in coefficients.iter().chain(std::iter::once(&intercept)) {
        hasher.update(value.to_bits().to_le_bytes());
    }
    format!("ols-{}", &hex(&hasher.finalize())[..12])
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
