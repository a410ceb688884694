//! Quorum queues on a three-node cluster of private RabbitMQ nodes, started with the end-to-end
//! tests' own node handling (`testkit::broker_node`): the pipeline's
//! throughput and its latency at half that rate, with `QUEUE_TYPE=quorum` and `AMQP_URL` listing
//! the three nodes. The nodes are killed when the phase ends, also on error.

use crate::broker::QueueLedger;
use crate::pipeline_run::{self, LatencyResult, ThroughputResult};
use crate::{Bench, progress};
use anyhow::anyhow;
use pipeline::config::QueueType;
use serde::Serialize;

use testkit::broker_node;

/// Nodes in the cluster.
pub const NODES: usize = 3;

/// The quorum runs.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterResult {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Full speed.
    pub throughput: ThroughputResult,
    /// At half of that.
    pub latency: LatencyResult,
}

/// Starts the cluster, runs the pipeline on it, and stops it.
pub async fn measure(bench: &Bench) -> anyhow::Result<ClusterResult> {
    progress!("cluster: starting {NODES} private RabbitMQ nodes");
    let cluster = tokio::task::spawn_blocking(|| broker_node::BrokerCluster::start(NODES))
        .await
        .map_err(|err| anyhow!("the private cluster did not start: {err}"))?;
    let mut cli = bench.cli.clone();
    cli.broker.amqp_url = cluster.amqp_urls();
    cli.broker.queue_type = QueueType::Quorum;
    let on_cluster = Bench {
        cli,
        binaries: bench.binaries.clone(),
        data_path: bench.data_path.clone(),
        data: bench.data.clone(),
        run_id: bench.run_id.clone(),
        // The queues go with the nodes.
        ledger: QueueLedger::default(),
        broker_pid: None,
    };
    let samples = bench.cli.cluster_samples;
    progress!("cluster: quorum queues at full speed, {samples} samples");
    let throughput = pipeline_run::throughput(&on_cluster, "quorum", samples, 1, false).await?;
    let rate = throughput.samples_per_second / 2.0;
    progress!(
        "cluster: {:.0} samples/s; latency at {rate:.0} samples/s",
        throughput.samples_per_second
    );
    let latency = pipeline_run::latency(
        &on_cluster,
        "quorum-latency",
        ((rate * bench.cli.curve_seconds) as u64).max(bench.cli.curve_min_samples),
        rate,
    )
    .await?;
    // Dropping the nodes blocks (kill, wait): off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    Ok(ClusterResult {
        nodes: NODES,
        throughput,
        latency,
    })
}
