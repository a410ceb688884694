//! Partitioned streams past one machine's promises: `PARTITIONS=4`, two metric instances (and a
//! standby of one), three model replicas, on a private three-node cluster with quorum queues, with
//! a node lost, a metric instance killed and restarted, and a standby taking over mid-run.

use crate::broker_node::BrokerCluster;
use crate::helpers::*;
use pipeline::partition::Partitions;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 4;

/// The rows of every `p<k>` folder under `logs`, by partition.
fn rows_by_partition(logs: &Path) -> BTreeMap<u32, Vec<Row>> {
    (0..PARTITIONS)
        .map(|k| {
            (
                k,
                read_rows(&logs.join(format!("p{k}")).join("metric_log.csv")),
            )
        })
        .collect()
}

fn total_rows(logs: &Path) -> usize {
    rows_by_partition(logs).values().map(Vec::len).sum()
}

fn wait_total(logs: &Path, n: usize, timeout: Duration, services: &[&Service]) {
    let ok = wait_until(timeout, || total_rows(logs) >= n);
    if !ok {
        let tails: Vec<String> = services
            .iter()
            .map(|s| format!("--- {}\n{}", s.name, s.stderr_tail(30)))
            .collect();
        panic!(
            "{} rows of {n} after {timeout:?}\n{}",
            total_rows(logs),
            tails.join("\n")
        );
    }
}

/// The leaders of the queues named `<prefix><k>` (the partition queues; every queue for ""), as `rabbitmqctl` lists them.
fn leaders(cluster: &BrokerCluster, prefix: &str) -> HashMap<String, String> {
    let out = cluster.nodes[0].ctl(&["list_queues", "-q", "--no-table-headers", "name", "leader"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .filter(|(name, _)| {
            prefix.is_empty()
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn four_partitions_two_metric_instances_and_a_lost_node_lose_nothing() {
    if std::env::var("PIPELINE_SKIP_CLUSTER_TEST").as_deref() == Ok("1") {
        eprintln!("SKIPPED: the partitioned cluster test (PIPELINE_SKIP_CLUSTER_TEST=1)");
        return;
    }
    const TOTAL: usize = 20_000;
    let mut cluster = BrokerCluster::start(3);
    let urls = cluster.amqp_urls();
    let queues = Queues::unique("partitioned");
    let work = tempfile::tempdir().unwrap();
    let logs: PathBuf = work.path().join("logs");
    let common = Env::new(&urls, &queues)
        .set("PARTITIONS", PARTITIONS)
        .set("QUEUE_TYPE", "quorum")
        .set("RECONNECT_MAX_DELAY_MS", 1000);
    let folder = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let metric_env = |instance: u32| {
        common
            .clone()
            .set("LOG_DIR", logs.display())
            .set("METRIC_INSTANCES", 2)
            .set("METRIC_INSTANCE", instance)
            .pairs()
            .to_vec()
    };
    let mut metric0 = spawn_service("metric", metric_env(0), &folder("metric0"));
    let mut metric1 = spawn_service("metric", metric_env(1), &folder("metric1"));
    wait_healthy(&metric0, Duration::from_secs(60));
    wait_healthy(&metric1, Duration::from_secs(60));
    // A second process of instance 0, on the same folder: it waits for the locks.
    let standby0 = spawn_service("metric", metric_env(0), &folder("standby0"));
    let models: Vec<Service> = (0..3)
        .map(|i| {
            spawn_service(
                "model",
                common.pairs().to_vec(),
                &folder(&format!("model{i}")),
            )
        })
        .collect();
    for model in &models {
        wait_healthy(model, Duration::from_secs(60));
    }
    let features_env = common
        .clone()
        .set("COUNT", TOTAL)
        .set("RATE", 500)
        .pairs()
        .to_vec();
    let mut features = spawn_service("features", features_env, &folder("features"));
    // Every service, for the logs of a failed wait (a macro: the services are restarted between).
    macro_rules! everyone {
        () => {
            [&metric0, &metric1, &standby0, &features]
                .into_iter()
                .chain(models.iter())
                .collect::<Vec<_>>()
        };
    }

    // The partition queues' leaders are spread over the nodes (x-queue-leader-locator=balanced).
    let stream_leaders = leaders(&cluster, &format!("{}.p", queues.features));
    let nodes: HashSet<&String> = stream_leaders.values().collect();
    eprintln!("features partition leaders: {stream_leaders:?}");
    assert_eq!(
        stream_leaders.len(),
        PARTITIONS as usize,
        "{stream_leaders:?}"
    );
    let all_leaders = leaders(&cluster, "");
    let per_node = all_leaders
        .values()
        .fold(BTreeMap::new(), |mut count, node| {
            *count.entry(node.clone()).or_insert(0) += 1;
            count
        });
    eprintln!("queue leaders per node: {per_node:?}");
    assert_eq!(per_node.len(), 3, "leaders not on every node: {per_node:?}");
    assert!(
        nodes.len() >= 2,
        "a stream's partitions on one node: {stream_leaders:?}"
    );

    let started = Instant::now();
    wait_total(&logs, 3_000, Duration::from_secs(120), &everyone!());
    eprintln!("{} rows: stopping node c1", total_rows(&logs));
    cluster.nodes[1].stop();
    wait_total(&logs, 7_000, Duration::from_secs(180), &everyone!());
    eprintln!(
        "{} rows: SIGKILL metric instance 1, then restart it",
        total_rows(&logs)
    );
    metric1.signal("KILL");
    metric1.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    metric1.restart(work.path());
    wait_total(&logs, 10_000, Duration::from_secs(180), &everyone!());
    assert!(
        !standby0.stderr().contains("lock is free: taking over"),
        "the standby took over while instance 0 was alive:\n{}",
        standby0.stderr()
    );
    let rows_at_kill = total_rows(&logs);
    eprintln!("{rows_at_kill} rows: SIGKILL metric instance 0; its standby takes over");
    let killed_at = Instant::now();
    metric0.signal("KILL");
    metric0.wait_exit(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(15), || standby0
            .stderr()
            .contains("lock is free: taking over")),
        "the standby did not take over:\n{}",
        standby0.stderr()
    );
    let takeover = killed_at.elapsed();
    wait_healthy(&standby0, Duration::from_secs(30));
    eprintln!("standby healthy {:?} after the kill", killed_at.elapsed());
    wait_total(&logs, 13_000, Duration::from_secs(180), &everyone!());
    eprintln!("{} rows: node c1 back", total_rows(&logs));
    cluster.nodes[1].spawn();
    cluster.nodes[1].wait_ready();

    wait_total(&logs, TOTAL, Duration::from_secs(300), &everyone!());
    std::thread::sleep(Duration::from_secs(1));
    let by_partition = rows_by_partition(&logs);
    let four = Partitions::new(PARTITIONS).unwrap();
    let mut all = Vec::new();
    for (k, rows) in &by_partition {
        let misplaced: Vec<&Row> = rows.iter().filter(|row| four.of(&row.id) != *k).collect();
        assert!(
            misplaced.is_empty(),
            "rows in p{k} that hash elsewhere: {:?}",
            &misplaced[..misplaced.len().min(5)]
        );
        all.extend(rows.iter().cloned());
    }
    let counts: Vec<usize> = by_partition.values().map(Vec::len).collect();
    eprintln!(
        "{TOTAL} samples in {:?}: rows per partition {counts:?}; standby took over {takeover:?} after the kill at {rows_at_kill} rows",
        started.elapsed()
    );
    assert_exactly_once(&all, TOTAL);
    // Each instance wrote only its own partitions' folders.
    for (service, own, other) in [
        (&standby0, ["p0", "p2"], ["p1", "p3"]),
        (&metric1, ["p1", "p3"], ["p0", "p2"]),
    ] {
        let text = service.stderr();
        for k in own {
            assert!(
                text.contains(&format!("/logs/{k}")),
                "{}: {k} missing",
                service.name
            );
        }
        for k in other {
            assert!(
                !text.contains(&format!("/logs/{k}")),
                "{}: wrote {k}",
                service.name
            );
        }
    }
    // What the instance shows: its partitions, totals over them, one family per metric name.
    let own_rows = by_partition[&0].len() + by_partition[&2].len();
    let (status, body) = standby0.get("/p2/api/dashboard").expect("dashboard");
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let partitions = &answer["status"]["partitions"];
    eprintln!("standby's dashboard: {partitions}");
    assert_eq!(partitions["page"], "p2");
    assert_eq!(partitions["pages"], serde_json::json!(["p0", "p2"]));
    assert_eq!(partitions["pairs"], own_rows as u64);
    let (_, text) = standby0.get("/metrics").expect("metrics");
    let mut helps = HashSet::new();
    for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(helps.insert(line), "family written twice: {line}");
    }
    let metrics = standby0.metrics();
    assert_eq!(
        metrics.get("pipeline_metric_partition_owned{partition=\"p2\"}"),
        Some(&1.0)
    );
    assert_eq!(
        metrics.get("pipeline_metric_partition_owned{partition=\"p1\"}"),
        None
    );
    let (_, quality) = standby0.get("/api/quality").expect("quality");
    let quality: serde_json::Value = serde_json::from_str(&quality).unwrap();
    let pairs: u64 = quality["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pairs"].as_u64().unwrap())
        .sum();
    assert_eq!(pairs, own_rows as u64, "{quality}");
    assert!(
        features.wait_exit(Duration::from_secs(30)).is_some(),
        "features did not finish"
    );
}
