//! The model a replica serves, whatever its family: the built-in linear regression or, for
//! classification, the built-in logistic regression (a JSON artifact, or a fit on `DATA_PATH`), or
//! a user's ONNX graph, behind one type that the handler, the artifact watcher, the drift monitor
//! and the trainer's evaluation all use.
//!
//! Which one an artifact is, is read from its bytes (a JSON artifact starts with `{` and names its
//! format, anything else is tried as ONNX), so `MODEL_PATH` and `MODEL_URL` serve all the same way.

use crate::artifact::{Artifact, ContentHash};
use crate::drift::Reference;
use crate::error::ModelError;
use crate::logistic::{LogisticArtifact, LogisticModel, is_logistic_json};
use crate::onnx::OnnxModel;
use crate::regression::{LinearModel, hex};
use anyhow::Context as _;
use pipeline::classes::{ClassLabel, Probabilities, Task};
use pipeline::dataset::Dataset;
use pipeline::messages::MessageError;
use pipeline::schema::FeatureSchema;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::Arc;

/// How the model computes.
#[derive(Debug)]
pub enum Engine {
    /// `intercept + coefficients · x`, in-process.
    Linear(LinearModel),
    /// `softmax(W·x + b)` over the classes, in-process.
    Logistic(LogisticModel),
    /// A graph run by ONNX Runtime.
    Onnx(OnnxModel),
}

/// A model ready to serve.
#[derive(Debug)]
pub struct ServedModel {
    /// Version carried on every prediction.
    pub version: String,
    /// The features it takes (names when known).
    pub schema: FeatureSchema,
    /// Target column name, when known.
    pub target_name: Option<String>,
    /// Statistics of the training data, for drift; `None` when the artifact has none.
    pub reference: Option<Arc<Reference>>,
    /// How it computes.
    pub engine: Engine,
}

/// One sample's answer: a number from a regressor, a class and the class probabilities from a
/// classifier.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// A regression prediction, finite.
    Number(f64),
    /// The predicted class and the probability of every class.
    Class(ClassLabel, Probabilities),
}

/// A model's predictions on a labelled data set and how good they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// One per row, in the data's order.
    pub predictions: Vec<f64>,
    /// Mean absolute error.
    pub mae: f64,
    /// Coefficient of determination.
    pub r2: f64,
}

/// MAE and R² of `predictions` against `targets`.
fn score(predictions: &[f64], targets: &[f64]) -> (f64, f64) {
    let n = targets.len() as f64;
    let mean = targets.iter().sum::<f64>() / n;
    let (mut abs, mut ss_res, mut ss_tot) = (0.0, 0.0, 0.0);
    for (p, y) in predictions.iter().zip(targets) {
        abs += (y - p).abs();
        ss_res += (y - p) * (y - p);
        ss_tot += (y - mean) * (y - mean);
    }
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        0.0
    };
    (abs / n, r2)
}

/// What kind of artifact some bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A JSON artifact of a built-in model: `ml-pipeline/linear-model/1` or
    /// `ml-pipeline/logistic-model/1`, told apart by its `format` field in [`ServedModel::parse`].
    /// (Named for the first of them; the trainer matches on it.)
    LinearJson,
    /// An ONNX graph.
    Onnx,
}

impl ArtifactKind {
    /// A JSON artifact starts with `{` (after white space); an ONNX file is a protobuf.
    pub fn of(bytes: &[u8]) -> Self {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Self::LinearJson,
            _ => Self::Onnx,
        }
    }

    /// The file extension of this kind: `json` or `onnx`.
    pub fn extension(self) -> &'static str {
        match self {
            Self::LinearJson => "json",
            Self::Onnx => "onnx",
        }
    }
}

impl ServedModel {
    /// The built-in linear model.
    pub fn linear(model: LinearModel) -> Self {
        Self {
            version: model.version.clone(),
            schema: FeatureSchema::named(model.feature_names.clone()),
            target_name: None,
            reference: model.reference.clone(),
            engine: Engine::Linear(model),
        }
    }

    /// A JSON artifact's model.
    pub fn of_artifact(artifact: &Artifact) -> Self {
        Self {
            target_name: Some(artifact.target_name.clone()),
            ..Self::linear(artifact.model())
        }
    }

    /// The built-in logistic regression.
    pub fn logistic(model: LogisticModel) -> Self {
        Self {
            version: model.version.clone(),
            schema: FeatureSchema::named(model.feature_names.clone()),
            target_name: None,
            reference: model.reference.clone(),
            engine: Engine::Logistic(model),
        }
    }

    /// A JSON logistic artifact's model.
    pub fn of_logistic_artifact(artifact: &LogisticArtifact) -> Self {
        Self {
            target_name: Some(artifact.target_name.clone()),
            ..Self::logistic(artifact.model())
        }
    }

    /// An ONNX graph's model; its version is the graph's `version` metadata, or derived from its
    /// bytes.
    pub fn onnx(bytes: &[u8]) -> Result<Self, ModelError> {
        let graph = OnnxModel::from_bytes(bytes)?;
        let metadata = graph.metadata.clone();
        let version = metadata
            .version
            .unwrap_or_else(|| format!("onnx-{}", &hex(&Sha256::digest(bytes))[..12]));
        let schema = match metadata.feature_names {
            Some(names) => FeatureSchema::named(names),
            None => FeatureSchema::positional(graph.n_features()),
        };
        Ok(Self {
            version,
            schema,
            target_name: metadata.target_name,
            reference: metadata.reference.map(Arc::new),
            engine: Engine::Onnx(graph),
        })
    }

    /// The model in an artifact's bytes, JSON or ONNX.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        match ArtifactKind::of(bytes) {
            ArtifactKind::LinearJson => {
                let text = std::str::from_utf8(bytes).context("not UTF-8")?;
                // Any other JSON goes to the linear parser, whose messages name what is wrong.
                if is_logistic_json(text) {
                    Ok(Self::of_logistic_artifact(&LogisticArtifact::parse(text)?))
                } else {
                    Ok(Self::of_artifact(&Artifact::parse(text)?))
                }
            }
            ArtifactKind::Onnx => {
                // Checked before the runtime is opened: a broken file is named for what it is,
                // with or without ONNX Runtime.
                if let Err(not_onnx) = crate::stamp::metadata_props(bytes) {
                    let as_json = match std::str::from_utf8(bytes) {
                        Ok(_) => "it does not start with `{`".to_owned(),
                        Err(err) => format!("not text: {err}"),
                    };
                    anyhow::bail!(
                        "refusing an ONNX model: cannot load the graph: {not_onnx}; nor is it a \
                         JSON model artifact ({as_json})"
                    );
                }
                Ok(Self::onnx(bytes).context("refusing an ONNX model")?)
            }
        }
    }

    /// Reads and checks the artifact at `path`, with the hash of its bytes.
    pub fn load(path: &Path) -> anyhow::Result<(Self, ContentHash)> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read model artifact {}", path.display()))?;
        let model = Self::parse(&bytes)
            .with_context(|| format!("refusing model artifact {}", path.display()))?;
        Ok((model, ContentHash::of(&bytes)))
    }

    /// Fits the built-in linear regression on `data`.
    pub fn fit(data: &Dataset) -> Result<Self, ModelError> {
        Ok(Self {
            target_name: Some(data.target_name.clone()),
            ..Self::linear(LinearModel::fit(data)?)
        })
    }

    /// Fits the built-in model of `task` on `data`: the linear regression, or the logistic
    /// regression (`data` read with [`Task::Classification`]).
    pub fn fit_for(data: &Dataset, task: Task) -> Result<Self, ModelError> {
        match task {
            Task::Regression => Self::fit(data),
            Task::Classification => Ok(Self {
                target_name: Some(data.target_name.clone()),
                ..Self::logistic(LogisticModel::fit(data)?)
            }),
        }
    }

    /// Features it takes.
    pub fn n_features(&self) -> usize {
        self.schema.width()
    }

    /// Its feature names, when known.
    pub fn feature_names(&self) -> Option<&[String]> {
        self.schema.names()
    }

    /// `linear`, `logistic` or `onnx`, for logs and `model inspect`.
    pub fn family(&self) -> &'static str {
        match self.engine {
            Engine::Linear(_) => "linear",
            Engine::Logistic(_) => "logistic",
            Engine::Onnx(_) => "onnx",
        }
    }

    /// What the model predicts: a number, or a class with its probabilities.
    pub fn task(&self) -> Task {
        match &self.engine {
            Engine::Onnx(graph) => graph.task(),
            Engine::Linear(_) => Task::Regression,
            Engine::Logistic(_) => Task::Classification,
        }
    }

    /// A classifier's classes, in the order of its probabilities; `None` for a regression.
    pub fn classes(&self) -> Option<&[ClassLabel]> {
        match &self.engine {
            Engine::Onnx(graph) => graph.classes(),
            Engine::Logistic(model) => Some(&model.classes),
            Engine::Linear(_) => None,
        }
    }

    /// The error of a regression path ([`Self::predict`], [`Self::predict_dataset`],
    /// [`Self::evaluate`]) asked of a classifier.
    fn not_a_regression(&self) -> ModelError {
        ModelError::Invalid(format!(
            "model {} ({}) is a classifier: it answers a class and class probabilities \
             (ServedModel::answer), not a number",
            self.version,
            self.family()
        ))
    }

    /// Answers one sample already in the model's order: [`Self::predict`] for a regressor, the
    /// class and its probabilities for a classifier.
    pub fn answer(&self, features: &[f64]) -> Result<Result<Prediction, MessageError>, ModelError> {
        let graph = match &self.engine {
            Engine::Onnx(graph) if graph.classes().is_some() => graph,
            Engine::Logistic(model) => {
                return Ok(model
                    .classify(features)
                    .map(|(label, probabilities)| Prediction::Class(label, probabilities)));
            }
            _ => return Ok(self.predict(features)?.map(Prediction::Number)),
        };
        if features.len() != graph.n_features() {
            return Ok(Err(MessageError::WrongLength {
                expected: graph.n_features(),
                got: features.len(),
            }));
        }
        let answer = graph.classify_rows(features, 1)?.into_iter().next();
        Ok(match answer {
            Some(Ok((label, probabilities))) => Ok(Prediction::Class(label, probabilities)),
            Some(Err(err)) => Err(err),
            None => Err(MessageError::NonFinite(format!(
                "the answer of model {} for these features",
                self.version
            ))),
        })
    }

    /// Predicts one sample already in the model's order ([`FeatureSchema::arrange`]). A
    /// non-finite prediction is the input's problem (dead-lettered); a runtime failure is the
    /// service's ([`ModelError`]).
    pub fn predict(&self, features: &[f64]) -> Result<Result<f64, MessageError>, ModelError> {
        let y = match &self.engine {
            Engine::Linear(model) => match model.predict(features) {
                Ok(y) => y,
                Err(err) => return Ok(Err(err)),
            },
            Engine::Logistic(_) => return Err(self.not_a_regression()),
            Engine::Onnx(graph) => {
                if features.len() != graph.n_features() {
                    return Ok(Err(MessageError::WrongLength {
                        expected: graph.n_features(),
                        got: features.len(),
                    }));
                }
                graph.predict_rows(features, 1)?[0]
            }
        };
        if !y.is_finite() {
            return Ok(Err(MessageError::NonFinite(format!(
                "the prediction of model {} for these features",
                self.version
            ))));
        }
        Ok(Ok(y))
    }

    /// Predicts every row of `data` (in the model's order), for the trainer's evaluation.
    pub fn predict_dataset(&self, data: &Dataset) -> Result<Vec<f64>, ModelError> {
        match &self.engine {
            Engine::Linear(model) => (0..data.len())
                .map(|row| {
                    model
                        .predict(data.row(row))
                        .map_err(|err| ModelError::Invalid(err.to_string()))
                })
                .collect(),
            Engine::Logistic(_) => Err(self.not_a_regression()),
            Engine::Onnx(graph) => graph.predict_rows(data.features(), data.len()),
        }
    }

    /// Predictions for `data` (columns matched by name, [`Self::arrange_dataset`]) and their MAE
    /// and R². A non-finite prediction is an error naming its row: such a model is not fit to
    /// serve.
    pub fn evaluate(&self, data: &Dataset) -> anyhow::Result<Evaluation> {
        if self.task() == Task::Classification {
            return Err(self.not_a_regression().into());
        }
        let data = self.arrange_dataset(data).map_err(anyhow::Error::msg)?;
        let predictions = self.predict_dataset(&data)?;
        if let Some(row) = predictions.iter().position(|p| !p.is_finite()) {
            anyhow::bail!(
                "the model answers {} for row {row} of the data",
                predictions[row]
            );
        }
        let (mae, r2) = score(&predictions, data.targets());
        Ok(Evaluation {
            predictions,
            mae,
            r2,
        })
    }

    /// `data`'s columns in this model's order (by name when it knows its names, else as they are
    /// when the count fits), or what does not fit.
    pub fn arrange_dataset(&self, data: &Dataset) -> Result<Dataset, String> {
        let Some(names) = self.feature_names() else {
            if data.n_features() != self.n_features() {
                return Err(format!(
                    "the data has {} feature columns, the model takes {}",
                    data.n_features(),
                    self.n_features()
                ));
            }
            return Ok(data.clone());
        };
        if names == data.feature_names.as_slice() {
            return Ok(data.clone());
        }
        let columns: Vec<usize> = names
            .iter()
            .map(|name| data.feature_names.iter().position(|c| c == name))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                let missing: Vec<&str> = names
                    .iter()
                    .filter(|n| !data.feature_names.contains(n))
                    .map(String::as_str)
                    .collect();
                format!(
                    "the data lacks the model's features [{}] (its columns: [{}])",
                    missing.join(", "),
                    data.feature_names.join(", ")
                )
            })?;
        let mut features = Vec::with_capacity(data.len() * columns.len());
        for row in 0..data.len() {
            let values = data.row(row);
            features.extend(columns.iter().map(|&c| values[c]));
        }
        Dataset::from_rows(
            names.to_vec(),
            data.target_name.clone(),
            features,
            data.targets().to_vec(),
        )
        .ok_or_else(|| "the data has no rows".to_owned())
    }

    /// Whether `other` does the same task: a replica's answers go to a metric service measuring
    /// one task, so a regressor is never swapped for a classifier or back.
    pub fn same_task(&self, other: &Self) -> Result<(), String> {
        if self.task() == other.task() {
            return Ok(());
        }
        Err(format!(
            "it is a {} model ({}), the model being served is a {} model ({}); TASK picks the \
             task of the model fitted when there is no artifact",
            self.task(),
            self.family(),
            other.task(),
            other.family()
        ))
    }

    /// Whether `other` takes the same features (by name when both know them, else by count).
    pub fn same_features(&self, other: &Self) -> Result<(), String> {
        match (self.feature_names(), other.feature_names()) {
            (Some(ours), Some(theirs)) if ours != theirs => Err(format!(
                "it takes features [{}], the model being served takes [{}]",
                ours.join(", "),
                theirs.join(", ")
            )),
            _ if self.n_features() != other.n_features() => Err(format!(
                "it takes {} features, the model being served takes {}",
                self.n_features(),
                other.n_features()
            )),
            _ => Ok(()),
        }
    }
}
