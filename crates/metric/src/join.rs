//! Joining `y_true` and `y_pred` by id, exactly once per id.
//!
//! Ids waiting for their partner are bounded by a capacity and an age; what is evicted is returned
//! to the caller to log and count. Ids already joined are remembered (as 128-bit hashes, up to a
//! capacity) so a redelivered or republished message never makes a second row.
//!
//! A lagging partner is not a missing one. An id's age counts only the time during which messages
//! of its partner's kind were arriving (an [`ActivityClock`]), so a model that is down ages
//! nobody; and an old id is dropped only when pairs had already passed it `max_age` ago, or when
//! nothing has paired for `max_age`: the `y_true` read ahead of a model that is catching up stay.
//! The caller keeps the waiting `y_true` under the capacity by holding that queue back
//! (`pipeline::broker::flow`).
//!
//! A `y_pred` for an id that already has one from a *different* model version is a re-prediction
//! (a `features` message redelivered after a model swap): a duplicate, the first prediction is kept.
//! The same version with a different value is a conflict.

use crate::classification::ClassPair;
use pipeline::messages::{LabelKind, MessageError};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::time::{Duration, Instant};

mod dedup;
mod value;
pub use dedup::fingerprint;
use dedup::{Joined, JoinedIds, JoinedKey, joined_key};
pub use value::{ClassValue, Value};

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
    /// The partner was there: here is a classifier's pair.
    PairedClass(ClassPair),
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
    pub y_true: Option<Value>,
    /// The prediction, if it came.
    pub y_pred: Option<Value>,
    /// Version of the model that predicted.
    pub model_version: Option<String>,
    /// Producer's send time, if known.
    pub sent_at_us: Option<u64>,
    /// How long it had waited when saved, in milliseconds.
    pub age_ms: u64,
}

#[derive(Debug)]
struct Waiting {
    seq: u64,
    /// The partner kind's activity clock when this id began to wait here.
    since: Duration,
    /// How long it had waited before (in an earlier run, from the checkpoint).
    waited_before: Duration,
    y_true: Option<Value>,
    y_pred: Option<(Value, Option<String>)>,
    sent_at_us: Option<u64>,
}

impl Waiting {
    /// The kind of the value this id waits for.
    fn waits_for(&self) -> LabelKind {
        if self.y_true.is_some() {
            LabelKind::YPred
        } else {
            LabelKind::YTrue
        }
    }
}

/// Longest pause between two messages of a kind that still counts as time they were arriving.
const ACTIVITY_GAP: Duration = Duration::from_secs(5);

/// The time during which messages of one kind were arriving: the sum of the gaps between them,
/// each counted up to `ACTIVITY_GAP`. While the model is down, the `y_pred` clock stands still.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivityClock {
    elapsed: Duration,
    last: Option<Instant>,
}

impl ActivityClock {
    /// A message of this kind arrived at `now`.
    pub fn note(&mut self, now: Instant) {
        if let Some(last) = self.last {
            self.elapsed += now.saturating_duration_since(last).min(ACTIVITY_GAP);
        }
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
    }

    /// The active time so far.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

/// The most recent pair: which waiting entry it completed and the two clocks then.
#[derive(Debug, Clone, Copy, Default)]
struct LastPair {
    /// Sequence number of the entry it completed; `None`: before every entry (at start).
    seq: Option<u64>,
    clocks: [Duration; 2],
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
    joined: JoinedIds,
    /// Activity of `y_true` and `y_pred`, indexed by [`LabelKind`].
    clocks: [ActivityClock; 2],
    last_pair: LastPair,
    /// Waiting ids by the kind they wait for, indexed by [`LabelKind`].
    waiting_for: [usize; 2],
    /// Per kind, the most recent pair's entry as it was at earlier readings of that kind's
    /// clock, back to `max_age` ago: an id counts as overtaken only once pairs had passed it
    /// `max_age` ago, so reordering shorter than that (a replica's prefetch, a redelivery) drops
    /// nothing.
    frontier_history: [VecDeque<(Duration, Option<u64>)>; 2],
}

/// Hash of a model version, to tell a re-prediction from a conflict without keeping the string.
fn version_hash(model_version: Option<&str>) -> u32 {
    let mut hasher = DefaultHasher::new();
    model_version.hash(&mut hasher);
    hasher.finish() as u32
}

/// A value seen before, as far as a conflict needs it: its print and how to name it.
struct Seen {
    print: u64,
    text: String,
}

impl Seen {
    fn of(value: &Value) -> Self {
        Self {
            print: value.print(),
            text: value.to_string(),
        }
    }

    /// A joined id's value, of which only the print is kept.
    fn joined(print: u64, classes: bool) -> Self {
        Self {
            print,
            text: if classes {
                "another class".to_owned()
            } else {
                f64::from_bits(print).to_string()
            },
        }
    }
}

/// A `y_pred` seen before for the same id: from another model version it is a re-prediction (a
/// duplicate, the first kept); from the same version, a duplicate when equal, else a conflict.
fn same_prediction_or_conflict(
    id: &str,
    first: Seen,
    first_version: u32,
    value: &Value,
    version: u32,
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
    first: Seen,
    value: &Value,
) -> Result<Offer, MessageError> {
    if first.print == value.print() {
        Ok(Offer::Duplicate)
    } else {
        Err(MessageError::ConflictingDuplicate {
            id: id.to_owned(),
            kind: kind.as_str(),
            first: first.text,
            second: value.to_string(),
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
            joined: JoinedIds::new(limits.dedup_capacity),
            clocks: [ActivityClock::default(); 2],
            last_pair: LastPair::default(),
            waiting_for: [0; 2],
            frontier_history: [VecDeque::new(), VecDeque::new()],
        }
    }

    /// Ids waiting for a value of `kind` (`YPred`: true values whose prediction has not come).
    pub fn waiting_for(&self, kind: LabelKind) -> usize {
        self.waiting_for[kind as usize]
    }

    /// Takes a waiting entry out of the order and the counts.
    fn remove_waiting(&mut self, id: &str) -> Option<Waiting> {
        let entry = self.waiting.remove(id)?;
        self.order.remove(&entry.seq);
        self.count_out(entry.waits_for());
        Some(entry)
    }

    /// One id waiting for `kind` less.
    fn count_out(&mut self, kind: LabelKind) {
        let count = &mut self.waiting_for[kind as usize];
        *count = count.saturating_sub(1);
    }

    /// A message of `kind` arrived at `now` (also one without an id, which is never offered):
    /// the ids waiting for that kind age.
    pub fn note_activity(&mut self, kind: LabelKind, now: Instant) {
        self.clocks[kind as usize].note(now);
    }

    /// How long `entry` has waited while its partner's kind was arriving.
    fn age(&self, entry: &Waiting) -> Duration {
        let clock = self.clocks[entry.waits_for() as usize].elapsed;
        entry.waited_before + clock.saturating_sub(entry.since)
    }

    /// Whether entry `seq`, waiting for `kind`, may still get its partner: pairs are being made
    /// (within `max_age` of that kind's clock) and, `max_age` ago, they had not passed it yet.
    /// Then the model is catching up to it, however long that takes.
    fn catching_up_to(&self, seq: u64, kind: LabelKind) -> bool {
        let clock = self.clocks[kind as usize].elapsed;
        let since_last_pair = clock.saturating_sub(self.last_pair.clocks[kind as usize]);
        if since_last_pair > self.limits.max_age {
            return false;
        }
        let horizon = clock.checked_sub(self.limits.max_age);
        match self.frontier_history[kind as usize].front() {
            Some((at, Some(then))) if horizon.is_some_and(|h| *at <= h) => *then < seq,
            _ => true,
        }
    }

    /// Notes where the pairs are now on each kind's clock, keeping one reading `max_age` old.
    fn record_frontier(&mut self) {
        for kind in 0..2 {
            let clock = self.clocks[kind].elapsed;
            let seq = self.last_pair.seq;
            let history = &mut self.frontier_history[kind];
            if history
                .back()
                .is_none_or(|(at, last)| *at < clock || *last != seq)
            {
                history.push_back((clock, seq));
            }
            let horizon = clock.saturating_sub(self.limits.max_age);
            while history.len() > 1 && history[1].0 <= horizon {
                history.pop_front();
            }
        }
    }

    /// Ids waiting for a partner.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `id` was joined already (within the remembered window).
    pub fn is_joined(&self, id: &str) -> bool {
        self.joined.get(&joined_key(id)).is_some()
    }

    /// Remembers `id` as joined with its values (a row for it exists); it waits no longer.
    pub fn mark_joined(
        &mut self,
        id: &str,
        y_true: impl Into<Value>,
        y_pred: impl Into<Value>,
        model_version: Option<&str>,
    ) {
        self.remove_waiting(id);
        let (y_true, y_pred) = (y_true.into(), y_pred.into());
        self.remember(
            joined_key(id),
            &y_true,
            &y_pred,
            version_hash(model_version),
        );
    }

    /// Remembers a row read back from `metric_log.csv` as joined.
    pub fn mark_row_joined(&mut self, row: &Pair) {
        self.mark_joined(
            &row.id,
            row.y_true,
            row.y_pred,
            row.model_version.as_deref(),
        );
    }

    /// Remembers a classifier's row read back from `metric_log.csv` as joined (a class's print is
    /// of its label alone, so the row's lack of probabilities does not matter).
    pub fn mark_class_row_joined(&mut self, row: &ClassPair) {
        self.remove_waiting(&row.id);
        let label = |label: &pipeline::classes::ClassLabel| Value::class(label.clone(), None);
        self.remember(
            joined_key(&row.id),
            &label(&row.y_true),
            &label(&row.y_pred),
            version_hash(row.model_version.as_deref()),
        );
    }

    /// Changes how many joined ids are remembered; the oldest beyond it are forgotten.
    pub fn set_dedup_capacity(&mut self, capacity: usize) {
        self.limits.dedup_capacity = capacity;
        self.joined.set_capacity(capacity);
    }

    fn remember(&mut self, key: JoinedKey, y_true: &Value, y_pred: &Value, version: u32) {
        self.joined.insert(
            key,
            Joined {
                y_true: y_true.print(),
                y_pred: y_pred.print(),
                version,
                classes: matches!(y_true, Value::Class(_)),
            },
        );
    }

    /// Offers one value. A different value for a value already waiting is a conflict: the first
    /// one is kept and the error says so.
    pub fn offer(
        &mut self,
        kind: LabelKind,
        id: &str,
        value: impl Into<Value>,
        model_version: Option<&str>,
        sent_at_us: Option<u64>,
        now: Instant,
    ) -> Result<Offer, MessageError> {
        let value = value.into();
        self.note_activity(kind, now);
        let version = version_hash(model_version);
        if let Some(joined) = self.joined.get(&joined_key(id)) {
            return match kind {
                LabelKind::YTrue => {
                    let first = Seen::joined(joined.y_true, joined.classes);
                    same_or_conflict(id, kind, first, &value)
                }
                LabelKind::YPred => {
                    let first = Seen::joined(joined.y_pred, joined.classes);
                    same_prediction_or_conflict(id, first, joined.version, &value, version)
                }
            };
        }
        let created = !self.waiting.contains_key(id);
        let entry = match self.waiting.get_mut(id) {
            Some(entry) => entry,
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.order.insert(seq, id.to_owned());
                let partner = match kind {
                    LabelKind::YTrue => LabelKind::YPred,
                    LabelKind::YPred => LabelKind::YTrue,
                };
                let since = self.clocks[partner as usize].elapsed;
                self.waiting.entry(id.to_owned()).or_insert(Waiting {
                    seq,
                    since,
                    waited_before: Duration::ZERO,
                    y_true: None,
                    y_pred: None,
                    sent_at_us: None,
                })
            }
        };
        match (kind, &entry.y_true, &entry.y_pred) {
            (LabelKind::YTrue, Some(first), _) => {
                return same_or_conflict(id, kind, Seen::of(first), &value);
            }
            (LabelKind::YPred, _, Some((first, first_version))) => {
                let first_version = version_hash(first_version.as_deref());
                return same_prediction_or_conflict(
                    id,
                    Seen::of(first),
                    first_version,
                    &value,
                    version,
                );
            }
            _ => {}
        }
        match kind {
            LabelKind::YTrue => entry.y_true = Some(value),
            LabelKind::YPred => entry.y_pred = Some((value, model_version.map(str::to_owned))),
        }
        entry.sent_at_us = entry.sent_at_us.or(sent_at_us);
        let (Some(_), Some(_)) = (&entry.y_true, &entry.y_pred) else {
            if created {
                self.waiting_for[entry.waits_for() as usize] += 1;
            }
            return Ok(Offer::Waiting);
        };
        // It waited for this kind; now it has both values.
        let Some(done) = self.waiting.remove(id) else {
            return Ok(Offer::Waiting);
        };
        self.order.remove(&done.seq);
        self.count_out(kind);
        self.last_pair = LastPair {
            seq: Some(done.seq),
            clocks: [self.clocks[0].elapsed, self.clocks[1].elapsed],
        };
        let (Some(y_true), Some((y_pred, model_version))) = (done.y_true, done.y_pred) else {
            return Ok(Offer::Waiting);
        };
        self.remember(joined_key(id), &y_true, &y_pred, version);
        Ok(match (y_true, y_pred) {
            (Value::Number(y_true), Value::Number(y_pred)) => Offer::Paired(Pair {
                id: id.to_owned(),
                y_true,
                y_pred,
                model_version,
                sent_at_us: done.sent_at_us,
            }),
            (y_true, y_pred) => Offer::PairedClass(ClassPair::new(
                id.to_owned(),
                y_true,
                y_pred,
                model_version,
                done.sent_at_us,
            )),
        })
    }

    /// The waiting ids, oldest first, with how long each has waited (while its partner's kind
    /// was arriving).
    pub fn waiting_entries(&self) -> Vec<WaitingEntry> {
        self.order
            .values()
            .filter_map(|id| {
                let entry = self.waiting.get(id)?;
                let (y_pred, model_version) = match &entry.y_pred {
                    Some((value, version)) => (Some(value.clone()), version.clone()),
                    None => (None, None),
                };
                Some(WaitingEntry {
                    id: id.clone(),
                    y_true: entry.y_true.clone(),
                    y_pred,
                    model_version,
                    sent_at_us: entry.sent_at_us,
                    age_ms: self.age(entry).as_millis() as u64,
                })
            })
            .collect()
    }

    /// Puts back ids saved by [`Self::waiting_entries`], each with the age it had then, so the
    /// time the service was down does not count against them. Already joined ids are skipped.
    pub fn restore_waiting(&mut self, entries: Vec<WaitingEntry>) {
        for entry in entries {
            if self.is_joined(&entry.id) || self.waiting.contains_key(&entry.id) {
                continue;
            }
            if entry.y_true.is_none() && entry.y_pred.is_none() {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut waiting = Waiting {
                seq,
                since: Duration::ZERO,
                waited_before: Duration::from_millis(entry.age_ms),
                y_true: entry.y_true,
                y_pred: entry.y_pred.map(|value| (value, entry.model_version)),
                sent_at_us: entry.sent_at_us,
            };
            let waits_for = waiting.waits_for() as usize;
            waiting.since = self.clocks[waits_for].elapsed;
            self.waiting_for[waits_for] += 1;
            self.order.insert(seq, entry.id.clone());
            self.waiting.insert(entry.id, waiting);
        }
    }

    /// Drops the oldest waiting ids beyond the capacity, then the ids that waited longer than the
    /// maximum age while nobody is catching up to them (see the module header).
    pub fn evict(&mut self) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        while self.waiting.len() > self.limits.capacity {
            let Some((_, id)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.waiting.remove(&id) {
                self.count_out(entry.waits_for());
                evicted.push(Evicted {
                    id,
                    had: had(&entry),
                    reason: Eviction::Capacity,
                });
            }
        }
        self.record_frontier();
        // Per kind waited for, ages only grow towards the oldest entry, and whether pairs are
        // made below an entry only changes once: the first entry that stays ends that kind.
        let mut done = [false; 2];
        let mut stale = Vec::new();
        for (&seq, id) in &self.order {
            if done == [true; 2] {
                break;
            }
            let Some(entry) = self.waiting.get(id) else {
                continue;
            };
            let kind = entry.waits_for();
            if done[kind as usize] {
                continue;
            }
            if self.age(entry) <= self.limits.max_age || self.catching_up_to(seq, kind) {
                done[kind as usize] = true;
                continue;
            }
            stale.push(seq);
        }
        for seq in stale {
            let Some(id) = self.order.get(&seq).cloned() else {
                continue;
            };
            if let Some(entry) = self.remove_waiting(&id) {
                evicted.push(Evicted {
                    id,
                    had: had(&entry),
                    reason: Eviction::Age,
                });
            }
        }
        evicted
    }
}

/// Which value a waiting id has.
fn had(entry: &Waiting) -> LabelKind {
    if entry.y_true.is_some() {
        LabelKind::YTrue
    } else {
        LabelKind::YPred
    }
}

#[cfg(test)]
mod tests;
