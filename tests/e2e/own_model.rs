//! Users' own models on a real broker: two replicas swap a linear JSON artifact for a
//! gradient-boosting and then a random-forest ONNX pipeline under traffic, each row predicted by
//! the version that served it (equal to scikit-learn's answer within float32); broken models are
//! refused while the served one goes on; named features in any key order are predicted as arrays
//! are; misnamed features and a CSV with its columns reordered are dead-lettered `schema_mismatch`;
//! an `.onnx` model without the runtime library stops the service with a message naming
//! `ORT_DYLIB_PATH`.

use crate::helpers::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use model::served::ServedModel;
use pipeline::broker::publisher::header_str;
use pipeline::broker::topology::{DETAIL_HEADER, REASON_HEADER, dead_letter_queue};
use pipeline::dataset::Dataset;
use pipeline::schema::FEATURE_NAMES_HEADER;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The ONNX Runtime library the services are given (the test kit clears their environment).
fn ort() -> String {
    std::env::var("ORT_DYLIB_PATH")
        .expect("these tests need ONNX Runtime: ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/models/fixtures").join(name)
}

fn diabetes() -> Dataset {
    Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).unwrap()
}

/// Replaces the served artifact at once, as a deployment would (write beside, rename).
fn install(model_path: &Path, from: &Path) {
    let tmp = model_path.with_extension("incoming");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, model_path).unwrap();
}

fn serves(service: &Service, version: &str) -> bool {
    service
        .metrics()
        .get(&format!("pipeline_model_served{{version=\"{version}\"}}"))
        .copied()
        == Some(1.0)
}

/// scikit-learn's predictions of a fixture, by data row.
fn sklearn(name: &str) -> Vec<f64> {
    std::fs::read_to_string(fixture(&format!("{name}.expected.csv")))
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_swap_linear_for_gbr_then_rf_under_traffic_and_refuse_broken_models() {
    const TOTAL: usize = 3000;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("models/model.onnx");
    std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
    // Served first: the linear JSON artifact (the kind is read from the bytes, not the name).
    train(&repo_root().join("data/diabetes.csv"), &model_path, "v1");
    let options = Options::new(url.clone(), TOTAL as u64)
        .rate(300.0)
        .env("MODEL_PATH", &model_path.display().to_string())
        .env("MODEL_POLL_MS", "100")
        .env("ORT_DYLIB_PATH", &ort());
    let mut run = Pipeline::start_consumers("ownmodel", options);
    let second = run.extra_service("model", &[]);
    for replica in [&run.model, &second] {
        wait_healthy(replica, Duration::from_secs(30));
        assert!(serves(replica, "v1"), "{}", replica.stderr());
    }
    run.start_features();

    run.wait_rows(500, Duration::from_secs(60));
    install(&model_path, &fixture("gbr.onnx"));
    assert!(
        wait_until(Duration::from_secs(20), || serves(&run.model, "gbr-1")
            && serves(&second, "gbr-1")),
        "gbr-1 not served by both\n{}\n{}",
        run.model.stderr_tail(10),
        second.stderr_tail(10)
    );
    run.wait_rows(run.rows().len() + 600, Duration::from_secs(60));
    install(&model_path, &fixture("rf.onnx"));
    assert!(
        wait_until(Duration::from_secs(20), || serves(&run.model, "rf-1")
            && serves(&second, "rf-1")),
        "rf-1 not served by both\n{}\n{}",
        run.model.stderr_tail(10),
        second.stderr_tail(10)
    );
    run.wait_rows(run.rows().len() + 300, Duration::from_secs(60));

    // Every broken model is refused by both replicas; rf-1 stays served.
    let refused = |service: &Service| {
        service
            .metrics()
            .get("pipeline_model_reloads_total{result=\"refused\"}")
            .copied()
            .unwrap_or(0.0)
    };
    for (n, broken) in [
        "truncated.onnx",
        "two_inputs.onnx",
        "string_input.onnx",
        "nan_output.onnx",
        "wrong_shape.onnx",
        "double_trees.onnx",
    ]
    .into_iter()
    .enumerate()
    {
        install(&model_path, &fixture(broken));
        assert!(
            wait_until(Duration::from_secs(20), || {
                refused(&run.model) >= (n + 1) as f64 && refused(&second) >= (n + 1) as f64
            }),
            "{broken} not refused by both\n{}",
            run.model.stderr_tail(10)
        );
        assert!(serves(&run.model, "rf-1") && serves(&second, "rf-1"));
    }
    let (status, health) = run.model.get("/healthz").unwrap();
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("refused the model artifact"), "{health}");
    assert!(
        run.model.stderr().contains("CastTransformer"),
        "the double-trees refusal says what to change"
    );

    run.wait_rows(TOTAL, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let rows = run.rows();
    assert_exactly_once(&rows, TOTAL);

    // Each row's prediction is what its version answers for the data row its y_true came from.
    let data = diabetes();
    // v1 was `model train` on the same CSV: the same fit.
    let v1 = model::regression::LinearModel::fit(&data).unwrap();
    let gbr = ServedModel::onnx(&std::fs::read(fixture("gbr.onnx")).unwrap()).unwrap();
    let rf = ServedModel::onnx(&std::fs::read(fixture("rf.onnx")).unwrap()).unwrap();
    let (sk_gbr, sk_rf) = (sklearn("gbr"), sklearn("rf"));
    let mut by_version: HashMap<&str, usize> = HashMap::new();
    for row in &rows {
        *by_version.entry(row.model_version.as_str()).or_default() += 1;
        let candidates: Vec<usize> = (0..data.len())
            .filter(|&i| data.target(i) == row.y_true)
            .collect();
        assert!(
            !candidates.is_empty(),
            "{row:?}: no data row has this y_true"
        );
        let fits = candidates.iter().any(|&i| {
            let features = data.row(i);
            match row.model_version.as_str() {
                "v1" => v1.predict(features).unwrap() == row.y_pred,
                "gbr-1" => {
                    gbr.predict(features).unwrap().unwrap() == row.y_pred
                        && (row.y_pred - sk_gbr[i]).abs() <= 5e-4
                }
                "rf-1" => {
                    rf.predict(features).unwrap().unwrap() == row.y_pred
                        && (row.y_pred - sk_rf[i]).abs() <= 5e-4
                }
                other => panic!("{row:?}: version {other} was never installed"),
            }
        });
        assert!(fits, "{row:?} is not its version's prediction");
    }
    eprintln!("rows by version: {by_version:?}");
    for version in ["v1", "gbr-1", "rf-1"] {
        assert!(by_version.get(version) >= Some(&100), "{by_version:?}");
    }
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// Publishes `body` to `queue` with `headers`, confirmed.
async fn publish_with(connection: &Connection, queue: &str, body: &str, headers: FieldTable) {
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = channel.close(200, "bye".into()).await;
}

fn announced(names: &[&str]) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        FEATURE_NAMES_HEADER.into(),
        AMQPValue::LongString(names.join(",").into()),
    );
    headers
}

#[tokio::test(flavor = "multi_thread")]
async fn named_features_in_any_order_are_predicted_and_misnamed_ones_dead_lettered() {
    let url = shared_amqp_url();
    let options = Options::new(url.clone(), 0)
        .env("MODEL_PATH", &fixture("gbr.onnx").display().to_string())
        .env("ORT_DYLIB_PATH", &ort());
    let mut run = Pipeline::start_consumers("namedfeatures", options);
    wait_healthy(&run.model, Duration::from_secs(30));
    let q = run.queues.clone();
    let data = diabetes();
    let names: Vec<&str> = data.feature_names.iter().map(String::as_str).collect();
    let connection = connect(&url).await;
    let none = FieldTable::default;
    for k in 0..20usize {
        let values = data.row(k);
        let array: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        publish_with(
            &connection,
            &q.features,
            &format!("{{\"id\":\"arr-{k}\",\"features\":[{}]}}", array.join(",")),
            announced(&names),
        )
        .await;
        // The same values named, keys in a different order for every row.
        let mut pairs: Vec<String> = names
            .iter()
            .zip(values)
            .map(|(name, v)| format!("\"{name}\":{v:?}"))
            .collect();
        let shift = k % pairs.len();
        pairs.rotate_left(shift);
        if k % 2 == 1 {
            pairs.reverse();
        }
        publish_with(
            &connection,
            &q.features,
            &format!(
                "{{\"id\":\"obj-{k}\",\"features\":{{{}}}}}",
                pairs.join(",")
            ),
            none(),
        )
        .await;
        for id in [format!("arr-{k}"), format!("obj-{k}")] {
            publish_with(
                &connection,
                &q.y_true,
                &format!("{{\"id\":\"{id}\",\"y_true\":{:?}}}", data.target(k)),
                none(),
            )
            .await;
        }
    }
    // A misspelt name, and an array whose producer's columns are in another order.
    let misnamed: Vec<String> = names
        .iter()
        .zip(data.row(0))
        .map(|(name, v)| format!("\"{}\":{v:?}", if *name == "bmi" { "bmj" } else { name }))
        .collect();
    publish_with(
        &connection,
        &q.features,
        &format!(
            "{{\"id\":\"misnamed\",\"features\":{{{}}}}}",
            misnamed.join(",")
        ),
        none(),
    )
    .await;
    let mut reordered_names = names.clone();
    reordered_names.swap(0, 2);
    let array: Vec<String> = data.row(0).iter().map(|v| format!("{v:?}")).collect();
    publish_with(
        &connection,
        &q.features,
        &format!(
            "{{\"id\":\"reordered\",\"features\":[{}]}}",
            array.join(",")
        ),
        announced(&reordered_names),
    )
    .await;

    run.wait_rows(40, Duration::from_secs(60));
    let rows: HashMap<String, f64> = run.rows().into_iter().map(|r| (r.id, r.y_pred)).collect();
    let sk = sklearn("gbr");
    for k in 0..20 {
        let (array, object) = (rows[&format!("arr-{k}")], rows[&format!("obj-{k}")]);
        assert_eq!(array, object, "row {k}: named features predicted otherwise");
        assert!(
            (array - sk[k]).abs() <= 5e-4,
            "row {k}: {array} vs {}",
            sk[k]
        );
    }

    // Both refusals in features' dead-letter queue, with the reason and the fields named.
    let channel = connection.create_channel().await.unwrap();
    let dlq = dead_letter_queue(&q.features);
    let mut found = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while found.len() < 2 && std::time::Instant::now() < deadline {
        while let Some(message) = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let headers = message.properties.headers().clone().unwrap_or_default();
            let body = String::from_utf8_lossy(&message.data).into_owned();
            let id = if body.contains("misnamed") {
                "misnamed"
            } else {
                "reordered"
            };
            found.insert(
                id,
                (
                    header_str(&headers, REASON_HEADER).unwrap_or("").to_owned(),
                    header_str(&headers, DETAIL_HEADER).unwrap_or("").to_owned(),
                ),
            );
            message.ack(BasicAckOptions::default()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("dead letters: {found:#?}");
    let (reason, detail) = &found["misnamed"];
    assert_eq!(reason, "schema_mismatch");
    assert!(
        detail.contains("missing [bmi]") && detail.contains("unknown [bmj]"),
        "{detail}"
    );
    let (reason, detail) = &found["reordered"];
    assert_eq!(reason, "schema_mismatch");
    assert!(detail.contains("another order"), "{detail}");
    assert!(!rows.contains_key("misnamed") && !rows.contains_key("reordered"));
    assert!(run.model.is_running());
    run.stop_services();
    delete_queues(&url, &q).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_with_its_columns_reordered_is_dead_lettered_not_served_wrong() {
    const COUNT: u64 = 200;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    // The same table with bmi and age swapped: a user's export in another column order.
    let text = std::fs::read_to_string(repo_root().join("data/diabetes.csv")).unwrap();
    let swapped: Vec<String> = text
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(',').collect();
            fields.swap(0, 2);
            fields.join(",")
        })
        .collect();
    let csv = work.path().join("reordered.csv");
    std::fs::write(&csv, swapped.join("\n") + "\n").unwrap();
    let options = Options::new(url.clone(), COUNT)
        .rate(400.0)
        .env("DATA_PATH", &csv.display().to_string())
        .env("MODEL_PATH", &fixture("gbr.onnx").display().to_string())
        .env("ORT_DYLIB_PATH", &ort());
    let mut run = Pipeline::start("reorderedcsv", options);
    let features = run.features.as_mut().unwrap();
    let exit = features.wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let dlq = dead_letter_queue(&run.queues.features);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut dead = 0;
    while dead < COUNT as u32 && std::time::Instant::now() < deadline {
        dead = queue_depths(&url, std::slice::from_ref(&dlq))
            .await
            .get(&dlq)
            .copied()
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dead, COUNT as u32, "{}", run.logs());
    assert_eq!(
        run.model.metrics().value(
            "pipeline_messages_dead_lettered_total",
            &[
                ("queue", run.queues.features.as_str()),
                ("reason", "schema_mismatch")
            ]
        ),
        Some(COUNT as f64)
    );
    assert!(run.rows().is_empty(), "a reordered sample was predicted");
    assert!(
        run.model
            .stderr()
            .contains("the same names in another order"),
        "{}",
        run.model.stderr_tail(5)
    );
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_onnx_model_without_the_runtime_stops_with_a_message_naming_ort_dylib_path() {
    let url = shared_amqp_url();
    let queues = Queues::unique("noruntime");
    let work = tempfile::tempdir().unwrap();
    for runtime in [Some("/nonexistent/libonnxruntime.so"), None] {
        let mut env = Env::new(&url, &queues)
            .set("MODEL_PATH", fixture("gbr.onnx").display())
            .pairs()
            .to_vec();
        if let Some(path) = runtime {
            env.push(("ORT_DYLIB_PATH".into(), path.into()));
        }
        let mut model = spawn_service("model", env, work.path());
        let status = model
            .wait_exit(Duration::from_secs(30))
            .expect("the model service stops");
        assert!(!status.success());
        let text = model.stderr();
        assert!(text.contains("ORT_DYLIB_PATH"), "{text}");
        assert!(text.contains("onnxruntime"), "says where to get it: {text}");
    }
    delete_queues(&url, &queues).await;
}

/// The closed loop with the user's own training code: the trainer runs `examples/train_sklearn.py`
/// as `TRAIN_COMMAND` on its window after a drift, scores the `.onnx` it writes and promotes it;
/// two replicas follow over `MODEL_URL` (the trainer's `GET /model` serving the ONNX bytes), and
/// the samples that follow are each predicted by it. Then a hanging command is killed at its
/// limit, `/healthz` says so, and the served model stays. Retrains are asked for (`POST
/// /retrain`), so what is checked does not depend on how fast a busy machine trains.
#[tokio::test(flavor = "multi_thread")]
async fn the_trainer_promotes_what_train_command_trains_and_replicas_follow_over_model_url() {
    const BEFORE: usize = 2000;
    const AFTER: usize = 1000;
    const DRIFT_AFTER: usize = 1000;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let model_path = models.join("model.onnx");
    let script = repo_root().join("examples/train_sklearn.py");
    let queues = Queues::unique("traincommand");
    let mut trainer_env = Env::new(&url, &queues)
        .set("MODEL_PATH", model_path.display())
        .set("TRAIN_DIR", work.path().join("train").display())
        .set("TRAIN_WINDOW", 1000)
        .set("RETRAIN_EVERY", 0)
        .set("TRAIN_COMMAND", format!("python3 {}", script.display()))
        .set("TRAIN_TIMEOUT_SECS", 120)
        .set("ORT_DYLIB_PATH", ort())
        .set("RECONNECT_MAX_DELAY_MS", 1000)
        .pairs()
        .to_vec();
    // python3 finds its packages through the usual environment (the test kit clears it).
    for key in ["PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV"] {
        if let Ok(value) = std::env::var(key) {
            trainer_env.push((key.into(), value));
        }
    }
    let trainer_dir = work.path().join("trainer");
    std::fs::create_dir_all(&trainer_dir).unwrap();
    let mut trainer = spawn_service("trainer", trainer_env, &trainer_dir);
    wait_healthy(&trainer, Duration::from_secs(30));
    let model_url = format!("http://{}/model", trainer.http_addr);
    let options = Options::new(url.clone(), BEFORE as u64)
        .rate(250.0)
        .env("MODEL_URL", &model_url)
        .env("MODEL_POLL_MS", "200")
        .env("ORT_DYLIB_PATH", &ort())
        .env("DRIFT_SHIFT", "bmi=0.05,s5=0.04");
    let mut run = Pipeline::start_consumers_on(queues, options);
    let second = run.extra_service("model", &[]);
    for replica in [&run.model, &second] {
        wait_healthy(replica, Duration::from_secs(30));
    }
    // 2,000 samples, drifted after 1,000; the trainer's window is the newest 1,000: the drift.
    let first = run.extra_service(
        "features",
        &[
            ("COUNT", BEFORE.to_string()),
            ("RATE", "250".to_owned()),
            ("DRIFT_AFTER", DRIFT_AFTER.to_string()),
        ],
    );
    run.wait_rows(BEFORE, Duration::from_secs(120));
    drop(first);
    let joined = wait_until(Duration::from_secs(60), || {
        trainer
            .metrics()
            .get("pipeline_trainer_samples_total")
            .is_some_and(|n| *n >= BEFORE as f64)
    });
    assert!(joined, "the trainer did not join every sample");
    let (status, body) = http_post(trainer.http_addr, "/retrain", None).expect("POST /retrain");
    assert_eq!(status, 200, "{body}\n{}", trainer.stderr_tail(20));
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["result"], "promoted", "{body}");
    let version = outcome["candidate_version"].as_str().unwrap().to_owned();
    let (served, _) = ServedModel::load(&model_path).unwrap();
    assert_eq!(
        (served.version.as_str(), served.family()),
        (version.as_str(), "onnx")
    );
    assert!(models.join(format!("{version}.onnx")).exists());
    assert!(
        wait_until(Duration::from_secs(20), || serves(&run.model, &version)
            && serves(&second, &version)),
        "{version} not served by both over {model_url}\n{}",
        run.model.stderr_tail(10)
    );

    // 1,000 more drifted samples: every one predicted by the promoted .onnx.
    let _after = run.extra_service(
        "features",
        &[
            ("COUNT", AFTER.to_string()),
            ("RATE", "250".to_owned()),
            ("DRIFT_AFTER", "0".to_owned()),
        ],
    );
    run.wait_rows(BEFORE + AFTER, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let rows = run.rows();
    assert_exactly_once(&rows, BEFORE + AFTER);
    // Each row is its version's prediction for its row of the data, drifted or not.
    let data = diabetes();
    let baseline = model::regression::LinearModel::fit(&data).unwrap();
    let mut by_version: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        *by_version.entry(row.model_version.clone()).or_default() += 1;
        let onnx = row.model_version == version;
        assert!(onnx || row.model_version == baseline.version, "{row:?}");
        let fits = (0..data.len())
            .filter(|&i| data.target(i) == row.y_true)
            .any(|i| {
                let mut drifted = data.row(i).to_vec();
                drifted[2] += 0.05;
                drifted[8] += 0.04;
                [data.row(i).to_vec(), drifted].iter().any(|features| {
                    let y = if onnx {
                        served.predict(features).unwrap().unwrap()
                    } else {
                        baseline.predict(features).unwrap()
                    };
                    y == row.y_pred
                })
            });
        assert!(fits, "{row:?} is not its version's prediction");
    }
    eprintln!("rows by version: {by_version:?}");
    assert!(by_version.get(&version) >= Some(&AFTER), "{by_version:?}");
    let last = served;

    // A command that hangs: killed at TRAIN_TIMEOUT_SECS, one WARN, /healthz says so, and the
    // replicas keep the served version.
    trainer.restart_with(
        &trainer_dir,
        &[
            (
                "TRAIN_COMMAND",
                format!("TRAIN_SLEEP_SECS=600 python3 {}", script.display()),
            ),
            ("TRAIN_TIMEOUT_SECS", "3".to_owned()),
            ("RETRAIN_EVERY", "0".to_owned()),
        ],
    );
    wait_healthy(&trainer, Duration::from_secs(30));
    let (status, body) = http_post(trainer.http_addr, "/retrain", None).expect("POST /retrain");
    assert_eq!(status, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["result"], "failed", "{body}");
    assert!(
        outcome["detail"]
            .as_str()
            .unwrap()
            .contains("longer than TRAIN_TIMEOUT_SECS (3 s)"),
        "{body}"
    );
    let (_, health) = trainer.get("/healthz").unwrap();
    assert!(
        health.contains("TRAIN_COMMAND ran longer than TRAIN_TIMEOUT_SECS"),
        "{health}"
    );
    assert_eq!(
        trainer
            .stderr()
            .matches("retrain failed, the served model stays")
            .count(),
        1
    );
    assert_eq!(
        ServedModel::load(&model_path).unwrap().0.version,
        last.version
    );
    assert!(serves(&run.model, &last.version) && serves(&second, &last.version));
    trainer.kill();
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
