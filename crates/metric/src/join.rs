//! Joining `y_true` and `y_pred` by id, exactly once per id.
//!
//! Ids waiting for their partner are bounded by a capacity and an age; what is evicted is returned
//! to the caller to log and count. Ids already joined are remembered (as 128-bit hashes, up to a
//! capacity) so a redelivered or republished message never makes a second row.

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
    /// Joined ids (fingerprints) with their `(y_true, y_pred)`.
    joined: HashMap<u128, (f64, f64)>,
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

    /// Remembers `id` as joined with its values (a row for it exists).
    pub fn mark_joined(&mut self, id: &str, y_true: f64, y_pred: f64) {
        let print = fingerprint(id);
        if self.joined.insert(print, (y_true, y_pred)).is_none() {
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
        if let Some(&(y_true, y_pred)) = self.joined.get(&fingerprint(id)) {
            let first = match kind {
                LabelKind::YTrue => y_true,
                LabelKind::YPred => y_pred,
            };
            return same_or_conflict(id, kind, first, value);
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
        let first = match kind {
            LabelKind::YTrue => entry.y_true,
            LabelKind::YPred => entry.y_pred.as_ref().map(|(v, _)| *v),
        };
        if let Some(first) = first {
            return same_or_conflict(id, kind, first, value);
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
        self.mark_joined(id, y_true, y_pred);
        Ok(Offer::Paired(Pair {
            id: id.to_owned(),
            y_true,
            y_pred,
            model_version,
            sent_at_us: done.sent_at_us,
        }))
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
            j.mark_joined(&format!("id{i}"), 1.0, 2.0);
        }
        assert!(!j.is_joined("id0"));
        assert!(j.is_joined("id10"));
    }
}
