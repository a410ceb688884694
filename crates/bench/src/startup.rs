//! The model's start-up time: from spawning `model` to its `/healthz` answering 200 (it has fitted
//! the model, connected, declared its queues and is consuming), polled every millisecond; and to
//! its log line "fitted linear regression", read from its JSON log.

use crate::Bench;
use crate::latency::first_log_time;
use crate::process::Service;
use anyhow::Context as _;
use serde::Serialize;
use std::time::Duration;

/// One start of the model.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StartupRun {
    /// Spawn to `/healthz` 200, in milliseconds.
    pub healthy_ms: f64,
    /// Spawn to the "fitted linear regression" log line, in milliseconds.
    pub fitted_ms: Option<f64>,
}

/// All starts and their medians.
#[derive(Debug, Clone, Serialize)]
pub struct StartupResult {
    /// Each start.
    pub runs: Vec<StartupRun>,
    /// Median of `healthy_ms`.
    pub median_healthy_ms: f64,
    /// Median of `fitted_ms` (over the runs that logged it).
    pub median_fitted_ms: Option<f64>,
}

/// Starts the model `--startup-runs` times, each on fresh queues, and times it.
pub async fn measure(bench: &Bench) -> anyhow::Result<StartupResult> {
    let url = bench.url()?;
    let mut runs = Vec::new();
    for run in 0..bench.cli.startup_runs {
        let queues = bench.queues(&format!("startup{run}"));
        let dir = tempfile::Builder::new()
            .prefix("bench-startup-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let mut model = Service::spawn(
            "model",
            &bench.binaries.model,
            bench.model_env(&queues, "info"),
            dir.path(),
        )?;
        let healthy_at = model
            .wait_healthy(Duration::from_secs(30), Duration::from_millis(1))
            .await?;
        let healthy_ms = healthy_at.duration_since(model.spawned_at).as_secs_f64() * 1e3;
        model.stop().await?;
        let fitted_ms = first_log_time(&model.stderr_path, "fitted linear regression")?
            .and_then(|at| at.duration_since(model.spawned_wall).ok())
            .map(|d| d.as_secs_f64() * 1e3);
        bench.ledger.delete(&url, &queues).await?;
        runs.push(StartupRun {
            healthy_ms,
            fitted_ms,
        });
    }
    let median_healthy_ms = median(runs.iter().map(|r| r.healthy_ms).collect()).unwrap_or(f64::NAN);
    let median_fitted_ms = median(runs.iter().filter_map(|r| r.fitted_ms).collect());
    Ok(StartupResult {
        runs,
        median_healthy_ms,
        median_fitted_ms,
    })
}

/// The median (the mean of the two middle values for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}
