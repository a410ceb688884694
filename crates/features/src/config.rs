//! The producer's command line and settings (`Cli`, `Order`, `Config`), and the drift that
//! DRIFT_AFTER and DRIFT_SHIFT ask for, resolved against the data set.

use crate::drift::{self, Drift, UnknownFeatures};
use clap::{Args, ValueEnum};
use pipeline::config::{BrokerConfig, QueueNames, TelemetryConfig, parse_socket_addr};
use pipeline::dataset::Dataset;
use pipeline::service::{Identity, ServiceCli};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Name, version and description of the `features` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "features",
    version: env!("CARGO_PKG_VERSION"),
    about: "Streams data set rows to the features and y_true queues",
};

/// Command line of the `features` binary: its settings, `healthcheck`.
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

    /// Target column of the CSV; the last column when not set or empty.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

    /// `classification`: the target column holds class labels (integers or strings), sent in
    /// `y_true` as the data has them; `regression`: it holds numbers.
    #[arg(long, env = "TASK", value_enum, default_value_t)]
    pub task: pipeline::classes::Task,

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

    /// Loss audit: the length of a window in seconds; each window's count and checksum of ids is
    /// announced to <Y_TRUE_QUEUE>.audit once it is over and confirmed. 0: no audit.
    #[arg(long, env = "AUDIT_WINDOW_SECS", default_value_t = 10)]
    pub audit_window_secs: u64,
}

pipeline::impl_service_config!(Config);

impl Config {
    /// The drift to simulate, resolved against the data set's feature names.
    pub fn drift(&self, feature_names: &[String]) -> Result<Drift, UnknownFeatures> {
        Drift::new(
            self.drift_after,
            &self.drift_shift.clone().unwrap_or_default(),
            feature_names,
        )
    }

    /// Checks at start-up that `DRIFT_SHIFT` names only features of `DATA_PATH` (for a clear
    /// command-line error). A data set that cannot be read is left to [`crate::run`] to report.
    pub fn check_drift_shift(&self) -> Result<(), UnknownFeatures> {
        if self
            .drift_shift
            .as_ref()
            .is_none_or(|spec| spec.0.is_empty())
        {
            return Ok(());
        }
        match Dataset::from_csv_for(&self.data_path, self.target_column.as_deref(), self.task) {
            Ok(data) => self.drift(&data.feature_names).map(|_| ()),
            Err(_) => Ok(()),
        }
    }
}
