//! Connecting to the broker: retries with capped exponential backoff and full jitter, a clear log
//! line per attempt, failover across the URLs of `AMQP_URL`, and the connection-state metric.

use crate::config::BrokerConfig;
use crate::health::Health;
use crate::metrics::BrokerMetrics;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Capped exponential backoff with full jitter: the n-th pause is uniform in
/// `[base·2ⁿ/2, base·2ⁿ]`, never above the cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + exp.mul_f64(fastrand::f64()) / 2
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Errors that no retry can fix: a refused exclusive consumer, a queue declared with other
/// arguments. The service stops with the error instead of looping.
pub fn is_fatal(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::ProtocolError(amqp) if matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::RESOURCELOCKED
            )
        )
    )
}

/// Frame size asked of the broker unless the URL sets `frame_max`. lapin keeps two buffers of 32
/// frames per connection: RabbitMQ's default 128 KiB frames cost 8 MiB of memory, 16 KiB frames
/// 1 MiB. Our messages are far smaller; larger bodies are split into more frames.
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Give up on one connection attempt after this long (a host that drops packets never refuses).
const DEFAULT_CONNECTION_TIMEOUT_MS: u64 = 10_000;

/// One connection attempt, with our defaults for what the URL leaves unset.
async fn connect_once(url: &str, properties: ConnectionProperties) -> lapin::Result<Connection> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|err: String| lapin::Error::from(std::io::Error::other(err)))?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    uri.query
        .connection_timeout
        .get_or_insert(DEFAULT_CONNECTION_TIMEOUT_MS);
    Connection::connect_uri(uri, properties).await
}

/// Hides the password of an AMQP URL for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The broker as one service sees it: where it is, and the health and metrics to keep current.
#[derive(Clone)]
pub struct Broker {
    config: BrokerConfig,
    service: String,
    /// Broker metrics of this service.
    pub metrics: BrokerMetrics,
    /// Health of this service, unhealthy while not connected.
    pub health: Health,
    next_url: usize,
    connected_once: bool,
}

impl Broker {
    /// A broker handle for the service named `service` (shown in the management UI).
    pub fn new(
        config: BrokerConfig,
        service: impl Into<String>,
        metrics: BrokerMetrics,
        health: Health,
    ) -> Self {
        Self {
            config,
            service: service.into(),
            metrics,
            health,
            next_url: 0,
            connected_once: false,
        }
    }

    /// The broker settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Connects, retrying until it works or `shutdown` is cancelled (then `None`). Each failed
    /// attempt is logged with the URL (password hidden), the error and the pause before the next.
    pub async fn connect(&mut self, shutdown: &CancellationToken) -> Option<Connection> {
        let urls = self.config.urls();
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            self.config.reconnect_max_delay(),
        );
        let mut attempt: u64 = 0;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            attempt += 1;
            let url = &urls[self.next_url % urls.len().max(1)];
            let properties = ConnectionProperties::default()
                .with_connection_name(format!("{} ({})", self.service, std::process::id()).into());
            let result = tokio::select! {
                result = connect_once(url, properties) => result,
                _ = shutdown.cancelled() => return None,
            };
            match result {
                Ok(connection) => {
                    tracing::info!(url = %redact(url), attempt, "connected to the broker");
                    if self.connected_once {
                        self.metrics.reconnects.inc();
                    }
                    self.connected_once = true;
                    self.metrics.connected.set(1);
                    return Some(connection);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        url = %redact(url),
                        attempt,
                        error = %err,
                        retry_in_ms = delay.as_millis() as u64,
                        "broker not reachable, retrying"
                    );
                    self.health
                        .set_unhealthy(format!("broker not reachable: {err}"));
                    self.next_url = self.next_url.wrapping_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Records that the connection is gone and the next attempt should try the next URL.
    pub fn lost(&mut self, reason: &str) {
        self.metrics.connected.set(0);
        self.health
            .set_unhealthy(format!("broker connection lost: {reason}"));
        self.next_url = self.next_url.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
    }
}
