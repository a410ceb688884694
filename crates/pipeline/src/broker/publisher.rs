//! Publishing with publisher confirms on a channel of its own: persistent JSON messages to the
//! default exchange (straight to a queue) or to a stream's fanout exchange, `mandatory` so an
//! unroutable message comes back instead of vanishing.

use super::topology::{
    DEAD_LETTER_EXCHANGE, DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, dead_letter_queue,
    fanout_exchange,
};
use crate::messages::MessageError;
use crate::metrics::BrokerMetrics;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

/// A confirm-mode channel for publishing.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    app_id: ShortString,
    metrics: BrokerMetrics,
}

/// The broker's answer to one publish; counts the message as published when it is confirmed and
/// records how long the broker took to answer.
pub struct Confirm {
    inner: PublisherConfirm,
    published: Counter,
    sent: Instant,
    confirm_seconds: Histogram,
}

impl Future for Confirm {
    type Output = lapin::Result<Confirmation>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        if let Ok(confirmation) = &result {
            self.confirm_seconds
                .observe(self.sent.elapsed().as_secs_f64());
            if is_confirmed(confirmation) {
                self.published.inc();
            }
        }
        Poll::Ready(result)
    }
}

/// Whether the broker took responsibility for a message: acked, and not returned as unroutable.
pub fn is_confirmed(confirmation: &Confirmation) -> bool {
    matches!(confirmation, Confirmation::Ack(None))
}

/// Records in `window` the publisher confirms that are in, oldest first (with `wait`, waiting for
/// the oldest one first): the producer's and the benchmark's bare client's one drain loop.
/// Cancel-safe: nothing changes before the first confirm is in, so a caller may give up waiting.
pub async fn record_confirms<T, C>(
    window: &mut super::window::ConfirmWindow<T>,
    confirms: &mut std::collections::VecDeque<(u64, C)>,
    wait: bool,
) -> lapin::Result<()>
where
    C: Future<Output = lapin::Result<Confirmation>> + Unpin,
{
    use futures_util::FutureExt as _;
    let mut wait = wait;
    while let Some((seq, confirm)) = confirms.front_mut() {
        let result = if wait {
            confirm.await
        } else {
            match confirm.now_or_never() {
                Some(result) => result,
                None => break,
            }
        };
        wait = false;
        let seq = *seq;
        confirms.pop_front();
        window.answered(seq, is_confirmed(&result?));
    }
    Ok(())
}

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn open(
        connection: &Connection,
        app_id: &str,
        metrics: BrokerMetrics,
    ) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            app_id: app_id.into(),
            metrics,
        })
    }

    /// Closes the channel, waiting for the broker (briefly), so the connection can close cleanly.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.channel.close(200, "bye".into()),
        )
        .await;
    }

    /// The underlying channel (for declaring topology).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes a persistent JSON `body` to `queue`. The returned future resolves when the broker
    /// confirms; await it (or keep it in a window) before treating the message as sent.
    pub async fn publish_json(
        &self,
        queue: &str,
        body: &[u8],
        message_id: Option<&str>,
    ) -> lapin::Result<Confirm> {
        self.publish_to("", queue, body, message_id, None).await
    }

    /// Publishes a persistent JSON `body` to the fanout exchange of the stream `queue`
    /// ([`fanout_exchange`]): to `queue` and to every other queue bound there (the trainer's
    /// copy). Confirmed once every bound queue has it; returned as unroutable (not confirmed)
    /// when nothing is bound, so declare the topology first. Counted under `queue`.
    pub async fn publish_fanout(
        &self,
        queue: &str,
        body: &[u8],
        message_id: Option<&str>,
    ) -> lapin::Result<Confirm> {
        self.publish_to(&fanout_exchange(queue), queue, body, message_id, None)
            .await
    }

    /// [`Self::publish_fanout`] with AMQP headers (the producer's announced feature names).
    pub async fn publish_fanout_with(
        &self,
        queue: &str,
        body: &[u8],
        message_id: Option<&str>,
        headers: &FieldTable,
    ) -> lapin::Result<Confirm> {
        self.publish_to(
            &fanout_exchange(queue),
            queue,
            body,
            message_id,
            Some(headers),
        )
        .await
    }

    async fn publish_to(
        &self,
        exchange: &str,
        queue: &str,
        body: &[u8],
        message_id: Option<&str>,
        headers: Option<&FieldTable>,
    ) -> lapin::Result<Confirm> {
        let mut properties = json_properties(message_id).with_app_id(self.app_id.clone());
        if let Some(headers) = headers {
            properties = properties.with_headers(headers.clone());
        }
        let inner = self
            .channel
            .basic_publish(
                exchange.into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?;
        Ok(self.confirm(inner, queue))
    }

    /// Publishes `message` (mandatory, persistent); the consume loop keeps it beside the returned
    /// confirm, to publish it again if the broker refuses it.
    pub async fn send(&self, message: &Outgoing) -> lapin::Result<Confirm> {
        let inner = self
            .channel
            .basic_publish(
                message.exchange.clone(),
                message.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                match &message.properties {
                    Properties::Json { message_id } => {
                        json_properties(message_id.as_ref().map(ShortString::as_str))
                            .with_app_id(self.app_id.clone())
                    }
                    // A dead-letter copy keeps the app_id of whoever sent the original.
                    Properties::Copy(properties) => (**properties).clone(),
                },
            )
            .await?;
        Ok(self.confirm(inner, &message.counted_under))
    }

    fn confirm(&self, inner: PublisherConfirm, queue: &str) -> Confirm {
        Confirm {
            inner,
            published: self.metrics.published(queue),
            sent: Instant::now(),
            confirm_seconds: self.metrics.confirm_seconds(queue),
        }
    }
}

/// The properties of a persistent JSON message.
fn json_properties(message_id: Option<&str>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT);
    match message_id {
        Some(id) => properties.with_message_id(id.into()),
        None => properties,
    }
}

/// A message a handler asks the consume loop to publish for a delivery
/// ([`super::Disposition::Publish`]). Kept until the broker confirms it, so that a refused one
/// can be published again ([`super::refusal`]).
#[derive(Clone, Debug)]
pub struct Outgoing {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: Properties,
    /// The queue whose `published` counter and confirm histogram count it.
    counted_under: String,
}

/// An outgoing message's properties: a JSON message's are made when it is sent; a copy keeps the
/// original's (boxed: they are large, and copies are rare).
#[derive(Clone, Debug)]
enum Properties {
    Json { message_id: Option<ShortString> },
    Copy(Box<BasicProperties>),
}

impl Outgoing {
    /// A persistent JSON `body` for `queue`, through the default exchange.
    pub fn json(queue: &str, body: &[u8], message_id: Option<&str>) -> Self {
        Self {
            exchange: "".into(),
            routing_key: queue.into(),
            body: body.to_vec(),
            properties: Properties::Json {
                message_id: message_id.map(ShortString::from),
            },
            counted_under: queue.to_owned(),
        }
    }

    /// A copy of `delivery` for the dead-letter queue of `source_queue`, with headers naming the
    /// reason. The original is acked once this is confirmed.
    pub fn dead_letter(delivery: &Delivery, source_queue: &str, error: &MessageError) -> Self {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(error.reason().into()),
        );
        headers.insert(
            DETAIL_HEADER.into(),
            AMQPValue::LongString(error.to_string().into()),
        );
        headers.insert(
            SOURCE_HEADER.into(),
            AMQPValue::LongString(source_queue.into()),
        );
        let dlq = dead_letter_queue(source_queue);
        Self {
            exchange: DEAD_LETTER_EXCHANGE.into(),
            routing_key: dlq.as_str().into(),
            body: delivery.data.clone(),
            properties: Properties::Copy(Box::new(
                delivery
                    .properties
                    .clone()
                    .with_headers(headers)
                    .with_delivery_mode(PERSISTENT),
            )),
            counted_under: dlq,
        }
    }
}

/// Reads a string header of a message (for tests and tools).
pub fn header_str<'a>(headers: &'a FieldTable, name: &str) -> Option<&'a str> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str()),
        _ => None,
    }
}
