//! A classifier's quality from the joined pairs (`TASK=classification`): accuracy, log loss,
//! Brier score and macro F1 since start, over the last `QUALITY_WINDOW` pairs and per model
//! version, with ROC AUC over the window when there are two classes; exported as metrics and in
//! `GET /api/quality`.
//!
//! The figures are scikit-learn's: log loss is `-ln p(true class)` with the probabilities
//! normalised to sum to one and clipped to `[ε, 1-ε]` (`log_loss`); the Brier score is
//! `Σ_k (p_k - 1[k = y])²`, halved for two classes so it is `brier_score_loss`'s `(p_pos - y)²`;
//! macro F1 averages the classes seen in `y_true` or `y_pred` (`f1_score(average="macro")`); AUC is
//! the rank statistic with ties averaged (`roc_auc_score`), the positive class the greater of the
//! two labels (scikit-learn's `classes_[1]`), exact over the window.
//!
//! The quality alarm ([`AlarmRule`], as for a regressor): a version's log loss over its last
//! `QUALITY_WINDOW` pairs against `QUALITY_ALERT_RATIO` times its log loss over its first ones
//! (its error rate, 1 - accuracy, when it sends no probabilities), on
//! `pipeline_model_quality_alert{model_version}` and in `GET /api/quality`'s `versions`, where the
//! trainer reads it.
//!
//! A true label the model does not know (not among its probabilities) is an *unknown class*: the
//! row is written (not correct, no `p_true`), counted in accuracy and F1, left out of log loss,
//! Brier and AUC, and counted in `pipeline_unknown_class_total`.

use crate::alarm::{AlarmChange, AlarmRule, RetireRule, SharedAlarms, VersionAlarm};
use crate::join::Value;
use crate::quality::VersionLabel;
use pipeline::classes::{ClassLabel, Probabilities, log_loss_of};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

type FloatGauge = Gauge<f64, AtomicU64>;

/// Distinct (true, predicted) cells kept per set of sums: a stream of ever new labels cannot grow
/// the figures without bound (beyond it, pairs still count, their cell does not).
const MAX_CELLS: usize = 10_000;

/// One joined id of a classifier: a row of `metric_log.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassPair {
    /// Sample id.
    pub id: String,
    /// True class.
    pub y_true: ClassLabel,
    /// Predicted class.
    pub y_pred: ClassLabel,
    /// The probability the model gave the true class, normalised; `None` without probabilities
    /// or for a class the model does not know.
    pub p_true: Option<f64>,
    /// This pair's Brier score; `None` when `p_true` is.
    pub brier: Option<f64>,
    /// The probability the model gave its predicted class, normalised (its confidence, for the
    /// calibration); `None` without probabilities and in rows read back.
    pub p_pred: Option<f64>,
    /// The two classes the probabilities were over, when there were two (for AUC).
    pub binary: Option<[ClassLabel; 2]>,
    /// Whether the model knew the true class (it had probabilities and the class was not among
    /// them: `false`).
    pub known: bool,
    /// Version of the model that predicted.
    pub model_version: Option<String>,
    /// Producer's send time, if known.
    pub sent_at_us: Option<u64>,
}

impl ClassPair {
    /// The pair of two joined values (a number is taken as an integer label).
    pub fn new(
        id: String,
        y_true: Value,
        y_pred: Value,
        model_version: Option<String>,
        sent_at_us: Option<u64>,
    ) -> Self {
        let class = |value: Value| match value {
            Value::Class(class) => (class.label, class.probabilities),
            Value::Number(number) => (
                ClassLabel::from_number(number, "a label")
                    .unwrap_or_else(|_| ClassLabel::Text(number.to_string())),
                None,
            ),
        };
        let (y_true, _) = class(y_true);
        let (y_pred, probabilities) = class(y_pred);
        let scored = probabilities.as_ref().map(|p| score(p, &y_true));
        let p_pred = probabilities
            .as_ref()
            .and_then(|p| p.normalised(&y_pred.key()));
        Self {
            id,
            y_true,
            y_pred,
            p_true: scored.and_then(|s| s.p_true),
            brier: scored.and_then(|s| s.brier),
            p_pred,
            binary: probabilities.as_ref().and_then(two_classes),
            known: scored.is_none_or(|s| s.p_true.is_some()),
            model_version,
            sent_at_us,
        }
    }

    /// Whether the prediction is the true class.
    pub fn correct(&self) -> bool {
        self.y_true.key() == self.y_pred.key()
    }
}

#[derive(Clone, Copy)]
struct Scored {
    p_true: Option<f64>,
    brier: Option<f64>,
}

/// `p(true)` normalised and the Brier score, as scikit-learn computes them.
fn score(probabilities: &Probabilities, y_true: &ClassLabel) -> Scored {
    let key = y_true.key();
    let Some(p_true) = probabilities.normalised(&key) else {
        return Scored {
            p_true: None,
            brier: None,
        };
    };
    let squares: f64 = probabilities
        .iter()
        .map(|(class, _)| {
            let p = probabilities.normalised(class).unwrap_or(0.0);
            let hit = if class == key { 1.0 } else { 0.0 };
            (p - hit).powi(2)
        })
        .sum();
    let brier = if probabilities.len() == 2 {
        squares / 2.0
    } else {
        squares
    };
    Scored {
        p_true: Some(p_true),
        brier: Some(brier),
    }
}

/// The two classes of a binary model, in scikit-learn's order.
fn two_classes(probabilities: &Probabilities) -> Option<[ClassLabel; 2]> {
    let mut classes: Vec<ClassLabel> = probabilities
        .iter()
        .map(|(class, _)| ClassLabel::from_cell(class))
        .collect();
    classes.sort();
    <[ClassLabel; 2]>::try_from(classes).ok()
}

/// Counts a cell of the confusion matrix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    /// True class.
    pub y_true: String,
    /// Predicted class.
    pub y_pred: String,
    /// Pairs.
    pub n: u64,
}

/// Sums from which accuracy, log loss, Brier score and macro F1 follow.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassSums {
    /// Pairs.
    pub n: u64,
    /// Pairs whose prediction was the true class.
    pub correct: u64,
    /// Pairs with a probability for the true class (log loss and Brier are over these).
    pub scored: u64,
    /// Pairs whose true class the model did not know.
    pub unknown: u64,
    log_loss: f64,
    brier: f64,
    /// The confusion matrix, sparse.
    pub confusion: Vec<Cell>,
}

impl ClassSums {
    fn add(
        &mut self,
        y_true: &str,
        y_pred: &str,
        p_true: Option<f64>,
        brier: Option<f64>,
        known: bool,
    ) {
        self.n += 1;
        self.correct += u64::from(y_true == y_pred);
        self.unknown += u64::from(!known);
        if let (Some(p), Some(brier)) = (p_true, brier) {
            self.scored += 1;
            self.log_loss += log_loss_of(p);
            self.brier += brier;
        }
        let full = self.confusion.len() >= MAX_CELLS;
        match self
            .confusion
            .iter_mut()
            .find(|cell| cell.y_true == y_true && cell.y_pred == y_pred)
        {
            Some(cell) => cell.n += 1,
            None if !full => self.confusion.push(Cell {
                y_true: y_true.to_owned(),
                y_pred: y_pred.to_owned(),
                n: 1,
            }),
            None => {}
        }
    }

    fn add_pair(&mut self, pair: &ClassPair) {
        self.add(
            &pair.y_true.key(),
            &pair.y_pred.key(),
            pair.p_true,
            pair.brier,
            pair.known,
        );
    }

    /// Share of correct predictions (`None` without pairs).
    pub fn accuracy(&self) -> Option<f64> {
        (self.n > 0).then(|| self.correct as f64 / self.n as f64)
    }

    /// Mean log loss over the scored pairs.
    pub fn log_loss(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.log_loss / self.scored as f64)
    }

    /// Mean Brier score over the scored pairs.
    pub fn brier(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.brier / self.scored as f64)
    }

    /// Macro F1 over the classes seen as true or predicted.
    pub fn f1_macro(&self) -> Option<f64> {
        let classes: BTreeSet<&str> = self
            .confusion
            .iter()
            .flat_map(|cell| [cell.y_true.as_str(), cell.y_pred.as_str()])
            .collect();
        if classes.is_empty() {
            return None;
        }
        let f1 = |class: &str| {
            let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
            for cell in &self.confusion {
                match (cell.y_true == class, cell.y_pred == class) {
                    (true, true) => tp += cell.n,
                    (false, true) => fp += cell.n,
                    (true, false) => fn_ += cell.n,
                    (false, false) => {}
                }
            }
            let denominator = 2 * tp + fp + fn_;
            if denominator == 0 {
                0.0
            } else {
                2.0 * tp as f64 / denominator as f64
            }
        };
        Some(classes.iter().map(|class| f1(class)).sum::<f64>() / classes.len() as f64)
    }
}

/// ROC AUC of `(score of the positive class, is positive)` points: the Mann–Whitney statistic
/// with tied scores sharing their average rank; `None` unless both classes are there.
pub fn roc_auc(points: &mut [(f64, bool)]) -> Option<f64> {
    let positives = points.iter().filter(|(_, positive)| *positive).count();
    let negatives = points.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < points.len() {
        let mut end = start;
        while end + 1 < points.len() && points[end + 1].0 == points[start].0 {
            end += 1;
        }
        // Ranks start+1 ..= end+1 share their mean.
        let rank = (start + end) as f64 / 2.0 + 1.0;
        rank_sum += rank * points[start..=end].iter().filter(|(_, p)| *p).count() as f64;
        start = end + 1;
    }
    let p = positives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// A classifier's figures over a set of pairs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassFigures {
    /// Pairs.
    pub n: u64,
    /// Share of correct predictions.
    pub accuracy: Option<f64>,
    /// Mean log loss.
    pub log_loss: Option<f64>,
    /// Mean Brier score.
    pub brier: Option<f64>,
    /// Macro F1.
    pub f1_macro: Option<f64>,
    /// ROC AUC (two classes, over the window only).
    pub roc_auc: Option<f64>,
    /// Pairs whose true class the model did not know.
    pub unknown_class: u64,
    /// The confusion matrix (over the window only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Cell>,
    /// The calibration (over the window only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calibration: Vec<CalibrationBin>,
    /// Population stability index of the predicted classes against the version's first
    /// `QUALITY_WINDOW` predictions (a version's window only, once both are complete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_psi: Option<f64>,
}

/// One tenth of the confidence range: the pairs whose predicted class had a probability in it,
/// their mean confidence and how many were right. A calibrated model's accuracy equals its
/// confidence in every bin.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CalibrationBin {
    /// Lower end of the bin (`0.0`, `0.1`, … `0.9`).
    pub from: f64,
    /// Pairs in it.
    pub n: u64,
    /// Their mean confidence.
    pub confidence: f64,
    /// Their share of right predictions.
    pub accuracy: f64,
}

/// Ten bins of the pairs' `(confidence, correct)`, the empty ones left out.
fn calibration(points: impl Iterator<Item = (f64, bool)>) -> Vec<CalibrationBin> {
    let mut bins = [(0u64, 0.0f64, 0u64); 10];
    for (confidence, correct) in points {
        let bin = &mut bins[((confidence * 10.0) as usize).min(9)];
        bin.0 += 1;
        bin.1 += confidence;
        bin.2 += u64::from(correct);
    }
    bins.iter()
        .enumerate()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|(i, (n, sum, right))| CalibrationBin {
            from: i as f64 / 10.0,
            n: *n,
            confidence: sum / *n as f64,
            accuracy: *right as f64 / *n as f64,
        })
        .collect()
}

/// Population stability index of the predicted classes of `now` against `reference`, with
/// empty classes smoothed (1e-4) so a class that appears or vanishes counts without infinities.
pub fn prediction_psi(reference: &ClassSums, now: &ClassSums) -> Option<f64> {
    fn counts(sums: &ClassSums) -> HashMap<&str, u64> {
        let mut by_class: HashMap<&str, u64> = HashMap::new();
        for cell in &sums.confusion {
            *by_class.entry(cell.y_pred.as_str()).or_default() += cell.n;
        }
        by_class
    }
    let (before, after) = (counts(reference), counts(now));
    let (n_before, n_after) = (
        before.values().sum::<u64>() as f64,
        after.values().sum::<u64>() as f64,
    );
    if n_before == 0.0 || n_after == 0.0 {
        return None;
    }
    let classes: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
    Some(
        classes
            .iter()
            .map(|class| {
                let b = (before.get(class).copied().unwrap_or(0) as f64 / n_before).max(1e-4);
                let a = (after.get(class).copied().unwrap_or(0) as f64 / n_after).max(1e-4);
                (a - b) * (a / b).ln()
            })
            .sum(),
    )
}

impl ClassFigures {
    fn of(sums: &ClassSums, roc_auc: Option<f64>, with_confusion: bool) -> Self {
        Self {
            n: sums.n,
            accuracy: sums.accuracy(),
            log_loss: sums.log_loss(),
            brier: sums.brier(),
            f1_macro: sums.f1_macro(),
            roc_auc,
            unknown_class: sums.unknown,
            confusion: if with_confusion {
                sums.confusion.clone()
            } else {
                Vec::new()
            },
            calibration: Vec::new(),
            prediction_psi: None,
        }
    }
}

/// One model version's classification figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassVersion {
    /// Model version (`unknown` for none).
    pub model_version: String,
    /// Since start.
    pub all: ClassFigures,
    /// Over its last `QUALITY_WINDOW` pairs.
    pub window: ClassFigures,
    /// Its quality alarm, as `versions` of `GET /api/quality` has it.
    pub alarm: VersionAlarm,
}

/// What `GET /api/quality` says of a classifier.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassReport {
    /// Over every pair since start.
    pub all: ClassFigures,
    /// Over the last `QUALITY_WINDOW` pairs.
    pub window: ClassFigures,
    /// The kept versions, most recently seen first.
    pub versions: Vec<ClassVersion>,
}

/// The totals the checkpoint carries over a restart.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassTotals {
    /// All pairs.
    pub all: ClassSums,
    /// Per kept model version, most recently seen last.
    pub by_version: Vec<(String, ClassSums)>,
    /// Per kept model version: its first `QUALITY_WINDOW` pairs, the alarm's baseline.
    #[serde(default)]
    pub baselines: Vec<(String, ClassSums)>,
}

/// A pair as the window keeps it.
#[derive(Debug, Clone)]
struct Recent {
    y_true: String,
    y_pred: String,
    p_true: Option<f64>,
    brier: Option<f64>,
    known: bool,
    /// `(p of the positive class, is positive)` for two classes.
    point: Option<(f64, bool)>,
    /// `(confidence, correct)`, when the prediction had probabilities.
    confidence: Option<(f64, bool)>,
}

impl Recent {
    fn of(pair: &ClassPair) -> Self {
        let point = match (&pair.binary, pair.p_true) {
            (Some([_, positive]), Some(p)) => {
                let is_positive = pair.y_true.key() == positive.key();
                Some((if is_positive { p } else { 1.0 - p }, is_positive))
            }
            _ => None,
        };
        Self {
            y_true: pair.y_true.key().into_owned(),
            y_pred: pair.y_pred.key().into_owned(),
            p_true: pair.p_true,
            brier: pair.brier,
            known: pair.known,
            point,
            confidence: pair.p_pred.map(|p| (p, pair.correct())),
        }
    }
}

#[derive(Default)]
struct Window {
    recent: VecDeque<Recent>,
}

impl Window {
    fn push(&mut self, recent: Recent, size: usize) {
        if self.recent.len() == size {
            self.recent.pop_front();
        }
        self.recent.push_back(recent);
    }

    fn figures(&self) -> ClassFigures {
        self.figures_and_sums().0
    }

    /// The window's figures and the sums they come from.
    fn figures_and_sums(&self) -> (ClassFigures, ClassSums) {
        let mut sums = ClassSums::default();
        let mut points = Vec::with_capacity(self.recent.len());
        for r in &self.recent {
            sums.add(&r.y_true, &r.y_pred, r.p_true, r.brier, r.known);
            points.extend(r.point);
        }
        let auc = roc_auc(&mut points);
        let mut figures = ClassFigures::of(&sums, auc, true);
        figures.calibration = calibration(self.recent.iter().filter_map(|r| r.confidence));
        (figures, sums)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanLabel {
    span: &'static str,
}

/// One kept model version.
#[derive(Default)]
struct VersionStats {
    /// When it was last seen, in pairs observed: the smallest is dropped first.
    seen: u64,
    sums: ClassSums,
    /// Its first `QUALITY_WINDOW` pairs.
    baseline: ClassSums,
    window: Window,
    alarm_on: bool,
    /// Replaced by a newer version ([`RetireRule`]): its alarm is off.
    retired: bool,
    /// The tick at which its pair count last grew, and that count.
    last_active: Option<Instant>,
    pairs_at_tick: u64,
}

/// What a set of sums is judged on: log loss, or the error rate without probabilities.
fn judged(sums: &ClassSums) -> Option<(&'static str, f64)> {
    match sums.log_loss() {
        Some(log_loss) => Some(("log_loss", log_loss)),
        None => sums.accuracy().map(|a| ("error_rate", 1.0 - a)),
    }
}

/// The classification quality tracker and its metrics.
pub struct ClassQuality {
    all: ClassSums,
    window: Window,
    by_version: HashMap<String, VersionStats>,
    rule: AlarmRule,
    retire: RetireRule,
    alert_by_version: Family<VersionLabel, Gauge>,
    window_size: usize,
    versions_kept: usize,
    seen: u64,
    pairs: Counter,
    unknown: Counter,
    accuracy: Family<SpanLabel, FloatGauge>,
    log_loss: Family<SpanLabel, FloatGauge>,
    brier: Family<SpanLabel, FloatGauge>,
    f1: Family<SpanLabel, FloatGauge>,
    auc: Family<SpanLabel, FloatGauge>,
    accuracy_by_version: Family<VersionLabel, FloatGauge>,
    log_loss_by_version: Family<VersionLabel, FloatGauge>,
    psi_by_version: Family<VersionLabel, FloatGauge>,
    report: SharedAlarms,
}

impl ClassQuality {
    /// Registers the classification metrics; `pairs` is `pipeline_pairs_total` (counted for every
    /// task) and `report` the handle `GET /api/quality` reads.
    pub fn register(
        registry: &mut Registry,
        window_size: usize,
        versions_kept: usize,
        alert_ratio: f64,
        quality: &mut crate::quality::Quality,
    ) -> Self {
        let (pairs, report) = (quality.pairs_counter(), quality.shared_alarms());
        let alert_by_version = quality.hand_alarms_to_classifier();
        let quality = Self {
            all: ClassSums::default(),
            window: Window::default(),
            by_version: HashMap::new(),
            rule: AlarmRule { ratio: alert_ratio },
            retire: RetireRule {
                after: crate::alarm::DEFAULT_RETIRE_AFTER,
            },
            alert_by_version,
            window_size: window_size.max(1),
            versions_kept: versions_kept.max(1),
            seen: 0,
            pairs,
            unknown: Counter::default(),
            accuracy: Family::default(),
            log_loss: Family::default(),
            brier: Family::default(),
            f1: Family::default(),
            auc: Family::default(),
            accuracy_by_version: Family::default(),
            log_loss_by_version: Family::default(),
            psi_by_version: Family::default(),
            report,
        };
        let registry = registry.sub_registry_with_prefix("pipeline");
        registry.register(
            "unknown_class",
            "Pairs whose true class the model did not know (not among its probabilities)",
            quality.unknown.clone(),
        );
        for (name, help, family) in [
            (
                "model_accuracy",
                "Share of correct class predictions, since start (span=all) or over the last QUALITY_WINDOW pairs (span=window)",
                &quality.accuracy,
            ),
            (
                "model_log_loss",
                "Mean log loss of the class probabilities, by span",
                &quality.log_loss,
            ),
            (
                "model_brier",
                "Mean Brier score of the class probabilities, by span",
                &quality.brier,
            ),
            (
                "model_f1_macro",
                "Macro-averaged F1 of the class predictions, by span",
                &quality.f1,
            ),
            (
                "model_roc_auc",
                "ROC AUC of a two-class model over the last QUALITY_WINDOW pairs (span=window)",
                &quality.auc,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "model_accuracy_by_version",
            "Share of correct class predictions since start, per model version",
            quality.accuracy_by_version.clone(),
        );
        registry.register(
            "model_log_loss_by_version",
            "Mean log loss since start, per model version",
            quality.log_loss_by_version.clone(),
        );
        registry.register(
            "prediction_drift_psi",
            "Population stability index of a version's predicted classes over its last QUALITY_WINDOW pairs against its first QUALITY_WINDOW (above 0.2: the mix of predictions moved)",
            quality.psi_by_version.clone(),
        );
        quality
    }

    /// The tracker of a classifier under `TASK=classification`, else none; counting its pairs
    /// in `quality`'s `pipeline_pairs_total` and reporting in its `GET /api/quality`.
    pub fn for_task(
        config: &crate::config::Config,
        registry: &mut Registry,
        quality: &mut crate::quality::Quality,
    ) -> Option<Self> {
        (config.task == pipeline::classes::Task::Classification).then(|| {
            Self::register(
                registry,
                config.quality_window,
                config.model_versions_kept as usize,
                config.quality_alert_ratio,
                quality,
            )
            .with_retire_after(Duration::from_secs(config.quality_retire_secs))
        })
    }

    /// Retires a version after `after` without pairs while a newer one has them
    /// (`QUALITY_RETIRE_SECS`), as for a regressor.
    pub fn with_retire_after(mut self, after: Duration) -> Self {
        self.retire = RetireRule { after };
        self
    }

    /// Retires the versions replaced for `QUALITY_RETIRE_SECS` and brings back one that
    /// receives pairs again (a rollback).
    fn retire_replaced(&mut self, now: Instant) {
        for stats in self.by_version.values_mut() {
            if stats.last_active.is_none() || stats.sums.n != stats.pairs_at_tick {
                stats.last_active = Some(now);
                stats.pairs_at_tick = stats.sums.n;
            }
        }
        let newest = self.by_version.values().filter_map(|s| s.last_active).max();
        for (name, stats) in &mut self.by_version {
            let (Some(last), Some(newest)) = (stats.last_active, newest) else {
                continue;
            };
            let retired = self.retire.is_retired(last, newest, now);
            if retired && !stats.retired {
                tracing::info!(
                    model_version = %name,
                    "model version retired: no pair for QUALITY_RETIRE_SECS while a newer one has them; its quality alarm is cleared"
                );
                stats.alarm_on = false;
            } else if !retired && stats.retired {
                tracing::info!(model_version = %name, "retired model version receives pairs again (a rollback?): current again");
                // Judged afresh on the pairs that follow.
                stats.window = Window::default();
            }
            stats.retired = retired;
        }
    }

    /// Adds one new pair: to the totals and to the windows.
    pub fn observe(&mut self, pair: &ClassPair) {
        self.add_to_totals(pair);
        self.add_to_window(pair);
    }

    /// Adds a pair to the windows only (a recent row read back, already in the totals).
    pub fn add_to_window(&mut self, pair: &ClassPair) {
        let recent = Recent::of(pair);
        let size = self.window_size;
        if let Some(stats) = self.version_entry(pair) {
            stats.window.push(recent.clone(), size);
        }
        self.window.push(recent, size);
    }

    /// Adds a pair to the totals only.
    pub fn add_to_totals(&mut self, pair: &ClassPair) {
        self.all.add_pair(pair);
        let size = self.window_size as u64;
        if let Some(stats) = self.version_entry(pair) {
            stats.sums.add_pair(pair);
            if stats.baseline.n < size {
                stats.baseline.add_pair(pair);
            }
        }
        self.pairs.inc();
        if !pair.known {
            self.unknown.inc();
        }
    }

    /// The entry of the pair's version, created when new (the least recently seen dropped beyond
    /// `MODEL_VERSIONS_KEPT`), marked as seen now.
    fn version_entry(&mut self, pair: &ClassPair) -> Option<&mut VersionStats> {
        let version = pair.model_version.as_deref().unwrap_or("unknown");
        self.seen += 1;
        if !self.by_version.contains_key(version) && self.by_version.len() >= self.versions_kept {
            let oldest = self
                .by_version
                .iter()
                .min_by_key(|(_, stats)| stats.seen)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.by_version.remove(&oldest);
                let label = VersionLabel {
                    model_version: oldest,
                };
                self.accuracy_by_version.remove(&label);
                self.log_loss_by_version.remove(&label);
                self.psi_by_version.remove(&label);
                self.alert_by_version.remove(&label);
            }
        }
        let entry = self.by_version.entry(version.to_owned()).or_default();
        entry.seen = self.seen;
        Some(entry)
    }

    /// The totals for the checkpoint.
    pub fn totals(&self) -> ClassTotals {
        let mut versions: Vec<(&String, &VersionStats)> = self.by_version.iter().collect();
        versions.sort_by_key(|(_, stats)| stats.seen);
        ClassTotals {
            all: self.all.clone(),
            by_version: versions
                .iter()
                .map(|(name, stats)| ((*name).clone(), stats.sums.clone()))
                .collect(),
            baselines: versions
                .iter()
                .map(|(name, stats)| ((*name).clone(), stats.baseline.clone()))
                .collect(),
        }
    }

    /// Puts back the checkpoint's totals.
    pub fn restore(&mut self, totals: &ClassTotals) {
        self.all = totals.all.clone();
        self.pairs.inc_by(totals.all.n);
        self.unknown.inc_by(totals.all.unknown);
        for (name, sums) in &totals.by_version {
            self.seen += 1;
            let baseline = totals
                .baselines
                .iter()
                .find(|(version, _)| version == name)
                .map(|(_, baseline)| baseline.clone())
                .unwrap_or_default();
            self.by_version.insert(
                name.clone(),
                VersionStats {
                    seen: self.seen,
                    sums: sums.clone(),
                    baseline,
                    ..VersionStats::default()
                },
            );
        }
    }

    /// Recomputes the gauges and the report (the tick).
    pub fn update(&mut self) {
        self.update_at(Instant::now());
    }

    /// [`Self::update`] as of `now`.
    pub fn update_at(&mut self, now: Instant) {
        self.retire_replaced(now);
        let all = ClassFigures::of(&self.all, None, false);
        let window = self.window.figures();
        for (span, figures) in [("all", &all), ("window", &window)] {
            let label = SpanLabel { span };
            let set = |family: &Family<SpanLabel, FloatGauge>, value: Option<f64>| {
                if let Some(value) = value {
                    family.get_or_create(&label).set(value);
                }
            };
            set(&self.accuracy, figures.accuracy);
            set(&self.log_loss, figures.log_loss);
            set(&self.brier, figures.brier);
            set(&self.f1, figures.f1_macro);
            set(&self.auc, figures.roc_auc);
        }
        let full = self.window_size as u64;
        let mut versions: Vec<(u64, ClassVersion, VersionAlarm)> = Vec::new();
        for (name, stats) in &mut self.by_version {
            let label = VersionLabel {
                model_version: name.clone(),
            };
            if let Some(accuracy) = stats.sums.accuracy() {
                self.accuracy_by_version.get_or_create(&label).set(accuracy);
            }
            if let Some(log_loss) = stats.sums.log_loss() {
                self.log_loss_by_version.get_or_create(&label).set(log_loss);
            }
            let (mut window, window_sums) = stats.window.figures_and_sums();
            if stats.baseline.n >= full && window_sums.n >= full {
                window.prediction_psi = prediction_psi(&stats.baseline, &window_sums);
                if let Some(psi) = window.prediction_psi {
                    self.psi_by_version.get_or_create(&label).set(psi);
                }
            }
            let baseline = (stats.baseline.n >= full)
                .then(|| judged(&stats.baseline))
                .flatten();
            let windowed = (window_sums.n >= full)
                .then(|| judged(&window_sums))
                .flatten();
            // Judged on one measure: log loss against log loss, error rate against error rate.
            let windowed = match (baseline, windowed) {
                (Some((a, _)), Some((b, value))) if a == b => Some(value),
                _ => None,
            };
            let measure = baseline.map(|(measure, _)| measure);
            let baseline = baseline.map(|(_, value)| value);
            // A retired version is not judged: its alarm stays off.
            let step = if stats.retired {
                None
            } else {
                self.rule.step(stats.alarm_on, baseline, windowed)
            };
            match step {
                Some(AlarmChange::Raised) => {
                    stats.alarm_on = true;
                    tracing::warn!(
                        model_version = %name,
                        measure,
                        windowed,
                        baseline,
                        "model quality alarm: the windowed {} is above QUALITY_ALERT_RATIO times the version's baseline",
                        measure.unwrap_or("measure")
                    );
                }
                Some(AlarmChange::Lowered) => {
                    stats.alarm_on = false;
                    tracing::info!(
                        model_version = %name,
                        measure,
                        windowed,
                        baseline,
                        "model quality alarm cleared: back within QUALITY_ALERT_RATIO times the baseline"
                    );
                }
                None => {}
            }
            self.alert_by_version
                .get_or_create(&label)
                .set(i64::from(stats.alarm_on));
            versions.push((
                stats.seen,
                ClassVersion {
                    model_version: name.clone(),
                    all: ClassFigures::of(&stats.sums, None, false),
                    window,
                    alarm: VersionAlarm::default(),
                },
                VersionAlarm {
                    model_version: name.clone(),
                    alarm: stats.alarm_on,
                    pairs: stats.sums.n,
                    windowed_mae: None,
                    baseline_mae: None,
                    threshold: baseline.map(|b| self.rule.ratio * b),
                    retired: stats.retired,
                    measure,
                    windowed,
                    baseline,
                },
            ));
        }
        versions.sort_by_key(|(seen, _, _)| std::cmp::Reverse(*seen));
        let alarms: Vec<VersionAlarm> = versions.iter().map(|(_, _, a)| a.clone()).collect();
        let report = ClassReport {
            all,
            window,
            versions: versions
                .into_iter()
                .map(|(_, version, alarm)| ClassVersion { alarm, ..version })
                .collect(),
        };
        let mut shared = self.report.lock().unwrap_or_else(|p| p.into_inner());
        shared.versions = alarms;
        shared.classification = Some(report);
    }

    /// The report as of the last [`Self::update`], for the dashboard.
    pub fn report(&self) -> Option<ClassReport> {
        let shared = self.report.lock().unwrap_or_else(|p| p.into_inner());
        shared.classification.clone()
    }

    /// The figures since start.
    pub fn all(&self) -> &ClassSums {
        &self.all
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod recovery_tests;
