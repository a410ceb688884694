//! Start-up of the metric service: [`run`] takes the lock on `LOG_DIR`, registers the metrics,
//! rebuilds the state from the files, serves HTTP and consumes until shutdown.
//!
//! With `PARTITIONS > 1` it does the same for each partition the instance owns
//! ([`Config::ownership`]), in `LOG_DIR/p<k>/` with its own lock, connection, join and quality
//! figures (their series labelled `partition="p<k>"`), behind one HTTP endpoint. A second process
//! of the same instance waits for the locks as a standby and takes over when the first ends.

use crate::api;
use crate::audit::AuditMetrics;
use crate::config::Config;
use crate::dashboard;
use crate::files;
use crate::handler::Recorder;
use crate::metrics::JoinMetrics;
use crate::plotter::Plotter;
use crate::quality::Quality;
use pipeline::CancellationToken;
use pipeline::broker::consumer::ConsumerSpec;
use pipeline::broker::{Broker, Stream, Topology, run_consumer};
use pipeline::health::Health;
use pipeline::metrics::BrokerMetrics;
use pipeline::partition::Partitions;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// Runs the metric service until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = pipeline::shutdown::token_from(shutdown);
    if config.queues.partitions.is_partitioned() {
        return run_partitions(config, shutdown).await;
    }
    let _lock = files::lock_dir(&config.log_dir)?;

    let mut registry = Registry::default();
    let health = Health::new();
    let (mut recorder, broker_metrics) =
        start_recorder(&config, None, &mut registry, health.clone())?;
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
        partitions: None,
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
    let audit_queue = pipeline::audit::audit_queue(&queues.y_true_queue);
    let mut inputs = vec![queues.y_true_queue.as_str(), queues.y_pred_queue.as_str()];
    if config.audits() {
        inputs.push(&audit_queue);
    }
    let spec = ConsumerSpec {
        inputs: &inputs,
        topology: Topology::new(&config.broker, &inputs[2..])
            .with_stream(Stream::YTrue, &queues.y_true_queue, queues.partitions)
            .with_stream(Stream::YPred, &queues.y_pred_queue, queues.partitions),
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

/// Registers one recorder's metrics in `registry` and rebuilds its state from its folder.
fn start_recorder(
    config: &Config,
    partition: Option<(Partitions, usize)>,
    registry: &mut Registry,
    health: Health,
) -> anyhow::Result<(Recorder, BrokerMetrics)> {
    let broker_metrics = BrokerMetrics::register(registry);
    let join_metrics = JoinMetrics::register(registry);
    let audit_metrics = AuditMetrics::register(registry);
    let quality = Quality::register(
        registry,
        config.quality_window,
        config.model_versions_kept as usize,
        config.quality_alert_ratio,
    )
    .with_retire_after(Duration::from_secs(config.quality_retire_secs));
    let recorder = Recorder::start(
        config,
        partition,
        quality,
        join_metrics,
        audit_metrics,
        Plotter::new(config),
        health,
        // Looked up once: the hot path does no label hashing.
        [
            broker_metrics.queue(&config.queues.y_true_queue),
            broker_metrics.queue(&config.queues.y_pred_queue),
        ],
    )?;
    Ok((recorder, broker_metrics))
}

/// One owned partition: its settings (folder and queues), recorder and broker state.
struct Partition {
    k: u32,
    config: Config,
    recorder: Recorder,
    broker_metrics: BrokerMetrics,
    health: Health,
}

/// `run` with `PARTITIONS > 1`: every owned partition consumed on its own connection.
async fn run_partitions(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let partitions = config.queues.partitions;
    let ownership = config.ownership()?;
    let owned = ownership.owned(partitions);
    let served = format!(
        "instance {} of {} serves partitions {} of {}",
        ownership.instance(),
        ownership.instances(),
        owned
            .iter()
            .map(|k| format!("p{k}"))
            .collect::<Vec<_>>()
            .join(", "),
        partitions
    );
    tracing::info!(log_dir = %config.log_dir.display(), "{served}");
    // A standby waits here until the active instance's process ends.
    let mut locks = Vec::new();
    for k in &owned {
        match files::lock_dir_waiting(&partitions.folder(&config.log_dir, *k), &shutdown).await? {
            Some(lock) => locks.push(lock),
            None => return Ok(()),
        }
    }

    let mut registry = Registry::default();
    let owned_gauge = Family::<PartitionLabel, Gauge>::default();
    registry.register(
        "pipeline_metric_partition_owned",
        "1 for each partition this metric instance serves",
        owned_gauge.clone(),
    );
    let health = Health::new();
    health.set_note("served", Some(served.clone()));
    let mut units = Vec::new();
    for k in owned {
        let mut unit_config = config.clone();
        unit_config.log_dir = partitions.folder(&config.log_dir, k);
        let queues = &mut unit_config.queues;
        queues.y_true_queue = partitions.queue(&config.queues.y_true_queue, k);
        queues.y_pred_queue = partitions.queue(&config.queues.y_pred_queue, k);
        let label = format!("p{k}");
        owned_gauge
            .get_or_create(&PartitionLabel {
                partition: label.clone(),
            })
            .set(1);
        let part_health = Health::new();
        let sub = registry.sub_registry_with_label((Cow::Borrowed("partition"), Cow::Owned(label)));
        let (mut recorder, broker_metrics) = start_recorder(
            &unit_config,
            Some((partitions, k as usize)),
            sub,
            part_health.clone(),
        )?;
        recorder.update_flow();
        units.push(Partition {
            k,
            config: unit_config,
            recorder,
            broker_metrics,
            health: part_health,
        });
    }
    let view = Arc::new(dashboard::InstanceView {
        served,
        partitions: units
            .iter()
            .map(|unit| {
                (
                    format!("p{}", unit.k),
                    unit.recorder.quality.pairs_counter(),
                    unit.recorder.metrics.waiting.clone(),
                )
            })
            .collect(),
    });
    // Each partition's dashboard at /p<k>, the first one's also at /.
    let page = |unit: &Partition| {
        dashboard::routes(dashboard::Live {
            snapshot: unit.recorder.dashboard.shared(),
            connected: unit.broker_metrics.connected.clone(),
            health: health.clone(),
            dead_letters: unit.recorder.dashboard.dead_letters(),
            partitions: Some((Arc::clone(&view), format!("p{}", unit.k))),
        })
    };
    let Some(first) = units.first() else {
        anyhow::bail!("this metric instance owns no partition");
    };
    let routes = units.iter().fold(
        page(first).merge(api::merged_routes(
            units
                .iter()
                .map(|unit| unit.recorder.quality.shared_alarms())
                .collect(),
        )),
        |routes, unit| routes.nest(&format!("/p{}", unit.k), page(unit)),
    );
    let http = pipeline::http::spawn_with(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        routes,
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    let parts: Vec<(String, Health)> = units
        .iter()
        .map(|unit| (format!("p{}", unit.k), unit.health.clone()))
        .collect();
    let gather = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            loop {
                health.gather("partitions", &parts);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    let streams = [
        config.queues.y_true_queue.clone(),
        config.queues.y_pred_queue.clone(),
    ];
    let consumers = units.into_iter().map(|unit| {
        let (shutdown, streams) = (shutdown.clone(), &streams);
        async move {
            let Partition {
                config,
                mut recorder,
                broker_metrics,
                health,
                ..
            } = unit;
            let mut broker = Broker::new(config.broker.clone(), "metric", broker_metrics, health);
            let audit_queue = pipeline::audit::audit_queue(&config.queues.y_true_queue);
            let mut inputs = vec![
                config.queues.y_true_queue.as_str(),
                config.queues.y_pred_queue.as_str(),
            ];
            if config.audits() {
                inputs.push(&audit_queue);
            }
            let spec = ConsumerSpec {
                inputs: &inputs,
                topology: Topology::new(&config.broker, &inputs[2..])
                    .with_stream(Stream::YTrue, &streams[0], config.queues.partitions)
                    .with_stream(Stream::YPred, &streams[1], config.queues.partitions),
                consume: config.consume.clone(),
                // Single-active-consumer queues: a second consumer waits instead of being refused.
                exclusive: false,
                service: "metric",
            };
            let result = run_consumer(&mut broker, &spec, &mut recorder, &shutdown).await;
            recorder.finish();
            // One partition that cannot go on stops the instance: a restart brings all back.
            shutdown.cancel();
            result
        }
    });
    let (results, ()) = tokio::join!(futures_util::future::join_all(consumers), gather);
    shutdown.cancel();
    let _ = http.await;
    drop(locks);
    results.into_iter().collect()
}

/// The label of `pipeline_metric_partition_owned`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    partition: String,
}
