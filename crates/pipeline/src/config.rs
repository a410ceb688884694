//! Settings shared by the services. Every setting is an environment variable and a flag of the same
//! name (clap's `env`), so compose, the README and `--help` agree.

use clap::{Args, ValueEnum};
use std::time::Duration;

/// Where the broker is and how to talk to it.
#[derive(Args, Debug, Clone)]
pub struct BrokerConfig {
    /// AMQP URL of the broker. Several URLs separated by commas name the nodes of a cluster: on
    /// connection loss the service moves on to the next one.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_parser = parse_amqp_urls
    )]
    pub amqp_url: String,

    /// Type of the queues this service declares: `classic`, or `quorum` on a RabbitMQ cluster.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,

    /// For quorum queues: deliveries of one message before the broker dead-letters it.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Longest pause between two reconnect attempts, in milliseconds (the backoff doubles up to it).
    #[arg(long, env = "RECONNECT_MAX_DELAY_MS", default_value_t = 5_000)]
    pub reconnect_max_delay_ms: u64,

    /// AMQP heartbeat in seconds, unless the URL sets `heartbeat`: a silent network cut is noticed
    /// after twice this. 0 turns heartbeats off.
    #[arg(long, env = "AMQP_HEARTBEAT_SECS", default_value_t = 10)]
    pub amqp_heartbeat_secs: u16,
}

impl BrokerConfig {
    /// The broker URLs, in the order they are tried.
    pub fn urls(&self) -> Vec<String> {
        self.amqp_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Longest pause between reconnect attempts.
    pub fn reconnect_max_delay(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_delay_ms.max(1))
    }
}

/// Checks that every comma-separated URL of `AMQP_URL` is an AMQP URL, so a typo fails at start-up
/// instead of being retried forever.
fn parse_amqp_urls(value: &str) -> Result<String, String> {
    let mut any = false;
    for url in value
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
    {
        url.parse::<lapin::uri::AMQPUri>().map_err(|err| {
            format!("{url:?} is not an AMQP URL like amqp://user:pass@host:5672/%2f: {err}")
        })?;
        any = true;
    }
    if any {
        Ok(value.to_owned())
    } else {
        Err("no broker URL given".to_owned())
    }
}

/// The kind of queue declared on the broker.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Single-node queues; the default for the compose stack.
    Classic,
    /// Replicated Raft queues for a RabbitMQ cluster.
    Quorum,
}

/// Names of the three queues of the pipeline.
#[derive(Args, Debug, Clone)]
pub struct QueueNames {
    /// Queue of feature vectors (features -> model).
    #[arg(long, env = "FEATURES_QUEUE", default_value = "features")]
    pub features_queue: String,

    /// Queue of true targets (features -> metric).
    #[arg(long, env = "Y_TRUE_QUEUE", default_value = "y_true")]
    pub y_true_queue: String,

    /// Queue of predictions (model -> metric).
    #[arg(long, env = "Y_PRED_QUEUE", default_value = "y_pred")]
    pub y_pred_queue: String,
}

/// How a consuming service takes messages.
#[derive(Args, Debug, Clone)]
pub struct ConsumeConfig {
    /// Unacknowledged messages the broker may hand this consumer at once (`basic.qos`).
    #[arg(long, env = "PREFETCH", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Largest message body accepted; a larger one is dead-lettered as `too_large`.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
}

/// Logging settings.
#[derive(Args, Debug, Clone)]
pub struct TelemetryConfig {
    /// Log format: `text` for people, `json` for one JSON object per line. `RUST_LOG` sets the level.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Format of the log lines on stderr.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `127.0.0.1:9101`-style socket addresses for `HTTP_ADDR`.
pub fn parse_socket_addr(value: &str) -> Result<std::net::SocketAddr, String> {
    value
        .parse()
        .map_err(|err| format!("{value:?} is not an address like 0.0.0.0:9101: {err}"))
}
