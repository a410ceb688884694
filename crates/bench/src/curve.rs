//! The latency–throughput curve: at fixed fractions of the pipeline's measured maximum, the same
//! paced traffic through the pipeline and through the bare client, each sample's latency.

use crate::Bench;
use crate::ceiling::{self, CeilingResult};
use crate::pipeline_run::{self, LatencyResult};
use crate::progress;
use serde::Serialize;

/// Fractions of the pipeline's maximum rate the curve is measured at.
pub const FRACTIONS: [f64; 5] = [0.10, 0.25, 0.50, 0.75, 0.90];

/// One point of the curve: the same rate through both.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Fraction of the pipeline's maximum.
    pub fraction: f64,
    /// Samples per second asked of both.
    pub rate: f64,
    /// The pipeline at that rate.
    pub pipeline: LatencyResult,
    /// The bare client at that rate.
    pub bare: CeilingResult,
}

/// Samples of a point at `rate`: `--curve-seconds` worth, at least `--curve-min-samples`.
fn samples_at(bench: &Bench, rate: f64) -> u64 {
    ((rate * bench.cli.curve_seconds).ceil() as u64).max(bench.cli.curve_min_samples)
}

/// Measures every point of `fractions` of `max_rate`: the bare client first, then the pipeline.
pub async fn measure(
    bench: &Bench,
    max_rate: f64,
    fractions: &[f64],
) -> anyhow::Result<Vec<CurvePoint>> {
    let mut points = Vec::with_capacity(fractions.len());
    for &fraction in fractions {
        let rate = max_rate * fraction;
        let samples = samples_at(bench, rate);
        let percent = (fraction * 100.0).round();
        progress!("curve {percent}%: {rate:.0} samples/s, {samples} samples, bare client");
        let bare = ceiling::run(bench, &format!("bare{percent}"), samples, rate).await?;
        progress!("curve {percent}%: pipeline");
        let pipeline =
            pipeline_run::latency(bench, &format!("latency{percent}"), samples, rate).await?;
        let p99 = |s: Option<crate::latency::Summary>| s.map_or(f64::NAN, |s| s.p99_ms);
        progress!(
            "curve {percent}%: p99 pipeline {:.1} ms (send → joined, its histogram), bare {:.1} ms",
            p99(pipeline.per_sample),
            p99(bare.latency)
        );
        for stage in &pipeline.stages {
            progress!(
                "curve {percent}%:   p99 {:.1} ms  {}",
                stage.summary.p99_ms,
                stage.stage
            );
        }
        points.push(CurvePoint {
            fraction,
            rate,
            pipeline,
            bare,
        });
    }
    Ok(points)
}
