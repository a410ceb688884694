//! The quality alarm and retirement rules, as plain data, and the alarm report `GET /api/quality`
//! serves (the trainer reads it). [`crate::quality::Quality`] applies them per model version.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The quality alarm's rule, plain data: on while the windowed MAE of a version is above `ratio`
/// times its baseline MAE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmRule {
    /// `QUALITY_ALERT_RATIO`.
    pub ratio: f64,
}

/// A change of a version's quality alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    /// The windowed MAE went above the threshold.
    Raised,
    /// It came back to or below the threshold.
    Lowered,
}

impl AlarmRule {
    /// Whether the alarm should be on; `None` (undecided) while the baseline or the window is not
    /// complete yet: a version needs `QUALITY_WINDOW` pairs before it is judged.
    pub fn decide(&self, baseline_mae: Option<f64>, window_mae: Option<f64>) -> Option<bool> {
        Some(window_mae? > self.ratio * baseline_mae?)
    }

    /// The change from `was_on`, if any; undecided keeps the alarm as it is (a restart that has
    /// not refilled a version's window yet neither raises nor lowers it).
    pub fn step(
        &self,
        was_on: bool,
        baseline_mae: Option<f64>,
        window_mae: Option<f64>,
    ) -> Option<AlarmChange> {
        match (was_on, self.decide(baseline_mae, window_mae)?) {
            (false, true) => Some(AlarmChange::Raised),
            (true, false) => Some(AlarmChange::Lowered),
            _ => None,
        }
    }
}

/// When a version is retired, plain data: once it has had no pair for `after` while another
/// version had one more recently. "More recently", not "now": after a rollback the older version
/// is the one receiving pairs, and the one rolled back from retires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetireRule {
    /// `QUALITY_RETIRE_SECS`.
    pub after: Duration,
}

impl RetireRule {
    /// Whether a version whose last pair came at `last` is retired at `now`, when the most recent
    /// pair of any version came at `newest`.
    pub fn is_retired(&self, last: Instant, newest: Instant, now: Instant) -> bool {
        newest > last && now.saturating_duration_since(last) >= self.after
    }
}

/// The default of `QUALITY_RETIRE_SECS`.
pub const DEFAULT_RETIRE_AFTER: Duration = Duration::from_secs(60);

/// One model version's quality alarm, as `GET /api/quality` shows it (the trainer reads it).
/// Numbers the alarm is not judged on yet are `None` (`null`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct VersionAlarm {
    /// Model version (`unknown` for none).
    pub model_version: String,
    /// Whether its quality alarm is on (`pipeline_model_quality_alert`).
    pub alarm: bool,
    /// Pairs since start.
    pub pairs: u64,
    /// MAE over its last `QUALITY_WINDOW` pairs, once it had that many.
    pub windowed_mae: Option<f64>,
    /// MAE over its first `QUALITY_WINDOW` pairs, once it had that many.
    pub baseline_mae: Option<f64>,
    /// `QUALITY_ALERT_RATIO` times the baseline: the alarm is on while the windowed MAE is above.
    pub threshold: Option<f64>,
    /// Replaced by a newer version ([`RetireRule`]): its alarm is off and it has no series.
    pub retired: bool,
    /// A classifier's alarm: what it is judged on, `log_loss` (or `error_rate`, 1 - accuracy,
    /// for a model that sends no probabilities); the MAE fields are then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measure: Option<&'static str>,
    /// A classifier's measure over its last `QUALITY_WINDOW` pairs, once it had that many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windowed: Option<f64>,
    /// A classifier's measure over its first `QUALITY_WINDOW` pairs, once it had that many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
}

/// Every kept model version's alarm, most recently seen first: those not retired are the versions
/// `pipeline_model_quality_alert` exports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AlarmReport {
    /// One entry per kept version.
    pub versions: Vec<VersionAlarm>,
    /// A classifier's figures (`TASK=classification`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classification: Option<crate::classification::ClassReport>,
}

/// The last [`AlarmReport`], shared with the HTTP handler.
pub type SharedAlarms = Arc<Mutex<AlarmReport>>;
