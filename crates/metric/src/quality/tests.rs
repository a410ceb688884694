//! Tests of the quality tracker: the figures, kept versions, restores and the alarm rule.

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
    let mut quality = Quality::register(&mut registry, 10, 2, 1.25);
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
    let mut quality = Quality::register(&mut registry, 10, 5, 1.25);
    for i in 0..4 {
        quality.observe(&pair(f64::from(i), "v1"));
    }
    let totals = quality.totals();
    let mut registry = Registry::default();
    let mut restored = Quality::register(&mut registry, 10, 5, 1.25);
    restored.restore(&totals);
    restored.add_to_window(&pair(9.0, "v1"));
    assert_eq!(restored.all(), quality.all());
    assert_eq!(restored.totals(), totals);
    let text = scrape(&registry);
    assert!(text.contains("pipeline_pairs_total 4"), "{text}");
}

fn alert_line(text: &str, version: &str) -> Option<String> {
    text.lines()
        .find(|l| {
            l.starts_with(&format!(
                "pipeline_model_quality_alert{{model_version=\"{version}\"}}"
            ))
        })
        .map(str::to_owned)
}

fn feed(quality: &mut Quality, n: usize, error: f64, version: &str) {
    for _ in 0..n {
        quality.observe(&pair(1.0 + error, version));
    }
    quality.update_window();
}

#[test]
fn the_rule_waits_for_a_full_baseline_and_window() {
    let rule = AlarmRule { ratio: 1.25 };
    assert_eq!(rule.decide(None, Some(100.0)), None);
    assert_eq!(rule.decide(Some(1.0), None), None);
    assert_eq!(rule.decide(Some(1.0), Some(1.25)), Some(false));
    assert_eq!(rule.decide(Some(1.0), Some(1.26)), Some(true));
    assert_eq!(
        rule.step(false, Some(1.0), Some(2.0)),
        Some(AlarmChange::Raised)
    );
    assert_eq!(rule.step(true, Some(1.0), Some(2.0)), None);
    assert_eq!(
        rule.step(true, Some(1.0), Some(1.0)),
        Some(AlarmChange::Lowered)
    );
    assert_eq!(
        rule.step(true, Some(1.0), None),
        None,
        "undecided keeps it on"
    );
}

proptest::proptest! {
    /// Whatever the sequence of figures, the alarm follows `window > ratio × baseline` when
    /// both are known, stays as it was otherwise, and raised/lowered alternate.
    #[test]
    fn the_alarm_follows_the_threshold_and_alternates(
        ratio in 1.0f64..3.0,
        steps in proptest::collection::vec(
            (proptest::option::of(0.0f64..100.0), proptest::option::of(0.0f64..300.0)),
            0..50,
        ),
    ) {
        let rule = AlarmRule { ratio };
        let mut on = false;
        for (baseline, window) in steps {
            let change = rule.step(on, baseline, window);
            match change {
                Some(AlarmChange::Raised) => { proptest::prop_assert!(!on); on = true; }
                Some(AlarmChange::Lowered) => { proptest::prop_assert!(on); on = false; }
                None => {}
            }
            match (baseline, window) {
                (Some(b), Some(w)) => proptest::prop_assert_eq!(on, w > ratio * b),
                _ => proptest::prop_assert!(change.is_none()),
            }
        }
    }
}

#[test]
fn the_alarm_rises_when_the_window_degrades_and_falls_when_it_recovers() {
    let mut registry = Registry::default();
    let mut quality = Quality::register(&mut registry, 10, 5, 1.25);
    // Half a baseline: undecided, the gauge shows 0.
    feed(&mut quality, 5, 1.0, "v1");
    assert!(
        alert_line(&scrape(&registry), "v1")
            .unwrap()
            .ends_with(" 0")
    );
    // Baseline MAE 1; the window drifts to 5 × 2 + 5 × 1 = MAE 1.5 > 1.25: on.
    feed(&mut quality, 5, 1.0, "v1");
    feed(&mut quality, 5, 2.0, "v1");
    let text = scrape(&registry);
    assert!(alert_line(&text, "v1").unwrap().ends_with(" 1"), "{text}");
    assert!(
        text.contains("pipeline_model_mae_window_by_version{model_version=\"v1\"} 1.5"),
        "{text}"
    );
    let view = &quality.versions()[0];
    assert_eq!((view.baseline_mae, view.alarm), (Some(1.0), true));
    // Another version is judged against its own baseline: a constant error of 2 is fine.
    feed(&mut quality, 20, 2.0, "v2");
    assert!(
        alert_line(&scrape(&registry), "v2")
            .unwrap()
            .ends_with(" 0")
    );
    // v1 recovers: off again.
    feed(&mut quality, 10, 1.0, "v1");
    assert!(
        alert_line(&scrape(&registry), "v1")
            .unwrap()
            .ends_with(" 0")
    );
}

#[test]
fn the_baseline_survives_a_restore() {
    let mut registry = Registry::default();
    let mut quality = Quality::register(&mut registry, 10, 5, 1.25);
    feed(&mut quality, 10, 1.0, "v1");
    feed(&mut quality, 10, 3.0, "v1");
    let totals = quality.totals();
    assert_eq!(totals.baselines.len(), 1);
    assert_eq!(totals.baselines[0].0, "v1");
    assert_eq!(
        (totals.baselines[0].1.n, totals.baselines[0].1.mae()),
        (10, 1.0)
    );
    let mut registry = Registry::default();
    let mut restored = Quality::register(&mut registry, 10, 5, 1.25);
    restored.restore(&totals);
    // The last rows come back into the window: judged against the baseline of error 1.
    for _ in 0..10 {
        restored.add_to_window(&pair(4.0, "v1"));
    }
    restored.update_window();
    let text = scrape(&registry);
    assert!(alert_line(&text, "v1").unwrap().ends_with(" 1"), "{text}");
    assert_eq!(restored.versions()[0].baseline_mae, Some(1.0));
}
