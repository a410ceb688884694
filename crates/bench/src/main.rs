//! `bench`: the benchmark of issue 5, "As fast as the broker allows".
//!
//! Against the broker at `AMQP_URL`, on queues of its own (`bench.<random>.<phase>.*`), it measures:
//!
//! 1. the model's start-up time (spawn to `/healthz` 200),
//! 2. the ceiling: a bare lapin client doing exactly the pipeline's traffic, nothing else,
//! 3. the pipeline's throughput: the release binaries `features`, `model` and `metric`, with the
//!    CPU time and peak RSS of each service,
//! 4. the end-to-end latency of every sample with the pipeline paced at half that throughput,
//!
//! then prints a markdown table and writes it, with a JSON twin, to `--out`. Queues and child
//! processes are cleaned up on success, on error, on panic and on SIGINT/SIGTERM.
//!
//! Run it from the repository root: `cargo run --release -p bench`.

mod broker;
mod ceiling;
mod history;
mod latency;
mod pipeline_run;
mod process;
mod report;
mod startup;

use anyhow::Context as _;
use broker::QueueLedger;
use clap::{Parser, ValueEnum as _};
use pipeline::config::{BrokerConfig, ConsumeConfig, QueueNames};
use pipeline::dataset::Dataset;
use process::Binaries;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
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

    /// Samples of the half-rate latency run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_samples: u64,

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

    /// Only measure the metric service's start-up on a long history (see history.rs) and print it.
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
}

/// What every phase needs: the settings, the binaries, the data, and where to record the queues
/// it declares so they are deleted whatever happens.
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

    /// Fresh queue names for one phase, recorded for deletion.
    pub fn queues(&self, phase: &str) -> QueueNames {
        let queues = broker::phase_queues(&self.run_id, phase);
        self.ledger.register(&queues);
        queues
    }

    /// The environment of a service process on `queues`: the broker and consumer settings of the
    /// benchmark, the data set, and `rust_log` as RUST_LOG; logs as JSON lines.
    pub fn service_env(&self, queues: &QueueNames, rust_log: &str) -> Vec<(String, String)> {
        let queue_type = self
            .cli
            .broker
            .queue_type
            .to_possible_value()
            .map_or_else(|| "classic".to_owned(), |v| v.get_name().to_owned());
        vec![
            ("AMQP_URL".into(), self.cli.broker.amqp_url.clone()),
            ("QUEUE_TYPE".into(), queue_type),
            (
                "DELIVERY_LIMIT".into(),
                self.cli.broker.delivery_limit.to_string(),
            ),
            ("PREFETCH".into(), self.cli.consume.prefetch.to_string()),
            (
                "MAX_MESSAGE_BYTES".into(),
                self.cli.consume.max_message_bytes.to_string(),
            ),
            ("FEATURES_QUEUE".into(), queues.features_queue.clone()),
            ("Y_TRUE_QUEUE".into(), queues.y_true_queue.clone()),
            ("Y_PRED_QUEUE".into(), queues.y_pred_queue.clone()),
            ("DATA_PATH".into(), self.data_path.display().to_string()),
            ("RUST_LOG".into(), rust_log.to_owned()),
            ("LOG_FORMAT".into(), "json".into()),
        ]
    }
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
    if bench.cli.history {
        let results =
            history::measure(&bench, bench.cli.history_pairs, bench.cli.history_starts).await?;
        println!(
            "{}",
            history::to_markdown(bench.cli.history_pairs, &results)
        );
        return Ok(());
    }
    let machine = report::Machine::read();
    let broker_version = broker::server_version(&url).await;

    progress!("model start-up, {} runs", bench.cli.startup_runs);
    let startup = startup::measure(&bench).await?;

    progress!("ceiling, {} samples", bench.cli.ceiling_samples());
    let ceiling = ceiling::run(&bench).await?;
    progress!("ceiling: {:.0} samples/s", ceiling.samples_per_second);

    progress!("pipeline at full speed, {} samples", bench.cli.samples);
    let throughput = pipeline_run::throughput(&bench).await?;
    progress!("pipeline: {:.0} samples/s", throughput.samples_per_second);

    let rate = throughput.samples_per_second / 2.0;
    progress!(
        "latency at {rate:.0} samples/s, {} samples",
        bench.cli.latency_samples
    );
    let latency = pipeline_run::latency(&bench, rate).await?;

    let report = report::Report::new(
        &bench,
        machine,
        broker_version,
        startup,
        ceiling,
        throughput,
        latency,
    );
    let markdown = report.to_markdown();
    println!("{markdown}");
    let written = report.write(&bench.cli.out, &markdown)?;
    for path in written {
        progress!("wrote {}", path.display());
    }
    Ok(())
}
