//! The pipeline end to end: every sample joined exactly once, with the model's prediction.

use crate::helpers::*;
use model::regression::LinearModel;
use pipeline::dataset::Dataset;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn thousand_samples_flow_through_all_three_services() {
    let url = shared_amqp_url();
    let mut run = Pipeline::start("flow", Options::new(url.clone(), 1000));
    run.wait_rows(1000, Duration::from_secs(90));

    let rows = run.rows();
    assert_exactly_once(&rows, 1000);

    // Every y_pred is the model's prediction for a row of the data set with that y_true.
    let data = Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).unwrap();
    let model = LinearModel::fit(&data).unwrap();
    let mut predictions: HashMap<u64, Vec<f64>> = HashMap::new();
    for row in 0..data.len() {
        predictions
            .entry(data.target(row).to_bits())
            .or_default()
            .push(model.predict(data.row(row)).unwrap());
    }
    for row in &rows {
        let candidates = &predictions[&row.y_true.to_bits()];
        assert!(
            candidates.contains(&row.y_pred),
            "{row:?} is not a prediction of the model"
        );
        assert_eq!(row.model_version, model.version);
    }

    assert!(
        wait_until(Duration::from_secs(10), || run.label_lines().len() == 2000),
        "labels_log.txt has {} lines",
        run.label_lines().len()
    );
    for line in run.label_lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // time queue id value [model_version] audit=<producer>:<window> (the audit is on).
        assert!(fields.len() == 5 || fields.len() == 6, "{line}");
        assert!(fields[1] == "y_true" || fields[1] == "y_pred", "{line}");
        fields[3].parse::<f64>().unwrap();
        let tag = fields.last().and_then(|f| f.strip_prefix("audit="));
        assert!(tag.and_then(pipeline::audit::parse_tag).is_some(), "{line}");
    }

    let features = run.features.as_mut().unwrap();
    let status = features
        .wait_exit(Duration::from_secs(10))
        .expect("features exits after COUNT samples");
    assert!(status.success(), "features exit status {status}");
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// `TARGET_COLUMN` set but empty, as compose passes it when it is not set, means the last column:
/// for the producer, the model and the trainer, and for `model train`, whose `--target` reads it.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_target_column_means_the_last_column() {
    const SAMPLES: usize = 50;
    let url = shared_amqp_url();
    let work = tempfile::tempdir().unwrap();
    let options = Options::new(url.clone(), SAMPLES as u64).env("TARGET_COLUMN", "");
    let mut run = Pipeline::start("emptytarget", options);
    let trainer = run.extra_service(
        "trainer",
        &[
            (
                "MODEL_PATH",
                work.path().join("model.json").display().to_string(),
            ),
            ("TRAIN_DIR", work.path().join("train").display().to_string()),
        ],
    );
    run.wait_rows(SAMPLES, Duration::from_secs(90));
    let rows = run.rows();
    assert_exactly_once(&rows, SAMPLES);
    let data = Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).unwrap();
    let model = LinearModel::fit(&data).unwrap();
    let targets: Vec<f64> = (0..data.len()).map(|row| data.target(row)).collect();
    for row in &rows {
        assert!(
            targets.contains(&row.y_true),
            "{row:?}: y_true not a target"
        );
        assert_eq!(row.model_version, model.version, "{row:?}");
    }
    wait_healthy(&trainer, Duration::from_secs(30));

    let train = |target_column: &str| {
        let out = work.path().join(format!("train-{target_column}.json"));
        let output = std::process::Command::new(bin_path("model"))
            .args(["train", "--data"])
            .arg(repo_root().join("data/diabetes.csv"))
            .arg("--out")
            .arg(&out)
            .env("TARGET_COLUMN", target_column)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "TARGET_COLUMN={target_column:?}: {stderr}"
        );
        model::artifact::Artifact::load(&out).unwrap().target_name
    };
    assert_eq!(train(""), "target");
    assert_eq!(train("bmi"), "bmi");

    drop(trainer);
    let features = run.features.as_mut().unwrap();
    let status = features.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "features: {status:?}");
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

#[test]
fn every_setting_is_listed_by_help() {
    let expected: &[(&str, &[&str])] = &[
        (
            "features",
            &[
                "AMQP_URL",
                "FEATURES_QUEUE",
                "Y_TRUE_QUEUE",
                "DATA_PATH",
                "TARGET_COLUMN",
                "RATE",
                "COUNT",
                "ORDER",
                "SEED",
                "CONFIRM_WINDOW",
                "HTTP_ADDR",
                "LOG_FORMAT",
                "QUEUE_TYPE",
            ],
        ),
        (
            "model",
            &[
                "AMQP_URL",
                "FEATURES_QUEUE",
                "Y_PRED_QUEUE",
                "DATA_PATH",
                "PREFETCH",
                "MAX_MESSAGE_BYTES",
                "HTTP_ADDR",
                "LOG_FORMAT",
                "QUEUE_TYPE",
            ],
        ),
        (
            "metric",
            &[
                "AMQP_URL",
                "Y_TRUE_QUEUE",
                "Y_PRED_QUEUE",
                "LOG_DIR",
                "JOIN_CAPACITY",
                "JOIN_MAX_AGE_SECS",
                "DEDUP_CAPACITY",
                "QUALITY_WINDOW",
                "PREFETCH",
                "HTTP_ADDR",
                "LOG_FORMAT",
            ],
        ),
    ];
    for (binary, names) in expected {
        let output = std::process::Command::new(bin_path(binary))
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        for name in *names {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{binary} --help does not list {name}:\n{help}"
            );
        }
    }
}
