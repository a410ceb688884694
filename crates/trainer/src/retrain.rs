//! One retrain: make a candidate from the older part of the window (the built-in linear fit, or
//! the user's `TRAIN_COMMAND`, [`crate::train_command`]), score it and the served model on the
//! newest part (the holdout) through the same code the replicas serve with
//! ([`ServedModel::evaluate`]), and promote it only when the guard says so ([`policy::decide`]).
//! Promotion writes `<folder of MODEL_PATH>/<version>.json` (or `.onnx`), then replaces
//! `MODEL_PATH` with the same bytes, both atomically; the model services watching `MODEL_PATH`
//! (or the trainer's `GET /model`) swap to it.

use crate::model_file::{ModelFile, ModelPathCheck};
use crate::policy::{self, Score, Split, Trigger, Verdict};
use crate::store::Sample;
use crate::train_command::TrainCommand;
use anyhow::Context as _;
use model::artifact::{Artifact, find_version, versioned_path, write_atomically};
use model::logistic::LogisticArtifact;
use model::served::{ArtifactKind, ServedModel};
use pipeline::classes::{ClassLabel, Task};
use pipeline::dataset::Dataset;
use pipeline::messages::{LabelKind, Target};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// What the served model is when `MODEL_PATH` does not exist yet: the fit on `DATA_PATH` the
/// model services make in that case (same data, same version): its JSON artifact and what the
/// window needs of it.
#[derive(Clone, Debug)]
pub struct Baseline {
    /// Its version.
    pub version: String,
    /// `DATA_PATH`'s feature columns, in order: the window's columns.
    pub feature_names: Vec<String>,
    /// `DATA_PATH`'s target column.
    pub target_name: String,
    /// The artifact, as `GET /model` and a first promotion's `<version>.json` have it.
    pub bytes: Vec<u8>,
}

impl Baseline {
    /// The baseline of a linear artifact.
    pub fn linear(artifact: &Artifact) -> anyhow::Result<Self> {
        Ok(Self {
            version: artifact.version.clone(),
            feature_names: artifact.feature_names.clone(),
            target_name: artifact.target_name.clone(),
            bytes: artifact.to_bytes()?,
        })
    }

    /// The baseline of a logistic (classifier) artifact.
    pub fn logistic(artifact: &LogisticArtifact) -> anyhow::Result<Self> {
        Ok(Self {
            version: artifact.version.clone(),
            feature_names: artifact.feature_names.clone(),
            target_name: artifact.target_name.clone(),
            bytes: artifact.to_bytes()?,
        })
    }

    /// The fit the model services make on `DATA_PATH` for `task` while `MODEL_PATH` does not
    /// exist: linear, or logistic.
    pub fn fit_on(data_path: &Path, target: Option<&str>, task: Task) -> anyhow::Result<Self> {
        match task {
            Task::Regression => Self::linear(&Artifact::train(data_path, target, None)?),
            Task::Classification => {
                Self::logistic(&LogisticArtifact::train(data_path, target, None)?)
            }
        }
    }

    /// The model it serves.
    pub fn model(&self) -> anyhow::Result<ServedModel> {
        ServedModel::parse(&self.bytes).context("the baseline is not a model")
    }
}

/// `serving_version` of a retrain while `MODEL_PATH` is not a valid artifact.
pub const UNREADABLE: &str = "unreadable";

/// Where the artifacts are and how the guard is set.
#[derive(Clone, Debug)]
pub struct Promoter {
    /// The served artifact (`MODEL_PATH`); versions go beside it.
    pub model_path: PathBuf,
    /// Newest fraction of the window scored (`TRAIN_HOLDOUT`).
    pub holdout: f64,
    /// Relative MAE gain a candidate needs (`PROMOTE_MIN_GAIN`).
    pub min_gain: f64,
    /// The served model while `MODEL_PATH` does not exist.
    pub baseline: Baseline,
    /// The version the replicas' predictions carry, as the alarm watcher last learned it from the
    /// metric service ([`policy::ServedVersion`]); `None` without `METRIC_URL` or an answer.
    pub replicas_serve: Arc<Mutex<Option<String>>>,
    /// The user's training code (`TRAIN_COMMAND`); the built-in linear fit without it.
    pub train_command: Option<TrainCommand>,
    /// What `MODEL_PATH` held when last read, so an unchanged file is not loaded again.
    pub checked: ModelPathCheck,
    /// What the labels are (`TASK`): numbers, or classes.
    pub task: Task,
}

/// The model a candidate is measured against.
enum Against {
    /// `MODEL_PATH` (or the baseline while it does not exist).
    ModelPath(ServedModel),
    /// `MODEL_PATH` is not a valid artifact: the version the replicas serve, read from
    /// `<version>.json` or `.onnx` beside it (or the baseline of that version).
    Replicas(ServedModel),
    /// Neither: only the absolute guards hold.
    Nothing,
}

/// A candidate before promotion: what it is written as, and the model it loads as.
struct Candidate {
    /// The artifact's bytes (JSON or ONNX).
    bytes: Vec<u8>,
    /// The model, as a replica would serve it.
    model: ServedModel,
}

/// Why a retrain made no candidate to score.
enum NoCandidate {
    /// Nothing to try: not an error (`skipped`).
    Skip(String),
    /// The candidate is not fit to serve (`refused`).
    Refuse(String),
    /// `TRAIN_COMMAND` failed, hung or wrote something that is not a model (`failed`).
    Fail(String),
}

/// What a retrain did, as `POST /retrain` answers it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Outcome {
    /// `promoted`, `refused`, `skipped`, or `failed` (`TRAIN_COMMAND` gave no usable model).
    pub result: &'static str,
    /// What started it.
    pub trigger: &'static str,
    /// The version served before.
    pub serving_version: String,
    /// The candidate's version (its file exists only when promoted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_version: Option<String>,
    /// MAE of the served model on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_mae: Option<f64>,
    /// MAE of the candidate on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_mae: Option<f64>,
    /// A classifier's: log loss of the served model on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_log_loss: Option<f64>,
    /// A classifier's: log loss of the candidate on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_log_loss: Option<f64>,
    /// A classifier's: accuracy of the served model on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_accuracy: Option<f64>,
    /// A classifier's: accuracy of the candidate on the holdout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_accuracy: Option<f64>,
    /// Rows the candidate was fitted on.
    pub train_rows: usize,
    /// Rows both were scored on.
    pub holdout_rows: usize,
    /// Why it was skipped, refused or failed, or where the promoted artifact is.
    pub detail: String,
}

impl Outcome {
    /// Records a holdout score of the served model (`serving`) or the candidate.
    fn record(&mut self, task: Task, serving: bool, score: Score) {
        let (mae, log_loss, accuracy) = if serving {
            (
                &mut self.serving_mae,
                &mut self.serving_log_loss,
                &mut self.serving_accuracy,
            )
        } else {
            (
                &mut self.candidate_mae,
                &mut self.candidate_log_loss,
                &mut self.candidate_accuracy,
            )
        };
        match task {
            Task::Regression => *mae = Some(score.loss),
            Task::Classification => {
                *log_loss = Some(score.loss);
                *accuracy = score.accuracy;
            }
        }
    }
}

impl Promoter {
    /// The served model: `MODEL_PATH`, or the baseline while it does not exist.
    pub fn serving(&self) -> anyhow::Result<ServedModel> {
        if self.model_path.try_exists().unwrap_or(true) {
            Ok(ServedModel::load(&self.model_path)?.0)
        } else {
            self.baseline.model()
        }
    }

    /// The version served now, read cheaply ([`ModelPathCheck`]): `None` while `MODEL_PATH` is
    /// not a valid artifact.
    pub fn serving_version(&self) -> Option<String> {
        match self.checked.read(&self.model_path).0 {
            ModelFile::Valid(version) => Some(version),
            ModelFile::Absent => Some(self.baseline.version.clone()),
            ModelFile::Unreadable(_) => None,
        }
    }

    /// The model of the version the replicas serve, when it is known and readable: the baseline
    /// when it is the baseline's version, else `<version>.json` or `.onnx` beside `MODEL_PATH`.
    pub fn replicas_model(&self) -> Option<ServedModel> {
        let version = self
            .replicas_serve
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        if version == self.baseline.version {
            return self.baseline.model().ok();
        }
        let path = find_version(&self.model_path, &version)?;
        match ServedModel::load(&path) {
            Ok((model, _)) if model.version == version => Some(model),
            Ok(_) => None,
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "the replicas' version has no readable file");
                None
            }
        }
    }

    /// What a candidate is measured against now.
    fn against(&self) -> Against {
        match self.serving() {
            Ok(model) => Against::ModelPath(model),
            Err(err) => match self.replicas_model() {
                Some(model) => Against::Replicas(model),
                None => {
                    tracing::debug!(error = %format!("{err:#}"), "no readable served model: absolute guards only");
                    Against::Nothing
                }
            },
        }
    }

    /// Runs one retrain on `samples` (the window, oldest first). While `MODEL_PATH` is not a valid
    /// artifact, the candidate is measured against the version the replicas serve (their `y_pred`
    /// carry it; [`Promoter::replicas_model`]); when that is unknown too, it is promoted on the
    /// absolute guards alone ([`policy::decide_unserved`]). A promotion replaces the broken file.
    pub fn retrain(&self, trigger: Trigger, samples: &[Sample]) -> anyhow::Result<Outcome> {
        let against = self.against();
        let model_path_readable = matches!(against, Against::ModelPath(_));
        let served = match against {
            Against::ModelPath(model) | Against::Replicas(model) => Some(model),
            Against::Nothing => None,
        };
        // The window holds the columns of the data the producer reads (DATA_PATH's), in order.
        let columns = &self.baseline.feature_names;
        let n_features = columns.len();
        // Samples of another width, or whose label is not of the task (a window kept from a run
        // of the other task), are left out.
        let usable: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.features.len() == n_features && self.label_of(s).is_some())
            .collect();
        let mut outcome = Outcome {
            result: "skipped",
            trigger: trigger.as_str(),
            serving_version: served
                .as_ref()
                .map_or_else(|| UNREADABLE.to_owned(), |m| m.version.clone()),
            candidate_version: None,
            serving_mae: None,
            candidate_mae: None,
            serving_log_loss: None,
            candidate_log_loss: None,
            serving_accuracy: None,
            candidate_accuracy: None,
            train_rows: 0,
            holdout_rows: 0,
            detail: String::new(),
        };
        let Some(Split { train, holdout }) = policy::split(usable.len(), self.holdout, n_features)
        else {
            outcome.detail = format!(
                "{} samples of {n_features} features in the window: too few to fit and score",
                usable.len()
            );
            return Ok(outcome);
        };
        outcome.train_rows = train;
        outcome.holdout_rows = holdout;
        // In the served model's order (by name when it knows its names), so a candidate is
        // trained on the columns the replicas will feed it.
        let dataset = |rows: &[&Sample]| -> anyhow::Result<Dataset> {
            let features = rows
                .iter()
                .flat_map(|s| s.features.iter().copied())
                .collect();
            let target_name = self.baseline.target_name.clone();
            let labels = rows.iter().filter_map(|s| self.label_of(s));
            let data = match self.task {
                Task::Regression => Dataset::from_rows(
                    columns.clone(),
                    target_name,
                    features,
                    labels
                        .filter_map(|t| t.number(LabelKind::YTrue).ok())
                        .collect(),
                ),
                Task::Classification => {
                    let labels: Vec<ClassLabel> = labels
                        .filter_map(|t| t.class(LabelKind::YTrue).ok())
                        .collect();
                    Dataset::from_labelled_rows(columns.clone(), target_name, features, &labels)
                }
            }
            .context("the window's samples do not form a data set")?;
            match &served {
                Some(model) => model.arrange_dataset(&data).map_err(|why| {
                    anyhow::anyhow!("the window does not fit the served model's features: {why}")
                }),
                None => Ok(data),
            }
        };
        let (older, newest) = usable.split_at(train);
        let (train_data, holdout_data) = (dataset(older)?, dataset(newest)?);
        let version = self.next_version(served.as_ref().map(|m| m.version.as_str()))?;
        outcome.candidate_version = Some(version.clone());
        let candidate = match self.candidate(served.as_ref(), &train_data, older, &version) {
            Ok(candidate) => candidate,
            Err(no) => {
                (outcome.result, outcome.detail) = match no {
                    NoCandidate::Skip(why) => ("skipped", why),
                    NoCandidate::Refuse(why) => ("refused", why),
                    NoCandidate::Fail(why) => ("failed", why),
                };
                if outcome.result == "skipped" {
                    outcome.candidate_version = None;
                }
                return Ok(outcome);
            }
        };
        let candidate_score = match self.score(&candidate.model, &holdout_data) {
            Ok(score) => score,
            Err(err) => {
                outcome.result = "refused";
                outcome.detail = format!("the candidate cannot be scored on the holdout: {err:#}");
                return Ok(outcome);
            }
        };
        outcome.record(self.task, false, candidate_score);
        let verdict = match &served {
            Some(served) => {
                let serving_score = self.score(served, &holdout_data).unwrap_or(Score {
                    loss: f64::NAN,
                    accuracy: None,
                });
                outcome.record(self.task, true, serving_score);
                policy::decide_scores(serving_score, candidate_score, self.min_gain)
            }
            None => policy::decide_unserved(candidate_score.loss),
        };
        let measure = match self.task {
            Task::Regression => "MAE",
            Task::Classification => "log loss (or accuracy, the floor)",
        };
        match (verdict, served.is_some()) {
            (Verdict::Promote, true) => {
                if !model_path_readable {
                    self.keep_unreadable();
                }
                let written = self.promote(&candidate)?;
                outcome.result = "promoted";
                outcome.detail = if model_path_readable {
                    format!("{} is served", written.display())
                } else {
                    format!(
                        "{} is served; MODEL_PATH was not a valid artifact, so the candidate was \
                         measured against {}, the version the replicas serve",
                        written.display(),
                        outcome.serving_version
                    )
                };
            }
            (Verdict::Promote, false) => {
                self.keep_unreadable();
                let written = self.promote(&candidate)?;
                outcome.result = "promoted";
                outcome.detail = format!(
                    "{} is served; MODEL_PATH was not a valid artifact, so the candidate was \
                     promoted on the absolute guards alone (finite holdout {measure})",
                    written.display()
                );
            }
            (Verdict::Refuse, true) => {
                outcome.result = "refused";
                outcome.detail = match self.task {
                    Task::Regression => format!(
                        "the candidate's holdout MAE is not {:.1} % below the served model's",
                        self.min_gain * 100.0
                    ),
                    Task::Classification => format!(
                        "the candidate's holdout log loss is not {:.1} % below the served \
                         model's, or its accuracy is lower",
                        self.min_gain * 100.0
                    ),
                };
            }
            (Verdict::Refuse, false) => {
                outcome.result = "refused";
                outcome.detail =
                    format!("the candidate's holdout {measure} is not a finite number");
            }
        }
        Ok(outcome)
    }

    /// A sample's label as the task reads it; `None` for one of the other task.
    fn label_of<'s>(&self, sample: &'s Sample) -> Option<&'s Target> {
        let fits = match self.task {
            Task::Regression => sample.target.number(LabelKind::YTrue).is_ok(),
            Task::Classification => sample.target.class(LabelKind::YTrue).is_ok(),
        };
        fits.then_some(&sample.target)
    }

    /// How `model` does on `data`: MAE for a regressor, log loss and accuracy for a classifier
    /// (through the code the replicas serve with).
    fn score(&self, model: &ServedModel, data: &Dataset) -> anyhow::Result<Score> {
        match self.task {
            Task::Regression => model.evaluate(data).map(|scored| Score {
                loss: scored.mae,
                accuracy: None,
            }),
            Task::Classification => model.evaluate_classes(data).map(|scored| Score {
                loss: scored.log_loss,
                accuracy: Some(scored.accuracy),
            }),
        }
    }

    /// Makes the candidate of `version` from the training rows: the user's `TRAIN_COMMAND`
    /// (stamped with the version, the rows' feature names and their drift reference), or the
    /// built-in linear fit. A candidate that does not take the served model's features is refused.
    fn candidate(
        &self,
        served: Option<&ServedModel>,
        train: &Dataset,
        rows: &[&Sample],
        version: &str,
    ) -> Result<Candidate, NoCandidate> {
        let candidate = match &self.train_command {
            Some(command) => {
                let bytes = command
                    .run(train, version)
                    .map_err(|failure| NoCandidate::Fail(failure.to_string()))?;
                let stamped = model::stamp::stamp_onnx(
                    &bytes,
                    version,
                    Some(&train.feature_names),
                    Some(train),
                )
                .map_err(|err| {
                    NoCandidate::Fail(format!(
                        "the model TRAIN_COMMAND wrote is not fit to serve: {err:#}"
                    ))
                })?;
                Candidate {
                    bytes: stamped.bytes,
                    model: stamped.model,
                }
            }
            None => {
                let (family, fit) = match self.task {
                    Task::Regression => ("linear", "linear fit"),
                    Task::Classification => ("logistic", "logistic regression"),
                };
                if served.is_some_and(|model| model.family() != family) {
                    return Err(NoCandidate::Skip(format!(
                        "the served model is {} and the built-in {fit} does not replace \
                         it: set TRAIN_COMMAND to retrain it with your own code",
                        served.map_or("", ServedModel::family)
                    )));
                }
                let refuse = |what: &str, err: anyhow::Error| {
                    NoCandidate::Refuse(format!("cannot {what} the candidate: {err:#}"))
                };
                let version = Some(version.to_owned());
                match self.task {
                    Task::Regression => {
                        let artifact = Artifact::fit(train, digest(rows), version)
                            .map_err(|err| refuse("fit", err))?;
                        Candidate {
                            model: ServedModel::of_artifact(&artifact),
                            bytes: artifact.to_bytes().map_err(|err| refuse("encode", err))?,
                        }
                    }
                    Task::Classification => {
                        let artifact = LogisticArtifact::fit(train, digest(rows), version)
                            .map_err(|err| refuse("fit", err))?;
                        Candidate {
                            model: ServedModel::of_logistic_artifact(&artifact),
                            bytes: artifact.to_bytes().map_err(|err| refuse("encode", err))?,
                        }
                    }
                }
            }
        };
        if let Some(served) = served {
            candidate.model.same_features(served).map_err(|why| {
                NoCandidate::Refuse(format!("the candidate has another schema: {why}"))
            })?;
        }
        Ok(candidate)
    }

    /// Writes the candidate as `<version>.json` (or `.onnx`) and then as `MODEL_PATH`. While
    /// `MODEL_PATH` did not exist, the baseline is written as `<its version>.json` first, so
    /// `model rollback` can go back to it.
    fn promote(&self, candidate: &Candidate) -> anyhow::Result<PathBuf> {
        if let Some(dir) = self
            .model_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let baseline = &self.baseline;
        if !self.model_path.try_exists().unwrap_or(true)
            && let Some(path) = versioned_path(
                &self.model_path,
                &baseline.version,
                ArtifactKind::of(&baseline.bytes),
            )
            && !path.exists()
        {
            write_atomically(&path, &baseline.bytes)?;
        }
        let version = &candidate.model.version;
        let path = versioned_path(
            &self.model_path,
            version,
            ArtifactKind::of(&candidate.bytes),
        )
        .with_context(|| format!("{version:?} is not a version"))?;
        write_atomically(&path, &candidate.bytes)?;
        write_atomically(&self.model_path, &candidate.bytes)?;
        Ok(path)
    }

    /// Copies the unreadable `MODEL_PATH` to `<MODEL_PATH>.unreadable` before a promotion replaces
    /// it, so whoever wrote it can still look at it. Best effort: the promotion goes on anyway.
    fn keep_unreadable(&self) {
        let mut kept = self.model_path.clone().into_os_string();
        kept.push(".unreadable");
        if let Err(err) = std::fs::copy(&self.model_path, &kept) {
            tracing::warn!(error = %err, "cannot keep a copy of the unreadable MODEL_PATH");
        }
    }

    /// `v<N>`, one more than every `v<N>.json` and `v<N>.onnx` beside `MODEL_PATH` and than the
    /// served version (when there is a readable one).
    fn next_version(&self, serving: Option<&str>) -> anyhow::Result<String> {
        let dir = match self.model_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut names: Vec<String> = serving.map(str::to_owned).into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(dir) {
            names.extend(entries.filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let stem = name
                    .strip_suffix(".json")
                    .or_else(|| name.strip_suffix(".onnx"))?;
                Some(stem.to_owned())
            }));
        }
        Ok(policy::next_version(names.iter().map(String::as_str)))
    }
}

/// SHA-256 of the training rows (ids and values), recorded in the artifact.
fn digest(rows: &[&Sample]) -> String {
    let mut hasher = Sha256::new();
    for sample in rows {
        hasher.update(sample.id.as_bytes());
        for value in &sample.features {
            hasher.update(value.to_le_bytes());
        }
        match &sample.target {
            Target::Number(value) => hasher.update(value.to_le_bytes()),
            Target::Class(label) => hasher.update(label.key().as_bytes()),
        }
    }
    model::regression::hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diabetes() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv")
    }

    fn promoter(dir: &Path) -> Promoter {
        let baseline = Artifact::train(&diabetes(), None, None).unwrap();
        Promoter {
            model_path: dir.join("model.json"),
            holdout: 0.2,
            min_gain: 0.05,
            baseline: Baseline::linear(&baseline).unwrap(),
            replicas_serve: Arc::default(),
            train_command: None,
            checked: ModelPathCheck::default(),
            task: pipeline::classes::Task::Regression,
        }
    }

    /// Rows of the diabetes data, in order, with `shift` added to bmi (column 2) and s5 (8).
    fn samples(count: usize, shift: f64, tag: &str) -> Vec<Sample> {
        let data = Dataset::from_csv(&diabetes(), None).unwrap();
        (0..count)
            .map(|n| {
                let row = n % data.len();
                let mut features = data.row(row).to_vec();
                features[2] += shift;
                features[8] += shift;
                Sample {
                    id: format!("{tag}{n}"),
                    features,
                    target: Target::Number(data.target(row)),
                }
            })
            .collect()
    }

    #[test]
    fn a_classifier_is_retrained_by_logistic_regression_and_guarded_on_log_loss() {
        let dir = tempfile::tempdir().unwrap();
        let data_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/models/fixtures/breast_cancer.csv");
        let promoter = Promoter {
            baseline: Baseline::fit_on(&data_path, None, Task::Classification).unwrap(),
            task: Task::Classification,
            ..promoter(dir.path())
        };
        let data = Dataset::from_csv_for(&data_path, None, Task::Classification).unwrap();
        let window = |flip: bool| -> Vec<Sample> {
            (0..data.len())
                .map(|row| Sample {
                    id: format!("r{row}"),
                    features: data.row(row).to_vec(),
                    target: match data.label(row) {
                        // The world changed: what was benign is now malignant, and back.
                        Target::Class(ClassLabel::Integer(y)) if flip => {
                            Target::Class(ClassLabel::Integer(1 - y))
                        }
                        label => label,
                    },
                })
                .collect()
        };
        // The data the baseline was fitted on: no candidate is 5 % better.
        let outcome = promoter.retrain(Trigger::Manual, &window(false)).unwrap();
        assert_eq!(outcome.result, "refused", "{outcome:?}");
        assert!(outcome.serving_mae.is_none() && outcome.serving_log_loss.is_some());
        assert!(outcome.serving_accuracy.unwrap() > 0.9, "{outcome:?}");
        // After the drift the baseline is wrong on nearly every holdout row; the candidate,
        // fitted on the drifted rows, is promoted as a logistic artifact.
        let outcome = promoter.retrain(Trigger::Manual, &window(true)).unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        assert!(outcome.candidate_accuracy.unwrap() > outcome.serving_accuracy.unwrap());
        assert!(outcome.candidate_log_loss.unwrap() < outcome.serving_log_loss.unwrap());
        let served = ServedModel::load(&dir.path().join("model.json")).unwrap().0;
        assert_eq!(
            (served.version.as_str(), served.family()),
            ("v1", "logistic")
        );
        assert_eq!(served.task(), Task::Classification);
        // The baseline was kept for a rollback, as a logistic artifact.
        let kept = dir
            .path()
            .join(format!("{}.json", promoter.baseline.version));
        assert_eq!(ServedModel::load(&kept).unwrap().0.family(), "logistic");
    }

    #[test]
    fn a_better_candidate_is_promoted_and_a_worse_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let promoter = promoter(dir.path());
        let baseline = promoter.baseline.version.clone();
        // After a drift, a model fitted on drifted rows beats the baseline on drifted rows.
        let drifted = samples(1000, 0.05, "d");
        let outcome = promoter.retrain(Trigger::Manual, &drifted).unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        assert_eq!(outcome.serving_version, baseline);
        assert_eq!(outcome.candidate_version.as_deref(), Some("v1"));
        assert_eq!((outcome.train_rows, outcome.holdout_rows), (800, 200));
        assert!(outcome.candidate_mae.unwrap() < 0.95 * outcome.serving_mae.unwrap());
        let served = Artifact::load(&dir.path().join("model.json")).unwrap();
        assert_eq!(served.version, "v1");
        assert_eq!(served, Artifact::load(&dir.path().join("v1.json")).unwrap());
        assert!(served.reference.is_some(), "reference statistics kept");
        // The baseline was kept for a rollback.
        assert!(dir.path().join(format!("{baseline}.json")).exists());

        // Noise in the older part of the window, real rows in the holdout: refused.
        let mut noisy: Vec<Sample> = (0..800)
            .map(|n| Sample {
                id: format!("n{n}"),
                features: (0..10).map(|_| fastrand::f64() - 0.5).collect(),
                target: Target::Number(25.0 + 320.0 * fastrand::f64()),
            })
            .collect();
        noisy.extend(samples(200, 0.05, "r"));
        let outcome = promoter.retrain(Trigger::Manual, &noisy).unwrap();
        assert_eq!(outcome.result, "refused", "{outcome:?}");
        assert_eq!(outcome.serving_version, "v1");
        assert!(outcome.candidate_mae.unwrap() > outcome.serving_mae.unwrap());
        assert_eq!(
            Artifact::load(&dir.path().join("model.json")).unwrap(),
            served
        );
        assert!(!dir.path().join("v2.json").exists());

        // The next promotion is v2.
        let outcome = promoter
            .retrain(Trigger::Labels, &samples(1000, 0.1, "e"))
            .unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        assert_eq!(outcome.candidate_version.as_deref(), Some("v2"));
    }

    #[test]
    fn an_unreadable_model_path_is_replaced_on_the_absolute_guards() {
        let dir = tempfile::tempdir().unwrap();
        let promoter = promoter(dir.path());
        let model_path = dir.path().join("model.json");
        let valid = String::from_utf8(promoter.baseline.bytes.clone()).unwrap();
        let causes: [(&str, Vec<u8>); 3] = [
            ("garbage", b"\x00\xffnot json at all".to_vec()),
            ("truncated", valid.as_bytes()[..valid.len() / 2].to_vec()),
            (
                "format",
                valid
                    .replace(model::artifact::FORMAT, "ml-pipeline/linear-model/0")
                    .into_bytes(),
            ),
        ];
        for (n, (cause, bytes)) in causes.into_iter().enumerate() {
            std::fs::write(&model_path, &bytes).unwrap();
            assert!(promoter.serving().is_err(), "{cause}");
            // Too few samples: skipped, the broken file stays.
            let outcome = promoter
                .retrain(Trigger::Manual, &samples(25, 0.0, "s"))
                .unwrap();
            assert_eq!(outcome.result, "skipped", "{cause}: {outcome:?}");
            assert_eq!(outcome.serving_version, UNREADABLE);
            assert_eq!(std::fs::read(&model_path).unwrap(), bytes);
            // Enough: promoted without a served MAE, the broken bytes kept aside.
            let outcome = promoter
                .retrain(Trigger::Labels, &samples(1000, 0.0, cause))
                .unwrap();
            assert_eq!(outcome.result, "promoted", "{cause}: {outcome:?}");
            assert_eq!(outcome.serving_version, UNREADABLE);
            assert_eq!(outcome.serving_mae, None);
            let version = format!("v{}", n + 1);
            assert_eq!(outcome.candidate_version.as_deref(), Some(version.as_str()));
            let served = Artifact::load(&model_path).unwrap();
            assert_eq!(served.version, version);
            assert_eq!(served.feature_names, promoter.baseline.feature_names);
            assert_eq!(
                std::fs::read(dir.path().join("model.json.unreadable")).unwrap(),
                bytes
            );
            // Rollback works from here: the versioned file is there.
            assert!(dir.path().join(format!("{version}.json")).exists());
        }
        // Readable again: the relative guard is back (the same data is no 5 % better).
        let outcome = promoter
            .retrain(Trigger::Manual, &samples(1000, 0.0, "again"))
            .unwrap();
        assert_eq!(outcome.result, "refused", "{outcome:?}");
        assert_eq!(outcome.serving_version, "v3");
        model::artifact::rollback(&model_path, "v1").unwrap();
        assert_eq!(Artifact::load(&model_path).unwrap().version, "v1");
    }

    #[test]
    fn an_unreadable_model_path_is_measured_against_what_the_replicas_serve() {
        let dir = tempfile::tempdir().unwrap();
        let promoter = promoter(dir.path());
        let model_path = dir.path().join("model.json");
        // The replicas serve v4, fitted on drifted rows; then MODEL_PATH broke.
        let drifted = samples(1000, 0.05, "d");
        let outcome = promoter.retrain(Trigger::Manual, &drifted).unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        std::fs::rename(dir.path().join("v1.json"), dir.path().join("v4.json")).unwrap();
        let mut v4 = Artifact::load(&dir.path().join("v4.json")).unwrap();
        v4.version = "v4".to_owned();
        v4.write(&dir.path().join("v4.json")).unwrap();
        std::fs::write(&model_path, b"{\"format\": trunc").unwrap();
        *promoter.replicas_serve.lock().unwrap() = Some("v4".to_owned());

        // The same drifted rows again: no 5 % better than v4, so refused (the absolute guards
        // alone would have promoted it), and the broken file stays for the watcher to report.
        let outcome = promoter
            .retrain(Trigger::Labels, &samples(1000, 0.05, "again"))
            .unwrap();
        assert_eq!(outcome.result, "refused", "{outcome:?}");
        assert_eq!(outcome.serving_version, "v4");
        assert!(outcome.serving_mae.is_some());
        assert_eq!(std::fs::read(&model_path).unwrap(), b"{\"format\": trunc");

        // A further drift: better than v4 by far, promoted as v5 over the broken file.
        let outcome = promoter
            .retrain(Trigger::Labels, &samples(1000, 0.12, "further"))
            .unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        assert_eq!(outcome.serving_version, "v4");
        assert_eq!(outcome.candidate_version.as_deref(), Some("v5"));
        assert!(outcome.candidate_mae.unwrap() < 0.95 * outcome.serving_mae.unwrap());
        assert!(
            outcome.detail.contains("the version the replicas serve"),
            "{}",
            outcome.detail
        );
        assert_eq!(Artifact::load(&model_path).unwrap().version, "v5");
        assert_eq!(
            std::fs::read(dir.path().join("model.json.unreadable")).unwrap(),
            b"{\"format\": trunc"
        );

        // The replicas serve the baseline (no file of it is needed), or a version without a
        // readable file: the baseline, or the absolute guards.
        std::fs::write(&model_path, b"garbage").unwrap();
        *promoter.replicas_serve.lock().unwrap() = Some(promoter.baseline.version.clone());
        assert_eq!(
            promoter.replicas_model().map(|m| m.version),
            Some(promoter.baseline.version.clone())
        );
        *promoter.replicas_serve.lock().unwrap() = Some("v9".to_owned());
        assert!(promoter.replicas_model().is_none());
        let outcome = promoter
            .retrain(Trigger::Labels, &samples(1000, 0.12, "more"))
            .unwrap();
        assert_eq!(outcome.serving_version, UNREADABLE);
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
    }

    /// The user's own training code: `examples/train_sklearn.py` (a scaler and gradient-boosted
    /// trees, exported with skl2onnx) as `TRAIN_COMMAND`, with `MODEL_PATH` an `.onnx`.
    #[test]
    fn a_train_command_candidate_is_scored_by_the_trainer_and_promoted_only_when_fit() {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/train_sklearn.py");
        let with = |env: &str, timeout: u64| {
            let mut promoter = promoter(dir.path());
            promoter.model_path = dir.path().join("model.onnx");
            promoter.train_command = Some(TrainCommand {
                command: format!("{env} python3 {}", script.display()),
                timeout: std::time::Duration::from_secs(timeout),
                stop: pipeline::CancellationToken::new(),
            });
            promoter
        };
        let model_path = dir.path().join("model.onnx");
        let baseline = with("", 120).baseline.version.clone();

        // After a drift: the trees beat the linear baseline; the .onnx is stamped and served.
        let outcome = with("", 120)
            .retrain(Trigger::Alarm, &samples(1000, 0.05, "d"))
            .unwrap();
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
        assert_eq!(outcome.serving_version, baseline);
        assert!(outcome.candidate_mae.unwrap() < 0.95 * outcome.serving_mae.unwrap());
        let (served, _) = ServedModel::load(&model_path).unwrap();
        assert_eq!((served.version.as_str(), served.family()), ("v1", "onnx"));
        let names = served.feature_names().unwrap();
        assert_eq!(
            names,
            promoter(dir.path()).baseline.feature_names.as_slice()
        );
        assert!(
            served.reference.is_some(),
            "a drift reference of its training rows"
        );
        assert_eq!(served.target_name.as_deref(), Some("target"));
        assert_eq!(
            std::fs::read(&model_path).unwrap(),
            std::fs::read(dir.path().join("v1.onnx")).unwrap()
        );
        assert!(dir.path().join(format!("{baseline}.json")).exists());

        // Worse (fitted on shuffled targets), garbage, failing, hanging: v1 stays.
        let refusals = [
            ("TRAIN_WORSE=1", 120, "refused", "not 5.0 % below"),
            ("TRAIN_GARBAGE=1", 120, "failed", "not fit to serve"),
            ("TRAIN_FAIL=1", 120, "failed", "exited with status 3"),
            (
                "TRAIN_SLEEP_SECS=60",
                2,
                "failed",
                "longer than TRAIN_TIMEOUT_SECS (2 s)",
            ),
        ];
        for (env, timeout, result, why) in refusals {
            let started = std::time::Instant::now();
            let outcome = with(env, timeout)
                .retrain(Trigger::Manual, &samples(1000, 0.05, "w"))
                .unwrap();
            assert_eq!(outcome.result, result, "{env}: {outcome:?}");
            assert!(outcome.detail.contains(why), "{env}: {}", outcome.detail);
            assert_eq!(outcome.serving_version, "v1");
            assert_eq!(ServedModel::load(&model_path).unwrap().0.version, "v1");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{env}"
            );
        }
        assert!(!dir.path().join("v2.onnx").exists());

        // Without TRAIN_COMMAND an ONNX model is not replaced by the linear fit.
        let outcome = promoter(dir.path());
        let outcome = Promoter {
            model_path: model_path.clone(),
            ..outcome
        }
        .retrain(Trigger::Manual, &samples(1000, 0.3, "x"))
        .unwrap();
        assert_eq!(outcome.result, "skipped", "{outcome:?}");
        assert!(
            outcome.detail.contains("TRAIN_COMMAND"),
            "{}",
            outcome.detail
        );

        // Rollback to the linear baseline and forward to the trees again, through MODEL_PATH.
        model::artifact::rollback(&model_path, &baseline).unwrap();
        assert_eq!(ServedModel::load(&model_path).unwrap().0.family(), "linear");
        let restored = model::artifact::rollback(&model_path, "v1").unwrap();
        assert_eq!(restored.model.family(), "onnx");
        assert!(restored.artifact.is_none());
    }

    #[test]
    fn too_few_samples_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = promoter(dir.path())
            .retrain(Trigger::Alarm, &samples(25, 0.0, "s"))
            .unwrap();
        assert_eq!(outcome.result, "skipped");
        assert!(outcome.detail.contains("too few"), "{}", outcome.detail);
        assert!(!dir.path().join("model.json").exists());
    }

    #[test]
    fn samples_of_another_width_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut mixed = samples(1000, 0.05, "d");
        mixed.push(Sample {
            id: "short".into(),
            features: vec![1.0],
            target: Target::Number(1.0),
        });
        let outcome = promoter(dir.path())
            .retrain(Trigger::Manual, &mixed)
            .unwrap();
        assert_eq!(outcome.train_rows + outcome.holdout_rows, 1000);
    }
}
