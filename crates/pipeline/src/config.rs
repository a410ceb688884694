//! Settings shared by the services. Every setting is an environment variable and a flag of the same
//! name (clap's `env`), so compose, the README and `--help` agree.

use crate::broker::tls::TlsFiles;
use crate::partition::Partitions;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::{Args, ValueEnum};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the broker is and how to talk to it. Its `Debug` hides the passwords of `AMQP_URL`.
#[derive(Args, Clone)]
pub struct BrokerConfig {
    /// AMQP URL of the broker. Several URLs separated by commas name the nodes of a cluster: on
    /// connection loss the service moves on to the next one.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = AmqpUrlsParser
    )]
    pub amqp_url: String,

    /// Type of the queues this service declares: `classic`, or `quorum` on a RabbitMQ cluster.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,

    /// How the three queues are declared: `durable` (durable, dead-lettering, persistent native
    /// messages), or `course` (as the course's Python code declares them, so its services can share
    /// the queues; messages then do not survive a broker restart).
    #[arg(long, env = "TOPOLOGY", value_enum, default_value_t = TopologyMode::Durable)]
    pub topology: TopologyMode,

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

    /// For `amqps://` URLs: a PEM file of CA certificates to trust besides the system's CA store
    /// (the CA of a private or self-managed broker). Checked at start-up.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// For `amqps://` URLs to a broker that authenticates clients by certificate: the client
    /// certificate (PEM, optionally followed by its chain). Needs `AMQP_CLIENT_KEY_FILE`.
    #[arg(long, env = "AMQP_CLIENT_CERT_FILE")]
    pub amqp_client_cert_file: Option<PathBuf>,

    /// The client certificate's private key: an unencrypted PKCS#8 PEM file
    /// (`-----BEGIN PRIVATE KEY-----`).
    #[arg(long, env = "AMQP_CLIENT_KEY_FILE")]
    pub amqp_client_key_file: Option<PathBuf>,

    /// User name for every URL of AMQP_URL, replacing the one in it: for credentials kept apart
    /// from the address (a Kubernetes Secret of the RabbitMQ Cluster Operator), taken as they
    /// are, with no URL encoding needed.
    #[arg(long, env = "AMQP_USERNAME", hide_env_values = true)]
    pub amqp_username: Option<String>,

    /// Password for every URL of AMQP_URL, replacing the one in it (see AMQP_USERNAME). Never
    /// printed.
    #[arg(long, env = "AMQP_PASSWORD", hide_env_values = true)]
    pub amqp_password: Option<String>,
}

impl std::fmt::Debug for BrokerConfig {
    /// Every field, with `amqp_url` [`redact`]ed: a `?config` in a log line must not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            amqp_url,
            queue_type,
            topology,
            delivery_limit,
            reconnect_max_delay_ms,
            amqp_heartbeat_secs,
            amqp_ca_file,
            amqp_client_cert_file,
            amqp_client_key_file,
            amqp_username,
            amqp_password,
        } = self;
        f.debug_struct("BrokerConfig")
            .field("amqp_url", &redact(amqp_url))
            .field("queue_type", queue_type)
            .field("topology", topology)
            .field("delivery_limit", delivery_limit)
            .field("reconnect_max_delay_ms", reconnect_max_delay_ms)
            .field("amqp_heartbeat_secs", amqp_heartbeat_secs)
            // Paths only; the files' contents (a key) are never held here.
            .field("amqp_ca_file", amqp_ca_file)
            .field("amqp_client_cert_file", amqp_client_cert_file)
            .field("amqp_client_key_file", amqp_client_key_file)
            .field("amqp_username", amqp_username)
            .field("amqp_password", &amqp_password.as_ref().map(|_| "***"))
            .finish()
    }
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

    /// The TLS files for `amqps://` URLs.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca_file: self.amqp_ca_file.clone(),
            client_cert_file: self.amqp_client_cert_file.clone(),
            client_key_file: self.amqp_client_key_file.clone(),
        }
    }
}

/// Checks `AMQP_URL` for clap without ever showing the raw value: clap's own "invalid value"
/// error quotes it, password included, so the error is built here from the redacted URL.
#[derive(Clone, Copy, Debug)]
struct AmqpUrlsParser;

impl TypedValueParser for AmqpUrlsParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<String, clap::Error> {
        let refuse = |reason: String| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for AMQP_URL (--amqp-url): {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let value = value
            .to_str()
            .ok_or_else(|| refuse("it is not valid UTF-8".to_owned()))?;
        parse_amqp_urls(value).map_err(refuse)
    }
}

/// Checks that every comma-separated URL of `AMQP_URL` is an AMQP URL, so a typo fails at start-up
/// instead of being retried forever. The error shows the bad URL with its password hidden.
pub fn parse_amqp_urls(value: &str) -> Result<String, String> {
    let mut any = false;
    for url in value
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
    {
        url.parse::<lapin::uri::AMQPUri>().map_err(|err| {
            // The parser's message can quote the URL itself.
            let shown = redact(url);
            let mut err = err.replace(url, &shown);
            if let Some(password) = password_of(url) {
                err = err.replace(password, "***");
            }
            format!("{shown:?} is not an AMQP URL like amqp://user:pass@host:5672/%2f: {err}")
        })?;
        any = true;
    }
    if any {
        Ok(value.to_owned())
    } else {
        Err("no broker URL given".to_owned())
    }
}

/// The one password redactor, for logs, errors and `Debug`: each comma-separated URL of
/// `AMQP_URL` with its password hidden, parsed or not. The user info's password when the URL has
/// the `scheme://user:password@` shape, else everything before the last `@`.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let (head, tail) = url.split_at(at);
    match head.find("://") {
        Some(scheme_end) => {
            let (scheme, userinfo) = head.split_at(scheme_end + 3);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}{user}:***{tail}"),
                None => url.to_owned(),
            }
        }
        None => {
            // Keep leading spaces of a list entry, so the list reads as it was written.
            let kept = head.len() - head.trim_start().len();
            format!("{}***{tail}", &head[..kept])
        }
    }
}

/// The password of `scheme://user:password@host...`, if it has a non-empty one.
fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    (!password.is_empty()).then_some(password)
}

/// The kind of queue declared on the broker.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Single-node queues; the default for the compose stack.
    Classic,
    /// Replicated Raft queues for a RabbitMQ cluster.
    Quorum,
}

/// How the pipeline's queues are declared and what is published on them.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// Durable queues that dead-letter to `<queue>.dlq`, native JSON messages with the id.
    Durable,
    /// The course's Python code: `queue_declare(queue=name)` (non-durable, no arguments) and bare
    /// JSON bodies, the id in the AMQP `message_id`.
    Course,
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

    /// Partitions of each stream: 1 keeps one queue per stream; with P > 1 the queues are
    /// `<queue>.p<k>` and a sample goes to `k = FNV-1a-64(id) mod P`. Must be the same for every
    /// service (checked on the broker).
    #[arg(long, env = "PARTITIONS", default_value = "1", value_parser = parse_partitions)]
    pub partitions: Partitions,
}

/// `PARTITIONS`: a count from 1 to [`crate::partition::MAX_PARTITIONS`].
fn parse_partitions(text: &str) -> Result<Partitions, String> {
    let count: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    Partitions::new(count).map_err(|err| err.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerConfig,
    }

    #[test]
    fn a_bad_amqp_url_is_refused_without_its_password() {
        let err = Cli::try_parse_from([
            "test",
            "--amqp-url",
            "amqp://guest:S3CRET@127.0.0.1:notaport/%2f",
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(text.contains("AMQP_URL"), "{text}");
        assert!(
            text.contains("amqp://guest:***@127.0.0.1:notaport/%2f"),
            "{text}"
        );
        assert!(!text.contains("S3CRET"), "{text}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn a_parser_message_quoting_the_url_is_redacted_too() {
        // The URL parser answers "Invalid URL: '<the url>'" for a URL that cannot be a base.
        let err = parse_amqp_urls("amqp:S3CRET@host").unwrap_err();
        assert!(!err.contains("S3CRET"), "{err}");
        let err = parse_amqp_urls("amqp://u:S3CRET@h:1/%2f,amqp://v:0THER@h:x/%2f").unwrap_err();
        assert!(!err.contains("0THER") && !err.contains("S3CRET"), "{err}");
    }

    #[test]
    fn good_urls_pass() {
        let list = "amqp://guest:guest@127.0.0.1:5672/%2f, amqp://a:b@node2:5672/%2f";
        assert_eq!(parse_amqp_urls(list).as_deref(), Ok(list));
        assert!(parse_amqp_urls(" , ").is_err());
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.broker.urls(), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("amqp://u:pw@h:x/%2f"), "amqp://u:***@h:x/%2f");
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://u:p@ss@h:1/%2f"), "amqp://u:***@h:1/%2f");
        assert_eq!(redact("amqp:pw@h"), "***@h");
        assert_eq!(redact("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact("amqp://h:x"), "amqp://h:x");
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(
            redact("amqp://a:P1@h1/%2f, amqp://b:P2@h2/%2f"),
            "amqp://a:***@h1/%2f, amqp://b:***@h2/%2f"
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let cli = Cli::try_parse_from([
            "test",
            "--amqp-url",
            "amqp://guest:S3CRET@node1:5672/%2f,amqp://other:0THER@node2:5672/%2f",
        ])
        .unwrap();
        for text in [format!("{:?}", cli.broker), format!("{:#?}", cli)] {
            assert!(
                !text.contains("S3CRET") && !text.contains("0THER"),
                "{text}"
            );
            assert!(text.contains("amqp://guest:***@node1:5672/%2f"), "{text}");
            assert!(text.contains("reconnect_max_delay_ms: 5000"), "{text}");
        }
    }

    #[test]
    fn passwords_are_found() {
        assert_eq!(password_of("amqp://u:p@ss@h:1/%2f"), Some("p@ss"));
        assert_eq!(password_of("amqp://u@h"), None);
        assert_eq!(password_of("amqp://u:@h"), None);
        assert_eq!(password_of("amqp://h:5672"), None);
    }
}
