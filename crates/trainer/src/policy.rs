//! The trainer's decisions as plain data, with unit and property tests: when to retrain (every
//! `RETRAIN_EVERY` new labels, or on a rising quality alarm of the served version), how the window
//! is split into training rows and the holdout, and whether a candidate is promoted.

use serde::Deserialize;
use std::collections::HashMap;

/// What started a retrain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// `RETRAIN_EVERY` new labelled samples since the last retrain.
    Labels,
    /// `POST /retrain`.
    Manual,
    /// The metric service's quality alarm rose for the served version.
    Alarm,
}

impl Trigger {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Labels => "labels",
            Self::Manual => "manual",
            Self::Alarm => "alarm",
        }
    }
}

/// Counts new labelled samples and says when `RETRAIN_EVERY` of them have come in since the last
/// retrain (of any trigger). `every = 0` never asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrainSchedule {
    every: u64,
    since: u64,
}

impl RetrainSchedule {
    /// A schedule asking every `every` labels (0: never).
    pub fn new(every: u64) -> Self {
        Self { every, since: 0 }
    }

    /// `n` more labelled samples joined; `true` when a retrain is due now (the count starts
    /// again).
    pub fn labelled(&mut self, n: u64) -> bool {
        if self.every == 0 {
            return false;
        }
        self.since = self.since.saturating_add(n);
        if self.since >= self.every {
            self.since = 0;
            true
        } else {
            false
        }
    }

    /// A retrain ran (whatever started it): count from 0 again, as its window held these labels.
    pub fn retrained(&mut self) {
        self.since = 0;
    }

    /// Labels since the last retrain.
    pub fn since(&self) -> u64 {
        self.since
    }
}

/// Follows the metric service's quality alarm per model version (`GET /api/quality`) and says when the
/// served version's alarm rises: off (or never seen) in the last reading, on in this one. A version
/// whose alarm stays on asks once, not on every poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlarmEdge {
    last: HashMap<String, bool>,
}

impl AlarmEdge {
    /// Records one reading (`version -> alarm on`) and returns whether the `served` version's
    /// alarm has just risen.
    pub fn observe(&mut self, reading: HashMap<String, bool>, served: &str) -> bool {
        let was_on = self.last.get(served).copied().unwrap_or(false);
        let is_on = reading.get(served).copied().unwrap_or(false);
        self.last = reading;
        is_on && !was_on
    }
}

/// The body of the metric service's `GET /api/quality`; only what the trainer needs is read
/// (each entry also carries `pairs`, `windowed_mae`, `baseline_mae` and `threshold`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct QualityReport {
    /// One entry per model version the metric service has seen.
    pub versions: Vec<VersionQuality>,
}

/// The quality alarm of one model version.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct VersionQuality {
    /// The version, as carried on its predictions.
    pub model_version: String,
    /// Whether its windowed MAE is above the threshold now.
    pub alarm: bool,
    /// Pairs joined for it so far (absent from older metric services).
    #[serde(default)]
    pub pairs: u64,
    /// Replaced for `QUALITY_RETIRE_SECS` (absent from older metric services).
    #[serde(default)]
    pub retired: bool,
}

impl QualityReport {
    /// `version -> alarm on`, the reading [`AlarmEdge::observe`] takes.
    pub fn alarms(&self) -> HashMap<String, bool> {
        self.versions
            .iter()
            .map(|v| (v.model_version.clone(), v.alarm))
            .collect()
    }
}

/// Which version the model replicas serve now, as their predictions show it: the version whose
/// pair count grew most between two quality reports. While `MODEL_PATH` is not a valid artifact
/// this is the model a candidate is measured against (the replicas kept serving what they had).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedVersion {
    pairs: HashMap<String, u64>,
    current: Option<String>,
}

impl ServedVersion {
    /// Takes one report and returns the served version. A version not seen before counts all its
    /// pairs as growth; the largest growth wins (during a rollout both grow: the one with more
    /// traffic; on a tie, the name last in byte order). With no growth the last answer stands,
    /// unless that version is retired or gone.
    pub fn observe(&mut self, report: &QualityReport) -> Option<&str> {
        let live = report.versions.iter().filter(|v| !v.retired);
        let grown = live
            .map(|v| {
                let before = self.pairs.get(&v.model_version).copied().unwrap_or(0);
                (v.pairs.saturating_sub(before), &v.model_version)
            })
            .filter(|(growth, _)| *growth > 0)
            .max();
        match grown {
            Some((_, version)) => self.current = Some(version.clone()),
            None => {
                let still_live = report
                    .versions
                    .iter()
                    .any(|v| !v.retired && Some(&v.model_version) == self.current.as_ref());
                if !still_live {
                    self.current = None;
                }
            }
        }
        self.pairs = report
            .versions
            .iter()
            .map(|v| (v.model_version.clone(), v.pairs))
            .collect();
        self.current.as_deref()
    }

    /// The last answer of [`ServedVersion::observe`].
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }
}

/// The quality alarms in a `GET /api/quality` body: `version -> on`.
pub fn parse_alarms(body: &[u8]) -> Result<HashMap<String, bool>, serde_json::Error> {
    serde_json::from_slice::<QualityReport>(body).map(|report| report.alarms())
}

/// How a window of `len` samples (oldest first) is cut: the oldest `train` rows fit the
/// candidate, the newest `holdout` rows score it and the served model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Rows the candidate is fitted on (the oldest).
    pub train: usize,
    /// Rows both models are scored on (the newest: after a drift they are the ones that matter).
    pub holdout: usize,
}

/// Fewest holdout rows for a comparison worth making.
pub const MIN_HOLDOUT: usize = 10;

/// Cuts `len` samples: the newest `ceil(len × fraction)` are the holdout. `None` when there are
/// too few for a fit of `n_features` coefficients (at least twice as many training rows as
/// parameters) and a holdout of [`MIN_HOLDOUT`] rows, or when `fraction` is not in (0, 1).
pub fn split(len: usize, fraction: f64, n_features: usize) -> Option<Split> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return None;
    }
    let holdout = ((len as f64) * fraction).ceil() as usize;
    let holdout = holdout.max(MIN_HOLDOUT);
    let train = len.checked_sub(holdout)?;
    (train >= 2 * (n_features + 1)).then_some(Split { train, holdout })
}

/// What happens to a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its holdout MAE is lower by at least the required gain: it becomes the served model.
    Promote,
    /// Not better enough (or not a number): the served model stays.
    Refuse,
}

/// The promotion guard. `min_gain` is relative (`PROMOTE_MIN_GAIN`, e.g. 0.05 = 5 %): the
/// candidate is promoted only if `candidate_mae <= serving_mae × (1 − min_gain)` and it is a finite
/// number. Relative, so one setting fits any target's units; with `min_gain = 0` it must still be
/// no worse.
pub fn decide(serving_mae: f64, candidate_mae: f64, min_gain: f64) -> Verdict {
    let finite = candidate_mae.is_finite() && candidate_mae >= 0.0;
    // A served model that cannot even be scored (NaN) is beaten by any finite candidate.
    let beats = !serving_mae.is_finite() || candidate_mae <= serving_mae * (1.0 - min_gain);
    if finite && beats {
        Verdict::Promote
    } else {
        Verdict::Refuse
    }
}

/// The guard when no served model can be read (`MODEL_PATH` exists but is not a valid artifact):
/// there is nothing to beat, so only the absolute guards hold: the candidate's holdout MAE is a
/// finite, non-negative number ([`split`] has already demanded enough rows to fit and score, and
/// the candidate has the width of the `DATA_PATH` data the replicas were started on).
pub fn decide_unserved(candidate_mae: f64) -> Verdict {
    if candidate_mae.is_finite() && candidate_mae >= 0.0 {
        Verdict::Promote
    } else {
        Verdict::Refuse
    }
}

/// How a model did on the holdout: its loss (MAE for a regressor, log loss for a classifier) and,
/// for a classifier, its accuracy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// Lower is better: MAE, or log loss.
    pub loss: f64,
    /// A classifier's share of right predictions.
    pub accuracy: Option<f64>,
}

/// The guard of any task: [`decide`] on the loss, and for a classifier accuracy as a floor: a
/// candidate that is more confident (lower log loss) but right less often than the served model
/// is refused.
pub fn decide_scores(serving: Score, candidate: Score, min_gain: f64) -> Verdict {
    let floor_holds = match (serving.accuracy, candidate.accuracy) {
        (Some(served), Some(new)) if served.is_finite() => new >= served,
        (_, Some(new)) => new.is_finite(),
        _ => true,
    };
    if floor_holds {
        decide(serving.loss, candidate.loss, min_gain)
    } else {
        Verdict::Refuse
    }
}

/// The relative gain of `candidate_mae` over `serving_mae` (0.3 = 30 % lower), for the log.
pub fn gain(serving_mae: f64, candidate_mae: f64) -> f64 {
    if serving_mae > 0.0 {
        1.0 - candidate_mae / serving_mae
    } else {
        0.0
    }
}

/// The next version name `v<N>`: one more than the highest `N` among `existing` names of that
/// form (other names are ignored), starting at `v1`.
pub fn next_version<'a>(existing: impl IntoIterator<Item = &'a str>) -> String {
    let highest = existing
        .into_iter()
        .filter_map(|name| name.strip_prefix('v')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("v{}", highest + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_schedule_asks_every_n_labels() {
        let mut schedule = RetrainSchedule::new(500);
        assert!(!schedule.labelled(499));
        assert!(schedule.labelled(1));
        assert_eq!(schedule.since(), 0);
        assert!(!schedule.labelled(300));
        schedule.retrained();
        assert!(!schedule.labelled(300));
        assert!(schedule.labelled(200));
        let mut off = RetrainSchedule::new(0);
        assert!(!off.labelled(u64::MAX));
    }

    #[test]
    fn only_a_rising_alarm_of_the_served_version_asks() {
        let mut edge = AlarmEdge::default();
        let reading = |pairs: &[(&str, bool)]| {
            pairs
                .iter()
                .map(|(v, on)| ((*v).to_owned(), *on))
                .collect::<HashMap<_, _>>()
        };
        assert!(!edge.observe(reading(&[("v1", false)]), "v1"));
        assert!(edge.observe(reading(&[("v1", true)]), "v1"));
        // Still on: asked once.
        assert!(!edge.observe(reading(&[("v1", true)]), "v1"));
        // Another version's alarm does not ask; the old version's stays on after a promotion.
        assert!(!edge.observe(reading(&[("v1", true), ("v2", false)]), "v2"));
        assert!(edge.observe(reading(&[("v1", true), ("v2", true)]), "v2"));
        // Off, then on again: asks again.
        assert!(!edge.observe(reading(&[("v2", false)]), "v2"));
        assert!(edge.observe(reading(&[("v2", true)]), "v2"));
        // On at the first reading (the trainer started during an alarm): asks.
        assert!(AlarmEdge::default().observe(reading(&[("v9", true)]), "v9"));
    }

    #[test]
    fn alarms_are_read_from_the_quality_endpoint() {
        let body = br#"{"versions":[{"model_version":"ols-1bbf9343466e","alarm":false,"pairs":1234,"windowed_mae":45.1,"baseline_mae":42.9,"threshold":53.6},{"model_version":"v2","alarm":true,"pairs":10,"windowed_mae":60.0,"baseline_mae":42.9,"threshold":53.6}]}"#;
        let alarms = parse_alarms(body).unwrap();
        assert_eq!(alarms.len(), 2, "{alarms:?}");
        assert!(!alarms["ols-1bbf9343466e"]);
        assert!(alarms["v2"]);
        // Numbers not known yet are null; only the version and the alarm are read.
        let fresh = br#"{"versions":[{"model_version":"v3","alarm":false,"pairs":0,"windowed_mae":null,"baseline_mae":null,"threshold":null}]}"#;
        assert_eq!(
            parse_alarms(fresh).unwrap(),
            HashMap::from([("v3".to_owned(), false)])
        );
        // No version seen yet.
        assert!(parse_alarms(br#"{"versions":[]}"#).unwrap().is_empty());
        // Not the endpoint's body (an HTML error page, the Prometheus text, a missing field).
        assert!(parse_alarms(b"<html>502</html>").is_err());
        assert!(parse_alarms(b"pipeline_model_quality_alert{model_version=\"v\"} 1\n").is_err());
        assert!(parse_alarms(br#"{"versions":[{"model_version":"v"}]}"#).is_err());
    }

    #[test]
    fn a_reading_of_the_endpoint_drives_the_edge() {
        let mut edge = AlarmEdge::default();
        let body = |alarm: bool| {
            format!(
                r#"{{"versions":[{{"model_version":"ols-1","alarm":{alarm},"pairs":1,"windowed_mae":1.0,"baseline_mae":1.0,"threshold":1.25}}]}}"#
            )
        };
        assert!(!edge.observe(parse_alarms(body(false).as_bytes()).unwrap(), "ols-1"));
        assert!(edge.observe(parse_alarms(body(true).as_bytes()).unwrap(), "ols-1"));
        assert!(!edge.observe(parse_alarms(body(true).as_bytes()).unwrap(), "ols-1"));
        // The served version is not in the report (no pairs yet): no alarm.
        assert!(!edge.observe(parse_alarms(body(true).as_bytes()).unwrap(), "ols-2"));
    }

    #[test]
    fn the_newest_fraction_is_the_holdout() {
        assert_eq!(
            split(1000, 0.2, 10),
            Some(Split {
                train: 800,
                holdout: 200
            })
        );
        assert_eq!(split(101, 0.2, 10).unwrap().holdout, 21);
        // A small window still gets MIN_HOLDOUT rows to score on.
        assert_eq!(split(40, 0.1, 1).unwrap().holdout, MIN_HOLDOUT);
        assert_eq!(split(30, 0.2, 10), None);
        assert_eq!(split(1000, 0.0, 10), None);
        assert_eq!(split(1000, 1.0, 10), None);
        assert_eq!(split(1000, f64::NAN, 10), None);
    }

    #[test]
    fn the_guard_needs_the_relative_gain() {
        assert_eq!(decide(60.0, 43.0, 0.05), Verdict::Promote);
        assert_eq!(decide(60.0, 57.0, 0.05), Verdict::Promote);
        assert_eq!(decide(60.0, 57.1, 0.05), Verdict::Refuse);
        assert_eq!(decide(43.0, 80.0, 0.05), Verdict::Refuse);
        assert_eq!(decide(43.0, 43.0, 0.0), Verdict::Promote);
        assert_eq!(decide(43.0, f64::NAN, 0.0), Verdict::Refuse);
        assert_eq!(decide(43.0, f64::INFINITY, 0.0), Verdict::Refuse);
        assert_eq!(decide(f64::NAN, 43.0, 0.05), Verdict::Promote);
        assert!((gain(60.0, 45.0) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn without_a_served_model_only_the_absolute_guards_hold() {
        assert_eq!(decide_unserved(43.0), Verdict::Promote);
        assert_eq!(decide_unserved(0.0), Verdict::Promote);
        assert_eq!(decide_unserved(1e9), Verdict::Promote);
        assert_eq!(decide_unserved(f64::NAN), Verdict::Refuse);
        assert_eq!(decide_unserved(f64::INFINITY), Verdict::Refuse);
        assert_eq!(decide_unserved(-1.0), Verdict::Refuse);
    }

    #[test]
    fn a_classifier_needs_a_lower_log_loss_and_no_lower_accuracy() {
        let served = Score {
            loss: 0.40,
            accuracy: Some(0.90),
        };
        let score = |loss, accuracy| Score {
            loss,
            accuracy: Some(accuracy),
        };
        assert_eq!(
            decide_scores(served, score(0.30, 0.91), 0.05),
            Verdict::Promote
        );
        assert_eq!(
            decide_scores(served, score(0.30, 0.89), 0.05),
            Verdict::Refuse,
            "accuracy floor"
        );
        assert_eq!(
            decide_scores(served, score(0.39, 0.95), 0.05),
            Verdict::Refuse,
            "gain"
        );
        assert_eq!(
            decide_scores(served, score(f64::NAN, 0.95), 0.05),
            Verdict::Refuse
        );
        // A regressor's score has no accuracy: the MAE guard alone.
        let mae = |loss| Score {
            loss,
            accuracy: None,
        };
        assert_eq!(decide_scores(mae(10.0), mae(9.0), 0.05), Verdict::Promote);
        assert_eq!(decide_scores(mae(10.0), mae(9.6), 0.05), Verdict::Refuse);
    }

    #[test]
    fn versions_count_up() {
        assert_eq!(next_version([]), "v1");
        assert_eq!(next_version(["v1", "v3", "ols-abc", "v2x", "model"]), "v4");
    }

    fn report(entries: &[(&str, u64, bool)]) -> QualityReport {
        QualityReport {
            versions: entries
                .iter()
                .map(|&(version, pairs, retired)| VersionQuality {
                    model_version: version.to_owned(),
                    alarm: false,
                    pairs,
                    retired,
                })
                .collect(),
        }
    }

    #[test]
    fn the_served_version_is_the_one_whose_pairs_grow() {
        let mut served = ServedVersion::default();
        assert_eq!(served.observe(&report(&[])), None);
        assert_eq!(
            served.observe(&report(&[("ols-1", 500, false)])),
            Some("ols-1")
        );
        // A promotion: v1 appears and grows, ols-1 has more pairs in all but no longer grows.
        assert_eq!(
            served.observe(&report(&[("ols-1", 510, false), ("v1", 40, false)])),
            Some("v1")
        );
        // Nothing moves (the pipeline is idle): the answer stands.
        assert_eq!(
            served.observe(&report(&[("ols-1", 510, false), ("v1", 40, false)])),
            Some("v1")
        );
        // A rollback: ols-1 grows again.
        assert_eq!(
            served.observe(&report(&[("ols-1", 530, false), ("v1", 41, false)])),
            Some("ols-1")
        );
        // Retired without growth: no answer rather than a stale one.
        assert_eq!(
            served.observe(&report(&[("ols-1", 530, true), ("v1", 41, true)])),
            None
        );
        // Older metric services send neither pairs nor retired: never an answer.
        let older: QualityReport =
            serde_json::from_str(r#"{"versions":[{"model_version":"v1","alarm":false}]}"#).unwrap();
        assert_eq!(ServedVersion::default().observe(&older), None);
    }

    proptest! {
        /// The served version is always one the last report lists as not retired.
        #[test]
        fn the_served_version_is_a_live_one_of_the_last_report(
            reports in prop::collection::vec(
                prop::collection::vec((0..4u8, 0..1000u64, any::<bool>()), 0..5),
                1..12,
            )
        ) {
            let mut served = ServedVersion::default();
            for entries in reports {
                let mut seen = std::collections::HashSet::new();
                let entries: Vec<(String, u64, bool)> = entries
                    .into_iter()
                    .filter(|(v, _, _)| seen.insert(*v))
                    .map(|(v, pairs, retired)| (format!("v{v}"), pairs, retired))
                    .collect();
                let borrowed: Vec<(&str, u64, bool)> =
                    entries.iter().map(|(v, p, r)| (v.as_str(), *p, *r)).collect();
                let answer = served.observe(&report(&borrowed)).map(str::to_owned);
                if let Some(answer) = answer {
                    prop_assert!(entries.iter().any(|(v, _, r)| *v == answer && !*r));
                }
            }
        }

        /// A promoted candidate is never worse than the served model, and at least `min_gain`
        /// better (relative).
        #[test]
        fn promotion_implies_the_gain(
            serving in 0.0f64..1e6,
            candidate in 0.0f64..1e6,
            min_gain in 0.0f64..0.9,
        ) {
            if decide(serving, candidate, min_gain) == Verdict::Promote {
                prop_assert!(candidate <= serving);
                prop_assert!(candidate <= serving * (1.0 - min_gain));
            } else {
                prop_assert!(candidate > serving * (1.0 - min_gain));
            }
        }

        /// With no served model, the verdict is the one against a served model that cannot be
        /// scored, whatever the gain asked: a served model never makes the guard looser.
        #[test]
        fn the_unserved_guard_is_the_loosest(
            candidate in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -1e3f64..1e6],
            serving in 0.0f64..1e6,
            min_gain in 0.0f64..0.9,
        ) {
            prop_assert_eq!(decide_unserved(candidate), decide(f64::NAN, candidate, min_gain));
            if decide(serving, candidate, min_gain) == Verdict::Promote {
                prop_assert_eq!(decide_unserved(candidate), Verdict::Promote);
            }
        }

        /// A stricter guard never promotes what a looser one refuses.
        #[test]
        fn the_classifier_guard_is_the_loss_guard_and_the_floor(
            served_loss in 0.01f64..5.0, new_loss in 0.01f64..5.0,
            served_acc in 0.0f64..1.0, new_acc in 0.0f64..1.0, min_gain in 0.0f64..0.5,
        ) {
            let verdict = decide_scores(
                Score { loss: served_loss, accuracy: Some(served_acc) },
                Score { loss: new_loss, accuracy: Some(new_acc) },
                min_gain,
            );
            let expected = if new_acc >= served_acc {
                decide(served_loss, new_loss, min_gain)
            } else {
                Verdict::Refuse
            };
            prop_assert_eq!(verdict, expected);
        }

        #[test]
        fn a_stricter_guard_promotes_less(
            serving in 0.0f64..1e6,
            candidate in 0.0f64..1e6,
            a in 0.0f64..0.9,
            b in 0.0f64..0.9,
        ) {
            let (loose, strict) = if a <= b { (a, b) } else { (b, a) };
            if decide(serving, candidate, strict) == Verdict::Promote {
                prop_assert_eq!(decide(serving, candidate, loose), Verdict::Promote);
            }
        }

        /// The units of the target do not matter: scaling both MAEs keeps the verdict.
        #[test]
        fn the_guard_is_scale_free(
            serving in 1e-3f64..1e3,
            candidate in 1e-3f64..1e3,
            min_gain in 0.0f64..0.9,
            scale in prop::sample::select(vec![0.001, 0.5, 2.0, 1024.0]),
        ) {
            prop_assert_eq!(
                decide(serving, candidate, min_gain),
                decide(serving * scale, candidate * scale, min_gain)
            );
        }

        /// Retrains asked by the schedule: at most one per `every` labels, however they arrive.
        #[test]
        fn the_schedule_asks_once_per_every_labels(
            every in 1u64..50,
            batches in prop::collection::vec(1u64..10, 0..200),
        ) {
            let mut schedule = RetrainSchedule::new(every);
            let mut asked = 0u64;
            let mut total = 0u64;
            for n in &batches {
                total += n;
                if schedule.labelled(*n) {
                    asked += 1;
                }
                prop_assert!(schedule.since() < every);
            }
            // A batch crossing the mark asks once and drops the excess: never more than
            // total / every; and with batches of one label, exactly that.
            prop_assert!(asked <= total / every);
            let mut single = RetrainSchedule::new(every);
            let ones = (0..total).filter(|_| single.labelled(1)).count() as u64;
            prop_assert_eq!(ones, total / every);
        }

        /// The split covers the window exactly, the holdout is the newest ceil(fraction) (at least
        /// MIN_HOLDOUT), and the fit has twice as many rows as parameters.
        #[test]
        fn splits_cover_the_window(
            len in 0usize..5000,
            fraction in 0.01f64..0.99,
            n_features in 1usize..20,
        ) {
            if let Some(split) = split(len, fraction, n_features) {
                prop_assert_eq!(split.train + split.holdout, len);
                prop_assert!(split.holdout >= MIN_HOLDOUT);
                prop_assert!(split.holdout as f64 >= len as f64 * fraction);
                prop_assert!(split.train >= 2 * (n_features + 1));
            }
        }
    }
}
