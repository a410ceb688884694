//! Start-up and shut-down of the model service: picks the model to serve, starts the artifact
//! watcher, the drift reporter and HTTP, and consumes `features` until shutdown.

use crate::config::Config;
use crate::handler::Predictor;
use crate::metrics::{VersionLabel, export_version};
use crate::served::{Engine, ServedModel};
use crate::source::{ArtifactSource, Reading};
use crate::{artifact, drift_monitor};
use anyhow::Context as _;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::{Broker, Stream, Topology, run_consumer};
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::BodyFormat;
use pipeline::metrics::BrokerMetrics;
use pipeline::partition::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The model served at start-up.
pub struct StartModel {
    /// The model.
    pub model: ServedModel,
    /// Hash of the artifact file it was read from (`None` when fitted on `DATA_PATH`): the
    /// baseline of the artifact watcher.
    pub artifact_hash: Option<artifact::ContentHash>,
}

/// The model to serve at start-up: the artifact at `MODEL_PATH`, or a fit on `DATA_PATH` (also
/// when `MODEL_PATH` names a file that does not exist yet: the watcher loads it once it appears):
/// the linear regression, or under `TASK=classification` the logistic regression.
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
        let (model, hash) = ServedModel::load(path)?;
        announce_served(&model, &path.display().to_string());
        return Ok(StartModel {
            model,
            artifact_hash: Some(hash),
        });
    }
    let data = Dataset::from_csv_for(
        &config.data_path,
        config.target_column.as_deref(),
        config.task,
    )
    .with_context(|| {
        format!(
            "cannot load the training data (DATA_PATH, TASK={})",
            config.task
        )
    })?;
    let model = ServedModel::fit_for(&data, config.task)?;
    match &model.engine {
        Engine::Linear(linear) => {
            let fit = linear.evaluate(&data)?;
            tracing::info!(
                version = %model.version,
                features = model.n_features(),
                rows = fit.rows,
                r2 = fit.r2,
                mae = fit.mae,
                intercept = linear.intercept,
                coefficients = ?linear.coefficients,
                "fitted linear regression on {}",
                config.data_path.display()
            );
        }
        Engine::Logistic(logistic) => {
            let fit = logistic.evaluate(&data)?;
            let classes: Vec<String> = logistic.classes.iter().map(ToString::to_string).collect();
            tracing::info!(
                version = %model.version,
                features = model.n_features(),
                rows = fit.rows,
                accuracy = fit.accuracy,
                log_loss = fit.log_loss,
                classes = %classes.join(","),
                "fitted logistic regression on {}",
                config.data_path.display()
            );
        }
        Engine::Onnx(_) => {}
    }
    Ok(StartModel {
        model,
        artifact_hash: None,
    })
}

/// The model to serve at start-up with `MODEL_URL`: the artifact it answers with, or, while it
/// cannot be fetched or is not a valid artifact, the fit on `DATA_PATH` (a replica must serve
/// something; the watcher swaps in the artifact once the URL answers, and says why meanwhile).
pub async fn load_from_url(
    config: &Config,
    source: &mut ArtifactSource,
) -> anyhow::Result<StartModel> {
    let why = match source.read().await {
        Reading::Bytes(bytes) => match ServedModel::parse(&bytes) {
            Ok(model) => {
                announce_served(&model, &source.describe());
                return Ok(StartModel {
                    model,
                    artifact_hash: Some(artifact::ContentHash::of(&bytes)),
                });
            }
            Err(err) => format!("not a valid model artifact: {err:#}"),
        },
        Reading::Unchanged => "no artifact yet".to_owned(),
        Reading::Unavailable(cause) => cause,
    };
    tracing::warn!(source = %source.describe(), reason = %why, "no model artifact from MODEL_URL at start-up: fitting on DATA_PATH, and serving the artifact once it can be fetched");
    let mut without = config.clone();
    without.model_url = None;
    without.model_path = None;
    load_model(&without)
}

/// Says what is served from an artifact, and what it lacks.
fn announce_served(model: &ServedModel, from: &str) {
    tracing::info!(
        version = %model.version,
        family = model.family(),
        task = %model.task(),
        features = model.n_features(),
        named_features = model.feature_names().is_some(),
        drift_reference = model.reference.is_some(),
        "serving model artifact {from}"
    );
    if let Engine::Onnx(graph) = &model.engine
        && let Some(caveat) = graph.caveat()
    {
        tracing::warn!(version = %model.version, "{caveat}");
    }
    if model.reference.is_none() {
        tracing::info!(
            "the artifact has no reference statistics (an older `model train`, or an ONNX model not stamped with `model stamp --data`): no drift figures"
        );
    }
}

/// Runs the model service until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    crate::onnx::use_runtime_library(config.ort_dylib_path.as_deref());
    let mut source = ArtifactSource::of(config.model_path.as_ref(), config.model_url.as_ref());
    let start = match source.as_mut() {
        Some(url @ ArtifactSource::Url { .. }) => load_from_url(&config, url).await?,
        _ => load_model(&config)?,
    };
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
    let health = Health::new();
    let watcher = source.map(|source| {
        tokio::spawn(artifact::watch_artifact(
            source,
            start.artifact_hash,
            Duration::from_millis(config.model_poll_ms.max(10)),
            model_tx,
            reloads,
            health.clone(),
            shutdown.clone(),
        ))
    });
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
            model_rx.clone(),
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
    let features = Router::new(&queues.features_queue, queues.partitions);
    let inputs: Vec<&str> = features.queues().iter().map(String::as_str).collect();
    let topology = Topology::new(&config.broker, &[])
        .with_stream(Stream::Features, &queues.features_queue, queues.partitions)
        .with_stream(Stream::YPred, &queues.y_pred_queue, queues.partitions);
    let spec = ConsumerSpec {
        // Every partition: replicas compete on each, so `--scale model=N` works at any count.
        inputs: &inputs,
        topology,
        consume: config.consume.clone(),
        exclusive: false,
        service: "model",
    };
    let mut predictor = Predictor {
        model: model_rx,
        // Looked up once: the hot path does no label hashing.
        features_counters: inputs.iter().map(|q| broker.metrics.queue(q)).collect(),
        y_pred: Router::new(&queues.y_pred_queue, queues.partitions),
        features: features.clone(),
        format: BodyFormat::of(config.broker.topology),
        body: Vec::with_capacity(256),
        drift: drift.as_ref().map(|(monitor, _)| monitor.clone()),
        arranged: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command, IDENTITY};
    use pipeline::classes::Task;
    use pipeline::service::ServiceCommand;

    fn iris() -> String {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/models/fixtures/iris.csv"
        )
        .to_owned()
    }

    /// No artifact yet and TASK=classification: the logistic regression is fitted on DATA_PATH;
    /// the same data under TASK=regression is refused, naming the setting.
    #[test]
    fn task_classification_fits_the_logistic_regression_when_there_is_no_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("model.json").display().to_string();
        let args = |task: &str| {
            Cli::try_parse_for(
                &IDENTITY,
                [
                    "model",
                    "--task",
                    task,
                    "--data-path",
                    &iris(),
                    "--model-path",
                    &missing,
                ],
            )
            .unwrap()
        };
        let cli = args("classification");
        assert_eq!(cli.config.task, Task::Classification);
        let start = load_model(&cli.config).unwrap();
        assert_eq!(start.model.family(), "logistic");
        assert_eq!(start.model.task(), Task::Classification);
        assert!(start.artifact_hash.is_none());
        let err = format!(
            "{:#}",
            load_model(&args("regression").config).err().unwrap()
        );
        assert!(
            err.contains("TASK=regression") && err.contains("setosa"),
            "{err}"
        );
    }

    #[test]
    fn model_train_takes_a_task() {
        let cli = Cli::try_parse_for(
            &IDENTITY,
            [
                "model",
                "train",
                "--data",
                "d.csv",
                "--out",
                "m.json",
                "--task",
                "classification",
            ],
        )
        .unwrap();
        let Some(ServiceCommand::Own(Command::Train { task, .. })) = cli.command else {
            panic!("not train");
        };
        assert_eq!(task, Task::Classification);
        assert!(
            Cli::try_parse_for(
                &IDENTITY,
                [
                    "model", "train", "--data", "d", "--out", "m", "--task", "ranking"
                ],
            )
            .is_err()
        );
    }
}
