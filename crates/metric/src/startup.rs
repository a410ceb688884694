//! Start-up of the metric service: [`run`] takes the lock on `LOG_DIR`, registers the metrics,
//! rebuilds the state from the files, serves HTTP and consumes until shutdown.

use crate::api;
use crate::config::Config;
use crate::dashboard;
use crate::files;
use crate::handler::Recorder;
use crate::metrics::JoinMetrics;
use crate::plotter::Plotter;
use crate::quality::Quality;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::{Broker, Topology, run_consumer};
use pipeline::health::Health;
use pipeline::metrics::BrokerMetrics;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

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
    )
    .with_retire_after(Duration::from_secs(config.quality_retire_secs));
    let health = Health::new();
    let mut recorder = Recorder::start(
        &config,
        quality,
        join_metrics,
        Plotter::new(&config),
        health.clone(),
        // Looked up once: the hot path does no label hashing.
        [
            broker_metrics.queue(&config.queues.y_true_queue),
            broker_metrics.queue(&config.queues.y_pred_queue),
        ],
    )?;
    let connected = broker_metrics.connected.clone();

    recorder.update_flow();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.y_true_queue, &config.queues.y_pred_queue],
        &health,
    );
    let registry = Arc::new(registry);
    let routes = dashboard::routes(dashboard::Live {
        snapshot: recorder.dashboard.shared(),
        connected,
        health: health.clone(),
        dead_letters: recorder.dashboard.dead_letters(),
    })
    .merge(api::routes(recorder.quality.shared_alarms()));
    let http = pipeline::http::spawn_with(
        config.http_addr,
        registry,
        health.clone(),
        routes,
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
