//! Tests of the join: pairing, duplicates, conflicts, eviction by capacity and age, read-ahead.

use super::*;

fn joiner(capacity: usize, max_age: Duration) -> Joiner {
    Joiner::new(JoinLimits {
        capacity,
        max_age,
        dedup_capacity: 10,
    })
}

#[test]
fn pairs_whichever_arrives_first() {
    let now = Instant::now();
    let mut j = joiner(10, Duration::from_secs(60));
    assert_eq!(
        j.offer(LabelKind::YPred, "a", 2.0, Some("v1"), None, now)
            .unwrap(),
        Offer::Waiting
    );
    let Offer::Paired(pair) = j
        .offer(LabelKind::YTrue, "a", 5.0, None, Some(7), now)
        .unwrap()
    else {
        panic!("expected a pair")
    };
    assert_eq!(
        (pair.y_true, pair.y_pred, pair.absolute_error()),
        (5.0, 2.0, 3.0)
    );
    assert_eq!(pair.model_version.as_deref(), Some("v1"));
    assert_eq!(pair.sent_at_us, Some(7));
    assert_eq!(j.waiting(), 0);
}

#[test]
fn duplicates_never_pair_twice() {
    let now = Instant::now();
    let mut j = joiner(10, Duration::from_secs(60));
    j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
        .unwrap();
    assert_eq!(
        j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
            .unwrap(),
        Offer::Duplicate
    );
    assert!(matches!(
        j.offer(LabelKind::YPred, "a", 1.5, None, None, now)
            .unwrap(),
        Offer::Paired(_)
    ));
    assert_eq!(
        j.offer(LabelKind::YPred, "a", 1.5, None, None, now)
            .unwrap(),
        Offer::Duplicate
    );
    assert_eq!(
        j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
            .unwrap(),
        Offer::Duplicate
    );
}

#[test]
fn conflicting_value_is_refused_and_first_kept() {
    let now = Instant::now();
    let mut j = joiner(10, Duration::from_secs(60));
    j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
        .unwrap();
    let err = j
        .offer(LabelKind::YTrue, "a", 2.0, None, None, now)
        .unwrap_err();
    assert_eq!(err.reason(), "conflicting_duplicate");
    let Offer::Paired(pair) = j
        .offer(LabelKind::YPred, "a", 0.0, None, None, now)
        .unwrap()
    else {
        panic!("expected a pair")
    };
    assert_eq!(pair.y_true, 1.0);
}

#[test]
fn eviction_by_capacity_and_age() {
    let start = Instant::now();
    let mut j = joiner(2, Duration::from_secs(10));
    for id in ["a", "b", "c"] {
        j.offer(LabelKind::YTrue, id, 1.0, None, None, start)
            .unwrap();
    }
    let evicted = j.evict();
    assert_eq!(evicted.len(), 1);
    assert_eq!(
        (evicted[0].id.as_str(), evicted[0].reason),
        ("a", Eviction::Capacity)
    );
    assert_eq!(j.waiting_for(LabelKind::YPred), 2);
    // Predictions (without ids) arrive for 5 s, then for 11 s: nothing pairs, b and c are old.
    for s in 0..=5 {
        j.note_activity(LabelKind::YPred, start + Duration::from_secs(s));
    }
    assert!(j.evict().is_empty());
    for s in 6..=11 {
        j.note_activity(LabelKind::YPred, start + Duration::from_secs(s));
    }
    let evicted = j.evict();
    assert_eq!(
        evicted
            .iter()
            .map(|e| (e.id.as_str(), e.reason))
            .collect::<Vec<_>>(),
        [("b", Eviction::Age), ("c", Eviction::Age)]
    );
    assert_eq!(j.waiting(), 0);
    assert_eq!(j.waiting_for(LabelKind::YPred), 0);
}

#[test]
fn while_the_partner_is_silent_nobody_ages() {
    let start = Instant::now();
    let mut j = joiner(100, Duration::from_secs(10));
    j.offer(LabelKind::YTrue, "a", 1.0, None, None, start)
        .unwrap();
    // y_true keeps coming for an hour, the model is down: no y_pred at all.
    for s in 1..3600 {
        j.offer(
            LabelKind::YTrue,
            "a",
            1.0,
            None,
            None,
            start + Duration::from_secs(s),
        )
        .unwrap();
    }
    assert!(j.evict().is_empty());
    // A model back after an hour-long gap adds one ACTIVITY_GAP at most.
    let back = start + Duration::from_secs(3600);
    j.note_activity(LabelKind::YPred, start);
    j.note_activity(LabelKind::YPred, back);
    assert!(j.evict().is_empty());
    assert!(matches!(
        j.offer(LabelKind::YPred, "a", 2.0, None, None, back)
            .unwrap(),
        Offer::Paired(_)
    ));
}

#[test]
fn ids_a_slow_model_is_catching_up_to_stay_overtaken_ones_go() {
    let start = Instant::now();
    let mut j = joiner(1000, Duration::from_secs(10));
    for n in 0..100 {
        j.offer(LabelKind::YTrue, &format!("s{n}"), 1.0, None, None, start)
            .unwrap();
    }
    // One prediction a second, in order, but s50's features were lost (dead-lettered).
    let mut at = start;
    for n in (0..100).filter(|n| *n != 50) {
        at += Duration::from_secs(1);
        assert!(matches!(
            j.offer(LabelKind::YPred, &format!("s{n}"), 1.0, None, None, at)
                .unwrap(),
            Offer::Paired(_)
        ));
        // Every id still waiting has waited longer than max_age of y_pred traffic, but the
        // model is pairing below it: only s50 goes, max_age after s51 overtook it.
        let evicted: Vec<_> = j.evict().into_iter().map(|e| (e.id, e.reason)).collect();
        if n == 61 {
            assert_eq!(evicted, [("s50".to_owned(), Eviction::Age)]);
        } else {
            assert!(evicted.is_empty(), "{n}: {evicted:?}");
        }
    }
    assert_eq!(j.waiting(), 0);
}

#[test]
fn joined_ids_are_forgotten_beyond_dedup_capacity() {
    let mut j = joiner(16, Duration::from_secs(60));
    j.set_dedup_capacity(16);
    // Generations of two: up to one more is held, then the oldest two go together.
    for i in 0..17 {
        j.mark_joined(&format!("id{i}"), 1.0, 2.0, None);
    }
    assert!(j.is_joined("id0"));
    j.mark_joined("id17", 1.0, 2.0, None);
    assert!(!j.is_joined("id0") && !j.is_joined("id1"));
    assert!((2..18).all(|i| j.is_joined(&format!("id{i}"))));
    // Remembering a known id again changes its values, not what is remembered.
    j.mark_joined("id2", 5.0, 6.0, None);
    assert_eq!(j.joined.len(), 16);
    j.set_dedup_capacity(3);
    assert!((15..18).all(|i| j.is_joined(&format!("id{i}"))));
    assert!(!j.is_joined("id13"));
}

proptest::proptest! {
    /// The newest DEDUP_CAPACITY joined ids are always remembered, and never more than one
    /// generation (an eighth) beyond it are held, also after the capacity changes.
    #[test]
    fn the_newest_joined_ids_are_remembered(
        first_capacity in 1usize..400,
        capacity in 1usize..200,
        joins in 0usize..2000,
    ) {
        let mut j = joiner(1, Duration::from_secs(60));
        j.set_dedup_capacity(first_capacity);
        for i in 0..joins / 2 {
            j.mark_joined(&format!("id{i}"), 1.0, 2.0, None);
        }
        j.set_dedup_capacity(capacity);
        for i in joins / 2..joins {
            j.mark_joined(&format!("id{i}"), 1.0, 2.0, None);
        }
        proptest::prop_assert!(j.joined.len() <= capacity + (first_capacity.max(capacity) / 8).max(1));
        for i in joins / 2..joins {
            j.mark_joined(&format!("id{i}"), 1.0, 2.0, None);
            proptest::prop_assert!(j.joined.len() <= capacity + (first_capacity.max(capacity) / 8).max(1));
        }
        // The newest `capacity` of those joined since the change are all remembered.
        for i in (joins / 2).max(joins.saturating_sub(capacity))..joins {
            proptest::prop_assert!(j.is_joined(&format!("id{i}")), "id{} forgotten", i);
        }
    }
}

#[test]
fn a_prediction_from_another_model_version_is_a_duplicate_not_a_conflict() {
    let now = Instant::now();
    let mut j = joiner(10, Duration::from_secs(60));
    // Joined already: the first prediction stays.
    j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
        .unwrap();
    j.offer(LabelKind::YPred, "a", 2.0, Some("v1"), None, now)
        .unwrap();
    assert_eq!(
        j.offer(LabelKind::YPred, "a", 3.0, Some("v2"), None, now)
            .unwrap(),
        Offer::Duplicate
    );
    let err = j
        .offer(LabelKind::YPred, "a", 3.0, Some("v1"), None, now)
        .unwrap_err();
    assert_eq!(err.reason(), "conflicting_duplicate");
    // Still waiting: the same.
    j.offer(LabelKind::YPred, "b", 2.0, Some("v1"), None, now)
        .unwrap();
    assert_eq!(
        j.offer(LabelKind::YPred, "b", 3.0, Some("v2"), None, now)
            .unwrap(),
        Offer::Duplicate
    );
    assert!(
        j.offer(LabelKind::YPred, "b", 3.0, Some("v1"), None, now)
            .is_err()
    );
    let Offer::Paired(pair) = j
        .offer(LabelKind::YTrue, "b", 5.0, None, None, now)
        .unwrap()
    else {
        panic!("expected a pair")
    };
    assert_eq!(
        (pair.y_pred, pair.model_version.as_deref()),
        (2.0, Some("v1"))
    );
}

#[test]
fn a_row_read_back_ends_the_wait_and_remembers_the_version() {
    let now = Instant::now();
    let mut j = joiner(10, Duration::from_secs(60));
    j.offer(LabelKind::YTrue, "a", 1.0, None, None, now)
        .unwrap();
    j.mark_joined("a", 1.0, 2.0, Some("v1"));
    assert_eq!(j.waiting(), 0);
    assert!(j.evict().is_empty());
    assert_eq!(
        j.offer(LabelKind::YPred, "a", 9.0, Some("v2"), None, now)
            .unwrap(),
        Offer::Duplicate
    );
    assert!(
        j.offer(LabelKind::YPred, "a", 9.0, Some("v1"), None, now)
            .is_err()
    );
}

#[test]
fn waiting_ids_survive_a_save_and_restore_with_their_age() {
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let mut j = joiner(10, Duration::from_secs(10));
    j.offer(LabelKind::YTrue, "old", 1.0, None, Some(5), at(0))
        .unwrap();
    j.note_activity(LabelKind::YPred, at(0));
    j.note_activity(LabelKind::YPred, at(3));
    j.note_activity(LabelKind::YTrue, at(6));
    j.offer(LabelKind::YPred, "new", 2.0, Some("v1"), None, at(6))
        .unwrap();
    j.note_activity(LabelKind::YTrue, at(8));
    j.note_activity(LabelKind::YPred, at(8));
    let saved = j.waiting_entries();
    assert_eq!(saved.len(), 2);
    assert_eq!((saved[0].id.as_str(), saved[0].age_ms), ("old", 8000));
    assert_eq!((saved[1].id.as_str(), saved[1].age_ms), ("new", 2000));

    // The restart took an hour: that does not count.
    let later = at(3600);
    let mut restored = joiner(10, Duration::from_secs(10));
    restored.mark_joined("gone", 1.0, 1.0, None);
    restored.restore_waiting(saved);
    assert_eq!(restored.waiting(), 2);
    assert_eq!(restored.waiting_for(LabelKind::YPred), 1);
    // "old" had waited 8 s for a prediction, "new" 2 s for a true value.
    restored.note_activity(LabelKind::YPred, later);
    restored.note_activity(LabelKind::YTrue, later);
    restored.note_activity(LabelKind::YPred, later + Duration::from_millis(2500));
    restored.note_activity(LabelKind::YTrue, later + Duration::from_millis(2500));
    // Nothing has paired since the start: for max_age of predictions, nobody goes.
    assert!(restored.evict().is_empty());
    for s in 3..=12 {
        restored.note_activity(LabelKind::YPred, later + Duration::from_secs(s));
    }
    // Then "old" (8 + 12 s) goes, "new" (2 + 2.5 s of true values) stays.
    let evicted = restored.evict();
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].id, "old");
    let Offer::Paired(pair) = restored
        .offer(LabelKind::YTrue, "new", 4.0, None, None, later)
        .unwrap()
    else {
        panic!("expected a pair")
    };
    assert_eq!(pair.model_version.as_deref(), Some("v1"));
}

mod lagging_model {
    use super::*;
    use pipeline::broker::flow::Hysteresis;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// The producer publishes this many samples (features and y_true).
        Publish(usize),
        /// The metric takes this many from each queue (y_true only while its flow control
        /// lets it).
        MetricTakes(usize),
        /// The model predicts this many, slightly out of order (replicas, prefetch).
        ModelWorks(usize),
        /// Nothing arrives for this many seconds (a service down, a quiet hour).
        Quiet(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1usize..40).prop_map(Step::Publish),
            (1usize..40).prop_map(Step::MetricTakes),
            (1usize..40).prop_map(Step::ModelWorks),
            (0u64..4000).prop_map(Step::Quiet),
        ]
    }

    struct World {
        joiner: Joiner,
        flow: Hysteresis,
        now: Instant,
        published: usize,
        y_true_taken: usize,
        features_taken: usize,
        /// Predictions in flight at the model: (id, times passed over).
        in_flight: Vec<(usize, usize)>,
        /// Predictions published, not yet taken by the metric.
        y_pred_queue: VecDeque<usize>,
        reorder: usize,
        /// A small LCG: which in-flight prediction comes next.
        rng: u64,
        paired: Vec<usize>,
        evicted: Vec<Evicted>,
    }

    impl World {
        fn offer(&mut self, kind: LabelKind, n: usize) {
            self.now += Duration::from_millis(10);
            let offer = self
                .joiner
                .offer(kind, &format!("s{n}"), n as f64, None, None, self.now)
                .unwrap();
            if let Offer::Paired(pair) = offer {
                self.paired.push(pair.y_true as usize);
            }
            self.flow.update(self.joiner.waiting_for(LabelKind::YPred));
        }

        fn metric_takes(&mut self, k: usize) {
            for _ in 0..k {
                if !self.flow.is_held() && self.y_true_taken < self.published {
                    self.offer(LabelKind::YTrue, self.y_true_taken);
                    self.y_true_taken += 1;
                }
                if let Some(n) = self.y_pred_queue.pop_front() {
                    self.offer(LabelKind::YPred, n);
                }
            }
        }

        fn model_works(&mut self, k: usize) {
            for _ in 0..k {
                while self.in_flight.len() < self.reorder && self.features_taken < self.published {
                    self.in_flight.push((self.features_taken, 0));
                    self.features_taken += 1;
                }
                if self.in_flight.is_empty() {
                    break;
                }
                // Any of them, but none passed over more than `reorder` times.
                let pick = match self.in_flight.iter().position(|(_, p)| *p >= self.reorder) {
                    Some(oldest) => oldest,
                    None => {
                        self.rng = self
                            .rng
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        (self.rng >> 33) as usize % self.in_flight.len()
                    }
                };
                let (n, _) = self.in_flight.remove(pick);
                for (_, passed) in &mut self.in_flight {
                    *passed += 1;
                }
                self.y_pred_queue.push_back(n);
            }
        }

        fn tick(&mut self) {
            let evicted = self.joiner.evict();
            self.evicted.extend(evicted);
            self.flow.update(self.joiner.waiting_for(LabelKind::YPred));
        }
    }

    proptest! {
        /// However long the model is down and however far it falls behind, with the metric
        /// holding back y_true while its join is nearly full, no id is dropped and every
        /// sample pairs exactly once.
        #[test]
        fn a_lagging_model_loses_no_pair(
            capacity in 5usize..60,
            read_ahead in 1usize..60,
            reorder in 1usize..5,
            seed in any::<u64>(),
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut world = World {
                joiner: Joiner::new(JoinLimits {
                    capacity,
                    max_age: Duration::from_secs(60),
                    dedup_capacity: 10_000,
                }),
                flow: Hysteresis::with_high_water(read_ahead.min(capacity)),
                now: Instant::now(),
                published: 0,
                y_true_taken: 0,
                features_taken: 0,
                in_flight: Vec::new(),
                y_pred_queue: VecDeque::new(),
                reorder,
                rng: seed,
                paired: Vec::new(),
                evicted: Vec::new(),
            };
            for step in steps {
                match step {
                    Step::Publish(k) => world.published += k,
                    Step::MetricTakes(k) => world.metric_takes(k),
                    Step::ModelWorks(k) => world.model_works(k),
                    Step::Quiet(seconds) => world.now += Duration::from_secs(seconds),
                }
                world.tick();
            }
            // Everybody comes back and works the backlogs off.
            for _ in 0..100_000 {
                if world.paired.len() == world.published {
                    break;
                }
                world.metric_takes(7);
                world.model_works(5);
                world.tick();
            }
            prop_assert!(world.evicted.is_empty(), "dropped: {:?}", world.evicted);
            let mut paired = world.paired.clone();
            paired.sort_unstable();
            prop_assert_eq!(paired, (0..world.published).collect::<Vec<_>>());
            prop_assert!(world.joiner.waiting_for(LabelKind::YPred) <= capacity);
        }
    }
}
