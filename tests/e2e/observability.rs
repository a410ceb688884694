//! What operators see: exact counters in `/metrics`, the model's quality matching the CSV,
//! `/healthz` following the broker, and JSON logs.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use std::time::Duration;

const N: usize = 500;

fn counter(metrics: &Metrics, name: &str, queue: &str) -> f64 {
    metrics
        .get(&format!("{name}{{queue=\"{queue}\"}}"))
        .copied()
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_every_sample_and_quality_matches_the_csv() {
    let url = shared_amqp_url();
    let options = Options::new(url.clone(), N as u64)
        .env("LINGER_SECS", "60")
        .env("LOG_FORMAT", "json")
        .env("PLOT_INTERVAL_SECS", "1")
        .env("PLOT_WIDTH", "640")
        .env("PLOT_HEIGHT", "400");
    let mut run = Pipeline::start("metrics", options);
    run.wait_rows(N, Duration::from_secs(90));
    let q = run.queues.clone();
    let n = N as f64;

    let features = run.features.as_ref().unwrap();
    assert!(wait_until(Duration::from_secs(10), || counter(
        &features.metrics(),
        "pipeline_messages_published_total",
        &q.features
    ) == n));
    let f = features.metrics();
    assert_eq!(
        counter(&f, "pipeline_messages_published_total", &q.y_true),
        n
    );
    assert_eq!(f.get("pipeline_broker_connected"), Some(&1.0));
    assert_eq!(
        features.get("/healthz").map(|r| r.0),
        Some(503),
        "a finished producer is not publishing"
    );

    assert!(wait_until(Duration::from_secs(10), || counter(
        &run.model.metrics(),
        "pipeline_messages_acked_total",
        &q.features
    ) == n));
    let m = run.model.metrics();
    assert_eq!(
        counter(&m, "pipeline_messages_consumed_total", &q.features),
        n
    );
    assert_eq!(
        counter(&m, "pipeline_messages_published_total", &q.y_pred),
        n
    );
    assert_eq!(
        m.get(&format!(
            "pipeline_message_processing_seconds_count{{queue=\"{}\"}}",
            q.features
        )),
        Some(&n)
    );

    assert!(wait_until(Duration::from_secs(10), || counter(
        &run.metric.metrics(),
        "pipeline_messages_acked_total",
        &q.y_pred
    ) == n));
    let r = run.metric.metrics();
    for queue in [&q.y_true, &q.y_pred] {
        assert_eq!(counter(&r, "pipeline_messages_consumed_total", queue), n);
        assert_eq!(counter(&r, "pipeline_messages_acked_total", queue), n);
    }
    assert_eq!(r.get("pipeline_pairs_total"), Some(&n));
    assert_eq!(r.get("pipeline_end_to_end_latency_seconds_count"), Some(&n));
    assert_eq!(r.get("pipeline_join_waiting"), Some(&0.0));

    let rows = run.rows();
    let mean = rows.iter().map(|row| row.absolute_error).sum::<f64>() / rows.len() as f64;
    let mae = r["pipeline_model_mae{span=\"all\"}"];
    assert!((mae - mean).abs() <= 1e-9, "MAE {mae} vs the CSV's {mean}");
    let version = &rows[0].model_version;
    let by_version = r[&format!("pipeline_model_mae_by_version{{model_version=\"{version}\"}}")];
    assert!((by_version - mean).abs() <= 1e-9);
    assert!(
        r["pipeline_model_r2{span=\"all\"}"] > 0.3,
        "R² of OLS on diabetes is about 0.5"
    );
    assert!(r.contains_key("pipeline_model_rmse{span=\"window\"}"));

    // error_distribution.png: a PNG of the configured size, not redrawn while no pairs arrive.
    let png = run.log_dir().join("error_distribution.png");
    let modified = || std::fs::metadata(&png).and_then(|m| m.modified()).ok();
    assert!(
        wait_until(Duration::from_secs(15), || modified().is_some()),
        "no error_distribution.png"
    );
    // Let a redraw that covers the last pairs finish, then nothing new may come.
    std::thread::sleep(Duration::from_millis(2500));
    let first = modified();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (640, 400));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(modified(), first, "redrawn without new pairs");
    let leftovers: Vec<_> = std::fs::read_dir(run.log_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // LOG_FORMAT=json: every line of every service is one JSON object; message lines carry the id.
    run.features.as_mut().unwrap().signal("TERM");
    for service in [&run.metric, &run.model, run.features.as_ref().unwrap()] {
        let log = service.stderr();
        assert!(!log.is_empty());
        for line in log.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", service.name));
            assert!(
                value.get("level").is_some() && value.get("timestamp").is_some(),
                "{line}"
            );
        }
    }
    assert_queues_empty(&url, &q).await;
    delete_queues(&url, &q).await;
}

fn services(run: &Pipeline) -> Vec<&Service> {
    vec![&run.metric, &run.model, run.features.as_ref().unwrap()]
}

/// Waits until all three services answer `/healthz` with `code`.
fn all_answer(run: &Pipeline, code: u16, timeout: Duration) {
    let answered = wait_until(timeout, || {
        services(run)
            .iter()
            .all(|s| s.get("/healthz").map(|r| r.0) == Some(code))
    });
    assert!(
        answered,
        "not all services answer /healthz with {code}:\n{}",
        run.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_follows_the_broker() {
    let mut node = BrokerNode::start("health");
    let url = node.amqp_url();
    let mut run = Pipeline::start("health", Options::new(url.clone(), 0).rate(50.0));
    all_answer(&run, 200, Duration::from_secs(30));

    node.stop();
    all_answer(&run, 503, Duration::from_secs(15));
    let (_, reason) = run.model.get("/healthz").unwrap();
    assert!(reason.contains("broker"), "503 says why: {reason}");
    for service in services(&run) {
        assert_eq!(
            service.metrics().get("pipeline_broker_connected"),
            Some(&0.0),
            "{}",
            service.name
        );
    }

    node.spawn();
    node.wait_ready();
    all_answer(&run, 200, Duration::from_secs(30));
    let rows = run.rows().len();
    assert!(
        wait_until(Duration::from_secs(30), || run.rows().len() > rows + 10),
        "samples flow again"
    );
    run.features.as_mut().unwrap().signal("TERM");
}
