//! A cluster node lost the way machines are lost (SIGKILL, no goodbye) under a model replica that
//! is connected to it while it leads `y_pred` partitions, together with a metric instance: the
//! replica reconnects to a survivor, the broker may refuse its predictions until the node is back
//! (RabbitMQ 3.10 nacks publishes to quorum queues whose new leader its channel does not know
//! yet), and still nothing is lost: no input requeued against its delivery limit, nothing
//! dead-lettered, every id once, every audit window complete, one WARN per refusal episode.

use crate::broker_node::BrokerCluster;
use crate::helpers::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 4;
const TOTAL: usize = 12_000;
/// The WARN that starts a refusal episode in the consume loop.
const REFUSAL_WARN: &str = "the broker refuses our messages";

fn total_rows(logs: &Path) -> usize {
    (0..PARTITIONS)
        .map(|k| read_rows(&logs.join(format!("p{k}")).join("metric_log.csv")).len())
        .sum()
}

fn wait_total(logs: &Path, n: usize, timeout: Duration, services: &[&Service]) {
    if !wait_until(timeout, || total_rows(logs) >= n) {
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

/// `name -> (leader, messages)` of every queue, as a node lists them.
fn queues_on(cluster: &BrokerCluster, node: usize) -> HashMap<String, (String, u64)> {
    let out = cluster.nodes[node].ctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "leader",
        "messages",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_owned();
            let leader = fields.next()?.to_owned();
            let messages = fields.next()?.parse().ok()?;
            Some((name, (leader, messages)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_under_a_model_replica_loses_nothing_and_dead_letters_nothing() {
    let mut cluster = BrokerCluster::start(3);
    let queues = Queues::unique("nodeloss");
    let work = tempfile::tempdir().unwrap();
    let logs: PathBuf = work.path().join("logs");
    let urls_from = |first: usize| {
        (0..3)
            .map(|i| cluster.nodes[(first + i) % 3].amqp_url())
            .collect::<Vec<_>>()
            .join(",")
    };
    let common = |first: usize| {
        Env::new(&urls_from(first), &queues)
            .set("PARTITIONS", PARTITIONS)
            .set("QUEUE_TYPE", "quorum")
            .set("RECONNECT_MAX_DELAY_MS", 1000)
            .set("AUDIT_WINDOW_SECS", 2)
            // Covers a prediction held while the node is away (20 s) on a loaded machine.
            .set("AUDIT_GRACE_SECS", 45)
    };
    let folder = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let metric_env = |instance: u32| {
        common(0)
            .set("LOG_DIR", logs.display())
            .set("METRIC_INSTANCES", 2)
            .set("METRIC_INSTANCE", instance)
            .pairs()
            .to_vec()
    };
    let mut metric0 = spawn_service("metric", metric_env(0), &folder("metric0"));
    let metric1 = spawn_service("metric", metric_env(1), &folder("metric1"));
    wait_healthy(&metric0, Duration::from_secs(60));
    wait_healthy(&metric1, Duration::from_secs(60));
    // The replica that stays away from the node to be lost.
    let model_far = spawn_service("model", common(0).pairs().to_vec(), &folder("model_far"));
    wait_healthy(&model_far, Duration::from_secs(60));

    // The node to lose: of nodes 1 and 2, the one that leads more y_pred partitions.
    let listed = queues_on(&cluster, 0);
    let y_pred_leaders: BTreeMap<String, String> = (0..PARTITIONS)
        .filter_map(|k| {
            let name = format!("{}.p{k}", queues.y_pred);
            Some((name.clone(), listed.get(&name)?.0.clone()))
        })
        .collect();
    let leads = |node: usize| {
        let name = cluster.nodes[node].node_name();
        y_pred_leaders.values().filter(|l| **l == name).count()
    };
    let victim = if leads(2) > leads(1) { 2 } else { 1 };
    eprintln!(
        "y_pred leaders {y_pred_leaders:?}; losing node {victim} ({}), which leads {}",
        cluster.nodes[victim].node_name(),
        leads(victim)
    );
    assert!(
        leads(victim) >= 1,
        "no y_pred partition led by node 1 or 2: {y_pred_leaders:?}"
    );
    // The replica on the node to be lost: its URL list starts there.
    let model_near = spawn_service(
        "model",
        common(victim).pairs().to_vec(),
        &folder("model_near"),
    );
    wait_healthy(&model_near, Duration::from_secs(60));
    let features_env = common(0)
        .set("COUNT", TOTAL)
        .set("RATE", 400)
        .pairs()
        .to_vec();
    let mut features = spawn_service("features", features_env, &folder("features"));
    macro_rules! everyone {
        () => {
            [&metric0, &metric1, &model_far, &model_near, &features]
        };
    }

    let started = Instant::now();
    wait_total(&logs, 3_000, Duration::from_secs(120), &everyone!());
    eprintln!(
        "{} rows: SIGKILL node {victim} and metric instance 0",
        total_rows(&logs)
    );
    cluster.nodes[victim].kill();
    metric0.signal("KILL");
    metric0.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(5));
    metric0.restart(work.path());
    std::thread::sleep(Duration::from_secs(15));
    eprintln!("{} rows: node {victim} back", total_rows(&logs));
    cluster.nodes[victim].spawn();
    cluster.nodes[victim].wait_ready();

    wait_total(&logs, TOTAL, Duration::from_secs(300), &everyone!());
    std::thread::sleep(Duration::from_secs(1));
    let all: Vec<Row> = (0..PARTITIONS)
        .flat_map(|k| read_rows(&logs.join(format!("p{k}")).join("metric_log.csv")))
        .collect();
    eprintln!("{TOTAL} samples in {:?}", started.elapsed());
    assert_exactly_once(&all, TOTAL);
    let status = features
        .wait_exit(Duration::from_secs(60))
        .expect("features exits after COUNT samples");
    assert!(status.success(), "features: {status}");

    // Nothing dead-lettered, on any partition of any stream (the cluster is this test's own).
    let dead: Vec<(String, u64)> = queues_on(&cluster, 0)
        .into_iter()
        .filter(|(name, (_, n))| name.ends_with(".dlq") && *n > 0)
        .map(|(name, (_, n))| (name, n))
        .collect();
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");

    // One WARN per refusal episode, none per message; what the replicas say about it.
    for model in [&model_near, &model_far] {
        let text = model.stderr();
        let warns = text.matches(REFUSAL_WARN).count();
        let ended = text.matches("the broker takes our messages again").count();
        eprintln!(
            "{}: {warns} refusal episode(s), {ended} ended; last lines:\n{}",
            model.name,
            model.stderr_tail(8)
        );
        assert!(warns <= 1, "{}: {warns} refusal WARNs:\n{text}", model.name);
        assert_eq!(warns, ended, "{}: an episode did not end", model.name);
        assert!(
            !text.contains("the input goes back to its queue"),
            "{}",
            model.name
        );
    }

    // Every audit window of every partition complete once its grace is over.
    let owner = |k: u32| {
        if k.is_multiple_of(2) {
            &metric0
        } else {
            &metric1
        }
    };
    let audit = |k: u32| -> Option<serde_json::Value> {
        let (status, body) = owner(k).get(&format!("/p{k}/api/dashboard"))?;
        (status == 200).then_some(())?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(json["state"]["audit"].clone())
    };
    let complete = wait_until(Duration::from_secs(120), || {
        (0..PARTITIONS).all(|k| {
            audit(k).is_some_and(|a| {
                a["pending"] == 0 && a["complete"].as_u64().is_some_and(|n| n >= 1)
            })
        })
    });
    let summaries: Vec<_> = (0..PARTITIONS).map(audit).collect();
    eprintln!("audit per partition: {summaries:?}");
    assert!(complete, "{summaries:?}");
    for (k, summary) in summaries.iter().enumerate() {
        let summary = summary.clone().unwrap_or_default();
        assert_eq!(
            (summary["incomplete"].as_u64(), summary["missing"].as_u64()),
            (Some(0), Some(0)),
            "p{k}: {summary}"
        );
    }
    for metric in [&metric0, &metric1] {
        assert!(
            !metric.stderr().contains("audit window"),
            "{} reported an incomplete window:\n{}",
            metric.name,
            metric.stderr_tail(30)
        );
    }
}
