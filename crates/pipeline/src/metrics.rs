//! Prometheus metrics every service exports, named by Prometheus conventions (`_total` counters,
//! base units in names). Each service registers its own extra metrics in the same [`Registry`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label naming one queue.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Queue name.
    pub queue: String,
}

/// Labels of a dead-lettered message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// Queue the message came from.
    pub queue: String,
    /// Short reason, e.g. `invalid_json`.
    pub reason: String,
}

/// Buckets from 10 µs to about 5 s, for per-message processing time.
pub fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 2.5, 15)
}

/// Buckets for end-to-end latencies: from 0.2 ms to about 2.2 s, each ×1.5 the one before, so a
/// quantile read from them between 1 ms and 1 s is off by less than 50 %.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_2, 1.5, 24)
}

/// Metrics of the broker plumbing, shared by every service.
#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    consumed: Family<QueueLabel, Counter>,
    published: Family<QueueLabel, Counter>,
    acked: Family<QueueLabel, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    processing_seconds: Family<QueueLabel, Histogram>,
    confirm_seconds: Family<QueueLabel, Histogram>,
    receive_delay_seconds: Family<QueueLabel, Histogram>,
    /// Reconnections to the broker after a lost connection.
    pub reconnects: Counter,
    /// 1 while connected to the broker, else 0.
    pub connected: Gauge,
    /// 1 while the broker blocks publishing on our connection (a resource alarm), else 0.
    pub blocked: Gauge,
    /// 1 while the service cannot write its own files and has paused consuming, else 0.
    pub local_fault: Gauge,
}

/// Counters of one input queue, looked up once so the hot path does no label hashing.
#[derive(Clone, Debug)]
pub struct QueueCounters {
    /// Messages received from the queue.
    pub consumed: Counter,
    /// Messages from the queue acknowledged after their work was done.
    pub acked: Counter,
    /// Time from receiving a message to handing it on (before the ack).
    pub processing_seconds: Histogram,
    /// Time from the producer's send to receipt here, for messages that carry `sent_at_us`.
    pub receive_delay_seconds: Histogram,
}

impl QueueCounters {
    /// Records the delay of a message sent at `sent_at_us` (producer's clock, µs since the epoch)
    /// and received now. A send time in the future (clock skew) counts as no delay.
    pub fn observe_receive_delay(&self, sent_at_us: u64, now_us: u64) {
        self.receive_delay_seconds
            .observe(now_us.saturating_sub(sent_at_us) as f64 / 1e6);
    }
}

impl BrokerMetrics {
    /// Creates the metrics and registers them under the `pipeline_` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            consumed: Family::default(),
            published: Family::default(),
            acked: Family::default(),
            dead_lettered: Family::default(),
            processing_seconds: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            confirm_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            receive_delay_seconds: Family::new_with_constructor(|| {
                Histogram::new(latency_buckets())
            }),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            blocked: Gauge::default(),
            local_fault: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("pipeline");
        registry.register(
            "messages_consumed",
            "Messages received from a queue",
            metrics.consumed.clone(),
        );
        registry.register(
            "messages_published",
            "Messages published to a queue and confirmed by the broker",
            metrics.published.clone(),
        );
        registry.register(
            "messages_acked",
            "Messages acknowledged after their work was safely done",
            metrics.acked.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages rejected to a dead-letter queue, by queue and reason",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "message_processing_seconds",
            "Time to process one message, from receipt to hand-off",
            metrics.processing_seconds.clone(),
        );
        registry.register(
            "publish_confirm_seconds",
            "Time from a publish (written to the socket) to the broker's confirm, by queue; a \
             persistent message is confirmed once the broker has written it to disk",
            metrics.confirm_seconds.clone(),
        );
        registry.register(
            "receive_delay_seconds",
            "Time from the producer's send (the message's sent_at_us) to this service receiving \
             the message, by input queue: one hop for features and y_true, two for y_pred",
            metrics.receive_delay_seconds.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Reconnections to the broker after the connection was lost",
            metrics.reconnects.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker, 0 otherwise",
            metrics.connected.clone(),
        );
        registry.register(
            "broker_blocked",
            "1 while the broker blocks publishing on this service's connection (resource alarm)",
            metrics.blocked.clone(),
        );
        registry.register(
            "local_fault",
            "1 while the service cannot write its own files and has paused consuming",
            metrics.local_fault.clone(),
        );
        metrics
    }

    /// The counters of one queue this service consumes.
    pub fn queue(&self, queue: &str) -> QueueCounters {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        QueueCounters {
            consumed: self.consumed.get_or_create_owned(&label),
            acked: self.acked.get_or_create_owned(&label),
            processing_seconds: self.processing_seconds.get_or_create_owned(&label),
            receive_delay_seconds: self.receive_delay_seconds.get_or_create_owned(&label),
        }
    }

    /// The counter of messages this service published to `queue` and had confirmed.
    pub fn published(&self, queue: &str) -> Counter {
        self.published.get_or_create_owned(&QueueLabel {
            queue: queue.to_owned(),
        })
    }

    /// The histogram of publish-to-confirm times of messages this service published to `queue`.
    pub fn confirm_seconds(&self, queue: &str) -> Histogram {
        self.confirm_seconds.get_or_create_owned(&QueueLabel {
            queue: queue.to_owned(),
        })
    }

    /// Counts one dead-lettered message.
    pub fn dead_lettered(&self, queue: &str, reason: &str) {
        self.dead_lettered
            .get_or_create(&DeadLetterLabels {
                queue: queue.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn receive_delay_is_exported_per_queue_and_skew_counts_as_zero() {
        let mut registry = Registry::default();
        let metrics = BrokerMetrics::register(&mut registry);
        let features = metrics.queue("features");
        features.observe_receive_delay(1_000_000, 1_004_000);
        features.observe_receive_delay(2_000_000, 1_000_000);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("pipeline_receive_delay_seconds_count{queue=\"features\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pipeline_receive_delay_seconds_sum{queue=\"features\"} 0.004"),
            "{text}"
        );
    }
}
