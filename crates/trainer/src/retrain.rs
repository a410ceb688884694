//! One retrain: fit a candidate with linfa-linear on the older part of the window, score it and
//! the served model on the newest part (the holdout), and promote it only when the guard says so
//! ([`policy::decide`]). Promotion writes `<folder of MODEL_PATH>/<version>.json`, then replaces
//! `MODEL_PATH` with the same bytes, both atomically; the model services watching `MODEL_PATH`
//! swap to it.

use crate::policy::{self, Split, Trigger, Verdict};
use crate::store::Sample;
use anyhow::Context as _;
use model::artifact::{Artifact, versioned_path, write_atomically};
use pipeline::dataset::Dataset;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// What the served model is when `MODEL_PATH` does not exist yet: the fit on `DATA_PATH` the
/// model services make in that case (same data, same version).
#[derive(Clone, Debug)]
pub struct Baseline(pub Artifact);

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
}

/// The model a candidate is measured against.
enum Against {
    /// `MODEL_PATH` (or the baseline while it does not exist).
    ModelPath(Artifact),
    /// `MODEL_PATH` is not a valid artifact: the version the replicas serve, read from
    /// `<version>.json` beside it (or the baseline of that version).
    Replicas(Artifact),
    /// Neither: only the absolute guards hold.
    Nothing,
}

/// What a retrain did, as `POST /retrain` answers it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Outcome {
    /// `promoted`, `refused` or `skipped`.
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
    /// Rows the candidate was fitted on.
    pub train_rows: usize,
    /// Rows both were scored on.
    pub holdout_rows: usize,
    /// Why it was skipped, or where the promoted artifact is.
    pub detail: String,
}

impl Promoter {
    /// The served artifact: `MODEL_PATH`, or the baseline while it does not exist.
    pub fn serving(&self) -> anyhow::Result<Artifact> {
        if self.model_path.try_exists().unwrap_or(true) {
            Artifact::load(&self.model_path)
        } else {
            Ok(self.baseline.0.clone())
        }
    }

    /// The artifact of the version the replicas serve, when it is known and readable: the
    /// baseline when it is the baseline's version, else `<version>.json` beside `MODEL_PATH`.
    pub fn replicas_artifact(&self) -> Option<Artifact> {
        let version = self
            .replicas_serve
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        if version == self.baseline.0.version {
            return Some(self.baseline.0.clone());
        }
        let path = versioned_path(&self.model_path, &version)?;
        match Artifact::load(&path) {
            Ok(artifact) if artifact.version == version => Some(artifact),
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
            Ok(artifact) => Against::ModelPath(artifact),
            Err(err) => match self.replicas_artifact() {
                Some(artifact) => Against::Replicas(artifact),
                None => {
                    tracing::debug!(error = %format!("{err:#}"), "no readable served model: absolute guards only");
                    Against::Nothing
                }
            },
        }
    }

    /// Runs one retrain on `samples` (the window, oldest first). While `MODEL_PATH` is not a valid
    /// artifact, the candidate is measured against the version the replicas serve (their `y_pred`
    /// carry it; [`Promoter::replicas_artifact`]); when that is unknown too, it is promoted on the
    /// absolute guards alone ([`policy::decide_unserved`]). A promotion replaces the broken file.
    pub fn retrain(&self, trigger: Trigger, samples: &[Sample]) -> anyhow::Result<Outcome> {
        let against = self.against();
        let model_path_readable = matches!(against, Against::ModelPath(_));
        let served = match against {
            Against::ModelPath(artifact) | Against::Replicas(artifact) => Some(artifact),
            Against::Nothing => None,
        };
        // The feature names and target of the data the replicas were started on.
        let serving = served.as_ref().unwrap_or(&self.baseline.0);
        let n_features = serving.feature_names.len();
        let usable: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.features.len() == n_features)
            .collect();
        let mut outcome = Outcome {
            result: "skipped",
            trigger: trigger.as_str(),
            serving_version: served
                .as_ref()
                .map_or_else(|| UNREADABLE.to_owned(), |a| a.version.clone()),
            candidate_version: None,
            serving_mae: None,
            candidate_mae: None,
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
        let dataset = |rows: &[&Sample]| {
            Dataset::from_rows(
                serving.feature_names.clone(),
                serving.target_name.clone(),
                rows.iter()
                    .flat_map(|s| s.features.iter().copied())
                    .collect(),
                rows.iter().map(|s| s.target).collect(),
            )
            .context("the window's samples do not form a data set")
        };
        let (older, newest) = usable.split_at(train);
        let (train_data, holdout_data) = (dataset(older)?, dataset(newest)?);
        let version = self.next_version(served.as_ref().map(|a| a.version.as_str()))?;
        let candidate = Artifact::fit(&train_data, digest(older), Some(version.clone()))
            .context("cannot fit the candidate")?;
        let candidate_mae = candidate.model().evaluate(&holdout_data)?.mae;
        outcome.candidate_version = Some(version.clone());
        outcome.candidate_mae = Some(candidate_mae);
        let verdict = match &served {
            Some(served) => {
                let serving_mae = served.model().evaluate(&holdout_data)?.mae;
                outcome.serving_mae = Some(serving_mae);
                policy::decide(serving_mae, candidate_mae, self.min_gain)
            }
            None => policy::decide_unserved(candidate_mae),
        };
        match (verdict, served.is_some()) {
            (Verdict::Promote, true) => {
                if !model_path_readable {
                    self.keep_unreadable();
                }
                let written = self.promote(serving, &candidate)?;
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
                let written = self.promote(serving, &candidate)?;
                outcome.result = "promoted";
                outcome.detail = format!(
                    "{} is served; MODEL_PATH was not a valid artifact, so the candidate was \
                     promoted on the absolute guards alone (finite holdout MAE)",
                    written.display()
                );
            }
            (Verdict::Refuse, true) => {
                outcome.result = "refused";
                outcome.detail = format!(
                    "the candidate's holdout MAE is not {:.1} % below the served model's",
                    self.min_gain * 100.0
                );
            }
            (Verdict::Refuse, false) => {
                outcome.result = "refused";
                outcome.detail = "the candidate's holdout MAE is not a finite number".to_owned();
            }
        }
        Ok(outcome)
    }

    /// Writes the candidate as `<version>.json` and then as `MODEL_PATH`. While `MODEL_PATH` did not
    /// exist, the baseline is written as `<its version>.json` first, so `model rollback` can go
    /// back to it.
    fn promote(&self, serving: &Artifact, candidate: &Artifact) -> anyhow::Result<PathBuf> {
        if let Some(dir) = self
            .model_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if !self.model_path.try_exists().unwrap_or(true)
            && let Some(path) = versioned_path(&self.model_path, &serving.version)
            && !path.exists()
        {
            serving.write(&path)?;
        }
        let path = versioned_path(&self.model_path, &candidate.version)
            .with_context(|| format!("{:?} is not a version", candidate.version))?;
        candidate.write(&path)?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        write_atomically(&self.model_path, &bytes)?;
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

    /// `v<N>`, one more than every `v<N>.json` beside `MODEL_PATH` and than the served version
    /// (when there is a readable one).
    fn next_version(&self, serving: Option<&str>) -> anyhow::Result<String> {
        let dir = match self.model_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut names: Vec<String> = serving.map(str::to_owned).into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(dir) {
            names.extend(entries.filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_owned)
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
        hasher.update(sample.target.to_le_bytes());
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
            baseline: Baseline(baseline),
            replicas_serve: Arc::default(),
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
                    target: data.target(row),
                }
            })
            .collect()
    }

    #[test]
    fn a_better_candidate_is_promoted_and_a_worse_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let promoter = promoter(dir.path());
        let baseline = promoter.baseline.0.version.clone();
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
                target: 25.0 + 320.0 * fastrand::f64(),
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
        let valid = serde_json::to_string_pretty(&promoter.baseline.0).unwrap();
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
            assert_eq!(served.feature_names, promoter.baseline.0.feature_names);
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
        *promoter.replicas_serve.lock().unwrap() = Some(promoter.baseline.0.version.clone());
        assert_eq!(
            promoter.replicas_artifact(),
            Some(promoter.baseline.0.clone())
        );
        *promoter.replicas_serve.lock().unwrap() = Some("v9".to_owned());
        assert_eq!(promoter.replicas_artifact(), None);
        let outcome = promoter
            .retrain(Trigger::Labels, &samples(1000, 0.12, "more"))
            .unwrap();
        assert_eq!(outcome.serving_version, UNREADABLE);
        assert_eq!(outcome.result, "promoted", "{outcome:?}");
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
            target: 1.0,
        });
        let outcome = promoter(dir.path())
            .retrain(Trigger::Manual, &mixed)
            .unwrap();
        assert_eq!(outcome.train_rows + outcome.holdout_rows, 1000);
    }
}
