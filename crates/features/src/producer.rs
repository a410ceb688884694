//! The publishing loop: one broker session after another (through the shared supervisor), each
//! publishing samples through the confirm window, settling confirms, and handing what was not
//! confirmed to the next session.

use crate::audit::AuditOut;
use crate::config::Config;
use crate::drift;
use crate::pacer::Pacer;
use crate::sampler::Sampler;
use anyhow::Context as _;
use lapin::Confirmation;
use lapin::types::FieldTable;
use pipeline::CancellationToken;
use pipeline::broker::consumer::DRAIN_TIMEOUT;
use pipeline::broker::publisher::{Confirm, record_confirms};
use pipeline::broker::refusal::RESEND_DELAY;
use pipeline::broker::supervise;
use pipeline::broker::supervisor::drop_detached;
use pipeline::broker::window::{ConfirmWindow, Published};
use pipeline::broker::{Backoff, Broker, Publisher, SessionEnd, Step, Stream, Topology};
use pipeline::config::QueueNames;
use pipeline::dataset::Dataset;
use pipeline::messages::{BodyFormat, now_us, write_features, write_y_true};
use pipeline::partition::Router;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// How long a stop request lets a publish under way finish (it is only waiting for a free frame
/// buffer, unless the broker blocks publishers).
pub(crate) const PUBLISH_GRACE: Duration = Duration::from_secs(1);

/// One sample: a row and the id its two messages share.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) id: String,
    pub(crate) row: usize,
    /// Position in the stream (from 0), so a republished sample is shifted as it was first.
    pub(crate) number: u64,
    /// The audit window of its first send (0 with the audit off).
    pub(crate) window: u64,
}

pub(crate) struct Producer {
    pub(crate) config: Config,
    pub(crate) data: Dataset,
    pub(crate) sampler: Sampler,
    pub(crate) pacer: Pacer,
    /// Samples to publish again (not confirmed before a connection loss or nacked).
    pub(crate) retry: VecDeque<Sample>,
    pub(crate) generated: u64,
    pub(crate) confirmed: u64,
    /// The last drain gave up waiting for confirms.
    pub(crate) drain_timed_out: bool,
    pub(crate) body: Vec<u8>,
    /// Simulated drift (`DRIFT_SHIFT`), applied where a sample's features are written.
    pub(crate) drift: drift::Drift,
    /// A shifted copy of the row being written.
    pub(crate) drifted_row: Vec<f64>,
    /// The partition queues of `features` and `y_true` (one each with `PARTITIONS=1`).
    pub(crate) routes: Routes,
    /// The loss audit (`AUDIT_WINDOW_SECS`); `None` when off.
    pub(crate) audit: Option<AuditOut>,
    /// The broker refusing samples (nacks): one WARN per episode and a pause before each retry.
    pub(crate) refusals: RefusalPause,
    /// The CSV's feature names, announced on every features message (native format only) so a
    /// model checks them ([`pipeline::schema`]); the body stays as it is.
    pub(crate) feature_names: Option<FieldTable>,
}

/// The AMQP headers that announce `names` ([`pipeline::schema::FEATURE_NAMES_HEADER`]).
pub(crate) fn feature_names_headers(names: &[String]) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        pipeline::schema::FEATURE_NAMES_HEADER.into(),
        lapin::types::AMQPValue::LongString(names.join(",").into()),
    );
    headers
}

/// The producer's side of a refusal episode ([`pipeline::broker::refusal`] has the consume loop's):
/// refused samples are owed, not lost, but sending them again at once only feeds a broker that
/// refuses (a quorum queue without a leader) a busy loop and the log a line per sample.
#[derive(Debug)]
pub(crate) struct RefusalPause {
    backoff: Backoff,
    /// When the first refusal of the episode came, and how many came since.
    episode: Option<(Instant, u64)>,
    /// Retried samples wait until then.
    resume_at: Option<Instant>,
}

impl Default for RefusalPause {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(RESEND_DELAY.0, RESEND_DELAY.1),
            episode: None,
            resume_at: None,
        }
    }
}

impl RefusalPause {
    /// A sample was refused; true for the first refusal of an episode.
    fn refused(&mut self, now: Instant) -> bool {
        if self.resume_at.is_none() {
            self.resume_at = Some(now + self.backoff.next_delay());
        }
        match &mut self.episode {
            Some((_, count)) => {
                *count += 1;
                false
            }
            None => {
                self.episode = Some((now, 1));
                true
            }
        }
    }

    /// A sample was confirmed while nothing is owed: the episode, if one was under way, ends.
    fn ended(&mut self) -> Option<(Instant, u64)> {
        self.backoff.reset();
        self.episode.take()
    }

    /// Takes the pause before the next retried sample, if one is due.
    fn pause(&mut self) -> Option<Instant> {
        self.resume_at.take()
    }
}

/// Where a sample's two messages go: the partition of its id, in both streams.
#[derive(Clone, Debug)]
pub(crate) struct Routes {
    pub(crate) features: Router,
    pub(crate) y_true: Router,
}

impl Routes {
    pub(crate) fn new(queues: &QueueNames) -> Self {
        Self {
            features: Router::new(&queues.features_queue, queues.partitions),
            y_true: Router::new(&queues.y_true_queue, queues.partitions),
        }
    }
}

/// Publisher confirms not yet answered, oldest first, with the window sequence of their sample.
/// (Generic so the tests can stand in for the broker's confirms.)
pub(crate) type Confirms<C = Confirm> = VecDeque<(u64, C)>;

/// What waiting for room in a full confirm window ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Room {
    /// The oldest confirm came in (and every other already in is recorded).
    Made,
    /// A stop request came first.
    Stopping,
}

impl Producer {
    pub(crate) fn finished(&self) -> bool {
        self.config.count > 0 && self.confirmed >= self.config.count
    }

    pub(crate) async fn run(
        &mut self,
        broker: &mut Broker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let result = supervise(
            broker,
            shutdown,
            async |connection: &lapin::Connection, broker: &mut Broker| {
                self.session(connection, broker, shutdown).await
            },
        )
        .await;
        broker.health.set_unhealthy(if self.finished() {
            "finished: all COUNT samples confirmed"
        } else {
            "stopped"
        });
        result?;
        if !self.retry.is_empty() {
            tracing::warn!(
                unconfirmed = self.retry.len(),
                "stopping with samples the broker never confirmed"
            );
        }
        if self.drain_timed_out && self.config.count > 0 && !self.finished() {
            let err = anyhow::anyhow!(
                "stopped with {} of COUNT={} samples confirmed: the broker did not confirm the rest \
                 within {} s",
                self.confirmed,
                self.config.count,
                DRAIN_TIMEOUT.as_secs()
            );
            tracing::error!(error = %err, "producer failed");
            return Err(err);
        }
        tracing::info!(confirmed = self.confirmed, "producer stopped");
        Ok(())
    }

    async fn session(
        &mut self,
        connection: &lapin::Connection,
        broker: &mut Broker,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        if self.finished() {
            return SessionEnd::Finished;
        }
        let queues = &self.config.queues;
        // The bindings exist before the first publish: a fanout exchange without them would
        // return every message as unroutable.
        let audit_queues: Vec<&str> = self
            .audit
            .as_ref()
            .map(|audit| audit.queues().iter().map(String::as_str).collect())
            .unwrap_or_default();
        let topology = Topology::new(&self.config.broker, &audit_queues)
            .with_stream(Stream::Features, &queues.features_queue, queues.partitions)
            .with_stream(Stream::YTrue, &queues.y_true_queue, queues.partitions);
        // A blocked connection (broker resource alarm) holds every frame, declares too: a stop
        // request must not wait for the alarm to end.
        let setup = async {
            let publisher = Publisher::open(connection, "features", broker.metrics.clone())
                .await
                .map_err(|err| SessionEnd::failed(Step::Declare, err))?;
            if let Err(err) = topology.declare(publisher.channel()).await {
                drop_detached(publisher);
                return Err(SessionEnd::failed(Step::Declare, err));
            }
            Ok(publisher)
        };
        let publisher = tokio::select! {
            setup = setup => match setup {
                Ok(publisher) => publisher,
                Err(end) => return end,
            },
            _ = shutdown.cancelled() => return SessionEnd::Finished,
        };
        broker.health.set_healthy();
        self.pacer.resume();
        let mut window = ConfirmWindow::new();
        let mut confirms = Confirms::new();
        let end = self
            .publish_all(&publisher, &mut window, &mut confirms, shutdown)
            .await;
        if let SessionEnd::Failed { .. } = end {
            // Whatever is not confirmed is sent again on the next connection.
            let unconfirmed = window.take_unanswered();
            tracing::warn!(
                unconfirmed = unconfirmed.len() + self.retry.len(),
                "unconfirmed samples will be published again"
            );
            self.retry.extend(unconfirmed);
        } else {
            self.retry.extend(window.take_unanswered());
            if let Some(audit) = &mut self.audit {
                // The producer stops: its last windows, what was confirmed of them, go out now;
                // bounded like the drain, as a blocked broker may not take them.
                let announced =
                    tokio::time::timeout(DRAIN_TIMEOUT, audit.announce(&publisher, true)).await;
                let err = match announced {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => Some(format!("{err:#}")),
                    Err(_) => Some(format!(
                        "not confirmed within {} s",
                        DRAIN_TIMEOUT.as_secs()
                    )),
                };
                if let Some(err) = err {
                    tracing::warn!(error = %err, "cannot announce the last audit windows: the metric service will report them unannounced");
                }
            }
            publisher.close().await;
        }
        drop_detached((publisher, confirms));
        end
    }

    /// Publishes until COUNT samples are sent (or forever), then waits for the window to drain.
    async fn publish_all(
        &mut self,
        publisher: &Publisher,
        window: &mut ConfirmWindow<Sample>,
        confirms: &mut Confirms,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let lost = |err| SessionEnd::failed(Step::Run, err);
        let max_outstanding = usize::try_from(self.config.confirm_window).unwrap_or(usize::MAX);
        loop {
            if let Err(err) = self.settle(window, confirms, false).await {
                return lost(err);
            }
            if let Some(audit) = &mut self.audit {
                // A record not confirmed when a stop comes stays owed (sent again at the end, or
                // by the next session); a blocked broker must not hold the stop.
                let announced = tokio::select! {
                    announced = audit.announce(publisher, false) => announced,
                    _ = shutdown.cancelled() => Ok(()),
                };
                if let Err(err) = announced {
                    return lost(err);
                }
            }
            let more = !self.retry.is_empty()
                || self.config.count == 0
                || self.generated < self.config.count;
            if shutdown.is_cancelled() || !more {
                break;
            }
            if window.len() >= max_outstanding {
                match self.wait_for_room(window, confirms, shutdown).await {
                    Ok(Room::Made) => continue,
                    // To the drain, bounded by DRAIN_TIMEOUT like any other stop.
                    Ok(Room::Stopping) => break,
                    Err(err) => return lost(err),
                }
            }
            if !self.retry.is_empty()
                && let Some(at) = self.refusals.pause()
            {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shutdown.cancelled() => continue,
                }
            }
            let sample = match self.retry.pop_front() {
                Some(sample) => sample,
                None => {
                    // Pace new samples only; republished ones go out at once.
                    if let Some(at) = self.pacer.next_due(Instant::now()) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at) => {}
                            _ = shutdown.cancelled() => continue,
                        }
                    }
                    self.pacer.sent();
                    self.generated += 1;
                    let id = uuid::Uuid::new_v4().to_string();
                    let window = self.audit.as_mut().map_or(0, |audit| audit.sent(&id));
                    Sample {
                        id,
                        row: self.sampler.next_row(),
                        number: self.generated - 1,
                        window,
                    }
                }
            };
            let published = {
                let publish = self.publish(publisher, &sample);
                tokio::pin!(publish);
                tokio::select! {
                    published = &mut publish => Some(published),
                    // A publish under way may already have handed its messages to the broker:
                    // let it finish, or the sample would count as unsent yet arrive. Only a
                    // blocked broker holds it past the grace; then it stays owed.
                    _ = shutdown.cancelled() => {
                        tokio::time::timeout(PUBLISH_GRACE, &mut publish).await.ok()
                    }
                }
            };
            let Some(published) = published else {
                self.retry.push_front(sample);
                break;
            };
            match published {
                Ok(parts) => {
                    let seq = window.push(sample, 2);
                    confirms.extend(parts.map(|confirm| (seq, confirm)));
                }
                Err(err) => {
                    self.retry.push_front(sample);
                    return lost(err);
                }
            }
        }
        // Finishing (COUNT reached or shutdown): wait for the window to drain.
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while !window.is_empty() {
                self.settle(window, confirms, true).await?;
                if !self.retry.is_empty() && !shutdown.is_cancelled() {
                    // Nacked samples are still owed: go round again.
                    return Ok::<bool, anyhow::Error>(false);
                }
            }
            Ok(true)
        })
        .await;
        match drained {
            Ok(Ok(true)) => SessionEnd::Finished,
            Ok(Ok(false)) => lost(anyhow::anyhow!("the broker refused some messages")),
            Ok(Err(err)) => lost(err),
            Err(_) => {
                tracing::warn!(
                    unconfirmed = window.len(),
                    "the broker did not confirm every message in time"
                );
                self.drain_timed_out = true;
                SessionEnd::Finished
            }
        }
    }

    /// Publishes both messages of a sample; y_true first, so a prediction never waits long for it.
    async fn publish(
        &mut self,
        publisher: &Publisher,
        sample: &Sample,
    ) -> anyhow::Result<[Confirm; 2]> {
        let sent_at_us = now_us();
        let format = BodyFormat::of(self.config.broker.topology);
        let (id, row) = (sample.id.as_str(), sample.row);
        let tag = self.audit.as_mut().map(|audit| audit.tag(sample.window));
        write_y_true(
            &mut self.body,
            format,
            id,
            &self.data.label(row),
            sent_at_us,
            tag,
        )?;
        let y_true = publisher
            .publish_fanout(
                self.routes.y_true.queue_for(Some(id)),
                &self.body,
                Some(&sample.id),
            )
            .await?;
        let features = self
            .drift
            .apply(sample.number, self.data.row(row), &mut self.drifted_row);
        write_features(&mut self.body, format, id, features, sent_at_us, tag)?;
        let queue = self.routes.features.queue_for(Some(id));
        let features = match &self.feature_names {
            Some(headers) => {
                publisher
                    .publish_fanout_with(queue, &self.body, Some(&sample.id), headers)
                    .await?
            }
            None => {
                publisher
                    .publish_fanout(queue, &self.body, Some(&sample.id))
                    .await?
            }
        };
        tracing::trace!(id = %sample.id, row = sample.row, "published");
        Ok([y_true, features])
    }

    /// Waits for the oldest confirm (the window is full) unless `shutdown` comes first: a blocked
    /// broker may not confirm for as long as its alarm lasts, and a stop request must not wait for
    /// that. Nothing is lost by stopping: [`Self::settle`] changes nothing before its first confirm
    /// is in, so the unanswered samples stay in the window and are owed as after any stop.
    async fn wait_for_room<C>(
        &mut self,
        window: &mut ConfirmWindow<Sample>,
        confirms: &mut Confirms<C>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Room>
    where
        C: Future<Output = lapin::Result<Confirmation>> + Unpin,
    {
        tokio::select! {
            settled = self.settle(window, confirms, true) => settled.map(|()| Room::Made),
            _ = shutdown.cancelled() => Ok(Room::Stopping),
        }
    }

    /// Records the confirms that are in (with `wait`, waits for at least the oldest one) and
    /// retires the samples the window says are answered: confirmed ones are counted, refused ones
    /// go to the retry queue.
    async fn settle<C>(
        &mut self,
        window: &mut ConfirmWindow<Sample>,
        confirms: &mut Confirms<C>,
        wait: bool,
    ) -> anyhow::Result<()>
    where
        C: Future<Output = lapin::Result<Confirmation>> + Unpin,
    {
        record_confirms(window, confirms, wait)
            .await
            .context("waiting for a publisher confirm")?;
        for published in window.take_answered() {
            match published {
                Published::Confirmed(sample) => {
                    self.confirmed += 1;
                    if self.retry.is_empty()
                        && let Some((started, refused)) = self.refusals.ended()
                    {
                        tracing::info!(
                            refused,
                            lasted_ms = started.elapsed().as_millis() as u64,
                            "the broker takes samples again"
                        );
                    }
                    if let Some(audit) = &mut self.audit {
                        audit.confirmed(sample.window, &sample.id);
                    }
                }
                Published::Refused(sample) => {
                    if self.refusals.refused(Instant::now()) {
                        tracing::warn!(id = %sample.id, "the broker refuses samples; publishing them again with backoff until it takes them");
                    }
                    self.retry.push_back(sample);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, IDENTITY};
    use std::pin::Pin;

    #[test]
    fn a_refusal_episode_warns_once_and_pauses_the_retries() {
        let mut pause = RefusalPause::default();
        let now = Instant::now();
        assert!(pause.refused(now), "the first refusal starts an episode");
        assert!(!pause.refused(now), "later ones do not warn again");
        let at = pause.pause().expect("a pause before the retry");
        assert!(at > now && at <= now + RESEND_DELAY.0);
        assert_eq!(pause.pause(), None, "one pause per refusal round");
        assert_eq!(pause.ended(), Some((now, 2)));
        assert_eq!(pause.ended(), None);
        assert!(pause.refused(now), "a new episode warns again");
    }

    /// A stand-in for a broker's confirm.
    type TestConfirm = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

    fn producer(confirm_window: u64) -> Producer {
        let mut config = Cli::try_parse_for(&IDENTITY, ["features"]).unwrap().config;
        config.data_path = [
            env!("CARGO_MANIFEST_DIR"),
            "..",
            "..",
            "data",
            "diabetes.csv",
        ]
        .iter()
        .collect();
        config.confirm_window = confirm_window;
        let data = Dataset::from_csv(&config.data_path, None).unwrap();
        Producer {
            sampler: Sampler::new(config.order, Some(1), data.len()),
            pacer: Pacer::new(0.0),
            drift: config.drift(&data.feature_names).unwrap(),
            data,
            retry: VecDeque::new(),
            generated: 0,
            confirmed: 0,
            drain_timed_out: false,
            refusals: RefusalPause::default(),
            feature_names: None,
            body: Vec::new(),
            drifted_row: Vec::new(),
            routes: Routes::new(&config.queues),
            audit: None,
            config,
        }
    }

    /// One sample published, its two confirms as given.
    fn published(confirms: [TestConfirm; 2]) -> (ConfirmWindow<Sample>, Confirms<TestConfirm>) {
        let mut window = ConfirmWindow::new();
        let seq = window.push(
            Sample {
                id: "s1".to_owned(),
                row: 0,
                number: 0,
                window: 0,
            },
            2,
        );
        (window, confirms.into_iter().map(|c| (seq, c)).collect())
    }

    #[tokio::test]
    async fn a_stop_request_ends_the_wait_for_a_confirm_that_never_comes() {
        let mut producer = producer(1);
        // A blocked broker: the confirms never come.
        let (mut window, mut confirms) = published([
            Box::pin(std::future::pending()),
            Box::pin(std::future::pending()),
        ]);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.cancel();
        });
        let room = tokio::time::timeout(
            Duration::from_secs(5),
            producer.wait_for_room(&mut window, &mut confirms, &shutdown),
        )
        .await
        .expect("the wait ignored the stop request");
        assert_eq!(room.unwrap(), Room::Stopping);
        // Nothing settled: the sample is still owed, as after any stop.
        assert_eq!(producer.confirmed, 0);
        assert_eq!(confirms.len(), 2);
        let owed = window.take_unanswered();
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].id, "s1");
    }

    #[tokio::test]
    async fn confirms_make_room() {
        let mut producer = producer(1);
        let ack = || -> TestConfirm { Box::pin(async { Ok(Confirmation::Ack(None)) }) };
        let (mut window, mut confirms) = published([ack(), ack()]);
        let room = producer
            .wait_for_room(&mut window, &mut confirms, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(room, Room::Made);
        assert_eq!(producer.confirmed, 1);
        assert!(window.is_empty() && confirms.is_empty());
    }
}
