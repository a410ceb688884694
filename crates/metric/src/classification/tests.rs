//! The figures against scikit-learn's on the same pairs (values printed by `sklearn.metrics`
//! 1.9: `accuracy_score`, `log_loss`, `brier_score_loss`, `f1_score(average="macro")`,
//! `roc_auc_score`).

use super::*;
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn prediction(classes: &[&str], p: &[f64]) -> Value {
    let best = p
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let probabilities = Probabilities::new(
        classes
            .iter()
            .zip(p)
            .map(|(c, p)| ((*c).to_owned(), *p))
            .collect(),
    )
    .unwrap();
    Value::class(ClassLabel::from_cell(classes[best]), Some(probabilities))
}

fn pair(id: usize, y_true: &str, classes: &[&str], p: &[f64], version: &str) -> ClassPair {
    ClassPair::new(
        format!("s{id}"),
        Value::class(ClassLabel::from_cell(y_true), None),
        prediction(classes, p),
        Some(version.to_owned()),
        None,
    )
}

fn tracker(window: usize) -> ClassQuality {
    let mut registry = Registry::default();
    let mut regression = crate::quality::Quality::register(&mut registry, window, 5, 1.25);
    ClassQuality::register(&mut registry, window, 5, 1.25, &mut regression)
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-12)
}

fn binary_pairs() -> Vec<ClassPair> {
    let y = [0, 1, 1, 0, 1, 0, 1, 1];
    let p1 = [0.2, 0.9, 0.6, 0.4, 0.3, 0.1, 0.9, 0.55];
    y.iter()
        .zip(p1)
        .enumerate()
        .map(|(i, (y, p))| pair(i, &y.to_string(), &["0", "1"], &[1.0 - p, p], "v1"))
        .collect()
}

#[test]
fn two_classes_score_as_scikit_learn_does() {
    let mut quality = tracker(100);
    for pair in binary_pairs() {
        quality.observe(&pair);
    }
    quality.update();
    let report = quality
        .report
        .lock()
        .unwrap()
        .classification
        .clone()
        .unwrap();
    for figures in [&report.all, &report.window, &report.versions[0].window] {
        assert_eq!(figures.n, 8);
        assert!(close(figures.accuracy, 0.875), "{figures:?}");
        assert!(close(figures.log_loss, 0.42033576886265334), "{figures:?}");
        assert!(close(figures.brier, 0.1353125), "{figures:?}");
        assert!(close(figures.f1_macro, 0.873015873015873), "{figures:?}");
    }
    assert!(
        close(report.window.roc_auc, 0.9333333333333333),
        "{report:?}"
    );
    assert_eq!(report.all.roc_auc, None, "AUC is over the window only");
    let cell = |t: &str, p: &str| {
        report
            .window
            .confusion
            .iter()
            .find(|c| c.y_true == t && c.y_pred == p)
            .map_or(0, |c| c.n)
    };
    assert_eq!(
        [
            cell("0", "0"),
            cell("0", "1"),
            cell("1", "0"),
            cell("1", "1")
        ],
        [3, 0, 1, 4]
    );
}

#[test]
fn several_string_classes_score_as_scikit_learn_does() {
    let classes = ["a", "b", "c"];
    let rows: [(&str, [f64; 3]); 6] = [
        ("a", [0.7, 0.2, 0.1]),
        ("b", [0.1, 0.5, 0.4]),
        ("c", [0.2, 0.2, 0.6]),
        ("a", [0.3, 0.4, 0.3]),
        ("c", [0.5, 0.25, 0.25]),
        ("b", [0.2, 0.3, 0.5]),
    ];
    let mut sums = ClassSums::default();
    for (i, (y, p)) in rows.iter().enumerate() {
        sums.add_pair(&pair(i, y, &classes, p, "v1"));
    }
    assert!(close(sums.accuracy(), 0.5));
    assert!(close(sums.log_loss(), 0.8924812863394052));
    assert!(close(sums.brier(), 0.5325));
    assert!(close(sums.f1_macro(), 0.5));
}

#[test]
fn an_unknown_true_class_counts_against_accuracy_but_not_in_log_loss() {
    let mut sums = ClassSums::default();
    let known = pair(0, "a", &["a", "b"], &[0.8, 0.2], "v1");
    let unknown = pair(1, "z", &["a", "b"], &[0.8, 0.2], "v1");
    assert!(known.known && !unknown.known);
    assert_eq!(unknown.p_true, None);
    sums.add_pair(&known);
    sums.add_pair(&unknown);
    assert_eq!((sums.n, sums.scored, sums.unknown), (2, 1, 1));
    assert!(close(sums.accuracy(), 0.5));
    assert!(close(sums.log_loss(), -(0.8f64.ln())));
}

#[test]
fn an_integer_label_and_its_text_are_one_class() {
    let pair = ClassPair::new(
        "s".into(),
        Value::Number(1.0),
        prediction(&["0", "1"], &[0.25, 0.75]),
        None,
        None,
    );
    assert!(pair.correct());
    assert_eq!(pair.p_true, Some(0.75));
}

#[test]
fn auc_averages_tied_ranks() {
    // sklearn: roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == 0.875
    let mut points = [(0.5, false), (0.5, true), (0.2, false), (0.8, true)];
    assert_eq!(roc_auc(&mut points), Some(0.875));
    assert_eq!(roc_auc(&mut [(0.3, true)]), None);
}

#[test]
fn totals_survive_a_restart_and_versions_are_bounded() {
    let mut quality = tracker(100);
    for (i, version) in ["v1", "v2", "v3", "v4", "v5", "v6", "v7"]
        .iter()
        .enumerate()
    {
        quality.observe(&pair(i, "a", &["a", "b"], &[0.9, 0.1], version));
    }
    let totals = quality.totals();
    assert_eq!(totals.by_version.len(), 5, "MODEL_VERSIONS_KEPT");
    assert_eq!(totals.by_version.last().unwrap().0, "v7");
    let json = serde_json::to_string(&totals).unwrap();
    let mut restored = tracker(100);
    restored.restore(&serde_json::from_str(&json).unwrap());
    assert_eq!(restored.totals(), totals);
    assert_eq!(restored.all().n, 7);
}

proptest! {
    #[test]
    fn accuracy_and_f1_stay_in_range(labels in prop::collection::vec((0u8..4, 0u8..4), 1..60)) {
        let mut sums = ClassSums::default();
        for (t, p) in &labels {
            sums.add(&t.to_string(), &p.to_string(), None, None, true);
        }
        let accuracy = sums.accuracy().unwrap();
        let f1 = sums.f1_macro().unwrap();
        prop_assert!((0.0..=1.0).contains(&accuracy));
        prop_assert!((0.0..=1.0).contains(&f1));
        let all_right = labels.iter().all(|(t, p)| t == p);
        prop_assert_eq!(accuracy == 1.0, all_right);
        prop_assert_eq!(f1 == 1.0, all_right);
    }
}

#[test]
fn the_alarm_rises_when_the_windowed_log_loss_passes_the_ratio_and_clears_after() {
    let mut quality = tracker(10);
    let confident = |i| pair(i, "1", &["0", "1"], &[0.1, 0.9], "v1");
    let unsure = |i| pair(i, "1", &["0", "1"], &[0.6, 0.4], "v1");
    for i in 0..10 {
        quality.observe(&confident(i));
    }
    quality.update();
    let alarm = |q: &ClassQuality| q.report.lock().unwrap().versions[0].clone();
    let first = alarm(&quality);
    assert_eq!((first.alarm, first.measure), (false, Some("log_loss")));
    assert!(close(first.baseline, -(0.9f64.ln())));
    for i in 10..20 {
        quality.observe(&unsure(i));
    }
    quality.update();
    let raised = alarm(&quality);
    assert!(raised.alarm, "{raised:?}");
    assert!(close(raised.windowed, -(0.4f64.ln())));
    assert_eq!(raised.windowed_mae, None);
    for i in 20..30 {
        quality.observe(&confident(i));
    }
    quality.update();
    assert!(!alarm(&quality).alarm);
}

#[test]
fn the_predicted_mix_moving_shows_in_the_psi_and_the_calibration_bins_the_confidence() {
    let mut before = ClassSums::default();
    let mut after = ClassSums::default();
    for i in 0..100 {
        before.add("a", if i % 2 == 0 { "a" } else { "b" }, None, None, true);
        after.add("a", if i % 10 == 0 { "b" } else { "a" }, None, None, true);
    }
    let same = prediction_psi(&before, &before).unwrap();
    let moved = prediction_psi(&before, &after).unwrap();
    assert!(same.abs() < 1e-12, "{same}");
    // 50/50 to 90/10: (0.9-0.5)ln(0.9/0.5) + (0.1-0.5)ln(0.1/0.5)
    let expected = 0.4 * (0.9f64 / 0.5).ln() + (-0.4) * (0.1f64 / 0.5).ln();
    assert!((moved - expected).abs() < 1e-12, "{moved} vs {expected}");

    let bins = calibration([(0.95, true), (0.91, false), (0.55, true), (1.0, true)].into_iter());
    assert_eq!(bins.len(), 2);
    assert_eq!((bins[0].from, bins[0].n), (0.5, 1));
    assert_eq!((bins[1].from, bins[1].n), (0.9, 3));
    assert!((bins[1].accuracy - 2.0 / 3.0).abs() < 1e-12);
    assert!((bins[1].confidence - (0.95 + 0.91 + 1.0) / 3.0).abs() < 1e-12);
}

#[test]
fn a_replaced_version_retires_and_its_alarm_ends() {
    let mut quality = tracker(10).with_retire_after(Duration::from_secs(60));
    let start = Instant::now();
    let confident = |i, v| pair(i, "1", &["0", "1"], &[0.1, 0.9], v);
    let unsure = |i, v| pair(i, "1", &["0", "1"], &[0.6, 0.4], v);
    for i in 0..10 {
        quality.observe(&confident(i, "v1"));
    }
    quality.update_at(start);
    for i in 10..20 {
        quality.observe(&unsure(i, "v1"));
    }
    quality.update_at(start + Duration::from_secs(1));
    let alarm = |q: &ClassQuality, version: &str| {
        q.report
            .lock()
            .unwrap()
            .versions
            .iter()
            .find(|v| v.model_version == version)
            .cloned()
            .unwrap()
    };
    assert!(alarm(&quality, "v1").alarm);
    // v2 replaces it: v1 has no pair for a minute while v2 has them.
    for i in 20..30 {
        quality.observe(&confident(i, "v2"));
        quality.update_at(start + Duration::from_secs(2 + i as u64 * 3));
    }
    let (v1, v2) = (alarm(&quality, "v1"), alarm(&quality, "v2"));
    assert!(v1.retired && !v1.alarm, "{v1:?}");
    assert!(!v2.retired && !v2.alarm, "{v2:?}");
    // A rollback: v1 receives pairs again and is current again.
    quality.observe(&confident(30, "v1"));
    quality.update_at(start + Duration::from_secs(200));
    assert!(!alarm(&quality, "v1").retired);
}
