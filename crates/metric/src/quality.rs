//! Running quality of the model from the joined pairs: count, MAE, RMSE and R² since start and over
//! a sliding window, MAE per model version, and end-to-end latency; all exported as metrics.
//!
//! Per-version series are kept for the `MODEL_VERSIONS_KEPT` most recently seen versions only: an
//! older version's series are removed, so a long run with many model swaps does not grow the
//! metrics page (or the checkpoint) without bound.

use crate::join::Pair;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;

type FloatGauge = Gauge<f64, AtomicU64>;

/// Sums from which MAE, RMSE and R² follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sums {
    /// Pairs.
    pub n: u64,
    sum_abs: f64,
    sum_sq: f64,
    sum_y: f64,
    sum_y2: f64,
}

impl Sums {
    fn add(&mut self, y_true: f64, y_pred: f64) {
        let err = y_true - y_pred;
        self.n += 1;
        self.sum_abs += err.abs();
        self.sum_sq += err * err;
        self.sum_y += y_true;
        self.sum_y2 += y_true * y_true;
    }

    /// Mean absolute error (0 without pairs).
    pub fn mae(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum_abs / self.n as f64
        }
    }

    /// Root mean squared error (0 without pairs).
    pub fn rmse(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.sum_sq / self.n as f64).sqrt()
        }
    }

    /// Coefficient of determination (0 when the targets do not vary).
    pub fn r2(&self) -> f64 {
        let n = self.n as f64;
        let ss_tot = self.sum_y2 - self.sum_y * self.sum_y / n;
        if self.n < 2 || ss_tot <= 0.0 {
            0.0
        } else {
            1.0 - self.sum_sq / ss_tot
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    model_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanLabel {
    span: &'static str,
}

struct VersionStats {
    sums: Sums,
    /// When it was last seen, in pairs observed: the smallest is dropped first.
    last_seen: u64,
    mae: FloatGauge,
    pairs: Counter,
}

/// The totals the checkpoint carries over a restart: since start and per kept model version.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// All pairs.
    pub all: Sums,
    /// Per model version (`unknown` for none), most recently seen last.
    pub by_version: Vec<(String, Sums)>,
}

/// The quality tracker and its metrics.
pub struct Quality {
    all: Sums,
    window: VecDeque<(f64, f64)>,
    window_size: usize,
    /// Per model version: its sums and its two metric handles, so the hot path allocates nothing
    /// once a version has been seen.
    by_version: std::collections::HashMap<String, VersionStats>,
    versions_kept: usize,
    seen: u64,
    pairs: Counter,
    mae: Family<SpanLabel, FloatGauge>,
    rmse: Family<SpanLabel, FloatGauge>,
    r2: Family<SpanLabel, FloatGauge>,
    mae_by_version: Family<VersionLabel, FloatGauge>,
    pairs_by_version: Family<VersionLabel, Counter>,
    latency: Histogram,
}

impl Quality {
    /// Registers the quality metrics (prefix `pipeline_model_`) with a window of `window_size` pairs
    /// and series for the `versions_kept` most recently seen model versions.
    pub fn register(registry: &mut Registry, window_size: usize, versions_kept: usize) -> Self {
        let quality = Self {
            all: Sums::default(),
            window: VecDeque::with_capacity(window_size),
            window_size: window_size.max(1),
            by_version: Default::default(),
            versions_kept: versions_kept.max(1),
            seen: 0,
            pairs: Counter::default(),
            mae: Family::default(),
            rmse: Family::default(),
            r2: Family::default(),
            mae_by_version: Family::default(),
            pairs_by_version: Family::default(),
            latency: Histogram::new(pipeline::metrics::latency_buckets()),
        };
        let registry = registry.sub_registry_with_prefix("pipeline");
        registry.register(
            "pairs",
            "Ids joined: rows written to metric_log.csv",
            quality.pairs.clone(),
        );
        registry.register(
            "model_mae",
            "Mean absolute error of the predictions, since start (span=all, the whole CSV) or over the last QUALITY_WINDOW pairs (span=window)",
            quality.mae.clone(),
        );
        registry.register(
            "model_rmse",
            "Root mean squared error of the predictions, by span",
            quality.rmse.clone(),
        );
        registry.register(
            "model_r2",
            "Coefficient of determination of the predictions, by span",
            quality.r2.clone(),
        );
        registry.register(
            "model_mae_by_version",
            "Mean absolute error since start, per model version",
            quality.mae_by_version.clone(),
        );
        registry.register(
            "pairs_by_model_version",
            "Ids joined, per model version",
            quality.pairs_by_version.clone(),
        );
        registry.register(
            "end_to_end_latency_seconds",
            "From the producer's send time to the row being written",
            quality.latency.clone(),
        );
        quality
    }

    /// Adds one new pair: to the totals and to the window.
    pub fn observe(&mut self, pair: &Pair) {
        self.add_to_totals(pair);
        self.add_to_window(pair);
    }

    /// Adds one pair to the sliding window only (a recent row read back at start-up, already in
    /// the checkpoint's totals).
    pub fn add_to_window(&mut self, pair: &Pair) {
        if self.window.len() == self.window_size {
            self.window.pop_front();
        }
        self.window.push_back((pair.y_true, pair.y_pred));
    }

    /// Adds one pair to the totals only (since start and per version).
    pub fn add_to_totals(&mut self, pair: &Pair) {
        self.all.add(pair.y_true, pair.y_pred);
        let version = pair.model_version.as_deref().unwrap_or("unknown");
        if let Some(stats) = self.version_stats(version) {
            stats.sums.add(pair.y_true, pair.y_pred);
            stats.mae.set(stats.sums.mae());
            stats.pairs.inc();
        }
        self.pairs.inc();
        self.set(SpanLabel { span: "all" }, &self.all);
    }

    /// The stats of `version`, created (and the least recently seen version dropped beyond
    /// `versions_kept`) when new; marked as seen now.
    fn version_stats(&mut self, version: &str) -> Option<&mut VersionStats> {
        self.seen += 1;
        if !self.by_version.contains_key(version) {
            while self.by_version.len() >= self.versions_kept {
                let Some(oldest) = self
                    .by_version
                    .iter()
                    .min_by_key(|(_, stats)| stats.last_seen)
                    .map(|(name, _)| name.clone())
                else {
                    break;
                };
                self.by_version.remove(&oldest);
                let label = VersionLabel {
                    model_version: oldest,
                };
                self.mae_by_version.remove(&label);
                self.pairs_by_version.remove(&label);
            }
            let label = VersionLabel {
                model_version: version.to_owned(),
            };
            let stats = VersionStats {
                sums: Sums::default(),
                last_seen: 0,
                mae: self.mae_by_version.get_or_create_owned(&label),
                pairs: self.pairs_by_version.get_or_create_owned(&label),
            };
            self.by_version.insert(version.to_owned(), stats);
        }
        let seen = self.seen;
        let stats = self.by_version.get_mut(version)?;
        stats.last_seen = seen;
        Some(stats)
    }

    /// The totals to save in a checkpoint.
    pub fn totals(&self) -> Totals {
        let mut by_version: Vec<_> = self
            .by_version
            .iter()
            .map(|(name, stats)| (stats.last_seen, name.clone(), stats.sums))
            .collect();
        by_version.sort_by_key(|(last_seen, _, _)| *last_seen);
        Totals {
            all: self.all,
            by_version: by_version
                .into_iter()
                .map(|(_, name, sums)| (name, sums))
                .collect(),
        }
    }

    /// Starts from saved totals (before any pair is observed).
    pub fn restore(&mut self, totals: &Totals) {
        self.all = totals.all;
        self.pairs.inc_by(totals.all.n);
        for (name, sums) in &totals.by_version {
            if let Some(stats) = self.version_stats(name) {
                stats.sums = *sums;
                stats.mae.set(sums.mae());
                stats.pairs.inc_by(sums.n);
            }
        }
        self.set(SpanLabel { span: "all" }, &self.all);
    }

    /// Records the end-to-end latency of a row written now.
    pub fn observe_latency(&self, seconds: f64) {
        self.latency.observe(seconds.max(0.0));
    }

    /// Recomputes the window gauges.
    pub fn update_window(&mut self) {
        let mut sums = Sums::default();
        for (y_true, y_pred) in &self.window {
            sums.add(*y_true, *y_pred);
        }
        self.set(SpanLabel { span: "window" }, &sums);
    }

    /// Totals since start.
    pub fn all(&self) -> &Sums {
        &self.all
    }

    fn set(&self, label: SpanLabel, sums: &Sums) {
        self.mae.get_or_create(&label).set(sums.mae());
        self.rmse.get_or_create(&label).set(sums.rmse());
        self.r2.get_or_create(&label).set(sums.r2());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_give_textbook_values() {
        let mut sums = Sums::default();
        for (t, p) in [(1.0, 1.5), (2.0, 1.5), (3.0, 3.5)] {
            sums.add(t, p);
        }
        assert!((sums.mae() - 0.5).abs() < 1e-12);
        assert!((sums.rmse() - 0.5).abs() < 1e-12);
        // ss_res = 0.75, ss_tot = 2.
        assert!((sums.r2() - (1.0 - 0.75 / 2.0)).abs() < 1e-12);
    }

    fn pair(y_pred: f64, version: &str) -> Pair {
        Pair {
            id: "a".into(),
            y_true: 1.0,
            y_pred,
            model_version: Some(version.into()),
            sent_at_us: None,
        }
    }

    fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn only_the_newest_versions_keep_their_series() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 2);
        quality.observe(&pair(2.0, "v1"));
        quality.observe(&pair(2.0, "v2"));
        quality.observe(&pair(3.0, "v1"));
        quality.observe(&pair(2.0, "v3"));
        let text = scrape(&registry);
        assert!(!text.contains("model_version=\"v2\""), "{text}");
        assert!(
            text.contains("pipeline_model_mae_by_version{model_version=\"v1\"} 1.5"),
            "{text}"
        );
        assert!(text.contains("model_version=\"v3\""), "{text}");
        assert!(text.contains("pipeline_pairs_total 4"), "{text}");
        let totals = quality.totals();
        assert_eq!(
            totals
                .by_version
                .iter()
                .map(|(v, _)| v.as_str())
                .collect::<Vec<_>>(),
            ["v1", "v3"]
        );
    }

    #[test]
    fn totals_survive_a_restore() {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 10, 5);
        for i in 0..4 {
            quality.observe(&pair(f64::from(i), "v1"));
        }
        let totals = quality.totals();
        let mut registry = Registry::default();
        let mut restored = Quality::register(&mut registry, 10, 5);
        restored.restore(&totals);
        restored.add_to_window(&pair(9.0, "v1"));
        assert_eq!(restored.all(), quality.all());
        assert_eq!(restored.totals(), totals);
        let text = scrape(&registry);
        assert!(text.contains("pipeline_pairs_total 4"), "{text}");
    }
}
