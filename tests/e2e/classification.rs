//! Classification on a real broker: the producer streams a label column as the data has it
//! (strings as strings, integers as integers), and model replicas serve scikit-learn classifiers
//! exported to ONNX, hot-swapped under traffic, each prediction's label and class probabilities
//! those of the version that served it.

use crate::helpers::*;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use pipeline::classes::ClassLabel;
use pipeline::messages::{LabelKind, Target, parse_features, parse_label};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Takes every message of `queue` until `n` have come or `timeout` passes.
async fn drain(connection: &Connection, queue: &str, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let channel = connection.create_channel().await.unwrap();
    let deadline = Instant::now() + timeout;
    let mut bodies = Vec::new();
    while bodies.len() < n && Instant::now() < deadline {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                message.ack(BasicAckOptions::default()).await.unwrap();
                bodies.push(message.delivery.data.clone());
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = channel.close(200, "bye".into()).await;
    bodies
}

#[tokio::test(flavor = "multi_thread")]
async fn the_producer_sends_class_labels_as_the_data_has_them() {
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let strings = work.path().join("species.csv");
    std::fs::write(
        &strings,
        "sepal,petal,species\n5.1,1.4,setosa\n6.3,4.9,versicolor\n7.7,6.7,virginica\n",
    )
    .unwrap();
    let integers = work.path().join("churn.csv");
    std::fs::write(&integers, "tenure,spend,churned\n3,10.5,1\n40,99.0,0\n").unwrap();
    for (data, rows, expected) in [
        (
            &strings,
            3,
            vec![
                ClassLabel::Text("setosa".into()),
                ClassLabel::Text("versicolor".into()),
                ClassLabel::Text("virginica".into()),
            ],
        ),
        (
            &integers,
            2,
            vec![ClassLabel::Integer(1), ClassLabel::Integer(0)],
        ),
    ] {
        let queues = testkit::Queues::unique("classproducer");
        let connection = connect(&url).await;
        let env = queues
            .env()
            .into_iter()
            .chain([
                ("AMQP_URL".to_owned(), url.clone()),
                ("DATA_PATH".to_owned(), data.display().to_string()),
                ("TASK".to_owned(), "classification".to_owned()),
                ("ORDER".to_owned(), "sequential".to_owned()),
                ("COUNT".to_owned(), (2 * rows).to_string()),
                ("RATE".to_owned(), "0".to_owned()),
            ])
            .collect();
        let mut features = spawn_service("features", env, work.path());
        let status = features.wait_exit(Duration::from_secs(60));
        assert!(status.is_some_and(|s| s.success()), "{}", features.stderr());
        let y_true = drain(
            &connection,
            &queues.y_true,
            2 * rows,
            Duration::from_secs(10),
        )
        .await;
        let sent = drain(
            &connection,
            &queues.features,
            2 * rows,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!((y_true.len(), sent.len()), (2 * rows, 2 * rows));
        let mut labels: HashMap<String, Target> = HashMap::new();
        for body in &y_true {
            let message = parse_label(LabelKind::YTrue, body, None).unwrap();
            // On the wire as in the file: a JSON string for text, a JSON integer for integers.
            let text = std::str::from_utf8(body).unwrap();
            let value = message.value.class(LabelKind::YTrue).unwrap();
            match &value {
                ClassLabel::Text(label) => {
                    assert!(text.contains(&format!("\"y_true\":\"{label}\"")), "{text}")
                }
                ClassLabel::Integer(label) => {
                    assert!(text.contains(&format!("\"y_true\":{label},")), "{text}")
                }
            }
            labels.insert(message.id.unwrap(), Target::Class(value));
        }
        // Sequential order: row k's label goes with row k's features, twice round.
        for body in &sent {
            let message = parse_features(body, None).unwrap();
            let row = std::fs::read_to_string(data)
                .unwrap()
                .lines()
                .skip(1)
                .position(|line| {
                    let cells: Vec<f64> = line
                        .split(',')
                        .take(2)
                        .map(|c| c.parse().unwrap())
                        .collect();
                    cells == message.features
                })
                .unwrap();
            assert_eq!(
                labels[message.id.as_deref().unwrap()],
                Target::Class(expected[row].clone())
            );
        }
        delete_queues(&url, &queues).await;
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/models/fixtures").join(name)
}

/// A classifier's row of metric_log.csv: `id,y_true,y_pred,p_true,correct,model_version,brier`.
#[derive(Debug)]
struct ClassRow {
    id: String,
    y_true: String,
    y_pred: String,
    p_true: f64,
    correct: bool,
    model_version: String,
}

fn class_rows(path: &std::path::Path) -> Vec<ClassRow> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut lines = whole.lines();
    if let Some(header) = lines.next() {
        assert_eq!(
            header,
            "id,y_true,y_pred,p_true,correct,model_version,brier"
        );
    }
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 7, "bad row {line:?}");
            ClassRow {
                id: f[0].to_owned(),
                y_true: f[1].to_owned(),
                y_pred: f[2].to_owned(),
                p_true: f[3].parse().unwrap(),
                correct: f[4] == "1",
                model_version: f[5].to_owned(),
            }
        })
        .collect()
}

/// scikit-learn's accuracy, log loss and ROC AUC of the rows (positive class `1`), computed by
/// `sklearn.metrics` in a Python child: `[accuracy, log_loss, auc]`.
fn sklearn_figures(rows: &[ClassRow]) -> Vec<f64> {
    let y: Vec<String> = rows.iter().map(|r| r.y_true.clone()).collect();
    let pred: Vec<String> = rows.iter().map(|r| r.y_pred.clone()).collect();
    let p_positive: Vec<f64> = rows
        .iter()
        .map(|r| {
            if r.y_true == "1" {
                r.p_true
            } else {
                1.0 - r.p_true
            }
        })
        .collect();
    let script = format!(
        "from sklearn.metrics import accuracy_score, log_loss, roc_auc_score\n\
         y = [{y}]\npred = [{pred}]\np = [{p}]\n\
         print(accuracy_score(y, pred), log_loss(y, [[1 - q, q] for q in p], labels=[0, 1]), \
         roc_auc_score(y, p))",
        y = y.join(","),
        pred = pred.join(","),
        p = p_positive
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// The version a model replica serves now (`pipeline_model_served` at 1), or "".
fn first_version(service: &Service) -> String {
    service
        .metrics()
        .iter()
        .filter(|(_, served)| **served == 1.0)
        .find_map(|(key, _)| {
            key.strip_prefix("pipeline_model_served{version=\"")
                .and_then(|rest| rest.strip_suffix("\"}"))
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn ort() -> String {
    std::env::var("ORT_DYLIB_PATH")
        .expect("these tests need ONNX Runtime: ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_classifier_pipeline_scores_as_scikit_learn_and_swaps_classifiers_under_traffic() {
    const TOTAL: usize = 2000;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("model.onnx");
    std::fs::copy(fixture("breast_cancer_logreg.onnx"), &model_path).unwrap();
    let options = Options::new(url.clone(), TOTAL as u64)
        .rate(300.0)
        .env("TASK", "classification")
        .env(
            "DATA_PATH",
            &fixture("breast_cancer.csv").display().to_string(),
        )
        .env("MODEL_PATH", &model_path.display().to_string())
        .env("MODEL_POLL_MS", "100")
        .env("QUALITY_WINDOW", "100000")
        .env("ORT_DYLIB_PATH", &ort());
    let mut run = Pipeline::start_consumers("classify", options);
    let second = run.extra_service("model", &[]);
    for replica in [&run.model, &second] {
        wait_healthy(replica, Duration::from_secs(30));
    }
    let served_first = first_version(&run.model);
    assert!(!served_first.is_empty(), "{}", run.model.stderr());
    run.start_features();
    let rows_now = || class_rows(&run.log_dir().join("metric_log.csv")).len();
    assert!(
        wait_until(Duration::from_secs(60), || rows_now() >= 600),
        "{}",
        run.logs()
    );
    // The swap: the gradient-boosting classifier replaces the logistic regression.
    let tmp = model_path.with_extension("incoming");
    std::fs::copy(fixture("breast_cancer_gbc.onnx"), &tmp).unwrap();
    std::fs::rename(&tmp, &model_path).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || first_version(&run.model)
            != served_first
            && first_version(&second) != served_first),
        "the new classifier is not served by both\n{}",
        run.logs()
    );
    assert!(
        wait_until(Duration::from_secs(90), || rows_now() >= TOTAL),
        "{} rows\n{}",
        rows_now(),
        run.logs()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let rows = class_rows(&run.log_dir().join("metric_log.csv"));
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!((rows.len(), ids.len()), (TOTAL, TOTAL), "every id once");
    let mut by_version: HashMap<&str, usize> = HashMap::new();
    for row in &rows {
        *by_version.entry(&row.model_version).or_default() += 1;
        assert_eq!(row.correct, row.y_true == row.y_pred, "{row:?}");
        assert!(["0", "1"].contains(&row.y_true.as_str()), "{row:?}");
    }
    eprintln!("rows by version: {by_version:?} (first served {served_first})");
    assert_eq!(by_version.len(), 2, "{by_version:?}");
    assert!(by_version.values().all(|n| *n >= 100), "{by_version:?}");

    // /api/quality's figures over the window (all rows) are scikit-learn's on the same rows.
    let expected = sklearn_figures(&rows);
    let quality = wait_until(Duration::from_secs(10), || {
        run.metric
            .get("/api/quality")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|q| q["classification"]["window"]["n"] == TOTAL as u64)
    });
    assert!(quality, "{:?}", run.metric.get("/api/quality"));
    let (_, body) = run.metric.get("/api/quality").unwrap();
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let window = &report["classification"]["window"];
    for (name, ours, theirs) in [
        ("accuracy", &window["accuracy"], expected[0]),
        ("log loss", &window["log_loss"], expected[1]),
        ("ROC AUC", &window["roc_auc"], expected[2]),
    ] {
        let ours = ours.as_f64().unwrap_or(f64::NAN);
        assert!(
            (ours - theirs).abs() < 1e-9,
            "{name}: ours {ours}, sklearn {theirs}"
        );
    }
    assert_eq!(
        report["classification"]["versions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let metrics = run.metric.metrics();
    assert_eq!(
        metrics.get("pipeline_pairs_total").copied(),
        Some(TOTAL as f64)
    );
    assert!(metrics.contains_key("pipeline_model_log_loss{span=\"window\"}"));
    // The dashboard's snapshot: the window's confusion matrix holds every row, and the
    // calibration bins every prediction by its confidence.
    let (status, dashboard) = run.metric.get("/api/dashboard").unwrap();
    assert_eq!(status, 200);
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let window = &dashboard["state"]["classification"]["window"];
    let total = |key: &str| -> u64 {
        window[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["n"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (total("confusion"), total("calibration")),
        (TOTAL as u64, TOTAL as u64)
    );
    let right: u64 = window["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["y_true"] == c["y_pred"])
        .map(|c| c["n"].as_u64().unwrap())
        .sum();
    assert_eq!(right, rows.iter().filter(|r| r.correct).count() as u64);
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// Mean `-ln p_true` of rows (clipped as the metric service does).
fn log_loss_of(rows: &[&ClassRow]) -> f64 {
    rows.iter()
        .map(|r| pipeline::classes::log_loss_of(r.p_true))
        .sum::<f64>()
        / rows.len() as f64
}

/// `pipeline_trainer_retrains_total` by result.
fn promotions(trainer: &Service) -> f64 {
    trainer
        .metrics()
        .iter()
        .filter(|(name, _)| {
            name.starts_with("pipeline_trainer_retrains_total") && name.contains("promoted")
        })
        .map(|(_, value)| *value)
        .sum()
}

/// A drift shift that doubles the logistic regression's log loss on breast_cancer (0.049 to 0.11
/// in scikit-learn, whose refit is back at 0.049).
const TEXTURE_SHIFT: &str = "mean_texture=8,worst_texture=11";

#[tokio::test(flavor = "multi_thread")]
async fn a_drift_raises_the_classifier_alarm_and_the_trainers_logistic_regression_ends_it() {
    const N: usize = 3600;
    const FIRST: usize = 2400;
    const DRIFT_AFTER: usize = 1200;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("models/model.json");
    std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
    let options = Options::new(url.clone(), N as u64)
        .env("TASK", "classification")
        .env(
            "DATA_PATH",
            &fixture("breast_cancer.csv").display().to_string(),
        )
        .env("MODEL_PATH", &model_path.display().to_string())
        .env("MODEL_POLL_MS", "200")
        .env("QUALITY_WINDOW", "400")
        // Log loss is heavy-tailed (a few confident mistakes move a window's mean): twice the
        // baseline, where the drift makes it three to four times.
        .env("QUALITY_ALERT_RATIO", "2")
        .env("QUALITY_RETIRE_SECS", "3");
    let run = Pipeline::start_consumers("classloop", options);
    let trainer = run.extra_service(
        "trainer",
        &[
            ("TRAIN_DIR", work.path().join("train").display().to_string()),
            // The newest 400: when the alarm rises, the older 320 the candidate is fitted on hold
            // enough drifted rows for it to learn the shift.
            ("TRAIN_WINDOW", "400".to_owned()),
            ("TRAIN_HOLDOUT", "0.2".to_owned()),
            // Retrains on the alarm only: before the drift two fits of the same rows differ by
            // chance (log loss is heavy-tailed); after it the baseline is three to four times
            // worse than a fit that saw drifted rows.
            ("RETRAIN_EVERY", "0".to_owned()),
            ("PROMOTE_MIN_GAIN", "0.2".to_owned()),
            ("METRIC_URL", format!("http://{}", run.metric.http_addr)),
            ("METRIC_POLL_MS", "500".to_owned()),
        ],
    );
    for service in [&run.metric, &run.model, &trainer] {
        wait_healthy(service, Duration::from_secs(60));
    }
    // Without MODEL_PATH the replica fits the logistic regression on DATA_PATH.
    let baseline = first_version(&run.model);
    assert!(baseline.starts_with("logreg-"), "{baseline}");
    // The drift, then traffic until a promotion (a retrain of the trainer's debug build takes
    // seconds), then more drifted traffic for the promoted version to serve.
    let producer = run.extra_service(
        "features",
        &[
            ("COUNT", FIRST.to_string()),
            ("RATE", "250".to_owned()),
            ("ORDER", "random".to_owned()),
            ("DRIFT_AFTER", DRIFT_AFTER.to_string()),
            ("DRIFT_SHIFT", TEXTURE_SHIFT.to_owned()),
        ],
    );
    let csv = run.log_dir().join("metric_log.csv");
    let rows_at_least = |n: usize| {
        assert!(
            wait_until(Duration::from_secs(120), || class_rows(&csv).len() >= n),
            "{} rows\n{}\n--- trainer\n{}",
            class_rows(&csv).len(),
            run.logs(),
            trainer.stderr_tail(20)
        );
    };
    rows_at_least(FIRST);
    drop(producer);
    assert!(
        wait_until(Duration::from_secs(120), || promotions(&trainer) >= 1.0),
        "no promotion\n{}",
        trainer.stderr_tail(30)
    );
    let _more = run.extra_service(
        "features",
        &[
            ("COUNT", (N - FIRST).to_string()),
            ("RATE", "250".to_owned()),
            ("ORDER", "random".to_owned()),
            ("DRIFT_AFTER", "0".to_owned()),
            ("DRIFT_SHIFT", TEXTURE_SHIFT.to_owned()),
        ],
    );
    rows_at_least(N);
    // The served version's alarm rose after the drift.
    let metric_log = run.metric.stderr();
    let raised: Vec<&str> = metric_log
        .lines()
        .filter(|l| l.contains("model quality alarm:") && l.contains(&baseline))
        .collect();
    assert!(!raised.is_empty(), "no alarm for {baseline}\n{metric_log}");
    let (served, _) = model::served::ServedModel::load(&model_path).unwrap();
    assert_eq!(served.family(), "logistic");
    assert_ne!(served.version, baseline);
    // Every id once; after the drift the promoted versions do better than the baseline did.
    let rows = class_rows(&csv);
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!((rows.len(), ids.len()), (N, N));
    let after = &rows[DRIFT_AFTER + 100..];
    let old: Vec<&ClassRow> = after
        .iter()
        .filter(|r| r.model_version == baseline)
        .collect();
    let new: Vec<&ClassRow> = after
        .iter()
        .filter(|r| r.model_version != baseline)
        .collect();
    let before: Vec<&ClassRow> = rows[..DRIFT_AFTER - 100].iter().collect();
    for line in trainer.stderr().lines().filter(|l| l.contains("candidate")) {
        eprintln!("trainer: {line}");
    }
    eprintln!(
        "classifier loop: log loss before the drift {:.3} ({} rows), after it with {baseline} {:.3} \
         ({} rows), with the promoted versions {:.3} ({} rows, last {})",
        log_loss_of(&before),
        before.len(),
        log_loss_of(&old),
        old.len(),
        log_loss_of(&new),
        new.len(),
        served.version
    );
    assert!(
        old.len() >= 50 && new.len() >= N - FIRST,
        "{} / {}",
        old.len(),
        new.len()
    );
    assert!(log_loss_of(&new) < log_loss_of(&old));
    // The alarm ended: the baseline retires (replaced for QUALITY_RETIRE_SECS), its alarm off,
    // and no version that serves has its alarm on.
    let ended = wait_until(Duration::from_secs(20), || {
        let Some((200, body)) = run.metric.get("/api/quality") else {
            return false;
        };
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        let versions = report["versions"].as_array().cloned().unwrap_or_default();
        let old_done = versions.iter().any(|v| {
            v["model_version"] == baseline.as_str() && v["retired"] == true && v["alarm"] == false
        });
        old_done && versions.iter().all(|v| v["alarm"] == false)
    });
    assert!(ended, "{:?}", run.metric.get("/api/quality"));
    assert_eq!(
        run.metric
            .metrics()
            .get(&format!(
                "pipeline_model_quality_alert{{model_version=\"{}\"}}",
                served.version
            ))
            .copied(),
        Some(0.0)
    );
    let mut run = run;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_train_command_classifier_is_promoted_after_a_drift_and_a_worse_one_refused() {
    const SAMPLES: usize = 800;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let model_path = models.join("model.onnx");
    let script = repo_root().join("examples/train_sklearn.py");
    let queues = testkit::Queues::unique("classcommand");
    let trainer = |command: String| {
        let mut env = testkit::Env::new(&url, &queues)
            .set("TASK", "classification")
            .set("DATA_PATH", fixture("breast_cancer.csv").display())
            .set("MODEL_PATH", model_path.display())
            .set("TRAIN_DIR", work.path().join("train").display())
            .set("TRAIN_WINDOW", 600)
            .set("RETRAIN_EVERY", 0)
            .set("TRAIN_COMMAND", command)
            .set("TRAIN_TIMEOUT_SECS", 120)
            .set("ORT_DYLIB_PATH", ort())
            .pairs()
            .to_vec();
        // python3 finds its packages through the usual environment (the test kit clears it).
        for key in ["PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV"] {
            if let Ok(value) = std::env::var(key) {
                env.push((key.into(), value));
            }
        }
        let dir = work
            .path()
            .join(format!("trainer.{}", testkit::free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let service = spawn_service("trainer", env, &dir);
        wait_healthy(&service, Duration::from_secs(60));
        service
    };
    let retrain = |service: &Service| -> serde_json::Value {
        let (status, body) = http_post(service.http_addr, "/retrain", None).expect("POST /retrain");
        assert_eq!(status, 200, "{body}\n{}", service.stderr_tail(20));
        serde_json::from_str(&body).unwrap()
    };
    // A command that fits shuffled labels: its classifier is worse than the served baseline.
    let mut worse = trainer(format!("TRAIN_WORSE=1 python3 {}", script.display()));
    let mut producer = spawn_service(
        "features",
        queues
            .env()
            .into_iter()
            .chain(
                [
                    ("AMQP_URL", url.as_str()),
                    ("TASK", "classification"),
                    (
                        "DATA_PATH",
                        &fixture("breast_cancer.csv").display().to_string(),
                    ),
                    ("COUNT", &SAMPLES.to_string()),
                    ("RATE", "0"),
                    ("DRIFT_AFTER", "0"),
                    ("DRIFT_SHIFT", TEXTURE_SHIFT),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
            )
            .collect(),
        work.path(),
    );
    assert!(
        producer
            .wait_exit(Duration::from_secs(60))
            .is_some_and(|s| s.success())
    );
    let joined = wait_until(Duration::from_secs(60), || {
        worse
            .metrics()
            .get("pipeline_trainer_samples_total")
            .is_some_and(|n| *n >= SAMPLES as f64)
    });
    assert!(joined, "{}", worse.stderr_tail(20));
    let outcome = retrain(&worse);
    assert_eq!(outcome["result"], "refused", "{outcome}");
    assert!(
        outcome["candidate_log_loss"].as_f64() > outcome["serving_log_loss"].as_f64(),
        "{outcome}"
    );
    assert!(!model_path.exists(), "nothing promoted");
    worse.kill();

    // The same window (TRAIN_DIR) with the real command: the drift is learnt, the .onnx promoted.
    let good = trainer(format!("python3 {}", script.display()));
    let outcome = retrain(&good);
    assert_eq!(outcome["result"], "promoted", "{outcome}");
    let version = outcome["candidate_version"].as_str().unwrap().to_owned();
    assert!(outcome["candidate_log_loss"].as_f64() < outcome["serving_log_loss"].as_f64());
    assert!(outcome["candidate_accuracy"].as_f64() >= outcome["serving_accuracy"].as_f64());
    let (served, _) = model::served::ServedModel::load(&model_path).unwrap();
    assert_eq!(
        (served.version.as_str(), served.family(), served.task()),
        (
            version.as_str(),
            "onnx",
            pipeline::classes::Task::Classification
        )
    );
    assert!(models.join(format!("{version}.onnx")).exists());
    eprintln!("TRAIN_COMMAND classifier: {outcome}");
    drop(good);
    delete_queues(&url, &queues).await;
}

/// Takes the dead letters of `queue` until `n` have come: message id or body id -> reason.
async fn dead_letters(connection: &Connection, queue: &str, n: usize) -> HashMap<String, String> {
    use pipeline::broker::publisher::header_str;
    use pipeline::broker::topology::{REASON_HEADER, dead_letter_queue};
    let channel = connection.create_channel().await.unwrap();
    let mut found = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while found.len() < n && Instant::now() < deadline {
        match channel
            .basic_get(
                dead_letter_queue(queue).as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            Some(message) => {
                let headers = message
                    .delivery
                    .properties
                    .headers()
                    .clone()
                    .unwrap_or_default();
                let id = pipeline::messages::body_id(&message.delivery.data).unwrap_or_default();
                found.insert(
                    id,
                    header_str(&headers, REASON_HEADER).unwrap_or("").to_owned(),
                );
                message.ack(BasicAckOptions::default()).await.unwrap();
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_class_messages_are_dead_lettered_with_a_reason_and_an_unknown_class_is_counted() {
    let url = shared_amqp_url();
    let options = Options::new(url.clone(), 0)
        .env("TASK", "classification")
        .env(
            "DATA_PATH",
            &fixture("breast_cancer.csv").display().to_string(),
        )
        .env(
            "MODEL_PATH",
            &fixture("breast_cancer_logreg.onnx").display().to_string(),
        )
        .env("ORT_DYLIB_PATH", &ort());
    let mut run = Pipeline::start_consumers("classbad", options);
    wait_healthy(&run.metric, Duration::from_secs(30));
    let q = run.queues.clone();
    let connection = connect(&url).await;
    let send = |queue: &str, body: &str| {
        let (connection, queue, body) = (&connection, queue.to_owned(), body.to_owned());
        async move { publish_raw(connection, &queue, body.as_bytes(), None).await }
    };
    // A good pair whose true class the model does not know ("maybe" among 0 and 1).
    send(&q.y_true, r#"{"id":"unknown","y_true":"maybe"}"#).await;
    send(
        &q.y_pred,
        r#"{"id":"unknown","y_pred":1,"probabilities":{"0":0.2,"1":0.8},"model_version":"v1"}"#,
    )
    .await;
    // Probabilities that are no distribution, a prediction outside them, a fraction for a label.
    send(
        &q.y_pred,
        r#"{"id":"sum","y_pred":1,"probabilities":{"0":0.5,"1":0.8},"model_version":"v1"}"#,
    )
    .await;
    send(
        &q.y_pred,
        r#"{"id":"outside","y_pred":2,"probabilities":{"0":0.5,"1":0.5},"model_version":"v1"}"#,
    )
    .await;
    send(&q.y_true, r#"{"id":"fraction","y_true":0.5}"#).await;
    // And a good pair after them: the service goes on.
    send(&q.y_true, r#"{"id":"good","y_true":0}"#).await;
    send(
        &q.y_pred,
        r#"{"id":"good","y_pred":0,"probabilities":{"0":0.9,"1":0.1},"model_version":"v1"}"#,
    )
    .await;
    let csv = run.log_dir().join("metric_log.csv");
    assert!(
        wait_until(Duration::from_secs(20), || class_rows(&csv).len() >= 2),
        "{}",
        run.logs()
    );
    let rows = class_rows(&csv);
    let unknown = rows.iter().find(|r| r.id == "unknown").unwrap();
    assert_eq!(
        (unknown.correct, unknown.p_true),
        (false, 0.0),
        "{unknown:?}"
    );
    assert!(rows.iter().any(|r| r.id == "good" && r.correct));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.contains("unknown,maybe,1,0,0,v1,\n"), "{text}");
    let predictions = dead_letters(&connection, &q.y_pred, 2).await;
    assert_eq!(predictions["sum"], "bad_probabilities", "{predictions:?}");
    assert_eq!(
        predictions["outside"], "bad_probabilities",
        "{predictions:?}"
    );
    let labels = dead_letters(&connection, &q.y_true, 1).await;
    assert_eq!(labels["fraction"], "wrong_shape", "{labels:?}");
    let metrics = run.metric.metrics();
    assert_eq!(
        metrics.get("pipeline_unknown_class_total").copied(),
        Some(1.0)
    );
    assert_eq!(rows.len(), 2, "nothing else joined");
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}
