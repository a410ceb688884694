//! The trainer service: consumes its own copies of `features` and `y_true` (the queues
//! `<queue>.train`, bound to the producer's fanout exchanges), joins them by id into the training
//! window on disk ([`store`]), and retrains when triggered ([`policy`]): every `RETRAIN_EVERY` new
//! labels, on `POST /retrain`, and when the metric service's quality alarm rises for the served
//! version (`METRIC_URL`). A candidate is promoted only when it beats the served model on the
//! newest part of the window ([`retrain`]); the model services pick the new `MODEL_PATH` up.

pub mod policy;
pub mod retrain;
pub mod store;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Args;
use lapin::message::Delivery;
use model::artifact::Artifact;
use pipeline::CancellationToken;
use pipeline::broker::HandlerError;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::topology::training_queue;
use pipeline::broker::{Broker, Disposition, MessageHandler, Publisher, Topology, run_consumer};
use pipeline::config::{
    BrokerConfig, ConsumeConfig, QueueNames, TelemetryConfig, parse_socket_addr,
};
use pipeline::health::Health;
use pipeline::messages::{LabelKind, parse_features, parse_label};
use pipeline::metrics::BrokerMetrics;
use pipeline::service::{Identity, ServiceCli, ServiceConfig};
use policy::{AlarmEdge, RetrainSchedule, Trigger};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use retrain::{Baseline, Outcome, Promoter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use store::{Added, Store};
use tokio::sync::{mpsc, oneshot};

/// Name, version and description of the `trainer` binary (`--help`, `--version`).
pub const IDENTITY: Identity = Identity {
    name: "trainer",
    version: env!("CARGO_PKG_VERSION"),
    about: "Keeps a window of labelled samples and retrains and promotes the model",
};

/// Command line of the `trainer` binary: its settings and `healthcheck`.
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

    /// Target column of DATA_PATH; the last column when not set.
    #[arg(long, env = "TARGET_COLUMN")]
    pub target_column: Option<String>,

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

    /// How often METRIC_URL's /metrics is read, in milliseconds.
    #[arg(long, env = "METRIC_POLL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    pub metric_poll_ms: u64,

    /// Messages each of the trainer's queues (<queue>.train) holds at most; beyond, the broker
    /// drops the oldest, so a stopped trainer never fills the broker. Changing it needs the two
    /// queues deleted (the broker refuses other arguments for an existing queue).
    #[arg(long, env = "TRAIN_QUEUE_MAX_LENGTH", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub train_queue_max_length: u32,

    /// Address of the /healthz, /metrics and POST /retrain endpoint.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9104", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,
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

/// Labels of `pipeline_trainer_retrains_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetrainLabels {
    trigger: &'static str,
    result: &'static str,
}

/// Label of the per-stream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: &'static str,
}

/// Label of the MAE gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: &'static str,
}

/// The trainer's own metrics.
#[derive(Clone, Default)]
struct Metrics {
    received: Family<StreamLabel, Counter>,
    joined: Counter,
    duplicates: Counter,
    unpaired: Counter,
    window: Gauge,
    waiting: Gauge,
    retrains: Family<RetrainLabels, Counter>,
    holdout_mae: Family<ModelLabel, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "pipeline_trainer_received",
            "Messages the trainer received on its copy of each stream",
            metrics.received.clone(),
        );
        registry.register(
            "pipeline_trainer_samples",
            "Labelled samples joined into the training window",
            metrics.joined.clone(),
        );
        registry.register(
            "pipeline_trainer_duplicates",
            "Messages of samples already in the window (published again after a reconnect)",
            metrics.duplicates.clone(),
        );
        registry.register(
            "pipeline_trainer_unpaired",
            "Halves dropped because their other half never came",
            metrics.unpaired.clone(),
        );
        registry.register(
            "pipeline_trainer_window_samples",
            "Labelled samples in the training window now",
            metrics.window.clone(),
        );
        registry.register(
            "pipeline_trainer_waiting",
            "Feature vectors and labels waiting for their other half",
            metrics.waiting.clone(),
        );
        registry.register(
            "pipeline_trainer_retrains",
            "Retrains by trigger (labels, manual, alarm) and result (promoted, refused, skipped, failed)",
            metrics.retrains.clone(),
        );
        registry.register(
            "pipeline_trainer_holdout_mae",
            "MAE on the holdout at the last retrain, of the served model and of the candidate",
            metrics.holdout_mae.clone(),
        );
        metrics
    }
}

/// A retrain request; `reply` gets the outcome (from `POST /retrain`).
struct Request {
    trigger: Trigger,
    reply: Option<oneshot::Sender<Result<Outcome, String>>>,
}

/// State shared by the consumer, the retrainer and the HTTP route.
#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    schedule: Arc<Mutex<RetrainSchedule>>,
    requests: mpsc::Sender<Request>,
    metrics: Metrics,
}

/// Runs the trainer until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    let baseline = Artifact::train(&config.data_path, config.target_column.as_deref(), None)
        .context("cannot fit the baseline on DATA_PATH")?;
    let promoter = Promoter {
        model_path: config.model_path.clone(),
        holdout: config.train_holdout,
        min_gain: config.promote_min_gain,
        baseline: Baseline(baseline),
    };
    let serving = promoter.serving().context("cannot read MODEL_PATH")?;
    let capacity = usize::try_from(config.train_window).unwrap_or(usize::MAX);
    let store = Store::open(&config.train_dir, capacity, capacity.max(1000))?;
    tracing::info!(
        samples = store.len(),
        waiting = store.waiting(),
        serving = %serving.version,
        "training window {} opened",
        config.train_dir.display()
    );

    let mut registry = Registry::default();
    let broker_metrics = BrokerMetrics::register(&mut registry);
    let metrics = Metrics::register(&mut registry);
    metrics.window.set(store.len() as i64);
    metrics.waiting.set(store.waiting() as i64);
    let (requests, requests_rx) = mpsc::channel(16);
    let shared = Shared {
        store: Arc::new(Mutex::new(store)),
        schedule: Arc::new(Mutex::new(RetrainSchedule::new(config.retrain_every))),
        requests,
        metrics: metrics.clone(),
    };
    let health = Health::new();
    let routes = Router::new()
        .route("/retrain", axum::routing::post(post_retrain))
        .with_state(shared.clone());
    let http = pipeline::http::spawn_with(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        routes,
        shutdown.clone().cancelled_owned(),
    )
    .await?;
    let retrainer = tokio::spawn(retrainer(promoter.clone(), shared.clone(), requests_rx));
    let alarm = metric_authority(&config.metric_url).map(|authority| {
        tokio::spawn(watch_alarm(
            authority,
            Duration::from_millis(config.metric_poll_ms),
            promoter,
            shared.requests.clone(),
            shutdown.clone(),
        ))
    });

    let features_copy = training_queue(&config.queues.features_queue);
    let labels_copy = training_queue(&config.queues.y_true_queue);
    let spec = ConsumerSpec {
        inputs: &[features_copy.as_str(), labels_copy.as_str()],
        topology: Topology::new(&config.broker, &[])
            .with_training_queue(&config.queues.features_queue, config.train_queue_max_length)
            .with_training_queue(&config.queues.y_true_queue, config.train_queue_max_length),
        consume: config.consume.clone(),
        // One trainer owns TRAIN_DIR.
        exclusive: true,
        service: "trainer",
    };
    let mut broker = Broker::new(config.broker.clone(), "trainer", broker_metrics, health);
    let mut handler = Handler {
        shared: shared.clone(),
        unpaired_reported: 0,
    };
    let result = run_consumer(&mut broker, &spec, &mut handler, &shutdown).await;
    shutdown.cancel();
    let _ = http.await;
    // The retrainer ends when every sender is gone (the HTTP state and the alarm watcher).
    drop(handler);
    drop(shared);
    if let Some(alarm) = alarm {
        let _ = alarm.await;
    }
    let _ = retrainer.await;
    result
}

/// Adds each delivery to the window; acks once its line is synced.
struct Handler {
    shared: Shared,
    /// The store's count of halves dropped unpaired, as far as the counter has it.
    unpaired_reported: u64,
}

impl MessageHandler for Handler {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
        _publisher: &Publisher,
    ) -> Result<Disposition, HandlerError> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let stream = if input == 0 { "features" } else { "y_true" };
        let parsed = if input == 0 {
            parse_features(&delivery.data, message_id).map(|m| (m.id, Some(m.features), None))
        } else {
            parse_label(LabelKind::YTrue, &delivery.data, message_id)
                .map(|m| (m.id, None, Some(m.value)))
        };
        let (id, features, target) = match parsed {
            Ok(parsed) => parsed,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        let metrics = &self.shared.metrics;
        metrics
            .received
            .get_or_create(&StreamLabel { stream })
            .inc();
        // A bare message without message_id cannot be joined: nothing to keep.
        let Some(id) = id else {
            metrics.unpaired.inc();
            return Ok(Disposition::Ack);
        };
        let (added, len, waiting, unpaired) = {
            let mut store = lock(&self.shared.store);
            let added = store.add(&id, features, target);
            (
                added,
                store.len(),
                store.waiting(),
                store.dropped_unpaired(),
            )
        };
        metrics.window.set(len as i64);
        metrics.waiting.set(waiting as i64);
        metrics
            .unpaired
            .inc_by(unpaired.saturating_sub(self.unpaired_reported));
        self.unpaired_reported = unpaired;
        match added {
            Added::Joined => {
                metrics.joined.inc();
                if lock(&self.shared.schedule).labelled(1) {
                    // A full queue already holds a retrain: it will see these samples too.
                    let _ = self.shared.requests.try_send(Request {
                        trigger: Trigger::Labels,
                        reply: None,
                    });
                }
            }
            Added::Duplicate => {
                metrics.duplicates.inc();
            }
            Added::Waiting => {}
        }
        Ok(Disposition::Ack)
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        let mut store = lock(&self.shared.store);
        store.flush()?;
        if store.needs_compaction()
            && let Err(err) = store.compact()
        {
            // Everything is already synced in the journal; compaction is tried again later.
            tracing::warn!(error = %format!("{err:#}"), "cannot compact the training window");
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs retrains one at a time, in the order asked.
async fn retrainer(promoter: Promoter, shared: Shared, mut requests: mpsc::Receiver<Request>) {
    // The receiver ends once every sender is dropped; the state's own sender must not keep it.
    let Shared {
        store,
        schedule,
        metrics,
        requests: own_sender,
    } = shared;
    drop(own_sender);
    while let Some(request) = requests.recv().await {
        let samples: Vec<store::Sample> = lock(&store).samples().cloned().collect();
        lock(&schedule).retrained();
        let trigger = request.trigger;
        let promoter = promoter.clone();
        let result = tokio::task::spawn_blocking(move || promoter.retrain(trigger, &samples))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|result| result);
        let reply = match result {
            Ok(outcome) => {
                report(&outcome, &metrics);
                Ok(outcome)
            }
            Err(err) => {
                let text = format!("{err:#}");
                tracing::error!(trigger = trigger.as_str(), error = %text, "retrain failed");
                metrics
                    .retrains
                    .get_or_create(&RetrainLabels {
                        trigger: trigger.as_str(),
                        result: "failed",
                    })
                    .inc();
                Err(text)
            }
        };
        if let Some(tx) = request.reply {
            let _ = tx.send(reply);
        }
    }
}

/// The log line and metrics of one retrain.
fn report(outcome: &Outcome, metrics: &Metrics) {
    metrics
        .retrains
        .get_or_create(&RetrainLabels {
            trigger: outcome.trigger,
            result: outcome.result,
        })
        .inc();
    if let (Some(serving), Some(candidate)) = (outcome.serving_mae, outcome.candidate_mae) {
        metrics
            .holdout_mae
            .get_or_create(&ModelLabel { model: "serving" })
            .set(serving);
        metrics
            .holdout_mae
            .get_or_create(&ModelLabel { model: "candidate" })
            .set(candidate);
    }
    let candidate = outcome.candidate_version.as_deref().unwrap_or("-");
    let gain = outcome
        .serving_mae
        .zip(outcome.candidate_mae)
        .map(|(s, c)| policy::gain(s, c));
    match outcome.result {
        "promoted" => tracing::info!(
            trigger = outcome.trigger,
            from = %outcome.serving_version,
            to = candidate,
            serving_mae = outcome.serving_mae,
            candidate_mae = outcome.candidate_mae,
            gain,
            train_rows = outcome.train_rows,
            holdout_rows = outcome.holdout_rows,
            "candidate promoted: {}",
            outcome.detail
        ),
        "refused" => tracing::warn!(
            trigger = outcome.trigger,
            serving = %outcome.serving_version,
            candidate,
            serving_mae = outcome.serving_mae,
            candidate_mae = outcome.candidate_mae,
            gain,
            train_rows = outcome.train_rows,
            holdout_rows = outcome.holdout_rows,
            "candidate refused: {}",
            outcome.detail
        ),
        _ => tracing::info!(
            trigger = outcome.trigger,
            "retrain skipped: {}",
            outcome.detail
        ),
    }
}

/// `POST /retrain`: retrains now and answers with the outcome as JSON (200), or 500 with the
/// error.
async fn post_retrain(State(shared): State<Shared>) -> impl IntoResponse {
    let (tx, rx) = oneshot::channel();
    let request = Request {
        trigger: Trigger::Manual,
        reply: Some(tx),
    };
    if shared.requests.send(request).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        );
    }
    match rx.await {
        Ok(Ok(outcome)) => (
            StatusCode::OK,
            serde_json::to_string(&outcome).unwrap_or_default() + "\n",
        ),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, err + "\n"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        ),
    }
}

/// Reads the metric service's `/metrics` every `interval` and asks for a retrain when the served
/// version's quality alarm rises. An unreachable metric service is logged (once per outage) and
/// tried again.
async fn watch_alarm(
    authority: String,
    interval: Duration,
    promoter: Promoter,
    requests: mpsc::Sender<Request>,
    shutdown: CancellationToken,
) {
    let mut edge = AlarmEdge::default();
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        // The same 3 s limit the hand-written client had.
        let answer = pipeline::http::get(
            &format!("http://{authority}/metrics"),
            Duration::from_secs(3),
        )
        .await
        .map_err(anyhow::Error::from)
        .and_then(|response| {
            anyhow::ensure!(response.status == 200, "{}", response.status_line);
            Ok(response.body)
        });
        let body = match answer {
            Ok(body) => {
                if !reachable {
                    tracing::info!(metric_url = %authority, "the metric service answers again");
                }
                reachable = true;
                body
            }
            Err(err) => {
                if reachable {
                    tracing::warn!(metric_url = %authority, error = %format!("{err:#}"), "cannot read the metric service's quality alarm; trying again");
                }
                reachable = false;
                continue;
            }
        };
        let served = match promoter.serving() {
            Ok(artifact) => artifact.version,
            Err(_) => continue,
        };
        if edge.observe(policy::parse_alarms(&body), &served) {
            tracing::warn!(version = %served, "the metric service's quality alarm rose for the served version: retraining");
            let _ = requests.try_send(Request {
                trigger: Trigger::Alarm,
                reply: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
