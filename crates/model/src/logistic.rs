//! The built-in classifier: a multinomial logistic regression fitted by `linfa-logistic` (L-BFGS
//! on the L2-penalised log loss, two classes included), its JSON artifact
//! `ml-pipeline/logistic-model/1`, and the per-message prediction `softmax(W·x + b)`: the class of
//! the largest probability (the first such class on a tie) and the probability of every class.
//!
//! The features are standardised for the solver only: the stored coefficients and intercepts act
//! on the raw features, so serving is one dot product per class.

use crate::drift::Reference;
use crate::error::ModelError;
use crate::regression::hex;
use anyhow::Context as _;
use linfa::traits::Fit as _;
use pipeline::classes::{ClassLabel, Probabilities, Task, log_loss_of};
use pipeline::dataset::Dataset;
use pipeline::messages::MessageError;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Identifies the file format, so a wrong file is refused with a clear error.
pub const FORMAT: &str = "ml-pipeline/logistic-model/1";

/// How the solver fits. The defaults are scikit-learn's `LogisticRegression()` objective (its
/// `C = 1`: `alpha` weighs `½‖W‖²` against the summed log loss, the intercepts unpenalised) on
/// standardised features, as in `make_pipeline(StandardScaler(), LogisticRegression())`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitOptions {
    /// Weight of the L2 penalty `½‖W‖²` (on the standardised coefficients); `1 / C` in
    /// scikit-learn's terms. Above 0 keeps a separable set's coefficients finite.
    pub alpha: f64,
    /// L-BFGS iterations at most: the best parameters so far are kept when it stops there.
    pub max_iterations: u64,
    /// The solver stops once the gradient's norm is below this.
    pub gradient_tolerance: f64,
    /// Fit on standardised features (then turned back into raw-feature coefficients). Off, the
    /// solver works on the raw scale: on breast_cancer (areas near 1000 beside fractal
    /// dimensions near 0.06) it stops far from the optimum.
    pub standardize: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            // linfa's and scikit-learn's default; standardised data converges well before.
            max_iterations: 100,
            gradient_tolerance: 1e-4,
            standardize: true,
        }
    }
}

/// Quality of a classifier on the data it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassifierMetrics {
    /// Share of rows whose predicted class is the true one.
    pub accuracy: f64,
    /// Mean of `-ln p(true class)`, each probability clipped to `[ε, 1 − ε]` (`ε` the f64 machine
    /// epsilon), as scikit-learn's `log_loss` ([`log_loss_of`], as the metric service).
    pub log_loss: f64,
    /// Rows used.
    pub rows: usize,
}

/// A fitted multinomial logistic regression: `p = softmax(W·x + b)` over `classes`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticModel {
    /// Names of the features, in order.
    pub feature_names: Vec<String>,
    /// The classes, in the order of `coefficients`, `intercepts` and the probabilities.
    pub classes: Vec<ClassLabel>,
    /// One row per class, one coefficient per feature (raw feature scale).
    pub coefficients: Vec<Vec<f64>>,
    /// One intercept per class.
    pub intercepts: Vec<f64>,
    /// Version carried on every prediction.
    pub version: String,
    /// Statistics of the training data, for drift; its in-sample error (`mae`) is the in-sample
    /// log loss, as `model stamp` records for an ONNX classifier.
    pub reference: Option<Arc<Reference>>,
}

impl LogisticModel {
    /// Fits on `data` (read with [`Task::Classification`]) with [`FitOptions::default`].
    pub fn fit(data: &Dataset) -> Result<Self, ModelError> {
        Self::fit_with(data, FitOptions::default())
    }

    /// Fits on `data` with `options`, and records the reference statistics of `data`. The
    /// version is derived from the parameters.
    pub fn fit_with(data: &Dataset, options: FitOptions) -> Result<Self, ModelError> {
        let fit_error = |why: String| ModelError::FitClassifier(why);
        let classes = data
            .classes()
            .ok_or_else(|| {
                fit_error(
                    "the data has no class labels (read it for TASK=classification)".to_owned(),
                )
            })?
            .to_vec();
        if classes.len() < 2 {
            return Err(fit_error(format!(
                "the target column {:?} holds {} class(es): a classifier needs at least 2",
                data.target_name,
                classes.len()
            )));
        }
        let (n, width) = (data.len(), data.n_features());
        let scaling = Scaling::of(data, options.standardize);
        let records = ndarray::Array2::from_shape_fn((n, width), |(row, column)| {
            scaling.apply(column, data.row(row)[column])
        });
        // The data's class indices: linfa sorts them, so its column k is `classes[k]`.
        let targets: ndarray::Array1<usize> = data.targets().iter().map(|&t| t as usize).collect();
        let fitted = linfa_logistic::MultiLogisticRegression::default()
            .alpha(options.alpha)
            .max_iterations(options.max_iterations)
            .gradient_tolerance(options.gradient_tolerance)
            .fit(&linfa::Dataset::new(records, targets))
            .map_err(|err| fit_error(err.to_string()))?;
        let (params, intercept) = (fitted.params(), fitted.intercept());
        if fitted.classes() != (0..classes.len()).collect::<Vec<_>>().as_slice() {
            return Err(fit_error(format!(
                "the solver saw classes {:?}, the data has {}",
                fitted.classes(),
                classes.len()
            )));
        }
        // Back to the raw scale: w·(x − m)/s + b = (w/s)·x + (b − Σ w·m/s).
        let mut coefficients = Vec::with_capacity(classes.len());
        let mut intercepts = Vec::with_capacity(classes.len());
        for k in 0..classes.len() {
            let column = params.column(k);
            let row: Vec<f64> = (0..width).map(|j| column[j] / scaling.scale[j]).collect();
            let shift: f64 = (0..width).map(|j| row[j] * scaling.mean[j]).sum();
            intercepts.push(intercept[k] - shift);
            coefficients.push(row);
        }
        let version = derived_version(&classes, &coefficients, &intercepts);
        let mut model = Self {
            feature_names: data.feature_names.clone(),
            classes,
            coefficients,
            intercepts,
            version,
            reference: None,
        };
        model.validate().map_err(|err| fit_error(err.to_string()))?;
        let fit = model.evaluate(data)?;
        model.reference = Some(Arc::new(Reference::of(data, fit.log_loss)));
        Ok(model)
    }

    /// Checks the shape (a row of coefficients and an intercept per class, a coefficient per
    /// feature, two or more distinct classes) and that every number is finite.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |why: String| Err(ModelError::Invalid(why));
        let (classes, width) = (self.classes.len(), self.feature_names.len());
        if width == 0 {
            return invalid("no feature names".to_owned());
        }
        if classes < 2 {
            return invalid(format!(
                "{classes} class(es): a classifier needs at least 2"
            ));
        }
        for (i, class) in self.classes.iter().enumerate() {
            // Compared by key: the integer 1 and the string "1" are one class to the pipeline.
            if self.classes[..i]
                .iter()
                .any(|other| other.key() == class.key())
            {
                return invalid(format!("class {:?} appears twice", class.key()));
            }
        }
        if self.coefficients.len() != classes {
            return invalid(format!(
                "{classes} classes but {} rows of coefficients (one per class)",
                self.coefficients.len()
            ));
        }
        if self.intercepts.len() != classes {
            return invalid(format!(
                "{classes} classes but {} intercepts (one per class)",
                self.intercepts.len()
            ));
        }
        if let Some((k, row)) = self
            .coefficients
            .iter()
            .enumerate()
            .find(|(_, row)| row.len() != width)
        {
            return invalid(format!(
                "the coefficients of class {:?} are {}, for {width} feature names",
                self.classes[k].key(),
                row.len()
            ));
        }
        let finite = self.intercepts.iter().all(|b| b.is_finite())
            && self.coefficients.iter().flatten().all(|w| w.is_finite());
        if !finite {
            return invalid("coefficients and intercepts must be finite numbers".to_owned());
        }
        if self.version.is_empty() {
            return invalid("empty version".to_owned());
        }
        if let Some(reference) = &self.reference {
            reference.validate(&self.feature_names)?;
        }
        Ok(())
    }

    /// Number of features the model takes.
    pub fn n_features(&self) -> usize {
        self.feature_names.len()
    }

    /// `softmax(W·x + b)` of one sample, in [`Self::classes`] order; a vector of the wrong length,
    /// or features so large that a score is not finite, is refused.
    pub fn probabilities(&self, features: &[f64]) -> Result<Vec<f64>, MessageError> {
        if features.len() != self.n_features() {
            return Err(MessageError::WrongLength {
                expected: self.n_features(),
                got: features.len(),
            });
        }
        let mut scores: Vec<f64> = self
            .coefficients
            .iter()
            .zip(&self.intercepts)
            .map(|(row, b)| b + row.iter().zip(features).map(|(w, x)| w * x).sum::<f64>())
            .collect();
        if scores.iter().any(|z| !z.is_finite()) {
            return Err(MessageError::NonFinite(format!(
                "the class scores of model {} for these features",
                self.version
            )));
        }
        // Shifted by the largest score: exp never overflows, and the largest term is 1.
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for z in &mut scores {
            *z = (*z - max).exp();
            sum += *z;
        }
        scores.iter_mut().for_each(|p| *p /= sum);
        Ok(scores)
    }

    /// The predicted class (the most probable; the first of them on a tie) and every class's
    /// probability.
    pub fn classify(&self, features: &[f64]) -> Result<(ClassLabel, Probabilities), MessageError> {
        let p = self.probabilities(features)?;
        let best = argmax(&p);
        let probabilities = Probabilities::new(
            self.classes
                .iter()
                .map(|class| class.key().into_owned())
                .zip(p)
                .collect(),
        )?;
        Ok((self.classes[best].clone(), probabilities))
    }

    /// Accuracy and log loss on `data` (read with [`Task::Classification`], columns in the
    /// model's order). A class the model does not know is an error naming it.
    pub fn evaluate(&self, data: &Dataset) -> Result<ClassifierMetrics, ModelError> {
        let invalid = |why: String| ModelError::Invalid(why);
        let data_classes = data.classes().ok_or_else(|| {
            invalid("the data has no class labels (read it for TASK=classification)".to_owned())
        })?;
        // The model's index of each of the data's classes.
        let ours: Vec<usize> = data_classes
            .iter()
            .map(|class| {
                self.classes
                    .iter()
                    .position(|known| known.key() == class.key())
                    .ok_or_else(|| {
                        invalid(format!(
                            "the data has class {:?}, which the model does not know (its \
                             classes: {})",
                            class.key(),
                            keys(&self.classes)
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        let (mut correct, mut loss) = (0usize, 0.0);
        for row in 0..data.len() {
            let p = self
                .probabilities(data.row(row))
                .map_err(|err| invalid(format!("row {row} of the data: {err}")))?;
            let truth = ours[data.target(row) as usize];
            correct += usize::from(argmax(&p) == truth);
            loss += log_loss_of(p[truth]);
        }
        let rows = data.len();
        Ok(ClassifierMetrics {
            accuracy: correct as f64 / rows as f64,
            log_loss: loss / rows as f64,
            rows,
        })
    }
}

/// The index of the largest value, the first on a tie.
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// The classes' keys, comma-separated, for messages.
fn keys(classes: &[ClassLabel]) -> String {
    classes
        .iter()
        .map(|c| format!("{:?}", c.key()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per-feature centring and scaling applied before the solver (identity when off).
struct Scaling {
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Scaling {
    fn of(data: &Dataset, standardize: bool) -> Self {
        let (n, width) = (data.len() as f64, data.n_features());
        if !standardize {
            return Self {
                mean: vec![0.0; width],
                scale: vec![1.0; width],
            };
        }
        let mut mean = vec![0.0; width];
        for row in 0..data.len() {
            mean.iter_mut()
                .zip(data.row(row))
                .for_each(|(m, x)| *m += x / n);
        }
        let mut scale = vec![0.0; width];
        for row in 0..data.len() {
            for ((s, x), m) in scale.iter_mut().zip(data.row(row)).zip(&mean) {
                *s += (x - m) * (x - m) / n;
            }
        }
        // A constant column is left unscaled (scikit-learn's StandardScaler does the same).
        let scale = scale
            .into_iter()
            .map(|v| if v > 0.0 { v.sqrt() } else { 1.0 })
            .collect();
        Self { mean, scale }
    }

    fn apply(&self, column: usize, value: f64) -> f64 {
        (value - self.mean[column]) / self.scale[column]
    }
}

/// `logreg-` and the first 12 hex digits of the SHA-256 of the classes and the parameters' bits:
/// the same model always gets the same version.
pub fn derived_version(
    classes: &[ClassLabel],
    coefficients: &[Vec<f64>],
    intercepts: &[f64],
) -> String {
    let mut hasher = Sha256::new();
    for class in classes {
        hasher.update(class.key().as_bytes());
        hasher.update([0]);
    }
    for value in coefficients.iter().flatten().chain(intercepts) {
        hasher.update(value.to_bits().to_le_bytes());
    }
    format!("logreg-{}", &hex(&hasher.finalize())[..12])
}

/// The artifact file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticArtifact {
    /// Always [`FORMAT`].
    pub format: String,
    /// Version carried on every prediction.
    pub version: String,
    /// Feature names, in order.
    pub feature_names: Vec<String>,
    /// Target column name.
    pub target_name: String,
    /// The classes as the data has them (JSON integers or strings), in the order of the rows of
    /// `coefficients`, of `intercepts` and of the probabilities.
    pub classes: Vec<ClassLabel>,
    /// One row per class, one coefficient per feature.
    pub coefficients: Vec<Vec<f64>>,
    /// One intercept per class.
    pub intercepts: Vec<f64>,
    /// SHA-256 of the training CSV file.
    pub training_data_sha256: String,
    /// In-sample quality.
    pub metrics: ClassifierMetrics,
    /// When it was trained (RFC 3339).
    pub trained_at: String,
    /// Statistics of the training data, the reference of the drift figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

impl LogisticArtifact {
    /// Fits on the CSV at `data_path` (its target column holds class labels) and describes the
    /// result. The version is `version`, or derived from the parameters.
    pub fn train(
        data_path: &Path,
        target_column: Option<&str>,
        version: Option<String>,
    ) -> anyhow::Result<Self> {
        let bytes = std::fs::read(data_path)
            .with_context(|| format!("cannot read {}", data_path.display()))?;
        let data = Dataset::from_csv_for(data_path, target_column, Task::Classification)?;
        Self::fit(&data, hex(&Sha256::digest(&bytes)), version)
    }

    /// Fits on `data` and describes the result; `data_sha256` names the data it came from.
    pub fn fit(
        data: &Dataset,
        data_sha256: String,
        version: Option<String>,
    ) -> anyhow::Result<Self> {
        let mut model = LogisticModel::fit(data)?;
        if let Some(version) = version {
            model.version = version;
        }
        Self::of(&model, data, data_sha256)
    }

    /// The artifact of a fitted `model`, with its in-sample quality on `data`.
    pub fn of(model: &LogisticModel, data: &Dataset, data_sha256: String) -> anyhow::Result<Self> {
        let metrics = model.evaluate(data)?;
        Ok(Self {
            format: FORMAT.to_owned(),
            version: model.version.clone(),
            feature_names: model.feature_names.clone(),
            target_name: data.target_name.clone(),
            classes: model.classes.clone(),
            coefficients: model.coefficients.clone(),
            intercepts: model.intercepts.clone(),
            training_data_sha256: data_sha256,
            metrics,
            trained_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            reference: model.reference.as_deref().cloned(),
        })
    }

    /// Parses and validates artifact JSON.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let artifact: Self =
            serde_json::from_str(text).context("not a logistic model artifact (JSON)")?;
        if artifact.format != FORMAT {
            anyhow::bail!("format is {:?}, expected {FORMAT:?}", artifact.format);
        }
        pipeline::messages::validate_id(&artifact.version).map_err(|_| {
            ModelError::Invalid(format!(
                "version {:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
                artifact.version
            ))
        })?;
        artifact.model().validate()?;
        Ok(artifact)
    }

    /// The servable model.
    pub fn model(&self) -> LogisticModel {
        LogisticModel {
            feature_names: self.feature_names.clone(),
            classes: self.classes.clone(),
            coefficients: self.coefficients.clone(),
            intercepts: self.intercepts.clone(),
            version: self.version.clone(),
            reference: self.reference.clone().map(Arc::new),
        }
    }

    /// Writes the artifact atomically (as [`crate::artifact::Artifact::write`]).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        Ok(crate::artifact::write_atomically(path, &self.to_bytes()?)?)
    }

    /// The file's bytes: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok((serde_json::to_string_pretty(self)? + "\n").into_bytes())
    }
}

/// Whether JSON `text` says it is a logistic artifact (its `format` field). Anything else,
/// unreadable JSON included, is left to the linear artifact's parser and its messages.
pub fn is_logistic_json(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Head {
        format: Option<serde_json::Value>,
    }
    serde_json::from_str::<Head>(text)
        .ok()
        .and_then(|head| head.format)
        .is_some_and(|format| format == FORMAT)
}

#[cfg(test)]
mod tests;
