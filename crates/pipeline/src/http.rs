//! The HTTP endpoint of every service: `GET /healthz` and `GET /metrics` (Prometheus text format),
//! plus any routes a service mounts itself ([`spawn_with`]), and the probe behind each binary's `healthcheck` subcommand (the runtime image has no curl).

use crate::health::Health;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    health: Health,
}

/// Binds `addr` now (so a taken port fails start-up with a clear error) and serves until
/// `shutdown` completes.
pub async fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    spawn_with(addr, registry, health, Router::new(), shutdown).await
}

/// [`spawn`] with the service's own routes in `extra` served beside `/healthz` and `/metrics`
/// (which it must not define again: axum panics on overlapping routes at start-up).
pub async fn spawn_with(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Health,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on HTTP_ADDR {addr}"))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(AppState { registry, health })
        .merge(extra);
    tracing::info!(%addr, "serving /healthz and /metrics");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %err, "HTTP endpoint failed");
        }
    }))
}

/// `200 ok` or `503` with the reasons, one per line; notes follow as `note: ...` lines.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let (status, mut body) = match state.health.get() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    };
    for note in state.health.notes() {
        body.push_str("note: ");
        body.push_str(&note);
        body.push('\n');
    }
    (status, body)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::with_capacity(8 * 1024);
    match prometheus_client::encoding::prometheus_text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {err}\n"),
        )
            .into_response(),
    }
}

/// Asks the service listening on `addr` for `/healthz`; `Ok(())` only for a 200 answer.
/// A wildcard address (`0.0.0.0`) is probed on loopback.
pub fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let response = http_get(target, "/healthz")?;
    if response.status == 200 {
        Ok(())
    } else {
        anyhow::bail!(
            "unhealthy: {}: {}",
            response.status_line,
            response.body.trim()
        )
    }
}

/// The answer to [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (0 when the status line has none).
    pub status: u16,
    /// The whole status line, for messages.
    pub status_line: String,
    /// The body (not decoded: the services answer with `Content-Length` bodies).
    pub body: String,
}

/// A small blocking HTTP/1.1 `GET path` to `addr` (3 s timeouts), for the healthcheck probe and
/// for services that read another one's `/metrics`.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("cannot read the answer of {addr}"))?;
    let status_line = response.lines().next().unwrap_or_default().to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok(Response {
        status,
        status_line,
        body,
    })
}
