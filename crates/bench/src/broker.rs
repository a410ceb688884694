//! The benchmark's own dealings with the broker: the ledger of the phases' queues to delete (with
//! `testkit`'s one deleter), and reading the broker's version.

use anyhow::{Context as _, anyhow, bail, ensure};
use lapin::protocol::{AMQPClass, connection::AMQPMethod};
use lapin::types::AMQPValue;
use lapin::uri::{AMQPScheme, AMQPUri};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
pub use testkit::connect;
use testkit::{Queues, delete_queues};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Every queue the benchmark may have declared and not yet deleted.
#[derive(Clone, Default)]
pub struct QueueLedger {
    phases: Arc<Mutex<BTreeSet<Queues>>>,
}

impl QueueLedger {
    /// Records the queues of a phase, before anything declares them.
    pub fn register(&self, queues: &Queues) {
        let mut phases = self.phases.lock().unwrap_or_else(PoisonError::into_inner);
        phases.insert(queues.clone());
    }

    /// Deletes the queues of a phase (and what goes with them) and forgets them.
    pub async fn delete(&self, url: &str, queues: &Queues) -> anyhow::Result<()> {
        delete_queues(url, queues).await?;
        let mut phases = self.phases.lock().unwrap_or_else(PoisonError::into_inner);
        phases.remove(queues);
        Ok(())
    }

    /// Deletes the queues of every phase still recorded, trying each URL until one works. Returns
    /// how many phases.
    pub async fn delete_all(&self, urls: &[String]) -> anyhow::Result<usize> {
        let phases: Vec<Queues> = {
            let known = self.phases.lock().unwrap_or_else(PoisonError::into_inner);
            known.iter().cloned().collect()
        };
        if phases.is_empty() {
            return Ok(0);
        }
        let mut last_error = anyhow!("AMQP_URL is empty");
        for url in urls {
            let mut deleted = 0;
            for queues in &phases {
                match self.delete(url, queues).await {
                    Ok(()) => deleted += 1,
                    Err(err) => last_error = err,
                }
            }
            if deleted == phases.len() {
                return Ok(deleted);
            }
        }
        Err(last_error)
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
