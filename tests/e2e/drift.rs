//! Feature drift end to end: the producer shifts two features after 1,000 of 3,000 samples and the
//! model's `pipeline_feature_drift_psi` shows those two drifting and no other, with WARN lines and
//! a `/healthz` note; without the shift no PSI comes near the alarm. Also: `DRIFT_SHIFT` naming an
//! unknown feature is a usage error. The metric service's quality alarm goes 0 → 1 in the drift
//! run and stays 0 without it.
//!
//! Window: 1,000 vectors with 10 bins. Rows are drawn with replacement from the 442 the reference
//! was computed on, so an undrifted feature's PSI is about chi²(9) / 1000: 0.009 on average, 0.1 is
//! far in the tail. bmi + 0.05 and s5 + 0.04 are about one standard deviation (0.048): PSI > 1.
//!
//! Quality: the OLS coefficients of bmi (about 520) and s5 (about 740) move each prediction by
//! about +56 after the shift, against residuals of standard deviation about 54 (MAE about 43): the
//! windowed MAE becomes about E|N(56, 54)| ≈ 64, 1.5 times the baseline, above QUALITY_ALERT_RATIO
//! 1.25. Without the shift the windows of 1,000 random rows stay within a few percent of it.

use crate::helpers::*;
use std::collections::HashMap;
use std::time::Duration;

const N: u64 = 3000;
const FEATURES: [&str; 10] = [
    "age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6",
];

fn psi(metrics: &Metrics, feature: &str) -> Option<f64> {
    metrics
        .get(&format!(
            "pipeline_feature_drift_psi{{feature=\"{feature}\"}}"
        ))
        .copied()
}

/// Runs N samples with `extra` settings and waits until the model has predicted them all, shows a
/// PSI for every feature, above 0.25 with a WARN line for each of `drifting`; then lets the
/// reporter see the final window. Returns the PSI per feature, the model's stderr and /healthz,
/// and the metric service's metrics and stderr once it joined all N pairs.
struct Outcome {
    /// The metric service's dashboard data (`/api/dashboard`).
    dashboard: serde_json::Value,
    psi: HashMap<String, f64>,
    stderr: String,
    health: String,
    metric: Metrics,
    metric_stderr: String,
}

/// The values of `pipeline_model_quality_alert`, one per model version.
fn quality_alerts(metrics: &Metrics) -> Vec<f64> {
    metrics
        .iter()
        .filter(|(name, _)| name.starts_with("pipeline_model_quality_alert{"))
        .map(|(_, value)| *value)
        .collect()
}

async fn run(test: &str, extra: &[(&str, &str)], drifting: &[&str]) -> Outcome {
    let mut options = Options::new(shared_amqp_url(), N)
        .env("DRIFT_WINDOW", "1000")
        .env("ORDER", "random");
    for (key, value) in extra {
        options = options.env(key, value);
    }
    let run = Pipeline::start(test, options);
    let features_queue = run.queues.features.clone();
    let done = wait_until(Duration::from_secs(120), || {
        run.model.metrics().get(&format!(
            "pipeline_messages_acked_total{{queue=\"{features_queue}\"}}"
        )) == Some(&(N as f64))
    });
    assert!(
        done,
        "the model did not predict {N} samples\n{}",
        run.logs()
    );
    let seen = wait_until(Duration::from_secs(30), || {
        let metrics = run.model.metrics();
        let stderr = run.model.stderr();
        FEATURES.iter().all(|f| psi(&metrics, f).is_some())
            && drifting.iter().all(|f| {
                psi(&metrics, f).is_some_and(|v| v > 0.25)
                    && stderr.contains(&format!("the PSI of {f} is above DRIFT_PSI_ALERT"))
            })
    });
    assert!(
        seen,
        "no PSI for every feature, or {drifting:?} not drifting with a WARN line: {:?}\n{}",
        run.model.metrics(),
        run.logs()
    );
    // The reporter recomputes every second: two more ticks see the final window.
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = run.model.metrics();
    let psi: HashMap<String, f64> = FEATURES
        .iter()
        .map(|f| (f.to_string(), psi(&metrics, f).unwrap_or(f64::NAN)))
        .collect();
    let mut figures: Vec<_> = psi.iter().collect();
    figures.sort_by(|a, b| a.0.cmp(b.0));
    eprintln!("{test}: PSI per feature after {N} samples: {figures:?}");
    let health = run.model.get("/healthz").unwrap_or_default().1;
    let stderr = run.model.stderr();
    let joined = wait_until(Duration::from_secs(60), || {
        run.metric.metrics().get("pipeline_pairs_total") == Some(&(N as f64))
    });
    assert!(
        joined,
        "the metric service did not join {N} pairs\n{}",
        run.logs()
    );
    // The alarm is decided on the consume loop's tick (twice a second): let two pass.
    std::thread::sleep(Duration::from_millis(1500));
    let metric = run.metric.metrics();
    let metric_stderr = run.metric.stderr();
    let dashboard = run
        .metric
        .get("/api/dashboard")
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    let queues = run.queues.clone();
    drop(run);
    delete_queues(&shared_amqp_url(), &queues).await;
    Outcome {
        dashboard,
        psi,
        stderr,
        health,
        metric,
        metric_stderr,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shifted_features_drift_and_the_others_do_not() {
    let Outcome {
        dashboard,
        psi,
        stderr,
        health,
        metric,
        metric_stderr,
    } = run(
        "drift",
        &[("DRIFT_AFTER", "1000"), ("DRIFT_SHIFT", "bmi=0.05,s5=0.04")],
        &["bmi", "s5"],
    )
    .await;
    for feature in FEATURES {
        let value = psi[feature];
        if feature == "bmi" || feature == "s5" {
            assert!(
                value > 0.25,
                "{feature}: PSI {value} not above 0.25: {psi:?}"
            );
        } else {
            assert!(value < 0.1, "{feature}: PSI {value} not below 0.1: {psi:?}");
        }
    }
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("feature drift"))
        .collect();
    for feature in ["bmi", "s5"] {
        assert!(
            warnings
                .iter()
                .any(|l| l.contains(&format!("the PSI of {feature} is above DRIFT_PSI_ALERT"))),
            "no drift WARN line for {feature}:\n{stderr}"
        );
    }
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        health.contains("feature drift (PSI > 0.25): bmi, s5"),
        "/healthz: {health}"
    );
    // The quality alarm: one version, raised once (from 0, with a WARN line), still up.
    assert_eq!(quality_alerts(&metric), [1.0], "{metric:?}");
    let raised: Vec<&str> = metric_stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("model quality alarm"))
        .collect();
    assert_eq!(raised.len(), 1, "{metric_stderr}");
    eprintln!(
        "drift: at the end, windowed MAE {} against a baseline of {}",
        dashboard["state"]["versions"][0]["window"]["mae"],
        dashboard["state"]["versions"][0]["baseline_mae"]
    );
    // The dashboard shows it too.
    assert_eq!(
        dashboard["state"]["versions"][0]["alarm"], true,
        "{dashboard}"
    );
    eprintln!("drift: {}", raised[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_shift_no_feature_drifts() {
    let Outcome {
        dashboard,
        psi,
        stderr,
        health,
        metric,
        metric_stderr,
    } = run("nodrift", &[], &[]).await;
    assert_eq!(quality_alerts(&metric), [0.0], "{metric:?}");
    assert_eq!(
        dashboard["state"]["versions"][0]["alarm"], false,
        "{dashboard}"
    );
    assert!(
        !metric_stderr.contains("model quality alarm"),
        "a quality alarm without drift:\n{metric_stderr}"
    );
    let window = metric.get("pipeline_model_mae{span=\"window\"}");
    let all = metric.get("pipeline_model_mae{span=\"all\"}");
    eprintln!("nodrift: windowed MAE {window:?}, MAE since start {all:?}");
    for (feature, value) in &psi {
        assert!(*value < 0.1, "{feature}: PSI {value}: {psi:?}");
    }
    assert!(
        !stderr.contains("feature drift"),
        "a drift line without drift:\n{stderr}"
    );
    assert!(!health.contains("feature drift"), "/healthz: {health}");
}

#[test]
fn an_unknown_feature_in_drift_shift_is_a_usage_error() {
    let output = std::process::Command::new(bin_path("features"))
        .current_dir(repo_root())
        .env_clear()
        .env("DRIFT_SHIFT", "bmi=0.05,weight=1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"weight\"") && stderr.contains("age, sex, bmi"),
        "{stderr}"
    );
}

#[test]
fn the_drift_settings_are_listed_by_help() {
    for (binary, names) in [
        ("features", &["DRIFT_AFTER", "DRIFT_SHIFT"][..]),
        ("model", &["DRIFT_WINDOW", "DRIFT_PSI_ALERT"][..]),
    ] {
        let output = std::process::Command::new(bin_path(binary))
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        for name in names {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{binary} --help does not list {name}"
            );
        }
    }
}
