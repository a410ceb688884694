//! The pipeline runs: the release binaries of the three services on fresh queues and a fresh log
//! folder, timed by watching `metric_log.csv` grow.
//!
//! - [`throughput`]: `features` with `COUNT=N RATE=0`; from just before `features` is spawned to
//!   the moment the CSV is seen with N rows, plus CPU time and peak RSS of each service.
//! - [`latency`]: the same paced at a given rate. Per hop, the services' own histograms, scraped
//!   at the end: `pipeline_receive_delay_seconds{queue}` (the producer's `sent_at_us` to receipt,
//!   at the model for `features` and at the metric service for `y_true` and `y_pred`) and the
//!   metric service's `pipeline_end_to_end_latency_seconds` (`sent_at_us` to the join); and,
//!   exactly per sample, the metric service's `labels_log.txt` stamps against the moment each CSV
//!   row is seen (the file is polled every millisecond). No log message text is read.

use crate::latency::{self, CONFIRM_HISTOGRAM, HISTOGRAM, RECEIVE_DELAY, Summary};
use crate::process::{Service, Usage, cpu_seconds, http_get};
use crate::{Bench, progress};
use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use testkit::{Metrics, Queues};

/// How often the CSV is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Longest time without a new CSV row before a run is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The metric service's joined rows.
const METRIC_CSV: &str = "metric_log.csv";

/// The metric service's message log (one line per message, stamped when it was handled).
const LABELS_LOG: &str = "labels_log.txt";

/// CPU time and peak RSS of one service over a run.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceUsage {
    /// `features`, `model` (`model 2`, ...) or `metric`.
    pub service: String,
    /// What it used.
    #[serde(flatten)]
    pub usage: Usage,
    /// Where the figures come from.
    pub source: &'static str,
}

/// What the full-speed run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    /// Samples sent through.
    pub samples: u64,
    /// Model replicas.
    pub models: usize,
    /// From just before `features` was spawned (for a backlog: from the start of metric and
    /// model, all samples queued) to the last row seen in the CSV.
    pub seconds: f64,
    /// `samples / seconds`: the headline figure.
    pub samples_per_second: f64,
    /// From the first `y_true` the metric service logged (about one broker hop after the first
    /// send) to the last row: the run without the producer's start-up.
    pub seconds_from_first_message: Option<f64>,
    /// `samples / seconds_from_first_message`.
    pub samples_per_second_from_first_message: Option<f64>,
    /// Per service.
    pub usage: Vec<ServiceUsage>,
    /// CPU time of metric and the models during the run.
    pub consumers_cpu_seconds: f64,
    /// CPU time of the benchmark process itself during the run (mostly polling the CSV).
    pub bench_cpu_seconds: f64,
    /// CPU time of the broker during the run, when it runs on this machine.
    pub broker_cpu_seconds: Option<f64>,
}

/// What the paced run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// Samples sent through.
    pub samples: u64,
    /// RATE given to the producer, samples per second.
    pub target_rate: f64,
    /// The rate achieved, from the first to the last row seen.
    pub achieved_rate: f64,
    /// Send (the producer's `sent_at_us`) to the metric service joining the sample, from its
    /// `pipeline_end_to_end_latency_seconds` histogram (interpolated); the CSV flush after the join
    /// is the stage "metric has both → row seen".
    pub per_sample: Option<Summary>,
    /// Send to the metric service holding both messages, the measure the bare client takes of
    /// itself: the same histogram (it is observed when the second message of a sample arrives).
    pub both_handled: Option<Summary>,
    /// The histogram's widest bucket between 1 ms and 1 s (upper bound / lower bound).
    pub histogram_widest_bucket: Option<f64>,
    /// The model's publish → broker confirm of `y_pred` (its `pipeline_publish_confirm_seconds`):
    /// how long it waits before it may ack the `features` message.
    pub model_confirm: Option<Summary>,
    /// Where the time goes, per hop (see [`STAGES`]).
    pub stages: Vec<Stage>,
}

/// One stage of the end-to-end latency.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// From where to where.
    pub stage: &'static str,
    /// Its distribution.
    pub summary: Summary,
}

/// The stages of [`LatencyResult::stages`], in order.
pub(crate) const STAGES: [&str; 5] = [
    "send → metric received y_true (producer → broker → metric; its receive-delay histogram)",
    "send → metric received y_pred (producer → broker → model → broker → metric; its receive-delay histogram)",
    "send → metric joined both (its end-to-end histogram; the bare client's measure)",
    "metric handled the later of the two → row seen in the CSV (labels_log.txt stamps; flush, then the 1 ms poll)",
    "send → model received features (hop 1 of y_pred; the model's receive-delay histogram)",
];

/// Readers of the metric service's dashboard for the length of a run: what a browser showing the
/// page asks for (the page and its assets once, then `/api/dashboard` every second), so the
/// service's peak RSS is measured with the page open. They stop when dropped.
struct DashboardReaders(Vec<tokio::task::JoinHandle<()>>);

impl DashboardReaders {
    fn start(metric: std::net::SocketAddr, readers: usize) -> Self {
        Self(
            (0..readers)
                .map(|n| {
                    tokio::spawn(read_dashboard(
                        metric,
                        Duration::from_millis(250 * n as u64),
                    ))
                })
                .collect(),
        )
    }
}

/// One reader: after `offset`, the page and its assets, then `/api/dashboard` every second.
async fn read_dashboard(metric: std::net::SocketAddr, offset: Duration) {
    tokio::time::sleep(offset).await;
    for path in [
        "/",
        "/assets/dashboard.js",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
    ] {
        let _ = http_get(metric, path).await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let _ = http_get(metric, "/api/dashboard").await;
    }
}

impl Drop for DashboardReaders {
    fn drop(&mut self) {
        for reader in &self.0 {
            reader.abort();
        }
    }
}

/// Metric and the model replicas running on a phase's queues, with their log folder.
struct Consumers {
    // Fields drop in order: the processes are killed before the folder is removed.
    metric: Service,
    models: Vec<Service>,
    queues: Queues,
    logs: PathBuf,
    dir: tempfile::TempDir,
}

impl Consumers {
    /// Starts metric and `models` model replicas (`model_log` as their RUST_LOG) on fresh queues
    /// and waits until all are healthy. With `backlog`, a producer first queues that many samples
    /// (`RATE=0`) and exits before they start.
    async fn start(
        bench: &Bench,
        phase: &str,
        models: usize,
        backlog: Option<u64>,
        model_log: &str,
    ) -> anyhow::Result<Self> {
        let queues = bench.queues(phase);
        let dir = tempfile::Builder::new()
            .prefix(&format!("bench-{phase}-"))
            .tempdir()
            .context("cannot create a temporary folder")?;
        if let Some(count) = backlog {
            let mut features = spawn_features(bench, &queues, dir.path(), count, 0.0, "warn")?;
            let exit = features.wait_exit(Duration::from_secs(1800)).await?;
            ensure!(
                exit.status.success(),
                "features failed ({})\n{}",
                exit.status,
                features.stderr_tail(20)
            );
        }
        let logs = dir.path().join("logs");
        let metric_env = bench
            .service_env(&queues, "warn")
            .set("LOG_DIR", logs.display());
        let mut metric = Service::spawn("metric", &bench.binaries.metric, metric_env, dir.path())?;
        let mut replicas = Vec::with_capacity(models);
        for n in 1..=models {
            let name = if n == 1 {
                "model".to_owned()
            } else {
                format!("model {n}")
            };
            replicas.push(Service::spawn(
                name,
                &bench.binaries.model,
                bench.model_env(&queues, model_log),
                dir.path(),
            )?);
        }
        let timeout = Duration::from_secs(60);
        for service in std::iter::once(&mut metric).chain(replicas.iter_mut()) {
            service
                .wait_healthy(timeout, Duration::from_millis(10))
                .await?;
        }
        Ok(Self {
            metric,
            models: replicas,
            queues,
            logs,
            dir,
        })
    }

    /// Starts the producer with `COUNT` and `RATE` (and `rust_log` as RUST_LOG).
    fn start_features(
        &self,
        bench: &Bench,
        count: u64,
        rate: f64,
        rust_log: &str,
    ) -> anyhow::Result<Service> {
        spawn_features(bench, &self.queues, self.dir.path(), count, rate, rust_log)
    }

    /// Fails when metric or a model is no longer running.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for service in std::iter::once(&mut self.metric).chain(self.models.iter_mut()) {
            if !service.is_running() {
                bail!(
                    "{} stopped during the run\n{}",
                    service.name,
                    service.stderr_tail(20)
                );
            }
        }
        Ok(())
    }

    /// CPU time and peak RSS of metric and each model, now.
    fn usage(&self) -> anyhow::Result<Vec<ServiceUsage>> {
        std::iter::once(&self.metric)
            .chain(self.models.iter())
            .map(|service| {
                Ok(ServiceUsage {
                    service: service.name.clone(),
                    usage: service.usage_now()?,
                    source: RUNNING_SOURCE,
                })
            })
            .collect()
    }

    /// Stops the services and deletes the phase's queues.
    async fn finish(mut self, bench: &Bench) -> anyhow::Result<()> {
        self.metric.stop().await?;
        for model in &mut self.models {
            model.stop().await?;
        }
        bench.ledger.delete(&bench.url()?, &self.queues).await
    }
}

/// How the usage of a running service is read.
const RUNNING_SOURCE: &str = "/proc/<pid>/stat utime+stime, /proc/<pid>/status VmHWM";

/// Starts a producer on `queues` with `COUNT`, `RATE` and `rust_log` as RUST_LOG.
fn spawn_features(
    bench: &Bench,
    queues: &Queues,
    dir: &Path,
    count: u64,
    rate: f64,
    rust_log: &str,
) -> anyhow::Result<Service> {
    let env = bench
        .service_env(queues, rust_log)
        .set("COUNT", count)
        .set("RATE", rate)
        .set("CONFIRM_WINDOW", bench.cli.confirm_window)
        .set("ORDER", "random");
    Service::spawn("features", &bench.binaries.features, env, dir)
}

/// A full-speed run on the queues of `phase`: `COUNT=samples RATE=0` through `models` replicas
/// of the model. With `backlog`, the samples are all queued before metric and model start, and the
/// time counts from their start (the drain).
pub async fn throughput(
    bench: &Bench,
    phase: &str,
    samples: u64,
    models: usize,
    backlog: bool,
) -> anyhow::Result<ThroughputResult> {
    let mut consumers =
        Consumers::start(bench, phase, models, backlog.then_some(samples), "warn").await?;
    let csv = consumers.logs.join(METRIC_CSV);
    let bench_cpu_before = Usage::of_running(std::process::id())?.cpu_seconds;
    let broker_cpu_before = cpu_seconds(bench.broker_pid);
    let consumers_cpu_before: f64 = consumers.usage()?.iter().map(|u| u.usage.cpu_seconds).sum();

    let readers = DashboardReaders::start(consumers.metric.http_addr, bench.cli.dashboard_readers);
    let started = Instant::now();
    let mut features = if backlog {
        None
    } else {
        Some(consumers.start_features(bench, samples, 0.0, "warn")?)
    };
    let tail = watch_csv(&mut consumers, features.as_mut(), &csv, samples, false).await?;
    let seconds = tail.done_at.duration_since(started).as_secs_f64();
    drop(readers);

    let bench_cpu_seconds = Usage::of_running(std::process::id())?.cpu_seconds - bench_cpu_before;
    let broker_cpu_seconds = cpu_seconds(bench.broker_pid)
        .zip(broker_cpu_before)
        .map(|(after, before)| after - before);
    let mut usage = Vec::new();
    if let Some(features) = features.as_mut() {
        let exit = features.wait_exit(Duration::from_secs(30)).await?;
        ensure!(
            exit.status.success(),
            "features failed ({})\n{}",
            exit.status,
            features.stderr_tail(20)
        );
        usage.push(ServiceUsage {
            service: "features".to_owned(),
            usage: Usage {
                cpu_seconds: exit.usage.cpu_seconds,
                peak_rss_mib: features
                    .last_usage()
                    .map_or(f64::NAN, |usage| usage.peak_rss_mib),
            },
            source: "it exits by itself: CPU from wait4 rusage at exit (ru_utime+ru_stime); VmHWM of /proc/<pid>/status, last read (every 20 ms) before it exited",
        });
    }
    let consumers_usage = consumers.usage()?;
    let consumers_cpu_seconds = consumers_usage
        .iter()
        .map(|u| u.usage.cpu_seconds)
        .sum::<f64>()
        - consumers_cpu_before;
    usage.extend(consumers_usage);

    let first_message = latency::first_label_time(&consumers.logs.join(LABELS_LOG))?;
    let seconds_from_first_message = first_message
        .and_then(|first| tail.done_wall.duration_since(first).ok())
        .map(|d| d.as_secs_f64());
    consumers.finish(bench).await?;

    Ok(ThroughputResult {
        samples,
        models,
        seconds,
        samples_per_second: samples as f64 / seconds,
        seconds_from_first_message,
        samples_per_second_from_first_message: seconds_from_first_message
            .map(|s| samples as f64 / s),
        usage,
        consumers_cpu_seconds,
        bench_cpu_seconds,
        broker_cpu_seconds,
    })
}

/// A paced run on the queues of `phase`: `COUNT=samples RATE=rate`, the services' histograms and
/// every row's flush time.
pub async fn latency(
    bench: &Bench,
    phase: &str,
    samples: u64,
    rate: f64,
) -> anyhow::Result<LatencyResult> {
    let mut consumers = Consumers::start(bench, phase, 1, None, "warn").await?;
    let csv = consumers.logs.join(METRIC_CSV);
    let mut features = consumers.start_features(bench, samples, rate, "warn")?;
    let tail = watch_csv(&mut consumers, Some(&mut features), &csv, samples, true).await?;
    let exit = features.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        exit.status.success(),
        "features failed ({})\n{}",
        exit.status,
        features.stderr_tail(20)
    );

    let scrape = async |service: &Service| match service.scrape().await {
        Ok(metrics) => metrics,
        Err(err) => {
            progress!("{err:#}; no histogram figures from it");
            Metrics::default()
        }
    };
    let metric = scrape(&consumers.metric).await;
    let model = scrape(&consumers.models[0]).await;
    let queues = &consumers.queues;
    let summary = |metrics: &Metrics, name: &str, labels: &[(&str, &str)]| {
        metrics
            .histogram(name, labels)
            .and_then(latency::histogram_summary)
    };
    let end_to_end = summary(&metric, HISTOGRAM, &[]);
    let histogram_widest_bucket = metric
        .histogram(HISTOGRAM, &[])
        .and_then(|histogram| histogram.widest_bucket_ratio(0.001, 1.0));
    let model_confirm = summary(&model, CONFIRM_HISTOGRAM, &[("queue", &queues.y_pred)]);
    // Read before `finish`, which removes the folder of the logs.
    let handled = latency::metric_handle_times(&consumers.logs.join(LABELS_LOG))?;
    let mut flushed_ms = Vec::with_capacity(tail.rows.len());
    for (id, seen) in &tail.rows {
        if let Some([Some(y_true), Some(y_pred)]) = handled.get(id) {
            // Two clocks read microseconds apart by different processes: never below zero.
            let later = y_true.max(y_pred);
            flushed_ms.push(
                seen.duration_since(*later)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
            );
        }
    }
    let figures = [
        summary(&metric, RECEIVE_DELAY, &[("queue", &queues.y_true)]),
        summary(&metric, RECEIVE_DELAY, &[("queue", &queues.y_pred)]),
        end_to_end,
        latency::summarize(&mut flushed_ms),
        summary(&model, RECEIVE_DELAY, &[("queue", &queues.features)]),
    ];
    consumers.finish(bench).await?;
    if figures[0].is_none() {
        progress!("no {RECEIVE_DELAY} observations in the metric service; those hops show as –");
    }
    let stages: Vec<Stage> = STAGES
        .iter()
        .zip(figures)
        .filter_map(|(stage, summary)| {
            Some(Stage {
                stage,
                summary: summary?,
            })
        })
        .collect();
    let achieved_rate = match (tail.rows.first(), tail.rows.last()) {
        (Some((_, first)), Some((_, last))) => last
            .duration_since(*first)
            .map(|d| (tail.rows.len().saturating_sub(1)) as f64 / d.as_secs_f64())
            .unwrap_or(f64::NAN),
        _ => f64::NAN,
    };
    Ok(LatencyResult {
        samples,
        target_rate: rate,
        achieved_rate,
        per_sample: end_to_end,
        both_handled: end_to_end,
        histogram_widest_bucket,
        model_confirm,
        stages,
    })
}

/// What watching the CSV saw.
struct Tail {
    /// When the last expected row was seen.
    done_at: Instant,
    /// The same, by the wall clock.
    done_wall: SystemTime,
    /// With stamping: every row's id and the wall-clock time it was first seen.
    rows: Vec<(String, SystemTime)>,
}

/// Sets a flag when dropped, so the polling thread stops if its caller goes away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls `csv` on a thread of its own until it has `rows` data rows, checking meanwhile that the
/// services run and the producer did not fail.
async fn watch_csv(
    consumers: &mut Consumers,
    mut features: Option<&mut Service>,
    csv: &Path,
    rows: u64,
    stamp: bool,
) -> anyhow::Result<Tail> {
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let poller = tokio::task::spawn_blocking({
        let csv = csv.to_owned();
        let stop = Arc::clone(&stop.0);
        move || poll_csv(&csv, rows, stamp, &stop)
    });
    tokio::pin!(poller);
    let mut checks = 0u64;
    loop {
        tokio::select! {
            joined = &mut poller => {
                return joined.context("the CSV poller crashed")?;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                checks += 1;
                if checks.is_multiple_of(10) {
                    consumers.check_alive()?;
                }
                let Some(features) = features.as_deref_mut() else {
                    continue;
                };
                features.sample_usage();
                if !features.is_running() {
                    // It exits by itself once every sample is confirmed; only a failure matters.
                    if let Ok(exit) = features.wait_exit(Duration::ZERO).await
                        && !exit.status.success()
                    {
                        bail!("features failed ({})\n{}", exit.status, features.stderr_tail(20));
                    }
                }
            }
        }
    }
}

/// The polling loop: reads what was appended every [`POLL_INTERVAL`], counts (and with `stamp`,
/// stamps) the new rows, until there are `rows` of them.
fn poll_csv(csv: &Path, rows: u64, stamp: bool, stop: &AtomicBool) -> anyhow::Result<Tail> {
    let mut reader = CsvTail::new(csv);
    let mut stamped = Vec::with_capacity(if stamp { rows as usize } else { 0 });
    let mut seen = 0u64;
    let mut last_progress = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("stopped");
        }
        let new_rows = reader
            .read_new_rows()
            .with_context(|| format!("cannot read {}", csv.display()))?;
        if !new_rows.is_empty() {
            let now_wall = SystemTime::now();
            let now = Instant::now();
            seen += new_rows.len() as u64;
            last_progress = now;
            if stamp {
                stamped.extend(new_rows.into_iter().map(|id| (id, now_wall)));
            }
            if seen >= rows {
                return Ok(Tail {
                    done_at: now,
                    done_wall: now_wall,
                    rows: stamped,
                });
            }
        } else if last_progress.elapsed() > STALL_TIMEOUT {
            bail!(
                "{} has {seen} of {rows} rows and grew by none for {STALL_TIMEOUT:?}",
                csv.display()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Reads an append-only CSV incrementally: the ids of the complete rows added since the last read.
struct CsvTail {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
    header_skipped: bool,
}

impl CsvTail {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            pending: Vec::with_capacity(64 * 1024),
            header_skipped: false,
        }
    }

    /// The first field (the id) of every complete line appended since the last call, the header
    /// line excepted. A missing file has no rows yet.
    fn read_new_rows(&mut self) -> io::Result<Vec<String>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(err) => return Err(err),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        file.read_to_end(&mut self.pending)?;
        let Some(last_newline) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::new();
        for line in self.pending[..last_newline].split(|b| *b == b'\n') {
            if !self.header_skipped {
                self.header_skipped = true;
                continue;
            }
            let id = line.split(|b| *b == b',').next().unwrap_or_default();
            ids.push(String::from_utf8_lossy(id).into_owned());
        }
        self.pending.drain(..=last_newline);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn tail_returns_complete_rows_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        let mut tail = CsvTail::new(&path);
        assert!(tail.read_new_rows().unwrap().is_empty());
        let mut file = File::create(&path).unwrap();
        write!(file, "id,y_true\na,1\nb,").unwrap();
        assert_eq!(tail.read_new_rows().unwrap(), ["a"]);
        writeln!(file, "2").unwrap();
        assert_eq!(tail.read_new_rows().unwrap(), ["b"]);
        assert!(tail.read_new_rows().unwrap().is_empty());
    }
}
