//! The queues a service uses, declared by the service itself so start-up order does not matter:
//! each queue durable, with a dead-letter exchange that routes its rejects to `<queue>.dlq`.
//!
//! Under `TOPOLOGY=course` the pipeline's queues are declared exactly as the course's Python code
//! declares them (`queue_declare(queue=name)`: non-durable, no arguments), so a Python service and
//! ours can share them in either start order. The dead-letter exchange and the `.dlq` queues are
//! still declared: the services dead-letter bad input themselves.
//!
//! The producer publishes each stream (`features`, `y_true`) to a fanout exchange named after its
//! queue (`<queue>.fanout`, [`fanout_exchange`]) instead of straight to the queue, so the trainer
//! gets its own copy: the exchange is bound to the stream's queue and to the trainer's bounded
//! queue (`<queue>.train`, [`training_queue`]). Every service that touches a stream declares the
//! exchange and its own bindings (idempotent), so start order does not matter; a message published
//! straight to the queue (a course-style producer) reaches only that queue.
//!
//! With `PARTITIONS=P > 1` each stream is `P` queues `<queue>.p<k>` ([`Topology::with_partitions`]),
//! each with its own fanout exchange; the trainer's one copy per stream is bound to all of them.
//! The count is recorded on the broker by a marker queue `<queue>.partitions` declared with
//! `x-max-length = P`: a service started with another `P` gets PRECONDITION_FAILED at start-up, a
//! fatal error that names `PARTITIONS`. Partition queues of the joined streams are
//! single-active-consumer, so a standby metric instance can wait on them; on quorum queues their
//! leaders are spread over the cluster's nodes (`x-queue-leader-locator=balanced`).

use crate::config::{BrokerConfig, QueueType, TopologyMode};
use crate::health::Health;
use crate::partition::{Partitions, marker_queue};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The direct exchange every queue dead-letters to, routing by `<queue>.dlq`.
pub const DEAD_LETTER_EXCHANGE: &str = "pipeline.dlx";

/// Header on a dead-lettered message naming why it was refused (e.g. `invalid_json`).
pub const REASON_HEADER: &str = "x-pipeline-reason";

/// Header on a dead-lettered message with the full error text.
pub const DETAIL_HEADER: &str = "x-pipeline-error";

/// Header on a dead-lettered message naming the queue it came from.
pub const SOURCE_HEADER: &str = "x-pipeline-source-queue";

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The fanout exchange the producer publishes the stream of `queue` to.
pub fn fanout_exchange(queue: &str) -> String {
    format!("{queue}.fanout")
}

/// The trainer's copy of the stream of `queue`.
pub fn training_queue(queue: &str) -> String {
    format!("{queue}.train")
}

/// A stream's fanout exchange and the queues this service binds to it.
#[derive(Debug, Clone)]
struct Fanout {
    exchange: String,
    bound: Vec<String>,
}

/// The pipeline's streams. How each one's queues are declared is written here once, for every
/// service that declares them: the broker refuses a queue declared again with other arguments,
/// so what must agree across services is not restated per service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Feature vectors, producer to model (and the trainer's copy).
    Features,
    /// True targets, producer to metric (and the trainer's copy).
    YTrue,
    /// Predictions, model to metric.
    YPred,
}

impl Stream {
    /// Single-active-consumer partition queues: the joined streams, where a standby metric
    /// instance waits for its partitions.
    pub const fn single_active(self) -> bool {
        matches!(self, Self::YTrue | Self::YPred)
    }

    /// Published through a fanout exchange, which the trainer's copy is bound to as well.
    pub const fn fanout(self) -> bool {
        matches!(self, Self::Features | Self::YTrue)
    }
}

/// The queues one service declares.
#[derive(Debug, Clone)]
pub struct Topology {
    queues: Vec<String>,
    /// Partition queues (`PARTITIONS > 1`) and whether each is single-active-consumer.
    partition_queues: Vec<(String, bool)>,
    /// Marker queues recording a stream's partition count ([`marker_queue`]).
    markers: Vec<(String, u32)>,
    /// Queues capped at a length, dropping their oldest messages when full (the trainer's copies).
    bounded: Vec<(String, u32)>,
    fanouts: Vec<Fanout>,
    queue_type: QueueType,
    delivery_limit: u32,
    mode: TopologyMode,
}

impl Topology {
    /// The topology of `queues`, with the queue type of `config`.
    pub fn new(config: &BrokerConfig, queues: &[&str]) -> Self {
        Self {
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            partition_queues: Vec::new(),
            markers: Vec::new(),
            bounded: Vec::new(),
            fanouts: Vec::new(),
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
            mode: config.topology,
        }
    }

    /// Also declares the stream `stream`, named `queue`, under `partitions`, as every service
    /// declares it: its queues ([`Topology::with_partitions`], single-active-consumer where the
    /// stream is joined) and, for a stream the trainer copies, the fanout exchange each queue is
    /// bound to, so whichever service starts first, publishes are routed.
    pub fn with_stream(self, stream: Stream, queue: &str, partitions: Partitions) -> Self {
        let topology = self.with_partitions(queue, partitions, stream.single_active());
        if !stream.fanout() {
            return topology;
        }
        partitions
            .queues(queue)
            .iter()
            .fold(topology, |topology, name| topology.with_fanout(name))
    }

    /// Also declares the queues of the stream `queue` under `partitions`: `queue` itself with one
    /// partition (exactly as [`Topology::new`] would), else `<queue>.p<k>` for every `k` and the
    /// stream's marker queue. `single_active` makes the partition queues single-active-consumer
    /// (the joined streams `y_true` and `y_pred`, where a standby metric instance waits); every
    /// service that declares a stream must pass the same.
    pub fn with_partitions(
        mut self,
        queue: &str,
        partitions: Partitions,
        single_active: bool,
    ) -> Self {
        if !partitions.is_partitioned() {
            self.queues.push(queue.to_owned());
            return self;
        }
        for name in partitions.queues(queue) {
            self.queues.push(name.clone());
            self.partition_queues.push((name, single_active));
        }
        self.markers.push((marker_queue(queue), partitions.count()));
        self
    }

    /// Also declares the trainer's copy of the stream `queue` under `partitions`: one bounded
    /// [`training_queue`] bound to the fanout exchange of every partition queue (see
    /// [`Topology::with_training_queue`]).
    pub fn with_partitioned_training_queue(
        mut self,
        queue: &str,
        partitions: Partitions,
        max_length: u32,
    ) -> Self {
        let copy = training_queue(queue);
        for name in partitions.queues(queue) {
            self.fanout_mut(&name).bound.push(copy.clone());
        }
        self.bounded.push((copy, max_length));
        if partitions.is_partitioned() {
            self.markers.push((marker_queue(queue), partitions.count()));
        }
        self
    }

    /// Also declares the fanout exchange of the stream `queue` and binds `queue` to it (`queue`
    /// should be one of the declared queues).
    pub fn with_fanout(mut self, queue: &str) -> Self {
        self.fanout_mut(queue).bound.push(queue.to_owned());
        self
    }

    /// Also declares the trainer's copy of the stream `queue`: the fanout exchange, and
    /// [`training_queue`] bound to it, durable, holding at most `max_length` messages: when full
    /// the broker drops the oldest (`x-overflow=drop-head`), so a stopped trainer never fills the
    /// broker. No dead-letter exchange on it: the dropped copies are not dead-lettered.
    pub fn with_training_queue(self, queue: &str, max_length: u32) -> Self {
        self.with_partitioned_training_queue(queue, Partitions::ONE, max_length)
    }

    fn fanout_mut(&mut self, queue: &str) -> &mut Fanout {
        let exchange = fanout_exchange(queue);
        let index = match self.fanouts.iter().position(|f| f.exchange == exchange) {
            Some(index) => index,
            None => {
                self.fanouts.push(Fanout {
                    exchange,
                    bound: Vec::new(),
                });
                self.fanouts.len() - 1
            }
        };
        &mut self.fanouts[index]
    }

    /// Declares the dead-letter exchange, each queue and its dead-letter queue, then the fanout
    /// exchanges and their bindings. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        // The partition count first: a mismatch must stop the service before it declares (or
        // consumes) anything of another layout.
        for (marker, count) in &self.markers {
            let mut arguments = self.type_arguments(false);
            arguments.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(*count)),
            );
            channel
                .queue_declare(marker.as_str().into(), durable(), arguments)
                .await?;
        }
        channel
            .exchange_declare(
                DEAD_LETTER_EXCHANGE.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for queue in &self.queues {
            let dlq = dead_letter_queue(queue);
            self.declare_dead_letter_queue(channel, queue).await?;
            if self.mode == TopologyMode::Course {
                // Exactly the course's `channel.queue_declare(queue=name)`.
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                continue;
            }
            let mut arguments = self.type_arguments(true);
            if let Some((_, single_active)) = self.partition_queues.iter().find(|(q, _)| q == queue)
            {
                self.partition_arguments(&mut arguments, *single_active);
            }
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(dlq.as_str().into()),
            );
            channel
                .queue_declare(queue.as_str().into(), durable(), arguments)
                .await?;
        }
        for (queue, max_length) in &self.bounded {
            self.declare_dead_letter_queue(channel, queue).await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    durable(),
                    self.bounded_arguments(*max_length),
                )
                .await?;
        }
        for fanout in &self.fanouts {
            channel
                .exchange_declare(
                    fanout.exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            for queue in &fanout.bound {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        fanout.exchange.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn declare_dead_letter_queue(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        let dlq = dead_letter_queue(queue);
        channel
            .queue_declare(dlq.as_str().into(), durable(), self.type_arguments(false))
            .await?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                dlq.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Arguments of a bounded queue: its type, `x-max-length` and `x-overflow=drop-head`.
    fn bounded_arguments(&self, max_length: u32) -> FieldTable {
        let mut arguments = self.type_arguments(false);
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(max_length)),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        arguments
    }

    /// What a partition queue adds: single-active-consumer where asked.
    fn partition_arguments(&self, arguments: &mut FieldTable, single_active: bool) {
        if single_active {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
    }

    fn type_arguments(&self, with_delivery_limit: bool) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.queue_type == QueueType::Classic {
            // Classic queue storage v2 (RabbitMQ 3.10+): much less broker work per persistent
            // message than v1, the default before 3.12.
            arguments.insert("x-queue-version".into(), AMQPValue::LongLongInt(2));
        }
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            if !self.markers.is_empty() {
                // Partitioned: every queue's leader on the node with the fewest, so the
                // partitions use every node (all services declare partitioned streams alike).
                arguments.insert(
                    "x-queue-leader-locator".into(),
                    AMQPValue::LongString("balanced".into()),
                );
            }
            if with_delivery_limit {
                arguments.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
                );
            }
        }
        arguments
    }
}

/// What is off under `TOPOLOGY=course`, for the WARN line and `/healthz`; `None` under `durable`.
pub fn course_note(config: &BrokerConfig, queues: &[&str]) -> Option<String> {
    (config.topology == TopologyMode::Course).then(|| {
        format!(
            "TOPOLOGY=course: {} declared as the course's Python code declares them (non-durable, \
             no arguments): their messages do not survive a broker restart and the broker does not \
             dead-letter them (bad input is still dead-lettered by this service to <queue>.dlq); \
             bodies are bare JSON with the id only in message_id (no sent_at_us, no model_version), \
             and values without a message_id cannot be joined",
            queues.join(", ")
        )
    })
}

/// Under `TOPOLOGY=course`, says once at start which guarantees are off: a WARN line, and a note
/// in `/healthz` (its status unchanged). Does nothing under `durable`.
pub fn announce(config: &BrokerConfig, queues: &[&str], health: &Health) {
    if let Some(note) = course_note(config, queues) {
        tracing::warn!("{note}");
        health.set_note("topology", Some(note));
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerConfig,
    }

    fn config(args: &[&str]) -> BrokerConfig {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .unwrap()
            .broker
    }

    /// Every service that declares a stream declares it alike: the producer's, the model's and
    /// the metric's declarations of the same stream agree in queues, single-active-consumer and
    /// fanout, and a joined stream is never bound to a fanout of its own.
    #[test]
    fn a_stream_is_declared_alike_by_every_service() {
        let broker = config(&[]);
        for count in [1, 3] {
            let partitions = Partitions::new(count).unwrap();
            for stream in [Stream::Features, Stream::YTrue, Stream::YPred] {
                let alone = Topology::new(&broker, &[]).with_stream(stream, "s", partitions);
                // As part of a service's other declarations (the audit queue, another stream).
                let among = Topology::new(&broker, &["s.audit"])
                    .with_stream(Stream::YPred, "other", partitions)
                    .with_stream(stream, "s", partitions);
                let queues: Vec<&String> = among
                    .queues
                    .iter()
                    .filter(|q| *q == "s" || q.starts_with("s.p"))
                    .collect();
                assert_eq!(queues, alone.queues.iter().collect::<Vec<_>>());
                assert!(
                    alone
                        .partition_queues
                        .iter()
                        .all(|(_, single)| *single == stream.single_active())
                );
                let bound = bindings(&alone);
                if stream.fanout() {
                    assert_eq!(bound.len(), partitions.queues("s").len(), "{stream:?}");
                    for (exchange, queues) in bound {
                        assert_eq!(exchange, fanout_exchange(queues[0]));
                    }
                } else {
                    assert!(bound.is_empty(), "{stream:?}");
                }
            }
        }
    }

    /// Each fanout exchange with the queues bound to it.
    fn bindings(topology: &Topology) -> Vec<(&str, Vec<&str>)> {
        topology
            .fanouts
            .iter()
            .map(|f| {
                (
                    f.exchange.as_str(),
                    f.bound.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn streams_get_one_fanout_exchange_with_their_queues_bound() {
        let topology = Topology::new(&config(&[]), &["features", "y_true"])
            .with_fanout("features")
            .with_fanout("y_true")
            .with_training_queue("features", 100)
            .with_training_queue("y_true", 100);
        assert_eq!(
            bindings(&topology),
            [
                ("features.fanout", vec!["features", "features.train"]),
                ("y_true.fanout", vec!["y_true", "y_true.train"]),
            ]
        );
        assert_eq!(
            topology.bounded,
            [
                ("features.train".to_owned(), 100),
                ("y_true.train".to_owned(), 100)
            ]
        );
        let arguments = topology.bounded_arguments(100);
        let inner = arguments.inner();
        assert_eq!(
            inner.get("x-max-length"),
            Some(&AMQPValue::LongLongInt(100))
        );
        assert_eq!(
            inner.get("x-overflow"),
            Some(&AMQPValue::LongString("drop-head".into()))
        );
        // Dropped copies must not be dead-lettered (that would fill the dead-letter queue).
        assert!(inner.get("x-dead-letter-exchange").is_none());
    }

    #[test]
    fn one_partition_declares_exactly_the_streams_and_more_add_partition_queues_and_a_marker() {
        let quorum = config(&["--queue-type", "quorum"]);
        let one = Topology::new(&quorum, &[])
            .with_partitions("features", Partitions::ONE, false)
            .with_partitions("y_pred", Partitions::ONE, true);
        let plain = Topology::new(&quorum, &["features", "y_pred"]);
        assert_eq!(one.queues, plain.queues);
        assert!(one.markers.is_empty() && one.partition_queues.is_empty());
        assert_eq!(
            one.type_arguments(true).inner(),
            plain.type_arguments(true).inner()
        );
        assert!(
            one.type_arguments(true)
                .inner()
                .get("x-queue-leader-locator")
                .is_none()
        );

        let three = Partitions::new(3).unwrap();
        let many = Topology::new(&quorum, &[])
            .with_partitions("features", three, false)
            .with_partitions("y_pred", three, true);
        assert_eq!(
            many.queues,
            [
                "features.p0",
                "features.p1",
                "features.p2",
                "y_pred.p0",
                "y_pred.p1",
                "y_pred.p2"
            ]
        );
        assert_eq!(
            many.markers,
            [
                ("features.partitions".to_owned(), 3),
                ("y_pred.partitions".to_owned(), 3)
            ]
        );
        let single: Vec<&str> = many
            .partition_queues
            .iter()
            .filter(|(_, single)| *single)
            .map(|(q, _)| q.as_str())
            .collect();
        assert_eq!(single, ["y_pred.p0", "y_pred.p1", "y_pred.p2"]);
        assert_eq!(
            many.type_arguments(false)
                .inner()
                .get("x-queue-leader-locator"),
            Some(&AMQPValue::LongString("balanced".into()))
        );
        // The trainer's one copy is bound to every partition's exchange.
        let trainer =
            Topology::new(&quorum, &[]).with_partitioned_training_queue("features", three, 100);
        assert_eq!(
            bindings(&trainer),
            [
                ("features.p0.fanout", vec!["features.train"]),
                ("features.p1.fanout", vec!["features.train"]),
                ("features.p2.fanout", vec!["features.train"]),
            ]
        );
    }

    #[test]
    fn durable_is_the_default_and_says_nothing() {
        let config = config(&[]);
        assert_eq!(config.topology, TopologyMode::Durable);
        assert_eq!(course_note(&config, &["features"]), None);
        let health = Health::new();
        announce(&config, &["features"], &health);
        assert!(health.notes().is_empty());
    }

    #[test]
    fn course_notes_what_is_off_without_changing_the_status() {
        let config = config(&["--topology", "course"]);
        let health = Health::new();
        health.set_healthy();
        announce(&config, &["features", "y_true"], &health);
        assert_eq!(health.get(), Ok(()));
        let notes = health.notes();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("TOPOLOGY=course: features, y_true declared"));
        assert!(notes[0].contains("do not survive a broker restart"));
        assert!(notes[0].contains("dead-lettered by this service"));
    }
}
