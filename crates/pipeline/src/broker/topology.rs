//! The queues a service uses, declared by the service itself so start-up order does not matter:
//! each queue durable, with a dead-letter exchange that routes its rejects to `<queue>.dlq`.

use crate::config::{BrokerConfig, QueueType};
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
}

impl Topology {
    /// The topology of `queues`, with the queue type of `config`.
    pub fn new(config: &BrokerConfig, queues: &[&str]) -> Self {
        Self {
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            queue_type: config.queue_type,
            delivery_limit: config.delivery_limit,
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

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}
