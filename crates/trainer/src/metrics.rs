//! The trainer's own Prometheus metrics (`pipeline_trainer_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of `pipeline_trainer_retrains_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RetrainLabels {
    pub(crate) trigger: &'static str,
    pub(crate) result: &'static str,
}

/// Label of the per-stream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StreamLabel {
    pub(crate) stream: &'static str,
}

/// Label of the MAE gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelLabel {
    pub(crate) model: &'static str,
}

/// The trainer's own metrics.
#[derive(Clone, Default)]
pub(crate) struct Metrics {
    pub(crate) received: Family<StreamLabel, Counter>,
    pub(crate) joined: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) unpaired: Counter,
    pub(crate) window: Gauge,
    pub(crate) waiting: Gauge,
    pub(crate) retrains: Family<RetrainLabels, Counter>,
    pub(crate) holdout_mae: Family<ModelLabel, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "pipeline_trainer_received",
            "Messages the trainer received on its copy of each stream",
            metrics.received.clone(),
        );
        registry.register(
            "pipeline_trainer_samples",
            "Labelled samples joined into the training window",
            metrics.joined.clone(),
        );
        registry.register(
            "pipeline_trainer_duplicates",
            "Messages of samples already in the window (published again after a reconnect)",
            metrics.duplicates.clone(),
        );
        registry.register(
            "pipeline_trainer_unpaired",
            "Halves dropped because their other half never came",
            metrics.unpaired.clone(),
        );
        registry.register(
            "pipeline_trainer_window_samples",
            "Labelled samples in the training window now",
            metrics.window.clone(),
        );
        registry.register(
            "pipeline_trainer_waiting",
            "Feature vectors and labels waiting for their other half",
            metrics.waiting.clone(),
        );
        registry.register(
            "pipeline_trainer_retrains",
            "Retrains by trigger (labels, manual, alarm) and result (promoted, refused, skipped, failed)",
            metrics.retrains.clone(),
        );
        registry.register(
            "pipeline_trainer_holdout_mae",
            "MAE on the holdout at the last retrain, of the served model and of the candidate",
            metrics.holdout_mae.clone(),
        );
        metrics
    }
}
