//! The queues a service uses, declared by the service itself so start-up order does not matter:
//! each queue durable, with a dead-letter exchange that routes its rejects to `<queue>.dlq`.
//!
//! Under `TOPOLOGY=course` the pipeline's queues are declared exactly as the course's Python code
//! declares them (`queue_declare(queue=name)`: non-durable, no arguments), so a Python service and
//! ours can share them in either start order. The dead-letter exchange and the `.dlq` queues are
//! still declared: the services dead-letter bad input themselves.

use crate::config::{BrokerConfig, QueueType, TopologyMode};
use crate::health::Health;
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

/// The queues one service declares.
#[derive(Debug, Clone)]
pub struct Topology {
    queues: Vec<String>,
    queue_type: QueueType,
    delivery_limit: u32,
    mode: TopologyMode,
}

impl Topology {
    /// The topology of `queues`, with the queue type of `config`.
    pub fn new(config: &BrokerConfig, queues: &[&str]) -> Self {
        Self {
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
            mode: config.topology,
        }
    }

    /// Declares the dead-letter exchange, each queue and its dead-letter queue. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
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
        Ok(())
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
