//! Latency figures: exact percentiles of per-sample latencies, and the same read off the services'
//! Prometheus histograms (scraped and parsed by `testkit`).

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::time::SystemTime;
use testkit::Histogram;

/// The metric service's end-to-end latency histogram: the producer's `sent_at_us` to the join.
pub const HISTOGRAM: &str = "pipeline_end_to_end_latency_seconds";

/// Each service's delay from the producer's `sent_at_us` to its receipt, by input queue.
pub const RECEIVE_DELAY: &str = "pipeline_receive_delay_seconds";

/// The model's publish → broker confirm times, by queue.
pub const CONFIRM_HISTOGRAM: &str = "pipeline_publish_confirm_seconds";

/// p50, p99, p99.9 and maximum of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// Samples it covers.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest (for a histogram: the upper bound of the highest non-empty bucket).
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// Exact (nearest-rank) percentiles of `latencies_ms`; `None` when empty.
pub fn summarize(latencies_ms: &mut [f64]) -> Option<Summary> {
    if latencies_ms.is_empty() {
        return None;
    }
    latencies_ms.sort_by(f64::total_cmp);
    let n = latencies_ms.len();
    let rank = |q: f64| latencies_ms[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(Summary {
        samples: n as u64,
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        p999_ms: rank(0.999),
        max_ms: latencies_ms[n - 1],
        mean_ms: latencies_ms.iter().sum::<f64>() / n as f64,
    })
}

/// A scraped histogram (in seconds) as a [`Summary`] in milliseconds: p50, p99 and p99.9
/// interpolated inside their bucket (as PromQL's `histogram_quantile`), max as the upper bound of
/// the highest non-empty bucket. `None` when it is empty.
pub fn histogram_summary(histogram: &Histogram) -> Option<Summary> {
    let ms = |q: f64| histogram.quantile(q).map(|seconds| seconds * 1e3);
    Some(Summary {
        samples: histogram.total() as u64,
        p50_ms: ms(0.50)?,
        p99_ms: ms(0.99)?,
        p999_ms: ms(0.999)?,
        max_ms: histogram.max_bound()? * 1e3,
        mean_ms: histogram.mean().map_or(f64::NAN, |mean| mean * 1e3),
    })
}

/// One JSON log line of a service (`LOG_FORMAT=json`), the fields the benchmark reads.
#[derive(Deserialize)]
struct LogLine {
    timestamp: String,
    #[serde(default)]
    message: String,
}

/// Reads a JSON log and returns the time of the first line whose message starts with `message`.
pub fn first_log_time(path: &Path, message: &str) -> anyhow::Result<Option<SystemTime>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<LogLine>(line) else {
            continue;
        };
        if entry.message.starts_with(message) {
            return Ok(humantime::parse_rfc3339(&entry.timestamp).ok());
        }
    }
    Ok(None)
}

/// The time of the first line of the metric service's `labels_log.txt`
/// (`<RFC 3339 time> <queue> <id> <value>`): when it handled its first message.
pub fn first_label_time(path: &Path) -> anyhow::Result<Option<SystemTime>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut first = String::new();
    BufReader::new(file)
        .read_line(&mut first)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(first
        .split_whitespace()
        .next()
        .and_then(|stamp| humantime::parse_rfc3339(stamp).ok()))
}

/// When the metric service handled each id's `y_true` (index 0) and `y_pred` (index 1), from its
/// `labels_log.txt` (`<RFC 3339 time> <queue> <id> <value> [<model version>]`); the first line
/// of each wins.
pub fn metric_handle_times(
    path: &Path,
) -> anyhow::Result<HashMap<String, [Option<SystemTime>; 2]>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut handled: HashMap<String, [Option<SystemTime>; 2]> = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let (Some(stamp), Some(queue), Some(id)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let index = match queue {
            "y_true" => 0,
            "y_pred" => 1,
            _ => continue,
        };
        let Ok(at) = humantime::parse_rfc3339(stamp) else {
            continue;
        };
        let slot = &mut handled.entry(id.to_owned()).or_default()[index];
        slot.get_or_insert(at);
    }
    Ok(handled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::Metrics;

    #[test]
    fn nearest_rank_percentiles() {
        let mut values: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let summary = summarize(&mut values).unwrap();
        assert_eq!(
            (
                summary.p50_ms,
                summary.p99_ms,
                summary.p999_ms,
                summary.max_ms
            ),
            (500.0, 990.0, 999.0, 1000.0)
        );
        assert!(summarize(&mut []).is_none());
    }

    #[test]
    fn histogram_quantiles_are_interpolated() {
        let text = "\
# TYPE pipeline_end_to_end_latency_seconds histogram
pipeline_end_to_end_latency_seconds_sum 1.5
pipeline_end_to_end_latency_seconds_count 100
pipeline_end_to_end_latency_seconds_bucket{le=\"0.001\"} 0
pipeline_end_to_end_latency_seconds_bucket{le=\"0.002\"} 50
pipeline_end_to_end_latency_seconds_bucket{le=\"0.004\"} 100
pipeline_end_to_end_latency_seconds_bucket{le=\"+Inf\"} 100
";
        let metrics = Metrics::parse(text);
        let summary = histogram_summary(metrics.histogram(HISTOGRAM, &[]).unwrap()).unwrap();
        assert!((summary.p50_ms - 2.0).abs() < 1e-9);
        assert!((summary.p99_ms - 3.96).abs() < 1e-9);
        assert_eq!(summary.max_ms, 4.0);
        assert!((summary.mean_ms - 15.0).abs() < 1e-9);
    }
}
