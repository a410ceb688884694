//! The metric service's own metrics of the join (`pipeline_join_*`); the quality metrics are in
//! [`crate::quality`], the broker's in [`pipeline::metrics`].

use pipeline::metrics::QueueLabel;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// Metrics of the join.
#[derive(Clone)]
pub(crate) struct JoinMetrics {
    pub(crate) duplicates: Family<QueueLabel, Counter>,
    pub(crate) conflicts: Counter,
    pub(crate) unpaired: Counter,
    pub(crate) evicted: Family<ReasonLabel, Counter>,
    pub(crate) waiting: Gauge,
    pub(crate) y_true_held: Gauge,
}

impl JoinMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            duplicates: Family::default(),
            conflicts: Counter::default(),
            unpaired: Counter::default(),
            evicted: Family::default(),
            waiting: Gauge::default(),
            y_true_held: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("pipeline_join");
        registry.register("duplicates", "Messages for an id already joined or already waiting with the same value (redelivered or republished), ignored", metrics.duplicates.clone());
        registry.register(
            "conflicts",
            "Messages for an id that already has a different value; the first value wins",
            metrics.conflicts.clone(),
        );
        registry.register(
            "unpaired",
            "Messages without an id (bare course format without message_id): logged, not joined",
            metrics.unpaired.clone(),
        );
        registry.register(
            "evicted",
            "Ids dropped while waiting for their partner, by reason (capacity, age)",
            metrics.evicted.clone(),
        );
        registry.register(
            "waiting",
            "Ids waiting for their partner",
            metrics.waiting.clone(),
        );
        registry.register(
            "y_true_held",
            "1 while y_true is not taken because the join is full (the broker keeps it until the model catches up)",
            metrics.y_true_held.clone(),
        );
        metrics
    }
}
