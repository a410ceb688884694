//! The trainer's command line and settings (`Cli`, `Command`, `Config`) and their parsers.

use clap::Args;
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::service::{Identity, ServiceCli};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Name, version and description of the `trainer` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "trainer",
    version: env!("CARGO_PKG_VERSION"),
    about: "Keeps a window of labelled samples and retrains and promotes the model",
};

/// Command line of the `trainer` binary: its settings, `healthcheck`.
pub type Cli = ServiceCli<Config>;

/// Settings of the trainer.
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

    /// The served model artifact, watched by the model services: a promoted candidate replaces it,
    /// and each promoted version is kept beside it as <VERSION>.json.
    #[arg(long, env = "MODEL_PATH", default_value = "models/model.json")]
    pub model_path: PathBuf,

    /// CSV the model services fit on while MODEL_PATH does not exist: the served model the first
    /// candidate is compared with, and the feature names.
    #[arg(long, env = "DATA_PATH", default_value = "data/diabetes.csv")]
    pub data_path: PathBuf,

    /// Target column of DATA_PATH; the last column when not set or empty.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

    /// `classification`: the labels are classes; the built-in fit is a logistic regression and
    /// the guard is on holdout log loss with accuracy as a floor. `regression`: numbers, linear
    /// fit, guard on holdout MAE.
    #[arg(long, env = "TASK", value_enum, default_value_t)]
    pub task: pipeline::classes::Task,

    /// Folder of the training window (window.jsonl), kept across restarts.
    #[arg(long, env = "TRAIN_DIR", default_value = "models/train")]
    pub train_dir: PathBuf,

    /// Labelled samples kept: the newest TRAIN_WINDOW.
    #[arg(long, env = "TRAIN_WINDOW", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(30..=1_000_000))]
    pub train_window: u64,

    /// Newest fraction of the window the candidate and the served model are scored on (the
    /// candidate is fitted on the rest).
    #[arg(long, env = "TRAIN_HOLDOUT", default_value_t = 0.2, value_parser = parse_fraction)]
    pub train_holdout: f64,

    /// Retrain after this many new labelled samples; 0: only on POST /retrain or the alarm.
    #[arg(long, env = "RETRAIN_EVERY", default_value_t = 1000)]
    pub retrain_every: u64,

    /// Relative MAE gain a candidate needs over the served model on the holdout to be promoted
    /// (0.05: its MAE at most 95 % of the served model's).
    #[arg(long, env = "PROMOTE_MIN_GAIN", default_value_t = 0.05, value_parser = parse_gain)]
    pub promote_min_gain: f64,

    /// The metric service's HTTP address (e.g. http://metric:9103): when its quality alarm rises
    /// for the served version, retrain. Empty: no alarm trigger.
    #[arg(long, env = "METRIC_URL", default_value = "")]
    pub metric_url: String,

    /// How often METRIC_URL's /api/quality is read, in milliseconds.
    #[arg(long, env = "METRIC_POLL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    pub metric_poll_ms: u64,

    /// Messages each of the trainer's queues (<queue>.train) holds at most; beyond, the broker
    /// drops the oldest, so a stopped trainer never fills the broker. Changing it needs the two
    /// queues deleted (the broker refuses other arguments for an existing queue).
    #[arg(long, env = "TRAIN_QUEUE_MAX_LENGTH", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub train_queue_max_length: u32,

    /// Address of the /healthz, /metrics, GET /model, POST /retrain and POST /rollback endpoint.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9104", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,

    /// Bearer token that POST /retrain and POST /rollback require (`Authorization: Bearer
    /// <token>`); empty: they are open to whoever reaches HTTP_ADDR.
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true, value_parser = parse_admin_token)]
    pub admin_token: AdminToken,

    /// Your own training code, run by `sh -c` at each retrain instead of the built-in linear fit:
    /// it reads the window's training rows from the CSV at $TRAIN_DATA (feature columns, then the
    /// target $TRAIN_TARGET) and writes an ONNX model to $TRAIN_OUTPUT, which the trainer stamps
    /// and scores itself (e.g. `python3 examples/train_sklearn.py`). Empty: the linear fit.
    #[arg(long, env = "TRAIN_COMMAND", default_value = "")]
    pub train_command: String,

    /// Seconds TRAIN_COMMAND may run before it and its children are killed.
    #[arg(long, env = "TRAIN_TIMEOUT_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub train_timeout_secs: u64,

    /// ONNX Runtime's shared library (libonnxruntime.so), opened when the served model or a
    /// TRAIN_COMMAND candidate is ONNX; the image sets it. Not needed for the JSON linear model.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,
}

/// The token of the trainer's POST routes; its `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminToken(Option<String>);

impl AdminToken {
    /// A token; an empty or blank one means no token.
    pub fn new(token: &str) -> Self {
        let token = token.trim();
        Self((!token.is_empty()).then(|| token.to_owned()))
    }

    /// Whether an `Authorization` header's value carries this token (always, without a token).
    /// Compares in time independent of where the two differ.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some(token) = &self.0 else {
            return true;
        };
        let Some(given) = authorization.and_then(|value| value.strip_prefix("Bearer ")) else {
            return false;
        };
        let (given, token) = (given.trim().as_bytes(), token.as_bytes());
        given.len() == token.len()
            && given
                .iter()
                .zip(token)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() { "\"***\"" } else { "none" })
    }
}

fn parse_admin_token(text: &str) -> Result<AdminToken, String> {
    Ok(AdminToken::new(text))
}

pipeline::impl_service_config!(Config);

/// A fraction strictly between 0 and 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value < 1.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number between 0 and 1")),
    }
}

/// A gain in [0, 1).
fn parse_gain(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a number from 0 to below 1")),
    }
}

/// `host:port` of a `METRIC_URL` (`http://host:port[/...]` or `host:port`); `None` when empty.
pub fn metric_authority(url: &str) -> Option<String> {
    let url = url.trim();
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    (!authority.is_empty()).then(|| authority.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_admits_only_its_bearer_and_never_shows() {
        let token = AdminToken::new(" s3cret ");
        assert!(token.admits(Some("Bearer s3cret")));
        assert!(!token.admits(Some("Bearer s3cre")));
        assert!(!token.admits(Some("Bearer s3cretx")));
        assert!(!token.admits(Some("s3cret")));
        assert!(!token.admits(None));
        assert_eq!(format!("{token:?}"), "\"***\"");
        let open = AdminToken::new("  ");
        assert!(!open.is_set());
        assert!(open.admits(None) && open.admits(Some("Bearer anything")));
    }

    #[test]
    fn metric_urls_name_host_and_port() {
        assert_eq!(
            metric_authority("http://metric:9103").as_deref(),
            Some("metric:9103")
        );
        assert_eq!(
            metric_authority("http://127.0.0.1:9103/metrics").as_deref(),
            Some("127.0.0.1:9103")
        );
        assert_eq!(
            metric_authority("localhost:9103").as_deref(),
            Some("localhost:9103")
        );
        assert_eq!(metric_authority(""), None);
        assert_eq!(metric_authority("  "), None);
    }

    #[test]
    fn settings_are_checked() {
        assert!(parse_fraction("0.2").is_ok());
        assert!(parse_fraction("0").is_err() && parse_fraction("1").is_err());
        assert!(parse_gain("0").is_ok() && parse_gain("0.05").is_ok());
        assert!(parse_gain("-0.1").is_err() && parse_gain("1").is_err());
        let cli = Cli::try_parse_for(&IDENTITY, ["trainer"]).unwrap();
        assert_eq!(cli.config.http_addr.port(), 9104);
        assert_eq!(cli.config.model_path, PathBuf::from("models/model.json"));
        assert_eq!(cli.config.train_window, 2000);
    }
}
