//! The benchmark's side of the service processes: where the release binaries are (built when
//! missing), and the CPU time of the local broker. The processes themselves are
//! [`testkit::Service`]s: started with a clean environment, reaped with `wait4` (CPU time and peak
//! RSS), killed when dropped.

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
pub use testkit::http::get as http_get;
pub use testkit::{Service, Usage};

/// The three service binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The producer.
    pub features: PathBuf,
    /// The predictor.
    pub model: PathBuf,
    /// The logger.
    pub metric: PathBuf,
}

impl Binaries {
    fn in_dir(dir: &Path) -> Self {
        Self {
            features: dir.join("features"),
            model: dir.join("model"),
            metric: dir.join("metric"),
        }
    }

    fn missing(&self) -> Vec<String> {
        [&self.features, &self.model, &self.metric]
            .into_iter()
            .filter(|path| !path.is_file())
            .map(|path| path.display().to_string())
            .collect()
    }

    /// The binaries in `release_dir`; when one is missing, builds them with
    /// `cargo build --release -p features -p model -p metric` first.
    pub async fn locate_or_build(release_dir: &Path) -> anyhow::Result<Self> {
        let binaries = Self::in_dir(release_dir);
        let missing = binaries.missing();
        if missing.is_empty() {
            return Ok(binaries);
        }
        crate::progress!(
            "missing {}: running cargo build --release -p features -p model -p metric",
            missing.join(", ")
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = tokio::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "features",
                "-p",
                "model",
                "-p",
                "metric",
            ])
            .kill_on_drop(true)
            .status()
            .await
            .context("cannot run cargo")?;
        if !status.success() {
            bail!("cargo build --release of the services failed ({status})");
        }
        let missing = binaries.missing();
        if !missing.is_empty() {
            bail!(
                "still missing after the build: {} (--release-dir must be the release folder of this workspace's target)",
                missing.join(", ")
            );
        }
        Ok(binaries)
    }
}

/// The broker's process on this machine, to read its CPU time: when the broker is local, the
/// oldest `beam.smp` (the machine's RabbitMQ; brokers started later, such as private test nodes,
/// are younger). `None` for a remote broker or when there is none.
pub fn local_broker_pid(url: &str) -> Option<u32> {
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    let host = uri.authority.host.as_str();
    if !matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]") {
        return None;
    }
    let mut oldest: Option<(u64, u32)> = None;
    for (pid, dir) in testkit::process::processes_named("beam.smp") {
        // Field 22 of /proc/<pid>/stat is the start time; after ')' it is the 20th.
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let Some(start) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if oldest.is_none_or(|(best, _)| start < best) {
            oldest = Some((start, pid));
        }
    }
    oldest.map(|(_, pid)| pid)
}

/// CPU seconds `pid` has used so far; `None` when it cannot be read.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    pid.and_then(|pid| Usage::of_running(pid).ok())
        .map(|usage| usage.cpu_seconds)
}
