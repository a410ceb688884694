//! Faults: broker restarts, SIGKILL and SIGTERM of each service, a broker that is not there at
//! start-up. After each, every sample is joined exactly once and every queue is drained.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use std::time::Duration;

const SAMPLES: usize = 3000;
const LONG: Duration = Duration::from_secs(180);

fn wait_rows_at_least(run: &Pipeline, n: usize) {
    assert!(
        wait_until(LONG, || run.rows().len() >= n),
        "stuck below {n} rows:\n{}",
        run.logs()
    );
}

fn features_exit_ok(run: &mut Pipeline) {
    let features = run.features.as_mut().expect("features started");
    let status = features
        .wait_exit(Duration::from_secs(60))
        .expect("features exits after COUNT samples");
    assert!(status.success(), "features exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restarted_twice_mid_stream_loses_nothing() {
    let mut node = BrokerNode::start("restart");
    let url = node.amqp_url();
    let mut run = Pipeline::start("restart", Options::new(url.clone(), SAMPLES as u64));

    wait_rows_at_least(&run, 300);
    node.restart();
    wait_rows_at_least(&run, 1500);
    node.restart();

    run.wait_rows(SAMPLES, LONG);
    features_exit_ok(&mut run);
    assert_exactly_once(&run.rows(), SAMPLES);
    assert!(wait_until(Duration::from_secs(10), || run
        .model
        .metrics()
        .get("pipeline_broker_reconnects_total")
        >= Some(&2.0)));
    assert!(
        run.metric.is_running() && run.model.is_running(),
        "consumers survived the restarts"
    );
    assert_queues_empty(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn model_and_metric_killed_mid_stream_lose_nothing() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start(
        "sigkill",
        Options::new(url.clone(), SAMPLES as u64).rate(1000.0),
    );

    wait_rows_at_least(&run, 500);
    run.model.signal("KILL");
    run.model.restart(run.dir.path());
    wait_rows_at_least(&run, 1500);
    run.metric.signal("KILL");
    run.metric.restart(run.dir.path());

    run.wait_rows(SAMPLES, LONG);
    features_exit_ok(&mut run);
    // Redelivered messages may be logged twice, but never make a second row.
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&run.rows(), SAMPLES);
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// Reads `confirmed=N` from the producer's last log line.
fn confirmed_by(features: &Service) -> u64 {
    let log = features.stderr();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("producer stopped"))
        .unwrap_or_else(|| panic!("no stop line in:\n{log}"));
    let after = line.split("confirmed").nth(1).expect("confirmed field");
    after
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn sigterm_exits_zero(service: &mut Service) {
    service.signal("TERM");
    let status = service
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{} still running 10 s after SIGTERM", service.name));
    assert!(
        status.success(),
        "{} exited with {status} after SIGTERM:\n{}",
        service.name,
        service.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_each_service_cleanly_and_nothing_is_lost() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start(
        "sigterm",
        Options::new(url.clone(), SAMPLES as u64).rate(600.0),
    );
    let dir = run.dir.path().to_owned();

    wait_rows_at_least(&run, 300);
    sigterm_exits_zero(&mut run.model);
    run.model.restart(&dir);
    wait_rows_at_least(&run, 900);
    sigterm_exits_zero(&mut run.metric);
    run.metric.restart(&dir);
    wait_rows_at_least(&run, 1500);

    // The producer stops after what it had confirmed; a new one sends the rest.
    let features = run.features.as_mut().unwrap();
    sigterm_exits_zero(features);
    let sent = confirmed_by(features);
    assert!(
        sent < SAMPLES as u64,
        "the producer finished before SIGTERM ({sent})"
    );
    features.restart_with(&dir, &[("COUNT", (SAMPLES as u64 - sent).to_string())]);

    run.wait_rows(SAMPLES, LONG);
    features_exit_ok(&mut run);
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&run.rows(), SAMPLES);
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// No broker at start-up: each service keeps running and retrying, and its `/healthz` answers 503
/// with the reason; once the broker is up every sample arrives exactly once. Nothing here counts
/// events against the clock: on a loaded machine the retries only come later.
#[tokio::test(flavor = "multi_thread")]
async fn services_wait_for_a_broker_that_comes_up_late() {
    let mut node = BrokerNode::prepare("late", free_port(), "late-cookie", None);
    let url = node.amqp_url();
    let mut run = Pipeline::start("late", Options::new(url.clone(), 500));

    for service in [
        &mut run.metric,
        &mut run.model,
        run.features.as_mut().unwrap(),
    ] {
        // The broker stays away until each service has failed more than one connect.
        let retries = |service: &Service| {
            service
                .stderr()
                .matches("broker not reachable, retrying")
                .count()
        };
        wait_until(LONG, || !service.is_running() || retries(service) >= 2);
        assert!(
            service.is_running(),
            "{} gave up while the broker was down:\n{}",
            service.name,
            service.stderr()
        );
        assert!(
            retries(service) >= 2,
            "{} did not retry:\n{}",
            service.name,
            service.stderr()
        );
        let health = service.get("/healthz");
        assert!(
            health.as_ref().is_some_and(
                |(status, body)| *status == 503 && body.contains("broker not reachable")
            ),
            "{} /healthz while no broker answers: {health:?}",
            service.name
        );
    }

    node.spawn();
    node.wait_ready();
    run.wait_rows(500, LONG);
    features_exit_ok(&mut run);
    assert_exactly_once(&run.rows(), 500);
    assert_queues_empty(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metric_cuts_half_lines_left_by_a_crash() {
    use std::io::Write as _;
    let url = shared_amqp_url();
    let mut run = Pipeline::start("halfline", Options::new(url.clone(), 300));
    run.wait_rows(300, LONG);
    features_exit_ok(&mut run);
    run.metric.signal("KILL");
    run.metric
        .wait_exit(Duration::from_secs(5))
        .expect("metric killed");

    // What a crash in the middle of a write leaves: lines without their end.
    let append = |name: &str, text: &str| {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(run.log_dir().join(name))
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    };
    append("labels_log.txt", "2026-11-25T12:00:00.000000Z y_true 5f1c");
    append("metric_log.csv", "5f1c0d7e-half,151,20");

    let dir = run.dir.path().to_owned();
    run.metric.restart(&dir);
    run.features.as_mut().unwrap().restart(&dir);
    run.wait_rows(600, LONG);
    features_exit_ok(&mut run);
    assert_exactly_once(&run.rows(), 600);
    for line in run.label_lines() {
        assert!(
            matches!(line.split(' ').count(), 4..=6),
            "broken line in labels_log.txt: {line:?}"
        );
    }
    assert!(
        run.metric.stderr().contains("cut a half line"),
        "{}",
        run.metric.stderr()
    );
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
