//! The service processes of the benchmark: the release binaries, started with a clean environment,
//! reaped with `wait4` so their CPU time and peak RSS are known even after they exit, and killed
//! when dropped, so a failed, panicking or interrupted run leaves no process behind.

use anyhow::{Context as _, bail};
use serde::Serialize;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

/// CPU time and peak resident memory of a process.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size (high-water mark), in MiB.
    pub peak_rss_mib: f64,
}

impl Usage {
    /// Of a running process: `utime + stime` from `/proc/<pid>/stat`, `VmHWM` from
    /// `/proc/<pid>/status`.
    pub fn of_running(pid: u32) -> anyhow::Result<Self> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path)
            .with_context(|| format!("cannot read {stat_path}"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count from after it.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After ')' comes field 3 (state); utime and stime are fields 14 and 15, in clock ticks.
        let ticks = |index: usize| -> anyhow::Result<f64> {
            let value: u64 = fields
                .get(index)
                .with_context(|| format!("{stat_path} is too short"))?
                .parse()
                .with_context(|| format!("{stat_path}: field {} is not a number", index + 3))?;
            Ok(value as f64)
        };
        let cpu_seconds = (ticks(11)? + ticks(12)?) / clock_ticks_per_second();

        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("cannot read {status_path}"))?;
        let hwm_kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .with_context(|| format!("no VmHWM in {status_path}"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{status_path}: VmHWM is not a number"))?;
        Ok(Self {
            cpu_seconds,
            peak_rss_mib: hwm_kib / 1024.0,
        })
    }

    /// From the `rusage` of a reaped child. Its CPU times are the child's own; its `ru_maxrss` is
    /// not: at `exec` Linux keeps the high-water mark of the memory the child had before, which
    /// (spawned with `vfork`/`posix_spawn`) is this benchmark's. Take the peak RSS from
    /// [`Service::sample_usage`] instead.
    fn from_rusage(usage: &libc::rusage) -> Self {
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1_000_000.0;
        Self {
            cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system setting.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// How a service process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it used over its whole life.
    pub usage: Usage,
}

/// One service process; killed (SIGKILL) and reaped when dropped.
pub struct Service {
    /// `features`, `model` or `metric` (`model 2` for a second replica).
    pub name: String,
    pid: libc::pid_t,
    exit: Option<Exit>,
    last_usage: Option<Usage>,
    /// Its `/healthz` and `/metrics` address.
    pub http_addr: SocketAddr,
    /// Where its stderr (the logs) goes.
    pub stderr_path: PathBuf,
    /// Just before it was spawned.
    pub spawned_at: Instant,
    /// Just before it was spawned, by the wall clock (to compare with its log timestamps).
    pub spawned_wall: SystemTime,
}

impl Service {
    /// Starts `binary` with only PATH, `env` and HTTP_ADDR (a free loopback port) in its
    /// environment; its stderr goes to `<dir>/<name>.stderr`.
    pub fn spawn(
        name: impl Into<String>,
        binary: &Path,
        env: &[(String, String)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let name = name.into();
        let http_addr = free_local_addr()?;
        let stderr_path = dir.join(format!("{}.stderr", name.replace(' ', "-")));
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;
        let spawned_wall = SystemTime::now();
        let spawned_at = Instant::now();
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("HTTP_ADDR", http_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        // The std handle is not kept: this type reaps the child itself (with its rusage).
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        Ok(Self {
            name,
            pid,
            exit: None,
            last_usage: None,
            http_addr,
            stderr_path,
            spawned_at,
            spawned_wall,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Reaps the process if it has exited (or, with `block`, waits for it). Once reaped, the exit
    /// is kept and the pid is never signalled again.
    fn poll_exit(&mut self, block: bool) -> anyhow::Result<Option<Exit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data, for which all zeroes is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            // SAFETY: the pid is our own child and not reaped yet; the pointers are to live locals.
            let reaped = unsafe { libc::wait4(self.pid, &mut status, flags, &mut usage) };
            if reaped == self.pid {
                self.exit = Some(Exit {
                    status: ExitStatus::from_raw(status),
                    usage: Usage::from_rusage(&usage),
                });
                return Ok(self.exit);
            }
            if reaped == 0 {
                return Ok(None);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("cannot wait for {}", self.name));
            }
        }
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.poll_exit(false), Ok(None))
    }

    /// Sends `signal` unless the process is already reaped.
    fn signal(&self, signal: libc::c_int) {
        if self.exit.is_none() {
            // SAFETY: kill only sends a signal; the pid is our unreaped child.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.poll_exit(false)? {
                return Ok(exit);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.stderr_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the process: SIGTERM, up to 10 s to finish, then SIGKILL.
    pub async fn stop(&mut self) -> anyhow::Result<Exit> {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(10)).await {
            Ok(exit) => Ok(exit),
            Err(_) => {
                self.signal(libc::SIGKILL);
                self.poll_exit(true)?
                    .with_context(|| format!("{} could not be reaped", self.name))
            }
        }
    }

    /// What it used so far, while it runs.
    pub fn usage_now(&self) -> anyhow::Result<Usage> {
        Usage::of_running(self.pid())
    }

    /// Reads what it used so far, if it still runs, and keeps the reading: the last one before
    /// the process exits is the best measure of the peak RSS of a process that exits by itself
    /// (`VmHWM` only grows).
    pub fn sample_usage(&mut self) {
        if self.exit.is_none()
            && let Ok(usage) = Usage::of_running(self.pid())
        {
            self.last_usage = Some(usage);
        }
    }

    /// The last reading of [`Service::sample_usage`].
    pub fn last_usage(&self) -> Option<Usage> {
        self.last_usage
    }

    /// Polls `/healthz` every `interval` until it answers 200; returns when it did. Fails if the
    /// process exits or `timeout` passes first.
    pub async fn wait_healthy(
        &mut self,
        timeout: Duration,
        interval: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.poll_exit(false)? {
                bail!(
                    "{} exited ({}) before it was healthy\n{}",
                    self.name,
                    exit.status,
                    self.stderr_tail(20)
                );
            }
            if let Ok((200, _)) = http_get(self.http_addr, "/healthz").await {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} was not healthy within {timeout:?}\n{}",
                    self.name,
                    self.stderr_tail(20)
                );
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// The last `lines` lines of its stderr, for error messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ({}):\n{}",
            self.name,
            self.stderr_path.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.poll_exit(true);
        }
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
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        // Field 22 of /proc/<pid>/stat is the start time; after ')' it is the 20th.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
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

/// A loopback address with a port nobody listens on right now.
fn free_local_addr() -> anyhow::Result<SocketAddr> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .context("cannot find a free port")
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))?
        .with_context(|| format!("GET {path} on {addr}"))?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path} on {addr}: no HTTP status"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
