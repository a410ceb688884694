//! The Prometheus files in `monitoring/prometheus`: `promtool` accepts the config and the rules,
//! the rules' unit tests (`alerts_test.yml`) pass, and every `pipeline_*` metric the rules use is
//! exported by a running service. `promtool` comes with Debian's `prometheus` package, which
//! `scripts/test` installs.

use crate::helpers::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Metrics the rules use that another part of issue 11 adds (the metric service's quality alarm);
/// remove a name from here once its service exports it.
const NOT_YET_EXPORTED: &[&str] = &[];

fn prometheus_dir() -> PathBuf {
    repo_root().join("monitoring/prometheus")
}

/// Runs `promtool args...` in monitoring/prometheus and returns its output; panics when it fails.
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run promtool ({err}): install Debian's `prometheus` package (scripts/test does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_config_and_the_rules() {
    let config = promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("1 rule files found"), "{config}");
    let rules = promtool(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let output = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(output.contains("SUCCESS"), "{output}");
}

/// Every alert of the issue has a rule.
#[test]
fn every_alert_has_a_rule() {
    let rules = std::fs::read_to_string(prometheus_dir().join("alerts.yml")).unwrap();
    for alert in [
        "ModelQualityDegraded",
        "FeatureDrift",
        "DeadLettersGrowing",
        "NoPairsWritten",
        "QueueDepthGrowing",
        "ServiceDown",
        "BrokerDown",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "no rule {alert}"
        );
    }
}

/// The sample names a `/metrics` text can have: its samples, and for every declared family the
/// names its type gives (a counter with no series yet is still exported as `<name>_total`).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let mut parts = declaration.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

fn pipeline_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pipeline_") {
        let before = rest[..at].chars().last();
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pipeline_metric_in_the_rules_is_exported() {
    let rules = std::fs::read_to_string(prometheus_dir().join("alerts.yml")).unwrap();
    let used = pipeline_names_in(&rules);
    assert!(used.contains("pipeline_feature_drift_psi"), "{used:?}");

    // A family with no series is not exported at all: give each one a series. A window of 10
    // fills with the 20 samples (drift PSI); one malformed message is dead-lettered.
    let run = Pipeline::start(
        "promnames",
        Options::new(shared_amqp_url(), 20)
            .env("LINGER_SECS", "60")
            .env("DRIFT_WINDOW", "10"),
    );
    run.wait_rows(20, Duration::from_secs(60));
    let connection = connect(&shared_amqp_url()).await;
    publish_raw(
        &connection,
        &run.queues.features,
        b"{not json",
        Some("bad-1"),
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
    let dead_lettered = wait_until(Duration::from_secs(30), || {
        let text = run.model.get("/metrics").unwrap_or_default().1;
        text.contains("pipeline_messages_dead_lettered_total{")
            && text.contains("pipeline_feature_drift_psi{")
    });
    assert!(
        dead_lettered,
        "no dead letter or PSI on the model's /metrics\n{}",
        run.logs()
    );
    let features = run.features.as_ref().expect("producer");
    let mut exported = BTreeSet::new();
    for service in [features, &run.model, &run.metric] {
        let (status, body) = service
            .get("/metrics")
            .unwrap_or_else(|| panic!("{} /metrics did not answer", service.name));
        assert_eq!(status, 200);
        exported.extend(exported_names(&body));
    }
    let queues = run.queues.clone();
    drop(run);
    delete_queues(&shared_amqp_url(), &queues).await;
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(*name) && !NOT_YET_EXPORTED.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the rules use metrics no service exports: {missing:?}"
    );
    for pending in NOT_YET_EXPORTED {
        if exported.contains(*pending) {
            panic!("{pending} is exported now: remove it from NOT_YET_EXPORTED");
        }
        eprintln!("not checked (not exported yet): {pending}");
    }
}

#[test]
fn metric_names_are_found_in_rules_text() {
    let names = pipeline_names_in(
        "max by (x) (pipeline_a_b) > 0 and sum(rate(pipeline_c_total[1m])) or my_pipeline_d",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["pipeline_a_b".to_owned(), "pipeline_c_total".to_owned()]
    );
    let exported = exported_names(
        "# TYPE pipeline_x counter\n# TYPE pipeline_h histogram\npipeline_g{a=\"b\"} 1\n",
    );
    for name in [
        "pipeline_x_total",
        "pipeline_h_bucket",
        "pipeline_h_count",
        "pipeline_g",
    ] {
        assert!(exported.contains(name), "{name}: {exported:?}");
    }
}
