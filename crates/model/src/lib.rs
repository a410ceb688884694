//! The model service: fits (or loads) a linear regression, consumes `features`, publishes `y_pred`
//! with the same id, and acks each input only after its prediction is confirmed by the broker.

pub mod artifact;
pub mod drift;
pub mod drift_monitor;
pub mod regression;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use lapin::message::Delivery;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::{Broker, Disposition, MessageHandler, Publisher, Topology, run_consumer};
use pipeline::broker::{BrokerContext as _, HandlerError};
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::{BodyFormat, parse_features, write_y_pred};
use pipeline::metrics::BrokerMetrics;
use pipeline::service::{Identity, ServiceCli, ServiceConfig};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use regression::LinearModel;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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
    /// Fit on a CSV and write a model artifact (JSON) for MODEL_PATH.
    Train {
        /// Training CSV (numeric columns, one header row).
        #[arg(long)]
        data: PathBuf,
        /// Artifact file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Version carried on predictions; derived from the coefficients when not given.
        #[arg(long)]
        version: Option<String>,
        /// Target column; the last column when not given.
        #[arg(long)]
        target: Option<String>,
    },
    /// Put an earlier version back: copies <folder of MODEL_PATH>/<VERSION>.json over MODEL_PATH
    /// (atomically); the running model services swap to it within MODEL_POLL_MS.
    Rollback {
        /// Version to serve again (the trainer writes each promoted version as <VERSION>.json).
        #[arg(long = "to")]
        to: String,
    },
}

/// `model rollback --to VERSION`: puts the artifact back and prints what is served now.
pub fn rollback(model_path: Option<&std::path::Path>, version: &str) -> anyhow::Result<()> {
    let model_path =
        model_path.context("MODEL_PATH is not set: rollback needs the served artifact's path")?;
    let artifact = artifact::rollback(model_path, version)?;
    println!(
        "{} now serves version {} (trained {}, {} rows, MAE {:.4})",
        model_path.display(),
        artifact.version,
        artifact.trained_at,
        artifact.metrics.rows,
        artifact.metrics.mae
    );
    Ok(())
}

/// `model train`: fits, writes the artifact, prints a summary.
pub fn train(
    data: &std::path::Path,
    out: &std::path::Path,
    version: Option<String>,
    target: Option<&str>,
) -> anyhow::Result<()> {
    let artifact = artifact::Artifact::train(data, target, version)?;
    artifact.write(out)?;
    println!(
        "wrote {} (version {}, {} features, {} rows, R² {:.4}, MAE {:.4}, drift reference of {} features)",
        out.display(),
        artifact.version,
        artifact.feature_names.len(),
        artifact.metrics.rows,
        artifact.metrics.r2,
        artifact.metrics.mae,
        artifact.reference.as_ref().map_or(0, |r| r.features.len())
    );
    Ok(())
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
    #[arg(long, env = "MODEL_PATH")]
    pub model_path: Option<PathBuf>,

    /// How often the artifact at MODEL_PATH is checked for changes, in milliseconds.
    #[arg(long, env = "MODEL_POLL_MS", default_value_t = 1000)]
    pub model_poll_ms: u64,

    /// Target column of the CSV; the last column when not set.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

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

/// A PSI threshold: a finite number above 0.
fn parse_psi_alert(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number above 0")),
    }
}

/// The model served at start-up.
pub struct StartModel {
    /// The model.
    pub model: LinearModel,
    /// Hash of the artifact file it was read from (`None` when fitted on `DATA_PATH`): the
    /// baseline of the artifact watcher.
    pub artifact_hash: Option<artifact::ContentHash>,
}

/// The model to serve at start-up: the artifact at `MODEL_PATH`, or a fit on `DATA_PATH` (also
/// when `MODEL_PATH` names a file that does not exist yet: the watcher loads it once it appears).
pub fn load_model(config: &Config) -> anyhow::Result<StartModel> {
    if let Some(path) = config.model_path.as_ref().filter(|path| {
        let exists = path.try_exists().unwrap_or(true);
        if !exists {
            tracing::info!(
                "no model artifact at MODEL_PATH {} yet: fitting on DATA_PATH, and serving the artifact once it appears",
                path.display()
            );
        }
        exists
    }) {
        let (artifact, hash) = artifact::Artifact::load_with_hash(path)?;
        tracing::info!(
            version = %artifact.version,
            features = artifact.feature_names.len(),
            r2 = artifact.metrics.r2,
            mae = artifact.metrics.mae,
            trained_at = %artifact.trained_at,
            training_data_sha256 = %artifact.training_data_sha256,
            drift_reference = artifact.reference.is_some(),
            "serving model artifact {}",
            path.display()
        );
        if artifact.reference.is_none() {
            tracing::info!(
                "the artifact has no reference statistics (written by an older `model train`): no drift figures"
            );
        }
        return Ok(StartModel {
            model: artifact.model(),
            artifact_hash: Some(hash),
        });
    }
    let data = Dataset::from_csv(&config.data_path, config.target_column.as_deref())
        .context("cannot load the training data (DATA_PATH)")?;
    let model = LinearModel::fit(&data)?;
    let fit = model.evaluate(&data)?;
    tracing::info!(
        version = %model.version,
        features = model.n_features(),
        rows = fit.rows,
        r2 = fit.r2,
        mae = fit.mae,
        intercept = model.intercept,
        coefficients = ?model.coefficients,
        "fitted linear regression on {}",
        config.data_path.display()
    );
    Ok(StartModel {
        model,
        artifact_hash: None,
    })
}

/// Runs the model service until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    let start = load_model(&config)?;
    let (model_tx, model_rx) = watch::channel(Arc::new(start.model));

    let mut registry = Registry::default();
    let metrics = BrokerMetrics::register(&mut registry);
    let reloads = Family::<artifact::ReloadLabel, Counter>::default();
    registry.register(
        "pipeline_model_reloads",
        "Model artifacts seen at MODEL_PATH, by result (loaded, refused)",
        reloads.clone(),
    );
    let served = Family::<VersionLabel, Gauge>::default();
    registry.register(
        "pipeline_model_served",
        "1 for the model version this replica serves now",
        served.clone(),
    );
    let version_gauge = tokio::spawn(export_version(model_rx.clone(), served));
    let watcher = config.model_path.clone().map(|path| {
        tokio::spawn(artifact::watch_artifact(
            path,
            start.artifact_hash,
            Duration::from_millis(config.model_poll_ms.max(10)),
            model_tx,
            reloads,
            shutdown.clone(),
        ))
    });
    let health = Health::new();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.features_queue, &config.queues.y_pred_queue],
        &health,
    );
    let drift_gauges = drift_monitor::DriftGauges::default();
    registry.register(
        "pipeline_feature_drift_psi",
        "Population stability index of each feature over the last DRIFT_WINDOW vectors against the model's training data",
        drift_gauges.clone(),
    );
    let drift = (config.drift_window > 0).then(|| {
        let monitor = drift_monitor::DriftMonitor::new(config.drift_window as usize);
        let reporter = tokio::spawn(drift_monitor::report_drift(
            monitor.clone(),
            config.drift_psi_alert,
            drift_gauges,
            health.clone(),
            shutdown.clone(),
        ));
        (monitor, reporter)
    });
    let http = pipeline::http::spawn(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    let mut broker = Broker::new(config.broker.clone(), "model", metrics, health);
    let queues = &config.queues;
    let spec = ConsumerSpec {
        inputs: &[queues.features_queue.as_str()],
        // The producer's fanout exchange of `features`, bound here too, so either may start first.
        topology: Topology::new(
            &config.broker,
            &[queues.features_queue.as_str(), queues.y_pred_queue.as_str()],
        )
        .with_fanout(&queues.features_queue),
        consume: config.consume.clone(),
        exclusive: false,
        service: "model",
    };
    let mut predictor = Predictor {
        model: model_rx,
        y_pred_queue: queues.y_pred_queue.clone(),
        format: BodyFormat::of(config.broker.topology),
        body: Vec::with_capacity(256),
        drift: drift.as_ref().map(|(monitor, _)| monitor.clone()),
    };
    let result = run_consumer(&mut broker, &spec, &mut predictor, &shutdown).await;
    shutdown.cancel();
    let _ = http.await;
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    version_gauge.abort();
    if let Some((_, reporter)) = drift {
        let _ = reporter.await;
    }
    result
}

/// Label of `pipeline_model_served`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct VersionLabel {
    /// The model version.
    pub version: String,
}

/// Keeps `pipeline_model_served{version}` at 1 for the served version only, so a scrape of each
/// replica tells which version it serves.
async fn export_version(
    mut models: watch::Receiver<Arc<LinearModel>>,
    served: Family<VersionLabel, Gauge>,
) {
    loop {
        let version = models.borrow_and_update().version.clone();
        served.clear();
        served.get_or_create(&VersionLabel { version }).set(1);
        if models.changed().await.is_err() {
            return;
        }
    }
}

/// Predicts each features message and publishes the prediction.
struct Predictor {
    model: watch::Receiver<Arc<LinearModel>>,
    y_pred_queue: String,
    /// Bare under `TOPOLOGY=course`; native otherwise, except in answer to a bare message.
    format: BodyFormat,
    body: Vec<u8>,
    /// Where served features go for the drift figures (`None` with `DRIFT_WINDOW=0`).
    drift: Option<drift_monitor::DriftMonitor>,
}

impl MessageHandler for Predictor {
    async fn handle(
        &mut self,
        _input: usize,
        delivery: &Delivery,
        publisher: &Publisher,
    ) -> Result<Disposition, HandlerError> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let message = match parse_features(&delivery.data, message_id) {
            Ok(message) => message,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        let model = Arc::clone(&self.model.borrow());
        let y_pred = match model.predict(&message.features) {
            Ok(y_pred) => y_pred,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        if let Some(drift) = &self.drift {
            drift.observe(&model, &message.features);
        }
        // Answer a bare course-style message in the same style.
        let format = if message.bare {
            BodyFormat::Bare
        } else {
            self.format
        };
        write_y_pred(
            &mut self.body,
            format,
            message.id.as_deref(),
            y_pred,
            &model.version,
            message.sent_at_us,
        )
        .map_err(anyhow::Error::from)?;
        tracing::debug!(id = message.id.as_deref().unwrap_or("-"), y_pred, version = %model.version, "predicted");
        let confirm = publisher
            .publish_json(&self.y_pred_queue, &self.body, message.id.as_deref())
            .await
            .broker_context("cannot publish y_pred")?;
        Ok(Disposition::AckOnConfirm(confirm))
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}
