//! Tests of the quality tracker: the figures, kept versions, restores, the alarm rule and retirement.

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

/// `pair`s of `version` with an error of `error`, then a tick at `at` seconds after `t0`.
fn serve_at(quality: &mut Quality, t0: Instant, at: u64, n: usize, error: f64, version: &str) {
    for _ in 0..n {
        quality.observe(&pair(1.0 + error, version));
    }
    quality.update_window_at(t0 + Duration::from_secs(at));
}

fn report(quality: &Quality, version: &str) -> VersionAlarm {
    quality
        .alarms()
        .versions
        .into_iter()
        .find(|v| v.model_version == version)
        .unwrap()
}

#[test]
fn the_retire_rule_needs_silence_and_a_newer_version() {
    let rule = RetireRule {
        after: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert!(rule.is_retired(at(0), at(1), at(60)));
    assert!(!rule.is_retired(at(0), at(1), at(59)), "not long enough");
    assert!(!rule.is_retired(at(0), at(0), at(600)), "nothing newer");
    assert!(!rule.is_retired(at(5), at(1), at(600)), "it is the newest");
}

#[test]
fn a_replaced_version_retires_its_alarm_and_its_series() {
    let mut registry = Registry::default();
    let mut quality =
        Quality::register(&mut registry, 10, 5, 1.25).with_retire_after(Duration::from_secs(60));
    let t0 = Instant::now();
    // v1: baseline MAE 1, then a window of MAE 3: alarm on.
    serve_at(&mut quality, t0, 0, 10, 1.0, "v1");
    serve_at(&mut quality, t0, 1, 10, 3.0, "v1");
    assert!(report(&quality, "v1").alarm);
    // v2 takes over at 2 s; v1 is silent from 1 s on.
    for at in 2..61 {
        serve_at(&mut quality, t0, at, 1, 1.0, "v2");
    }
    let text = scrape(&registry);
    assert!(
        alert_line(&text, "v1").unwrap().ends_with(" 1"),
        "59 s: still on\n{text}"
    );
    serve_at(&mut quality, t0, 61, 1, 1.0, "v2");
    let text = scrape(&registry);
    assert_eq!(alert_line(&text, "v1"), None, "{text}");
    assert!(!text.contains("model_version=\"v1\""), "{text}");
    assert!(alert_line(&text, "v2").is_some(), "{text}");
    let v1 = report(&quality, "v1");
    assert!(v1.retired && !v1.alarm, "{v1:?}");
    assert!(
        quality
            .shared_alarms()
            .lock()
            .unwrap()
            .versions
            .iter()
            .any(|v| v.model_version == "v1" && v.retired)
    );
    let view = quality
        .versions()
        .into_iter()
        .find(|v| v.version == "v1")
        .unwrap();
    assert!(view.retired && !view.alarm);
    // The checkpoint remembers it.
    let totals = quality.totals();
    assert_eq!(totals.retired, ["v1"]);
    let mut registry2 = Registry::default();
    let mut restored = Quality::register(&mut registry2, 10, 5, 1.25);
    restored.restore(&totals);
    for _ in 0..10 {
        restored.add_to_window(&pair(4.0, "v1"));
    }
    restored.update_window_at(t0);
    assert!(report(&restored, "v1").retired);
    assert!(!scrape(&registry2).contains("model_version=\"v1\""));

    // A rollback: v1 receives pairs again. Current again, series back (the counter goes on
    // from its total), and v2 retires 60 s after its last pair.
    serve_at(&mut quality, t0, 70, 1, 1.0, "v1");
    let text = scrape(&registry);
    assert!(
        text.contains("pipeline_pairs_by_model_version_total{model_version=\"v1\"} 21"),
        "{text}"
    );
    assert!(alert_line(&text, "v1").unwrap().ends_with(" 0"), "{text}");
    assert!(!report(&quality, "v1").retired);
    for at in 71..121 {
        serve_at(&mut quality, t0, at, 1, 1.0, "v1");
    }
    assert!(
        !report(&quality, "v2").retired,
        "v2 last had a pair at 61 s"
    );
    serve_at(&mut quality, t0, 121, 1, 1.0, "v1");
    assert!(report(&quality, "v2").retired);
    assert!(!report(&quality, "v1").retired);
    // Its old window was dropped at retirement: judged only on the new pairs.
    assert_eq!(report(&quality, "v1").windowed_mae, Some(1.0));
}

#[test]
fn a_pause_of_the_only_version_retires_nothing() {
    let mut registry = Registry::default();
    let mut quality =
        Quality::register(&mut registry, 10, 5, 1.25).with_retire_after(Duration::from_secs(60));
    let t0 = Instant::now();
    serve_at(&mut quality, t0, 0, 20, 1.0, "v1");
    quality.update_window_at(t0 + Duration::from_secs(3600));
    assert!(!report(&quality, "v1").retired);
    // Two versions served side by side (a canary) both stay.
    for at in 3601..3700 {
        serve_at(&mut quality, t0, at, 1, 1.0, "v1");
        serve_at(&mut quality, t0, at, 1, 1.0, "v2");
    }
    assert!(!report(&quality, "v1").retired && !report(&quality, "v2").retired);
}

proptest::proptest! {
    /// Any schedule of which versions get pairs at each tick: a version is retired exactly
    /// when it had no pair for the retire time while another had one later; the version with
    /// the latest pair never is; a retired version has no alarm and no series, a current
    /// one has its series.
    #[test]
    fn retirement_follows_the_rule_on_any_schedule(
        retire_after in 1u64..20,
        steps in proptest::collection::vec(
            (1u64..15, proptest::collection::vec((0usize..3, 1usize..4, 0.0f64..4.0), 0..3)),
            1..40,
        ),
    ) {
        let mut registry = Registry::default();
        let mut quality = Quality::register(&mut registry, 5, 10, 1.25)
            .with_retire_after(Duration::from_secs(retire_after));
        let t0 = Instant::now();
        let mut now = 0u64;
        // Version -> second of the tick after its last pairs.
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        for (advance, served) in steps {
            now += advance;
            for (version, n, error) in served {
                let version = format!("v{version}");
                for _ in 0..n {
                    quality.observe(&pair(1.0 + error, &version));
                }
                last.insert(version, now);
            }
            quality.update_window_at(t0 + Duration::from_secs(now));
            let newest = last.values().copied().max();
            let text = scrape(&registry);
            for (version, at) in &last {
                let entry = report(&quality, version);
                let expected = newest.is_some_and(|n| n > *at) && now - at >= retire_after;
                proptest::prop_assert_eq!(entry.retired, expected, "{} at {}", version, now);
                if Some(*at) == newest {
                    proptest::prop_assert!(!entry.retired);
                }
                let exported = alert_line(&text, version).is_some();
                proptest::prop_assert_eq!(exported, !entry.retired);
                if entry.retired {
                    proptest::prop_assert!(!entry.alarm);
                }
            }
        }
    }
}
