//! Start-up of the metric service: [`run`] takes the lock on each partition's folder, registers the
//! metrics, rebuilds each partition's state from its files, serves HTTP and consumes until
//! shutdown.
//!
//! The partition is the unit ([`Partition`]): its folder, queues, lock, recorder and consumer.
//! With `PARTITIONS=1` the instance owns one, whose folder is `LOG_DIR` and whose queues are the
//! streams' own names. With more, it owns those [`Config::ownership`] gives it, in `LOG_DIR/p<k>/`,
//! each on its own connection, their series labelled `partition="p<k>"`, behind one HTTP endpoint;
//! a second process of the same instance waits for the locks as a standby and takes over when the
//! first ends.

use crate::api;
use crate::audit::AuditMetrics;
use crate::classification::ClassQuality;
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
    let partitions = config.queues.partitions;
    let health = Health::new();
    let (owned, served) = owned_partitions(&config, &health)?;
    let places: Vec<(u32, Config)> = owned.iter().map(|&k| (k, config.partition(k))).collect();
    // A standby waits here until the active instance's process ends.
    let mut locks = Vec::new();
    for (_, place) in &places {
        match lock(place, &shutdown).await? {
            Some(lock) => locks.push(lock),
            None => return Ok(()),
        }
    }

    let mut registry = Registry::default();
    let owned_gauge = Family::<PartitionLabel, Gauge>::default();
    if partitions.is_partitioned() {
        registry.register(
            "pipeline_metric_partition_owned",
            "1 for each partition this metric instance serves",
            owned_gauge.clone(),
        );
    }
    let mut units = Vec::new();
    for (k, place) in places {
        owned_gauge.get_or_create(&PartitionLabel::of(k)).set(1);
        units.push(Partition::start(place, k, &mut registry, &health)?);
    }
    pipeline::broker::topology::announce(
        &config.broker,
        &[&config.queues.y_true_queue, &config.queues.y_pred_queue],
        &health,
    );
    let http = pipeline::http::spawn_with(
        config.http_addr,
        Arc::new(registry),
        health.clone(),
        routes(&units, &health, served)?,
        shutdown.clone().cancelled_owned(),
    )
    .await?;

    // With several partitions each reports to a health of its own, gathered into the service's
    // here; one partition reports to the service's health directly.
    let parts: Vec<(String, Health)> = if partitions.is_partitioned() {
        units
            .iter()
            .map(|unit| (format!("p{}", unit.k), unit.health.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let gather = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            if parts.is_empty() {
                return;
            }
            loop {
                health.gather("partitions", &parts);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    let consumers = units
        .into_iter()
        .map(|unit| unit.consume(&config, &shutdown));
    let (results, ()) = tokio::join!(futures_util::future::join_all(consumers), gather);
    shutdown.cancel();
    let _ = http.await;
    drop(locks);
    results.into_iter().collect()
}

/// The partitions this instance serves: the one of `PARTITIONS=1`, else its share, said in the log
/// and on `/healthz` (the sentence is returned too, for the dashboard).
fn owned_partitions(config: &Config, health: &Health) -> anyhow::Result<(Vec<u32>, String)> {
    let partitions = config.queues.partitions;
    if !partitions.is_partitioned() {
        return Ok((vec![0], String::new()));
    }
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
    health.set_note("served", Some(served.clone()));
    Ok((owned, served))
}

/// The lock on a partition's folder (`place`: its settings). With one partition a second process
/// is refused at once; with several it waits as a standby (`None`: shutdown came first).
async fn lock(
    place: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<files::DirLock>> {
    if place.queues.partitions.is_partitioned() {
        files::lock_dir_waiting(&place.log_dir, shutdown).await
    } else {
        files::lock_dir(&place.log_dir).map(Some)
    }
}

/// The HTTP routes: the dashboard and `GET /api/quality`; with several partitions, each
/// partition's dashboard at `/p<k>` (the first one's also at `/`) and one quality report over all.
fn routes(units: &[Partition], health: &Health, served: String) -> anyhow::Result<axum::Router> {
    let Some(first) = units.first() else {
        anyhow::bail!("this metric instance owns no partition");
    };
    if !first.config.queues.partitions.is_partitioned() {
        return Ok(first
            .page(health, None)
            .merge(api::routes(first.recorder.quality.shared_alarms())));
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
    let page = |unit: &Partition| unit.page(health, Some(Arc::clone(&view)));
    let alarms = units
        .iter()
        .map(|unit| unit.recorder.quality.shared_alarms())
        .collect();
    Ok(units.iter().fold(
        page(first).merge(api::merged_routes(alarms)),
        |routes, unit| routes.nest(&format!("/p{}", unit.k), page(unit)),
    ))
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
    let mut quality = Quality::register(
        registry,
        config.quality_window,
        config.model_versions_kept as usize,
        config.quality_alert_ratio,
    )
    .with_retire_after(Duration::from_secs(config.quality_retire_secs));
    let classes = ClassQuality::for_task(config, registry, &mut quality);
    let recorder = Recorder::start(
        config,
        partition,
        quality,
        classes,
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

/// One owned partition, the unit of the service: its settings (folder and queues), recorder,
/// broker state and health.
struct Partition {
    k: u32,
    config: Config,
    recorder: Recorder,
    broker_metrics: BrokerMetrics,
    health: Health,
}

impl Partition {
    /// Partition `k`, with its settings `place` ([`Config::partition`]): its series in
    /// `registry` (labelled `partition="p<k>"` with several partitions), its state rebuilt from its
    /// files.
    fn start(
        place: Config,
        k: u32,
        registry: &mut Registry,
        health: &Health,
    ) -> anyhow::Result<Self> {
        let partitions = place.queues.partitions;
        let (registry, health, partition) = if partitions.is_partitioned() {
            let label = (Cow::Borrowed("partition"), Cow::Owned(format!("p{k}")));
            (
                registry.sub_registry_with_label(label),
                Health::new(),
                Some((partitions, k as usize)),
            )
        } else {
            (registry, health.clone(), None)
        };
        let (mut recorder, broker_metrics) =
            start_recorder(&place, partition, registry, health.clone())?;
        recorder.update_flow();
        Ok(Self {
            k,
            config: place,
            recorder,
            broker_metrics,
            health,
        })
    }

    /// Its dashboard; `view` lists the instance's other partitions when it has several.
    fn page(&self, health: &Health, view: Option<Arc<dashboard::InstanceView>>) -> axum::Router {
        dashboard::routes(dashboard::Live {
            snapshot: self.recorder.dashboard.shared(),
            connected: self.broker_metrics.connected.clone(),
            health: health.clone(),
            dead_letters: self.recorder.dashboard.dead_letters(),
            partitions: view.map(|view| (view, format!("p{}", self.k))),
        })
    }

    /// Consumes its queues until shutdown; one partition that cannot go on stops the instance (a
    /// restart brings all back).
    async fn consume(self, service: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            mut recorder,
            broker_metrics,
            health,
            ..
        } = self;
        let streams = &service.queues;
        let partitions = streams.partitions;
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
                .with_stream(Stream::YTrue, &streams.y_true_queue, partitions)
                .with_stream(Stream::YPred, &streams.y_pred_queue, partitions),
            consume: config.consume.clone(),
            // Partition queues are single-active-consumer: a standby's consumer waits instead of
            // being refused. One plain queue pair: one consumer, the lock on LOG_DIR says why.
            exclusive: !partitions.is_partitioned(),
            service: "metric",
        };
        let result = run_consumer(&mut broker, &spec, &mut recorder, shutdown).await;
        recorder.finish();
        shutdown.cancel();
        result
    }
}

/// The label of `pipeline_metric_partition_owned`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    partition: String,
}

impl PartitionLabel {
    fn of(k: u32) -> Self {
        Self {
            partition: format!("p{k}"),
        }
    }
}
