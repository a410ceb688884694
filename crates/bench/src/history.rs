//! The metric service's start-up on a long history (issue 10): builds a history of
//! `--history-pairs` joined samples in a fresh `LOG_DIR` (both log lines of each sample and its CSV
//! row, as the service writes them), then starts the release `metric` on it several times and
//! measures, for each start, the time from spawn to `/healthz` 200 and its peak RSS (`VmHWM`).
//! The first start has no checkpoint (files of an older version: one whole read); the others
//! start from the checkpoint. Afterwards the CSV must still have exactly one row per sample.
//!
//! Run it alone: `cargo run --release -p bench -- --history`. Targets: start-up < 2 s, RSS < 50 MiB.

use crate::Bench;
use crate::process::Service;
use anyhow::Context as _;
use std::io::{BufRead as _, BufWriter, Write as _};
use std::path::Path;
use std::time::Duration;

/// One start of the metric service.
#[derive(Debug, Clone)]
pub struct HistoryStart {
    /// Whether a checkpoint was there.
    pub from_checkpoint: bool,
    /// Spawn to `/healthz` 200, in milliseconds.
    pub healthy_ms: f64,
    /// The service's own figure for rebuilding its state, from its "state rebuilt" log line.
    pub rebuilt_ms: Option<f64>,
    /// Peak resident memory, in MiB.
    pub peak_rss_mib: f64,
}

/// Writes `pairs` joined samples into `dir`.
fn write_history(dir: &Path, pairs: u64) -> anyhow::Result<()> {
    let create = |name: &str| -> anyhow::Result<BufWriter<std::fs::File>> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(BufWriter::with_capacity(1 << 20, file))
    };
    let mut labels = create("labels_log.txt")?;
    let mut csv = create("metric_log.csv")?;
    writeln!(csv, "id,y_true,y_pred,absolute_error,model_version")?;
    for n in 0..pairs {
        let id = uuid::Uuid::new_v4();
        let y_true = (n % 300) as f64 + 25.0;
        let y_pred = y_true * 0.9 + 7.25;
        let error = (y_true - y_pred).abs();
        writeln!(labels, "2026-11-26T00:00:00.000000Z y_true {id} {y_true}")?;
        writeln!(
            labels,
            "2026-11-26T00:00:00.000001Z y_pred {id} {y_pred} ols-history"
        )?;
        writeln!(csv, "{id},{y_true},{y_pred},{error},ols-history")?;
    }
    labels.flush()?;
    csv.flush()?;
    Ok(())
}

/// Lines of `path` (rows plus header for the CSV).
fn count_lines(path: &Path) -> anyhow::Result<u64> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut lines = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lines);
        }
        lines += buf.iter().filter(|b| **b == b'\n').count() as u64;
        let len = buf.len();
        reader.consume(len);
    }
}

/// The `millis` field of the "state rebuilt" line of a JSON log.
fn rebuilt_millis(stderr: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(stderr).ok()?;
    text.lines().find_map(|line| {
        // Logs are flattened JSON: the fields sit beside the message.
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        (value.get("message")?.as_str()? == "state rebuilt from the log files")
            .then(|| value.get("millis")?.as_f64())
            .flatten()
    })
}

/// Builds the history and starts the metric service on it `starts` times.
pub async fn measure(bench: &Bench, pairs: u64, starts: u32) -> anyhow::Result<Vec<HistoryStart>> {
    let url = bench.url()?;
    let dir = tempfile::Builder::new()
        .prefix("bench-history-")
        .tempdir()
        .context("cannot create a temporary folder")?;
    let log_dir = dir.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    crate::progress!("history: writing {pairs} pairs to {}", log_dir.display());
    let dir_for_writer = log_dir.clone();
    tokio::task::spawn_blocking(move || write_history(&dir_for_writer, pairs)).await??;
    let queues = bench.queues("history");
    let env = bench
        .service_env(&queues, "info")
        .set("LOG_DIR", log_dir.display())
        .set("PLOT_INTERVAL_SECS", 0);
    let mut results = Vec::new();
    for start in 0..starts {
        let from_checkpoint = log_dir.join(".metric.checkpoint.json").exists();
        let mut metric = Service::spawn("metric", &bench.binaries.metric, env.clone(), dir.path())?;
        let healthy_at = metric
            .wait_healthy(Duration::from_secs(300), Duration::from_millis(1))
            .await?;
        let healthy_ms = healthy_at.duration_since(metric.spawned_at).as_secs_f64() * 1e3;
        let peak_rss_mib = metric.usage_now()?.peak_rss_mib;
        let exit = metric.stop().await?;
        anyhow::ensure!(exit.status.success(), "metric exited with {}", exit.status);
        let rebuilt_ms = rebuilt_millis(&metric.stderr_path);
        crate::progress!(
            "history start {start}: healthy after {healthy_ms:.0} ms, peak RSS {peak_rss_mib:.1} MiB ({})",
            if from_checkpoint {
                "checkpoint"
            } else {
                "whole files"
            }
        );
        results.push(HistoryStart {
            from_checkpoint,
            healthy_ms,
            rebuilt_ms,
            peak_rss_mib,
        });
    }
    let rows = count_lines(&log_dir.join("metric_log.csv"))?.saturating_sub(1);
    anyhow::ensure!(
        rows == pairs,
        "metric_log.csv has {rows} rows after the restarts, the history has {pairs}"
    );
    bench.ledger.delete(&url, &queues).await?;
    Ok(results)
}

/// The figures as a markdown table.
pub fn to_markdown(pairs: u64, results: &[HistoryStart]) -> String {
    let mut out = format!(
        "## metric start-up on a history of {pairs} pairs\n\n| start | from | spawn to /healthz 200 | state rebuilt in | peak RSS |\n|---|---|---:|---:|---:|\n"
    );
    for (n, start) in results.iter().enumerate() {
        out += &format!(
            "| {n} | {} | {:.0} ms | {} | {:.1} MiB |\n",
            if start.from_checkpoint {
                "checkpoint"
            } else {
                "whole files (no checkpoint)"
            },
            start.healthy_ms,
            start
                .rebuilt_ms
                .map_or_else(|| "–".to_owned(), |ms| format!("{ms:.0} ms")),
            start.peak_rss_mib
        );
    }
    out += &format!("\nrows in metric_log.csv after the starts: {pairs} (each once)\n");
    out
}
