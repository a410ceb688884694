//! The alarm watcher: polls the metric service and asks for a retrain when the served version's
//! quality alarm rises.

use crate::policy::{self, AlarmEdge, Trigger};
use crate::retrain::Promoter;
use crate::state::Request;
use anyhow::Context as _;
use pipeline::CancellationToken;
use std::net::ToSocketAddrs as _;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reads the metric service's `/metrics` every `interval` and asks for a retrain when the served
/// version's quality alarm rises. An unreachable metric service is logged (once per outage) and
/// tried again.
pub(crate) async fn watch_alarm(
    authority: String,
    interval: Duration,
    promoter: Promoter,
    requests: mpsc::Sender<Request>,
    shutdown: CancellationToken,
) {
    let mut edge = AlarmEdge::default();
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        let target = authority.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let addr = target
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve METRIC_URL {target}"))?
                .next()
                .with_context(|| format!("METRIC_URL {target} has no address"))?;
            let response = pipeline::http::http_get(addr, "/metrics")?;
            anyhow::ensure!(response.status == 200, "{}", response.status_line);
            Ok(response.body)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|answer| answer);
        let body = match answer {
            Ok(body) => {
                if !reachable {
                    tracing::info!(metric_url = %authority, "the metric service answers again");
                }
                reachable = true;
                body
            }
            Err(err) => {
                if reachable {
                    tracing::warn!(metric_url = %authority, error = %format!("{err:#}"), "cannot read the metric service's quality alarm; trying again");
                }
                reachable = false;
                continue;
            }
        };
        let served = match promoter.serving() {
            Ok(artifact) => artifact.version,
            Err(_) => continue,
        };
        if edge.observe(policy::parse_alarms(&body), &served) {
            tracing::warn!(version = %served, "the metric service's quality alarm rose for the served version: retraining");
            let _ = requests.try_send(Request {
                trigger: Trigger::Alarm,
                reply: None,
            });
        }
    }
}
