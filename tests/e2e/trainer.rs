//! The closed loop end to end: three model replicas serve a model fitted on DATA_PATH (their
//! MODEL_PATH does not exist yet), the producer drifts bmi and s5 after 1,000 samples, the trainer
//! retrains from its copy of the streams and promotes a new version, every replica serves it, and
//! on the samples after the drift the new version's MAE is lower than the old one's, with every
//! sample in the metric's CSV exactly once. Then, after a restart (the window comes back from
//! disk), a window that is mostly pure noise gives a worse candidate: `POST /retrain` refuses it
//! and the served model stays; `model rollback` puts the first version back on every replica.
//! Also: a course-style producer publishing straight to the `features` queue feeds the model and
//! the trainer sees nothing of it.

use crate::helpers::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use model::artifact::Artifact;
use pipeline::broker::topology::training_queue;
use std::collections::HashMap;
use std::time::Duration;

const N: u64 = 4000;
const DRIFT_AFTER: usize = 1000;
/// Rows of the CSV around the drift left out of both sides (replicas may reorder a little).
const MARGIN: usize = 100;
const WINDOW: usize = 1000;

fn metric(service: &Service, name: &str) -> f64 {
    service.metrics().get(name).copied().unwrap_or(0.0)
}

fn served(service: &Service, version: &str) -> bool {
    metric(
        service,
        &format!("pipeline_model_served{{version=\"{version}\"}}"),
    ) == 1.0
}

fn mae(rows: &[&Row]) -> f64 {
    rows.iter().map(|r| r.absolute_error).sum::<f64>() / rows.len() as f64
}

fn retrains(trainer: &Service) -> HashMap<String, f64> {
    trainer
        .metrics()
        .into_iter()
        .filter(|(name, _)| name.starts_with("pipeline_trainer_retrains_total{"))
        .collect()
}

/// Publishes `count` samples of random features and targets straight to the trainer's queues.
async fn publish_noise(url: &str, features: &str, y_true: &str, count: usize) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    // xorshift64: reproducible noise in [0, 1).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for n in 0..count {
        let id = format!("noise-{n}");
        let x: Vec<f64> = (0..10).map(|_| uniform() * 0.2 - 0.1).collect();
        let y = 25.0 + 321.0 * uniform();
        for (queue, body) in [
            (
                training_queue(features),
                serde_json::json!({"id": id, "features": x}),
            ),
            (
                training_queue(y_true),
                serde_json::json!({"id": id, "y_true": y}),
            ),
        ] {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trainer_promotes_after_a_drift_and_refuses_a_worse_candidate() {
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("models/model.json");
    std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
    let train_dir = work.path().join("train");
    let options = Options::new(url.clone(), N)
        .env("MODEL_PATH", &model_path.display().to_string())
        .env("MODEL_POLL_MS", "200")
        .env("DRIFT_AFTER", &DRIFT_AFTER.to_string())
        .env("DRIFT_SHIFT", "bmi=0.05,s5=0.04")
        .env("QUALITY_WINDOW", "400");
    let run = Pipeline::start_consumers("trainer", options);
    let replicas = [
        run.extra_service("model", &[]),
        run.extra_service("model", &[]),
    ];
    let trainer_env = [
        ("TRAIN_DIR", train_dir.display().to_string()),
        ("TRAIN_WINDOW", WINDOW.to_string()),
        ("TRAIN_HOLDOUT", "0.2".to_owned()),
        ("RETRAIN_EVERY", "500".to_owned()),
        ("PROMOTE_MIN_GAIN", "0.05".to_owned()),
        ("METRIC_URL", format!("http://{}", run.metric.http_addr)),
        ("METRIC_POLL_MS", "500".to_owned()),
    ];
    let mut trainer = run.extra_service("trainer", &trainer_env);
    for service in [
        &run.metric,
        &run.model,
        &replicas[0],
        &replicas[1],
        &trainer,
    ] {
        wait_healthy(service, Duration::from_secs(30));
    }
    let models = [&run.model, &replicas[0], &replicas[1]];
    let old = Artifact::train(&repo_root().join("data/diabetes.csv"), None, None)
        .unwrap()
        .version;
    for model in models {
        assert!(served(model, &old), "a replica does not serve {old}");
    }

    let producer = run.extra_service(
        "features",
        &[("COUNT", N.to_string()), ("RATE", "250".to_owned())],
    );
    run.wait_rows(N as usize, Duration::from_secs(120));
    drop(producer);
    let promoted = wait_until(Duration::from_secs(10), || {
        retrains(&trainer)
            .iter()
            .any(|(name, value)| name.contains("result=\"promoted\"") && *value >= 1.0)
    });
    assert!(
        promoted,
        "no promotion: {:?}\n{}\n--- trainer\n{}",
        retrains(&trainer),
        run.logs(),
        trainer.stderr()
    );
    let new = Artifact::load(&model_path).unwrap().version;
    assert_ne!(new, old);
    assert!(work.path().join(format!("models/{new}.json")).exists());
    assert!(work.path().join(format!("models/{old}.json")).exists());
    // Every replica serves it (the trainer's log says when it was promoted; the replicas poll
    // MODEL_PATH every 200 ms).
    assert!(
        wait_until(Duration::from_secs(5), || models
            .iter()
            .all(|m| served(m, &new))),
        "not every replica serves {new}"
    );
    let rows = run.rows();
    assert_exactly_once(&rows, N as usize);
    let before: Vec<&Row> = rows[..DRIFT_AFTER - MARGIN].iter().collect();
    assert!(
        before.iter().all(|r| r.model_version == old),
        "a version other than {old} before the drift"
    );
    let after = &rows[DRIFT_AFTER + MARGIN..];
    let old_after: Vec<&Row> = after.iter().filter(|r| r.model_version == old).collect();
    // Every promoted version counts: how many promotions follow the drift (one to three) and so
    // how many rows the last one gets depends on timing; that they beat the old model does not.
    let new_after: Vec<&Row> = after.iter().filter(|r| r.model_version != old).collect();
    // The alarm's retrain usually lands 150 to 300 samples after the drift.
    assert!(
        old_after.len() >= 50 && new_after.len() >= 100,
        "after the drift: {} rows of {old}, {} of the promoted versions (last {new})",
        old_after.len(),
        new_after.len()
    );
    let (mae_before, mae_old, mae_new) = (mae(&before), mae(&old_after), mae(&new_after));
    eprintln!(
        "closed loop: MAE before the drift {mae_before:.2} ({} rows, {old}); after the drift with \
         the old model {mae_old:.2} ({} rows); after the promotions {mae_new:.2} ({} rows, last {new}); \
         retrains {:?}",
        before.len(),
        old_after.len(),
        new_after.len(),
        retrains(&trainer)
    );
    for line in trainer.stderr().lines().filter(|l| l.contains("candidate")) {
        eprintln!("trainer: {line}");
    }
    assert!(
        mae_new < mae_old,
        "the promoted versions ({mae_new}) are not better than {old} ({mae_old}) after the drift"
    );
    let mut by_version: Vec<(String, usize, f64)> = Vec::new();
    for version in after.iter().map(|r| r.model_version.clone()) {
        if !by_version.iter().any(|(v, _, _)| *v == version) {
            let rows: Vec<&Row> = after
                .iter()
                .filter(|r| r.model_version == version)
                .collect();
            by_version.push((version, rows.len(), mae(&rows)));
        }
    }
    eprintln!("closed loop: after the drift, (version, rows, MAE): {by_version:?}");
    // Nothing failed through the swaps: no dead letter anywhere.
    let dead: Vec<String> = [&run.queues.features, &run.queues.y_true, &run.queues.y_pred]
        .iter()
        .map(|q| dead_letter_queue(q))
        .collect();
    let depths = queue_depths(&url, &dead).await;
    assert!(depths.values().all(|d| *d == 0), "dead letters: {depths:?}");

    // A restart keeps the window; retrains only on request from now on.
    trainer.restart_with(
        run.dir(),
        &[
            ("RETRAIN_EVERY", "0".to_owned()),
            ("METRIC_URL", String::new()),
        ],
    );
    wait_healthy(&trainer, Duration::from_secs(30));
    assert_eq!(
        metric(&trainer, "pipeline_trainer_window_samples"),
        WINDOW as f64,
        "the window did not come back from disk"
    );
    // A worse candidate: 700 samples of pure noise, then 300 real drifted samples. The candidate
    // is fitted on the older part (mostly noise) and scored on the newest (real) part.
    publish_noise(&url, &run.queues.features, &run.queues.y_true, 700).await;
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &trainer,
            "pipeline_trainer_samples_total"
        ) >= 700.0),
        "the trainer did not take the noise\n{}",
        trainer.stderr()
    );
    let more = 300;
    let producer = run.extra_service(
        "features",
        &[
            ("COUNT", more.to_string()),
            ("RATE", "0".to_owned()),
            ("DRIFT_AFTER", "0".to_owned()),
        ],
    );
    run.wait_rows(N as usize + more, Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &trainer,
            "pipeline_trainer_samples_total"
        ) >= (700 + more) as f64),
        "the trainer did not take the real samples\n{}",
        trainer.stderr()
    );
    drop(producer);
    let served_bytes = std::fs::read(&model_path).unwrap();
    let (status, body) = http_post(trainer.http_addr, "/retrain", None).expect("POST /retrain");
    assert_eq!(status, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    eprintln!("closed loop: noise window: {outcome}");
    assert_eq!(outcome["result"], "refused", "{outcome}");
    assert_eq!(outcome["serving_version"], new.as_str());
    assert!(outcome["candidate_mae"].as_f64() > outcome["serving_mae"].as_f64());
    assert_eq!(
        metric(
            &trainer,
            "pipeline_trainer_retrains_total{trigger=\"manual\",result=\"refused\"}"
        ),
        1.0
    );
    assert!(
        trainer
            .stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("candidate refused")),
        "{}",
        trainer.stderr()
    );
    assert_eq!(std::fs::read(&model_path).unwrap(), served_bytes);
    std::thread::sleep(Duration::from_millis(600));
    for model in models {
        assert!(served(model, &new), "a replica left {new}");
    }
    let rows = run.rows();
    assert_exactly_once(&rows, N as usize + more);

    // `model rollback --to` the first version: every replica goes back to it.
    let status = std::process::Command::new(bin_path("model"))
        .args(["rollback", "--to", &old])
        .env("MODEL_PATH", &model_path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "model rollback failed");
    assert!(
        wait_until(Duration::from_secs(5), || models
            .iter()
            .all(|m| served(m, &old))),
        "not every replica went back to {old}"
    );

    let queues = run.queues.clone();
    drop(trainer);
    drop(replicas);
    drop(run);
    delete_queues(&url, &queues).await;
}

/// A course-style producer publishes straight to the `features` queue (default exchange): the
/// model predicts it, and the trainer, whose copy comes from the fanout exchange only, receives
/// nothing; our producer's samples do reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_course_style_producer_feeds_the_model_but_not_the_trainer() {
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let mut run = Pipeline::start_consumers("trainerfanout", Options::new(url.clone(), 50));
    let trainer = run.extra_service(
        "trainer",
        &[
            ("TRAIN_DIR", work.path().join("train").display().to_string()),
            (
                "MODEL_PATH",
                work.path().join("model.json").display().to_string(),
            ),
        ],
    );
    wait_healthy(&run.model, Duration::from_secs(30));
    wait_healthy(&trainer, Duration::from_secs(30));
    let connection = connect(&url).await;
    for n in 0..20 {
        let id = format!("course-{n}");
        let features = serde_json::json!([
            0.01, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02
        ]);
        publish_raw(&connection, &run.queues.y_true, b"151.0", Some(id.as_str())).await;
        publish_raw(
            &connection,
            &run.queues.features,
            features.to_string().as_bytes(),
            Some(id.as_str()),
        )
        .await;
    }
    let _ = connection.close(200, "bye".into()).await;
    run.wait_rows(20, Duration::from_secs(30));
    let consumed = |service: &Service, queue: &str| {
        metric(
            service,
            &format!("pipeline_messages_consumed_total{{queue=\"{queue}\"}}"),
        )
    };
    assert_eq!(consumed(&run.model, &run.queues.features), 20.0);
    std::thread::sleep(Duration::from_millis(500));
    let received = |stream: &str| {
        metric(
            &trainer,
            &format!("pipeline_trainer_received_total{{stream=\"{stream}\"}}"),
        )
    };
    assert_eq!(received("features"), 0.0);
    assert_eq!(received("y_true"), 0.0);
    assert_eq!(
        consumed(&trainer, &training_queue(&run.queues.features)),
        0.0
    );

    // Our producer's samples reach both.
    run.start_features();
    run.wait_rows(70, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &trainer,
            "pipeline_trainer_samples_total"
        ) == 50.0),
        "{:?}\n{}",
        trainer.metrics(),
        trainer.stderr()
    );
    assert_eq!(received("features"), 50.0);
    assert_eq!(received("y_true"), 50.0);
    assert_exactly_once(&run.rows(), 70);
    let queues = run.queues.clone();
    drop(trainer);
    drop(run);
    delete_queues(&url, &queues).await;
}

#[test]
fn the_trainer_settings_are_listed_by_help() {
    let output = std::process::Command::new(bin_path("trainer"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for name in [
        "MODEL_PATH",
        "TRAIN_DIR",
        "TRAIN_WINDOW",
        "TRAIN_HOLDOUT",
        "RETRAIN_EVERY",
        "PROMOTE_MIN_GAIN",
        "METRIC_URL",
        "METRIC_POLL_MS",
        "TRAIN_QUEUE_MAX_LENGTH",
        "HTTP_ADDR",
    ] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "trainer --help does not list {name}"
        );
    }
}

/// How the trainer gets a valid `MODEL_PATH` back.
#[derive(Clone, Copy, Debug)]
enum Recovery {
    /// Someone writes a valid artifact to MODEL_PATH.
    ValidFile,
    /// `POST /retrain`: a candidate is promoted on the absolute guards and replaces the file.
    Promotion,
    /// `model rollback --to` a kept version.
    Rollback,
}

/// A MODEL_PATH that is not a valid artifact, for each of the three causes (garbage bytes, a valid
/// artifact cut in half, an artifact of an unsupported format version): the trainer starts,
/// `/healthz` answers 200 with a note that it is not ready for promotion decisions, the gauge is
/// 1, one WARN names the cause, it keeps consuming; and it recovers by a valid file written later,
/// by a promotion on the absolute guards, or by `model rollback`.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_model_file_is_reported_and_the_trainer_recovers() {
    const SAMPLES: usize = 400;
    const WARNING: &str = "MODEL_PATH is not a valid model artifact";
    let url = shared_amqp_url();
    let artifact = Artifact::train(
        &repo_root().join("data/diabetes.csv"),
        None,
        Some("handmade".to_owned()),
    )
    .unwrap();
    let valid = serde_json::to_string_pretty(&artifact).unwrap() + "\n";
    let cases: [(&str, Vec<u8>, &str, Recovery); 3] = [
        (
            "garbage",
            b"\x00\x01 this is not an artifact \xff".to_vec(),
            "invalid utf-8",
            Recovery::ValidFile,
        ),
        (
            "truncated",
            valid.as_bytes()[..valid.len() / 2].to_vec(),
            "EOF while parsing",
            Recovery::Promotion,
        ),
        (
            "old-format",
            valid
                .replace(model::artifact::FORMAT, "ml-pipeline/linear-model/0")
                .into_bytes(),
            "format is \"ml-pipeline/linear-model/0\"",
            Recovery::Rollback,
        ),
    ];
    for (cause, bytes, expected, recovery) in cases {
        let queues = Queues::unique("trainerbroken");
        let work = tempfile::tempdir().unwrap();
        let model_path = work.path().join("models/model.json");
        std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
        std::fs::write(&model_path, &bytes).unwrap();
        let mut env = queues.env();
        env.extend([
            ("AMQP_URL".to_owned(), url.clone()),
            ("RECONNECT_MAX_DELAY_MS".to_owned(), "1000".to_owned()),
            ("MODEL_PATH".to_owned(), model_path.display().to_string()),
            (
                "TRAIN_DIR".to_owned(),
                work.path().join("train").display().to_string(),
            ),
            ("TRAIN_WINDOW".to_owned(), SAMPLES.to_string()),
            ("RETRAIN_EVERY".to_owned(), "0".to_owned()),
        ]);
        let mut trainer = spawn_service("trainer", env, work.path());
        wait_healthy(&trainer, Duration::from_secs(30));
        let (status, body) = trainer.get("/healthz").unwrap();
        eprintln!("broken model file ({cause}): /healthz {status}: {body:?}");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.starts_with("ok\n")
                && body.contains("note: not ready for promotion decisions: MODEL_PATH")
                && body.contains(expected),
            "{cause}: {body}"
        );
        assert_eq!(
            metric(&trainer, "pipeline_trainer_model_unreadable"),
            1.0,
            "{cause}"
        );

        // It keeps consuming and keeping its window.
        publish_rows(&url, &queues, SAMPLES).await;
        assert!(
            wait_until(Duration::from_secs(30), || metric(
                &trainer,
                "pipeline_trainer_samples_total"
            ) >= SAMPLES as f64),
            "{cause}: the trainer did not take the samples\n{}",
            trainer.stderr()
        );
        let depths = queue_depths(
            &url,
            &[
                training_queue(&queues.features),
                training_queue(&queues.y_true),
            ],
        )
        .await;
        assert!(depths.values().all(|d| *d == 0), "{cause}: {depths:?}");
        // Polled every second: still one WARN.
        std::thread::sleep(Duration::from_millis(2500));
        let warnings: Vec<String> = trainer
            .stderr()
            .lines()
            .filter(|l| l.contains(WARNING))
            .map(str::to_owned)
            .collect();
        assert_eq!(warnings.len(), 1, "{cause}: {warnings:#?}");
        assert!(
            warnings[0].contains("WARN") && warnings[0].contains(expected),
            "{}",
            warnings[0]
        );
        eprintln!("broken model file ({cause}): log: {}", warnings[0]);

        let expected_version = match recovery {
            Recovery::ValidFile => {
                std::fs::write(&model_path, &valid).unwrap();
                "handmade".to_owned()
            }
            Recovery::Promotion => {
                let (status, body) = http_post(trainer.http_addr, "/retrain", None).unwrap();
                assert_eq!(status, 200, "{cause}: {body}");
                let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
                eprintln!("broken model file ({cause}): POST /retrain: {outcome}");
                assert_eq!(outcome["result"], "promoted", "{outcome}");
                assert_eq!(outcome["serving_version"], "unreadable", "{outcome}");
                assert!(outcome.get("serving_mae").is_none(), "{outcome}");
                let kept = model_path.with_file_name("model.json.unreadable");
                assert_eq!(std::fs::read(kept).unwrap(), bytes);
                "v1".to_owned()
            }
            Recovery::Rollback => {
                std::fs::write(model_path.with_file_name("handmade.json"), &valid).unwrap();
                let status = std::process::Command::new(bin_path("model"))
                    .args(["rollback", "--to", "handmade"])
                    .env("MODEL_PATH", &model_path)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success(), "model rollback failed");
                "handmade".to_owned()
            }
        };
        assert_eq!(
            Artifact::load(&model_path).unwrap().version,
            expected_version
        );
        assert!(
            wait_until(Duration::from_secs(5), || metric(
                &trainer,
                "pipeline_trainer_model_unreadable"
            ) == 0.0),
            "{cause}: not recovered\n{}",
            trainer.stderr()
        );
        let (status, body) = trainer.get("/healthz").unwrap();
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{cause}");
        let recovered = trainer
            .stderr()
            .lines()
            .filter(|l| l.contains("ready for promotion decisions") && l.contains("INFO"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(recovered.len(), 1, "{cause}: {recovered:#?}");
        eprintln!("broken model file ({cause}): log: {}", recovered[0]);
        // Back on the relative guard: the same rows give no 5 % better candidate.
        let (status, body) = http_post(trainer.http_addr, "/retrain", None).unwrap();
        assert_eq!(status, 200, "{cause}: {body}");
        let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(outcome["serving_version"], expected_version.as_str());
        assert!(outcome["serving_mae"].is_number(), "{outcome}");
        assert!(trainer.is_running(), "{cause}: the trainer exited");
        drop(trainer);
        delete_queues(&url, &queues).await;
    }
}
