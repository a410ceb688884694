//! The pipeline runs: the release binaries of the three services on fresh queues and a fresh log
//! folder, timed by watching `metric_log.csv` grow.
//!
//! - [`throughput`]: `features` with `COUNT=N RATE=0`; from just before `features` is spawned to
//!   the moment the CSV is seen with N rows, plus CPU time and peak RSS of each service.
//! - [`latency`]: the same paced at a given rate; every new CSV row is stamped when it is seen
//!   (the file is polled every millisecond) and matched by id with its send time in the
//!   producer's TRACE log. The metric service's own histogram is read too, as a cross-check.

use crate::latency::{self, HISTOGRAM, Summary};
use crate::process::{Service, Usage, cpu_seconds, http_get};
use crate::{Bench, progress};
use anyhow::{Context as _, bail, ensure};
use pipeline::config::QueueNames;
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

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
    /// Per sample: row seen in the CSV minus the producer's `published` log time; `None` when the
    /// producer's log has no send times.
    pub per_sample: Option<Summary>,
    /// Rows whose id had no send time in the producer's log.
    pub unmatched_rows: u64,
    /// Per sample: send to the metric service having handled both messages (its `labels_log.txt`
    /// stamps), the measure the bare client takes of itself.
    pub both_handled: Option<Summary>,
    /// From the metric service's `pipeline_end_to_end_latency_seconds` histogram.
    pub histogram: Option<Summary>,
    /// The histogram's widest bucket between 1 ms and 1 s (upper bound / lower bound).
    pub histogram_widest_bucket: Option<f64>,
    /// The model's publish → broker confirm of `y_pred` (its `pipeline_publish_confirm_seconds`):
    /// how long it waits before it may ack the `features` message.
    pub model_confirm: Option<Summary>,
    /// Where the time goes, per sample, from the metric service's `labels_log.txt`.
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
/// The model's histogram of publish → confirm times.
const CONFIRM_HISTOGRAM: &str = "pipeline_publish_confirm_seconds";

pub(crate) const STAGES: [&str; 6] = [
    "send → metric handled y_true (producer → broker → metric)",
    "send → metric handled y_pred (producer → broker → model → broker → metric)",
    "send → metric handled both (the bare client's measure)",
    "metric handled the later of the two → row seen in the CSV (flush, then the 1 ms poll)",
    "send → model predicted (producer → broker → model, its DEBUG log)",
    "model predicted → metric handled y_pred (model → broker → metric)",
];

/// The stage measured the way the bare client measures its latency.
const BOTH_HANDLED: usize = 2;

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
    queues: QueueNames,
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
        let mut metric_env = bench.service_env(&queues, "warn");
        metric_env.push(("LOG_DIR".into(), logs.display().to_string()));
        let mut metric = Service::spawn("metric", &bench.binaries.metric, &metric_env, dir.path())?;
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
                &bench.service_env(&queues, model_log),
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
    queues: &QueueNames,
    dir: &Path,
    count: u64,
    rate: f64,
    rust_log: &str,
) -> anyhow::Result<Service> {
    let mut env = bench.service_env(queues, rust_log);
    env.push(("COUNT".into(), count.to_string()));
    env.push(("RATE".into(), rate.to_string()));
    env.push((
        "CONFIRM_WINDOW".into(),
        bench.cli.confirm_window.to_string(),
    ));
    env.push(("ORDER".into(), "random".into()));
    Service::spawn("features", &bench.binaries.features, &env, dir)
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

/// A paced run on the queues of `phase`: `COUNT=samples RATE=rate`, every row's latency.
pub async fn latency(
    bench: &Bench,
    phase: &str,
    samples: u64,
    rate: f64,
) -> anyhow::Result<LatencyResult> {
    // The model's DEBUG `predicted` lines split the path through it into its two hops.
    let mut consumers = Consumers::start(bench, phase, 1, None, "warn,model=debug").await?;
    let csv = consumers.logs.join(METRIC_CSV);
    let mut features = consumers.start_features(bench, samples, rate, "warn,features=trace")?;
    let tail = watch_csv(&mut consumers, Some(&mut features), &csv, samples, true).await?;
    let exit = features.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        exit.status.success(),
        "features failed ({})\n{}",
        exit.status,
        features.stderr_tail(20)
    );

    let exposition = match http_get(consumers.metric.http_addr, "/metrics").await {
        Ok((200, body)) => Some(body),
        Ok((status, _)) => {
            progress!("metric's /metrics answered {status}; no histogram figures");
            None
        }
        Err(err) => {
            progress!("cannot read metric's /metrics ({err:#}); no histogram figures");
            None
        }
    };
    let histogram = exposition
        .as_deref()
        .and_then(|text| latency::histogram_summary(text, HISTOGRAM));
    let histogram_widest_bucket = exposition
        .as_deref()
        .and_then(|text| latency::widest_bucket_ratio(text, HISTOGRAM, 0.001, 1.0));
    let model_confirm = match http_get(consumers.models[0].http_addr, "/metrics").await {
        Ok((200, text)) => latency::labelled_histogram_summary(
            &text,
            CONFIRM_HISTOGRAM,
            &format!("queue=\"{}\"", consumers.queues.y_pred_queue),
        ),
        _ => None,
    };
    // Read before `finish`, which removes the folder of the logs.
    let sent = latency::producer_send_times(&features.stderr_path)?;
    let handled = latency::metric_handle_times(&consumers.logs.join(LABELS_LOG))?;
    let mut predicted = HashMap::new();
    for model in &consumers.models {
        predicted.extend(latency::model_predict_times(&model.stderr_path)?);
    }
    consumers.finish(bench).await?;

    // Milliseconds from `from` to `to`; an interval that comes out negative (the two clocks are
    // read by different processes, microseconds apart) counts as zero.
    let ms = |to: &SystemTime, from: &SystemTime| {
        to.duration_since(*from).unwrap_or_default().as_secs_f64() * 1e3
    };
    let mut latencies_ms = Vec::with_capacity(tail.rows.len());
    let mut stages: [Vec<f64>; 6] = Default::default();
    let mut unmatched_rows = 0u64;
    for (id, seen) in &tail.rows {
        let Some(sent_at) = sent.get(id) else {
            unmatched_rows += 1;
            continue;
        };
        latencies_ms.push(ms(seen, sent_at));
        if let Some([Some(y_true), Some(y_pred)]) = handled.get(id) {
            let later = y_true.max(y_pred);
            stages[0].push(ms(y_true, sent_at));
            stages[1].push(ms(y_pred, sent_at));
            stages[2].push(ms(later, sent_at));
            stages[3].push(ms(seen, later));
            if let Some(at_model) = predicted.get(id) {
                stages[4].push(ms(at_model, sent_at));
                stages[5].push(ms(y_pred, at_model));
            }
        }
    }
    let stages: Vec<Stage> = STAGES
        .iter()
        .zip(stages.iter_mut())
        .filter_map(|(stage, values)| {
            latency::summarize(values).map(|summary| Stage { stage, summary })
        })
        .collect();
    if sent.is_empty() {
        progress!(
            "no `published` events in the producer's TRACE log; per-sample latency unavailable"
        );
    }
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
        both_handled: stages
            .iter()
            .find(|stage| stage.stage == STAGES[BOTH_HANDLED])
            .map(|stage| stage.summary),
        per_sample: latency::summarize(&mut latencies_ms),
        unmatched_rows,
        histogram,
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
