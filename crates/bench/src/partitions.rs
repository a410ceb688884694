//! The `partitions` phase (issue 19, "Past one machine"): the pipeline with `PARTITIONS` 1, 2, 4
//! and 8 and 1, 2 and 4 metric instances (three model replicas), on a private three-node cluster
//! with quorum and with classic queues, and `PARTITIONS` 1 against 4 on one private node. For each
//! run: samples/s at full speed and the CPU time per sample of each component, broker nodes
//! included. The nodes are killed when the phase ends, also on error.

use crate::process::{Service, cpu_seconds};
use crate::{Bench, progress};
use anyhow::{Context as _, anyhow, bail};
use pipeline::config::QueueType;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::broker_node::{BrokerCluster, BrokerNode};
use testkit::{Env, Queues};

/// Model replicas in every run.
pub const MODELS: usize = 3;
/// Partition counts measured on the cluster.
pub const PARTITIONS: [u32; 4] = [1, 2, 4, 8];
/// Metric instance counts measured on the cluster (each at most the partition count).
pub const INSTANCES: [u32; 3] = [1, 2, 4];

/// CPU microseconds per sample, by component.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuPerSample {
    /// The producer.
    pub features: f64,
    /// The model replicas together.
    pub model: f64,
    /// The metric instances together.
    pub metric: f64,
    /// The broker nodes together.
    pub broker: f64,
}

impl CpuPerSample {
    /// All components.
    pub fn total(&self) -> f64 {
        self.features + self.model + self.metric + self.broker
    }
}

/// One full-speed run.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionRun {
    /// Broker nodes.
    pub nodes: usize,
    /// `quorum` or `classic`.
    pub queue_type: &'static str,
    /// `PARTITIONS`.
    pub partitions: u32,
    /// `METRIC_INSTANCES`.
    pub metric_instances: u32,
    /// Samples sent (and rows written).
    pub samples: u64,
    /// From the producer's start to the last row.
    pub seconds: f64,
    /// `samples / seconds`.
    pub samples_per_second: f64,
    /// CPU time per sample.
    pub cpu_us_per_sample: CpuPerSample,
}

/// Where one run's broker is.
struct Broker {
    url: String,
    /// The nodes' OS processes, for their CPU time.
    pids: Vec<u32>,
    nodes: usize,
    queue_type: QueueType,
}

/// Runs every configuration; a run that fails is reported and the others go on.
pub async fn measure(bench: &Bench) -> anyhow::Result<Vec<PartitionRun>> {
    let samples = bench.cli.partition_samples;
    let mut runs = Vec::new();
    progress!("partitions: starting a private RabbitMQ node");
    let node = tokio::task::spawn_blocking(|| BrokerNode::start("bench-one"))
        .await
        .map_err(|err| anyhow!("the private node did not start: {err}"))?;
    let one = Broker {
        url: node.amqp_url(),
        pids: node.os_pid().into_iter().collect(),
        nodes: 1,
        queue_type: QueueType::Classic,
    };
    for partitions in [1, 4] {
        keep(&mut runs, run(bench, &one, partitions, 1, samples).await);
    }
    let _ = tokio::task::spawn_blocking(move || drop(node)).await;

    progress!("partitions: starting a private three-node cluster");
    let cluster = tokio::task::spawn_blocking(|| BrokerCluster::start(3))
        .await
        .map_err(|err| anyhow!("the private cluster did not start: {err}"))?;
    for queue_type in [QueueType::Quorum, QueueType::Classic] {
        let on_cluster = Broker {
            url: cluster.amqp_urls(),
            pids: cluster
                .nodes
                .iter()
                .filter_map(BrokerNode::os_pid)
                .collect(),
            nodes: cluster.nodes.len(),
            queue_type,
        };
        for partitions in PARTITIONS {
            for instances in INSTANCES.into_iter().filter(|i| *i <= partitions) {
                keep(
                    &mut runs,
                    run(bench, &on_cluster, partitions, instances, samples).await,
                );
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    Ok(runs)
}

/// Keeps a run's result; a failed run is reported and left out.
fn keep(runs: &mut Vec<PartitionRun>, result: anyhow::Result<PartitionRun>) {
    match result {
        Ok(run) => runs.push(run),
        Err(err) => progress!("partitions: a run failed: {err:#}"),
    }
}

/// One configuration: metric instances and model replicas started and healthy, then a producer
/// at full speed; done when every row is written.
async fn run(
    bench: &Bench,
    broker: &Broker,
    partitions: u32,
    instances: u32,
    samples: u64,
) -> anyhow::Result<PartitionRun> {
    let queue_type = match broker.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    let phase = format!("p{partitions}i{instances}{queue_type}{}", broker.nodes);
    progress!(
        "partitions: {} node(s), {queue_type}, PARTITIONS={partitions}, {instances} metric instance(s), {MODELS} models, {samples} samples",
        broker.nodes
    );
    // The queues go with the private nodes: none are registered for deletion.
    let queues = Queues::with_prefix(&format!("bench.{}.{phase}", bench.run_id));
    let dir = tempfile::Builder::new()
        .prefix(&format!("bench-{phase}-"))
        .tempdir()
        .context("cannot create a temporary folder")?;
    let logs = dir.path().join("logs");
    let env = |rust_log: &str| -> Env {
        bench
            .service_env(&queues, rust_log)
            .set("AMQP_URL", &broker.url)
            .set("QUEUE_TYPE", queue_type)
            .set("PARTITIONS", partitions)
    };
    let mut metrics = Vec::new();
    for instance in 0..instances {
        let env = env("warn")
            .set("LOG_DIR", logs.display())
            .set("METRIC_INSTANCES", instances)
            .set("METRIC_INSTANCE", instance);
        metrics.push(Service::spawn(
            format!("metric {instance}"),
            &bench.binaries.metric,
            env,
            dir.path(),
        )?);
    }
    let mut models = Vec::new();
    for n in 0..MODELS {
        models.push(Service::spawn(
            format!("model {n}"),
            &bench.binaries.model,
            env("warn").with(bench.cli.model_env.iter().cloned()),
            dir.path(),
        )?);
    }
    for service in metrics.iter_mut().chain(models.iter_mut()) {
        service
            .wait_healthy(Duration::from_secs(90), Duration::from_millis(20))
            .await?;
    }
    let cpu = |services: &[Service]| -> anyhow::Result<f64> {
        services
            .iter()
            .map(|s| Ok(s.usage_now()?.cpu_seconds))
            .sum()
    };
    let broker_cpu = || -> f64 {
        broker
            .pids
            .iter()
            .filter_map(|pid| cpu_seconds(Some(*pid)))
            .sum()
    };
    let (metric_before, model_before, broker_before) =
        (cpu(&metrics)?, cpu(&models)?, broker_cpu());
    let started = Instant::now();
    let producer_env = env("warn")
        .set("COUNT", samples)
        .set("RATE", 0)
        .set("CONFIRM_WINDOW", bench.cli.confirm_window)
        .set("ORDER", "random");
    let mut features = Service::spawn(
        "features",
        &bench.binaries.features,
        producer_env,
        dir.path(),
    )?;
    let deadline = Duration::from_secs(600);
    loop {
        let written = rows(&logs, partitions);
        if written >= samples {
            break;
        }
        if started.elapsed() > deadline {
            bail!("{written} rows of {samples} after {deadline:?}");
        }
        for service in metrics.iter_mut().chain(models.iter_mut()) {
            if !service.is_running() {
                bail!(
                    "{} stopped during the run\n{}",
                    service.name,
                    service.stderr_tail(20)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (metric_after, model_after, broker_after) = (cpu(&metrics)?, cpu(&models)?, broker_cpu());
    let features_cpu = features
        .wait_exit(Duration::from_secs(60))
        .await?
        .usage
        .cpu_seconds;
    for service in metrics.iter_mut().chain(models.iter_mut()) {
        service.stop().await?;
    }
    let per_sample = |seconds: f64| seconds * 1e6 / samples as f64;
    let result = PartitionRun {
        nodes: broker.nodes,
        queue_type,
        partitions,
        metric_instances: instances,
        samples,
        seconds,
        samples_per_second: samples as f64 / seconds,
        cpu_us_per_sample: CpuPerSample {
            features: per_sample(features_cpu),
            model: per_sample(model_after - model_before),
            metric: per_sample(metric_after - metric_before),
            broker: per_sample(broker_after - broker_before),
        },
    };
    progress!(
        "partitions: {:.0} samples/s, {:.0} µs CPU per sample (broker {:.0})",
        result.samples_per_second,
        result.cpu_us_per_sample.total(),
        result.cpu_us_per_sample.broker
    );
    Ok(result)
}

/// Rows written so far in every partition's `metric_log.csv` (header lines not counted).
fn rows(logs: &Path, partitions: u32) -> u64 {
    let count = |csv: &Path| -> u64 {
        std::fs::read(csv)
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count() as u64)
            .unwrap_or(0)
            .saturating_sub(1)
    };
    if partitions == 1 {
        count(&logs.join("metric_log.csv"))
    } else {
        (0..partitions)
            .map(|k| count(&logs.join(format!("p{k}")).join("metric_log.csv")))
            .sum()
    }
}
