//! Running quality of the model from the joined pairs: count, MAE, RMSE and R² since start and over
//! a sliding window, MAE per model version, and end-to-end latency; all exported as metrics.
//!
//! The quality alarm: each version's baseline is its MAE over its first `QUALITY_WINDOW` pairs;
//! `pipeline_model_quality_alert{model_version}` is 1 while the version's MAE over its last
//! `QUALITY_WINDOW` pairs is above `QUALITY_ALERT_RATIO` times that baseline ([`AlarmRule`]).
//!
//! Per-version series are kept for the `MODEL_VERSIONS_KEPT` most recently seen versions only: an
//! older version's series are removed, so a long run with many model swaps does not grow the
//! metrics page (or the checkpoint) without bound.
//!
//! Retirement ([`RetireRule`]): a version that has had no pair for `QUALITY_RETIRE_SECS` while
//! another version had one more recently (it was replaced) is retired: its alarm is cleared (an
//! INFO line), its series are removed, and the dashboard and `GET /api/quality` show it as
//! retired. A retired version that receives pairs again (a rollback) is current again: its series
//! come back and its alarm is judged once it has a full window of new pairs.

use crate::join::Pair;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

pub use crate::alarm::{
    AlarmChange, AlarmReport, AlarmRule, DEFAULT_RETIRE_AFTER, RetireRule, SharedAlarms,
    VersionAlarm,
};

type FloatGauge = Gauge<f64, AtomicU64>;

mod sums;
pub use sums::{Figures, Sums};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabel {
    pub(crate) model_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanLabel {
    span: &'static str,
}

struct VersionStats {
    sums: Sums,
    /// Its first `QUALITY_WINDOW` pairs (complete once `n` reaches it).
    baseline: Sums,
    /// Its last `QUALITY_WINDOW` pairs, as of the last [`Quality::update_window`].
    window: Sums,
    /// When it was last seen, in pairs observed: the smallest is dropped first.
    last_seen: u64,
    alarm_on: bool,
    /// Replaced by a newer version ([`RetireRule`]): no series, no alarm.
    retired: bool,
    /// The tick at which its pair count last grew (`None` until the first tick after it was
    /// created or restored: a restart counts as activity, the wall time of before is unknown).
    last_active: Option<Instant>,
    /// Its pair count at the last tick.
    pairs_at_tick: u64,
    mae: FloatGauge,
    pairs: Counter,
    window_mae: FloatGauge,
    alert: Gauge,
}

/// One model version's figures, for the dashboard.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VersionView {
    /// Model version (`unknown` for none).
    pub version: String,
    /// Pairs since start.
    pub pairs: u64,
    /// MAE, RMSE, R² since start.
    pub all: Figures,
    /// The same over its last `QUALITY_WINDOW` pairs.
    pub window: Figures,
    /// MAE over its first `QUALITY_WINDOW` pairs, once it had them.
    pub baseline_mae: Option<f64>,
    /// Whether its quality alarm is on.
    pub alarm: bool,
    /// Replaced by a newer version: no alarm, no series (see [`RetireRule`]).
    pub retired: bool,
}

/// The totals the checkpoint carries over a restart: since start and per kept model version.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// All pairs.
    pub all: Sums,
    /// Per model version (`unknown` for none), most recently seen last.
    pub by_version: Vec<(String, Sums)>,
    /// Per model version: its first `QUALITY_WINDOW` pairs, the quality alarm's baseline. Absent
    /// in older checkpoints: those versions take their baseline from the pairs that follow.
    #[serde(default)]
    pub baselines: Vec<(String, Sums)>,
    /// The retired versions (absent in older checkpoints: none).
    #[serde(default)]
    pub retired: Vec<String>,
    /// A classifier's totals (`TASK=classification`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<crate::classification::ClassTotals>,
}

/// The quality tracker and its metrics.
pub struct Quality {
    all: Sums,
    window: VecDeque<(f64, f64)>,
    window_size: usize,
    /// The window over all versions, as of the last [`Quality::update_window`].
    window_sums: Sums,
    /// Per model version: its last `window_size` pairs. Kept apart from `by_version` so that
    /// rows read back at start-up cannot create (or evict) a version's totals; pruned to the kept
    /// versions on every update.
    version_windows: std::collections::HashMap<String, VecDeque<(f64, f64)>>,
    rule: AlarmRule,
    retire: RetireRule,
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
    window_mae_by_version: Family<VersionLabel, FloatGauge>,
    alert_by_version: Family<VersionLabel, Gauge>,
    latency: Histogram,
    /// The alarms as of the last change, for `GET /api/quality`.
    alarms: SharedAlarms,
    /// Whether it publishes the versions' alarms; not while a classifier's tracker does.
    publishes_versions: bool,
}

impl Quality {
    /// Registers the quality metrics (prefix `pipeline_model_`) with a window of `window_size` pairs
    /// (also the baseline of the quality alarm), series for the `versions_kept` most recently seen
    /// model versions, and the alarm at `alert_ratio` times the baseline.
    pub fn register(
        registry: &mut Registry,
        window_size: usize,
        versions_kept: usize,
        alert_ratio: f64,
    ) -> Self {
        let quality = Self {
            all: Sums::default(),
            window: VecDeque::with_capacity(window_size),
            window_size: window_size.max(1),
            window_sums: Sums::default(),
            version_windows: Default::default(),
            rule: AlarmRule { ratio: alert_ratio },
            retire: RetireRule {
                after: DEFAULT_RETIRE_AFTER,
            },
            by_version: Default::default(),
            versions_kept: versions_kept.max(1),
            seen: 0,
            pairs: Counter::default(),
            mae: Family::default(),
            rmse: Family::default(),
            r2: Family::default(),
            mae_by_version: Family::default(),
            pairs_by_version: Family::default(),
            window_mae_by_version: Family::default(),
            alert_by_version: Family::default(),
            latency: Histogram::new(pipeline::metrics::latency_buckets()),
            alarms: SharedAlarms::default(),
            publishes_versions: true,
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
            "model_mae_window_by_version",
            "Mean absolute error over the last QUALITY_WINDOW pairs, per model version",
            quality.window_mae_by_version.clone(),
        );
        registry.register(
            "model_quality_alert",
            "1 while the windowed MAE of a model version is above QUALITY_ALERT_RATIO times its baseline (its MAE over its first QUALITY_WINDOW pairs), else 0",
            quality.alert_by_version.clone(),
        );
        registry.register(
            "end_to_end_latency_seconds",
            "From the producer's send time to the row being written",
            quality.latency.clone(),
        );
        quality
    }

    /// Retires a version after `after` without pairs while a newer one has them (`QUALITY_RETIRE_SECS`;
    /// 60 s unless set).
    pub fn with_retire_after(mut self, after: Duration) -> Self {
        self.retire = RetireRule { after };
        self
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
        let version = pair.model_version.as_deref().unwrap_or("unknown");
        let window = match self.version_windows.get_mut(version) {
            Some(window) => window,
            None => self.version_windows.entry(version.to_owned()).or_default(),
        };
        if window.len() == self.window_size {
            window.pop_front();
        }
        window.push_back((pair.y_true, pair.y_pred));
    }

    /// Adds one pair to the totals only (since start and per version).
    pub fn add_to_totals(&mut self, pair: &Pair) {
        self.all.add(pair.y_true, pair.y_pred);
        let version = pair.model_version.as_deref().unwrap_or("unknown");
        let baseline_size = self.window_size as u64;
        if let Some(stats) = self.version_stats(version) {
            stats.sums.add(pair.y_true, pair.y_pred);
            if stats.baseline.n < baseline_size {
                stats.baseline.add(pair.y_true, pair.y_pred);
            }
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
                self.window_mae_by_version.remove(&label);
                self.alert_by_version.remove(&label);
            }
            let label = VersionLabel {
                model_version: version.to_owned(),
            };
            let stats = VersionStats {
                sums: Sums::default(),
                baseline: Sums::default(),
                window: Sums::default(),
                last_seen: 0,
                alarm_on: false,
                retired: false,
                last_active: None,
                pairs_at_tick: 0,
                mae: self.mae_by_version.get_or_create_owned(&label),
                pairs: self.pairs_by_version.get_or_create_owned(&label),
                window_mae: self.window_mae_by_version.get_or_create_owned(&label),
                alert: self.alert_by_version.get_or_create_owned(&label),
            };
            self.by_version.insert(version.to_owned(), stats);
            // The gauges' set of versions changed: so does the report's.
            self.publish_alarms();
        } else if self
            .by_version
            .get(version)
            .is_some_and(|stats| stats.retired)
        {
            self.revive(version);
        }
        let seen = self.seen;
        let stats = self.by_version.get_mut(version)?;
        stats.last_seen = seen;
        Some(stats)
    }

    /// A retired `version` receives pairs again (a rollback): current again, with its series back
    /// (the pair counter from its count so far); its alarm waits for a full window of new pairs.
    fn revive(&mut self, version: &str) {
        let label = VersionLabel {
            model_version: version.to_owned(),
        };
        let Some(stats) = self.by_version.get_mut(version) else {
            return;
        };
        stats.retired = false;
        stats.mae = self.mae_by_version.get_or_create_owned(&label);
        stats.mae.set(stats.sums.mae());
        stats.pairs = self.pairs_by_version.get_or_create_owned(&label);
        stats.pairs.inc_by(stats.sums.n);
        stats.window_mae = self.window_mae_by_version.get_or_create_owned(&label);
        stats.alert = self.alert_by_version.get_or_create_owned(&label);
        tracing::info!(
            model_version = %version,
            pairs = stats.sums.n,
            "retired model version receives pairs again (a rollback?): current again, its quality alarm is judged once its window is full"
        );
        self.publish_alarms();
    }

    /// Marks `version` retired: alarm off, window emptied, series removed (the handles it keeps
    /// are no longer exported).
    fn retire_version(&mut self, version: &str) {
        let Some(stats) = self.by_version.get_mut(version) else {
            return;
        };
        stats.retired = true;
        stats.alarm_on = false;
        stats.window = Sums::default();
        self.version_windows.remove(version);
        let label = VersionLabel {
            model_version: version.to_owned(),
        };
        self.mae_by_version.remove(&label);
        self.pairs_by_version.remove(&label);
        self.window_mae_by_version.remove(&label);
        self.alert_by_version.remove(&label);
    }

    /// The totals to save in a checkpoint.
    pub fn totals(&self) -> Totals {
        let mut by_version: Vec<_> = self
            .by_version
            .iter()
            .map(|(name, stats)| (stats.last_seen, name.clone(), stats.sums))
            .collect();
        by_version.sort_by_key(|(last_seen, _, _)| *last_seen);
        let baselines = by_version
            .iter()
            .filter_map(|(_, name, _)| Some((name.clone(), self.by_version.get(name)?.baseline)))
            .collect();
        let mut retired: Vec<String> = self
            .by_version
            .iter()
            .filter(|(_, stats)| stats.retired)
            .map(|(name, _)| name.clone())
            .collect();
        retired.sort();
        Totals {
            all: self.all,
            baselines,
            retired,
            classification: None,
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
        for (name, baseline) in &totals.baselines {
            if let Some(stats) = self.by_version.get_mut(name) {
                stats.baseline = *baseline;
            }
        }
        for name in &totals.retired {
            self.retire_version(name);
        }
        self.publish_alarms();
        self.set(SpanLabel { span: "all" }, &self.all);
    }

    /// Records the end-to-end latency of a row written now.
    pub fn observe_latency(&self, seconds: f64) {
        self.latency.observe(seconds.max(0.0));
    }

    /// Recomputes the window gauges and the quality alarms (on the consume loop's tick, not per
    /// pair); a WARN line when a version's alarm goes up, an INFO line when it comes down or its
    /// version is retired.
    pub fn update_window(&mut self) {
        self.update_window_at(Instant::now());
    }

    /// [`Quality::update_window`] at the tick `now`: a version whose pair count grew since the
    /// last tick was active now; then [`RetireRule`] decides which versions retire.
    pub fn update_window_at(&mut self, now: Instant) {
        self.retire_replaced(now);
        let mut sums = Sums::default();
        for (y_true, y_pred) in &self.window {
            sums.add(*y_true, *y_pred);
        }
        self.set(SpanLabel { span: "window" }, &sums);
        self.window_sums = sums;
        let by_version = &self.by_version;
        self.version_windows
            .retain(|version, _| by_version.get(version).is_some_and(|stats| !stats.retired));
        let full = self.window_size as u64;
        for (version, stats) in &mut self.by_version {
            if stats.retired {
                continue;
            }
            let mut window = Sums::default();
            for (y_true, y_pred) in self.version_windows.get(version).into_iter().flatten() {
                window.add(*y_true, *y_pred);
            }
            stats.window = window;
            stats.window_mae.set(window.mae());
            let baseline = (stats.baseline.n >= full).then(|| stats.baseline.mae());
            let windowed = (window.n >= full).then(|| window.mae());
            let threshold = self.rule.ratio * stats.baseline.mae();
            match self.rule.step(stats.alarm_on, baseline, windowed) {
                Some(AlarmChange::Raised) => {
                    stats.alarm_on = true;
                    tracing::warn!(
                        model_version = %version,
                        window_mae = window.mae(),
                        baseline_mae = stats.baseline.mae(),
                        threshold,
                        "model quality alarm: the windowed MAE is above QUALITY_ALERT_RATIO times the version's baseline"
                    );
                }
                Some(AlarmChange::Lowered) => {
                    stats.alarm_on = false;
                    tracing::info!(
                        model_version = %version,
                        window_mae = window.mae(),
                        baseline_mae = stats.baseline.mae(),
                        threshold,
                        "model quality alarm cleared: the windowed MAE is back within QUALITY_ALERT_RATIO times the baseline"
                    );
                }
                None => {}
            }
            stats.alert.set(i64::from(stats.alarm_on));
        }
        self.publish_alarms();
    }

    /// Notes which versions had pairs since the last tick and retires those replaced for
    /// `QUALITY_RETIRE_SECS` (an INFO line each, naming the version that replaced it).
    fn retire_replaced(&mut self, now: Instant) {
        for stats in self.by_version.values_mut() {
            if stats.last_active.is_none() || stats.sums.n != stats.pairs_at_tick {
                stats.last_active = Some(now);
                stats.pairs_at_tick = stats.sums.n;
            }
        }
        let Some((newest, newer)) = self
            .by_version
            .iter()
            .filter_map(|(name, stats)| Some((stats.last_active?, name)))
            .max()
            .map(|(at, name)| (at, name.clone()))
        else {
            return;
        };
        let retiring: Vec<(String, bool, Duration)> = self
            .by_version
            .iter()
            .filter(|(_, stats)| !stats.retired)
            .filter_map(|(name, stats)| {
                let last = stats.last_active?;
                self.retire.is_retired(last, newest, now).then(|| {
                    (
                        name.clone(),
                        stats.alarm_on,
                        now.saturating_duration_since(last),
                    )
                })
            })
            .collect();
        for (version, alarm_was_on, idle) in retiring {
            self.retire_version(&version);
            tracing::info!(
                model_version = %version,
                replaced_by = %newer,
                idle_secs = idle.as_secs(),
                alarm_was_on,
                "model version {version} retired: no pair for QUALITY_RETIRE_SECS while {newer} has them; its quality alarm is cleared and its series removed"
            );
        }
    }

    /// Leaves `pipeline_model_quality_alert` and the versions of `GET /api/quality` to a
    /// classifier's tracker, which gets the alert family.
    pub(crate) fn hand_alarms_to_classifier(&mut self) -> Family<VersionLabel, Gauge> {
        self.publishes_versions = false;
        self.alert_by_version.clone()
    }

    /// The counter of all pairs (`pipeline_pairs_total`), shared: a metric instance's dashboard
    /// sums its partitions' counters.
    pub fn pairs_counter(&self) -> Counter {
        self.pairs.clone()
    }

    /// The handle `GET /api/quality` reads.
    pub fn shared_alarms(&self) -> SharedAlarms {
        Arc::clone(&self.alarms)
    }

    /// Each kept version's alarm and the figures it is judged on, as of the last
    /// [`Quality::update_window`], most recently seen first.
    pub fn alarms(&self) -> AlarmReport {
        let full = self.window_size as u64;
        let mut versions: Vec<(u64, VersionAlarm)> = self
            .by_version
            .iter()
            .map(|(name, stats)| {
                let baseline_mae = (stats.baseline.n >= full).then(|| stats.baseline.mae());
                (
                    stats.last_seen,
                    VersionAlarm {
                        model_version: name.clone(),
                        alarm: stats.alarm_on,
                        pairs: stats.sums.n,
                        windowed_mae: (stats.window.n >= full).then(|| stats.window.mae()),
                        baseline_mae,
                        threshold: baseline_mae.map(|mae| self.rule.ratio * mae),
                        retired: stats.retired,
                        measure: None,
                        windowed: None,
                        baseline: None,
                    },
                )
            })
            .collect();
        versions.sort_by_key(|(last_seen, _)| std::cmp::Reverse(*last_seen));
        AlarmReport {
            versions: versions.into_iter().map(|(_, alarm)| alarm).collect(),
            classification: None,
        }
    }

    /// Hands the current alarms to the HTTP handler: where the alarms change (the tick) and
    /// where a version's gauges come or go, so both show the same versions.
    fn publish_alarms(&self) {
        // Only the versions: a classifier's figures are published by its own tracker, and
        // under classification the versions too.
        if !self.publishes_versions {
            return;
        }
        let versions = self.alarms().versions;
        match self.alarms.lock() {
            Ok(mut shared) => shared.versions = versions,
            Err(poisoned) => poisoned.into_inner().versions = versions,
        }
    }

    /// The window over all versions, as of the last [`Quality::update_window`].
    pub fn window(&self) -> &Sums {
        &self.window_sums
    }

    /// Each kept version's figures as of the last [`Quality::update_window`], most recently seen
    /// first.
    pub fn versions(&self) -> Vec<VersionView> {
        let full = self.window_size as u64;
        let mut versions: Vec<(u64, VersionView)> = self
            .by_version
            .iter()
            .map(|(name, stats)| {
                (
                    stats.last_seen,
                    VersionView {
                        version: name.clone(),
                        pairs: stats.sums.n,
                        all: Figures::from(&stats.sums),
                        window: Figures::from(&stats.window),
                        baseline_mae: (stats.baseline.n >= full).then(|| stats.baseline.mae()),
                        alarm: stats.alarm_on,
                        retired: stats.retired,
                    },
                )
            })
            .collect();
        versions.sort_by_key(|(last_seen, _)| std::cmp::Reverse(*last_seen));
        versions.into_iter().map(|(_, view)| view).collect()
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
mod tests;
