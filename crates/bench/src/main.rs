//! `bench`: the benchmark of issues 5 and 12, "As fast as the broker allows" and "Latency as short
//! as the broker's own, and how cost grows with the work".
//!
//! Against the broker at `AMQP_URL`, on queues of its own (`bench.<random>.<phase>.*`), it measures
//! (each a `--phases` name):
//!
//! 1. `startup`: the model's start-up time (spawn to `/healthz` 200),
//! 2. `ceiling`: a bare lapin client doing exactly the pipeline's traffic, nothing else,
//! 3. `throughput`: the release binaries `features`, `model` and `metric` at full speed, with the
//!    CPU time and peak RSS of each service,
//! 4. `curve`: the latency of every sample at 10, 25, 50, 75 and 90 % of that throughput, through
//!    the pipeline and through the bare client at the same rates (a table and `latency_curve.png`),
//! 5. `replicas`: 1, 2 and 3 model replicas at full speed, samples/s and CPU per sample,
//! 6. `cluster`: quorum queues on a three-node cluster of private nodes,
//! 7. `partitions`: `PARTITIONS` 1, 2, 4, 8 with 1, 2, 4 metric instances on a private three-node
//!    cluster (quorum and classic), and 1 against 4 on one node (partitions.rs),
//! 8. `backlog`: `--backlog-samples` queued before model and metric start: drain rate, peak RSS,
//! 9. `history`: the metric service's start-up and RSS on a long history (history.rs),
//! 10. `audit`: the loss audit's cost, the pipeline at full speed with it on and off, twice each,
//! 11. `models`: users' own models (issue 26): each fixture model's `ServedModel::predict` time
//!     in-process, and the pipeline at full speed serving the GBR `.onnx` (models.rs),
//!
//! then prints a markdown table and writes it, with a JSON twin, to `--out`. Queues and child
//! processes are cleaned up on success, on error, on panic and on SIGINT/SIGTERM.
//!
//! Run it from the repository root: `cargo run --release -p bench`. With `--history` it measures
//! only the metric service's start-up on a long history instead (see `history.rs`).

mod broker;
mod ceiling;
mod chart;
mod cluster;
mod curve;
mod history;
mod latency;
mod models;
mod partitions;
mod pipeline_run;
mod process;
mod report;
mod startup;

use anyhow::Context as _;
use broker::QueueLedger;
use clap::{Parser, ValueEnum as _};
use pipeline::config::{BrokerConfig, ConsumeConfig};
use pipeline::dataset::Dataset;
use process::Binaries;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use testkit::{Env, Queues};
use tokio::signal::unix::{SignalKind, signal};

/// Command line of the benchmark.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench",
    version,
    about = "Measures the pipeline against the broker's ceiling (issue 5)"
)]
pub struct Cli {
    /// Broker settings, the same flags and variables as the services' (AMQP_URL, QUEUE_TYPE, ...).
    #[command(flatten)]
    pub broker: BrokerConfig,

    /// Consumer settings, the same as the services'; PREFETCH is used by the ceiling too.
    #[command(flatten)]
    pub consume: ConsumeConfig,

    /// Samples of the full-speed pipeline run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,

    /// Samples of the ceiling run; the same as --samples when not set.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ceiling_samples: Option<u64>,

    /// What to measure, comma-separated (all by default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Phase::all())]
    pub phases: Vec<Phase>,

    /// Seconds of traffic at each point of the latency curve (and the cluster's latency run).
    #[arg(long, default_value_t = 10.0)]
    pub curve_seconds: f64,

    /// Samples at each point of the latency curve, at least.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub curve_min_samples: u64,

    /// Points of the latency curve, as fractions of the pipeline's maximum rate.
    #[arg(long, value_delimiter = ',', default_values_t = curve::FRACTIONS)]
    pub curve_at: Vec<f64>,

    /// The pipeline's maximum rate for the curve, when the throughput phase is not run.
    #[arg(long)]
    pub max_rate: Option<f64>,

    /// Samples of each run of the replicas phase.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub replica_samples: u64,

    /// Samples of the cluster's full-speed run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub cluster_samples: u64,

    /// Samples of each run of the partitions phase.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub partition_samples: u64,

    /// Extra environment of every service process, `NAME=VALUE`, repeatable (for trying a
    /// setting, e.g. `--service-env TOKIO_WORKER_THREADS=1`).
    #[arg(long, value_parser = parse_env_pair)]
    pub service_env: Vec<(String, String)>,

    /// Extra environment of every model process only, `NAME=VALUE`, repeatable (e.g.
    /// `--model-env MODEL_PATH=/abs/model.onnx --model-env ORT_DYLIB_PATH=...`).
    #[arg(long, value_parser = parse_env_pair)]
    pub model_env: Vec<(String, String)>,

    /// ONNX Runtime's shared library, for the models phase: opened in-process and given to the
    /// model processes that serve an .onnx (`export ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)`).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,

    /// The JSON linear artifact the models phase times; the fit on --data-path when it does not
    /// exist.
    #[arg(long, default_value = "models/model.json")]
    pub linear_model: PathBuf,

    /// Folder of the .onnx fixtures the models phase times (every one the service accepts).
    #[arg(long, default_value = "tests/models/fixtures")]
    pub model_fixtures: PathBuf,

    /// The .onnx the models phase serves through the pipeline at full speed (--samples of them).
    #[arg(long, default_value = "tests/models/fixtures/gbr.onnx")]
    pub onnx_model: PathBuf,

    /// Timed `predict` calls per model in the models phase (cycling over the data set's rows).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub model_calls: u64,

    /// Dashboard readers during the full-speed runs: each loads the metric service's page and its
    /// assets once, then polls `/api/dashboard` every second, as the page in a browser does.
    #[arg(long, default_value_t = 1)]
    pub dashboard_readers: usize,

    /// Samples queued before model and metric start, in the backlog phase.
    #[arg(long, default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub backlog_samples: u64,

    /// Times the model is started to measure its start-up (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub startup_runs: u32,

    /// Samples published but not yet confirmed, at most: the producer's CONFIRM_WINDOW, used by
    /// the ceiling's publisher too.
    #[arg(long, env = "CONFIRM_WINDOW", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub confirm_window: u64,

    /// Folder of the results (latest.md, latest.json and timestamped copies).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,

    /// Folder of the release binaries features, model and metric (built when missing).
    #[arg(long, default_value = "target/release")]
    pub release_dir: PathBuf,

    /// The data set the producer streams and the model is fitted on.
    #[arg(long, default_value = "data/diabetes.csv")]
    pub data_path: PathBuf,

    /// Only measure the metric service's start-up on a long history (the same as
    /// `--phases history`).
    #[arg(long)]
    pub history: bool,

    /// Pairs in the history of --history.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub history_pairs: u64,

    /// Starts of the metric service on the history (the first without a checkpoint).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub history_starts: u32,
}

impl Cli {
    /// Samples of the ceiling run.
    pub fn ceiling_samples(&self) -> u64 {
        self.ceiling_samples.unwrap_or(self.samples)
    }

    /// Whether `phase` is to be measured.
    pub fn runs(&self, phase: Phase) -> bool {
        if self.history {
            phase == Phase::History
        } else {
            self.phases.contains(&phase)
        }
    }
}

/// `NAME=VALUE` as a pair.
fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

/// A part of the benchmark.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The model's start-up.
    Startup,
    /// The bare client at full speed.
    Ceiling,
    /// The pipeline at full speed.
    Throughput,
    /// The latency–throughput curve, pipeline and bare client.
    Curve,
    /// 1, 2 and 3 model replicas.
    Replicas,
    /// Quorum queues on a private three-node cluster.
    Cluster,
    /// PARTITIONS 1, 2, 4, 8 and 1, 2, 4 metric instances on a private cluster, and 1 vs 4 on one
    /// node.
    Partitions,
    /// Draining a backlog.
    Backlog,
    /// The loss audit's cost: the pipeline at full speed with it on and off, twice each.
    Audit,
    /// Users' own models: `predict` per fixture in-process, and the pipeline serving the GBR .onnx.
    Models,
    /// The metric service on a long history.
    History,
}

impl Phase {
    fn all() -> Vec<Self> {
        use clap::ValueEnum as _;
        Self::value_variants().to_vec()
    }
}

/// What every phase needs: the settings, the binaries, the data, and where to record the queues
/// it declares so they are deleted whatever happens.
#[derive(Clone)]
pub struct Bench {
    /// The command line.
    pub cli: Cli,
    /// The service binaries.
    pub binaries: Binaries,
    /// Absolute path of the data set (the services run with it as DATA_PATH).
    pub data_path: PathBuf,
    /// The data set, loaded once.
    pub data: Arc<Dataset>,
    /// Random part of this run's queue names.
    pub run_id: String,
    /// Queues to delete at the end.
    pub ledger: QueueLedger,
    /// The broker's process, when it runs on this machine (for its CPU time).
    pub broker_pid: Option<u32>,
}

impl Bench {
    /// The AMQP URL the benchmark itself connects to (the first one of `AMQP_URL`).
    pub fn url(&self) -> anyhow::Result<String> {
        self.cli
            .broker
            .urls()
            .into_iter()
            .next()
            .context("AMQP_URL is empty")
    }

    /// Fresh queue names for one phase (`bench.<run>.<phase>.*`), recorded for deletion.
    pub fn queues(&self, phase: &str) -> Queues {
        let queues = Queues::with_prefix(&format!("bench.{}.{phase}", self.run_id));
        self.ledger.register(&queues);
        queues
    }

    /// The environment of a service process on `queues`: the broker and consumer settings of the
    /// benchmark, the data set, and `rust_log` as RUST_LOG; logs as JSON lines.
    pub fn service_env(&self, queues: &Queues, rust_log: &str) -> Env {
        let queue_type = self
            .cli
            .broker
            .queue_type
            .to_possible_value()
            .map_or_else(|| "classic".to_owned(), |v| v.get_name().to_owned());
        Env::new(&self.cli.broker.amqp_url, queues)
            .set("QUEUE_TYPE", queue_type)
            .set("DELIVERY_LIMIT", self.cli.broker.delivery_limit)
            .set("PREFETCH", self.cli.consume.prefetch)
            .set("MAX_MESSAGE_BYTES", self.cli.consume.max_message_bytes)
            .set("DATA_PATH", self.data_path.display())
            .set("RUST_LOG", rust_log)
            .set("LOG_FORMAT", "json")
            .with(self.cli.service_env.iter().cloned())
    }

    /// The environment of a model process on `queues`: [`Bench::service_env`] and `--model-env`.
    pub fn model_env(&self, queues: &Queues, rust_log: &str) -> Env {
        self.service_env(queues, rust_log)
            .with(self.cli.model_env.iter().cloned())
    }

    /// The same benchmark with more settings for every service it starts.
    pub fn with_service_env(&self, extra: &[(&str, &str)]) -> Self {
        let mut bench = self.clone();
        bench.cli.service_env.extend(owned_pairs(extra));
        bench
    }

    /// The same benchmark with more settings for every model process it starts.
    pub fn with_model_env(&self, extra: &[(&str, &str)]) -> Self {
        let mut bench = self.clone();
        bench.cli.model_env.extend(owned_pairs(extra));
        bench
    }
}

/// `(name, value)` pairs as owned strings.
fn owned_pairs<'a>(pairs: &'a [(&str, &str)]) -> impl Iterator<Item = (String, String)> + 'a {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
}

/// Prints a progress line on stderr (the table goes to stdout).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("[bench] {}", format_args!($($arg)*)) };
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("bench: cannot install the signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let ledger = QueueLedger::default();
    let cleanup_urls = cli.broker.urls();
    let mut task = tokio::spawn(run(cli, ledger.clone()));

    // The benchmark runs as a task so that a signal can stop it: aborting the task drops its
    // state, and the Drop guards of the child processes kill them.
    let code = tokio::select! {
        joined = &mut task => match joined {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(err)) => {
                eprintln!("bench: {err:#}");
                ExitCode::FAILURE
            }
            Err(err) if err.is_panic() => {
                eprintln!("bench: the benchmark panicked; its child processes were killed");
                ExitCode::from(101)
            }
            Err(err) => {
                eprintln!("bench: {err}");
                ExitCode::FAILURE
            }
        },
        _ = interrupt.recv() => {
            eprintln!("bench: interrupted (SIGINT), cleaning up");
            task.abort();
            let _ = (&mut task).await;
            ExitCode::from(130)
        }
        _ = terminate.recv() => {
            eprintln!("bench: terminated (SIGTERM), cleaning up");
            task.abort();
            let _ = (&mut task).await;
            ExitCode::from(143)
        }
    };

    match tokio::time::timeout(Duration::from_secs(15), ledger.delete_all(&cleanup_urls)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(deleted)) => progress!("deleted {deleted} leftover queues"),
        Ok(Err(err)) => eprintln!("bench: could not delete every queue: {err:#}"),
        Err(_) => eprintln!("bench: gave up deleting the queues after 15 s"),
    }
    code
}

/// The whole benchmark.
async fn run(cli: Cli, ledger: QueueLedger) -> anyhow::Result<()> {
    let binaries = Binaries::locate_or_build(&cli.release_dir).await?;
    let data_path = std::path::absolute(&cli.data_path)
        .with_context(|| format!("cannot resolve {}", cli.data_path.display()))?;
    let data = Dataset::from_csv(&data_path, None)
        .with_context(|| format!("cannot load the data set {}", data_path.display()))?;
    let url = cli
        .broker
        .urls()
        .into_iter()
        .next()
        .context("AMQP_URL is empty")?;
    let bench = Bench {
        broker_pid: process::local_broker_pid(&url),
        cli,
        binaries,
        data_path,
        data: Arc::new(data),
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        ledger,
    };
    progress!(
        "run {} against {}",
        bench.run_id,
        pipeline::broker::connection::redact(&url)
    );
    let machine = report::Machine::read();
    let broker_version = broker::server_version(&url).await;
    let cli = &bench.cli;
    let mut report = report::Report::new(&bench, machine, broker_version);

    if cli.runs(Phase::Startup) {
        progress!("model start-up, {} runs", cli.startup_runs);
        report.startup = Some(startup::measure(&bench).await?);
    }
    if cli.runs(Phase::Ceiling) {
        progress!("ceiling, {} samples", cli.ceiling_samples());
        let ceiling = ceiling::run(&bench, "ceiling", cli.ceiling_samples(), 0.0).await?;
        progress!("ceiling: {:.0} samples/s", ceiling.samples_per_second);
        report.ceiling = Some(ceiling);
    }
    if cli.runs(Phase::Throughput) {
        report.sample_load("before throughput");
        progress!("pipeline at full speed, {} samples", cli.samples);
        let throughput =
            pipeline_run::throughput(&bench, "pipeline", cli.samples, 1, false).await?;
        progress!("pipeline: {:.0} samples/s", throughput.samples_per_second);
        report.pipeline = Some(throughput);
    }
    let max_rate = cli
        .max_rate
        .or(report.pipeline.as_ref().map(|p| p.samples_per_second));
    if cli.runs(Phase::Curve) {
        let max_rate = max_rate.context(
            "the curve needs the pipeline's maximum: run the throughput phase or give --max-rate",
        )?;
        let points = curve::measure(&bench, max_rate, &cli.curve_at).await?;
        let png = cli.out.join("latency_curve.png");
        std::fs::create_dir_all(&cli.out)
            .with_context(|| format!("cannot create {}", cli.out.display()))?;
        chart::draw(&points, &png)?;
        progress!("wrote {}", png.display());
        report.curve = points;
    }
    if cli.runs(Phase::Replicas) {
        for models in 1..=3 {
            progress!(
                "replicas: {models} model(s) at full speed, {} samples",
                cli.replica_samples
            );
            let run = pipeline_run::throughput(
                &bench,
                &format!("replicas{models}"),
                cli.replica_samples,
                models,
                false,
            )
            .await?;
            progress!(
                "replicas: {models}: {:.0} samples/s",
                run.samples_per_second
            );
            report.replicas.push(run);
        }
    }
    if cli.runs(Phase::Cluster) {
        report.cluster = Some(cluster::measure(&bench).await?);
    }
    if cli.runs(Phase::Partitions) {
        report.partitions = partitions::measure(&bench).await?;
    }
    if cli.runs(Phase::Backlog) {
        progress!(
            "backlog: queueing {} samples, then draining them",
            cli.backlog_samples
        );
        // A drain that stalls is a finding, not a reason to lose the other figures.
        match pipeline_run::throughput(&bench, "backlog", cli.backlog_samples, 1, true).await {
            Ok(drain) => {
                progress!(
                    "backlog: drained at {:.0} samples/s",
                    drain.samples_per_second
                );
                report.backlog = Some(drain);
            }
            Err(err) => {
                progress!("backlog: failed: {err:#}");
                report.failures.push(format!(
                    "backlog of {} samples: {err:#}",
                    cli.backlog_samples
                ));
            }
        }
    }
    if cli.runs(Phase::Audit) {
        // On and off alternate, so a drift of the machine's speed shows in both.
        for round in 1..=2 {
            for on in [true, false] {
                let variant = if on {
                    bench.with_service_env(&[])
                } else {
                    bench.with_service_env(&[("AUDIT_WINDOW_SECS", "0"), ("AUDIT", "false")])
                };
                let name = format!("audit-{}{round}", if on { "on" } else { "off" });
                progress!("{name}: {} samples at full speed", cli.replica_samples);
                let run = pipeline_run::throughput(&variant, &name, cli.replica_samples, 1, false)
                    .await?;
                progress!("{name}: {:.0} samples/s", run.samples_per_second);
                report.audit.push((on, run));
            }
        }
    }
    if cli.runs(Phase::Models) {
        report.sample_load("before models");
        progress!(
            "models: predict in-process, {} calls each, then the pipeline serving {}",
            cli.model_calls,
            cli.onnx_model.display()
        );
        report.models = Some(models::measure(&bench, &mut report.failures).await?);
    }
    if cli.runs(Phase::History) {
        let starts = history::measure(&bench, cli.history_pairs, cli.history_starts).await?;
        report.history = Some((cli.history_pairs, starts));
    }

    report.sample_load("end");
    report.judge();
    let markdown = report.to_markdown();
    println!("{markdown}");
    let written = report.write(&bench.cli.out, &markdown)?;
    for path in written {
        progress!("wrote {}", path.display());
    }
    Ok(())
}
