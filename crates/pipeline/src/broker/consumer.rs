//! The one consume loop every consuming service runs.
//!
//! Per connection it declares the topology, opens one consume channel per input queue (delivery
//! tags are per channel, so each channel's acks can go out in its own delivery order) with
//! `basic.qos`, and a confirm-mode publish channel, then `select!`s between shutdown, the next
//! delivery and the oldest pending publisher confirm of each input. A delivery is acked only after its work is safe: after the
//! handler's output is flushed ([`Disposition::Ack`]) or the broker confirmed the message it caused
//! ([`Disposition::AckOnConfirm`]). Acks go out in delivery order with `multiple`, so a batch costs
//! one frame. A message that cannot be processed is copied to its dead-letter queue with the reason
//! in a header, then acked ([`Disposition::DeadLetter`]).
//!
//! On connection loss the in-flight deliveries are forgotten (the broker redelivers them), and the
//! loop reconnects with backoff. On shutdown it cancels its consumers, waits (up to
//! [`DRAIN_TIMEOUT`]) for pending confirms, flushes, acks, and closes the connection.

use super::connection::{Broker, is_fatal};
use super::publisher::{Confirm, Publisher, is_confirmed};
use super::topology::Topology;
use crate::config::ConsumeConfig;
use crate::messages::MessageError;
use crate::metrics::QueueCounters;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for in-flight work at shutdown, well inside compose's 10 s stop timeout.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`MessageHandler::tick`] runs.
const TICK: Duration = Duration::from_millis(500);

/// What to do with a delivery once the handler has seen it.
pub enum Disposition {
    /// The work is done in the handler's buffers: ack after [`MessageHandler::flush`].
    Ack,
    /// The work is a published message: ack when the broker confirms it.
    AckOnConfirm(Confirm),
    /// The message cannot be processed: send it to its dead-letter queue with this reason.
    DeadLetter(MessageError),
}

/// A failure of the service's own resources (a full or unwritable disk), not of the broker.
///
/// A [`MessageHandler::flush`] error whose chain holds a `LocalFault` does not drop the
/// connection: the consume loop stops taking deliveries, keeps what it holds unacked, reports the
/// fault in `/healthz` and a gauge, and calls `flush` again with backoff until it succeeds. So
/// `flush` must be safe to call again after a failure: it may not leave part of its output behind.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct LocalFault {
    /// What could not be done, for the operator (e.g. `cannot append to logs/labels_log.txt`).
    pub what: String,
    /// The I/O error behind it.
    #[source]
    pub source: std::io::Error,
}

impl LocalFault {
    /// Whether `err` (or any error in its chain) is a local fault.
    pub fn is_in(err: &anyhow::Error) -> bool {
        err.chain().any(|cause| cause.is::<Self>())
    }
}

/// The service-specific part of a consumer.
pub trait MessageHandler: Send {
    /// Processes one delivery from input queue number `input`. An `Err` means the service cannot
    /// work right now (for example a publish failed): the connection is dropped, so the broker
    /// redelivers everything unacked, and the loop reconnects.
    fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
        publisher: &Publisher,
    ) -> impl Future<Output = anyhow::Result<Disposition>> + Send;

    /// Makes everything handled so far durable (written and flushed). Called before any ack.
    fn flush(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Periodic housekeeping, about twice a second.
    fn tick(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// How one session (one connection) ended.
enum SessionEnd {
    /// Shutdown was asked for and the drain finished.
    Shutdown,
    /// The connection or the handler failed: reconnect.
    Lost(anyhow::Error),
    /// An error no retry fixes (for example a second exclusive consumer): stop the service.
    Fatal(anyhow::Error),
}

impl SessionEnd {
    /// An error while setting up (declaring, consuming): fatal when no retry can fix it.
    fn setup(err: lapin::Error) -> Self {
        if is_fatal(&err) {
            Self::Fatal(err.into())
        } else {
            Self::Lost(err.into())
        }
    }

    /// An error while running: always worth a reconnect.
    fn lost(err: impl Into<anyhow::Error>) -> Self {
        Self::Lost(err.into())
    }
}

/// The state of a delivery between receipt and ack.
enum Settle {
    /// Ready to ack once the handler has flushed.
    Ack,
    /// Waiting for a publisher confirm; `on_failure` applies if it is negative.
    Confirm {
        confirm: Confirm,
        on_failure: Outcome,
    },
    /// Decided.
    Done(Outcome),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Ack,
    /// Give it back to the queue (our output was not taken by the broker).
    Requeue,
    /// Reject without requeue: the broker dead-letters it through the queue's arguments.
    Reject,
}

struct InFlight {
    tag: u64,
    settle: Settle,
}

/// One input queue of a session: its channel, consumer and deliveries not yet acked, in delivery
/// order (the channel's tag order, which acks with `multiple` rely on).
struct Input {
    queue: String,
    channel: Channel,
    consumer_tag: String,
    counters: QueueCounters,
    inflight: VecDeque<InFlight>,
}

/// What the consume loop needs besides the handler.
pub struct ConsumerSpec<'a> {
    /// Queues to consume, in the order the handler numbers them.
    pub inputs: &'a [&'a str],
    /// Queues to declare (inputs and outputs).
    pub topology: Topology,
    /// Prefetch and size limit.
    pub consume: ConsumeConfig,
    /// Exclusive consumers: a second instance is refused (the metric service owns its files).
    pub exclusive: bool,
    /// Name shown in the management UI and used in consumer tags.
    pub service: &'a str,
}

/// Runs the consume loop until `shutdown`, reconnecting as often as needed. Returns `Err` only for
/// errors no retry can fix.
pub async fn run_consumer<H: MessageHandler>(
    broker: &mut Broker,
    spec: &ConsumerSpec<'_>,
    handler: &mut H,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let Some(connection) = broker.connect(shutdown).await else {
            handler.flush().await?;
            return Ok(());
        };
        let mut session = Session {
            connection: &connection,
            spec,
            broker,
            inputs: Vec::new(),
            unflushed: false,
        };
        let end = session.run(handler, shutdown).await;
        // The channels go before the connection, so it closes cleanly.
        drop(session);
        match end {
            SessionEnd::Shutdown => {
                close(&connection).await;
                return Ok(());
            }
            SessionEnd::Fatal(err) => {
                close(&connection).await;
                broker.lost(&err.to_string());
                return Err(err.context("the broker refused this consumer"));
            }
            SessionEnd::Lost(err) => {
                tracing::warn!(error = %format!("{err:#}"), "lost the broker connection, reconnecting");
                broker.lost(&err.to_string());
                close(&connection).await;
            }
        }
    }
}

/// Closes a connection, briefly: on a dead one it would only wait.
async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
}

struct Session<'a> {
    connection: &'a Connection,
    spec: &'a ConsumerSpec<'a>,
    broker: &'a mut Broker,
    inputs: Vec<Input>,
    unflushed: bool,
}

impl Session<'_> {
    async fn run<H: MessageHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let publisher = match Publisher::open(
            self.connection,
            self.spec.service,
            self.broker.metrics.clone(),
        )
        .await
        {
            Ok(publisher) => publisher,
            Err(err) => return SessionEnd::setup(err),
        };
        if let Err(err) = self.spec.topology.declare(publisher.channel()).await {
            return SessionEnd::setup(err);
        }
        let mut streams = Vec::new();
        for (index, queue) in self.spec.inputs.iter().enumerate() {
            match self.open_input(queue).await {
                Ok((input, consumer)) => {
                    self.inputs.push(input);
                    streams.push(consumer.map(move |delivery| (index, delivery)));
                }
                Err(err) => return SessionEnd::setup(err),
            }
        }
        let mut deliveries = futures_util::stream::select_all(streams);
        self.broker.health.set_healthy();
        tracing::info!(queues = ?self.spec.inputs, prefetch = self.spec.consume.prefetch, "consuming");

        let mut tick = tokio::time::interval(TICK);
        let batch_limit = usize::from(self.spec.consume.prefetch);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                (index, confirmation) = front_confirm(&mut self.inputs) => {
                    if let Err(end) = self.resolve_front(index, confirmation) {
                        return end;
                    }
                    if let Err(end) = self.settle(handler).await {
                        return end;
                    }
                }
                next = deliveries.next() => {
                    // Take every delivery already here (up to the prefetch), then settle the batch
                    // with one flush and one ack per channel. Never pull a delivery without
                    // handling it: a later ack with `multiple` would ack it too.
                    let mut next = Some(next);
                    let mut taken = 0;
                    while let Some(item) = next.take() {
                        match item {
                            Some((index, Ok(delivery))) => {
                                if let Err(end) = self.accept(index, delivery, handler, &publisher).await {
                                    return end;
                                }
                            }
                            Some((_, Err(err))) => return SessionEnd::lost(err),
                            None => return SessionEnd::lost(anyhow::anyhow!("the broker cancelled the consumer")),
                        }
                        taken += 1;
                        if taken < batch_limit {
                            next = deliveries.next().now_or_never();
                        }
                    }
                    if let Err(end) = self.settle(handler).await {
                        return end;
                    }
                }
                _ = tick.tick() => {
                    if let Err(err) = handler.tick().await {
                        return SessionEnd::Lost(err);
                    }
                }
            }
        }
        let end = self.drain(handler).await;
        publisher.close().await;
        end
    }

    /// Opens the channel and consumer of one input queue.
    async fn open_input(&self, queue: &str) -> lapin::Result<(Input, lapin::Consumer)> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(self.spec.consume.prefetch, BasicQosOptions::default())
            .await?;
        let consumer_tag = format!("{}-{}-{}", self.spec.service, std::process::id(), queue);
        let options = BasicConsumeOptions {
            exclusive: self.spec.exclusive,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.as_str().into(),
                options,
                FieldTable::default(),
            )
            .await?;
        let input = Input {
            queue: queue.to_owned(),
            channel,
            consumer_tag,
            counters: self.broker.metrics.queue(queue),
            inflight: VecDeque::new(),
        };
        Ok((input, consumer))
    }

    /// Hands one delivery to the handler and records what to do with it.
    async fn accept<H: MessageHandler>(
        &mut self,
        index: usize,
        delivery: Delivery,
        handler: &mut H,
        publisher: &Publisher,
    ) -> Result<(), SessionEnd> {
        let started = Instant::now();
        self.inputs[index].counters.consumed.inc();
        let limit = self.spec.consume.max_message_bytes;
        let disposition = if delivery.data.len() > limit {
            Disposition::DeadLetter(MessageError::TooLarge {
                size: delivery.data.len(),
                limit,
            })
        } else {
            handler
                .handle(index, &delivery, publisher)
                .await
                .map_err(SessionEnd::Lost)?
        };
        let input = &mut self.inputs[index];
        let settle = match disposition {
            Disposition::Ack => {
                self.unflushed = true;
                Settle::Ack
            }
            Disposition::AckOnConfirm(confirm) => Settle::Confirm {
                confirm,
                on_failure: Outcome::Requeue,
            },
            Disposition::DeadLetter(error) => {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .or_else(|| crate::messages::body_id(&delivery.data));
                tracing::warn!(
                    queue = %input.queue,
                    id = id.as_deref().unwrap_or("-"),
                    reason = error.reason(),
                    error = %error,
                    "dead-lettering a message that cannot be processed"
                );
                self.broker
                    .metrics
                    .dead_lettered(&input.queue, error.reason());
                let confirm = publisher
                    .dead_letter(&delivery, &input.queue, &error)
                    .await
                    .map_err(SessionEnd::lost)?;
                Settle::Confirm {
                    confirm,
                    on_failure: Outcome::Reject,
                }
            }
        };
        input
            .counters
            .processing_seconds
            .observe(started.elapsed().as_secs_f64());
        input.inflight.push_back(InFlight {
            tag: delivery.delivery_tag,
            settle,
        });
        Ok(())
    }

    /// Records the confirm that [`front_confirm`] resolved for input `index`.
    fn resolve_front(
        &mut self,
        index: usize,
        confirmation: lapin::Result<Confirmation>,
    ) -> Result<(), SessionEnd> {
        let confirmation = confirmation.map_err(SessionEnd::lost)?;
        if let Some(front) = self.inputs[index].inflight.front_mut()
            && let Settle::Confirm { on_failure, .. } = front.settle
        {
            front.settle = Settle::Done(if is_confirmed(&confirmation) {
                Outcome::Ack
            } else {
                tracing::warn!(
                    ?confirmation,
                    "the broker did not take a published message; the input goes back to its queue"
                );
                on_failure
            });
        }
        Ok(())
    }

    /// On every input channel, acks (with `multiple`), requeues or rejects the deliveries at the
    /// front whose fate is known, in delivery order, flushing the handler before the first ack.
    async fn settle<H: MessageHandler>(&mut self, handler: &mut H) -> Result<(), SessionEnd> {
        for input in &mut self.inputs {
            let mut ack_upto: Option<u64> = None;
            while let Some(front) = input.inflight.front_mut() {
                let outcome = match &mut front.settle {
                    Settle::Ack => Outcome::Ack,
                    Settle::Done(outcome) => *outcome,
                    Settle::Confirm {
                        confirm,
                        on_failure,
                    } => match confirm.now_or_never() {
                        None => break,
                        Some(Ok(confirmation)) if is_confirmed(&confirmation) => Outcome::Ack,
                        Some(Ok(_)) => *on_failure,
                        Some(Err(err)) => return Err(SessionEnd::lost(err)),
                    },
                };
                if outcome == Outcome::Ack && self.unflushed {
                    handler.flush().await.map_err(SessionEnd::Lost)?;
                    self.unflushed = false;
                }
                let Some(done) = input.inflight.pop_front() else {
                    break;
                };
                if outcome == Outcome::Ack {
                    ack_upto = Some(done.tag);
                    input.counters.acked.inc();
                    continue;
                }
                if let Some(tag) = ack_upto.take() {
                    input
                        .channel
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await
                        .map_err(SessionEnd::lost)?;
                }
                input
                    .channel
                    .basic_nack(
                        done.tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: outcome == Outcome::Requeue,
                        },
                    )
                    .await
                    .map_err(SessionEnd::lost)?;
            }
            if let Some(tag) = ack_upto {
                input
                    .channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(SessionEnd::lost)?;
            }
        }
        Ok(())
    }

    fn unsettled(&self) -> usize {
        self.inputs.iter().map(|input| input.inflight.len()).sum()
    }

    /// Shutdown: stop new deliveries, finish and ack what is in flight, flush.
    async fn drain<H: MessageHandler>(&mut self, handler: &mut H) -> SessionEnd {
        self.broker.health.set_unhealthy("shutting down");
        for input in &self.inputs {
            let _ = input
                .channel
                .basic_cancel(
                    input.consumer_tag.as_str().into(),
                    BasicCancelOptions::default(),
                )
                .await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let result: Result<(), SessionEnd> = async {
            loop {
                self.settle(handler).await?;
                if self.unsettled() == 0 {
                    break;
                }
                match tokio::time::timeout_at(deadline, front_confirm(&mut self.inputs)).await {
                    Ok((index, confirmation)) => self.resolve_front(index, confirmation)?,
                    Err(_) => break,
                }
            }
            handler.flush().await.map_err(SessionEnd::Lost)
        }
        .await;
        if self.unsettled() > 0 {
            tracing::warn!(
                unacked = self.unsettled(),
                "stopping with unacked messages; the broker will deliver them again"
            );
        }
        for input in &self.inputs {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                input.channel.close(200, "shutdown".into()),
            )
            .await;
        }
        match result {
            Ok(()) => {
                tracing::info!("consumer drained");
                SessionEnd::Shutdown
            }
            Err(SessionEnd::Lost(err)) | Err(SessionEnd::Fatal(err)) => {
                tracing::warn!(error = %format!("{err:#}"), "could not finish all in-flight work at shutdown");
                SessionEnd::Shutdown
            }
            Err(SessionEnd::Shutdown) => SessionEnd::Shutdown,
        }
    }
}

/// Waits for the confirm at the front of any input (the oldest in-flight delivery of that
/// channel), or forever when none waits for one.
fn front_confirm(
    inputs: &mut [Input],
) -> impl Future<Output = (usize, lapin::Result<Confirmation>)> + '_ {
    std::future::poll_fn(move |cx| {
        for (index, input) in inputs.iter_mut().enumerate() {
            if let Some(InFlight {
                settle: Settle::Confirm { confirm, .. },
                ..
            }) = input.inflight.front_mut()
                && let Poll::Ready(result) = Pin::new(confirm).poll(cx)
            {
                return Poll::Ready((index, result));
            }
        }
        Poll::Pending
    })
}
