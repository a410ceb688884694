//! HTTP GET over reqwest (chunked replies, keep-alive and the rest handled by the crate), async for
//! the benchmark and blocking for the tests.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::time::Duration;

/// How long one request may take, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://<addr><path>`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    // A client per call: a pooled connection belongs to the runtime that opened it, and the
    // blocking form below runs each call on a runtime of its own.
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    let url = format!("http://{addr}{path}");
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .with_context(|| format!("GET {url}: reading the body"))?;
    Ok((status, body))
}

/// [`get`] from synchronous code, also from inside a test's async runtime (it runs on a thread of
/// its own); `None` when the request failed.
pub fn get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                runtime.block_on(get(addr, path)).ok()
            })
            .join()
            .ok()
            .flatten()
    })
}
