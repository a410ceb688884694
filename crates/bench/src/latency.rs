//! Latency figures: exact percentiles of per-sample latencies, the same read off the metric
//! service's Prometheus histogram, and the send times in the producer's TRACE log.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::time::SystemTime;

/// The metric service's end-to-end latency histogram.
pub const HISTOGRAM: &str = "pipeline_end_to_end_latency_seconds";

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

/// Reads histogram `name` from a Prometheus text exposition and summarizes it: p50 and p99
/// interpolated linearly inside their bucket (as PromQL's `histogram_quantile`), max as the upper
/// bound of the highest non-empty bucket. `None` when the histogram is absent or empty.
pub fn histogram_summary(exposition: &str, name: &str) -> Option<Summary> {
    let bucket_prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let (mut sum, mut count) = (None, None);
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix(&bucket_prefix) {
            // `le="0.001"} 12` (labels other than `le` are not expected on this histogram).
            let Some((labels, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            let Some(le) = labels
                .split("le=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
            else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(bound) => bound,
                    Err(_) => continue,
                }
            };
            if let Ok(cumulative) = value.trim().parse() {
                buckets.push((bound, cumulative));
            }
        } else if let Some(value) = line.strip_prefix(&format!("{name}_sum ")) {
            sum = value.trim().parse::<f64>().ok();
        } else if let Some(value) = line.strip_prefix(&format!("{name}_count ")) {
            count = value.trim().parse::<f64>().ok();
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|(_, cumulative)| *cumulative)?;
    if total <= 0.0 {
        return None;
    }
    let quantile = |q: f64| {
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(bound, cumulative) in &buckets {
            if cumulative >= rank {
                if bound.is_infinite() {
                    return lower.0;
                }
                let in_bucket = cumulative - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return lower.0 + (bound - lower.0) * fraction;
            }
            lower = (bound, cumulative);
        }
        lower.0
    };
    let max = buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= total)
        .map_or(f64::INFINITY, |(bound, _)| *bound);
    Some(Summary {
        samples: total as u64,
        p50_ms: quantile(0.50) * 1e3,
        p99_ms: quantile(0.99) * 1e3,
        p999_ms: quantile(0.999) * 1e3,
        max_ms: max * 1e3,
        mean_ms: match (sum, count) {
            (Some(sum), Some(count)) if count > 0.0 => sum / count * 1e3,
            _ => f64::NAN,
        },
    })
}

/// [`histogram_summary`] of the series of histogram `name` whose labels start with `label` (e.g.
/// `queue="y_pred"`), for a histogram with more labels than `le`.
pub fn labelled_histogram_summary(exposition: &str, name: &str, label: &str) -> Option<Summary> {
    let (with_le, alone) = (format!("{{{label},"), format!("{{{label}}}"));
    let series: String = exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = if rest.contains(&with_le) {
                rest.replacen(&with_le, "{", 1)
            } else {
                rest.replacen(&alone, "", 1)
            };
            (!rest.contains('{') || rest.contains("{le=")).then(|| format!("{name}{rest}\n"))
        })
        .collect();
    histogram_summary(&series, name)
}

/// The widest bucket of histogram `name` that overlaps `from..=to` seconds, as upper bound over
/// lower bound: how far off a quantile read from it can be. `None` when it has no such bucket.
pub fn widest_bucket_ratio(exposition: &str, name: &str, from: f64, to: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut bounds: Vec<f64> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix)?.split('"').next()?.parse().ok())
        .filter(|bound: &f64| bound.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds
        .windows(2)
        .filter(|pair| pair[1] > from && pair[0] < to)
        .map(|pair| pair[1] / pair[0])
        .max_by(f64::total_cmp)
}

/// One JSON log line of a service (`LOG_FORMAT=json`), the fields the benchmark reads.
#[derive(Deserialize)]
struct LogLine {
    timestamp: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    id: Option<String>,
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

/// The send time of every sample, from the producer's TRACE log (`RUST_LOG=features=trace`,
/// `LOG_FORMAT=json`): the `published` event, logged right after both messages of a sample went
/// out, carries the id; its timestamp is the send time to within microseconds.
pub fn producer_send_times(path: &Path) -> anyhow::Result<HashMap<String, SystemTime>> {
    event_times(path, "published")
}

/// When the model predicted each sample, from its DEBUG log (`RUST_LOG=model=debug`,
/// `LOG_FORMAT=json`): the `predicted` event, logged just before the prediction is published.
pub fn model_predict_times(path: &Path) -> anyhow::Result<HashMap<String, SystemTime>> {
    event_times(path, "predicted")
}

/// The first time of each id's `message` event in the JSON log at `path`.
fn event_times(path: &Path, message: &str) -> anyhow::Result<HashMap<String, SystemTime>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut times = HashMap::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<LogLine>(line) else {
            continue;
        };
        if entry.message != message {
            continue;
        }
        let (Some(id), Ok(at)) = (entry.id, humantime::parse_rfc3339(&entry.timestamp)) else {
            continue;
        };
        // A sample sent or predicted again after a reconnect keeps its first time.
        times.entry(id).or_insert(at);
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_labelled_series_is_read_alone() {
        let text = "\
pipeline_publish_confirm_seconds_sum{queue=\"a\"} 0.5
pipeline_publish_confirm_seconds_count{queue=\"a\"} 100
pipeline_publish_confirm_seconds_bucket{queue=\"a\",le=\"0.001\"} 0
pipeline_publish_confirm_seconds_bucket{queue=\"a\",le=\"0.01\"} 100
pipeline_publish_confirm_seconds_bucket{queue=\"a\",le=\"+Inf\"} 100
pipeline_publish_confirm_seconds_sum{queue=\"b\"} 50
pipeline_publish_confirm_seconds_count{queue=\"b\"} 10
pipeline_publish_confirm_seconds_bucket{queue=\"b\",le=\"0.001\"} 0
pipeline_publish_confirm_seconds_bucket{queue=\"b\",le=\"0.01\"} 0
pipeline_publish_confirm_seconds_bucket{queue=\"b\",le=\"+Inf\"} 10
";
        let a = labelled_histogram_summary(text, "pipeline_publish_confirm_seconds", "queue=\"a\"")
            .unwrap();
        assert_eq!(a.samples, 100);
        assert!((a.mean_ms - 5.0).abs() < 1e-9);
        assert!(a.p99_ms > 1.0 && a.p99_ms <= 10.0, "{}", a.p99_ms);
        assert!(
            labelled_histogram_summary(text, "pipeline_publish_confirm_seconds", "queue=\"c\"")
                .is_none()
        );
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
        let summary = histogram_summary(text, HISTOGRAM).unwrap();
        assert!((summary.p50_ms - 2.0).abs() < 1e-9);
        assert!((summary.p99_ms - 3.96).abs() < 1e-9);
        assert_eq!(summary.max_ms, 4.0);
        assert!((summary.mean_ms - 15.0).abs() < 1e-9);
        let widest = widest_bucket_ratio(text, HISTOGRAM, 0.001, 1.0).unwrap();
        assert!((widest - 2.0).abs() < 1e-9);
    }
}
