//! The metric service: consumes `y_true` and `y_pred`, appends every message to
//! `labels_log.txt`, joins the two by id into `metric_log.csv` with the absolute error, and keeps
//! the model's running quality as metrics.
//!
//! It is a single instance by design (it owns the files): a lock file and exclusive consumers make
//! a second one fail loudly. On start-up it rebuilds its state from its checkpoint and the end of
//! its own files (see [`checkpoint`]): ids already in the CSV are never written again, values logged
//! but not yet joined wait for their partner, and the time it takes does not grow with the history.

pub mod checkpoint;
pub mod dashboard;
pub mod files;
pub mod join;
pub mod plot;
pub mod quality;

use clap::Args;
use files::{LogFiles, Rotation};
use join::{JoinLimits, Joiner, Offer, fingerprint};
use lapin::message::Delivery;
use pipeline::broker::HandlerError;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::flow::{FlowChange, Hysteresis};
use pipeline::broker::{Broker, Disposition, MessageHandler, Publisher, Topology, run_consumer};
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::health::Health;
use pipeline::messages::{LabelKind, LabelMessage, MessageError, now_us, parse_label, validate_id};
use pipeline::metrics::{BrokerMetrics, QueueLabel};
use pipeline::service::{Identity, ServiceCli, ServiceConfig};
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

/// Name, version and description of the `metric` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "metric",
    version: env!("CARGO_PKG_VERSION"),
    about: "Logs y_true and y_pred, joins them by id, records the error",
};

/// Command line of the `metric` binary: its settings and `healthcheck`.
pub type Cli = ServiceCli<Config>;

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

    /// True values waiting for their prediction, at most (and at most 90 % of JOIN_CAPACITY):
    /// then y_true is held back, the broker keeps it, until three quarters of them have paired.
    #[arg(long, env = "JOIN_READ_AHEAD", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub join_read_ahead: u64,

    /// Seconds an id waits for its partner before it is dropped (logged, counted): counted only
    /// while its partner's kind arrives, and only once later ids pair or nothing pairs at all.
    #[arg(long, env = "JOIN_MAX_AGE_SECS", default_value_t = 600)]
    pub join_max_age_secs: u64,

    /// Joined ids remembered to ignore redelivered or republished messages.
    #[arg(long, env = "DEDUP_CAPACITY", default_value_t = 200_000)]
    pub dedup_capacity: usize,

    /// Pairs in the sliding window of the windowed MAE, RMSE and R².
    #[arg(long, env = "QUALITY_WINDOW", default_value_t = 1_000)]
    pub quality_window: usize,

    /// The quality alarm goes up when a model version's MAE over its last QUALITY_WINDOW pairs is
    /// above this many times its MAE over its first QUALITY_WINDOW pairs (its baseline).
    #[arg(long, env = "QUALITY_ALERT_RATIO", default_value_t = 1.25, value_parser = parse_alert_ratio)]
    pub quality_alert_ratio: f64,

    /// Address of /healthz, /metrics and the live dashboard (/).
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

    /// Size in bytes at which labels_log.txt and metric_log.csv are rotated (renamed to .1); 0 = never.
    #[arg(long, env = "LOG_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub log_max_bytes: u64,

    /// Rotated files kept of each log (.1 to .N); the oldest beyond it is deleted.
    #[arg(long, env = "LOG_KEEP_FILES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub log_keep_files: u64,

    /// Pairs after which the recovery checkpoint is written again (at the next flush).
    #[arg(long, env = "CHECKPOINT_EVERY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,

    /// Seconds after which the recovery checkpoint is written again when anything changed.
    #[arg(long, env = "CHECKPOINT_INTERVAL_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval_secs: u64,

    /// Model versions with their own metric series (the most recently seen); older ones are removed.
    #[arg(long, env = "MODEL_VERSIONS_KEPT", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub model_versions_kept: u64,
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

/// `QUALITY_ALERT_RATIO`: a finite number above 1 (at or below 1 the alarm would ring for noise).
fn parse_alert_ratio(text: &str) -> Result<f64, String> {
    let ratio: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if ratio.is_finite() && ratio > 1.0 {
        Ok(ratio)
    } else {
        Err(format!("{text} must be a number above 1, e.g. 1.25"))
    }
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
    y_true_held: Gauge,
}

impl JoinMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            duplicates: Family::default(),
            conflicts: Counter::default(),
            unpaired: Counter::default(),
            evicted: Family::default(),
            waiting: Gauge::default(),
            y_true_held: Gauge::default(),
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
        registry.register(
            "y_true_held",
            "1 while y_true is not taken because the join is full (the broker keeps it until the model catches up)",
            metrics.y_true_held.clone(),
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
    let quality = Quality::register(
        &mut registry,
        config.quality_window,
        config.model_versions_kept as usize,
        config.quality_alert_ratio,
    );
    let mut recorder = Recorder::recover(&config, quality, join_metrics, Plotter::new(&config))?;
    let connected = broker_metrics.connected.clone();

    let health = Health::new();
    recorder.health = health.clone();
    recorder.update_flow();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.y_true_queue, &config.queues.y_pred_queue],
        &health,
    );
    let registry = Arc::new(registry);
    let dashboard = dashboard::routes(dashboard::Live {
        snapshot: recorder.dashboard.shared(),
        connected,
        health: health.clone(),
        registry: Arc::clone(&registry),
    });
    let http = pipeline::http::spawn_with(
        config.http_addr,
        registry,
        health.clone(),
        dashboard,
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
    recorder.finish();
    shutdown.cancel();
    let _ = http.await;
    result
}

/// True values waiting for a prediction at which `y_true` is held back: JOIN_READ_AHEAD, but
/// leaving a tenth of JOIN_CAPACITY for predictions that come before their true value.
fn read_ahead_limit(config: &Config) -> usize {
    let capacity = config.join_capacity;
    let read_ahead = usize::try_from(config.join_read_ahead).unwrap_or(usize::MAX);
    read_ahead.min(capacity / 10 * 9 + capacity % 10 * 9 / 10)
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
    dashboard: dashboard::Dashboard,
    queue_names: [String; 2],
    log_dir: PathBuf,
    checkpoints: CheckpointPolicy,
    /// Holds back `y_true` while the join is nearly full, so a lagging model loses no pair.
    y_true_flow: Hysteresis,
    health: Health,
}

/// When the checkpoint is written again.
struct CheckpointPolicy {
    every_pairs: u64,
    interval: Duration,
    pairs_since: u64,
    changed: bool,
    last: Instant,
    /// The last save failed (logged once until one succeeds again).
    failing: bool,
}

impl CheckpointPolicy {
    fn due(&self) -> bool {
        self.changed
            && (self.pairs_since >= self.every_pairs || self.last.elapsed() >= self.interval)
    }
}

/// What start-up read, for its log line.
#[derive(Default)]
struct RecoveryStats {
    csv: files::CsvRead,
    label_lines: u64,
    rows_recovered: u64,
    evicted: u64,
}

impl Recorder {
    /// Opens the files in `LOG_DIR` and rebuilds the state from the checkpoint and the end of the
    /// files (or from the whole files when there is no usable checkpoint, then writes one): cuts
    /// half lines, remembers the last `DEDUP_CAPACITY` ids of the CSV, and replays logged values
    /// written after the checkpoint.
    fn recover(
        config: &Config,
        mut quality: Quality,
        metrics: JoinMetrics,
        mut plotter: Plotter,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let dir = &config.log_dir;
        // A foreign CSV goes before anything reads it: its ids are not ours.
        files::move_foreign_csv_aside(dir)?;
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
        let labels_chain = files::chain(&dir.join(files::LABELS_LOG));
        let csv_chain = files::chain(&dir.join(files::METRIC_CSV));
        let whole = |chain: &[PathBuf]| -> Vec<files::Segment> {
            chain.iter().map(|path| (path.clone(), 0)).collect()
        };
        let saved = match checkpoint::load(dir) {
            Ok(saved) => saved,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "checkpoint unusable; reading the log files whole");
                None
            }
        };
        let resume = match saved {
            Some(saved) => match (
                files::segments_after(&labels_chain, &saved.labels)?,
                files::segments_after(&csv_chain, &saved.csv)?,
            ) {
                (Some(labels), Some(csv)) => Some((saved, labels, csv)),
                _ => {
                    tracing::warn!(
                        "the checkpoint does not match the log files (moved or deleted?); reading them whole"
                    );
                    None
                }
            },
            None => None,
        };
        let now = Instant::now();
        let mut stats = RecoveryStats::default();
        let mut dashboard =
            dashboard::Dashboard::new(config.quality_window, config.quality_alert_ratio);
        // Ids of the rows written after the checkpoint (all rows without one): their log lines
        // are not joined again, however many there are. Sorted 64-bit hashes, 8 bytes each (a
        // million rows: 8 MB, once): a collision could only make a line whose row is missing wait
        // no more, about once in 10^13 starts on a million-row history.
        let mut written: Vec<u64> = Vec::new();
        let short = |id: &str| fingerprint(id) as u64;
        let from_checkpoint = resume.is_some();
        let label_segments = match resume {
            Some((saved, label_segments, csv_segments)) => {
                quality.restore(&saved.totals);
                joiner.restore_waiting(saved.waiting);
                // While replaying, remember the rows after the checkpoint too: a line logged
                // then was checked against the last DEDUP_CAPACITY rows of its time, which are
                // all among the last DEDUP_CAPACITY + (rows since) rows now.
                let since = usize::try_from(files::count_lines(&csv_segments)?).unwrap_or(0);
                let replay_dedup = config.dedup_capacity.saturating_add(since);
                joiner.set_dedup_capacity(replay_dedup);
                // The last rows: the de-duplication window, the quality window and the picture.
                let recent =
                    replay_dedup
                        .max(config.quality_window)
                        .max(if plotter.interval.is_some() {
                            config.plot_max_pairs
                        } else {
                            0
                        });
                let tail = files::tail_segments(&csv_chain, recent, true)?;
                stats.csv += files::read_csv_segments(&tail, |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.add_to_window(&pair);
                    plotter.observe(pair.absolute_error());
                    dashboard.observe(pair.y_true, pair.y_pred);
                })?;
                // Rows after the checkpoint: into the totals.
                files::read_csv_segments(&csv_segments, |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.add_to_totals(&pair);
                    written.push(short(&pair.id));
                })?;
                label_segments
            }
            None => {
                // Once, for files without a checkpoint: room for every id, no doubling on the way.
                let rows = files::count_lines(&whole(&csv_chain))?;
                written.reserve_exact(usize::try_from(rows).unwrap_or(0));
                stats.csv = files::read_csv_segments(&whole(&csv_chain), |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.observe(&pair);
                    plotter.observe(pair.absolute_error());
                    dashboard.observe(pair.y_true, pair.y_pred);
                    written.push(short(&pair.id));
                })?;
                whole(&labels_chain)
            }
        };
        written.sort_unstable();
        written.dedup();
        let mut files = LogFiles::open(
            dir,
            Rotation {
                max_bytes: config.log_max_bytes,
                keep: config.log_keep_files as usize,
            },
        )?;
        stats.label_lines = files::read_label_segments(&label_segments, |line| {
            let Some(id) = line.id.as_deref() else { return };
            if written.binary_search(&short(id)).is_ok() {
                return;
            }
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
                dashboard.observe(pair.y_true, pair.y_pred);
                stats.rows_recovered += 1;
            }
            // Keep the waiting ids within JOIN_CAPACITY while replaying.
            if joiner.waiting() > config.join_capacity.saturating_mul(2).max(1024) {
                stats.evicted += joiner.evict().len() as u64;
            }
        })?;
        drop(written);
        joiner.set_dedup_capacity(config.dedup_capacity);
        stats.evicted += joiner.evict().len() as u64;
        if stats.evicted > 0 {
            metrics
                .evicted
                .get_or_create(&ReasonLabel { reason: "capacity" })
                .inc_by(stats.evicted);
        }
        files.flush()?;
        quality.update_window();
        metrics.waiting.set(joiner.waiting() as i64);
        dashboard.maybe_update(&quality, joiner.waiting(), plotter.errors.iter());
        let mut recorder = Self {
            files,
            joiner,
            quality,
            metrics,
            plotter,
            dashboard,
            queue_names: [
                config.queues.y_true_queue.clone(),
                config.queues.y_pred_queue.clone(),
            ],
            log_dir: dir.clone(),
            checkpoints: CheckpointPolicy {
                every_pairs: config.checkpoint_every,
                interval: Duration::from_secs(config.checkpoint_interval_secs),
                pairs_since: 0,
                changed: true,
                last: Instant::now(),
                failing: false,
            },
            y_true_flow: Hysteresis::with_high_water(read_ahead_limit(config)),
            health: Health::new(),
        };
        recorder.save_checkpoint();
        tracing::info!(
            log_dir = %dir.display(),
            from = if from_checkpoint { "checkpoint" } else { "whole files" },
            csv_rows_read = stats.csv.rows,
            csv_bad_rows = stats.csv.bad_rows,
            label_lines_replayed = stats.label_lines,
            rows_recovered = stats.rows_recovered,
            evicted_while_replaying = stats.evicted,
            waiting = recorder.joiner.waiting(),
            pairs = recorder.quality.all().n,
            millis = started.elapsed().as_millis() as u64,
            "state rebuilt from the log files"
        );
        Ok(recorder)
    }

    /// Writes the checkpoint when nothing is pending (so it matches the files); a failure is
    /// logged, not fatal: the previous checkpoint stays valid, start-up only reads more.
    fn save_checkpoint(&mut self) {
        if !self.files.is_flushed() {
            return;
        }
        let result = self.files.positions().and_then(|(labels, csv)| {
            let saved = checkpoint::Checkpoint::new(
                labels,
                csv,
                self.quality.totals(),
                self.joiner.waiting_entries(),
            );
            checkpoint::save(&self.log_dir, &saved)
        });
        match result {
            Ok(()) => {
                if self.checkpoints.failing {
                    tracing::info!("checkpoint written again");
                }
                self.checkpoints.failing = false;
                self.checkpoints.changed = false;
                self.checkpoints.pairs_since = 0;
                self.checkpoints.last = Instant::now();
            }
            Err(err) => {
                if !self.checkpoints.failing {
                    tracing::warn!(error = %format!("{err:#}"), "cannot write the checkpoint; the previous one stays, start-up reads more");
                }
                self.checkpoints.failing = true;
                // Try again at the next interval, not at every flush.
                self.checkpoints.last = Instant::now();
            }
        }
    }

    /// Holds back or takes again `y_true` as the join fills and empties: while the model lags,
    /// the broker keeps the `y_true` backlog instead of the join dropping the oldest ids.
    fn update_flow(&mut self) {
        // Only true values waiting for a prediction: holding y_true cannot lower the others.
        let waiting = self.joiner.waiting_for(LabelKind::YPred);
        match self.y_true_flow.update(waiting) {
            Some(FlowChange::Held) => {
                let note = format!(
                    "{waiting} true values wait for their prediction (JOIN_READ_AHEAD): {} is \
                     not taken until the model catches up; the broker keeps it",
                    self.queue_names[0]
                );
                tracing::warn!("{note}");
                self.health.set_note("join", Some(note));
                self.metrics.y_true_held.set(1);
            }
            Some(FlowChange::Resumed) => {
                tracing::info!(waiting, "{} is taken again", self.queue_names[0]);
                self.health.set_note("join", None);
                self.metrics.y_true_held.set(0);
            }
            None => {}
        }
    }

    /// At shutdown: writes what is pending and a last checkpoint.
    fn finish(&mut self) {
        if let Err(err) = self.files.flush() {
            tracing::warn!(error = %format!("{err:#}"), "cannot write the log files at shutdown; the unacked messages come again");
            return;
        }
        if self.checkpoints.changed {
            self.save_checkpoint();
        }
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
        self.accept(kind, message)
    }

    /// Logs one parsed message and offers it to the join.
    fn accept(&mut self, kind: LabelKind, message: LabelMessage) -> Result<(), MessageError> {
        let Some(id) = message.id.as_deref() else {
            // Not joinable, but its kind is arriving: ids waiting for it age.
            self.joiner.note_activity(kind, Instant::now());
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
        self.checkpoints.changed = true;
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
                self.checkpoints.pairs_since += 1;
                self.files.push_row(&pair);
                self.quality.observe(&pair);
                self.plotter.observe(pair.absolute_error());
                self.dashboard.observe(pair.y_true, pair.y_pred);
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
    ) -> Result<Disposition, HandlerError> {
        let disposition = match self.record(KINDS[input], delivery) {
            Ok(()) => Disposition::Ack,
            Err(err) => Disposition::DeadLetter(err),
        };
        self.update_flow();
        Ok(disposition)
    }

    fn accepts(&self, input: usize) -> bool {
        !(KINDS[input] == LabelKind::YTrue && self.y_true_flow.is_held())
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        self.metrics.waiting.set(self.joiner.waiting() as i64);
        // A write error is a LocalFault: the loop pauses and calls again.
        let rotated = self.files.flush()?;
        if rotated || self.checkpoints.due() {
            self.save_checkpoint();
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), HandlerError> {
        for evicted in self.joiner.evict() {
            self.checkpoints.changed = true;
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
        self.update_flow();
        self.quality.update_window();
        self.dashboard.maybe_update(
            &self.quality,
            self.joiner.waiting(),
            self.plotter.errors.iter(),
        );
        self.plotter.maybe_redraw();
        if self.checkpoints.due() {
            // Only when nothing is pending; else the next flush writes it.
            self.save_checkpoint();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::path::Path;

    fn config(dir: &Path, extra: &[&str]) -> Config {
        let mut args = vec!["metric", "--log-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        Cli::try_parse_for(&IDENTITY, args).unwrap().config
    }

    fn recover(config: &Config) -> Recorder {
        let mut registry = Registry::default();
        let join_metrics = JoinMetrics::register(&mut registry);
        let quality = Quality::register(&mut registry, config.quality_window, 20, 1.25);
        Recorder::recover(config, quality, join_metrics, Plotter::new(config)).unwrap()
    }

    /// Appends `ids` as a history: both log lines of each, and its row when `row` says so.
    fn append_history(dir: &Path, ids: impl Iterator<Item = String>, row: impl Fn(usize) -> bool) {
        let mut labels = String::new();
        let mut csv = String::new();
        if !dir.join(files::METRIC_CSV).exists() {
            csv.push_str(files::CSV_HEADER);
            csv.push('\n');
        }
        for (n, id) in ids.enumerate() {
            labels.push_str(&format!("2026-11-26T00:00:00.000000Z y_true {id} 100\n"));
            labels.push_str(&format!(
                "2026-11-26T00:00:00.000001Z y_pred {id} 90.5 v1\n"
            ));
            if row(n) {
                csv.push_str(&format!("{id},100,90.5,9.5,v1\n"));
            }
        }
        for (name, text) in [(files::LABELS_LOG, labels), (files::METRIC_CSV, csv)] {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
        }
    }

    fn csv_ids(dir: &Path) -> Vec<String> {
        let mut ids = Vec::new();
        let chain = files::chain(&dir.join(files::METRIC_CSV));
        let segments: Vec<_> = chain.into_iter().map(|p| (p, 0)).collect();
        files::read_csv_segments(&segments, |pair| ids.push(pair.id)).unwrap();
        ids
    }

    fn assert_once(ids: &[String], n: usize) {
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!((ids.len(), distinct.len()), (n, n), "rows, distinct ids");
    }

    #[test]
    fn a_quality_alert_ratio_at_or_below_one_is_refused() {
        for bad in ["1", "0.5", "nan", "inf", "x"] {
            let err = Cli::try_parse_for(&IDENTITY, ["metric", "--quality-alert-ratio", bad])
                .unwrap_err();
            assert!(
                err.to_string().contains("QUALITY_ALERT_RATIO") || err.to_string().contains(bad),
                "{err}"
            );
        }
        assert_eq!(config(Path::new("."), &[]).quality_alert_ratio, 1.25);
    }

    #[test]
    fn a_history_longer_than_dedup_capacity_is_never_joined_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &["--dedup-capacity", "100"]);
        append_history(dir.path(), (0..3000).map(|i| format!("a{i}")), |_| true);
        // Files of an older version (no checkpoint): one whole read, then a checkpoint.
        drop(recover(&config));
        assert_once(&csv_ids(dir.path()), 3000);
        assert!(dir.path().join(checkpoint::CHECKPOINT).exists());
        // Restarts from the checkpoint.
        for _ in 0..2 {
            let recorder = recover(&config);
            assert_eq!(recorder.quality.all().n, 3000);
            drop(recorder);
            assert_once(&csv_ids(dir.path()), 3000);
        }
        // A crash after the checkpoint: 500 more pairs logged, the last 20 rows never written.
        append_history(dir.path(), (0..500).map(|i| format!("b{i}")), |n| n < 480);
        let recorder = recover(&config);
        assert_eq!(recorder.quality.all().n, 3500);
        drop(recorder);
        assert_once(&csv_ids(dir.path()), 3500);
        drop(recover(&config));
        assert_once(&csv_ids(dir.path()), 3500);
    }

    #[test]
    fn orphans_dropped_before_a_checkpoint_do_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &["--join-max-age-secs", "1"]);
        let mut labels = String::new();
        for i in 0..200 {
            labels.push_str(&format!("2026-11-26T00:00:00.000000Z y_true orphan{i} 1\n"));
        }
        std::fs::write(dir.path().join(files::LABELS_LOG), labels).unwrap();
        let mut recorder = recover(&config);
        assert_eq!(recorder.joiner.waiting(), 200);
        // Predictions (without ids) arrive for 5 s and nothing pairs: the orphans are old.
        let start = Instant::now();
        for s in 0..=5 {
            let at = start + Duration::from_secs(s);
            recorder.joiner.note_activity(LabelKind::YPred, at);
        }
        let dropped = recorder.joiner.evict();
        assert_eq!(dropped.len(), 200);
        recorder.checkpoints.changed = true;
        recorder.finish();
        drop(recorder);
        let recorder = recover(&config);
        assert_eq!(recorder.joiner.waiting(), 0);
    }

    #[test]
    fn waiting_ids_come_back_from_the_checkpoint_and_pair() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &[]);
        std::fs::write(
            dir.path().join(files::LABELS_LOG),
            "2026-11-26T00:00:00.000000Z y_true w1 10\n",
        )
        .unwrap();
        // Whole read, checkpoint with w1 waiting; then a restart from the checkpoint.
        drop(recover(&config));
        let recorder = recover(&config);
        assert_eq!(recorder.joiner.waiting(), 1);
        drop(recorder);
        // Its prediction was logged after the checkpoint, the row not written (a crash).
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(files::LABELS_LOG))
            .unwrap();
        writeln!(file, "2026-11-26T00:00:01.000000Z y_pred w1 7 v2").unwrap();
        let recorder = recover(&config);
        assert_eq!(recorder.joiner.waiting(), 0);
        drop(recorder);
        let csv = std::fs::read_to_string(dir.path().join(files::METRIC_CSV)).unwrap();
        assert!(csv.ends_with("\nw1,10,7,3,v2\n"), "{csv}");
    }

    #[test]
    fn a_foreign_csv_does_not_seed_the_joined_ids() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(files::METRIC_CSV),
            "sample,truth,guess,err\nx1,100,90.5,9.5\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(files::LABELS_LOG),
            "2026-11-26T00:00:00.000000Z y_true x1 100\n2026-11-26T00:00:00.000001Z y_pred x1 90.5 v1\n",
        )
        .unwrap();
        drop(recover(&config(dir.path(), &[])));
        assert_eq!(csv_ids(dir.path()), ["x1"]);
    }

    #[test]
    fn recovery_reads_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            dir.path(),
            &[
                "--dedup-capacity",
                "50",
                "--log-max-bytes",
                "1000",
                "--log-keep-files",
                "100",
            ],
        );
        drop(recover(&config));
        for round in 0..5 {
            let mut recorder = recover(&config);
            for i in 0..100 {
                let pair = join::Pair {
                    id: format!("r{round}-{i}"),
                    y_true: 1.0,
                    y_pred: 2.0,
                    model_version: None,
                    sent_at_us: None,
                };
                recorder
                    .files
                    .push_label(LabelKind::YTrue, Some(&pair.id), 1.0, None);
                recorder
                    .files
                    .push_label(LabelKind::YPred, Some(&pair.id), 2.0, None);
                recorder.files.push_row(&pair);
                recorder.joiner.mark_joined(&pair.id, 1.0, 2.0, None);
                recorder.quality.observe(&pair);
                // Flushes rotate and checkpoint now and then; the last rows have none after them.
                let rotated = recorder.files.flush().unwrap();
                if rotated {
                    recorder.save_checkpoint();
                }
            }
        }
        assert!(files::rotated_path(&dir.path().join(files::METRIC_CSV), 2).exists());
        let recorder = recover(&config);
        assert_eq!(recorder.quality.all().n, 500);
        drop(recorder);
        assert_once(&csv_ids(dir.path()), 500);
    }

    /// One step of a run of the metric service, for the property test below.
    #[derive(Debug, Clone)]
    enum Step {
        /// Deliver one of the messages not yet acked (picked by index).
        Deliver(usize),
        /// Deliver the last message again (a republish).
        Again,
        /// A prediction for a sample (one whose prediction came) from another model version,
        /// with another value.
        Repredict(usize),
        /// Both messages of the sample joined last, published again (a producer's republish).
        RepublishLast,
        /// Flush: what was delivered is written and acked.
        Flush,
        /// Write the checkpoint now (when nothing is pending).
        Checkpoint,
        /// SIGKILL: unflushed work is lost and comes again; restart.
        Crash,
        /// SIGTERM: finish, restart.
        Restart,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            8 => any::<usize>().prop_map(Step::Deliver),
            1 => Just(Step::Again),
            1 => any::<usize>().prop_map(Step::Repredict),
            1 => Just(Step::RepublishLast),
            3 => Just(Step::Flush),
            1 => Just(Step::Checkpoint),
            1 => Just(Step::Crash),
            1 => Just(Step::Restart),
        ]
    }

    fn message(kind: LabelKind, sample: usize, version: &str) -> LabelMessage {
        let value = match kind {
            LabelKind::YTrue => sample as f64,
            LabelKind::YPred => sample as f64 + if version == "v1" { 0.5 } else { 0.25 },
        };
        LabelMessage {
            id: Some(format!("s{sample}")),
            value,
            model_version: (kind == LabelKind::YPred).then(|| version.to_owned()),
            sent_at_us: None,
        }
    }

    /// Runs `steps` on `samples` samples against a fresh LOG_DIR; returns the rows at the end.
    fn simulate(samples: usize, steps: Vec<Step>) -> Vec<join::Pair> {
        let dir = tempfile::tempdir().unwrap();
        let config = config(
            dir.path(),
            &[
                "--dedup-capacity",
                "3",
                "--checkpoint-every",
                "1000000",
                "--checkpoint-interval-secs",
                "3600",
            ],
        );
        // Messages the broker still holds (not acked), and those delivered since the last flush.
        let mut pending: Vec<(LabelKind, usize)> = (0..samples)
            .flat_map(|s| [(LabelKind::YTrue, s), (LabelKind::YPred, s)])
            .collect();
        let mut unacked: Vec<(LabelKind, usize)> = Vec::new();
        let mut last: Option<(LabelKind, usize)> = None;
        // Which messages of each sample came, and the sample joined last (the newest row,
        // within DEDUP_CAPACITY however many restarts follow).
        let mut came = vec![[false; 2]; samples];
        let mut joined_last: Option<usize> = None;
        let mut recorder = recover(&config);
        for step in steps {
            match step {
                Step::Deliver(pick) if !pending.is_empty() => {
                    let delivery = pending.remove(pick % pending.len());
                    recorder
                        .accept(delivery.0, message(delivery.0, delivery.1, "v1"))
                        .unwrap();
                    unacked.push(delivery);
                    last = Some(delivery);
                    let came = &mut came[delivery.1];
                    came[delivery.0 as usize] = true;
                    if came[0] && came[1] {
                        joined_last = Some(delivery.1);
                    }
                }
                Step::Again => {
                    if let Some((kind, sample)) = last {
                        recorder.accept(kind, message(kind, sample, "v1")).unwrap();
                    }
                }
                Step::Repredict(pick) => {
                    // A model swap re-predicts a sample whose prediction came already.
                    let sample = pick % samples;
                    if came[sample][1] {
                        recorder
                            .accept(LabelKind::YPred, message(LabelKind::YPred, sample, "v2"))
                            .unwrap();
                    }
                }
                Step::RepublishLast => {
                    if let Some(sample) = joined_last {
                        for kind in KINDS {
                            recorder.accept(kind, message(kind, sample, "v1")).unwrap();
                        }
                    }
                }
                Step::Flush => {
                    recorder.files.flush().unwrap();
                    unacked.clear();
                }
                Step::Checkpoint => recorder.save_checkpoint(),
                Step::Crash => {
                    // A row lost with the unflushed work is written again later, not last.
                    if unacked
                        .iter()
                        .any(|(_, sample)| Some(*sample) == joined_last)
                    {
                        joined_last = None;
                    }
                    for (kind, sample) in &unacked {
                        came[*sample][*kind as usize] = false;
                    }
                    drop(recorder);
                    pending.append(&mut unacked);
                    last = None;
                    recorder = recover(&config);
                }
                Step::Restart => {
                    recorder.finish();
                    unacked.clear();
                    drop(recorder);
                    recorder = recover(&config);
                }
                Step::Deliver(_) => {}
            }
        }
        for (kind, sample) in pending.drain(..) {
            recorder.accept(kind, message(kind, sample, "v1")).unwrap();
        }
        recorder.finish();
        drop(recorder);
        drop(recover(&config));
        let mut rows = Vec::new();
        let segments = vec![(dir.path().join(files::METRIC_CSV), 0)];
        files::read_csv_segments(&segments, |pair| rows.push(pair)).unwrap();
        rows
    }

    fn ids_of(rows: &[join::Pair]) -> Vec<String> {
        let mut ids: Vec<String> = rows.iter().map(|p| p.id.clone()).collect();
        ids.sort_unstable();
        ids
    }

    fn expected_ids(samples: usize) -> Vec<String> {
        let mut expected: Vec<String> = (0..samples).map(|s| format!("s{s}")).collect();
        expected.sort_unstable();
        expected
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the order of deliveries, republishes, re-predictions, flushes, checkpoints,
        /// crashes and restarts, every sample ends up as exactly one row, with its own y_true.
        #[test]
        fn any_run_with_crashes_and_restarts_writes_each_sample_once(
            samples in 1usize..25,
            steps in proptest::collection::vec(step(), 0..120),
        ) {
            let rows = simulate(samples, steps);
            proptest::prop_assert_eq!(ids_of(&rows), expected_ids(samples));
            for pair in &rows {
                proptest::prop_assert_eq!(format!("s{}", pair.y_true), pair.id.clone());
            }
        }
    }

    /// Found by the property test: a republished sample logged (as a duplicate) after the
    /// checkpoint, its row before it; three more rows, then a crash. The replay must still see
    /// it as joined, though it is no longer among the last DEDUP_CAPACITY rows.
    #[test]
    fn a_duplicate_logged_after_the_checkpoint_is_not_joined_again_after_a_crash() {
        use Step::*;
        let steps = vec![
            Deliver(0),
            Deliver(41186847998319985),
            Deliver(13789255759644117416),
            Deliver(8721880138643292414),
            Deliver(16680692249433264387),
            Crash,
            Deliver(8940205582609144288),
            Deliver(17067134542868008289),
            Deliver(1727712315584282666),
            Flush,
            Checkpoint,
            RepublishLast,
            Deliver(12765435175874619921),
            Deliver(3016025102610222661),
            Deliver(12738439308273870913),
            Deliver(8145449790482368945),
            Deliver(361456095246578129),
            Deliver(10696554487814358987),
            Flush,
            Crash,
        ];
        let rows = simulate(7, steps);
        assert_eq!(ids_of(&rows), expected_ids(7));
    }
}
