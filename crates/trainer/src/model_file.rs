//! `MODEL_PATH` as the trainer sees it: absent (the replicas serve the fit on `DATA_PATH`), a
//! valid artifact, or a file that is not one (written by hand, truncated by a full disk, of an
//! older format). An unreadable file does not stop the trainer: it keeps its window and queues,
//! says so on `/healthz`, in `pipeline_trainer_model_unreadable` and in one WARN line, and polls
//! the file until a valid artifact is there again (put back by hand, by `model rollback`, or by a
//! promotion on the absolute guards, see [`crate::policy::decide_unserved`]).

use crate::metrics::Metrics;
use crate::retrain::Promoter;
use model::artifact::ContentHash;
use model::served::ServedModel;
use pipeline::CancellationToken;
use pipeline::health::Health;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How often `MODEL_PATH` is read while the trainer runs (a small file: one read and parse).
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// The `/healthz` note of an unreadable `MODEL_PATH`.
const NOTE: &str = "model_path";

/// What `MODEL_PATH` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFile {
    /// No file yet: the served model is the fit on `DATA_PATH`.
    Absent,
    /// A valid artifact of this version.
    Valid(String),
    /// A file that is not a valid artifact, with the cause.
    Unreadable(String),
}

/// What one reading of `MODEL_PATH` changes in the reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The file became unreadable, or unreadable for another cause: one WARN, note and gauge on.
    Unreadable(String),
    /// It was unreadable and is valid again (or gone): one INFO, note and gauge off.
    Recovered(ModelFile),
}

/// Follows the readings of `MODEL_PATH` and says when to report: once per cause, not once per
/// poll, and once on recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelFileWatch {
    last: Option<ModelFile>,
}

impl ModelFileWatch {
    /// Records one reading; `Some` when it is to be reported.
    pub fn observe(&mut self, now: ModelFile) -> Option<Change> {
        let change = match (&self.last, &now) {
            (Some(ModelFile::Unreadable(old)), ModelFile::Unreadable(new)) if old == new => None,
            (_, ModelFile::Unreadable(cause)) => Some(Change::Unreadable(cause.clone())),
            (Some(ModelFile::Unreadable(_)), readable) => Some(Change::Recovered(readable.clone())),
            _ => None,
        };
        self.last = Some(now);
        change
    }

    /// Whether the last reading was unreadable.
    pub fn unreadable(&self) -> bool {
        matches!(self.last, Some(ModelFile::Unreadable(_)))
    }
}

/// Reads `MODEL_PATH`, loading it as a replica would only when its bytes changed since the last
/// read: an ONNX graph takes milliseconds to load, and the file is read every [`POLL`] and on
/// every `GET /model`.
#[derive(Clone, Debug, Default)]
pub struct ModelPathCheck(Arc<Mutex<Option<(ContentHash, ModelFile)>>>);

impl ModelPathCheck {
    /// What `path` holds now, with its bytes when it could be read.
    pub fn read(&self, path: &Path) -> (ModelFile, Option<Vec<u8>>) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return (ModelFile::Absent, None);
            }
            Err(err) => {
                let cause = format!("cannot read {}: {err}", path.display());
                return (ModelFile::Unreadable(cause), None);
            }
        };
        let hash = ContentHash::of(&bytes);
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, file)) = last.as_ref()
            && *seen == hash
        {
            return (file.clone(), Some(bytes));
        }
        let file = match ServedModel::parse(&bytes) {
            Ok(model) => ModelFile::Valid(model.version),
            Err(err) => ModelFile::Unreadable(format!("{err:#}")),
        };
        *last = Some((hash, file.clone()));
        (file, Some(bytes))
    }
}

/// Reads `MODEL_PATH` once.
pub(crate) fn read(promoter: &Promoter) -> ModelFile {
    promoter.checked.read(&promoter.model_path).0
}

/// Reports `change` in the log, on `/healthz` and in the gauge.
pub(crate) fn report(change: &Change, promoter: &Promoter, health: &Health, metrics: &Metrics) {
    let path = promoter.model_path.display();
    match change {
        Change::Unreadable(cause) => {
            tracing::warn!(
                model_path = %path,
                error = %cause,
                "MODEL_PATH is not a valid model artifact: the trainer keeps its window and queues \
                 going but cannot compare candidates with the served model; it recovers when a \
                 valid artifact appears there, or by promoting a candidate that beats the version \
                 the replicas serve (as METRIC_URL reports it), or passes the absolute guards \
                 when that is unknown"
            );
            health.set_note(
                NOTE,
                Some(format!(
                    "not ready for promotion decisions: MODEL_PATH {path} is not a valid model \
                     artifact ({cause}); a candidate must beat the version the replicas serve \
                     (as the metric service reports it), or, when that is unknown, pass the \
                     absolute guards alone (finite holdout MAE)"
                )),
            );
            metrics.model_unreadable.set(1);
        }
        Change::Recovered(file) => {
            let now = match file {
                ModelFile::Valid(version) => format!("a valid artifact of version {version}"),
                _ => "gone: the fit on DATA_PATH is the served model".to_owned(),
            };
            tracing::info!(model_path = %path, "MODEL_PATH is {now} again: ready for promotion decisions");
            health.set_note(NOTE, None);
            metrics.model_unreadable.set(0);
        }
    }
}

/// Reads `MODEL_PATH` every [`POLL`] and reports each change until `shutdown`.
pub(crate) async fn watch_model_file(
    promoter: Promoter,
    mut watch: ModelFileWatch,
    health: Health,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => return,
        }
        let reader = promoter.clone();
        let Ok(file) = tokio::task::spawn_blocking(move || read(&reader)).await else {
            continue;
        };
        if let Some(change) = watch.observe(file) {
            report(&change, &promoter, &health, &metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bad(cause: &str) -> ModelFile {
        ModelFile::Unreadable(cause.to_owned())
    }

    #[test]
    fn an_unreadable_file_is_reported_once_and_its_recovery_once() {
        let mut watch = ModelFileWatch::default();
        assert_eq!(watch.observe(ModelFile::Valid("v1".into())), None);
        assert_eq!(
            watch.observe(bad("EOF")),
            Some(Change::Unreadable("EOF".into()))
        );
        assert!(watch.unreadable());
        // Polled again with the same bytes: nothing new to say.
        assert_eq!(watch.observe(bad("EOF")), None);
        // Another broken file: its own cause is reported.
        assert_eq!(
            watch.observe(bad("format")),
            Some(Change::Unreadable("format".into()))
        );
        assert_eq!(
            watch.observe(ModelFile::Valid("v2".into())),
            Some(Change::Recovered(ModelFile::Valid("v2".into())))
        );
        assert!(!watch.unreadable());
        assert_eq!(watch.observe(ModelFile::Valid("v3".into())), None);
        assert_eq!(watch.observe(ModelFile::Absent), None);
        // Broken at start-up, then removed: recovered to the DATA_PATH fit.
        let mut watch = ModelFileWatch::default();
        assert!(watch.observe(bad("garbage")).is_some());
        assert_eq!(
            watch.observe(ModelFile::Absent),
            Some(Change::Recovered(ModelFile::Absent))
        );
    }

    fn file() -> impl Strategy<Value = ModelFile> {
        prop_oneof![
            Just(ModelFile::Absent),
            (0u8..3).prop_map(|v| ModelFile::Valid(format!("v{v}"))),
            (0u8..3).prop_map(|c| ModelFile::Unreadable(format!("cause {c}"))),
        ]
    }

    proptest! {
        /// Whatever the readings, the reports alternate sensibly: a recovery only follows an
        /// unreadable report, no cause is reported twice in a row, and the last report matches
        /// the last reading's readability.
        #[test]
        fn reports_follow_the_readings(readings in prop::collection::vec(file(), 0..60)) {
            let mut watch = ModelFileWatch::default();
            let mut last_report: Option<Change> = None;
            for reading in readings {
                let was_unreadable = watch.unreadable();
                if let Some(change) = watch.observe(reading.clone()) {
                    match &change {
                        Change::Recovered(_) => prop_assert!(was_unreadable),
                        Change::Unreadable(cause) => {
                            prop_assert_ne!(
                                last_report.as_ref(),
                                Some(&Change::Unreadable(cause.clone()))
                            );
                        }
                    }
                    last_report = Some(change);
                }
                let reported_unreadable = matches!(last_report, Some(Change::Unreadable(_)));
                prop_assert_eq!(reported_unreadable, matches!(reading, ModelFile::Unreadable(_)));
            }
        }
    }
}
