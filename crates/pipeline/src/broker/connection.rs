//! Connecting to the broker: retries with the supervisor's backoff, a clear log line per attempt,
//! failover across the URLs of `AMQP_URL`, heartbeats, the connection-state metric, and the
//! broker's `connection.blocked` / `unblocked` notices in the log, `/healthz` and a gauge.

use super::retry::{Failure, HEALTHY_SESSION, InvalidUrl, SessionBackoff, Step, Verdict, classify};
use super::tls::TlsFailure;
use crate::config::BrokerConfig;
/// The one redactor, kept at this path too (the benchmark calls it here).
pub use crate::config::redact;
use crate::health::Health;
use crate::metrics::BrokerMetrics;
use futures_util::StreamExt as _;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, Event};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// First pause between connection attempts; the supervisor doubles it up to
/// `RECONNECT_MAX_DELAY_MS`.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Frame size asked of the broker unless the URL sets `frame_max`. lapin keeps two buffers of 32
/// frames per connection: RabbitMQ's default 128 KiB frames cost 8 MiB of memory, 16 KiB frames
/// 1 MiB. Our messages are far smaller; larger bodies are split into more frames.
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Give up on one connection attempt after this long (a host that drops packets never refuses).
const DEFAULT_CONNECTION_TIMEOUT_MS: u64 = 10_000;

/// Beyond the connect timeout, how long the AMQP handshake of one attempt may take before it is
/// given up and tried again (a node still booting can take the TCP connection and say nothing).
const HANDSHAKE_GRACE: Duration = Duration::from_secs(10);

/// The URL with our defaults for what it leaves unset: frame size, connect timeout, heartbeat.
fn with_defaults(url: &str, heartbeat_secs: u16) -> Result<AMQPUri, InvalidUrl> {
    let mut uri: AMQPUri = url.parse().map_err(InvalidUrl)?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    uri.query
        .connection_timeout
        .get_or_insert(DEFAULT_CONNECTION_TIMEOUT_MS);
    uri.query.heartbeat.get_or_insert(heartbeat_secs);
    Ok(uri)
}

/// `AMQP_USERNAME` and `AMQP_PASSWORD`, when set, in place of the URL's own.
fn with_credentials(uri: &mut AMQPUri, config: &BrokerConfig) {
    if let Some(username) = &config.amqp_username {
        uri.authority.userinfo.username = username.clone();
    }
    if let Some(password) = &config.amqp_password {
        uri.authority.userinfo.password = password.clone();
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
    /// The pause before the next connection attempt, kept across sessions.
    backoff: SessionBackoff,
    /// The task that follows the current connection's events.
    events: Option<tokio::task::AbortHandle>,
    /// The TLS settings, read from their files at the first connection attempt.
    tls: Option<OwnedTLSConfig>,
}

impl Broker {
    /// A broker handle for the service named `service` (shown in the management UI).
    pub fn new(
        config: BrokerConfig,
        service: impl Into<String>,
        metrics: BrokerMetrics,
        health: Health,
    ) -> Self {
        let backoff = SessionBackoff::new(
            FIRST_RETRY_DELAY,
            config.reconnect_max_delay(),
            HEALTHY_SESSION,
        );
        Self {
            config,
            service: service.into(),
            metrics,
            health,
            next_url: 0,
            connected_once: false,
            backoff,
            events: None,
            tls: None,
        }
    }

    /// The broker settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Connects, retrying until it works or `shutdown` is cancelled (then `None`). Each failed
    /// attempt is logged with the URL (password hidden), the error and the pause before the next;
    /// the pauses grow across sessions ([`SessionBackoff`]). `Err` only for what no retry fixes
    /// (a malformed URL, an unusable TLS file, a TLS handshake refused for a certificate problem
    /// or a port that does not speak TLS).
    pub async fn connect(
        &mut self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Connection>> {
        let urls = self.config.urls();
        let tls = self.tls_config(&urls)?;
        let mut attempt: u64 = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            attempt += 1;
            let url = &urls[self.next_url % urls.len().max(1)];
            let mut uri = with_defaults(url, self.config.amqp_heartbeat_secs)?;
            with_credentials(&mut uri, &self.config);
            let properties = ConnectionProperties::default()
                .with_connection_name(format!("{} ({})", self.service, std::process::id()).into());
            let tls_peer = (uri.scheme == AMQPScheme::AMQPS)
                .then(|| (uri.authority.host.clone(), uri.authority.port));
            let runtime = lapin::runtime::default_runtime()?;
            // The URL's connection timeout bounds the TCP connect only; a broker still booting
            // can accept it and never finish the handshake. Bound the whole attempt.
            let limit = Duration::from_millis(
                uri.query
                    .connection_timeout
                    .unwrap_or(DEFAULT_CONNECTION_TIMEOUT_MS),
            ) + HANDSHAKE_GRACE;
            let attempt_result = tokio::time::timeout(
                limit,
                Connection::connect_uri_with_config(uri, properties, tls.clone(), runtime),
            );
            let result = tokio::select! {
                result = attempt_result => result.unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no AMQP handshake within {} s", limit.as_secs()),
                    )
                    .into())
                }),
                _ = shutdown.cancelled() => return Ok(None),
            };
            let err = match result {
                Ok(connection) => {
                    tracing::info!(url = %redact(url), attempt, "connected to the broker");
                    if self.connected_once {
                        self.metrics.reconnects.inc();
                    }
                    self.connected_once = true;
                    self.metrics.connected.set(1);
                    self.follow_events(&connection);
                    return Ok(Some(connection));
                }
                Err(err) => err,
            };
            let failure = tls_peer
                .and_then(|(host, port)| {
                    let detail = err.to_string();
                    let tls = TlsFailure::recognise(&detail)?;
                    Some(Failure::Tls(tls.message(
                        &host,
                        port,
                        &self.config.tls_files(),
                        &detail,
                    )))
                })
                .unwrap_or_else(|| Failure::of_lapin(&err));
            let reason = match classify(Step::Connect, &failure) {
                Verdict::Fatal { message } => {
                    self.health.set_unhealthy(message.clone());
                    return Err(anyhow::Error::from(err).context(message));
                }
                Verdict::Retry { reason } => reason,
            };
            let delay = self.backoff.attempt_failed();
            tracing::warn!(
                url = %redact(url),
                attempt,
                error = %err,
                retry_in_ms = delay.as_millis() as u64,
                reason = %reason,
                "broker not reachable, retrying"
            );
            self.health.set_unhealthy(reason);
            self.next_url = self.next_url.wrapping_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// The TLS settings, read and checked once; an unusable file is fatal (the error names the
    /// setting and the file).
    fn tls_config(&mut self, urls: &[String]) -> anyhow::Result<OwnedTLSConfig> {
        if let Some(tls) = &self.tls {
            return Ok(tls.clone());
        }
        let files = self.config.tls_files();
        let tls = files.load().map_err(|err| {
            let message = err.to_string();
            self.health.set_unhealthy(message.clone());
            anyhow::Error::from(err)
        })?;
        if files.any() && !urls.iter().any(|url| url.starts_with("amqps://")) {
            tracing::warn!(
                "AMQP_CA_FILE / AMQP_CLIENT_CERT_FILE are set but no URL of AMQP_URL is amqps://: \
                 the connection is not encrypted and the files are not used"
            );
        }
        self.tls = Some(tls.clone());
        Ok(tls)
    }

    /// Follows the connection's events: `blocked` / `unblocked` (a broker resource alarm holds
    /// our publishes) go to the log, `/healthz` notes and `pipeline_broker_blocked`; a connection
    /// error marks the service unhealthy and disconnected at once, before the session notices.
    fn follow_events(&mut self, connection: &Connection) {
        let mut events = connection.events_listener();
        let health = self.health.clone();
        let metrics = self.metrics.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(
                            reason,
                            "the broker blocked publishing on this connection (resource alarm); \
                             publishes wait until it lifts"
                        );
                        metrics.blocked.set(1);
                        health.set_note(
                            "blocked",
                            Some(format!("publishing blocked by the broker: {reason}")),
                        );
                    }
                    Event::ConnectionUnblocked => {
                        tracing::info!("the broker unblocked publishing on this connection");
                        metrics.blocked.set(0);
                        health.set_note("blocked", None);
                    }
                    Event::Error(err) => {
                        // The connection failed: the session ends with it.
                        metrics.connected.set(0);
                        health.set_unhealthy(format!("broker error: {err}"));
                    }
                    _ => {}
                }
            }
        });
        if let Some(previous) = self.events.replace(task.abort_handle()) {
            previous.abort();
        }
    }

    /// The session's connection is closed: stop following it; a new one starts unblocked.
    pub fn disconnected(&mut self) {
        if let Some(events) = self.events.take() {
            events.abort();
        }
        self.metrics.blocked.set(0);
        self.health.set_note("blocked", None);
    }

    /// A session that lasted `lasted` failed: the pause before connecting again.
    pub fn session_failed(&mut self, lasted: std::time::Duration) -> Duration {
        self.backoff.session_failed(lasted)
    }

    /// Records that the connection is gone and the next attempt should try the next URL.
    pub fn lost(&mut self, reason: &str) {
        self.metrics.connected.set(0);
        self.health.set_unhealthy(reason.to_owned());
        self.next_url = self.next_url.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_setting_applies_unless_the_url_sets_one() {
        let uri = with_defaults("amqp://guest:guest@127.0.0.1:5672/%2f", 10).unwrap();
        assert_eq!(uri.query.heartbeat, Some(10));
        let uri = with_defaults("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=3", 10).unwrap();
        assert_eq!(uri.query.heartbeat, Some(3));
    }

    #[test]
    fn separate_credentials_replace_the_urls_and_are_never_shown() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            broker: BrokerConfig,
        }
        let config = Cli::try_parse_from([
            "x",
            "--amqp-url",
            "amqp://rabbit.ns.svc:5672/%2f",
            "--amqp-username",
            "default_user_x",
            "--amqp-password",
            "p/a+s:s@w=rd",
        ])
        .unwrap()
        .broker;
        let mut uri = with_defaults(&config.urls()[0], 10).unwrap();
        with_credentials(&mut uri, &config);
        assert_eq!(uri.authority.userinfo.username, "default_user_x");
        // Characters a URL would need encoded are taken as they are.
        assert_eq!(uri.authority.userinfo.password, "p/a+s:s@w=rd");
        assert_eq!(uri.vhost, "/");
        let shown = format!("{config:?}");
        assert!(!shown.contains("p/a+s"), "{shown}");
        // Without them the URL's own stay.
        let mut uri = with_defaults("amqp://guest:guest@h:5672/%2f", 10).unwrap();
        with_credentials(&mut uri, &Cli::try_parse_from(["x"]).unwrap().broker);
        assert_eq!(uri.authority.userinfo.password, "guest");
    }

    #[test]
    fn a_malformed_url_is_an_invalid_url_error() {
        assert!(with_defaults("amqp://guest:guest@127.0.0.1:notaport/%2f", 10).is_err());
    }
}
