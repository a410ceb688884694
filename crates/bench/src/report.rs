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

    fn write_throughput(&self, md: &mut String) -> std::fmt::Result {
        if self.ceiling.is_none() && self.pipeline.is_none() {
            return Ok(());
        }
        let s = &self.settings;
        writeln!(md, "## Throughput\n")?;
        writeln!(
            md,
            "| run | samples | seconds | samples/s | measured from → to |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---|")?;
        if let Some(c) = &self.ceiling {
            writeln!(
                md,
                "| ceiling: bare lapin client | {} | {:.2} | {} | first publish → the ack covering the last y_true and y_pred. Same traffic as the pipeline (mean bodies: y_true {:.0} B, features {:.0} B, y_pred {:.0} B), durable queues from `Topology`, persistent, confirms in a window of {}, manual acks with `multiple` (the model role is the services' own consume loop: ack on confirm), prefetch {}; no model, no parsing, no files |",
                thousands(c.samples as f64),
                c.seconds,
                thousands(c.samples_per_second),
                c.mean_body_bytes[0],
                c.mean_body_bytes[1],
                c.mean_body_bytes[2],
                s.confirm_window,
                s.prefetch
            )?;
        }
        if let Some(p) = &self.pipeline {
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
        }
        if let (Some(c), Some(p)) = (&self.ceiling, &self.pipeline) {
            writeln!(
                md,
                "| **ratio pipeline / ceiling** | | | **{:.2}** | pipeline (spawn → last row) / ceiling |",
                p.samples_per_second / c.samples_per_second
            )?;
        }
        writeln!(md)
    }

    fn write_curve(&self, md: &mut String) -> std::fmt::Result {
        if self.curve.is_empty() {
            return Ok(());
        }
        writeln!(
            md,
            "## Latency against load: pipeline and bare client at the same rates\n"
        )?;
        writeln!(
            md,
            "Each point: the same number of samples at the same RATE (the producer's pacer in both), all guarantees on. **pipeline**: send (the producer's `sent_at_us` in the messages) → the metric service joined the sample (its second message arrived), read off its `pipeline_end_to_end_latency_seconds` histogram (quantiles interpolated inside buckets at most ×1.5 wide; max = the bucket's upper bound); the bare client's measure. The CSV flush after the join is in the per-hop table. **bare**: the bare client's send (after both messages went out) → its metric role received the second of the two, exact. Milliseconds; chart: `latency_curve.png`.\n"
        )?;
        writeln!(
            md,
            "| load | rate /s | samples | pipeline p50 | p99 | p99.9 | max | bare p50 | p99 | p99.9 | max | p99 pipeline / bare |"
        )?;
        writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        let cells = |summary: Option<Summary>| {
            summary.map_or_else(
                || "– | – | – | –".to_owned(),
                |x| {
                    format!(
                        "{:.1} | {:.1} | {:.1} | {:.1}",
                        x.p50_ms, x.p99_ms, x.p999_ms, x.max_ms
                    )
                },
            )
        };
        for p in &self.curve {
            let ratio = p.pipeline.both_handled.zip(p.bare.latency).map_or_else(
                || "–".to_owned(),
                |(a, b)| format!("{:.2}", a.p99_ms / b.p99_ms),
            );
            writeln!(
                md,
                "| {:.0} % | {} | {} | {} | {} | {ratio} |",
                p.fraction * 100.0,
                thousands(p.rate),
                thousands(p.pipeline.samples as f64),
                cells(p.pipeline.per_sample),
                cells(p.bare.latency),
            )?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "### Where the pipeline's time goes, per hop (p50 / p99 / p99.9 ms)\n"
        )?;
        writeln!(
            md,
            "| load | achieved /s | {} | model: publish → confirm of y_pred, p50 / p99 (its histogram) |",
            STAGE_HEADERS.join(" | ")
        )?;
        writeln!(
            md,
            "|---:|---:|{}---:|",
            "---:|".repeat(STAGE_HEADERS.len())
        )?;
        for p in &self.curve {
            // By name: a stage without figures (no model DEBUG log, say) is a dash, not a shift.
            let stages: Vec<String> = crate::pipeline_run::STAGES
                .iter()
                .map(|name| {
                    p.pipeline
                        .stages
                        .iter()
                        .find(|stage| stage.stage == *name)
                        .map_or_else(
                            || "–".to_owned(),
                            |stage| {
                                let x = stage.summary;
                                format!("{:.1} / {:.1} / {:.1}", x.p50_ms, x.p99_ms, x.p999_ms)
                            },
                        )
                })
                .collect();
            let confirm = p.pipeline.model_confirm.map_or_else(
                || "–".to_owned(),
                |c| format!("{:.1} / {:.1}", c.p50_ms, c.p99_ms),
            );
            writeln!(
                md,
                "| {:.0} % | {} | {} | {confirm} |",
                p.fraction * 100.0,
                thousands(p.pipeline.achieved_rate),
                stages.join(" | "),
            )?;
        }
        writeln!(md)
    }

    fn write_partitions(&self, md: &mut String) -> std::fmt::Result {
        if self.partitions.is_empty() {
            return Ok(());
        }
        writeln!(
            md,
            "## Partitions and metric instances
"
        )?;
        writeln!(
            md,
            "Full speed, {} model replicas; CPU µs per sample of each component (broker: all its nodes together), all on this machine.\n",
            crate::partitions::MODELS
        )?;
        writeln!(
            md,
            "| nodes | queues | PARTITIONS | metric instances | samples | samples/s | CPU µs/sample: features | models | metric | broker | total |"
        )?;
        writeln!(
            md,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for r in &self.partitions {
            let c = &r.cpu_us_per_sample;
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.nodes,
                r.queue_type,
                r.partitions,
                r.metric_instances,
                thousands(r.samples as f64),
                thousands(r.samples_per_second),
                c.features,
                c.model,
                c.metric,
                c.broker,
                c.total()
            )?;
        }
        writeln!(md)
    }

    fn write_scaling(&self, md: &mut String) -> std::fmt::Result {
        let mut runs: Vec<(String, &ThroughputResult)> = Vec::new();
        for r in &self.replicas {
            runs.push((format!("{} model replica(s), classic", r.models), r));
        }
        if let Some(cluster) = &self.cluster {
            runs.push((
                format!("quorum queues, {}-node private cluster", cluster.nodes),
                &cluster.throughput,
            ));
        }
        if let Some(b) = &self.backlog {
            runs.push((
                format!(
                    "backlog: {} samples queued, then model + metric started (drain)",
                    thousands(b.samples as f64)
                ),
                b,
            ));
        }
        if let Some(served) = self.models.as_ref().and_then(|m| m.served.as_ref()) {
            runs.push((
                format!(
                    "own model: the model serving {} (ONNX Runtime), classic",
                    file_name(&served.model)
                ),
                &served.run,
            ));
        }
        for (on, r) in &self.audit {
            runs.push((
                if *on {
                    "loss audit on (AUDIT_WINDOW_SECS=10, the default)".to_owned()
                } else {
                    "loss audit off (AUDIT_WINDOW_SECS=0, AUDIT=false)".to_owned()
                },
                r,
            ));
        }
        if runs.is_empty() {
            return Ok(());
        }
        writeln!(md, "## How cost grows with the work\n")?;
        writeln!(
            md,
            "CPU µs per sample: features (when it ran), model replicas together, metric, the broker (when local); peak RSS (VmHWM) per service.\n"
        )?;
        writeln!(
            md,
            "| run | samples | samples/s | CPU µs/sample: features | models | metric | broker | peak RSS MiB |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|")?;
        for (name, r) in runs {
            let per = |seconds: f64| format!("{:.0}", seconds / r.samples as f64 * 1e6);
            let sum = |prefix: &str| -> Option<f64> {
                let found: Vec<f64> = r
                    .usage
                    .iter()
                    .filter(|u| u.service.starts_with(prefix))
                    .map(|u| u.usage.cpu_seconds)
                    .collect();
                (!found.is_empty()).then(|| found.iter().sum())
            };
            let rss: Vec<String> = r
                .usage
                .iter()
                .map(|u| format!("{} {:.1}", u.service, u.usage.peak_rss_mib))
                .collect();
            writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                thousands(r.samples as f64),
                thousands(r.samples_per_second),
                sum("features").map_or_else(|| "–".to_owned(), per),
                sum("model").map_or_else(|| "–".to_owned(), per),
                sum("metric").map_or_else(|| "–".to_owned(), per),
                r.broker_cpu_seconds.map_or_else(|| "–".to_owned(), per),
                rss.join(", ")
            )?;
        }
        writeln!(md)?;
        if let Some(cluster) = &self.cluster {
            let classic = self
                .curve
                .iter()
                .find(|p| (p.fraction - 0.5).abs() < 1e-9)
                .and_then(|p| p.pipeline.per_sample);
            let quorum = cluster.latency.per_sample;
            let cell = |s: Option<Summary>| {
                s.map_or_else(
                    || "– | –".to_owned(),
                    |s| format!("{:.1} | {:.1}", s.p50_ms, s.p99_ms),
                )
            };
            writeln!(
                md,
                "Latency at half of each one's maximum (send → joined, ms):\n"
            )?;
            writeln!(md, "| queues | rate /s | p50 | p99 |")?;
            writeln!(md, "|---|---:|---:|---:|")?;
            if let Some(p) = self.curve.iter().find(|p| (p.fraction - 0.5).abs() < 1e-9) {
                writeln!(
                    md,
                    "| classic, one node (the curve's 50 % point) | {} | {} |",
                    thousands(p.rate),
                    cell(classic)
                )?;
            }
            writeln!(
                md,
                "| quorum, {}-node private cluster | {} | {} |\n",
                cluster.nodes,
                thousands(cluster.latency.target_rate),
                cell(quorum)
            )?;
        }
        Ok(())
    }

    fn write_usage(&self, md: &mut String) -> std::fmt::Result {
        let (Some(c), Some(p)) = (&self.ceiling, &self.pipeline) else {
            return Ok(());
        };
        writeln!(md, "## CPU and memory at full speed\n")?;
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
                &u.service,
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
        writeln!(md)
    }

    fn write_startup(&self, md: &mut String) -> std::fmt::Result {
        let Some(st) = &self.startup else {
            return Ok(());
        };
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
        )
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
