//! Start-up and shut-down of the trainer: serves HTTP, opens the window (waiting while `TRAIN_DIR`
//! is full, with `/healthz` saying so), starts the retrainer and the alarm watcher, and consumes
//! the two training queues until shutdown.

use crate::alarm::{QualitySource, watch_alarm};
use crate::config::{Config, metric_authority};
use crate::handler::Handler;
use crate::http::{RETRAIN_REPLY_TIMEOUT, routes};
use crate::metrics::Metrics;
use crate::model_file::{self, ModelFile, ModelFileWatch, ModelPathCheck, watch_model_file};
use crate::opening::open_waiting;
use crate::policy::RetrainSchedule;
use crate::retrain::{Baseline, Promoter, UNREADABLE};
use crate::retrainer::retrainer;
use crate::state::{Shared, WindowCopy, lock};
use crate::store::Store;
use crate::train_command::TrainCommand;
use anyhow::Context as _;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::topology::training_queue;
use pipeline::broker::{Broker, Topology, run_consumer};
use pipeline::health::Health;
use pipeline::metrics::BrokerMetrics;
use pipeline::schema::FeatureSchema;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Runs the trainer until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    model::onnx::use_runtime_library(config.ort_dylib_path.as_deref());
    let mut registry = Registry::default();
    let baseline = Baseline::fit_on(
        &config.data_path,
        config.target_column.as_deref(),
        config.task,
    )
    .context("cannot fit the baseline on DATA_PATH")?;
    let promoter = Promoter {
        model_path: config.model_path.clone(),
        holdout: config.train_holdout,
        min_gain: config.promote_min_gain,
        baseline,
        replicas_serve: Arc::default(),
        train_command: (!config.train_command.trim().is_empty()).then(|| TrainCommand {
            command: config.train_command.clone(),
            timeout: Duration::from_secs(config.train_timeout_secs),
            stop: shutdown.clone(),
        }),
        checked: ModelPathCheck::default(),
        task: config.task,
    };
    let schema = FeatureSchema::named(promoter.baseline.feature_names.clone());
    let broker_metrics = BrokerMetrics::register(&mut registry);
    let metrics = Metrics::register(&mut registry);
    let health = Health::new();
    // A broken MODEL_PATH is reported, not fatal: the window and the queues keep going.
    let mut model_file = ModelFileWatch::default();
    let first = model_file::read(&promoter);
    let serving = match &first {
        ModelFile::Valid(version) => version.clone(),
        ModelFile::Absent => promoter.baseline.version.clone(),
        ModelFile::Unreadable(_) => UNREADABLE.to_owned(),
    };
    if let Some(change) = model_file.observe(first) {
        model_file::report(&change, &promoter, &health, &metrics);
    }
    let capacity = usize::try_from(config.train_window).unwrap_or(usize::MAX);
    let (requests, requests_rx) = mpsc::channel(16);
    let shared = Shared {
        // Filled when the window is open; the retrainer, its only reader, starts after that.
        window: Arc::new(Mutex::new(WindowCopy::default())),
        schedule: Arc::new(Mutex::new(RetrainSchedule::new(config.retrain_every))),
        requests,
        metrics: metrics.clone(),
    };
    let routes = routes(
        shared.requests.clone(),
        RETRAIN_REPLY_TIMEOUT,
        config.model_path.clone(),
        config.admin_token.clone(),
    )
    .merge(crate::served::routes(promoter.clone()));
    let http = pipeline::http::spawn_with(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        routes,
        shutdown.clone().cancelled_owned(),
    )
    .await?;
    let model_watcher = tokio::spawn(watch_model_file(
        promoter.clone(),
        model_file,
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // After the HTTP server, so that /healthz shows why the trainer waits on a full TRAIN_DIR.
    let open = || Store::open(&config.train_dir, capacity, capacity.max(1000));
    let Some(store) = open_waiting(open, &config.train_dir, &health, &shutdown).await? else {
        // Shutdown while waiting for space: nothing was consumed.
        let _ = http.await;
        let _ = model_watcher.await;
        return Ok(());
    };
    tracing::info!(
        samples = store.len(),
        waiting = store.waiting(),
        serving = %serving,
        "training window {} opened",
        config.train_dir.display()
    );
    metrics.window.set(store.len() as i64);
    metrics.waiting.set(store.waiting() as i64);
    *lock(&shared.window) = WindowCopy::of(&store, capacity);
    // Retrain requests made meanwhile (POST /retrain) waited in the queue for the window.
    let retrainer = tokio::spawn(retrainer(
        promoter.clone(),
        shared.clone(),
        requests_rx,
        health.clone(),
    ));
    let alarm = match metric_authority(&config.metric_url) {
        Some(authority) => Some(QualitySource::new(&authority)?),
        None => None,
    }
    .map(|source| {
        tokio::spawn(watch_alarm(
            source,
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
        // One copy per stream, bound to every partition's fanout exchange.
        topology: Topology::new(&config.broker, &[])
            .with_partitioned_training_queue(
                &config.queues.features_queue,
                config.queues.partitions,
                config.train_queue_max_length,
            )
            .with_partitioned_training_queue(
                &config.queues.y_true_queue,
                config.queues.partitions,
                config.train_queue_max_length,
            ),
        consume: config.consume.clone(),
        // One trainer owns TRAIN_DIR.
        exclusive: true,
        service: "trainer",
    };
    let mut broker = Broker::new(config.broker.clone(), "trainer", broker_metrics, health);
    let mut handler = Handler {
        store,
        shared: shared.clone(),
        unpaired_reported: 0,
        schema,
        task: config.task,
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
    let _ = model_watcher.await;
    result
}
