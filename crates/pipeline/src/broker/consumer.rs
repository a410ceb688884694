//! The one consume loop every consuming service runs.
//!
//! The handler's side of it (what a service implements, and the rules for its errors) is
//! [`super::handler`]. Per connection it declares the topology, opens one consume channel per input queue (delivery
//! tags are per channel, so each channel's acks can go out in its own delivery order) with
//! `basic.qos`, and a confirm-mode publish channel, then `select!`s between shutdown, the next
//! delivery and the oldest pending publisher confirm of each input. A delivery is acked only after
//! its work is safe: after the handler's output is flushed ([`Disposition::Ack`]) or the broker
//! confirmed the message the loop published for it ([`Disposition::Publish`]). Acks go out in
//! delivery order with `multiple`, so a batch costs one frame. A message that cannot be processed
//! is copied to its dead-letter queue with the reason in a header, then acked
//! ([`Disposition::DeadLetter`]). No input is ever given back to its queue: a message the broker
//! refuses is held and published again ([`super::refusal`]), so `x-delivery-limit` counts only
//! inputs whose processing failed.
//!
//! Which deliveries may be acked is decided by one [`AckWindow`] per channel (plain data). When
//! the handler's flush fails with a [`LocalFault`] (its own disk), the loop pauses instead of
//! reconnecting: it takes no deliveries and retries the flush with backoff.
//!
//! On connection loss the in-flight deliveries are forgotten (the broker redelivers them), and the
//! [`supervise`] loop reconnects with backoff. On shutdown it cancels its consumers, waits (up to
//! [`DRAIN_TIMEOUT`]) for pending confirms, flushes, acks, and closes the connection.

use super::connection::Broker;
use super::error::HandlerError;
use super::flow::Deliveries;
use super::handler::{FlushVerdict, on_flush_error, on_handle_error};
use super::publisher::{Confirm, Outgoing, Publisher, is_confirmed};
use super::refusal::{Held, Refusals, Refused};
use super::retry::{Backoff, LOCAL_FAULT_RETRY, Step};
use super::supervisor::{SessionEnd, close, drop_detached, supervise};
use super::topology::Topology;
use super::window::{AckWindow, Pending};
use crate::config::ConsumeConfig;
use crate::messages::MessageError;
use crate::metrics::QueueCounters;
use futures_util::FutureExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use super::handler::{Disposition, MessageHandler, message_id};

/// Longest wait for in-flight work at shutdown, well inside compose's 10 s stop timeout.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`MessageHandler::tick`] runs.
const TICK: Duration = Duration::from_millis(500);

/// One input queue of a session: its channel, consumer, the ack window of its deliveries and the
/// messages published for them whose confirms they wait for, oldest first.
struct Input {
    queue: String,
    channel: Channel,
    consumer_tag: String,
    counters: QueueCounters,
    window: AckWindow,
    confirms: VecDeque<Sent>,
}

/// A message published for delivery `tag`, kept until the broker answers.
struct Sent {
    tag: u64,
    confirm: Confirm,
    message: Outgoing,
    /// Published again after a refusal ([`Refusals`] counts those).
    resent: bool,
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

/// Runs the consume loop until `shutdown`, reconnecting as often as needed (through the
/// [`supervise`] rules). Returns `Err` only for errors no retry can fix.
pub async fn run_consumer<H: MessageHandler>(
    broker: &mut Broker,
    spec: &ConsumerSpec<'_>,
    handler: &mut H,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    supervise(
        broker,
        shutdown,
        async |connection: &Connection, broker: &mut Broker| {
            let mut session = Session {
                connection,
                spec,
                broker,
                inputs: Vec::new(),
                refusals: Refusals::default(),
            };
            let (end, leftovers) = session.run(handler, shutdown).await;
            // Close first, then drop the consumers and channels off the runtime: dropping them
            // while lapin tears down a failed connection can deadlock (see `supervisor`).
            close(connection).await;
            drop_detached((session.inputs, leftovers));
            end
        },
    )
    .await?;
    // Stopped before or between sessions: whatever was handled is written out.
    handler.flush().await.map_err(HandlerError::into_anyhow)
}

/// What a session leaves behind for [`drop_detached`].
type Leftovers = Option<(Publisher, Box<dyn Send>)>;

struct Session<'a> {
    connection: &'a Connection,
    spec: &'a ConsumerSpec<'a>,
    broker: &'a mut Broker,
    inputs: Vec<Input>,
    /// Messages the broker refused, held (their deliveries unacked) to be published again.
    refusals: Refusals<Outgoing>,
}

impl Session<'_> {
    async fn run<H: MessageHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
    ) -> (SessionEnd, Leftovers) {
        let mut publisher = match self.open_publisher().await {
            Ok(publisher) => publisher,
            Err(err) => return (SessionEnd::failed(Step::Declare, err), None),
        };
        if let Err(err) = self.spec.topology.declare(publisher.channel()).await {
            return (
                SessionEnd::failed(Step::Declare, err),
                Some((publisher, Box::new(()))),
            );
        }
        let mut streams = Vec::new();
        for queue in self.spec.inputs {
            match self.open_input(queue).await {
                Ok((input, consumer)) => {
                    self.inputs.push(input);
                    streams.push(consumer);
                }
                Err(end) => return (end, Some((publisher, Box::new(streams)))),
            }
        }
        let mut deliveries = Deliveries { streams, start: 0 };
        let end = self
            .consume(handler, shutdown, &mut publisher, &mut deliveries)
            .await;
        (end, Some((publisher, Box::new(deliveries))))
    }

    async fn consume<H: MessageHandler, S>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
        publisher: &mut Publisher,
        deliveries: &mut Deliveries<S>,
    ) -> SessionEnd
    where
        S: futures_util::Stream<Item = lapin::Result<Delivery>> + Unpin,
    {
        let lost = |err| SessionEnd::failed(Step::Run, err);
        self.broker.health.set_healthy();
        tracing::info!(queues = ?self.spec.inputs, prefetch = self.spec.consume.prefetch, "consuming");

        let mut tick = tokio::time::interval(TICK);
        let batch_limit = usize::from(self.spec.consume.prefetch);
        loop {
            // While the broker refuses our messages, take no new input: what is held is enough.
            let open = if self.refusals.holding() {
                vec![false; self.inputs.len()]
            } else {
                deliveries.open(handler)
            };
            let resend_at = self.refusals.due().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                (index, confirmation) = front_confirm(&mut self.inputs) => {
                    if let Err(end) = self.resolve_front(index, confirmation) {
                        return end;
                    }
                    if let Err(end) = self.settle(handler, shutdown).await {
                        return end;
                    }
                }
                _ = sleep_until(resend_at), if resend_at.is_some() => {
                    if let Err(end) = self.resend(publisher).await {
                        return end;
                    }
                }
                next = deliveries.next(&open) => {
                    // Take every delivery already here (up to the prefetch), then settle the batch
                    // with one flush and one ack per channel. Never pull a delivery without
                    // handling it: a later ack with `multiple` would ack it too.
                    let mut next = Some(next);
                    let mut taken = 0;
                    while let Some(item) = next.take() {
                        match item {
                            Some((index, Ok(delivery))) => {
                                if let Err(end) = self.accept(index, delivery, handler, publisher).await {
                                    return end;
                                }
                            }
                            Some((_, Err(err))) => return lost(HandlerError::from(err)),
                            None => return lost(anyhow::anyhow!("the broker cancelled the consumer").into()),
                        }
                        taken += 1;
                        if taken < batch_limit && !self.refusals.holding() {
                            let open = deliveries.open(handler);
                            next = deliveries.next(&open).now_or_never();
                        }
                    }
                    if let Err(end) = self.settle(handler, shutdown).await {
                        return end;
                    }
                }
                _ = tick.tick() => {
                    if let Err(err) = handler.tick().await {
                        return lost(err);
                    }
                }
            }
        }
        let end = self.drain(handler, shutdown).await;
        publisher.close().await;
        end
    }

    /// Opens the channel and consumer of one input queue.
    async fn open_input(&self, queue: &str) -> Result<(Input, lapin::Consumer), SessionEnd> {
        let declare = |err| SessionEnd::failed(Step::Declare, err);
        let channel = self.connection.create_channel().await.map_err(declare)?;
        channel
            .basic_qos(self.spec.consume.prefetch, BasicQosOptions::default())
            .await
            .map_err(declare)?;
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
            .await
            .map_err(|err| SessionEnd::failed(Step::Consume, err))?;
        let input = Input {
            queue: queue.to_owned(),
            channel,
            consumer_tag,
            counters: self.broker.metrics.queue(queue),
            window: AckWindow::new(),
            confirms: VecDeque::new(),
        };
        Ok((input, consumer))
    }

    /// Opens a confirm-mode publish channel.
    async fn open_publisher(&self) -> lapin::Result<Publisher> {
        Publisher::open(
            self.connection,
            self.spec.service,
            self.broker.metrics.clone(),
        )
        .await
    }

    /// Hands one delivery to the handler and records what to do with it.
    async fn accept<H: MessageHandler>(
        &mut self,
        index: usize,
        delivery: Delivery,
        handler: &mut H,
        publisher: &Publisher,
    ) -> Result<(), SessionEnd> {
        let lost = |err| SessionEnd::failed(Step::Run, err);
        let started = Instant::now();
        self.inputs[index].counters.consumed.inc();
        let limit = self.spec.consume.max_message_bytes;
        let disposition = if delivery.data.len() > limit {
            Disposition::DeadLetter(MessageError::TooLarge {
                size: delivery.data.len(),
                limit,
            })
        } else {
            match handler.handle(index, &delivery).await {
                Ok(disposition) => disposition,
                Err(err) => on_handle_error(err).map_err(lost)?,
            }
        };
        let input = &mut self.inputs[index];
        let tag = delivery.delivery_tag;
        match disposition {
            Disposition::Ack => input.window.push(tag, Pending::Flush),
            Disposition::Publish(message) => {
                input.window.push(tag, Pending::Confirm);
                self.publish(index, tag, message, false, publisher).await?;
            }
            Disposition::DeadLetter(error) => {
                let id = message_id(&delivery)
                    .map(str::to_owned)
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
                let message = Outgoing::dead_letter(&delivery, &input.queue, &error);
                input.window.push(tag, Pending::Confirm);
                self.publish(index, tag, message, false, publisher).await?;
            }
        }
        self.inputs[index]
            .counters
            .processing_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Publishes the message of delivery `tag` of input `index` and keeps it until the broker
    /// answers. A publish that fails while the connection stays up (the broker closed the publish
    /// channel) is a refusal like a nack: everything unanswered is held for a new channel.
    async fn publish(
        &mut self,
        index: usize,
        tag: u64,
        message: Outgoing,
        resent: bool,
        publisher: &Publisher,
    ) -> Result<(), SessionEnd> {
        match publisher.send(&message).await {
            Ok(confirm) => {
                self.inputs[index].confirms.push_back(Sent {
                    tag,
                    confirm,
                    message,
                    resent,
                });
                Ok(())
            }
            Err(err) if self.connection.status().connected() => {
                self.channel_lost(
                    &err,
                    Held {
                        input: index,
                        tag,
                        message,
                    },
                    resent,
                );
                Ok(())
            }
            Err(err) => Err(SessionEnd::failed(Step::Run, err)),
        }
    }

    /// The publish channel failed under a live connection: hold `held` and every message still
    /// unanswered on it; the next round opens a new channel.
    fn channel_lost(&mut self, err: &lapin::Error, held: Held<Outgoing>, resent: bool) {
        let (mut unanswered, mut resent_count) = self.take_unanswered();
        resent_count += usize::from(resent);
        unanswered.push(held);
        if self.refusals.episode().is_none() {
            self.episode_started(&format!("the publish channel failed: {err}"));
        }
        self.refusals
            .hold(unanswered, resent_count, std::time::Instant::now());
    }

    /// Every message published and not answered yet, with how many of them were published again.
    fn take_unanswered(&mut self) -> (Vec<Held<Outgoing>>, usize) {
        let mut resent = 0;
        let mut held = Vec::new();
        for (index, input) in self.inputs.iter_mut().enumerate() {
            for sent in input.confirms.drain(..) {
                resent += usize::from(sent.resent);
                held.push(Held {
                    input: index,
                    tag: sent.tag,
                    message: sent.message,
                });
            }
        }
        (held, resent)
    }

    /// Publishes the held messages again when their round is due, on a new channel when the round
    /// says so (the messages the old one had not answered go again too).
    async fn resend(&mut self, publisher: &mut Publisher) -> Result<(), SessionEnd> {
        let now = std::time::Instant::now();
        if self.refusals.round_due(now) == Some(true) {
            let fresh = self
                .open_publisher()
                .await
                .map_err(|err| SessionEnd::failed(Step::Run, err))?;
            let stale = std::mem::replace(publisher, fresh);
            // Closed in the background: a channel to a stuck queue may be slow to close.
            tokio::spawn(async move { stale.close().await });
            let (unanswered, resent) = self.take_unanswered();
            self.refusals.hold(unanswered, resent, now);
            tracing::info!("opened a new publish channel for the messages the broker refused");
        }
        let Some(round) = self.refusals.take_round(now) else {
            return Ok(());
        };
        for held in round.messages {
            self.publish(held.input, held.tag, held.message, true, publisher)
                .await?;
        }
        Ok(())
    }

    /// The first refusal of an episode: one WARN, and `/healthz` says so until it ends.
    fn episode_started(&self, cause: &str) {
        tracing::warn!(
            cause,
            "the broker refuses our messages; holding their inputs (unacked, never requeued) and \
             publishing again with backoff until it takes them"
        );
        self.broker.health.set_problem(
            "publish_refused",
            Some(format!(
                "the broker refuses this service's messages ({cause}); holding the inputs and \
                 retrying"
            )),
        );
    }

    /// What the broker answered to a message published for input `index`.
    fn answered(
        &mut self,
        index: usize,
        sent: Sent,
        confirmation: lapin::Result<Confirmation>,
    ) -> Result<(), SessionEnd> {
        let now = std::time::Instant::now();
        match confirmation {
            Ok(confirmation) if is_confirmed(&confirmation) => {
                self.inputs[index].window.confirmed(sent.tag);
                if let Some(episode) = self.refusals.confirmed(sent.resent) {
                    tracing::info!(
                        refused = episode.refused,
                        rounds = episode.rounds,
                        new_channels = episode.reopened,
                        lasted_ms = episode.started.elapsed().as_millis() as u64,
                        "the broker takes our messages again; every held input is done"
                    );
                    self.broker.health.set_problem("publish_refused", None);
                }
            }
            Ok(confirmation) => {
                let refused =
                    self.refusals
                        .refused(index, sent.tag, sent.message, sent.resent, now);
                if refused == Refused::EpisodeStarted {
                    self.episode_started(&format!("{confirmation:?}"));
                }
            }
            Err(err) if self.connection.status().connected() => {
                let held = Held {
                    input: index,
                    tag: sent.tag,
                    message: sent.message,
                };
                self.channel_lost(&err, held, sent.resent);
            }
            Err(err) => return Err(SessionEnd::failed(Step::Run, err)),
        }
        Ok(())
    }

    /// Records the confirm that [`front_confirm`] resolved for input `index`.
    fn resolve_front(
        &mut self,
        index: usize,
        confirmation: lapin::Result<Confirmation>,
    ) -> Result<(), SessionEnd> {
        match self.inputs[index].confirms.pop_front() {
            Some(sent) => self.answered(index, sent, confirmation),
            None => Ok(()),
        }
    }

    /// Takes the confirms that are already in, flushes the handler if a delivery waits for it,
    /// and sends what the ack windows say (acks with `multiple`, nacks), in delivery order.
    async fn settle<H: MessageHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let lost = |err: lapin::Error| SessionEnd::failed(Step::Run, err);
        for index in 0..self.inputs.len() {
            while let Some(sent) = self.inputs[index].confirms.front_mut() {
                let Some(result) = (&mut sent.confirm).now_or_never() else {
                    break;
                };
                self.resolve_front(index, result)?;
            }
        }
        if self.inputs.iter().any(|input| input.window.needs_flush())
            && self.flush(handler, shutdown).await?
        {
            for input in &mut self.inputs {
                input.window.flushed();
            }
        }
        for input in &mut self.inputs {
            if let Some(ack) = input.window.take_settled() {
                input
                    .channel
                    .basic_ack(ack.upto, BasicAckOptions { multiple: true })
                    .await
                    .map_err(lost)?;
                input.counters.acked.inc_by(ack.count as u64);
            }
        }
        Ok(())
    }

    /// Flushes the handler. On a [`HandlerError::LocalFault`] it pauses: no deliveries are taken (the unacked
    /// ones stay with us, the broker holds the rest), the connection stays, `/healthz` and
    /// `pipeline_local_fault` show it, and the flush is retried with backoff until it works
    /// (`Ok(true)`) or shutdown comes (`Ok(false)`: nothing more is acked). Other errors drop the
    /// connection.
    async fn flush<H: MessageHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
    ) -> Result<bool, SessionEnd> {
        let mut err = match handler.flush().await {
            Ok(()) => return Ok(true),
            Err(err) => err,
        };
        let mut backoff = Backoff::new(LOCAL_FAULT_RETRY.0, LOCAL_FAULT_RETRY.1);
        let health = self.broker.health.clone();
        let gauge = self.broker.metrics.local_fault.clone();
        loop {
            if on_flush_error(&err) == FlushVerdict::Reconnect {
                return Err(SessionEnd::failed(Step::Run, err));
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                error = %err.report(),
                unacked = self.unsettled(),
                retry_in_ms = delay.as_millis() as u64,
                "cannot write this service's own files; not taking messages until it can (the broker keeps them)"
            );
            health.set_problem(
                "local_fault",
                Some(format!(
                    "{}: consuming paused until the files can be written",
                    err.report()
                )),
            );
            gauge.set(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(false),
            }
            err = match handler.flush().await {
                Ok(()) => {
                    tracing::info!("this service's files can be written again; consuming resumes");
                    health.set_problem("local_fault", None);
                    gauge.set(0);
                    return Ok(true);
                }
                Err(err) => err,
            };
        }
    }

    fn unsettled(&self) -> usize {
        self.inputs.iter().map(|input| input.window.len()).sum()
    }

    /// Shutdown: stop new deliveries, finish and ack what is in flight, flush.
    async fn drain<H: MessageHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
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
                self.settle(handler, shutdown).await?;
                if self.inputs.iter().all(|input| input.confirms.is_empty()) {
                    break;
                }
                match tokio::time::timeout_at(deadline, front_confirm(&mut self.inputs)).await {
                    Ok((index, confirmation)) => self.resolve_front(index, confirmation)?,
                    Err(_) => break,
                }
            }
            handler
                .flush()
                .await
                .map_err(|err| SessionEnd::failed(Step::Run, err))
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
            Ok(()) => tracing::info!("consumer drained"),
            Err(SessionEnd::Failed { error, .. }) => {
                tracing::warn!(error = %error.report(), "could not finish all in-flight work at shutdown");
            }
            Err(SessionEnd::Finished) => {}
        }
        SessionEnd::Finished
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for the oldest pending confirm of any input, or forever when none waits for one.
fn front_confirm(
    inputs: &mut [Input],
) -> impl Future<Output = (usize, lapin::Result<Confirmation>)> + '_ {
    std::future::poll_fn(move |cx| {
        for (index, input) in inputs.iter_mut().enumerate() {
            if let Some(sent) = input.confirms.front_mut()
                && let Poll::Ready(result) = Pin::new(&mut sent.confirm).poll(cx)
            {
                return Poll::Ready((index, result));
            }
        }
        Poll::Pending
    })
}
