//! The model service's drift monitor: the predictor adds every feature vector it serves to a
//! sliding window (a few counter updates under an uncontended lock), and a task recomputes the PSI
//! of every feature once a second, exports it as `pipeline_feature_drift_psi{feature}`, and logs a
//! WARN line when a feature's PSI goes above `DRIFT_PSI_ALERT` and when it comes back.
//!
//! The reference follows the served model: a model swapped in with other reference statistics
//! starts a new window; a model without them (an older artifact) has no drift figures.

use crate::drift::{AlarmChange, DriftAlarms, DriftWindow, Reference, psi_per_feature};
use crate::regression::LinearModel;
use pipeline::health::Health;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    window: DriftWindow,
    /// Changes with every new reference, so the reporter knows to start over.
    generation: u64,
}

#[derive(Default)]
struct Shared {
    current: Option<Current>,
    generations: u64,
}

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
    pub fn observe(&self, model: &LinearModel, features: &[f64]) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(reference) = &model.reference else {
            shared.current = None;
            return;
        };
        match &mut shared.current {
            Some(current) if Arc::ptr_eq(&current.reference, reference) => {
                current.window.observe(features);
            }
            _ => {
                shared.generations += 1;
                let mut window = DriftWindow::new(reference, self.capacity);
                window.observe(features);
                shared.current = Some(Current {
                    reference: Arc::clone(reference),
                    window,
                    generation: shared.generations,
                });
            }
        }
    }

    /// The reference, its generation and, once the window is full, a copy of its counts.
    fn snapshot(&self) -> Option<(u64, Arc<Reference>, Option<Vec<u32>>)> {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.current.as_ref().map(|current| {
            (
                current.generation,
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
/// `/healthz` note (the status is unchanged: drift is not an outage).
pub async fn report_drift(
    monitor: DriftMonitor,
    alert: f64,
    gauges: DriftGauges,
    health: Health,
    shutdown: pipeline::CancellationToken,
) {
    let mut interval = tokio::time::interval(DRIFT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alarms: Option<(u64, DriftAlarms)> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some((generation, reference, counts)) = monitor.snapshot() else {
            if alarms.take().is_some() {
                gauges.clear();
                health.set_note(HEALTH_NOTE, None);
            }
            continue;
        };
        let alarms = match &mut alarms {
            Some((seen, alarms)) if *seen == generation => alarms,
            slot => {
                // A new reference: the figures of the previous one no longer apply.
                gauges.clear();
                health.set_note(HEALTH_NOTE, None);
                &mut slot
                    .insert((
                        generation,
                        DriftAlarms::new(alert, reference.features.len()),
                    ))
                    .1
            }
        };
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
    use pipeline::dataset::Dataset;
    use std::path::Path;

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
        let reporter = tokio::spawn(report_drift(
            monitor.clone(),
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
            monitor.observe(&model, &row);
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
            monitor.observe(&model, data.row(rng.usize(0..data.len())));
        }
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        assert!(psi_of(&gauges, "bmi") < 0.1);
        assert!(health.notes().is_empty());

        // An older artifact's model has no reference: no drift figures at all.
        let old = LinearModel {
            reference: None,
            ..model
        };
        monitor.observe(&old, data.row(0));
        tokio::time::sleep(DRIFT_INTERVAL * 2).await;
        shutdown.cancel();
        reporter.await.unwrap();
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("psi", "", gauges);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("feature="), "{text}");
    }
}
