//! The alarm watcher: polls the metric service's `GET /api/quality`, asks for a retrain when the
//! served version's quality alarm rises, and keeps [`Promoter::replicas_serve`] up to date (the
//! version the replicas' predictions carry).

use crate::policy::{AlarmEdge, QualityReport, ServedVersion, Trigger};
use crate::retrain::Promoter;
use crate::state::Request;
use pipeline::CancellationToken;
use pipeline::http::HttpError;
use std::sync::PoisonError;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest wait for one answer of the metric service (connect and read).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The metric service's quality endpoint, read over HTTP ([`pipeline::http::get_json`]; no
/// proxy is consulted, so an HTTP_PROXY meant for the outside cannot reroute the neighbour).
#[derive(Clone, Debug)]
pub(crate) struct QualitySource {
    url: String,
}

impl QualitySource {
    /// The endpoint of the metric service at `authority` (`host:port`, from `METRIC_URL`).
    pub(crate) fn new(authority: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: format!("http://{authority}/api/quality"),
        })
    }

    /// One reading of the report.
    pub(crate) async fn read(&self) -> anyhow::Result<QualityReport> {
        let report: QualityReport = pipeline::http::get_json(&self.url, READ_TIMEOUT)
            .await
            .map_err(|err| {
                let not_a_report = matches!(err, HttpError::Json { .. });
                let err = anyhow::Error::new(err);
                if not_a_report {
                    err.context(format!("GET {}: not a quality report", self.url))
                } else {
                    err
                }
            })?;
        Ok(report)
    }

    /// The URL read.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

/// Reads the metric service's quality report every `interval` and asks for a retrain when the
/// served version's quality alarm rises. An unreachable metric service (or an answer that is not
/// a report) is logged once per outage and tried again.
pub(crate) async fn watch_alarm(
    source: QualitySource,
    interval: Duration,
    promoter: Promoter,
    requests: mpsc::Sender<Request>,
    shutdown: CancellationToken,
) {
    let mut edge = AlarmEdge::default();
    let mut replicas = ServedVersion::default();
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        let answer = tokio::select! {
            answer = source.read() => answer,
            _ = shutdown.cancelled() => return,
        };
        let reading = match answer {
            Ok(reading) => {
                if !reachable {
                    tracing::info!(
                        metric_url = source.url(),
                        "the metric service answers again"
                    );
                }
                reachable = true;
                reading
            }
            Err(err) => {
                if reachable {
                    tracing::warn!(metric_url = source.url(), error = %format!("{err:#}"), "cannot read the metric service's quality alarm; trying again");
                }
                reachable = false;
                continue;
            }
        };
        let replicas_serve = replicas.observe(&reading).map(str::to_owned);
        *promoter
            .replicas_serve
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = replicas_serve.clone();
        // While MODEL_PATH is unreadable, the alarm that matters is the replicas' version's.
        let checking = promoter.clone();
        let serving = tokio::task::spawn_blocking(move || checking.serving_version())
            .await
            .ok()
            .flatten();
        let served = match serving.or(replicas_serve) {
            Some(version) => version,
            None => continue,
        };
        if edge.observe(reading.alarms(), &served) {
            tracing::warn!(version = %served, "the metric service's quality alarm rose for the served version: retraining");
            let _ = requests.try_send(Request {
                trigger: Trigger::Alarm,
                reply: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    use std::collections::HashMap;

    /// Serves `route` on a free local port; returns its `host:port`.
    async fn serve(route: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, route).await });
        addr.to_string()
    }

    #[tokio::test]
    async fn the_report_is_read_over_http() {
        let body = r#"{"versions":[{"model_version":"ols-1bbf9343466e","alarm":true,"pairs":1234,"windowed_mae":45.1,"baseline_mae":42.9,"threshold":53.6}]}"#;
        let authority = serve(Router::new().route(
            "/api/quality",
            get(move || async move { ([("content-type", "application/json")], body) }),
        ))
        .await;
        let reading = QualitySource::new(&authority)
            .unwrap()
            .read()
            .await
            .unwrap();
        assert_eq!(
            reading.alarms(),
            HashMap::from([("ols-1bbf9343466e".to_owned(), true)])
        );
        assert_eq!(reading.versions[0].pairs, 1234);
    }

    #[tokio::test]
    async fn an_error_status_or_another_body_is_an_error() {
        let unavailable = serve(Router::new().route(
            "/api/quality",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "starting") }),
        ))
        .await;
        let err = QualitySource::new(&unavailable)
            .unwrap()
            .read()
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("503"), "{err:#}");
        // An older metric service: no such route.
        let older = serve(Router::new().route("/metrics", get(|| async { "" }))).await;
        assert!(QualitySource::new(&older).unwrap().read().await.is_err());
        let not_json =
            serve(Router::new().route("/api/quality", get(|| async { "{\"versions\":" }))).await;
        let err = QualitySource::new(&not_json)
            .unwrap()
            .read()
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("not a quality report"),
            "{err:#}"
        );
        // Nothing listens: an error, not a hang.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        assert!(QualitySource::new(&closed).unwrap().read().await.is_err());
    }
}
