//! Recovery that does not grow with history (issue 10, defects 1 and 2): restarts of the metric
//! service once the history is longer than `DEDUP_CAPACITY` write no row twice, and ids dropped
//! for waiting too long do not come back at the next start. Also: a prediction redelivered after a
//! model swap (another model version, another value) is a duplicate, not a dead letter; and a model
//! that is down far longer than `JOIN_MAX_AGE_SECS` while more than `JOIN_CAPACITY` samples queue
//! up costs no pair: the metric holds `y_true` back and the broker keeps it.

use crate::helpers::*;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);

/// Waits until the metric service's current log says its state is rebuilt, then until it is healthy.
fn wait_rebuilt(service: &Service) {
    assert!(
        wait_until(LONG, || service.stderr().contains("state rebuilt")),
        "no 'state rebuilt' line:\n{}",
        service.stderr()
    );
    wait_healthy(service, LONG);
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_beyond_dedup_capacity_write_each_row_once() {
    const SAMPLES: usize = 3000;
    let url = shared_amqp_url();
    // Checkpoints only at start-up and shutdown: the SIGKILL replays everything after start-up.
    let options = Options::new(url.clone(), SAMPLES as u64)
        .rate(500.0)
        .env("DEDUP_CAPACITY", "1000")
        .env("CHECKPOINT_EVERY", "1000000")
        .env("CHECKPOINT_INTERVAL_SECS", "3600");
    let mut run = Pipeline::start("recovery", options);
    assert!(
        wait_until(LONG, || run.rows().len() >= 1500),
        "stuck:\n{}",
        run.logs()
    );
    run.metric.restart(run.dir.path()); // SIGKILL
    wait_rebuilt(&run.metric);
    run.wait_rows(SAMPLES, LONG);
    let features = run.features.as_mut().expect("features");
    let status = features.wait_exit(LONG).expect("features exits");
    assert!(status.success(), "features exit status {status}");
    assert_exactly_once(&run.rows(), SAMPLES);

    for restart in 0..2 {
        let dir = run.dir.path().to_owned();
        restart_gracefully(&mut run.metric, &dir);
        wait_rebuilt(&run.metric);
        let log = run.metric.stderr();
        assert!(
            log.contains("checkpoint"),
            "restart {restart} not from the checkpoint:\n{log}"
        );
        // Give a wrong replay time to show.
        std::thread::sleep(Duration::from_secs(1));
        assert_exactly_once(&run.rows(), SAMPLES);
        let metrics = run.metric.metrics();
        assert_eq!(
            metrics.get("pipeline_pairs_total"),
            Some(&(SAMPLES as f64)),
            "restart {restart}: pairs since the beginning"
        );
    }
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_orphans_do_not_come_back_after_a_restart() {
    const ORPHANS: usize = 200;
    let url = shared_amqp_url();
    let options = Options::new(url.clone(), 0)
        .env("JOIN_MAX_AGE_SECS", "2")
        .env("CHECKPOINT_INTERVAL_SECS", "1");
    let mut run = Pipeline::start_consumers("orphans", options);
    let dir = run.dir.path().to_owned();
    wait_healthy(&run.metric, LONG);
    let connection = connect(&url).await;

    for (round, kill) in [(0, true), (1, false)] {
        for n in 0..ORPHANS {
            let id = format!("orphan-{round}-{n}");
            let body = format!(r#"{{"id":"{id}","y_true":{n}}}"#);
            publish_raw(&connection, &run.queues.y_true, body.as_bytes(), Some(&id)).await;
        }
        // An orphan is an id the pipeline moves past: pairs of later ids keep coming, for
        // longer than JOIN_MAX_AGE_SECS (while nothing comes, nobody ages).
        for n in 0..40 {
            let id = format!("later-{round}-{n}");
            let y_true = format!(r#"{{"id":"{id}","y_true":{n}}}"#);
            let y_pred = format!(r#"{{"id":"{id}","y_pred":{n}}}"#);
            publish_raw(
                &connection,
                &run.queues.y_true,
                y_true.as_bytes(),
                Some(&id),
            )
            .await;
            publish_raw(
                &connection,
                &run.queues.y_pred,
                y_pred.as_bytes(),
                Some(&id),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let evicted = |metric: &Service| {
            metric
                .metrics()
                .get("pipeline_join_evicted_total{reason=\"age\"}")
                .copied()
                .unwrap_or(0.0)
        };
        assert!(
            wait_until(Duration::from_secs(30), || evicted(&run.metric)
                == ORPHANS as f64),
            "round {round}: the orphans were not dropped:\n{}",
            run.metric.stderr()
        );
        assert_eq!(
            run.metric.metrics().get("pipeline_join_waiting"),
            Some(&0.0)
        );
        if kill {
            // The checkpoint after the drop is written within CHECKPOINT_INTERVAL_SECS.
            std::thread::sleep(Duration::from_secs(3));
            run.metric.restart(&dir);
        } else {
            restart_gracefully(&mut run.metric, &dir);
        }
        wait_rebuilt(&run.metric);
        // Longer than JOIN_MAX_AGE_SECS: an orphan read back would be dropped (and logged) again.
        std::thread::sleep(Duration::from_secs(4));
        let metrics = run.metric.metrics();
        assert_eq!(
            metrics.get("pipeline_join_waiting"),
            Some(&0.0),
            "round {round}"
        );
        assert_eq!(evicted(&run.metric), 0.0, "round {round}: dropped again");
        let log = run.metric.stderr();
        assert!(
            !log.contains("dropped an id"),
            "round {round}: dropped again after the restart:\n{log}"
        );
    }
    let _ = connection.close(200, "bye".into()).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_history_is_not_joined_again() {
    const HISTORY: usize = 200_000;
    const MORE: usize = 500;
    let url = shared_amqp_url();
    let queues_test = "history";
    let options = Options::new(url.clone(), MORE as u64)
        .rate(0.0)
        .env("DEDUP_CAPACITY", "1000");
    // The history is in LOG_DIR before the metric service first starts: start it again on it.
    let mut run = Pipeline::start_consumers(queues_test, options);
    let dir = run.dir.path().to_owned();
    wait_healthy(&run.metric, LONG);
    run.metric.signal("TERM");
    run.metric.wait_exit(Duration::from_secs(10)).expect("exit");
    let ids = write_history(&run.log_dir(), HISTORY);
    // Files of an older version (no checkpoint), then from the checkpoint.
    let _ = std::fs::remove_file(run.log_dir().join(".metric.checkpoint.json"));
    run.metric.restart(&dir);
    wait_rebuilt(&run.metric);
    assert_exactly_once(&run.rows(), HISTORY);
    restart_gracefully(&mut run.metric, &dir);
    wait_rebuilt(&run.metric);
    assert_exactly_once(&run.rows(), HISTORY);

    run.start_features();
    run.wait_rows(HISTORY + MORE, LONG);
    std::thread::sleep(Duration::from_secs(1));
    let rows = run.rows();
    assert_exactly_once(&rows, HISTORY + MORE);
    assert_eq!(
        rows[..3].iter().map(|r| &r.id).collect::<Vec<_>>(),
        ids[..3].iter().collect::<Vec<_>>()
    );
    assert_eq!(
        run.metric.metrics().get("pipeline_pairs_total"),
        Some(&((HISTORY + MORE) as f64))
    );
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[test]
fn the_recovery_and_retention_settings_are_in_help_and_readme() {
    let output = std::process::Command::new(bin_path("metric"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let readme = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    for name in [
        "LOG_MAX_BYTES",
        "LOG_KEEP_FILES",
        "CHECKPOINT_EVERY",
        "CHECKPOINT_INTERVAL_SECS",
        "MODEL_VERSIONS_KEPT",
        "QUALITY_ALERT_RATIO",
    ] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "metric --help does not list {name}:\n{help}"
        );
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "docs/configuration.md has no row for {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prediction_from_another_model_version_is_a_duplicate_not_a_dead_letter() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start_consumers("repredict", Options::new(url.clone(), 0));
    wait_healthy(&run.metric, LONG);
    let connection = connect(&url).await;
    let q = &run.queues;
    let publish = |queue: &str, body: String| {
        let connection = &connection;
        let queue = queue.to_owned();
        async move { publish_raw(connection, &queue, body.as_bytes(), Some("swap-1")).await }
    };
    publish(&q.y_true, r#"{"id":"swap-1","y_true":150}"#.into()).await;
    publish(
        &q.y_pred,
        r#"{"id":"swap-1","y_pred":140.5,"model_version":"ols-old"}"#.into(),
    )
    .await;
    run.wait_rows(1, LONG);
    // The features message came again after a model swap: another version, another value.
    publish(
        &q.y_pred,
        r#"{"id":"swap-1","y_pred":139.25,"model_version":"ols-new"}"#.into(),
    )
    .await;
    let duplicates = format!("pipeline_join_duplicates_total{{queue=\"{}\"}}", q.y_pred);
    assert!(
        wait_until(Duration::from_secs(30), || run
            .metric
            .metrics()
            .get(&duplicates)
            == Some(&1.0)),
        "the re-prediction was not counted as a duplicate:\n{}",
        run.metric.stderr()
    );
    // The same version with another value is still a conflict.
    publish(
        &q.y_pred,
        r#"{"id":"swap-1","y_pred":1.0,"model_version":"ols-old"}"#.into(),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(30), || run
            .metric
            .metrics()
            .get("pipeline_join_conflicts_total")
            == Some(&1.0)),
        "the conflict was not refused:\n{}",
        run.metric.stderr()
    );
    let dead = dead_letter_queue(&q.y_pred);
    let depths = queue_depths(&url, std::slice::from_ref(&dead)).await;
    assert_eq!(depths[&dead], 1, "only the conflict is dead-lettered");
    let rows = run.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].y_pred, rows[0].model_version.as_str()),
        (140.5, "ols-old")
    );
    let _ = connection.close(200, "bye".into()).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_down_longer_than_the_join_allows_loses_no_pair() {
    const SAMPLES: usize = 5000;
    let url = shared_amqp_url();
    // Room for 1,000 waiting ids, 2 s of age: the old policy dropped 4,000 by capacity, then the
    // rest by age. Now at most 500 true values are read ahead of their prediction.
    let options = Options::new(url.clone(), SAMPLES as u64)
        .rate(0.0)
        .env("JOIN_CAPACITY", "1000")
        .env("JOIN_READ_AHEAD", "500")
        .env("JOIN_MAX_AGE_SECS", "2");
    let mut run = Pipeline::start_consumers("lagging", options);
    let dir = run.dir.path().to_owned();
    wait_healthy(&run.metric, LONG);
    wait_healthy(&run.model, LONG);
    run.model.signal("TERM");
    assert!(run.model.wait_exit(Duration::from_secs(20)).is_some());

    run.start_features();
    let held = |metric: &Service| metric.metrics().get("pipeline_join_y_true_held").copied();
    assert!(
        wait_until(LONG, || held(&run.metric) == Some(1.0)),
        "y_true was never held back:\n{}",
        run.metric.stderr()
    );
    // The model stays down for three times JOIN_MAX_AGE_SECS, and until the producer is done
    // (on a loaded machine it takes longer than that); the broker keeps the backlog.
    let held_at = std::time::Instant::now();
    let features = run.features.as_mut().expect("features started");
    let exit = features.wait_exit(Duration::from_secs(120));
    assert!(exit.is_some_and(|s| s.success()), "features: {exit:?}");
    std::thread::sleep(Duration::from_secs(6).saturating_sub(held_at.elapsed()));
    let metrics = run.metric.metrics();
    let waiting = metrics
        .get("pipeline_join_waiting")
        .copied()
        .unwrap_or(-1.0);
    assert!((500.0..=600.0).contains(&waiting), "waiting {waiting}");
    let depths = queue_depths(&url, std::slice::from_ref(&run.queues.y_true)).await;
    let queued = depths.get(&run.queues.y_true).copied().unwrap_or(0);
    assert!(
        queued >= 3000,
        "the broker should keep most of y_true, has {queued}"
    );
    assert!(
        run.metric
            .stderr()
            .contains("is not taken until the model catches up")
    );
    let health = run
        .metric
        .get("/healthz")
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        health.contains("true values wait for their prediction"),
        "{health}"
    );

    run.model.restart(&dir);
    run.wait_rows(SAMPLES, LONG);
    let rows = run.rows();
    assert_exactly_once(&rows, SAMPLES);
    let metrics = run.metric.metrics();
    let evicted: f64 = metrics
        .iter()
        .filter(|(name, _)| name.starts_with("pipeline_join_evicted_total"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(evicted, 0.0, "ids were dropped:\n{}", run.metric.stderr());
    assert!(wait_until(Duration::from_secs(10), || held(&run.metric) == Some(0.0)));
    assert!(!run.metric.stderr().contains("dropped an id"));
    println!(
        "lagging model: {SAMPLES} samples, {queued} y_true kept by the broker while the model was down, {} rows, 0 dropped",
        rows.len()
    );
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
