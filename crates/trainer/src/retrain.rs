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

/// What the served model is when `MODEL_PATH` does not exist yet: the fit on `DATA_PATH` the
/// model services make in that case (same data, same version).
#[derive(Clone, Debug)]
pub struct Baseline(pub Artifact);

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

    /// Runs one retrain on `samples` (the window, oldest first).
    pub fn retrain(&self, trigger: Trigger, samples: &[Sample]) -> anyhow::Result<Outcome> {
        let serving = self
            .serving()
            .context("cannot read the served model (MODEL_PATH)")?;
        let n_features = serving.feature_names.len();
        let usable: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.features.len() == n_features)
            .collect();
        let mut outcome = Outcome {
            result: "skipped",
            trigger: trigger.as_str(),
            serving_version: serving.version.clone(),
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
        let version = self.next_version(&serving.version)?;
        let candidate = Artifact::fit(&train_data, digest(older), Some(version.clone()))
            .context("cannot fit the candidate")?;
        let serving_mae = serving.model().evaluate(&holdout_data)?.mae;
        let candidate_mae = candidate.model().evaluate(&holdout_data)?.mae;
        outcome.candidate_version = Some(version.clone());
        outcome.serving_mae = Some(serving_mae);
        outcome.candidate_mae = Some(candidate_mae);
        match policy::decide(serving_mae, candidate_mae, self.min_gain) {
            Verdict::Promote => {
                let written = self.promote(&serving, &candidate)?;
                outcome.result = "promoted";
                outcome.detail = format!("{} is served", written.display());
            }
            Verdict::Refuse => {
                outcome.result = "refused";
                outcome.detail = format!(
                    "the candidate's holdout MAE is not {:.1} % below the served model's",
                    self.min_gain * 100.0
                );
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

    /// `v<N>`, one more than every `v<N>.json` beside `MODEL_PATH` and than the served version.
    fn next_version(&self, serving: &str) -> anyhow::Result<String> {
        let dir = match self.model_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut names = vec![serving.to_owned()];
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
