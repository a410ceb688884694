//! The producer: picks rows of a CSV (at random or in order) and publishes, for each, the feature
//! vector to `features` and the true target to `y_true`, both with the same fresh id.
//!
//! Every sample stays in a window until the broker has confirmed both of its messages; a sample
//! not confirmed when the connection drops is published again after the reconnect, so a broker
//! restart loses nothing (the metric service ignores the duplicates this can cause).

pub mod drift;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::FutureExt as _;
use pipeline::CancellationToken;
use pipeline::broker::publisher::Confirm;
use pipeline::broker::{Broker, Publisher, Topology};
use pipeline::config::{BrokerConfig, QueueNames, TelemetryConfig, parse_socket_addr};
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::{BodyFormat, now_us, write_features, write_y_true};
use pipeline::metrics::BrokerMetrics;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Command line of the `features` binary.
#[derive(Parser, Debug)]
#[command(
    name = "features",
    version,
    about = "Streams data set rows to the features and y_true queues"
)]
pub struct Cli {
    /// Settings of the service.
    #[command(flatten)]
    pub config: Config,
    /// What to do instead of producing.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Other things the binary does.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Probe this service's /healthz at HTTP_ADDR; exit 0 when healthy (for container healthchecks).
    Healthcheck,
}

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

/// One sample: a row and the id its two messages share.
#[derive(Debug, Clone)]
struct Sample {
    id: String,
    row: usize,
    /// Position in the stream (from 0), so a republished sample is shifted as it was first.
    number: u64,
}

/// A sample whose messages are not yet both confirmed.
struct Outstanding {
    sample: Sample,
    confirms: [Option<Confirm>; 2],
}

/// How a publishing session ended.
enum SessionEnd {
    Done,
    Lost(anyhow::Error),
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
        data,
        retry: VecDeque::new(),
        generated: 0,
        confirmed: 0,
        started: None,
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
    /// Samples to publish again (not confirmed before a connection loss or nacked).
    retry: VecDeque<Sample>,
    generated: u64,
    confirmed: u64,
    started: Option<Instant>,
    body: Vec<u8>,
    /// Simulated drift (`DRIFT_SHIFT`), applied where a sample's features are written.
    drift: drift::Drift,
    /// A shifted copy of the row being written.
    drifted_row: Vec<f64>,
}

impl Producer {
    fn finished(&self) -> bool {
        self.config.count > 0 && self.confirmed >= self.config.count
    }

    async fn run(
        &mut self,
        broker: &mut Broker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        while !self.finished() && !shutdown.is_cancelled() {
            let Some(connection) = broker.connect(shutdown).await else {
                break;
            };
            let mut outstanding = VecDeque::new();
            let end = self
                .session(&connection, broker, &mut outstanding, shutdown)
                .await;
            // Whatever is not confirmed is sent again on the next connection.
            self.retry
                .extend(outstanding.into_iter().map(|o: Outstanding| o.sample));
            match end {
                SessionEnd::Done => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        connection.close(200, "done".into()),
                    )
                    .await;
                    break;
                }
                SessionEnd::Lost(err) => {
                    tracing::warn!(error = %format!("{err:#}"), unconfirmed = self.retry.len(), "lost the broker connection; unconfirmed samples will be published again");
                    broker.lost(&err.to_string());
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        connection.close(200, "lost".into()),
                    )
                    .await;
                }
            }
        }
        broker.health.set_unhealthy(if self.finished() {
            "finished: all COUNT samples confirmed"
        } else {
            "stopped"
        });
        if !self.retry.is_empty() {
            tracing::warn!(
                unconfirmed = self.retry.len(),
                "stopping with samples the broker never confirmed"
            );
        }
        tracing::info!(confirmed = self.confirmed, "producer stopped");
        Ok(())
    }

    async fn session(
        &mut self,
        connection: &lapin::Connection,
        broker: &mut Broker,
        outstanding: &mut VecDeque<Outstanding>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let queues = &self.config.queues;
        let topology = Topology::new(
            &self.config.broker,
            &[queues.features_queue.as_str(), queues.y_true_queue.as_str()],
        );
        let publisher = match Publisher::open(connection, "features", broker.metrics.clone()).await
        {
            Ok(publisher) => publisher,
            Err(err) => return SessionEnd::Lost(err.into()),
        };
        if let Err(err) = topology.declare(publisher.channel()).await {
            return SessionEnd::Lost(err.into());
        }
        broker.health.set_healthy();
        let window = usize::try_from(self.config.confirm_window).unwrap_or(usize::MAX);
        loop {
            if let Err(err) = self.settle(outstanding, false).await {
                return SessionEnd::Lost(err);
            }
            let more = !self.retry.is_empty()
                || self.config.count == 0
                || self.generated < self.config.count;
            if shutdown.is_cancelled() || !more {
                break;
            }
            if outstanding.len() >= window {
                if let Err(err) = self.settle(outstanding, true).await {
                    return SessionEnd::Lost(err);
                }
                continue;
            }
            let sample = match self.retry.pop_front() {
                Some(sample) => sample,
                None => {
                    // Pace new samples only; republished ones go out at once.
                    if let Some(at) = self.next_send_time() {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at) => {}
                            _ = shutdown.cancelled() => continue,
                        }
                    }
                    self.generated += 1;
                    Sample {
                        id: uuid::Uuid::new_v4().to_string(),
                        row: self.sampler.next_row(),
                        number: self.generated - 1,
                    }
                }
            };
            match self.publish(&publisher, &sample).await {
                Ok(confirms) => outstanding.push_back(Outstanding { sample, confirms }),
                Err(err) => {
                    self.retry.push_front(sample);
                    return SessionEnd::Lost(err);
                }
            }
        }
        // Finishing (COUNT reached or shutdown): wait for the window to drain.
        let drained = tokio::time::timeout(pipeline::broker::consumer::DRAIN_TIMEOUT, async {
            while !outstanding.is_empty() {
                self.settle(outstanding, true).await?;
                if !self.retry.is_empty() && !shutdown.is_cancelled() {
                    // Nacked samples are still owed: go round again.
                    return Ok::<bool, anyhow::Error>(false);
                }
            }
            Ok(true)
        })
        .await;
        publisher.close().await;
        match drained {
            Ok(Ok(true)) => SessionEnd::Done,
            Ok(Ok(false)) => SessionEnd::Lost(anyhow::anyhow!("the broker refused some messages")),
            Ok(Err(err)) => SessionEnd::Lost(err),
            Err(_) => SessionEnd::Done,
        }
    }

    /// When the next new sample is due, or `None` when not pacing.
    fn next_send_time(&mut self) -> Option<Instant> {
        if self.config.rate <= 0.0 {
            return None;
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        Some(started + Duration::from_secs_f64(self.generated as f64 / self.config.rate))
    }

    /// Publishes both messages of a sample; y_true first, so a prediction never waits long for it.
    async fn publish(
        &mut self,
        publisher: &Publisher,
        sample: &Sample,
    ) -> anyhow::Result<[Option<Confirm>; 2]> {
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
            .publish_json(&queues.y_true_queue, &self.body, Some(&sample.id))
            .await?;
        let features = self
            .drift
            .apply(sample.number, self.data.row(row), &mut self.drifted_row);
        write_features(&mut self.body, format, id, features, sent_at_us)?;
        let features = publisher
            .publish_json(&queues.features_queue, &self.body, Some(&sample.id))
            .await?;
        tracing::trace!(id = %sample.id, row = sample.row, "published");
        Ok([Some(y_true), Some(features)])
    }

    /// Retires confirmed samples from the front of the window. With `wait`, waits for at least
    /// the oldest one. A sample the broker refused goes to the retry queue.
    async fn settle(
        &mut self,
        outstanding: &mut VecDeque<Outstanding>,
        wait: bool,
    ) -> anyhow::Result<()> {
        let mut waited = !wait;
        while let Some(front) = outstanding.front_mut() {
            let mut refused = false;
            for slot in &mut front.confirms {
                let Some(confirm) = slot else { continue };
                let result = if waited {
                    match confirm.now_or_never() {
                        Some(result) => result,
                        None => return Ok(()),
                    }
                } else {
                    confirm.await
                };
                let confirmation = result.context("waiting for a publisher confirm")?;
                refused |= !pipeline::broker::publisher::is_confirmed(&confirmation);
                *slot = None;
            }
            waited = true;
            let Some(done) = outstanding.pop_front() else {
                break;
            };
            if refused {
                tracing::warn!(id = %done.sample.id, "the broker refused a message; publishing the sample again");
                self.retry.push_back(done.sample);
            } else {
                self.confirmed += 1;
            }
        }
        Ok(())
    }
}
