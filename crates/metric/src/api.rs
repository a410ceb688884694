//! `GET /api/quality`: the quality alarm of each kept model version as JSON, for the trainer
//! (which no longer has to parse the `/metrics` text). The body is exactly
//! `{"versions":[{"model_version":"...","alarm":false,"pairs":1234,"windowed_mae":45.1,
//! "baseline_mae":42.9,"threshold":53.6,"retired":false}]}`, one entry per kept version: those not
//! retired are the versions `pipeline_model_quality_alert{model_version}` exports, with the same
//! alarm; a retired one (replaced for `QUALITY_RETIRE_SECS`) has `"alarm":false` and no series.
//! Numbers not known yet are `null`.

use crate::quality::{AlarmReport, SharedAlarms, VersionAlarm};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;

/// The route `GET /api/quality`, reading what the quality tracker last published.
pub fn routes(alarms: SharedAlarms) -> Router {
    Router::new()
        .route("/api/quality", get(quality))
        .with_state(alarms)
}

/// The route `GET /api/quality` of an instance serving several partitions: one entry per
/// version over all of them ([`merge`]).
pub fn merged_routes(alarms: Vec<SharedAlarms>) -> Router {
    Router::new()
        .route("/api/quality", get(merged_quality))
        .with_state(Arc::new(alarms))
}

/// One report of several partitions' reports: per version, the pairs summed, the alarm on when
/// it is on in any partition, retired when retired in all, and the MAE figures of the partition
/// with the most pairs of it. Versions in the order first seen.
pub fn merge(reports: &[AlarmReport]) -> AlarmReport {
    let mut merged: Vec<(VersionAlarm, u64)> = Vec::new();
    for version in reports.iter().flat_map(|report| &report.versions) {
        match merged
            .iter_mut()
            .find(|(m, _)| m.model_version == version.model_version)
        {
            Some((m, most)) => {
                m.pairs += version.pairs;
                m.alarm |= version.alarm;
                m.retired &= version.retired;
                if version.pairs > *most {
                    *most = version.pairs;
                    m.windowed_mae = version.windowed_mae;
                    m.baseline_mae = version.baseline_mae;
                    m.threshold = version.threshold;
                }
            }
            None => merged.push((version.clone(), version.pairs)),
        }
    }
    AlarmReport {
        versions: merged.into_iter().map(|(m, _)| m).collect(),
        // A classifier's figures are not summed across partitions (yet): each partition's are
        // on its own metrics and dashboard.
        classification: None,
    }
}

async fn merged_quality(State(alarms): State<Arc<Vec<SharedAlarms>>>) -> Response {
    let reports: Vec<AlarmReport> = alarms
        .iter()
        .map(|shared| match shared.lock() {
            Ok(report) => report.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
        .collect();
    reply(serde_json::to_string(&merge(&reports)))
}

async fn quality(State(alarms): State<SharedAlarms>) -> Response {
    let body = {
        let report = match alarms.lock() {
            Ok(report) => report,
            Err(poisoned) => poisoned.into_inner(),
        };
        // serde_json writes a non-finite number as null, so this fails only on a bug.
        serde_json::to_string(&*report)
    };
    reply(body)
}

fn reply(body: serde_json::Result<String>) -> Response {
    match body {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the quality alarms: {err}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_merge_into_one_entry_per_version() {
        let entry = |version: &str, alarm, pairs, mae, retired| VersionAlarm {
            model_version: version.to_owned(),
            alarm,
            pairs,
            windowed_mae: Some(mae),
            baseline_mae: Some(1.0),
            threshold: Some(1.25),
            retired,
            measure: None,
            windowed: None,
            baseline: None,
        };
        let p0 = AlarmReport {
            versions: vec![
                entry("v2", false, 10, 1.0, false),
                entry("v1", false, 500, 1.1, true),
            ],
            classification: None,
        };
        let p1 = AlarmReport {
            versions: vec![
                entry("v2", true, 30, 2.0, false),
                entry("v1", false, 400, 1.2, false),
            ],
            classification: None,
        };
        let merged = merge(&[p0, p1]);
        assert_eq!(
            merged.versions,
            [
                entry("v2", true, 40, 2.0, false),
                entry("v1", false, 900, 1.1, false)
            ]
        );
        assert_eq!(merge(&[]).versions, []);
    }
    use crate::join::Pair;
    use crate::quality::Quality;
    use prometheus_client::registry::Registry;
    use std::collections::BTreeMap;

    fn feed(quality: &mut Quality, n: usize, error: f64, version: &str) {
        for i in 0..n {
            quality.observe(&Pair {
                id: format!("{version}-{i}"),
                y_true: 100.0,
                y_pred: 100.0 + error,
                model_version: Some(version.to_owned()),
                sent_at_us: None,
            });
        }
        quality.update_window();
    }

    async fn get_body(quality: &Quality) -> (StatusCode, String) {
        let response = super::quality(State(quality.shared_alarms())).await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// `(model_version, alarm)` of each `pipeline_model_quality_alert` line on the metrics page.
    fn gauges(registry: &Registry) -> BTreeMap<String, bool> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let prefix = "pipeline_model_quality_alert{model_version=\"";
        text.lines()
            .filter_map(|line| line.strip_prefix(prefix)?.split_once("\"} "))
            .map(|(version, value)| (version.to_owned(), value == "1"))
            .collect()
    }

    fn served(body: &str) -> BTreeMap<String, bool> {
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        json["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["retired"] == false)
            .map(|v| {
                let version = v["model_version"].as_str().unwrap().to_owned();
                (version, v["alarm"].as_bool().unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn the_body_has_the_shape_the_trainer_reads() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 5, 1.25);
        assert_eq!(get_body(&quality).await.1, r#"{"versions":[]}"#);
        // v1: baseline MAE 1, then a window of MAE 2 > 1.25: alarm. v2: too few pairs to judge.
        feed(&mut quality, 10, 1.0, "v1");
        feed(&mut quality, 10, 2.0, "v1");
        feed(&mut quality, 4, 3.0, "v2");
        let (status, body) = get_body(&quality).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            concat!(
                r#"{"versions":["#,
                r#"{"model_version":"v2","alarm":false,"pairs":4,"windowed_mae":null,"baseline_mae":null,"threshold":null,"retired":false},"#,
                r#"{"model_version":"v1","alarm":true,"pairs":20,"windowed_mae":2.0,"baseline_mae":1.0,"threshold":1.25,"retired":false}"#,
                r#"]}"#
            )
        );
    }

    #[tokio::test]
    async fn the_versions_and_alarms_are_those_of_the_gauge() {
        let mut registry = Registry::default();
        // Two versions kept: older ones lose their gauges, and their entries.
        let mut quality = Quality::register(&mut registry, 10, 2, 1.25);
        let steps: [(usize, f64, &str); 6] = [
            (10, 1.0, "v1"),
            (10, 3.0, "v1"),
            (20, 1.0, "v2"),
            (3, 1.0, "v3"),
            (10, 1.0, "v1"),
            (10, 1.0, "v1"),
        ];
        for (n, error, version) in steps {
            feed(&mut quality, n, error, version);
            let (_, body) = get_body(&quality).await;
            assert_eq!(served(&body), gauges(&registry), "{body}");
        }
        // A new version's gauges appear with its first pair, before any tick: so does its entry.
        quality.observe(&Pair {
            id: "w".into(),
            y_true: 1.0,
            y_pred: 1.0,
            model_version: Some("v4".into()),
            sent_at_us: None,
        });
        let (_, body) = get_body(&quality).await;
        assert_eq!(served(&body), gauges(&registry), "{body}");
        assert!(served(&body).contains_key("v4"), "{body}");
    }

    #[tokio::test]
    async fn a_retired_version_is_listed_as_retired_without_alarm_or_gauge() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 5, 1.25)
            .with_retire_after(std::time::Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        feed(&mut quality, 10, 1.0, "v1");
        feed(&mut quality, 10, 3.0, "v1");
        quality.update_window_at(t0);
        feed(&mut quality, 10, 1.0, "v2");
        quality.update_window_at(t0 + std::time::Duration::from_secs(1));
        assert_eq!(gauges(&registry).get("v1"), Some(&true));
        // `feed` ticks at the real time, a little after t0.
        quality.update_window_at(t0 + std::time::Duration::from_secs(61));
        let (_, body) = get_body(&quality).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let v1 = &json["versions"][1];
        assert_eq!(
            (&v1["model_version"], &v1["alarm"], &v1["retired"]),
            (&"v1".into(), &false.into(), &true.into()),
            "{body}"
        );
        assert_eq!(served(&body), gauges(&registry), "{body}");
        assert!(!gauges(&registry).contains_key("v1"));
    }
}
