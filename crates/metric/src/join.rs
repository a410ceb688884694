//! Joining `y_true` and `y_pred` by id, exactly once per id.
//!
//! Ids waiting for their partner are bounded by a capacity and an age; what is evicted is returned
//! to the caller to log and count. Ids already joined are remembered (as 128-bit hashes, up to a
//! capacity) so a redelivered or republished message never makes a second row.
//!
//! A `y_pred` for an id that already has one from a *different* model version is a re-prediction
//! (a `features` message redelivered after a model swap): a duplicate, the first prediction is kept.
//! The same version with a different value is a conflict.

use pipeline::messages::{LabelKind, MessageError};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::time::{Duration, Instant};

/// A joined pair: one row of `metric_log.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Sample id.
    pub id: String,
    /// True target.
    pub y_true: f64,
    /// Prediction.
    pub y_pred: f64,
    /// Version of the model that predicted.
    pub model_version: Option<String>,
    /// Producer's send time, if known.
    pub sent_at_us: Option<u64>,
}

impl Pair {
    /// `|y_true - y_pred|`.
    pub fn absolute_error(&self) -> f64 {
        (self.y_true - self.y_pred).abs()
    }
}

/// What happened to one offered value.
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Stored; waiting for the partner.
    Waiting,
    /// The partner was there: here is the pair.
    Paired(Pair),
    /// The id was joined already, or this value was already here: nothing changes.
    Duplicate,
}

/// Why a waiting id was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// More ids waiting than `JOIN_CAPACITY`.
    Capacity,
    /// Waiting longer than `JOIN_MAX_AGE_SECS`.
    Age,
}

impl Eviction {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Age => "age",
        }
    }
}

/// An id dropped while waiting for its partner.
#[derive(Debug, Clone, PartialEq)]
pub struct Evicted {
    /// The id.
    pub id: String,
    /// Which value it was waiting with.
    pub had: LabelKind,
    /// Why.
    pub reason: Eviction,
}

/// One id waiting for its partner, as saved in the checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaitingEntry {
    /// Sample id.
    pub id: String,
    /// The true target, if it came.
    pub y_true: Option<f64>,
    /// The prediction, if it came.
    pub y_pred: Option<f64>,
    /// Version of the model that predicted.
    pub model_version: Option<String>,
    /// Producer's send time, if known.
    pub sent_at_us: Option<u64>,
    /// How long it had waited when saved, in milliseconds.
    pub age_ms: u64,
}

/// What is remembered of a joined id: its values and a hash of its model version.
#[derive(Debug, Clone, Copy)]
struct Joined {
    y_true: f64,
    y_pred: f64,
    version: u64,
}

#[derive(Debug)]
struct Waiting {
    seq: u64,
    since: Instant,
    y_true: Option<f64>,
    y_pred: Option<(f64, Option<String>)>,
    sent_at_us: Option<u64>,
}

/// Limits of the join state.
#[derive(Debug, Clone, Copy)]
pub struct JoinLimits {
    /// Ids waiting for a partner, at most.
    pub capacity: usize,
    /// Longest wait for a partner.
    pub max_age: Duration,
    /// Joined ids remembered for de-duplication.
    pub dedup_capacity: usize,
}

/// The join state.
#[derive(Debug)]
pub struct Joiner {
    limits: JoinLimits,
    waiting: HashMap<String, Waiting>,
    /// Waiting ids in arrival order, for eviction.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    /// Joined ids (fingerprints) with their values.
    joined: HashMap<u128, Joined>,
    joined_order: VecDeque<u128>,
}

/// 128-bit fingerprint of an id: two keyed SipHash runs. A false "already joined" needs a
/// collision among the remembered ids, about 1 in 10²⁶ for a million of them.
pub fn fingerprint(id: &str) -> u128 {
    let half = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        id.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// Hash of a model version, to tell a re-prediction from a conflict without keeping the string.
fn version_hash(model_version: Option<&str>) -> u64 {
    let mut hasher = DefaultHasher::new();
    model_version.hash(&mut hasher);
    hasher.finish()
}

/// A `y_pred` seen before for the same id: from another model version it is a re-prediction (a
/// duplicate, the first kept); from the same version, a duplicate when equal, else a conflict.
fn same_prediction_or_conflict(
    id: &str,
    first: f64,
    first_version: u64,
    value: f64,
    version: u64,
) -> Result<Offer, MessageError> {
    if first_version != version {
        return Ok(Offer::Duplicate);
    }
    same_or_conflict(id, LabelKind::YPred, first, value)
}

/// A value seen before for the same id: a harmless duplicate when equal, else a conflict.
fn same_or_conflict(
    id: &str,
    kind: LabelKind,
    first: f64,
    value: f64,
) -> Result<Offer, MessageError> {
    if first.to_bits() == value.to_bits() {
        Ok(Offer::Duplicate)
    } else {
        Err(MessageError::ConflictingDuplicate {
            id: id.to_owned(),
            kind: kind.as_str(),
            first,
            second: value,
        })
    }
}

impl Joiner {
    /// An empty join state.
    pub fn new(limits: JoinLimits) -> Self {
        Self {
            limits,
            waiting: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            joined: HashMap::new(),
            joined_order: VecDeque::new(),
        }
    }

    /// Ids waiting for a partner.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `id` was joined already (within the remembered window).
    pub fn is_joined(&self, id: &str) -> bool {
        self.joined.contains_key(&fingerprint(id))
    }

    /// Remembers `id` as joined with its values (a row for it exists); it waits no longer.
    pub fn mark_joined(&mut self, id: &str, y_true: f64, y_pred: f64, model_version: Option<&str>) {
        if let Some(done) = self.waiting.remove(id) {
            self.order.remove(&done.seq);
        }
        self.remember(fingerprint(id), y_true, y_pred, version_hash(model_version));
    }

    fn remember(&mut self, print: u128, y_true: f64, y_pred: f64, version: u64) {
        let joined = Joined {
            y_true,
            y_pred,
            version,
        };
        if self.joined.insert(print, joined).is_none() {
            self.joined_order.push_back(print);
            while self.joined_order.len() > self.limits.dedup_capacity {
                if let Some(old) = self.joined_order.pop_front() {
                    self.joined.remove(&old);
                }
            }
        }
    }

    /// Offers one value. A different value for a value already waiting is a conflict: the first
    /// one is kept and the error says so.
    pub fn offer(
        &mut self,
        kind: LabelKind,
        id: &str,
        value: f64,
        model_version: Option<&str>,
        sent_at_us: Option<u64>,
        now: Instant,
    ) -> Result<Offer, MessageError> {
        let version = version_hash(model_version);
        if let Some(joined) = self.joined.get(&fingerprint(id)) {
            return match kind {
                LabelKind::YTrue => same_or_conflict(id, kind, joined.y_true, value),
                LabelKind::YPred => {
                    same_prediction_or_conflict(id, joined.y_pred, joined.version, value, version)
                }
            };
        }
        let entry = match self.waiting.get_mut(id) {
            Some(entry) => entry,
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.order.insert(seq, id.to_owned());
                self.waiting.entry(id.to_owned()).or_insert(Waiting {
                    seq,
                    since: now,
                    y_true: None,
                    y_pred: None,
                    sent_at_us: None,
                })
            }
        };
        match (kind, &entry.y_true, &entry.y_pred) {
            (LabelKind::YTrue, Some(first), _) => return same_or_conflict(id, kind, *first, value),
            (LabelKind::YPred, _, Some((first, first_version))) => {
                let first_version = version_hash(first_version.as_deref());
                return same_prediction_or_conflict(id, *first, first_version, value, version);
            }
            _ => {}
        }
        match kind {
            LabelKind::YTrue => entry.y_true = Some(value),
            LabelKind::YPred => entry.y_pred = Some((value, model_version.map(str::to_owned))),
        }
        entry.sent_at_us = entry.sent_at_us.or(sent_at_us);
        let (Some(y_true), Some(_)) = (entry.y_true, &entry.y_pred) else {
            return Ok(Offer::Waiting);
        };
        let Some(done) = self.waiting.remove(id) else {
            return Ok(Offer::Waiting);
        };
        self.order.remove(&done.seq);
        let (y_pred, model_version) = done.y_pred.unwrap_or((f64::NAN, None));
        self.remember(fingerprint(id), y_true, y_pred, version);
        Ok(Offer::Paired(Pair {
            id: id.to_owned(),
            y_true,
            y_pred,
            model_version,
            sent_at_us: done.sent_at_us,
        }))
    }

    /// The waiting ids, oldest first, with how long each has waited at `now`.
    pub fn waiting_entries(&self, now: Instant) -> Vec<WaitingEntry> {
        self.order
            .values()
            .filter_map(|id| {
                let entry = self.waiting.get(id)?;
                let (y_pred, model_version) = match &entry.y_pred {
                    Some((value, version)) => (Some(*value), version.clone()),
                    None => (None, None),
                };
                Some(WaitingEntry {
                    id: id.clone(),
                    y_true: entry.y_true,
                    y_pred,
                    model_version,
                    sent_at_us: entry.sent_at_us,
                    age_ms: now.saturating_duration_since(entry.since).as_millis() as u64,
                })
            })
            .collect()
    }

    /// Puts back ids saved by [`Self::waiting_entries`], each with the age it had then, so the
    /// time the service was down does not count against them. Already joined ids are skipped.
    pub fn restore_waiting(&mut self, entries: Vec<WaitingEntry>, now: Instant) {
        for entry in entries {
            if self.is_joined(&entry.id) || self.waiting.contains_key(&entry.id) {
                continue;
            }
            if entry.y_true.is_none() && entry.y_pred.is_none() {
                continue;
            }
            let since = now
                .checked_sub(Duration::from_millis(entry.age_ms))
                .unwrap_or(now);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.order.insert(seq, entry.id.clone());
            self.waiting.insert(
                entry.id,
                Waiting {
                    seq,
                    since,
                    y_true: entry.y_true,
                    y_pred: entry.y_pred.map(|value| (value, entry.model_version)),
                    sent_at_us: entry.sent_at_us,
                },
            );
        }
    }

    /// Drops waiting ids beyond the capacity (oldest first) and older than the maximum age.
    pub fn evict(&mut self, now: Instant) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        while let Some((&seq, id)) = self.order.first_key_value() {
            let Some(entry) = self.waiting.get(id) else {
                self.order.remove(&seq);
                continue;
            };
            let reason = if self.waiting.len() > self.limits.capacity {
                Eviction::Capacity
            } else if now.saturating_duration_since(entry.since) > self.limits.max_age {
                Eviction::Age
            } else {
                break;
            };
            let had = if entry.y_true.is_some() {
                LabelKind::YTrue
            } else {
                LabelKind::YPred
            };
            let id = id.clone();
            self.order.remove(&seq);
            self.waiting.remove(&id);
            evicted.push(Evicted { id, had, reason });
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
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
        let evicted = j.evict(start);
        assert_eq!(evicted.len(), 1);
        assert_eq!(
            (evicted[0].id.as_str(), evicted[0].reason),
            ("a", Eviction::Capacity)
        );
        assert!(j.evict(start + Duration::from_secs(5)).is_empty());
        let evicted = j.evict(start + Duration::from_secs(11));
        assert_eq!(
            evicted.iter().map(|e| e.reason).collect::<Vec<_>>(),
            [Eviction::Age, Eviction::Age]
        );
        assert_eq!(j.waiting(), 0);
    }

    #[test]
    fn joined_ids_are_forgotten_beyond_dedup_capacity() {
        let mut j = joiner(10, Duration::from_secs(60));
        for i in 0..11 {
            j.mark_joined(&format!("id{i}"), 1.0, 2.0, None);
        }
        assert!(!j.is_joined("id0"));
        assert!(j.is_joined("id10"));
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
        assert!(j.evict(now + Duration::from_secs(600)).is_empty());
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
        let mut j = joiner(10, Duration::from_secs(10));
        j.offer(LabelKind::YTrue, "old", 1.0, None, Some(5), start)
            .unwrap();
        j.offer(
            LabelKind::YPred,
            "new",
            2.0,
            Some("v1"),
            None,
            start + Duration::from_secs(6),
        )
        .unwrap();
        let saved = j.waiting_entries(start + Duration::from_secs(8));
        assert_eq!(saved.len(), 2);
        assert_eq!((saved[0].id.as_str(), saved[0].age_ms), ("old", 8000));

        let later = start + Duration::from_secs(100);
        let mut restored = joiner(10, Duration::from_secs(10));
        restored.mark_joined("gone", 1.0, 1.0, None);
        restored.restore_waiting(saved, later);
        assert_eq!(restored.waiting(), 2);
        // "old" had waited 8 s: it goes 2 s after the restart, "new" (2 s) does not.
        let evicted = restored.evict(later + Duration::from_millis(2500));
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
}
