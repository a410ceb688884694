//! The producer: picks rows of a CSV (at random or in order) and publishes, for each, the feature
//! vector to `features` and the true target to `y_true`, both with the same fresh id. It publishes
//! through each stream's fanout exchange (`features.fanout`, `y_true.fanout`), declared and bound
//! to its queue at the start of every session, so the trainer's queues get a copy.
//!
//! Every sample stays in a confirm window until the broker has confirmed both of its messages; a
//! sample not confirmed when the connection drops is published again after the reconnect, so a
//! broker restart loses nothing (the metric service ignores the duplicates this can cause). The
//! shared supervisor runs the sessions: a queue declared with other arguments stops the producer
//! with an error instead of a reconnect loop. With `COUNT`, the producer exits non-zero when the
//! broker did not confirm every sample before the final drain timed out.

pub mod drift;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use futures_util::FutureExt as _;
use pipeline::CancellationToken;
use pipeline::broker::consumer::DRAIN_TIMEOUT;
use pipeline::broker::publisher::{Confirm, is_confirmed};
use pipeline::broker::supervisor::drop_detached;
use pipeline::broker::window::{ConfirmWindow, Published};
use pipeline::broker::{Broker, Publisher, SessionEnd, Step, Topology, supervise};
use pipeline::config::{BrokerConfig, QueueNames, TelemetryConfig, parse_socket_addr};
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::{BodyFormat, now_us, write_features, write_y_true};
use pipeline::metrics::BrokerMetrics;
use pipeline::service::{Identity, ServiceCli, ServiceConfig};
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Name, version and description of the `features` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "features",
    version: env!("CARGO_PKG_VERSION"),
    about: "Streams data set rows to the features and y_true queues",
};

/// Command line of the `features` binary: its settings and `healthcheck`.
pub type Cli = ServiceCli<Config>;

/// How rows are picked.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Uniformly at random from all rows, with replacement.
    Random,
    /// Row 0, 1, 2, ... and around again.
    Sequential,
}

/// Settings of the producer.
#[derive(Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub broker: BrokerConfig,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub queues: QueueNames,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub telemetry: TelemetryConfig,

    /// CSV to stream.
    #[arg(long, env = "DATA_PATH", default_value = "data/diabetes.csv")]
    pub data_path: PathBuf,

    /// Target column of the CSV; the last column when not set.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

    /// Samples per second; 0 sends as fast as the broker confirms.
    #[arg(long, env = "RATE", default_value_t = 10.0)]
    pub rate: f64,

    /// Stop after this many samples are confirmed; 0 runs forever.
    #[arg(long, env = "COUNT", default_value_t = 0)]
    pub count: u64,

    /// How rows are picked.
    #[arg(long, env = "ORDER", value_enum, default_value_t = Order::Random)]
    pub order: Order,

    /// Seed for a reproducible sequence of rows (ids stay unique).
    #[arg(long, env = "SEED")]
    pub seed: Option<u64>,

    /// Samples published but not yet confirmed, at most.
    #[arg(long, env = "CONFIRM_WINDOW", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub confirm_window: u64,

    /// Address of the /healthz and /metrics endpoint.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9101", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,

    /// After COUNT samples, keep serving /metrics this many seconds before exiting, so a scraper
    /// sees the final counts.
    #[arg(long, env = "LINGER_SECS", default_value_t = 0)]
    pub linger_secs: u64,

    /// Simulated drift: samples from this number on (counted from 0) get DRIFT_SHIFT added.
    #[arg(long, env = "DRIFT_AFTER", default_value_t = 0)]
    pub drift_after: u64,

    /// Simulated drift: FEATURE=AMOUNT pairs added to the features after DRIFT_AFTER samples,
    /// e.g. `bmi=0.05,s5=0.04`; not set: no drift.
    #[arg(long, env = "DRIFT_SHIFT", value_parser = drift::parse_shift_spec)]
    pub drift_shift: Option<drift::ShiftSpec>,
}

impl ServiceConfig for Config {
    fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }

    fn broker(&self) -> &BrokerConfig {
        &self.broker
    }
}

/// Picks row indices.
pub struct Sampler {
    order: Order,
    rng: fastrand::Rng,
    rows: usize,
    next: usize,
}

impl Sampler {
    /// A sampler over `rows` rows.
    pub fn new(order: Order, seed: Option<u64>, rows: usize) -> Self {
        Self {
            order,
            rng: seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
            rows,
            next: 0,
        }
    }

    /// The next row index, in `0..rows` (every row can come up, the last one too).
    pub fn next_row(&mut self) -> usize {
        match self.order {
            Order::Random => self.rng.usize(0..self.rows),
            Order::Sequential => {
                let row = self.next;
                self.next = (self.next + 1) % self.rows;
                row
            }
        }
    }
}

/// Paces new samples at `RATE`. The pace is anchored to when sending (re)starts, not to the first
/// start: after an outage the missed samples are not sent in a burst; the stream simply goes on at
/// `RATE`. A short stall (under [`MAX_CATCH_UP`]) is still caught up.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    anchor: Option<Instant>,
    sent: u32,
}

/// How long a stop request lets a publish under way finish (it is only waiting for a free frame
/// buffer, unless the broker blocks publishers).
const PUBLISH_GRACE: Duration = Duration::from_secs(1);

/// Longest delay the pacer makes up for by sending faster than `RATE`.
pub const MAX_CATCH_UP: Duration = Duration::from_secs(1);

impl Pacer {
    /// A pacer for `rate` samples per second; 0 means no pacing.
    pub fn new(rate: f64) -> Self {
        let interval =
            (rate > 0.0 && rate.is_finite()).then(|| Duration::from_secs_f64(1.0 / rate));
        Self {
            interval,
            anchor: None,
            sent: 0,
        }
    }

    /// When the next sample is due (`None`: at once). A due time more than [`MAX_CATCH_UP`] in
    /// the past restarts the pace at `now`.
    pub fn next_due(&mut self, now: Instant) -> Option<Instant> {
        let interval = self.interval?;
        let anchor = *self.anchor.get_or_insert(now);
        let due = anchor + interval.saturating_mul(self.sent);
        if now.saturating_duration_since(due) > MAX_CATCH_UP {
            self.anchor = Some(now);
            self.sent = 0;
            return Some(now);
        }
        Some(due)
    }

    /// One sample was sent.
    pub fn sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
    }

    /// Sending resumes after a pause (a new broker session): the pace starts again from now.
    pub fn resume(&mut self) {
        self.anchor = None;
        self.sent = 0;
    }
}

/// One sample: a row and the id its two messages share.
#[derive(Debug, Clone)]
struct Sample {
    id: String,
    row: usize,
    /// Position in the stream (from 0), so a republished sample is shifted as it was first.
    number: u64,
}

/// Runs the producer until `COUNT` samples are confirmed or `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    let data = Dataset::from_csv(&config.data_path, config.target_column.as_deref())
        .context("cannot load the data set (DATA_PATH)")?;
    if !(config.rate.is_finite() && config.rate >= 0.0) {
        anyhow::bail!("RATE must be a number >= 0, got {}", config.rate);
    }
    tracing::info!(
        rows = data.len(),
        features = data.n_features(),
        rate = config.rate,
        count = config.count,
        order = ?config.order,
        "streaming {}",
        config.data_path.display()
    );
    let drift = config.drift(&data.feature_names)?;
    if let Some(shift) = config.drift_shift.as_ref().filter(|_| drift.is_on()) {
        tracing::info!(after = config.drift_after, shift = %shift, "simulating drift: shifting features after DRIFT_AFTER samples");
    }

    let mut registry = Registry::default();
    let metrics = BrokerMetrics::register(&mut registry);
    let health = Health::new();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.features_queue, &config.queues.y_true_queue],
        &health,
    );
    let http = pipeline::http::spawn(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    let mut producer = Producer {
        sampler: Sampler::new(config.order, config.seed, data.len()),
        pacer: Pacer::new(config.rate),
        data,
        retry: VecDeque::new(),
        generated: 0,
        confirmed: 0,
        drain_timed_out: false,
        body: Vec::with_capacity(512),
        drift,
        drifted_row: Vec::new(),
        config,
    };
    let mut broker = Broker::new(producer.config.broker.clone(), "features", metrics, health);
    let result = producer.run(&mut broker, &shutdown).await;
    if producer.finished() && producer.config.linger_secs > 0 {
        // Let a Prometheus scrape see the final counts before the endpoint goes away.
        tracing::info!(
            linger_secs = producer.config.linger_secs,
            "all samples confirmed; still serving /metrics"
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(producer.config.linger_secs)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    shutdown.cancel();
    let _ = http.await;
    result
}

struct Producer {
    config: Config,
    data: Dataset,
    sampler: Sampler,
    pacer: Pacer,
    /// Samples to publish again (not confirmed before a connection loss or nacked).
    retry: VecDeque<Sample>,
    generated: u64,
    confirmed: u64,
    /// The last drain gave up waiting for confirms.
    drain_timed_out: bool,
    body: Vec<u8>,
    /// Simulated drift (`DRIFT_SHIFT`), applied where a sample's features are written.
    drift: drift::Drift,
    /// A shifted copy of the row being written.
    drifted_row: Vec<f64>,
}

/// Publisher confirms not yet answered, oldest first, with the window sequence of their sample.
type Confirms = VecDeque<(u64, Confirm)>;

impl Producer {
    fn finished(&self) -> bool {
        self.config.count > 0 && self.confirmed >= self.config.count
    }

    async fn run(
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
        let topology = Topology::new(
            &self.config.broker,
            &[queues.features_queue.as_str(), queues.y_true_queue.as_str()],
        )
        .with_fanout(&queues.features_queue)
        .with_fanout(&queues.y_true_queue);
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
            let more = !self.retry.is_empty()
                || self.config.count == 0
                || self.generated < self.config.count;
            if shutdown.is_cancelled() || !more {
                break;
            }
            if window.len() >= max_outstanding {
                if let Err(err) = self.settle(window, confirms, true).await {
                    return lost(err);
                }
                continue;
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
                    Sample {
                        id: uuid::Uuid::new_v4().to_string(),
                        row: self.sampler.next_row(),
                        number: self.generated - 1,
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
        let queues = &self.config.queues;
        let sent_at_us = now_us();
        let format = BodyFormat::of(self.config.broker.topology);
        let (id, row) = (sample.id.as_str(), sample.row);
        write_y_true(
            &mut self.body,
            format,
            id,
            self.data.target(row),
            sent_at_us,
        )?;
        let y_true = publisher
            .publish_fanout(&queues.y_true_queue, &self.body, Some(&sample.id))
            .await?;
        let features = self
            .drift
            .apply(sample.number, self.data.row(row), &mut self.drifted_row);
        write_features(&mut self.body, format, id, features, sent_at_us)?;
        let features = publisher
            .publish_fanout(&queues.features_queue, &self.body, Some(&sample.id))
            .await?;
        tracing::trace!(id = %sample.id, row = sample.row, "published");
        Ok([y_true, features])
    }

    /// Records the confirms that are in (with `wait`, waits for at least the oldest one) and
    /// retires the samples the window says are answered: confirmed ones are counted, refused ones
    /// go to the retry queue.
    async fn settle(
        &mut self,
        window: &mut ConfirmWindow<Sample>,
        confirms: &mut Confirms,
        wait: bool,
    ) -> anyhow::Result<()> {
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
            let confirmation = result.context("waiting for a publisher confirm")?;
            window.answered(seq, is_confirmed(&confirmation));
        }
        for published in window.take_answered() {
            match published {
                Published::Confirmed(_) => self.confirmed += 1,
                Published::Refused(sample) => {
                    tracing::warn!(id = %sample.id, "the broker refused a message; publishing the sample again");
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

    /// Samples the pacer lets out in `span` starting at `from`, sending each as soon as it is due.
    fn sent_within(pacer: &mut Pacer, from: Instant, span: Duration) -> u32 {
        let mut now = from;
        let mut sent = 0;
        loop {
            let due = pacer.next_due(now).unwrap_or(now);
            now = now.max(due);
            if now >= from + span {
                return sent;
            }
            pacer.sent();
            sent += 1;
        }
    }

    #[test]
    fn the_pacer_keeps_the_rate() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        let sent = sent_within(&mut pacer, start, Duration::from_secs(2));
        assert!((199..=201).contains(&sent), "{sent}");
    }

    #[test]
    fn after_an_outage_the_missed_samples_do_not_go_out_in_a_burst() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        sent_within(&mut pacer, start, Duration::from_secs(1));
        // 30 s without a broker: 3,000 samples "missed".
        let back = start + Duration::from_secs(31);
        let sent = sent_within(&mut pacer, back, Duration::from_secs(1));
        assert!(
            sent <= 101,
            "{sent} samples in the first second after the outage"
        );
        // Also when the session was not restarted (a stall), and after a resume.
        pacer.resume();
        let later = back + Duration::from_secs(60);
        let sent = sent_within(&mut pacer, later, Duration::from_secs(1));
        assert!(sent <= 101, "{sent}");
    }

    #[test]
    fn a_short_stall_is_caught_up() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        sent_within(&mut pacer, start, Duration::from_secs(1));
        // 0.5 s late: the 50 samples due meanwhile go out at once, then the pace goes on.
        let late = start + Duration::from_millis(1500);
        let sent = sent_within(&mut pacer, late, Duration::from_millis(500));
        assert!((99..=101).contains(&sent), "{sent}");
    }

    #[test]
    fn rate_zero_does_not_pace() {
        assert_eq!(Pacer::new(0.0).next_due(Instant::now()), None);
    }
}
