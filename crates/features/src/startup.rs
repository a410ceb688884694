//! Start-up and shut-down of the producer: loads the data set, serves HTTP, runs the publishing
//! loop, and lingers for a last scrape when `COUNT` is done.

use crate::audit::AuditOut;
use crate::config::Config;
use crate::pacer::Pacer;
use crate::producer::{Producer, Routes};
use crate::sampler::Sampler;
use anyhow::Context as _;
use pipeline::broker::Broker;
use pipeline::dataset::Dataset;
use pipeline::health::Health;
use pipeline::messages::BodyFormat;
use pipeline::metrics::BrokerMetrics;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Runs the producer until `COUNT` samples are confirmed or `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    let data = Dataset::from_csv_for(
        &config.data_path,
        config.target_column.as_deref(),
        config.task,
    )
    .context("cannot load the data set (DATA_PATH)")?;
    if !(config.rate.is_finite() && config.rate >= 0.0) {
        anyhow::bail!("RATE must be a number >= 0, got {}", config.rate);
    }
    tracing::info!(
        rows = data.len(),
        features = data.n_features(),
        task = %config.task,
        classes = data.classes().map_or(0, <[_]>::len),
        rate = config.rate,
        count = config.count,
        order = ?config.order,
        "streaming {}",
        config.data_path.display()
    );
    let drift = config.drift(&data.feature_names)?;
    if let Some(shift) = config.drift_shift.as_ref().filter(|_| drift.is_on()) {
        tracing::info!(after = config.drift_after, shift = %shift, "simulating drift: shifting features after DRIFT_AFTER samples");
    }

    let mut registry = Registry::default();
    let metrics = BrokerMetrics::register(&mut registry);
    let health = Health::new();
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.features_queue, &config.queues.y_true_queue],
        &health,
    );
    let http = pipeline::http::spawn(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    // The course's consumers know nothing of headers; ours check the names (pipeline::schema).
    let feature_names = (BodyFormat::of(config.broker.topology) == BodyFormat::Native)
        .then(|| crate::producer::feature_names_headers(&data.feature_names));
    let mut producer = Producer {
        feature_names,
        sampler: Sampler::new(config.order, config.seed, data.len()),
        pacer: Pacer::new(config.rate),
        data,
        retry: VecDeque::new(),
        generated: 0,
        confirmed: 0,
        drain_timed_out: false,
        refusals: Default::default(),
        body: Vec::with_capacity(512),
        drift,
        drifted_row: Vec::new(),
        routes: Routes::new(&config.queues),
        audit: AuditOut::new(
            config.audit_window_secs,
            config.broker.topology,
            &config.queues,
        ),
        config,
    };
    if let Some(audit) = &producer.audit {
        tracing::info!(
            producer = audit.producer(),
            window_secs = producer.config.audit_window_secs,
            "loss audit on: announcing windows to {}",
            audit.queues().join(", ")
        );
    }
    let mut broker = Broker::new(producer.config.broker.clone(), "features", metrics, health);
    let result = producer.run(&mut broker, &shutdown).await;
    if producer.finished() && producer.config.linger_secs > 0 {
        // Let a Prometheus scrape see the final counts before the endpoint goes away.
        tracing::info!(
            linger_secs = producer.config.linger_secs,
            "all samples confirmed; still serving /metrics"
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(producer.config.linger_secs)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    shutdown.cancel();
    let _ = http.await;
    result
}
