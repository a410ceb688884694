//! The benchmark's own dealings with the broker: queue names per phase, the ledger of queues to
//! delete, connecting, and reading the broker's version.

use anyhow::{Context as _, anyhow, bail, ensure};
use lapin::options::QueueDeleteOptions;
use lapin::protocol::{AMQPClass, connection::AMQPMethod};
use lapin::types::AMQPValue;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use pipeline::broker::topology::dead_letter_queue;
use pipeline::config::QueueNames;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The three queue names of one phase: `bench.<run>.<phase>.{features,y_true,y_pred}`.
pub fn phase_queues(run_id: &str, phase: &str) -> QueueNames {
    let prefix = format!("bench.{run_id}.{phase}");
    QueueNames {
        features_queue: format!("{prefix}.features"),
        y_true_queue: format!("{prefix}.y_true"),
        y_pred_queue: format!("{prefix}.y_pred"),
    }
}

/// The three queues and their dead-letter queues.
fn all_queues(queues: &QueueNames) -> Vec<String> {
    let main = [
        &queues.features_queue,
        &queues.y_true_queue,
        &queues.y_pred_queue,
    ];
    main.iter()
        .map(|q| (*q).clone())
        .chain(main.iter().map(|q| dead_letter_queue(q)))
        .collect()
}

/// Every queue the benchmark may have declared and not yet deleted.
#[derive(Clone, Default)]
pub struct QueueLedger {
    names: Arc<Mutex<BTreeSet<String>>>,
}

impl QueueLedger {
    /// Records the queues of a phase, before anything declares them.
    pub fn register(&self, queues: &QueueNames) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.extend(all_queues(queues));
    }

    /// Deletes the queues of a phase and forgets them.
    pub async fn delete(&self, url: &str, queues: &QueueNames) -> anyhow::Result<()> {
        let names = all_queues(queues);
        delete_queues(url, &names).await?;
        let mut known = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        for name in &names {
            known.remove(name);
        }
        Ok(())
    }

    /// Deletes every queue still recorded, trying each URL until one works. Returns how many.
    pub async fn delete_all(&self, urls: &[String]) -> anyhow::Result<usize> {
        let names: Vec<String> = {
            let known = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            known.iter().cloned().collect()
        };
        if names.is_empty() {
            return Ok(0);
        }
        let mut last_error = anyhow!("AMQP_URL is empty");
        for url in urls {
            match delete_queues(url, &names).await {
                Ok(()) => {
                    self.names
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                    return Ok(names.len());
                }
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }
}

/// Connects with a name that shows in the management UI.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, properties),
    )
    .await
    .context("timed out connecting to the broker")?
    .with_context(|| {
        format!(
            "cannot connect to {}",
            pipeline::broker::connection::redact(url)
        )
    })
}

/// Deletes `names` (a missing queue is fine), then closes the connection.
async fn delete_queues(url: &str, names: &[String]) -> anyhow::Result<()> {
    let connection = connect(url, "bench (cleanup)").await?;
    let mut channel = connection.create_channel().await?;
    let mut failed = Vec::new();
    for name in names {
        if let Err(err) = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            failed.push(format!("{name}: {err}"));
            // A refused delete closes the channel; carry on with a new one.
            channel = connection.create_channel().await?;
        }
    }
    // The producer's fanout exchanges of the phase's streams (`<queue>.fanout`); best effort, as
    // only the features and y_true queues have one.
    for name in names {
        let exchange = pipeline::broker::topology::fanout_exchange(name);
        if channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await
            .is_err()
        {
            channel = connection.create_channel().await?;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("cannot delete {}", failed.join("; "))
    }
}

/// The broker's product and version, as it announces them in `connection.start` (lapin does not
/// expose the server properties, so this reads the first frame itself); `rabbitmqctl version` when
/// that fails.
pub async fn server_version(url: &str) -> String {
    match announced_version(url).await {
        Ok(version) => version,
        Err(err) => {
            crate::progress!(
                "cannot read the broker version over AMQP ({err:#}); asking rabbitmqctl"
            );
            match tokio::process::Command::new("rabbitmqctl")
                .arg("version")
                .output()
                .await
            {
                Ok(output) if output.status.success() => format!(
                    "RabbitMQ {} (rabbitmqctl version)",
                    String::from_utf8_lossy(&output.stdout).trim()
                ),
                _ => "unknown".to_owned(),
            }
        }
    }
}

/// Opens a TCP connection, sends the AMQP 0-9-1 header and reads the server properties of the
/// `connection.start` the broker answers with, then hangs up.
async fn announced_version(url: &str) -> anyhow::Result<String> {
    let uri: AMQPUri = url.parse().map_err(|err: String| anyhow!(err))?;
    ensure!(
        uri.scheme == AMQPScheme::AMQP,
        "only plain amqp:// is read directly"
    );
    let address = (uri.authority.host.as_str(), uri.authority.port);
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .context("timed out")??;
    stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    // A frame: type (1 = method), channel (2 bytes), payload size (4 bytes), payload, 0xCE.
    let mut header = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header))
        .await
        .context("timed out")??;
    ensure!(
        header[0] == 1,
        "the broker did not answer with a method frame"
    );
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    ensure!(size <= 1 << 20, "connection.start of {size} bytes");
    let mut payload = vec![0u8; size];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut payload))
        .await
        .context("timed out")??;
    let (_, class) = lapin::protocol::parse_class(payload.as_slice())
        .map_err(|err| anyhow!("cannot parse connection.start: {err}"))?;
    let AMQPClass::Connection(AMQPMethod::Start(start)) = class else {
        bail!("the first frame is not connection.start");
    };
    let property = |key: &str| match start.server_properties.inner().get(key) {
        Some(AMQPValue::LongString(value)) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        Some(AMQPValue::ShortString(value)) => Some(value.as_str().to_owned()),
        _ => None,
    };
    let version = property("version").context("no version in the server properties")?;
    Ok(format!(
        "{} {version}",
        property("product").unwrap_or_else(|| "broker".to_owned())
    ))
}
