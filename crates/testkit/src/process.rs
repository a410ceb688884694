//! The service processes of a test or benchmark run: the real binaries, started with an
//! environment built in one place ([`Env`]), reaped with `wait4` so their CPU time and peak RSS are
//! known even after they exit, and killed when dropped, so a failed, panicking or interrupted run
//! leaves no process behind.

use crate::Queues;
use anyhow::{Context as _, bail};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The environment of a service process, as `NAME=VALUE` pairs; a later [`Env::set`] of the same
/// name replaces the earlier value.
#[derive(Clone, Debug, Default)]
pub struct Env(Vec<(String, String)>);

impl Env {
    /// `AMQP_URL` and the three queue names.
    pub fn new(amqp_url: &str, queues: &Queues) -> Self {
        let mut env = Self::default().set("AMQP_URL", amqp_url);
        env.0.extend(queues.env());
        env
    }

    /// Sets `name` (replacing an earlier value).
    pub fn set(mut self, name: &str, value: impl ToString) -> Self {
        self.0.retain(|(k, _)| k != name);
        self.0.push((name.to_owned(), value.to_string()));
        self
    }

    /// Sets each pair in turn.
    pub fn with<K: AsRef<str>, V: ToString>(
        mut self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (name, value) in pairs {
            self = self.set(name.as_ref(), value);
        }
        self
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The pairs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

/// Path of a service binary built next to the running test binary (`target/<profile>/<name>`;
/// `cargo test --workspace` builds them).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so the service binaries are built",
        path.display()
    );
    path
}

/// The processes on this machine whose command name (`/proc/<pid>/comm`) is `comm`, with their
/// `/proc/<pid>` folder, for reading more of them.
pub fn processes_named(comm: &str) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (name.trim() == comm).then(|| (pid, entry.path()))
        })
        .collect()
}

/// CPU time and peak resident memory of a process.
#[derive(Debug, Clone, Copy, serde::Serialize)]
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
    /// (spawned with `vfork`/`posix_spawn`) is the parent's. Take the peak RSS from
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
    binary: PathBuf,
    env: Env,
    dir: PathBuf,
    starts: u32,
    pid: libc::pid_t,
    exit: Option<Exit>,
    last_usage: Option<Usage>,
    /// Its `/healthz` and `/metrics` address (HTTP_ADDR).
    pub http_addr: SocketAddr,
    /// Where its stderr (the logs) goes.
    pub stderr_path: PathBuf,
    /// Just before it was spawned.
    pub spawned_at: Instant,
    /// Just before it was spawned, by the wall clock (to compare with its log timestamps).
    pub spawned_wall: SystemTime,
}

impl Service {
    /// Starts `binary` in the repository root with only PATH, `env` and HTTP_ADDR (a free loopback
    /// port) in its environment, and RUST_LOG from `TEST_RUST_LOG` (default `info`) unless `env`
    /// sets it; its stderr goes to `<dir>/<name>.stderr`.
    pub fn spawn(
        name: impl Into<String>,
        binary: &Path,
        env: Env,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::start(name.into(), binary, env, dir, crate::local_addr(), 0)
    }

    fn start(
        name: String,
        binary: &Path,
        env: Env,
        dir: &Path,
        http_addr: SocketAddr,
        starts: u32,
    ) -> anyhow::Result<Self> {
        let file = name.replace(' ', "-");
        let stderr_path = if starts == 0 {
            dir.join(format!("{file}.stderr"))
        } else {
            dir.join(format!("{file}.{starts}.stderr"))
        };
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("cannot create {}", stderr_path.display()))?;
        let rust_log = std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
        let spawned_wall = SystemTime::now();
        let spawned_at = Instant::now();
        let child = Command::new(binary)
            .current_dir(crate::repo_root())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .envs(env.pairs().iter().map(|(key, value)| (key, value)))
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
            binary: binary.to_owned(),
            env,
            dir: dir.to_owned(),
            starts,
            pid,
            exit: None,
            last_usage: None,
            http_addr,
            stderr_path,
            spawned_at,
            spawned_wall,
        })
    }

    /// Kills the process and starts it again on the same address, with the same settings but for
    /// `overrides`; its stderr goes to a new file.
    pub fn respawn(&mut self, overrides: &[(&str, String)]) -> anyhow::Result<()> {
        self.kill();
        let env = self.env.clone().with(overrides.iter().cloned());
        let name = self.name.clone();
        *self = Self::start(
            name,
            &self.binary.clone(),
            env,
            &self.dir.clone(),
            self.http_addr,
            self.starts + 1,
        )?;
        Ok(())
    }

    /// Its environment (without PATH, RUST_LOG default and HTTP_ADDR).
    pub fn env(&self) -> &Env {
        &self.env
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
    pub fn signal(&self, signal: libc::c_int) {
        if self.exit.is_none() {
            // SAFETY: kill only sends a signal; the pid is our unreaped child.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.poll_exit(true);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself, blocking the thread.
    pub fn wait_exit_blocking(&mut self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(exit)) = self.poll_exit(false) {
                return Some(exit);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
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

    /// `GET path` on its HTTP address: (status, body), `None` when it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        crate::http::get_blocking(self.http_addr, path)
    }

    /// Its `/metrics`, parsed (empty when it does not answer).
    pub fn metrics(&self) -> crate::Metrics {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        crate::Metrics::parse(&body)
    }

    /// Its `/metrics`, parsed, from async code.
    pub async fn scrape(&self) -> anyhow::Result<crate::Metrics> {
        match crate::http::get(self.http_addr, "/metrics").await? {
            (200, body) => Ok(crate::Metrics::parse(&body)),
            (status, _) => bail!("{}'s /metrics answered {status}", self.name),
        }
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
            if let Ok((200, _)) = crate::http::get(self.http_addr, "/healthz").await {
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

    /// Its whole stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last `lines` lines of its stderr, for error messages.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = self.stderr();
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
        self.kill();
    }
}
