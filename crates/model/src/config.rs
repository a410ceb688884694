//! The model service's command line and settings (`Cli`, `Command`, `Config`) and their parsers.

use clap::{Args, Subcommand};
use pipeline::classes::Task;
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::service::{Identity, ServiceCli};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Name, version and description of the `model` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "model",
    version: env!("CARGO_PKG_VERSION"),
    about: "Predicts y_pred for every features message",
};

/// Command line of the `model` binary: its settings, `healthcheck` and its own subcommands.
pub type Cli = ServiceCli<Config, Command>;

/// What the binary does besides serving and `healthcheck`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fit on a CSV and write a model artifact (JSON) for MODEL_PATH: a linear regression, or with
    /// --task classification a logistic regression.
    Train {
        /// Training CSV (numeric columns, one header row; under classification the target column
        /// holds class labels, integers or strings).
        #[arg(long)]
        data: PathBuf,
        /// Artifact file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Version carried on predictions; derived from the coefficients when not given.
        #[arg(long)]
        version: Option<String>,
        /// Target column; the last column when not given or empty.
        #[arg(long, env = "TARGET_COLUMN")]
        target: Option<String>,
        /// `regression` writes the linear regression (ml-pipeline/linear-model/1);
        /// `classification` the logistic regression (ml-pipeline/logistic-model/1) over the target
        /// column's class labels.
        #[arg(long, env = "TASK", value_enum, default_value_t)]
        task: Task,
    },
    /// Show what the service would serve from an artifact (JSON or ONNX) and whether it is
    /// accepted; with --data, score it on a CSV (columns matched by name).
    Inspect {
        /// The artifact (.json or .onnx).
        #[arg(long)]
        model: PathBuf,
        /// A CSV to score it on.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Target column of --data; the last column when not given.
        #[arg(long)]
        target: Option<String>,
    },
    /// Write what the service reads from an ONNX file into its metadata: feature names (from
    /// --data's header or --feature-names), target name, version, and with --data the drift
    /// reference (the data's statistics and the model's MAE on it).
    Stamp {
        /// The ONNX file.
        #[arg(long)]
        model: PathBuf,
        /// Where to write the stamped file; the model file itself when not given.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The training CSV (header: feature names and the target).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Target column of --data; the last column when not given.
        #[arg(long)]
        target: Option<String>,
        /// Feature names in the input's column order, comma-separated (instead of --data's).
        #[arg(long, value_delimiter = ',')]
        feature_names: Option<Vec<String>>,
        /// Version carried on predictions; kept from the file, or derived from its bytes.
        #[arg(long)]
        version: Option<String>,
    },
    /// Put an earlier version back: copies <folder of MODEL_PATH>/<VERSION>.json over MODEL_PATH
    /// (atomically); the running model services swap to it within MODEL_POLL_MS.
    Rollback {
        /// Version to serve again (the trainer writes each promoted version as <VERSION>.json).
        #[arg(long = "to")]
        to: String,
    },
}

/// Settings of the model service.
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

    /// CSV the model is fitted on at start-up (when MODEL_PATH is not set).
    #[arg(long, env = "DATA_PATH", default_value = "data/diabetes.csv")]
    pub data_path: PathBuf,

    /// Model artifact to serve (written by `model train` or the trainer); watched and swapped in
    /// when it changes. While the file does not exist yet, the model is fitted on DATA_PATH and the
    /// file is loaded as soon as it appears.
    #[arg(long, env = "MODEL_PATH", conflicts_with = "model_url")]
    pub model_path: Option<PathBuf>,

    /// Model artifact to serve over HTTP instead of MODEL_PATH (e.g. the trainer's
    /// http://trainer:9104/model): fetched at start-up and polled with conditional requests; while
    /// it cannot be fetched the replica keeps serving what it has (at start, the fit on DATA_PATH).
    #[arg(long, env = "MODEL_URL")]
    pub model_url: Option<String>,

    /// ONNX Runtime's shared library (libonnxruntime.so), opened when an .onnx model is served;
    /// the image sets it. Not needed for the JSON linear model.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,

    /// How often the artifact at MODEL_PATH or MODEL_URL is checked for changes, in milliseconds.
    #[arg(long, env = "MODEL_POLL_MS", default_value_t = 1000)]
    pub model_poll_ms: u64,

    /// Target column of the CSV; the last column when not set or empty.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

    /// `classification`: with no artifact at MODEL_PATH (or MODEL_URL), fit the built-in logistic
    /// regression on DATA_PATH, whose target column holds class labels; `regression`: the linear
    /// regression. A served artifact is used as it is (its task is its own).
    #[arg(long, env = "TASK", value_enum, default_value_t)]
    pub task: Task,

    /// Address of the /healthz and /metrics endpoint.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9102", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,

    /// Feature vectors in the sliding window compared with the training data for drift (PSI);
    /// 0 turns drift figures off.
    #[arg(long, env = "DRIFT_WINDOW", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub drift_window: u32,

    /// A feature whose PSI goes above this is reported as drifting (a WARN line), and again when
    /// it comes back.
    #[arg(long, env = "DRIFT_PSI_ALERT", default_value_t = 0.25, value_parser = parse_psi_alert)]
    pub drift_psi_alert: f64,
}

pipeline::impl_service_config!(Config);

/// A PSI threshold: a finite number above 0.
fn parse_psi_alert(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number above 0")),
    }
}
