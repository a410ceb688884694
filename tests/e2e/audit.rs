//! The loss audit on a real broker: a long run with a metric crash and a broker restart ends with
//! every window complete; loss made three ways (a purge, a foreign consumer, a length limit) is
//! reported exactly; a backlog counts late, not lost.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use std::collections::BTreeSet;
use std::time::Duration;

/// Short windows and grace, so a test sees several of each.
fn audited(url: String, count: u64) -> Options {
    Options::new(url, count)
        .env("AUDIT_WINDOW_SECS", "1")
        .env("AUDIT_GRACE_SECS", "2")
}

fn metric_value(run: &Pipeline, name: &str, labels: &[(&str, &str)]) -> f64 {
    run.metric.metrics().value(name, labels).unwrap_or(-1.0)
}

/// Waits until the metric service reports `missing` samples missing per stream (y_true, y_pred)
/// after reconciling, panicking with its figures and logs after `timeout`.
fn wait_missing(run: &Pipeline, missing: [f64; 2], timeout: Duration) {
    let ok = wait_until(timeout, || {
        [("y_true", missing[0]), ("y_pred", missing[1])]
            .iter()
            .all(|(stream, n)| {
                metric_value(run, "pipeline_audit_missing_total", &[("stream", stream)]) == *n
            })
            && metric_value(
                run,
                "pipeline_audit_windows_total",
                &[("result", "missing")],
            ) >= 1.0
    });
    let figures: Vec<String> = run
        .metric
        .metrics()
        .iter()
        .filter(|(k, _)| k.starts_with("pipeline_audit"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    assert!(
        ok,
        "expected missing {missing:?}: {figures:#?}\n{}",
        run.logs()
    );
    eprintln!("audit figures: {figures:#?}");
}

/// Stops `service` of the run once it is healthy, then runs the producer to its COUNT.
fn produce_without(run: &mut Pipeline, service: &str) {
    let stopped = match service {
        "model" => &mut run.model,
        "metric" => &mut run.metric,
        other => panic!("{other}"),
    };
    wait_healthy(stopped, Duration::from_secs(30));
    stopped.kill();
    run.start_features();
    let features = run.features.as_mut().expect("features started");
    let exit = features.wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|s| s.success()), "features: {exit:?}");
}

/// The windows the producer's tags name, from labels_log.txt.
fn windows_in_log(run: &Pipeline) -> BTreeSet<String> {
    run.label_lines()
        .iter()
        .filter_map(|line| {
            line.rsplit(' ')
                .next()?
                .strip_prefix("audit=")
                .map(str::to_owned)
        })
        .collect()
}

/// The dashboard's loss-audit summary (last hour, from the ledger the checkpoint keeps).
fn dashboard_audit(run: &Pipeline) -> Option<serde_json::Value> {
    let (status, body) = run.metric.get("/api/dashboard")?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(json["state"]["audit"].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_thousand_samples_with_a_metric_crash_and_a_broker_restart_are_all_complete() {
    const SAMPLES: usize = 50_000;
    let mut node = BrokerNode::start("audit-restart");
    let url = node.amqp_url();
    let mut run = Pipeline::start(
        "audit-long",
        // Not flat out: other tests share the two cores. A grace that covers the broker's
        // restart (the default, 30 s, is there for it): a window reconciled during the restart
        // would be found missing and its samples then late.
        audited(url.clone(), SAMPLES as u64)
            .rate(1500.0)
            .env("AUDIT_GRACE_SECS", "15"),
    );
    run.wait_rows(10_000, Duration::from_secs(180));
    run.metric.signal("KILL");
    run.metric.wait_exit(Duration::from_secs(10));
    let dir = run.dir().to_path_buf();
    run.metric.restart(&dir);
    run.wait_rows(25_000, Duration::from_secs(180));
    node.restart();
    run.wait_rows(SAMPLES, Duration::from_secs(300));
    let features = run.features.as_mut().expect("features started");
    let status = features
        .wait_exit(Duration::from_secs(60))
        .expect("features exits after COUNT samples");
    assert!(status.success(), "features exit status {status}");
    assert_exactly_once(&run.rows(), SAMPLES);

    let windows = windows_in_log(&run);
    assert!(windows.len() >= 10, "only {} windows", windows.len());
    // Every window reconciled complete: the ledger survived the crash (checkpoint and replay),
    // the redeliveries of the restart were not counted twice.
    let complete = wait_until(Duration::from_secs(60), || {
        dashboard_audit(&run).is_some_and(|audit| {
            audit["complete"].as_u64() == Some(windows.len() as u64) && audit["pending"] == 0
        })
    });
    let audit = dashboard_audit(&run);
    eprintln!("{} windows in the log; dashboard: {audit:?}", windows.len());
    assert!(complete, "{audit:?}\n{}", run.logs());
    let audit = audit.unwrap_or_default();
    assert_eq!(
        (audit["incomplete"].as_u64(), audit["missing"].as_u64()),
        (Some(0), Some(0))
    );
    for stream in ["y_true", "y_pred"] {
        for name in [
            "pipeline_audit_missing_total",
            "pipeline_audit_unexpected_total",
        ] {
            assert_eq!(
                metric_value(&run, name, &[("stream", stream)]),
                0.0,
                "{name} {stream}"
            );
        }
    }
    for result in ["missing", "unexpected", "mismatch", "unannounced"] {
        assert_eq!(
            metric_value(&run, "pipeline_audit_windows_total", &[("result", result)]),
            0.0,
            "{result}"
        );
    }
    assert!(
        !run.metric.stderr().contains("audit window"),
        "a window was reported incomplete:\n{}",
        run.metric.stderr_tail(40)
    );
    let (status, health) = run.metric.get("/healthz").unwrap_or_default();
    assert!(
        status == 200 && !health.contains("audit"),
        "{status} {health}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn features_purged_while_the_model_is_stopped_are_reported_as_missing_predictions() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start_consumers("audit-purge", audited(url.clone(), 500));
    produce_without(&mut run, "model");
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel");
    let purged = channel
        .queue_purge(
            run.queues.features.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .expect("purge");
    assert_eq!(
        purged, 500,
        "the model was stopped: every features message waited"
    );
    wait_missing(&run, [0.0, 500.0], Duration::from_secs(30));
    assert_eq!(
        metric_value(
            &run,
            "pipeline_audit_missing_samples",
            &[("stream", "y_pred")]
        ),
        500.0
    );
    let (_, health) = run.metric.get("/healthz").unwrap_or_default();
    assert!(
        health.contains("0 y_true and 500 y_pred samples"),
        "{health}"
    );
    assert!(
        run.metric.stderr().contains("audit window missing"),
        "{}",
        run.logs()
    );
    // The page's snapshot follows within a second or two.
    let shown = wait_until(Duration::from_secs(10), || {
        dashboard_audit(&run).is_some_and(|audit| {
            audit["missing"].as_u64() == Some(500) && audit["incomplete"].as_u64() >= Some(1)
        })
    });
    assert!(shown, "{:?}", dashboard_audit(&run));
    let _ = connection.close(200, "bye".into()).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn y_true_taken_by_a_foreign_consumer_is_reported_as_missing_true_values() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start_consumers("audit-steal", audited(url.clone(), 1000));
    produce_without(&mut run, "metric");
    // A course-style consumer with its own ack takes 300 true values.
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut stolen = 0;
    while stolen < 300 {
        let got = channel
            .basic_get(
                run.queues.y_true.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get");
        let Some(message) = got else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        stolen += 1;
    }
    let dir = run.dir().to_path_buf();
    run.metric.restart(&dir);
    wait_missing(&run, [300.0, 0.0], Duration::from_secs(60));
    run.wait_rows(700, Duration::from_secs(30));
    assert_eq!(
        metric_value(
            &run,
            "pipeline_audit_unexpected_total",
            &[("stream", "y_true")]
        ),
        0.0
    );
    let _ = connection.close(200, "bye".into()).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_length_limit_that_drops_the_head_is_reported_sample_by_sample() {
    let node = BrokerNode::start("audit-maxlen");
    let url = node.amqp_url();
    let mut run = Pipeline::start_consumers("audit-maxlen", audited(url.clone(), 1000));
    // An operator's policy: y_pred keeps its newest 200 messages.
    let pattern = format!("^{}$", run.queues.y_pred.replace('.', "\\."));
    let out = node.ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "cap-y-pred",
        &pattern,
        r#"{"max-length":200,"overflow":"drop-head"}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    produce_without(&mut run, "metric");
    // The model has predicted all 1,000; the queue holds 200.
    let full = wait_until(Duration::from_secs(30), || {
        run.model.metrics().value(
            "pipeline_messages_published_total",
            &[("queue", run.queues.y_pred.as_str())],
        ) == Some(1000.0)
    });
    assert!(full, "{}", run.logs());
    let depth = queue_depths(&url, std::slice::from_ref(&run.queues.y_pred)).await;
    assert_eq!(depth[&run.queues.y_pred], 200);
    let dir = run.dir().to_path_buf();
    run.metric.restart(&dir);
    wait_missing(&run, [0.0, 800.0], Duration::from_secs(60));
    run.wait_rows(200, Duration::from_secs(30));
    run.stop_services();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_late_not_lost() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start_consumers("audit-late", audited(url.clone(), 300));
    produce_without(&mut run, "model");
    wait_missing(&run, [0.0, 300.0], Duration::from_secs(30));
    // The model comes back an hour later (here: seconds): the backlog arrives, late.
    let dir = run.dir().to_path_buf();
    run.model.restart(&dir);
    run.wait_rows(300, Duration::from_secs(60));
    let late = wait_until(Duration::from_secs(10), || {
        metric_value(&run, "pipeline_audit_late_total", &[("stream", "y_pred")]) == 300.0
            && metric_value(
                &run,
                "pipeline_audit_missing_samples",
                &[("stream", "y_pred")],
            ) == 0.0
    });
    assert!(late, "{}", run.logs());
    // The note follows at the metric's next tick.
    let gone = wait_until(Duration::from_secs(5), || {
        run.metric
            .get("/healthz")
            .is_some_and(|(_, health)| !health.contains("audit"))
    });
    assert!(gone, "the note stays: {:?}", run.metric.get("/healthz"));
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// With partitions and two metric instances, each instance reconciles its own partitions: a purge
/// of one partition's features is reported by the instance that owns it, under its label, and the
/// other partitions' windows are complete.
#[tokio::test(flavor = "multi_thread")]
async fn each_metric_instance_reconciles_its_own_partitions() {
    use crate::partitions::{clean_up, env, produce, start};
    use pipeline::partition::Partitions;
    let url = shared_amqp_url();
    let queues = testkit::Queues::unique("audit-parts");
    let work = tempfile::tempdir().expect("tempdir");
    let logs = work.path().join("logs");
    // A grace that covers the model's restart on a loaded machine: p0 and p2 must be complete,
    // not missing and then late.
    let audited = |env: testkit::Env| {
        env.set("AUDIT_WINDOW_SECS", 1)
            .set("AUDIT_GRACE_SECS", 10)
            .set("METRIC_INSTANCES", 2)
            .set("LOG_DIR", logs.display())
    };
    let metric0 = start(
        "metric",
        audited(env(&url, &queues, 3)).set("METRIC_INSTANCE", 0),
        work.path(),
        "metric0",
    );
    let metric1 = start(
        "metric",
        audited(env(&url, &queues, 3)).set("METRIC_INSTANCE", 1),
        work.path(),
        "metric1",
    );
    let mut model = start(
        "model",
        audited(env(&url, &queues, 3)),
        work.path(),
        "model",
    );
    wait_healthy(&model, Duration::from_secs(30));
    model.kill();
    produce(start(
        "features",
        audited(env(&url, &queues, 3))
            .set("COUNT", 900)
            .set("RATE", 0),
        work.path(),
        "features",
    ));
    let p1 = Partitions::new(3).expect("3").queue(&queues.features, 1);
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel");
    let purged = channel
        .queue_purge(p1.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert!(purged > 200, "p1 held {purged} of 900");
    let model = start(
        "model",
        audited(env(&url, &queues, 3)),
        work.path(),
        "model2",
    );
    let value = |service: &Service, name: &str, partition: &str, stream: &str| {
        service
            .metrics()
            .value(name, &[("partition", partition), ("stream", stream)])
    };
    let reported = wait_until(Duration::from_secs(60), || {
        value(&metric1, "pipeline_audit_missing_total", "p1", "y_pred") == Some(purged as f64)
            && ["p0", "p2"].iter().all(|p| {
                metric0
                    .metrics()
                    .value(
                        "pipeline_audit_windows_total",
                        &[("partition", p), ("result", "complete")],
                    )
                    .is_some_and(|n| n >= 1.0)
            })
    });
    let audit_lines = |service: &Service| -> String {
        service
            .metrics()
            .iter()
            .filter(|(k, v)| k.starts_with("pipeline_audit") && **v != 0.0)
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect()
    };
    eprintln!(
        "instance 0:\n{}instance 1:\n{}",
        audit_lines(&metric0),
        audit_lines(&metric1)
    );
    assert!(
        reported,
        "purged {purged}\n{}\n{}",
        metric0.stderr_tail(20),
        metric1.stderr_tail(20)
    );
    for p in ["p0", "p2"] {
        for stream in ["y_true", "y_pred"] {
            assert_eq!(
                value(&metric0, "pipeline_audit_missing_total", p, stream),
                Some(0.0)
            );
        }
    }
    assert_eq!(
        value(&metric1, "pipeline_audit_missing_total", "p1", "y_true"),
        Some(0.0)
    );
    // Instance 0 never saw p1's records: not its partition.
    assert_eq!(
        value(&metric0, "pipeline_audit_missing_total", "p1", "y_pred"),
        None
    );
    drop((metric0, metric1, model));
    let _ = connection.close(200, "bye".into()).await;
    clean_up(&url, &queues, Partitions::new(3).expect("3")).await;
}

/// The producers' instances in the order their tags first appear in labels_log.txt.
fn producers_in_log(run: &Pipeline) -> Vec<String> {
    let mut producers: Vec<String> = Vec::new();
    for tag in run
        .label_lines()
        .iter()
        .filter_map(|line| line.rsplit(' ').next()?.strip_prefix("audit="))
    {
        let producer = tag.split(':').next().unwrap_or_default().to_owned();
        if !producers.contains(&producer) {
            producers.push(producer);
        }
    }
    producers
}

/// A producer stopped with SIGTERM announces its last windows; one killed with SIGKILL cannot, and
/// its last windows are reported unannounced (never missing) when they expire; each new process
/// is a new instance, so nothing is announced twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_producer_never_announces_twice_and_a_killed_one_leaves_unannounced_windows() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start(
        "audit-producer",
        audited(url.clone(), 0)
            .rate(400.0)
            .env("AUDIT_RETAIN_SECS", "8"),
    );
    let dir = run.dir().to_path_buf();
    let mut rows = 800;
    run.wait_rows(rows, Duration::from_secs(60));
    for (n, signal) in ["TERM", "KILL", "TERM"].into_iter().enumerate() {
        let features = run.features.as_mut().expect("features started");
        features.signal(signal);
        assert!(
            features.wait_exit(Duration::from_secs(20)).is_some(),
            "{signal}"
        );
        if n == 2 {
            break;
        }
        features.restart(&dir);
        rows = run.rows().len() + 800;
        run.wait_rows(rows, Duration::from_secs(60));
    }
    let producers = producers_in_log(&run);
    assert_eq!(producers.len(), 3, "{producers:?}");
    let rows = run.rows();
    assert_exactly_once(&rows, rows.len());
    let done = wait_until(Duration::from_secs(30), || {
        metric_value(
            &run,
            "pipeline_audit_windows_total",
            &[("result", "unannounced")],
        ) >= 1.0
            && dashboard_audit(&run).is_some_and(|audit| audit["pending"] == 0)
    });
    let stderr = run.metric.stderr();
    let unannounced: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("audit window unannounced"))
        .collect();
    eprintln!("producers {producers:?}\n{}", unannounced.join("\n"));
    assert!(done, "{}", run.logs());
    // Only the killed instance left windows without a record.
    assert!(
        unannounced
            .iter()
            .all(|line| line.contains(producers[1].as_str())),
        "{unannounced:#?}"
    );
    for stream in ["y_true", "y_pred"] {
        assert_eq!(
            metric_value(&run, "pipeline_audit_missing_total", &[("stream", stream)]),
            0.0
        );
    }
    for result in ["missing", "mismatch"] {
        assert_eq!(
            metric_value(&run, "pipeline_audit_windows_total", &[("result", result)]),
            0.0,
            "{result}"
        );
    }
    assert!(
        metric_value(
            &run,
            "pipeline_audit_windows_total",
            &[("result", "complete")]
        ) >= 3.0
    );
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
