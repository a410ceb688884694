//! The metric service's settings: the command line (`Cli`, `Command`) and [`Config`], with the
//! parsers of the values clap cannot check by itself.

use clap::Args;
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::partition::{Ownership, instance_from_hostname};
use pipeline::service::{Identity, ServiceCli};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Name, version and description of the `metric` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "metric",
    version: env!("CARGO_PKG_VERSION"),
    about: "Logs y_true and y_pred, joins them by id, records the error",
};

/// Command line of the `metric` binary: its settings, `healthcheck`.
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

    /// `classification`: `y_true` and `y_pred` are class labels (a prediction with its class
    /// probabilities), measured by accuracy, log loss, Brier score, macro F1 and ROC AUC;
    /// `regression`: numbers, measured by MAE, RMSE and R².
    #[arg(long, env = "TASK", value_enum, default_value_t)]
    pub task: pipeline::classes::Task,

    /// Pairs in the sliding window of the windowed MAE, RMSE and R².
    #[arg(long, env = "QUALITY_WINDOW", default_value_t = 1_000)]
    pub quality_window: usize,

    /// The quality alarm goes up when a model version's MAE over its last QUALITY_WINDOW pairs is
    /// above this many times its MAE over its first QUALITY_WINDOW pairs (its baseline).
    #[arg(long, env = "QUALITY_ALERT_RATIO", default_value_t = 1.25, value_parser = parse_alert_ratio)]
    pub quality_alert_ratio: f64,

    /// Seconds without a pair after which a model version that a newer one replaced (one that had
    /// pairs more recently) is retired: its quality alarm clears and its series are removed.
    #[arg(long, env = "QUALITY_RETIRE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub quality_retire_secs: u64,

    /// Loss audit: seconds after a producer's window record arrives before the window is
    /// reconciled, so stragglers and redeliveries count.
    #[arg(long, env = "AUDIT_GRACE_SECS", default_value_t = 30)]
    pub audit_grace_secs: u64,

    /// Loss audit: seconds a window is kept after it was first seen; a sample of a window found
    /// missing that arrives within it counts as late, and a window that got samples but no record
    /// within it is reported unannounced.
    #[arg(long, env = "AUDIT_RETAIN_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_retain_secs: u64,

    /// Loss audit: consume the producers' window records from <Y_TRUE_QUEUE>.audit (one per
    /// partition) and reconcile; false: tags are still logged, nothing is reconciled.
    #[arg(long, env = "AUDIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub audit: bool,

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

    /// Metric instances sharing the partitions (PARTITIONS > 1): instance i owns the partitions k
    /// with k mod METRIC_INSTANCES == i, each in LOG_DIR/p<k>/.
    #[arg(long, env = "METRIC_INSTANCES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub metric_instances: u32,

    /// This instance's number, 0-based. Unset: the trailing -<n> of the host name (a Kubernetes
    /// StatefulSet's pod metric-2 is 2), else 0.
    #[arg(long, env = "METRIC_INSTANCE")]
    pub metric_instance: Option<u32>,

    /// Model versions with their own metric series (the most recently seen); older ones are removed.
    #[arg(long, env = "MODEL_VERSIONS_KEPT", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub model_versions_kept: u64,
}

pipeline::impl_service_config!(Config);

impl Config {
    /// Whether this service reconciles the loss audit: `AUDIT`, and not under `TOPOLOGY=course`
    /// (bare messages carry no tag).
    pub fn audits(&self) -> bool {
        self.audit && self.broker.topology != pipeline::config::TopologyMode::Course
    }

    /// The settings of partition `k`: its folder (`LOG_DIR/p<k>`) and queues (`<stream>.p<k>`);
    /// with one partition, `LOG_DIR` and the streams' own names.
    pub fn partition(&self, k: u32) -> Self {
        let partitions = self.queues.partitions;
        let mut place = self.clone();
        place.log_dir = partitions.folder(&self.log_dir, k);
        place.queues.y_true_queue = partitions.queue(&self.queues.y_true_queue, k);
        place.queues.y_pred_queue = partitions.queue(&self.queues.y_pred_queue, k);
        place
    }

    /// The partitions this instance owns: from METRIC_INSTANCES and METRIC_INSTANCE (or the host
    /// name), checked against PARTITIONS.
    pub fn ownership(&self) -> anyhow::Result<Ownership> {
        let instance = match self.metric_instance {
            Some(instance) => instance,
            None if self.metric_instances > 1 => host_name()
                .as_deref()
                .and_then(instance_from_hostname)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "METRIC_INSTANCES is {}: set METRIC_INSTANCE, or run with a host name that \
                         ends in -<n> (host name: {})",
                        self.metric_instances,
                        host_name().unwrap_or_else(|| "unknown".to_owned())
                    )
                })?,
            None => 0,
        };
        Ok(Ownership::new(
            self.metric_instances,
            instance,
            self.queues.partitions,
        )?)
    }
}

/// The host name: `HOSTNAME` (set by Docker and Kubernetes), else the kernel's.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
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

/// True values waiting for a prediction at which `y_true` is held back: JOIN_READ_AHEAD, but
/// leaving a tenth of JOIN_CAPACITY for predictions that come before their true value.
pub(crate) fn read_ahead_limit(config: &Config) -> usize {
    let capacity = config.join_capacity;
    let read_ahead = usize::try_from(config.join_read_ahead).unwrap_or(usize::MAX);
    read_ahead.min(capacity / 10 * 9 + capacity % 10 * 9 / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let config = Cli::try_parse_for(&IDENTITY, ["metric"]).unwrap().config;
        assert_eq!(config.quality_alert_ratio, 1.25);
        assert_eq!(config.quality_retire_secs, 60);
        assert!(Cli::try_parse_for(&IDENTITY, ["metric", "--quality-retire-secs", "0"]).is_err());
    }

    #[test]
    fn the_instance_owns_its_share_of_the_partitions() {
        let parse = |args: &[&str]| {
            Cli::try_parse_for(
                &IDENTITY,
                std::iter::once("metric").chain(args.iter().copied()),
            )
            .unwrap()
            .config
        };
        let sole = parse(&[]).ownership().unwrap();
        assert_eq!(sole.owned(pipeline::partition::Partitions::ONE), [0]);
        let config = parse(&[
            "--partitions",
            "4",
            "--metric-instances",
            "2",
            "--metric-instance",
            "1",
        ]);
        assert_eq!(
            config.ownership().unwrap().owned(config.queues.partitions),
            [1, 3]
        );
        let err = parse(&[
            "--partitions",
            "4",
            "--metric-instances",
            "2",
            "--metric-instance",
            "2",
        ])
        .ownership()
        .unwrap_err();
        assert!(err.to_string().contains("METRIC_INSTANCE is 2"), "{err}");
    }
}
