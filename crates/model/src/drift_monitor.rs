//! The model service's drift monitor: the predictor adds every feature vector it serves to a
//! sliding window (a few counter updates under an uncontended lock), and a task recomputes the PSI
//! of every feature once a second, exports it as `pipeline_feature_drift_psi{feature}`, and logs a
//! WARN line when a feature's PSI goes above `DRIFT_PSI_ALERT` and when it comes back.
//!
//! The reference follows the served model: a model swapped in with other reference statistics
//! starts a new window; a model without them (an older artifact) has no drift figures. The
//! figures of the model served before are retired as soon as the replica serves the other one,
//! with or without traffic: its PSI series go, its alarms end (an INFO line naming its version
//! and the features whose alarm was raised) and the `/healthz` note with them. A new artifact
//! with the same reference statistics (a new version trained on the same data) keeps the window.

use crate::drift::{AlarmChange, DriftAlarms, DriftWindow, Reference, psi_per_feature};
use crate::served::ServedModel;
use pipeline::health::Health;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// How often the PSI is recomputed from the window's counts.
pub const DRIFT_INTERVAL: Duration = Duration::from_secs(1);

/// Key of the `/healthz` note listing the drifting features.
const HEALTH_NOTE: &str = "feature_drift";

/// The PSI gauge family.
pub type DriftGauges = Family<FeatureLabel, Gauge<f64, AtomicU64>>;

/// Label naming one feature.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabel {
    /// Feature name, from the model's reference statistics.
    pub feature: String,
}

/// The window of the served model's reference.
struct Current {
    reference: Arc<Reference>,
    /// The version the window was started for (named when its figures retire).
    version: String,
    window: DriftWindow,
    /// Changes with every new reference, so the reporter knows to start over.
    generation: u64,
}

#[derive(Default)]
struct Shared {
    current: Option<Current>,
    generations: u64,
}

/// Whether a window binned by `window`'s statistics still applies to a model with `served`'s,
/// plain data: the same statistics (the same `Arc`, or equal values), not the same version.
pub fn same_reference(window: &Arc<Reference>, served: Option<&Arc<Reference>>) -> bool {
    served.is_some_and(|served| Arc::ptr_eq(window, served) || **window == **served)
}

/// What [`DriftMonitor::snapshot`] hands the reporter: generation, version, reference, counts.
type Snapshot = (u64, String, Arc<Reference>, Option<Vec<u32>>);

/// The sliding window shared by the predictor (which fills it) and [`report_drift`].
#[derive(Clone)]
pub struct DriftMonitor {
    shared: Arc<Mutex<Shared>>,
    capacity: usize,
}

impl DriftMonitor {
    /// A monitor with windows of `capacity` feature vectors.
    pub fn new(capacity: usize) -> Self {
        Self {
            shared: Arc::default(),
            capacity,
        }
    }

    /// Adds the features `model` was just asked to predict.
    pub fn observe(&self, model: &ServedModel, features: &[f64]) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(reference) = &model.reference else {
            shared.current = None;
            return;
        };
        match &mut shared.current {
            Some(current) if Arc::ptr_eq(&current.reference, reference) => {
                current.window.observe(features);
            }
            Some(current) if same_reference(&current.reference, Some(reference)) => {
                // Another artifact with the same statistics: the window still applies. Take its
                // pointer so the next message takes the fast path.
                current.reference = Arc::clone(reference);
                current.window.observe(features);
            }
            _ => {
                shared.generations += 1;
                let mut window = DriftWindow::new(reference, self.capacity);
                window.observe(features);
                shared.current = Some(Current {
                    reference: Arc::clone(reference),
                    version: model.version.clone(),
                    window,
                    generation: shared.generations,
                });
            }
        }
    }

    /// Drops the window when `served` (the model the replica serves now) has other reference
    /// statistics than the window's, or none: its figures no longer apply, even before the
    /// first message of the new model. Returns whether it did.
    pub fn follow(&self, served: &ServedModel) -> bool {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = shared
            .current
            .as_ref()
            .is_some_and(|current| !same_reference(&current.reference, served.reference.as_ref()));
        if stale {
            shared.current = None;
        }
        stale
    }

    /// The generation and version of the current window, if any.
    pub fn current(&self) -> Option<(u64, String)> {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared
            .current
            .as_ref()
            .map(|current| (current.generation, current.version.clone()))
    }

    /// The reference, its generation and version and, once the window is full, a copy of its
    /// counts.
    fn snapshot(&self) -> Option<Snapshot> {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.current.as_ref().map(|current| {
            (
                current.generation,
                current.version.clone(),
                Arc::clone(&current.reference),
                current
                    .window
                    .is_full()
                    .then(|| current.window.counts().to_vec()),
            )
        })
    }
}

/// Every [`DRIFT_INTERVAL`] until `shutdown`: recomputes the PSI of each feature once the window
/// is full, sets the gauges, logs the alarms' changes and lists the drifting features in a
/// `/healthz` note (the status is unchanged: drift is not an outage). `models` is the model the
/// replica serves: when it changes to other reference statistics, the old figures retire.
pub async fn report_drift(
    monitor: DriftMonitor,
    models: watch::Receiver<Arc<ServedModel>>,
    alert: f64,
    gauges: DriftGauges,
    health: Health,
    shutdown: pipeline::CancellationToken,
) {
    let mut interval = tokio::time::interval(DRIFT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The generation, version and reference reported, and its alarms.
    let mut alarms: Option<(u64, String, Arc<Reference>, DriftAlarms)> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let served = Arc::clone(&models.borrow());
        monitor.follow(&served);
        let snapshot = monitor.snapshot();
        if let Some((generation, version, reference, reported)) = alarms.take() {
            if snapshot.as_ref().is_some_and(|s| s.0 == generation) {
                alarms = Some((generation, version, reference, reported));
            } else {
                // Another reference (or none): the figures of the previous one no longer apply.
                gauges.clear();
                health.set_note(HEALTH_NOTE, None);
                let ended: Vec<&str> = reported
                    .raised()
                    .map(|index| reference.features[index].name.as_str())
                    .collect();
                tracing::info!(
                    model_version = %version,
                    serving = %served.version,
                    drift_alarms_cleared = %ended.join(","),
                    "drift figures of model version {version} retired: the replica serves {} with other reference statistics (or none); its PSI series and drift alarms ({}) are gone",
                    served.version,
                    if ended.is_empty() { "none raised".to_owned() } else { ended.join(", ") }
                );
            }
        }
        let Some((generation, version, reference, counts)) = snapshot else {
            continue;
        };
        let alarms = &mut alarms
            .get_or_insert_with(|| {
                (
                    generation,
                    version,
                    Arc::clone(&reference),
                    DriftAlarms::new(alert, reference.features.len()),
                )
            })
            .3;
        let Some(counts) = counts else { continue };
        let psi = psi_per_feature(&reference, &counts);
        for (feature, psi) in reference.features.iter().zip(&psi) {
            if let Some(psi) = psi {
                gauges
                    .get_or_create(&FeatureLabel {
                        feature: feature.name.clone(),
                    })
                    .set(*psi);
            }
        }
        let changes = alarms.update(&psi);
        for &(index, change) in &changes {
            let name = &reference.features[index].name;
            let psi = psi[index].unwrap_or(f64::NAN);
            match change {
                AlarmChange::Raised => tracing::warn!(
                    feature = %name,
                    psi,
                    threshold = alert,
                    "feature drift: the PSI of {name} is above DRIFT_PSI_ALERT"
                ),
                AlarmChange::Cleared => tracing::warn!(
                    feature = %name,
                    psi,
                    threshold = alert,
                    "feature drift over: the PSI of {name} is back within DRIFT_PSI_ALERT"
                ),
            }
        }
        if !changes.is_empty() {
            let drifting: Vec<&str> = alarms
                .raised()
                .map(|index| reference.features[index].name.as_str())
                .collect();
            health.set_note(
                HEALTH_NOTE,
                (!drifting.is_empty())
                    .then(|| format!("feature drift (PSI > {alert}): {}", drifting.join(", "))),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regression::LinearModel;
    use pipeline::dataset::Dataset;
    use std::path::Path;

    fn as_served(model: &LinearModel) -> ServedModel {
        ServedModel::linear(model.clone())
    }

    fn fitted() -> LinearModel {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        LinearModel::fit(&Dataset::from_csv(&path, None).unwrap()).unwrap()
    }

    fn psi_of(gauges: &DriftGauges, feature: &str) -> f64 {
        gauges
            .get_or_create(&FeatureLabel {
                feature: feature.to_owned(),
            })
            .get()
    }

    /// The start-up fit carries the reference; a shifted `bmi` raises its gauge and the health
    /// note, the other features stay low; a model without a reference clears the figures.
    #[tokio::test(start_paused = true)]
    async fn the_reporter_follows_the_window_and_the_model() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        let data = Dataset::from_csv(&path, None).unwrap();
        let model = fitted();
        assert!(
            model.reference.is_some(),
            "the start-up fit has no reference"
        );
        let monitor = DriftMonitor::new(1000);
        let gauges = DriftGauges::default();
        let health = Health::new();
        let shutdown = pipeline::CancellationToken::new();
        let (_models, served) = watch::channel(Arc::new(as_served(&model)));
        let reporter = tokio::spawn(report_drift(
            monitor.clone(),
            served,
            0.25,
            gauges.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        let rng = &mut fastrand::Rng::with_seed(3);
        let mut row = vec![0.0; data.n_features()];
        for _ in 0..1000 {
            row.copy_from_slice(data.row(rng.usize(0..data.len())));
            row[2] += 0.05;
            monitor.observe(&as_served(&model), &row);
        }
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert!(psi_of(&gauges, "bmi") > 0.25, "{}", psi_of(&gauges, "bmi"));
        for feature in ["age", "sex", "bp", "s1", "s5"] {
            assert!(psi_of(&gauges, feature) < 0.1, "{feature}");
        }
        assert_eq!(
            health.notes(),
            vec!["feature drift (PSI > 0.25): bmi".to_owned()]
        );

        // Back to the training distribution: the alarm clears.
        for _ in 0..1000 {
            monitor.observe(&as_served(&model), data.row(rng.usize(0..data.len())));
        }
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert!(psi_of(&gauges, "bmi") < 0.1);
        assert!(health.notes().is_empty());

        // An older artifact's model has no reference: no drift figures at all.
        let old = LinearModel {
            reference: None,
            ..model
        };
        monitor.observe(&as_served(&old), data.row(0));
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        shutdown.cancel();
        reporter.await.unwrap();
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("psi", "", gauges);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("feature="), "{text}");
    }

    /// `model` with other reference statistics (and another version).
    fn retrained(model: &LinearModel, version: &str) -> LinearModel {
        let mut reference = (**model.reference.as_ref().unwrap()).clone();
        reference.mae += 1.0;
        LinearModel {
            version: version.to_owned(),
            reference: Some(Arc::new(reference)),
            ..model.clone()
        }
    }

    /// The replica moves to a new artifact while no message comes: the old version's PSI series,
    /// drift alarm and health note go at the next tick. A new version with the same statistics
    /// keeps them.
    #[tokio::test(start_paused = true)]
    async fn the_old_reference_retires_when_the_replica_serves_another() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        let data = Dataset::from_csv(&path, None).unwrap();
        let model = fitted();
        let monitor = DriftMonitor::new(500);
        let gauges = DriftGauges::default();
        let health = Health::new();
        let shutdown = pipeline::CancellationToken::new();
        let (models, served) = watch::channel(Arc::new(as_served(&model)));
        let reporter = tokio::spawn(report_drift(
            monitor.clone(),
            served,
            0.25,
            gauges.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        let rng = &mut fastrand::Rng::with_seed(5);
        let mut row = vec![0.0; data.n_features()];
        for _ in 0..500 {
            row.copy_from_slice(data.row(rng.usize(0..data.len())));
            row[2] += 0.05;
            monitor.observe(&as_served(&model), &row);
        }
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert!(psi_of(&gauges, "bmi") > 0.25);
        assert_eq!(health.notes().len(), 1);
        let generation = monitor.current().unwrap().0;

        // Same statistics under another version (a new Arc): the window and its alarm stay.
        let same = LinearModel {
            version: "same-data".into(),
            reference: Some(Arc::new((**model.reference.as_ref().unwrap()).clone())),
            ..model.clone()
        };
        models.send(Arc::new(as_served(&same))).unwrap();
        monitor.observe(&as_served(&same), data.row(0));
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert_eq!(monitor.current().unwrap().0, generation);
        assert_eq!(health.notes().len(), 1);

        // Other statistics, no traffic: gone.
        models
            .send(Arc::new(as_served(&retrained(&model, "v2"))))
            .unwrap();
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert!(monitor.current().is_none());
        assert!(health.notes().is_empty());
        shutdown.cancel();
        reporter.await.unwrap();
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("psi", "", gauges);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("feature="), "{text}");
    }

    #[test]
    fn same_reference_is_by_value() {
        let model = fitted();
        let reference = model.reference.clone().unwrap();
        let copy = Arc::new((*reference).clone());
        let other = retrained(&model, "v2").reference.unwrap();
        assert!(same_reference(&reference, Some(&reference)));
        assert!(same_reference(&reference, Some(&copy)));
        assert!(!same_reference(&reference, Some(&other)));
        assert!(!same_reference(&reference, None));
    }

    proptest::proptest! {
        /// Any sequence of messages and swaps among models with the same statistics, other
        /// statistics and none: the window, when there is one, has the statistics of the model
        /// last served or observed, and a new window starts exactly when they changed.
        #[test]
        fn the_window_follows_the_reference_not_the_version(
            ops in proptest::collection::vec((0usize..4, proptest::bool::ANY), 1..60),
        ) {
            let base = fitted();
            let models = [
                base.clone(),
                LinearModel {
                    version: "copy".into(),
                    reference: Some(Arc::new((**base.reference.as_ref().unwrap()).clone())),
                    ..base.clone()
                },
                retrained(&base, "other"),
                LinearModel { version: "old".into(), reference: None, ..base.clone() },
            ];
            let monitor = DriftMonitor::new(10);
            let row = vec![0.0; base.n_features()];
            let mut before: Option<(u64, Option<Arc<Reference>>)> = None;
            for (index, is_message) in ops {
                let model = &models[index];
                if is_message {
                    monitor.observe(&as_served(model), &row);
                } else {
                    monitor.follow(&as_served(model));
                }
                let now = monitor.current();
                let shared = monitor.shared.lock().unwrap();
                match (&shared.current, &model.reference) {
                    (Some(current), Some(reference)) => {
                        proptest::prop_assert!(*current.reference == **reference);
                    }
                    (Some(_), None) => proptest::prop_assert!(false, "a window for a model without statistics"),
                    (None, _) => proptest::prop_assert!(!is_message || model.reference.is_none()),
                }
                drop(shared);
                if let (Some((gen_before, Some(ref_before))), Some((gen_now, _))) = (&before, &now) {
                    let changed = !same_reference(ref_before, model.reference.as_ref());
                    proptest::prop_assert_eq!(changed, gen_before != gen_now);
                }
                before = now.map(|(generation, _)| (generation, model.reference.clone()));
            }
        }
    }
}
