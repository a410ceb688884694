//! The results: the machine, the figures, the targets of issues 5 and 12, as a markdown table and as JSON,
//! written to `--out` as `latest.{md,json}` and a timestamped copy of each.

use crate::Bench;
use crate::ceiling::CeilingResult;
use crate::cluster::ClusterResult;
use crate::curve::CurvePoint;
use crate::history::HistoryStart;
use crate::latency::Summary;
use crate::models::ModelsResult;
use crate::partitions::PartitionRun;
use crate::pipeline_run::ThroughputResult;
use crate::startup::StartupResult;
use anyhow::Context as _;
use clap::ValueEnum as _;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Pipeline throughput over ceiling throughput, at least.
mod sections;

pub(crate) const TARGET_RATIO: f64 = 0.9;
/// p99 end-to-end latency at half rate, at most, in milliseconds.
const TARGET_P99_MS: f64 = 20.0;
/// Pipeline p99 over bare-client p99 at each load up to 75 %, at most.
const TARGET_GAP: f64 = 1.5;

/// Column names of the per-hop stages, in the order of `pipeline_run::STAGES`.
const STAGE_HEADERS: [&str; 5] = [
    "send → metric has y_true (1 hop)",
    "send → metric has y_pred (2 hops, via model)",
    "send → metric has both",
    "metric has both → row seen (flush + 1 ms poll)",
    "send → model has features (hop 1 of y_pred)",
];
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
    /// Extra environment of the services (`--service-env`).
    pub service_env: Vec<String>,
    /// Extra environment of the model processes (`--model-env`).
    pub model_env: Vec<String>,
}

/// The machine's load average at one point of the run (`/proc/loadavg`): the benchmark's own
/// processes count in it, so a figure well above what the phase before explains means other work.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSample {
    /// When: `start`, `before <phase>`, `end`.
    pub at: String,
    /// Over 1, 5 and 15 minutes.
    pub load: [f64; 3],
}

impl LoadSample {
    /// Reads `/proc/loadavg`; `None` when it cannot be read.
    fn read(at: &str) -> Option<Self> {
        let text = std::fs::read_to_string("/proc/loadavg").ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<f64>);
        let mut next = || fields.next().and_then(Result::ok);
        Some(Self {
            at: at.to_owned(),
            load: [next()?, next()?, next()?],
        })
    }
}

/// Everything the benchmark measured; a phase not run is `None` (or empty).
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
    /// The bare client at full speed.
    pub ceiling: Option<CeilingResult>,
    /// The pipeline at full speed.
    pub pipeline: Option<ThroughputResult>,
    /// The latency–throughput curve.
    pub curve: Vec<CurvePoint>,
    /// 1, 2 and 3 model replicas at full speed.
    pub replicas: Vec<ThroughputResult>,
    /// Quorum queues on a private cluster.
    pub cluster: Option<ClusterResult>,
    /// `PARTITIONS` and metric instances, on one node and on a private cluster.
    pub partitions: Vec<PartitionRun>,
    /// Draining a backlog.
    pub backlog: Option<ThroughputResult>,
    /// The loss audit on (true) and off, alternating.
    pub audit: Vec<(bool, ThroughputResult)>,
    /// The metric service on a history of this many pairs.
    #[serde(skip)]
    pub history: Option<(u64, Vec<HistoryStart>)>,
    /// The model's start-up.
    pub startup: Option<StartupResult>,
    /// Users' own models: in-process predict times and the pipeline serving an .onnx.
    pub models: Option<ModelsResult>,
    /// The machine's load average at the start, before some phases and at the end.
    pub load: Vec<LoadSample>,
    /// Phases that failed, with their error.
    pub failures: Vec<String>,
    /// The targets of issues 5 and 12.
    pub targets: Vec<Target>,
}

impl Report {
    /// An empty report of a run of `bench`; the phases fill it in.
    pub fn new(bench: &Bench, machine: Machine, broker_version: String) -> Self {
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
            service_env: env_strings(&bench.cli.service_env),
            model_env: env_strings(&bench.cli.model_env),
        };
        Self {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            machine,
            broker_version,
            settings,
            ceiling: None,
            pipeline: None,
            curve: Vec::new(),
            replicas: Vec::new(),
            cluster: None,
            partitions: Vec::new(),
            backlog: None,
            audit: Vec::new(),
            history: None,
            startup: None,
            models: None,
            load: LoadSample::read("start").into_iter().collect(),
            failures: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Records the machine's load average now, labelled `at`.
    pub fn sample_load(&mut self, at: &str) {
        self.load.extend(LoadSample::read(at));
    }

    /// Judges the targets of what was measured.
    pub fn judge(&mut self) {
        let mut targets = Vec::new();
        if let (Some(ceiling), Some(pipeline)) = (&self.ceiling, &self.pipeline) {
            let ratio = pipeline.samples_per_second / ceiling.samples_per_second;
            targets.push(Target {
                name: "throughput",
                goal: format!("pipeline / ceiling ≥ {TARGET_RATIO}"),
                measured: format!("{ratio:.2}"),
                met: ratio >= TARGET_RATIO,
            });
        }
        if let Some(half) = self.curve.iter().find(|p| (p.fraction - 0.5).abs() < 1e-9) {
            let p99 = half.pipeline.per_sample.map(|s| s.p99_ms);
            targets.push(Target {
                name: "latency at 50 %",
                goal: format!(
                    "pipeline p99 ≤ {TARGET_P99_MS} ms (send → joined by the metric service)"
                ),
                measured: p99.map_or_else(|| "not measured".to_owned(), |v| format!("{v:.1} ms")),
                met: p99.is_some_and(|v| v <= TARGET_P99_MS),
            });
        }
        for point in self.curve.iter().filter(|p| p.fraction <= 0.75 + 1e-9) {
            let ratio = point
                .pipeline
                .both_handled
                .zip(point.bare.latency)
                .map(|(pipeline, bare)| pipeline.p99_ms / bare.p99_ms);
            targets.push(Target {
                name: "latency gap",
                goal: format!(
                    "at {:.0} %: pipeline p99 ≤ {TARGET_GAP} × bare client p99 (both: send → metric holds both messages)",
                    point.fraction * 100.0
                ),
                measured: ratio.map_or_else(|| "not measured".to_owned(), |r| format!("{r:.2} ×")),
                met: ratio.is_some_and(|r| r <= TARGET_GAP),
            });
        }
        if let (Some(ceiling), Some(served)) = (
            &self.ceiling,
            self.models
                .as_ref()
                .and_then(|m| m.served.as_ref())
                .map(|served| &served.run),
        ) {
            let ratio = served.samples_per_second / ceiling.samples_per_second;
            targets.push(Target {
                name: "throughput, own model (ONNX)",
                goal: format!(
                    "pipeline serving the .onnx of the models phase / ceiling ≥ {TARGET_RATIO}"
                ),
                measured: format!("{ratio:.2}"),
                met: ratio >= TARGET_RATIO,
            });
        }
        if let Some(pipeline) = &self.pipeline {
            let rss: Vec<String> = pipeline
                .usage
                .iter()
                .map(|u| format!("{} {:.1}", u.service, u.usage.peak_rss_mib))
                .collect();
            targets.push(Target {
                name: "memory",
                goal: format!("peak RSS ≤ {TARGET_RSS_MIB} MiB per service"),
                measured: format!("{} MiB", rss.join(", ")),
                met: pipeline
                    .usage
                    .iter()
                    .all(|u| u.usage.peak_rss_mib <= TARGET_RSS_MIB),
            });
        }
        if let Some(startup) = &self.startup {
            targets.push(Target {
                name: "start-up",
                goal: format!("model healthy ≤ {TARGET_STARTUP_MS} ms after spawn"),
                measured: format!("{:.0} ms (median)", startup.median_healthy_ms),
                met: startup.median_healthy_ms <= TARGET_STARTUP_MS,
            });
        }
        if let Some(widest) = self
            .curve
            .iter()
            .find_map(|p| p.pipeline.histogram_widest_bucket)
        {
            targets.push(Target {
                name: "histogram",
                goal: "`pipeline_end_to_end_latency_seconds` buckets ≤ ×1.5 wide from 1 ms to 1 s"
                    .to_owned(),
                measured: format!("widest ×{widest:.2}"),
                met: widest <= 1.5 + 1e-9,
            });
        }
        self.targets = targets;
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
        writeln!(
            md,
            "# Benchmark: the pipeline against the broker's limit (issues 5 and 12)\n"
        )?;
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
            "| settings | {} queues, PREFETCH {}, CONFIRM_WINDOW {}{} |",
            s.queue_type,
            s.prefetch,
            s.confirm_window,
            if s.service_env.is_empty() {
                String::new()
            } else {
                format!(", services also with {}", s.service_env.join(" "))
            }
        )?;
        if !s.model_env.is_empty() {
            writeln!(
                md,
                "| model processes also with | {} |",
                s.model_env.join(" ")
            )?;
        }
        let load: Vec<String> = self
            .load
            .iter()
            .map(|l| {
                format!(
                    "{} {:.2} / {:.2} / {:.2}",
                    l.at, l.load[0], l.load[1], l.load[2]
                )
            })
            .collect();
        writeln!(
            md,
            "| load average (1 / 5 / 15 min; the benchmark's own processes included) | {} |",
            load.join("; ")
        )?;
        writeln!(md, "| command | `{}` |\n", s.command)?;
        self.write_throughput(md)?;
        self.write_curve(md)?;
        self.write_scaling(md)?;
        self.write_partitions(md)?;
        self.write_usage(md)?;
        self.write_startup(md)?;
        self.write_models(md)?;
        if let Some((pairs, starts)) = &self.history {
            writeln!(md, "{}", crate::history::to_markdown(*pairs, starts))?;
        }
        for failure in &self.failures {
            writeln!(
                md,
                "**Failed:** {}\n",
                failure.lines().next().unwrap_or_default()
            )?;
        }
        if !self.targets.is_empty() {
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

/// Writes `text` (one final newline) through the services' atomic write: readers never see half a report.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let text = format!("{}\n", text.trim_end());
    Ok(pipeline::fs::write_atomic(path, text.as_bytes())?)
}

/// `NAME=VALUE` strings of settings.
fn env_strings(pairs: &[(String, String)]) -> Vec<String> {
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}

/// The last component of a path (`gbr.onnx`), or the whole text when it has none.
pub(crate) fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or(path)
}

/// `12345.6` as `12,346`.
pub(crate) fn thousands(value: f64) -> String {
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
