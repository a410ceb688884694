//! A service's Prometheus text read with the `prometheus-parse` crate: plain values by their
//! `name{labels}`, and histograms with the quantiles PromQL's `histogram_quantile` would give.

use prometheus_parse::{LineInfo, SampleType, Scrape, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One scrape: every counter, gauge and untyped sample (histograms' `_sum` and `_count` too), and
/// every histogram series.
#[derive(Clone, Default)]
pub struct Metrics {
    /// By canonical key: the name, then the labels sorted by name.
    values: BTreeMap<String, f64>,
    histograms: Vec<(String, BTreeMap<String, String>, Histogram)>,
}

/// One histogram series: cumulative buckets by upper bound (`+Inf` last), sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// (upper bound in the metric's unit, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
    /// The `_sum` sample, when present.
    pub sum: Option<f64>,
    /// The `_count` sample, when present.
    pub count: Option<f64>,
}

fn parse(text: &str) -> Scrape {
    // Reading from a string cannot fail; a line the crate does not understand is skipped by it.
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap_or(Scrape {
        docs: Default::default(),
        samples: Vec::new(),
    })
}

/// `name{a="x",b="y"}` with the labels sorted, or `name` alone.
fn key(name: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

impl Metrics {
    /// Parses a Prometheus (or OpenMetrics) text exposition.
    pub fn parse(text: &str) -> Self {
        let mut metrics = Self::default();
        for sample in parse(text).samples {
            let labels: BTreeMap<String, String> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match sample.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                    metrics.values.insert(key(&sample.metric, &labels), v);
                }
                Value::Histogram(counts) => {
                    let mut buckets: Vec<(f64, f64)> =
                        counts.iter().map(|c| (c.less_than, c.count)).collect();
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    metrics.histograms.push((
                        sample.metric,
                        labels,
                        Histogram {
                            buckets,
                            ..Histogram::default()
                        },
                    ));
                }
                Value::Summary(_) => {}
            }
        }
        for (name, labels, histogram) in &mut metrics.histograms {
            histogram.sum = metrics
                .values
                .get(&key(&format!("{name}_sum"), labels))
                .copied();
            histogram.count = metrics
                .values
                .get(&key(&format!("{name}_count"), labels))
                .copied();
        }
        metrics
    }

    /// The value of `key` as the exposition writes it, `name` or `name{label="value",...}` in any
    /// label order.
    pub fn get(&self, key: &str) -> Option<&f64> {
        let wanted = parse(&format!("{key} 0")).samples.into_iter().next()?;
        let labels = wanted
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.values.get(&self::key(&wanted.metric, &labels))
    }

    /// The value of `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.values.get(&key(name, &labels)).copied()
    }

    /// Whether [`Metrics::get`] finds `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Every plain value, by `name{labels}` (labels sorted by name).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &f64)> {
        self.values.iter()
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.histograms.is_empty()
    }

    /// The series of histogram `name` with exactly these labels (besides `le`).
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Histogram> {
        self.histograms
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, histogram)| histogram)
    }
}

/// `metrics["name{labels}"]`, panicking when absent (for tests).
impl std::ops::Index<&str> for Metrics {
    type Output = f64;
    fn index(&self, key: &str) -> &f64 {
        self.get(key)
            .unwrap_or_else(|| panic!("no {key} in the metrics: {self:?}"))
    }
}

impl std::ops::Index<&String> for Metrics {
    type Output = f64;
    fn index(&self, key: &String) -> &f64 {
        &self[key.as_str()]
    }
}

impl IntoIterator for Metrics {
    type Item = (String, f64);
    type IntoIter = std::collections::btree_map::IntoIter<String, f64>;
    fn into_iter(self) -> Self::IntoIter {
        self.values.into_iter()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.values.iter()).finish()
    }
}

/// The sample names a `/metrics` text can have: its samples, and for every declared family the
/// names its type gives (a counter with no series yet is still exported as `<name>_total`).
pub fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => match (sample_type, metric_alias) {
                (SampleType::Counter, _) => {
                    names.insert(format!("{metric_name}_total"));
                }
                (SampleType::Histogram, Some(family)) => {
                    names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{family}{s}")));
                }
                _ => {
                    names.insert(metric_name);
                }
            },
            LineInfo::Sample { metric_name, .. } => {
                names.insert(metric_name.to_owned());
            }
            _ => {}
        }
    }
    names
}

impl Histogram {
    /// Observations in it (the `+Inf` bucket).
    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, count)| *count)
    }

    /// The `q` quantile interpolated linearly inside its bucket, as PromQL's `histogram_quantile`
    /// (one in the `+Inf` bucket is the highest finite bound); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(bound, cumulative) in &self.buckets {
            if cumulative >= rank {
                if bound.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = cumulative - lower.1;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (bound - lower.0) * fraction);
            }
            lower = (bound, cumulative);
        }
        Some(lower.0)
    }

    /// The upper bound of the lowest bucket that holds every observation: the largest one, at most.
    pub fn max_bound(&self) -> Option<f64> {
        let total = self.total();
        (total > 0.0).then(|| {
            self.buckets
                .iter()
                .find(|(_, cumulative)| *cumulative >= total)
                .map_or(f64::INFINITY, |(bound, _)| *bound)
        })
    }

    /// `sum / count`, when both are there and count is not zero.
    pub fn mean(&self) -> Option<f64> {
        match (self.sum, self.count) {
            (Some(sum), Some(count)) if count > 0.0 => Some(sum / count),
            _ => None,
        }
    }

    /// The widest bucket that overlaps `from..=to`, as upper bound over lower bound: how far off a
    /// quantile read from it can be.
    pub fn widest_bucket_ratio(&self, from: f64, to: f64) -> Option<f64> {
        let bounds: Vec<f64> = self
            .buckets
            .iter()
            .map(|(bound, _)| *bound)
            .filter(|bound| bound.is_finite())
            .collect();
        bounds
            .windows(2)
            .filter(|pair| pair[1] > from && pair[0] < to)
            .map(|pair| pair[1] / pair[0])
            .max_by(f64::total_cmp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP pipeline_messages_acked Acked.
# TYPE pipeline_messages_acked counter
pipeline_messages_acked_total{queue=\"a\"} 7
# TYPE pipeline_trainer_retrains counter
pipeline_trainer_retrains_total{trigger=\"manual\",result=\"refused\"} 2
# TYPE pipeline_broker_blocked gauge
pipeline_broker_blocked 1
# TYPE pipeline_h histogram
pipeline_h_sum{queue=\"a\"} 1.5
pipeline_h_count{queue=\"a\"} 100
pipeline_h_bucket{queue=\"a\",le=\"0.001\"} 0
pipeline_h_bucket{queue=\"a\",le=\"0.002\"} 50
pipeline_h_bucket{queue=\"a\",le=\"0.004\"} 100
pipeline_h_bucket{queue=\"a\",le=\"+Inf\"} 100
pipeline_h_sum{queue=\"b\"} 0
pipeline_h_count{queue=\"b\"} 0
pipeline_h_bucket{queue=\"b\",le=\"0.001\"} 0
pipeline_h_bucket{queue=\"b\",le=\"+Inf\"} 0
# EOF
";

    #[test]
    fn values_are_found_in_any_label_order() {
        let metrics = Metrics::parse(TEXT);
        assert_eq!(
            metrics.get("pipeline_messages_acked_total{queue=\"a\"}"),
            Some(&7.0)
        );
        assert_eq!(
            metrics.get("pipeline_trainer_retrains_total{trigger=\"manual\",result=\"refused\"}"),
            Some(&2.0)
        );
        assert_eq!(
            metrics.value(
                "pipeline_trainer_retrains_total",
                &[("result", "refused"), ("trigger", "manual")]
            ),
            Some(2.0)
        );
        assert_eq!(metrics.get("pipeline_broker_blocked"), Some(&1.0));
        assert_eq!(metrics.get("pipeline_broker_blocked{queue=\"a\"}"), None);
    }

    #[test]
    fn histogram_quantiles_are_interpolated() {
        let metrics = Metrics::parse(TEXT);
        let h = metrics.histogram("pipeline_h", &[("queue", "a")]).unwrap();
        assert!((h.quantile(0.5).unwrap() - 0.002).abs() < 1e-12);
        assert!((h.quantile(0.99).unwrap() - 0.00396).abs() < 1e-12);
        assert_eq!(h.max_bound(), Some(0.004));
        assert!((h.mean().unwrap() - 0.015).abs() < 1e-12);
        assert!((h.widest_bucket_ratio(0.001, 1.0).unwrap() - 2.0).abs() < 1e-12);
        let names = exported_names(TEXT);
        for name in [
            "pipeline_messages_acked_total",
            "pipeline_broker_blocked",
            "pipeline_h_bucket",
            "pipeline_h_sum",
            "pipeline_h_count",
        ] {
            assert!(names.contains(name), "{name} not in {names:?}");
        }
        let empty = metrics.histogram("pipeline_h", &[("queue", "b")]).unwrap();
        assert_eq!(empty.quantile(0.99), None);
        assert!(metrics.histogram("pipeline_h", &[("queue", "c")]).is_none());
    }
}
