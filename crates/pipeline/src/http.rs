//! The HTTP endpoint of every service: `GET /healthz` and `GET /metrics` (Prometheus text format),
//! plus any routes a service mounts itself ([`spawn_with`]); and the client side: [`get`] and
//! [`get_json`] (hyper's client, with a time limit), used by the probe behind each binary's
//! `healthcheck` subcommand (the runtime image has no curl) and by services that read another's
//! JSON.

use crate::health::Health;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
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
        .route("/healthz", routing::get(healthz))
        .route("/metrics", routing::get(metrics))
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
            merge_families(body),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {err}\n"),
        )
            .into_response(),
    }
}

/// Puts every sample of a metric family under one `# HELP`/`# TYPE` header. A metric instance
/// registers its figures once per partition (a sub-registry labelled `partition`), which the
/// encoder writes as one family block each; the exposition format allows a family once, so the
/// blocks are joined. Text without a repeated family is returned as it is.
pub fn merge_families(text: String) -> String {
    fn family(line: &str) -> Option<&str> {
        ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|prefix| line.strip_prefix(prefix))
            .and_then(|rest| rest.split(' ').next())
    }
    let mut seen = std::collections::HashSet::new();
    let repeated = text
        .lines()
        .filter(|line| line.starts_with("# HELP "))
        .filter_map(family)
        .any(|name| !seen.insert(name));
    if !repeated {
        return text;
    }
    // name -> (header lines, sample lines), in the order first seen.
    let mut order: Vec<&str> = Vec::new();
    let mut blocks: std::collections::HashMap<&str, (Vec<&str>, Vec<&str>)> =
        std::collections::HashMap::new();
    let mut current = None;
    let mut eof = false;
    for line in text.lines() {
        if line == "# EOF" {
            eof = true;
        } else if let Some(name) = family(line) {
            let (headers, _) = blocks.entry(name).or_insert_with(|| {
                order.push(name);
                (Vec::new(), Vec::new())
            });
            if !headers.contains(&line) {
                headers.push(line);
            }
            current = Some(name);
        } else if let Some((_, samples)) = current.and_then(|name| blocks.get_mut(name)) {
            samples.push(line);
        }
    }
    let mut merged = String::with_capacity(text.len());
    for name in order {
        if let Some((headers, samples)) = blocks.get(name) {
            for line in headers.iter().chain(samples) {
                merged.push_str(line);
                merged.push('\n');
            }
        }
    }
    if eof {
        merged.push_str("# EOF\n");
    }
    merged
}

/// Asks the service listening on `addr` for `/healthz`; `Ok(())` only for a 200 answer.
/// A wildcard address (`0.0.0.0`) is probed on loopback.
pub async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let response = get(&format!("http://{target}/healthz"), PROBE_TIMEOUT).await?;
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

/// How long the healthcheck waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The answer to [`get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line (`HTTP/1.1 503 Service Unavailable`), for messages.
    pub status_line: String,
    /// The body, decoded from chunks if need be (UTF-8, invalid bytes replaced).
    pub body: String,
}

/// Why a GET got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not an `http://host:port/path` URL.
    #[error("{url:?} is not an http:// URL: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting or sending failed, or the answer could not be read.
    #[error("GET {url} failed")]
    Request {
        /// The URL asked.
        url: String,
        /// hyper's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No whole answer within the time limit.
    #[error("GET {url}: no answer within {} ms", timeout.as_millis())]
    Timeout {
        /// The URL asked.
        url: String,
        /// The time limit.
        timeout: Duration,
    },
    /// An answer other than 200.
    #[error("GET {url}: {status_line}: {}", body.trim())]
    Status {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
        /// The status line.
        status_line: String,
        /// The body, for the message.
        body: String,
    },
    /// A 200 answer that is not the JSON expected.
    #[error("GET {url}: the answer is not the JSON expected")]
    Json {
        /// The URL asked.
        url: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
}

/// `GET url` (HTTP/1.1, plain `http://`), the whole answer within `timeout`, whatever its status.
///
/// hyper's client rather than a hand-written one: it handles chunked bodies and keeps the
/// protocol details out of this crate; axum already builds hyper, so it costs little to compile.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    let answer = exchange(url, None, timeout).await?;
    Ok(Response {
        status: answer.status,
        status_line: answer.status_line,
        body: String::from_utf8_lossy(&answer.body).into_owned(),
    })
}

/// The answer to a conditional GET ([`get_if_changed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The status code (304: unchanged since the ETag sent).
    pub status: u16,
    /// The status line, for messages.
    pub status_line: String,
    /// The answer's `ETag`, when it has one.
    pub etag: Option<String>,
    /// The body's bytes.
    pub body: Vec<u8>,
}

/// `GET url` with `If-None-Match: <etag>` when an ETag is known (the server answers 304 when
/// nothing changed), the whole answer within `timeout`, whatever its status.
pub async fn get_if_changed(
    url: &str,
    etag: Option<&str>,
    timeout: Duration,
) -> Result<Fetched, HttpError> {
    exchange(url, etag, timeout).await
}

/// One GET, with `If-None-Match` when `etag` is given.
async fn exchange(url: &str, etag: Option<&str>, timeout: Duration) -> Result<Fetched, HttpError> {
    use http_body_util::BodyExt as _;
    let uri: axum::http::Uri =
        url.parse()
            .map_err(|err: axum::http::uri::InvalidUri| HttpError::InvalidUrl {
                url: url.to_owned(),
                reason: err.to_string(),
            })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(HttpError::InvalidUrl {
            url: url.to_owned(),
            reason: "it needs the http:// scheme and a host".to_owned(),
        });
    }
    let request_failed = |source: Box<dyn std::error::Error + Send + Sync>| HttpError::Request {
        url: url.to_owned(),
        source,
    };
    let mut request = axum::http::Request::get(uri);
    if let Some(etag) = etag {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let request = request
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|err| request_failed(err.into()))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        // One request per client: nothing to keep a connection for.
        .pool_max_idle_per_host(0)
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| request_failed(err.into()))?;
        let status = response.status();
        let status_line = format!("{:?} {status}", response.version());
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| request_failed(err.into()))?
            .to_bytes();
        Ok(Fetched {
            status: status.as_u16(),
            status_line,
            etag,
            body: body.to_vec(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
}

/// `GET url` and decode its JSON answer, within `timeout`; an answer other than 200 is an error.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    url: &str,
    timeout: Duration,
) -> Result<T, HttpError> {
    let response = get(url, timeout).await?;
    if response.status != 200 {
        return Err(HttpError::Status {
            url: url.to_owned(),
            status: response.status,
            status_line: response.status_line,
            body: response.body,
        });
    }
    serde_json::from_str(&response.body).map_err(|source| HttpError::Json {
        url: url.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_registered_per_partition_is_written_once() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::registry::Registry;
        use std::borrow::Cow;
        let mut registry = Registry::default();
        for (k, n) in [(0, 3), (2, 5)] {
            let sub = registry
                .sub_registry_with_label((Cow::Borrowed("partition"), Cow::Owned(format!("p{k}"))));
            let pairs = Counter::<u64>::default();
            pairs.inc_by(n);
            sub.register("pairs", "Ids joined", pairs);
            sub.register("waiting", "Ids waiting", Counter::<u64>::default());
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert_eq!(text.matches("# HELP pairs").count(), 2, "{text}");
        let merged = merge_families(text);
        assert_eq!(
            merged,
            "# HELP pairs_total Ids joined.\n# TYPE pairs_total counter\n\
             pairs_total{partition=\"p0\"} 3\npairs_total{partition=\"p2\"} 5\n\
             # HELP waiting_total Ids waiting.\n# TYPE waiting_total counter\n\
             waiting_total{partition=\"p0\"} 0\nwaiting_total{partition=\"p2\"} 0\n"
        );
        // Nothing repeated: the very same text.
        assert_eq!(merge_families(merged.clone()), merged);
    }
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Serves one connection with `answer`, whatever is asked.
    async fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            stream.write_all(answer.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
        });
        addr
    }

    #[tokio::test]
    async fn a_chunked_json_answer_is_decoded() {
        let addr = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             7\r\n{\"alarm\r\n8\r\n\": true}\r\n0\r\n\r\n",
        )
        .await;
        let value: serde_json::Value = get_json(
            &format!("http://{addr}/api/quality"),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        assert_eq!(value, serde_json::json!({"alarm": true}));
    }

    #[tokio::test]
    async fn an_error_status_is_reported_with_its_body() {
        let addr =
            serve_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nstarting\n")
                .await;
        let err =
            get_json::<serde_json::Value>(&format!("http://{addr}/x"), Duration::from_secs(3))
                .await
                .unwrap_err();
        assert!(
            matches!(err, HttpError::Status { status: 503, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .ends_with("HTTP/1.1 503 Service Unavailable: starting"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = get(&format!("http://{addr}/"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err:?}");
        drop(listener);
    }

    #[tokio::test]
    async fn probe_follows_healthz() {
        let health = Health::new();
        let registry = Arc::new(Registry::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let stop = tokio_util::sync::CancellationToken::new();
        let served = spawn(
            addr,
            registry,
            health.clone(),
            stop.clone().cancelled_owned(),
        )
        .await
        .unwrap();
        let err = probe(addr).await.unwrap_err().to_string();
        assert!(err.contains("503") && err.contains("starting"), "{err}");
        health.set_healthy();
        probe(addr).await.unwrap();
        assert!(get("ftp://x/", PROBE_TIMEOUT).await.is_err());
        stop.cancel();
        served.await.unwrap();
    }
}
