//! Alarms that end (issue 18, part 3), end to end: a drift raises the served version's quality
//! alarm and the replica's drift alarm; then promotions and a rollback, written to MODEL_PATH as
//! the trainer and `model rollback` do, with `QUALITY_RETIRE_SECS=3`. Each replaced version retires
//! (an INFO line, its alarm cleared, its series gone, shown retired by `/api/quality` and the
//! dashboard), the rolled-back one is current again, and the run ends with no alarm raised for any
//! retired version and no drift alarm of a reference the replica no longer serves.
//!
//! The promoted version is trained on the shifted data (bmi + 0.05, s5 + 0.04, the producer's
//! `DRIFT_SHIFT`): against it the traffic does not drift and its quality holds.

use crate::helpers::*;
use model::artifact::Artifact;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const OLD: &str = "alarms-v0";
const NEW: &str = "alarms-v1";

/// `diabetes.csv` with bmi + 0.05 and s5 + 0.04, written to `path`.
fn write_shifted(path: &Path) {
    let text = std::fs::read_to_string(repo_root().join("data/diabetes.csv")).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for line in lines {
        let mut cells: Vec<f64> = line.split(',').map(|c| c.parse().unwrap()).collect();
        cells[2] += 0.05;
        cells[8] += 0.04;
        let cells: Vec<String> = cells.iter().map(f64::to_string).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// `GET /api/quality`: version -> (alarm, retired).
fn quality(metric: &Service) -> HashMap<String, (bool, bool)> {
    let Some((200, body)) = metric.get("/api/quality") else {
        return HashMap::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    json["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["model_version"].as_str().unwrap_or_default().to_owned(),
                (v["alarm"] == true, v["retired"] == true),
            )
        })
        .collect()
}

fn alert(metrics: &Metrics, version: &str) -> Option<f64> {
    metrics.value(
        "pipeline_model_quality_alert",
        &[("model_version", version)],
    )
}

/// Whether the metric's `/metrics` has any series of `version`.
fn has_series(metric: &Service, version: &str) -> bool {
    metric
        .metrics()
        .iter()
        .map(|(name, _)| name)
        .any(|name| name.contains(&format!("model_version=\"{version}\"")))
}

fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

/// Waits until `version` is retired with no alarm and no series, and `current` is not retired.
fn wait_retired(run: &Pipeline, version: &str, current: &str, what: &str) {
    let ok = wait_until(Duration::from_secs(40), || {
        let report = quality(&run.metric);
        report.get(version) == Some(&(false, true))
            && report.get(current).is_some_and(|(_, retired)| !retired)
            && !has_series(&run.metric, version)
    });
    assert!(
        ok,
        "{what}: {version} not retired (or {current} not current): {:?}\n{}",
        quality(&run.metric),
        run.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replaced_versions_retire_their_alarms_and_a_rollback_revives_one() {
    let work = tempfile::tempdir().unwrap();
    let model_path = work.path().join("models/model.json");
    std::fs::create_dir_all(model_path.parent().unwrap()).unwrap();
    let old = Artifact::train(
        &repo_root().join("data/diabetes.csv"),
        None,
        Some(OLD.into()),
    )
    .unwrap();
    let shifted = work.path().join("shifted.csv");
    write_shifted(&shifted);
    let new = Artifact::train(&shifted, None, Some(NEW.into())).unwrap();
    old.write(&model_path).unwrap();

    let options = Options::new(shared_amqp_url(), 30_000)
        .rate(200.0)
        .env("MODEL_PATH", &model_path.display().to_string())
        .env("MODEL_POLL_MS", "200")
        .env("DRIFT_WINDOW", "500")
        .env("QUALITY_WINDOW", "300")
        .env("QUALITY_RETIRE_SECS", "3")
        .env("DRIFT_AFTER", "400")
        .env("DRIFT_SHIFT", "bmi=0.05,s5=0.04")
        .env("ORDER", "random");
    let run = Pipeline::start("alarms", options);

    // The drift raises the old version's quality alarm and the replica's drift alarm.
    let raised = wait_until(Duration::from_secs(60), || {
        alert(&run.metric.metrics(), OLD) == Some(1.0)
            && run
                .model
                .stderr()
                .contains("the PSI of bmi is above DRIFT_PSI_ALERT")
    });
    assert!(
        raised,
        "no quality and drift alarm for {OLD}: {:?}\n{}",
        quality(&run.metric),
        run.logs()
    );
    assert_eq!(quality(&run.metric).get(OLD), Some(&(true, false)));

    // Promotion: the old version retires, its alarm with it; the replica's drift figures of the
    // old reference go.
    new.write(&model_path).unwrap();
    wait_retired(&run, OLD, NEW, "after the promotion");
    let model_log = run.model.stderr();
    let drift_retired = lines_with(
        &model_log,
        &format!("drift figures of model version {OLD} retired"),
    );
    assert_eq!(drift_retired.len(), 1, "{model_log}");
    assert!(drift_retired[0].contains("bmi"), "{}", drift_retired[0]);
    eprintln!("alarms: {}", drift_retired[0]);

    // Rollback: the old version receives pairs again and is current again; the new one retires.
    old.write(&model_path).unwrap();
    wait_retired(&run, NEW, OLD, "after the rollback");
    assert!(
        run.metric
            .stderr()
            .contains("retired model version receives pairs again"),
        "{}",
        run.metric.stderr()
    );

    // Promoted again: the old version retires a second time.
    new.write(&model_path).unwrap();
    wait_retired(&run, OLD, NEW, "after the second promotion");
    // The new version's drift window fills against its own (shifted) reference: no drift.
    let calm = wait_until(Duration::from_secs(20), || {
        let metrics = run.model.metrics();
        metrics
            .get("pipeline_feature_drift_psi{feature=\"bmi\"}")
            .is_some_and(|psi| *psi < 0.25)
    });
    assert!(calm, "{:?}\n{}", run.model.metrics(), run.logs());
    // Two ticks of the metric service, then the end state.
    std::thread::sleep(Duration::from_millis(1500));

    let report = quality(&run.metric);
    let metrics = run.metric.metrics();
    let dashboard: serde_json::Value = run
        .metric
        .get("/api/dashboard")
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    let health = run.model.get("/healthz").unwrap_or_default().1;
    let metric_log = run.metric.stderr();
    let model_log = run.model.stderr();
    let queues = run.queues.clone();
    drop(run);
    delete_queues(&shared_amqp_url(), &queues).await;

    eprintln!("alarms: /api/quality at the end: {report:?}");
    assert_eq!(report.get(OLD), Some(&(false, true)), "{report:?}");
    assert_eq!(report.get(NEW), Some(&(false, false)), "{report:?}");
    // Alarm gauges only for versions not retired, and none raised.
    let gauges: Vec<(&String, &f64)> = metrics
        .iter()
        .filter(|(name, _)| name.starts_with("pipeline_model_quality_alert{"))
        .collect();
    assert_eq!(gauges.len(), 1, "{gauges:?}");
    assert_eq!(alert(&metrics, NEW), Some(0.0), "{gauges:?}");
    // The dashboard: the old version retired, no row both retired and in alarm, no alarm at all.
    let versions = dashboard["state"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(versions.len(), 2, "{dashboard}");
    for version in &versions {
        assert_eq!(version["alarm"], false, "{version}");
        assert_eq!(version["retired"], version["version"] == OLD, "{version}");
    }
    assert!(!health.contains("feature drift"), "/healthz: {health}");

    let retired = lines_with(&metric_log, " retired: no pair for QUALITY_RETIRE_SECS");
    for line in &retired {
        eprintln!("alarms: {line}");
    }
    assert_eq!(
        retired.len(),
        3,
        "{OLD}, {NEW}, then {OLD} again:\n{metric_log}"
    );
    assert!(retired[0].contains(&format!("model version {OLD} retired")));
    assert!(retired[0].contains("alarm_was_on=true"), "{}", retired[0]);
    assert!(retired[1].contains(&format!("model version {NEW} retired")));
    assert!(retired[2].contains(&format!("model version {OLD} retired")));
    assert!(
        lines_with(&model_log, "drift figures of model version").len() >= 3,
        "{model_log}"
    );
}
