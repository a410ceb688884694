//! The metric service: consumes `y_true` and `y_pred`, appends every message to
//! `labels_log.txt`, joins the two by id into `metric_log.csv` with the absolute error, and keeps
//! the model's running quality as metrics.
//!
//! It is a single instance by design (it owns the files): a lock file and exclusive consumers make
//! a second one fail loudly. On start-up it rebuilds its state from its own files: ids already in
//! the CSV are never written again, and values logged but not yet joined wait for their partner.

pub mod files;
pub mod join;
pub mod plot;
pub mod quality;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use files::LogFiles;
use join::{JoinLimits, Joiner, Offer};
use lapin::message::Delivery;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::{Broker, Disposition, MessageHandler, Publisher, Topology, run_consumer};
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::health::Health;
use pipeline::messages::{LabelKind, MessageError, now_us, parse_label, validate_id};
use pipeline::metrics::{BrokerMetrics, QueueLabel};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quality::Quality;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Command line of the `metric` binary.
#[derive(Parser, Debug)]
#[command(
    name = "metric",
    version,
    about = "Logs y_true and y_pred, joins them by id, records the error"
)]
pub struct Cli {
    /// Settings of the service.
    #[command(flatten)]
    pub config: Config,
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Other things the binary does.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Probe this service's /healthz at HTTP_ADDR; exit 0 when healthy (for container healthchecks).
    Healthcheck,
}

/// Settings of the metric service.
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
    pub consume: ConsumeConfig,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub telemetry: TelemetryConfig,

    /// Folder of labels_log.txt and metric_log.csv.
    #[arg(long, env = "LOG_DIR", default_value = "logs")]
    pub log_dir: PathBuf,

    /// Ids waiting for their partner, at most; beyond it the oldest is dropped (logged, counted).
    #[arg(long, env = "JOIN_CAPACITY", default_value_t = 100_000)]
    pub join_capacity: usize,

    /// Seconds an id waits for its partner before it is dropped (logged, counted).
    #[arg(long, env = "JOIN_MAX_AGE_SECS", default_value_t = 600)]
    pub join_max_age_secs: u64,

    /// Joined ids remembered to ignore redelivered or republished messages.
    #[arg(long, env = "DEDUP_CAPACITY", default_value_t = 200_000)]
    pub dedup_capacity: usize,

    /// Pairs in the sliding window of the windowed MAE, RMSE and R².
    #[arg(long, env = "QUALITY_WINDOW", default_value_t = 1_000)]
    pub quality_window: usize,

    /// Address of the /healthz and /metrics endpoint.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9103", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,

    /// Seconds between redraws of error_distribution.png (only when new pairs arrived); 0 = never.
    #[arg(long, env = "PLOT_INTERVAL_SECS", default_value_t = 10)]
    pub plot_interval_secs: u64,

    /// Width of error_distribution.png in pixels.
    #[arg(long, env = "PLOT_WIDTH", default_value_t = 960, value_parser = clap::value_parser!(u32).range(200..=8192))]
    pub plot_width: u32,

    /// Height of error_distribution.png in pixels.
    #[arg(long, env = "PLOT_HEIGHT", default_value_t = 540, value_parser = clap::value_parser!(u32).range(200..=8192))]
    pub plot_height: u32,

    /// Most recent pairs the histogram covers.
    #[arg(long, env = "PLOT_MAX_PAIRS", default_value_t = 20_000)]
    pub plot_max_pairs: usize,
}

/// File name of the error histogram in `LOG_DIR`.
pub const ERROR_PLOT: &str = "error_distribution.png";

/// Keeps the recent absolute errors and redraws the histogram now and then, off the consume loop.
struct Plotter {
    path: PathBuf,
    interval: Option<Duration>,
    width: u32,
    height: u32,
    max: usize,
    errors: std::collections::VecDeque<f64>,
    dirty: bool,
    last: Instant,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl Plotter {
    fn new(config: &Config) -> Self {
        Self {
            path: config.log_dir.join(ERROR_PLOT),
            interval: (config.plot_interval_secs > 0)
                .then(|| Duration::from_secs(config.plot_interval_secs)),
            width: config.plot_width,
            height: config.plot_height,
            max: config.plot_max_pairs.max(1),
            errors: std::collections::VecDeque::new(),
            dirty: false,
            last: Instant::now(),
            busy: Arc::default(),
        }
    }

    fn observe(&mut self, absolute_error: f64) {
        if self.errors.len() == self.max {
            self.errors.pop_front();
        }
        self.errors.push_back(absolute_error);
        self.dirty = true;
    }

    /// Starts a redraw when it is due, there is new data, and no redraw is running.
    fn maybe_redraw(&mut self) {
        use std::sync::atomic::Ordering;
        let Some(interval) = self.interval else {
            return;
        };
        if !self.dirty || self.last.elapsed() < interval || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        self.dirty = false;
        self.last = Instant::now();
        let errors: Vec<f64> = self.errors.iter().copied().collect();
        let (path, width, height, busy) = (
            self.path.clone(),
            self.width,
            self.height,
            Arc::clone(&self.busy),
        );
        tokio::task::spawn_blocking(move || {
            match plot::render_error_histogram(&errors, &path, width, height) {
                Ok(()) => {
                    tracing::debug!(pairs = errors.len(), path = %path.display(), "error histogram redrawn")
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "cannot draw the error histogram")
                }
            }
            busy.store(false, Ordering::Release);
        });
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Metrics of the join.
#[derive(Clone)]
struct JoinMetrics {
    duplicates: Family<QueueLabel, Counter>,
    conflicts: Counter,
    unpaired: Counter,
    evicted: Family<ReasonLabel, Counter>,
    waiting: Gauge,
}

impl JoinMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            duplicates: Family::default(),
            conflicts: Counter::default(),
            unpaired: Counter::default(),
            evicted: Family::default(),
            waiting: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("pipeline_join");
        registry.register("duplicates", "Messages for an id already joined or already waiting with the same value (redelivered or republished), ignored", metrics.duplicates.clone());
        registry.register(
            "conflicts",
            "Messages for an id that already has a different value; the first value wins",
            metrics.conflicts.clone(),
        );
        registry.register(
            "unpaired",
            "Messages without an id (bare course format without message_id): logged, not joined",
            metrics.unpaired.clone(),
        );
        registry.register(
            "evicted",
            "Ids dropped while waiting for their partner, by reason (capacity, age)",
            metrics.evicted.clone(),
        );
        registry.register(
            "waiting",
            "Ids waiting for their partner",
            metrics.waiting.clone(),
        );
        metrics
    }
}

/// Runs the metric service until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    let _lock = files::lock_dir(&config.log_dir)?;

    let mut registry = Registry::default();
    let broker_metrics = BrokerMetrics::register(&mut registry);
    let join_metrics = JoinMetrics::register(&mut registry);
    let quality = Quality::register(&mut registry, config.quality_window);
    let mut recorder = Recorder::recover(&config, quality, join_metrics, Plotter::new(&config))?;

    let health = Health::new();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.y_true_queue, &config.queues.y_pred_queue],
        &health,
    );
    let http = pipeline::http::spawn(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    let mut broker = Broker::new(config.broker.clone(), "metric", broker_metrics, health);
    let queues = &config.queues;
    let inputs = [queues.y_true_queue.as_str(), queues.y_pred_queue.as_str()];
    let spec = ConsumerSpec {
        inputs: &inputs,
        topology: Topology::new(&config.broker, &inputs),
        consume: config.consume.clone(),
        exclusive: true,
        service: "metric",
    };
    let result = run_consumer(&mut broker, &spec, &mut recorder, &shutdown).await;
    shutdown.cancel();
    let _ = http.await;
    result
}

/// Order of the inputs in [`ConsumerSpec::inputs`].
const KINDS: [LabelKind; 2] = [LabelKind::YTrue, LabelKind::YPred];

/// Logs, joins and measures; the [`MessageHandler`] of the metric service.
pub struct Recorder {
    files: LogFiles,
    joiner: Joiner,
    quality: Quality,
    metrics: JoinMetrics,
    plotter: Plotter,
    queue_names: [String; 2],
}

impl Recorder {
    /// Opens the files in `LOG_DIR` and rebuilds the state from them: cuts half lines, remembers
    /// every id of the CSV, and replays logged values that are not joined yet.
    fn recover(
        config: &Config,
        mut quality: Quality,
        metrics: JoinMetrics,
        mut plotter: Plotter,
    ) -> anyhow::Result<Self> {
        let dir = &config.log_dir;
        for name in [files::LABELS_LOG, files::METRIC_CSV] {
            let cut = files::repair_tail(&dir.join(name))?;
            if cut > 0 {
                tracing::warn!(
                    file = name,
                    bytes = cut,
                    "cut a half line left by a crash; its messages were never acked and come again"
                );
            }
        }
        let mut joiner = Joiner::new(JoinLimits {
            capacity: config.join_capacity,
            max_age: Duration::from_secs(config.join_max_age_secs),
            dedup_capacity: config.dedup_capacity,
        });
        let rows = files::read_csv_rows(&dir.join(files::METRIC_CSV), |pair| {
            joiner.mark_joined(&pair.id, pair.y_true, pair.y_pred);
            quality.observe(&pair);
            plotter.observe(pair.absolute_error());
        })?;
        let mut files = LogFiles::open(dir)?;
        let now = Instant::now();
        let mut rejoined = 0u64;
        let lines = files::read_label_lines(&dir.join(files::LABELS_LOG), |line| {
            let Some(id) = line.id.as_deref() else { return };
            // A pair whose row a crash kept from the CSV is written now.
            if let Ok(Offer::Paired(pair)) = joiner.offer(
                line.kind,
                id,
                line.value,
                line.model_version.as_deref(),
                None,
                now,
            ) {
                files.push_row(&pair);
                quality.observe(&pair);
                plotter.observe(pair.absolute_error());
                rejoined += 1;
            }
        })?;
        files.flush()?;
        quality.update_window();
        metrics.waiting.set(joiner.waiting() as i64);
        tracing::info!(
            log_dir = %dir.display(),
            csv_rows = rows,
            label_lines = lines,
            rows_recovered = rejoined,
            waiting = joiner.waiting(),
            "state rebuilt from the log files"
        );
        Ok(Self {
            files,
            joiner,
            quality,
            metrics,
            plotter,
            queue_names: [
                config.queues.y_true_queue.clone(),
                config.queues.y_pred_queue.clone(),
            ],
        })
    }

    fn record(&mut self, kind: LabelKind, delivery: &Delivery) -> Result<(), MessageError> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let message = parse_label(kind, &delivery.data, message_id)?;
        if let Some(version) = &message.model_version {
            validate_id(version).map_err(|_| {
                MessageError::WrongShape(format!(
                    "model_version {version:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
                ))
            })?;
        }
        let Some(id) = message.id.as_deref() else {
            self.files
                .push_label(kind, None, message.value, message.model_version.as_deref());
            self.metrics.unpaired.inc();
            tracing::debug!(
                queue = kind.as_str(),
                value = message.value,
                "message without id logged, not joined"
            );
            return Ok(());
        };
        let offer = self.joiner.offer(
            kind,
            id,
            message.value,
            message.model_version.as_deref(),
            message.sent_at_us,
            Instant::now(),
        );
        let offer = match offer {
            Ok(offer) => offer,
            Err(err) => {
                self.metrics.conflicts.inc();
                return Err(err);
            }
        };
        self.files.push_label(
            kind,
            Some(id),
            message.value,
            message.model_version.as_deref(),
        );
        match offer {
            Offer::Waiting => tracing::trace!(id, queue = kind.as_str(), "waiting for partner"),
            Offer::Duplicate => {
                tracing::debug!(id, queue = kind.as_str(), "duplicate ignored");
                self.metrics
                    .duplicates
                    .get_or_create(&QueueLabel {
                        queue: self.queue_names[kind as usize].clone(),
                    })
                    .inc();
            }
            Offer::Paired(pair) => {
                self.files.push_row(&pair);
                self.quality.observe(&pair);
                self.plotter.observe(pair.absolute_error());
                if let Some(sent) = pair.sent_at_us {
                    self.quality
                        .observe_latency(now_us().saturating_sub(sent) as f64 / 1e6);
                }
                tracing::debug!(id, y_true = pair.y_true, y_pred = pair.y_pred, "joined");
            }
        }
        Ok(())
    }
}

impl MessageHandler for Recorder {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
        _publisher: &Publisher,
    ) -> anyhow::Result<Disposition> {
        Ok(match self.record(KINDS[input], delivery) {
            Ok(()) => Disposition::Ack,
            Err(err) => Disposition::DeadLetter(err),
        })
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.metrics.waiting.set(self.joiner.waiting() as i64);
        self.files.flush().context("cannot write the log files")
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        for evicted in self.joiner.evict(Instant::now()) {
            tracing::warn!(
                id = %evicted.id,
                had = evicted.had.as_str(),
                reason = evicted.reason.as_str(),
                "dropped an id that waited too long for its partner"
            );
            self.metrics
                .evicted
                .get_or_create(&ReasonLabel {
                    reason: evicted.reason.as_str(),
                })
                .inc();
        }
        self.metrics.waiting.set(self.joiner.waiting() as i64);
        self.quality.update_window();
        self.plotter.maybe_redraw();
        Ok(())
    }
}
