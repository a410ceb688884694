//! The results: the machine, the figures, the targets of issue 5, as a markdown table and as JSON,
//! written to `--out` as `latest.{md,json}` and a timestamped copy of each.

use crate::Bench;
use crate::ceiling::CeilingResult;
use crate::latency::Summary;
use crate::pipeline_run::{LatencyResult, ThroughputResult};
use crate::startup::StartupResult;
use anyhow::Context as _;
use clap::ValueEnum as _;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Pipeline throughput over ceiling throughput, at least.
const TARGET_RATIO: f64 = 0.9;
/// p99 end-to-end latency at half rate, at most, in milliseconds.
const TARGET_P99_MS: f64 = 20.0;
/// Peak RSS of each service, at most, in MiB.
const TARGET_RSS_MIB: f64 = 20.0;
/// Model start-up to healthy, at most, in milliseconds.
const TARGET_STARTUP_MS: f64 = 100.0;

/// How the broker's CPU time is read.
const BROKER_SOURCE: &str = "/proc/<pid>/stat of the oldest local beam.smp, before and after the run (– when the broker is not local)";

/// The machine the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available to the process.
    pub cpus: usize,
    /// `model name` of the first CPU in /proc/cpuinfo.
    pub cpu_model: String,
    /// `MemTotal` of /proc/meminfo, in GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads /proc; what cannot be read shows as "unknown" (or 0).
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, name)| name.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned()),
        }
    }
}

/// One target of issue 5.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What it is about.
    pub name: &'static str,
    /// The goal, in words.
    pub goal: String,
    /// What was measured, in words.
    pub measured: String,
    /// Whether the goal is met.
    pub met: bool,
}

/// Settings the run used.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The command line.
    pub command: String,
    /// The broker URL, password hidden.
    pub amqp_url: String,
    /// `classic` or `quorum`.
    pub queue_type: String,
    /// PREFETCH of the consumers.
    pub prefetch: u16,
    /// CONFIRM_WINDOW of the producer.
    pub confirm_window: u64,
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// Where it ran.
    pub machine: Machine,
    /// Product and version of the broker.
    pub broker_version: String,
    /// How it ran.
    pub settings: Settings,
    /// The bare client.
    pub ceiling: CeilingResult,
    /// The pipeline at full speed.
    pub pipeline: ThroughputResult,
    /// `pipeline.samples_per_second / ceiling.samples_per_second`.
    pub ratio: f64,
    /// The pipeline at half rate.
    pub latency: LatencyResult,
    /// The model's start-up.
    pub startup: StartupResult,
    /// The targets of issue 5.
    pub targets: Vec<Target>,
}

impl Report {
    /// Puts the results together and judges the targets.
    pub fn new(
        bench: &Bench,
        machine: Machine,
        broker_version: String,
        startup: StartupResult,
        ceiling: CeilingResult,
        pipeline: ThroughputResult,
        latency: LatencyResult,
    ) -> Self {
        let ratio = pipeline.samples_per_second / ceiling.samples_per_second;
        let settings = Settings {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            amqp_url: pipeline::broker::connection::redact(&bench.cli.broker.amqp_url),
            queue_type: bench
                .cli
                .broker
                .queue_type
                .to_possible_value()
                .map_or_else(|| "?".to_owned(), |v| v.get_name().to_owned()),
            prefetch: bench.cli.consume.prefetch,
            confirm_window: bench.cli.confirm_window,
        };
        let mut report = Self {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            machine,
            broker_version,
            settings,
            ceiling,
            pipeline,
            ratio,
            latency,
            startup,
            targets: Vec::new(),
        };
        report.targets = report.judge();
        report
    }

    fn judge(&self) -> Vec<Target> {
        let mut targets = vec![Target {
            name: "throughput",
            goal: format!("pipeline / ceiling ≥ {TARGET_RATIO}"),
            measured: format!("{:.2}", self.ratio),
            met: self.ratio >= TARGET_RATIO,
        }];
        let (p99, method) = match (&self.latency.per_sample, &self.latency.histogram) {
            (Some(exact), _) => (Some(exact.p99_ms), "per sample"),
            (None, Some(histogram)) => (Some(histogram.p99_ms), "histogram"),
            (None, None) => (None, "not measured"),
        };
        targets.push(Target {
            name: "latency",
            goal: format!("p99 ≤ {TARGET_P99_MS} ms at half rate"),
            measured: p99.map_or_else(
                || "not measured".to_owned(),
                |p99| format!("{p99:.1} ms ({method})"),
            ),
            met: p99.is_some_and(|p99| p99 <= TARGET_P99_MS),
        });
        let rss: Vec<String> = self
            .pipeline
            .usage
            .iter()
            .map(|u| format!("{} {:.1}", u.service, u.usage.peak_rss_mib))
            .collect();
        targets.push(Target {
            name: "memory",
            goal: format!("peak RSS ≤ {TARGET_RSS_MIB} MiB per service"),
            measured: format!("{} MiB", rss.join(", ")),
            met: self
                .pipeline
                .usage
                .iter()
                .all(|u| u.usage.peak_rss_mib <= TARGET_RSS_MIB),
        });
        targets.push(Target {
            name: "start-up",
            goal: format!("model healthy ≤ {TARGET_STARTUP_MS} ms after spawn"),
            measured: format!("{:.0} ms (median)", self.startup.median_healthy_ms),
            met: self.startup.median_healthy_ms <= TARGET_STARTUP_MS,
        });
        targets
    }

    /// The report as markdown.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut md);
        md
    }

    fn write_markdown(&self, md: &mut String) -> std::fmt::Result {
        let m = &self.machine;
        let s = &self.settings;
        writeln!(md, "# Benchmark: as fast as the broker allows (issue 5)\n")?;
        writeln!(md, "| | |\n|---|---|")?;
        writeln!(md, "| date | {} |", self.date)?;
        writeln!(
            md,
            "| machine | {} CPUs ({}), {:.1} GiB RAM, Linux {} |",
            m.cpus, m.cpu_model, m.memory_gib, m.kernel
        )?;
        writeln!(md, "| broker | {} at {} |", self.broker_version, s.amqp_url)?;
        writeln!(
            md,
            "| settings | {} queues, PREFETCH {}, CONFIRM_WINDOW {} |",
            s.queue_type, s.prefetch, s.confirm_window
        )?;
        writeln!(md, "| command | `{}` |\n", s.command)?;

        let c = &self.ceiling;
        let p = &self.pipeline;
        writeln!(md, "## Throughput\n")?;
        writeln!(
            md,
            "| run | samples | seconds | samples/s | measured from → to |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---|")?;
        writeln!(
            md,
            "| ceiling: bare lapin client | {} | {:.2} | {} | first publish → the ack covering the last y_true and y_pred. Same traffic as the pipeline (mean bodies: y_true {:.0} B, features {:.0} B, y_pred {:.0} B), durable queues from `Topology`, persistent, confirms in a window of {}, manual acks with `multiple`, prefetch {}; no model, no parsing, no files |",
            thousands(c.samples as f64),
            c.seconds,
            thousands(c.samples_per_second),
            c.mean_body_bytes[0],
            c.mean_body_bytes[1],
            c.mean_body_bytes[2],
            s.confirm_window,
            s.prefetch
        )?;
        writeln!(
            md,
            "| pipeline: features → model → metric | {} | {:.2} | {} | just before spawning `features` (COUNT={}, RATE=0) → the last row seen in metric_log.csv (polled every 1 ms); includes the producer's start-up |",
            thousands(p.samples as f64),
            p.seconds,
            thousands(p.samples_per_second),
            p.samples
        )?;
        if let (Some(seconds), Some(rate)) = (
            p.seconds_from_first_message,
            p.samples_per_second_from_first_message,
        ) {
            writeln!(
                md,
                "| pipeline, without the producer's start-up | {} | {seconds:.2} | {} | first line of labels_log.txt (metric handled the first y_true) → the last row |",
                thousands(p.samples as f64),
                thousands(rate)
            )?;
        }
        writeln!(
            md,
            "| **ratio pipeline / ceiling** | | | **{:.2}** | pipeline (spawn → last row) / ceiling |\n",
            self.ratio
        )?;

        let l = &self.latency;
        writeln!(
            md,
            "## Latency at half the pipeline's rate ({} samples, RATE={:.0}, achieved {:.0}/s)\n",
            thousands(l.samples as f64),
            l.target_rate,
            l.achieved_rate
        )?;
        writeln!(
            md,
            "| method | samples | p50 ms | p99 ms | max ms | mean ms |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
        let row = |md: &mut String, method: String, summary: &Option<Summary>| match summary {
            Some(x) => writeln!(
                md,
                "| {method} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                thousands(x.samples as f64),
                x.p50_ms,
                x.p99_ms,
                x.max_ms,
                x.mean_ms
            ),
            None => writeln!(md, "| {method} | – | – | – | – | – |"),
        };
        row(
            md,
            format!(
                "per sample: row seen in metric_log.csv (1 ms poll, so up to ~1 ms late) − the producer's `published` TRACE log time{}",
                if l.unmatched_rows > 0 {
                    format!(" ({} rows without a send time left out)", l.unmatched_rows)
                } else {
                    String::new()
                }
            ),
            &l.per_sample,
        )?;
        for stage in &l.stages {
            row(md, format!("stage: {}", stage.stage), &Some(stage.summary))?;
        }
        row(
            md,
            "metric's histogram `pipeline_end_to_end_latency_seconds` (sent_at_us → pair made; p50/p99 interpolated in buckets ×2 wide, max = upper bound of the top bucket)".to_owned(),
            &l.histogram,
        )?;
        writeln!(md)?;

        writeln!(md, "## CPU and memory\n")?;
        writeln!(
            md,
            "| run | process | CPU s | CPU µs / sample | cores busy (CPU s / run s) | peak RSS MiB | source |"
        )?;
        writeln!(md, "|---|---|---:|---:|---:|---:|---|")?;
        let cpu_row = |md: &mut String,
                       run: &str,
                       process: &str,
                       cpu: Option<f64>,
                       (samples, seconds): (u64, f64),
                       rss: Option<f64>,
                       source: &str| {
            match cpu {
                Some(cpu) => writeln!(
                    md,
                    "| {run} | {process} | {cpu:.2} | {:.1} | {:.2} | {} | {source} |",
                    cpu / samples as f64 * 1e6,
                    cpu / seconds,
                    rss.map_or_else(|| "–".to_owned(), |rss| format!("{rss:.1}")),
                ),
                None => writeln!(md, "| {run} | {process} | – | – | – | – | {source} |"),
            }
        };
        let ceiling_run = (c.samples, c.seconds);
        let pipeline_run = (p.samples, p.seconds);
        cpu_row(
            md,
            "ceiling",
            "bare client (bench)",
            Some(c.client_cpu_seconds),
            ceiling_run,
            None,
            "/proc/self/stat over the run",
        )?;
        cpu_row(
            md,
            "ceiling",
            "broker (beam.smp)",
            c.broker_cpu_seconds,
            ceiling_run,
            None,
            BROKER_SOURCE,
        )?;
        for u in &p.usage {
            cpu_row(
                md,
                "pipeline",
                u.service,
                Some(u.usage.cpu_seconds),
                pipeline_run,
                Some(u.usage.peak_rss_mib),
                u.source,
            )?;
        }
        cpu_row(
            md,
            "pipeline",
            "broker (beam.smp)",
            p.broker_cpu_seconds,
            pipeline_run,
            None,
            BROKER_SOURCE,
        )?;
        cpu_row(
            md,
            "pipeline",
            "bench (polling the CSV)",
            Some(p.bench_cpu_seconds),
            pipeline_run,
            None,
            "/proc/self/stat over the run",
        )?;
        writeln!(md)?;

        let st = &self.startup;
        let runs: Vec<String> = st
            .runs
            .iter()
            .map(|r| format!("{:.0}", r.healthy_ms))
            .collect();
        let fitted: Vec<String> = st
            .runs
            .iter()
            .map(|r| {
                r.fitted_ms
                    .map_or_else(|| "–".to_owned(), |f| format!("{f:.0}"))
            })
            .collect();
        writeln!(
            md,
            "## Model start-up (median of {} starts)\n",
            st.runs.len()
        )?;
        writeln!(md, "| from spawn to | median ms | each start, ms |")?;
        writeln!(md, "|---|---:|---|")?;
        writeln!(
            md,
            "| `/healthz` 200 (fitted, connected, consuming; polled every 1 ms) | {:.1} | {} |",
            st.median_healthy_ms,
            runs.join(", ")
        )?;
        writeln!(
            md,
            "| log line \"fitted linear regression\" | {} | {} |\n",
            st.median_fitted_ms
                .map_or_else(|| "–".to_owned(), |f| format!("{f:.1}")),
            fitted.join(", ")
        )?;

        writeln!(md, "## Targets\n")?;
        writeln!(md, "| target | goal | measured | |")?;
        writeln!(md, "|---|---|---|---|")?;
        for t in &self.targets {
            writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.name,
                t.goal,
                t.measured,
                if t.met { "met" } else { "**not met**" }
            )?;
        }
        Ok(())
    }

    /// Writes `latest.md`, `latest.json` and timestamped copies to `out`; returns the paths.
    pub fn write(&self, out: &Path, markdown: &str) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let json = serde_json::to_string_pretty(self).context("cannot encode the report")?;
        let stamp = self.date.replace(':', "-");
        let mut written = Vec::new();
        for (name, text) in [
            ("latest.md".to_owned(), markdown),
            ("latest.json".to_owned(), json.as_str()),
            (format!("{stamp}.md"), markdown),
            (format!("{stamp}.json"), json.as_str()),
        ] {
            let path = out.join(name);
            write_atomically(&path, text)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Writes `text` to `<path>.tmp`, then renames it over `path`.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{}\n", text.trim_end()))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `12345.6` as `12,346`.
fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "–".to_owned();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(100_000.0), "100,000");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234.5), "1,234");
        assert_eq!(thousands(f64::NAN), "–");
    }
}
