//! The loss audit: the producer counts what it sent per time window and announces it; the metric
//! service counts what it received and reconciles the two, so a sample that never arrives is
//! reported, not just a row fewer in the CSV.
//!
//! - Every native message the producer sends carries a tag `"audit": "<producer>:<window>"`: its
//!   instance (random per process, so a restarted producer never announces a sample twice) and the
//!   window of the sample's first send (`send time / AUDIT_WINDOW_SECS`). The model copies the
//!   tag from `features` into `y_pred`. Course-format messages have no tag and are not audited.
//! - [`Outbox`] (producer): counts each sample once, when the broker confirms it, into its
//!   window and partition; a window is announced as an [`AuditRecord`] once its time is over and
//!   every sample of it is confirmed (at exit: what was confirmed, the rest as `unconfirmed`).
//! - [`Ledger`] (metric): counts each sample once per stream, when the join takes it (a row or
//!   waiting, never a duplicate), and reconciles each window `AUDIT_GRACE_SECS` after its record
//!   arrived: [`WindowResult`]. A sample that arrives after its window was found missing is
//!   counted late and taken off the missing count, as long as the window is kept
//!   (`AUDIT_RETAIN_SECS`).
//!
//! Counts are order-independent: a count and the wrapping sum of the ids' FNV-1a-64 hashes.

use crate::partition::fnv1a64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The audit queue of a stream queue (`y_true` or one of its partition queues): where the
/// producer announces the windows of the ids of that queue.
pub fn audit_queue(queue: &str) -> String {
    format!("{queue}.audit")
}

/// The audit queues of the stream `y_true_queue` under `partitions`, in partition order.
pub fn audit_queues(y_true_queue: &str, partitions: crate::partition::Partitions) -> Vec<String> {
    partitions
        .queues(y_true_queue)
        .iter()
        .map(|queue| audit_queue(queue))
        .collect()
}

/// The message field that carries the tag.
pub const TAG_FIELD: &str = "audit";

/// Longest producer instance name in a tag.
const MAX_PRODUCER_LEN: usize = 64;

/// A fresh producer instance name: 12 hex digits, random per process.
pub fn new_producer_id() -> String {
    format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// The tag of a sample of `producer` first sent in `window`.
pub fn tag(producer: &str, window: u64) -> String {
    format!("{producer}:{window}")
}

/// The producer and window of a tag; `None` for anything else (then the message is not audited).
pub fn parse_tag(tag: &str) -> Option<(&str, u64)> {
    let (producer, window) = tag.rsplit_once(':')?;
    let valid = !producer.is_empty()
        && producer.len() <= MAX_PRODUCER_LEN
        && producer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid || window.is_empty() || !window.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((producer, window.parse().ok()?))
}

/// The window of a send time, for windows of `window_secs` (> 0).
pub fn window_of(at_us: u64, window_secs: u64) -> u64 {
    at_us / window_secs.max(1).saturating_mul(1_000_000)
}

/// How many samples, and the wrapping sum of their ids' FNV-1a-64 hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Samples counted.
    pub count: u64,
    /// Wrapping sum of `fnv1a64(id)` over them.
    pub checksum: u64,
}

impl Tally {
    /// Counts one id.
    pub fn add(&mut self, id: &str) {
        self.count += 1;
        self.checksum = self.checksum.wrapping_add(fnv1a64(id.as_bytes()));
    }
}

/// What the producer announces for one window of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The producer instance.
    pub producer: String,
    /// The window number (`send time / window_secs`).
    pub window: u64,
    /// The partition of the ids counted (0 with one partition).
    pub partition: u32,
    /// Length of a window in seconds.
    pub window_secs: u64,
    /// Start and end of the window, microseconds since the Unix epoch.
    pub start_us: u64,
    /// End of the window (exclusive).
    pub end_us: u64,
    /// Samples of the window the broker confirmed, and their checksum.
    pub count: u64,
    /// Wrapping sum of `fnv1a64(id)` of those samples.
    pub checksum: u64,
    /// Samples of the window the producer stopped without a confirm for: they may have arrived.
    #[serde(default)]
    pub unconfirmed: u64,
}

impl AuditRecord {
    /// The key the metric service counts this window under.
    pub fn key(&self) -> WindowKey {
        WindowKey {
            producer: self.producer.clone(),
            window: self.window,
            partition: self.partition,
        }
    }
}

/// A window of one producer in one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WindowKey {
    /// The producer instance.
    pub producer: String,
    /// The window number.
    pub window: u64,
    /// The partition.
    pub partition: u32,
}

#[derive(Debug, Default)]
struct OpenWindow {
    tally: Tally,
    outstanding: u64,
}

/// The producer's side: counts confirmed samples per window and partition, and says which
/// windows can be announced.
#[derive(Debug)]
pub struct Outbox {
    producer: String,
    window_secs: u64,
    open: BTreeMap<(u64, u32), OpenWindow>,
}

impl Outbox {
    /// An outbox for `producer` with windows of `window_secs` (> 0) seconds.
    pub fn new(producer: String, window_secs: u64) -> Self {
        Self {
            producer,
            window_secs: window_secs.max(1),
            open: BTreeMap::new(),
        }
    }

    /// The producer instance.
    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// The window a sample first sent at `at_us` belongs to.
    pub fn window_of(&self, at_us: u64) -> u64 {
        window_of(at_us, self.window_secs)
    }

    /// A new sample of `window` for `partition`: owed until [`Outbox::confirmed`].
    pub fn sent(&mut self, window: u64, partition: u32) {
        self.open
            .entry((window, partition))
            .or_default()
            .outstanding += 1;
    }

    /// The broker confirmed the sample `id` of `window` (counted once, whatever was resent).
    pub fn confirmed(&mut self, window: u64, partition: u32, id: &str) {
        let open = self.open.entry((window, partition)).or_default();
        open.tally.add(id);
        open.outstanding = open.outstanding.saturating_sub(1);
    }

    /// Samples sent and not confirmed yet.
    pub fn outstanding(&self) -> u64 {
        self.open.values().map(|open| open.outstanding).sum()
    }

    /// Takes the windows that can be announced now: those whose time is over with every sample
    /// confirmed; with `closing` (the producer stops) every window, the samples still owed as
    /// `unconfirmed`.
    pub fn due(&mut self, now_us: u64, closing: bool) -> Vec<AuditRecord> {
        let span = self.window_secs * 1_000_000;
        let ready: Vec<(u64, u32)> = self
            .open
            .iter()
            .filter(|((window, _), open)| {
                closing || (open.outstanding == 0 && (window + 1).saturating_mul(span) <= now_us)
            })
            .map(|(key, _)| *key)
            .collect();
        ready
            .into_iter()
            .filter_map(|key| {
                let open = self.open.remove(&key)?;
                let (window, partition) = key;
                Some(AuditRecord {
                    producer: self.producer.clone(),
                    window,
                    partition,
                    window_secs: self.window_secs,
                    start_us: window.saturating_mul(span),
                    end_us: (window + 1).saturating_mul(span),
                    count: open.tally.count,
                    checksum: open.tally.checksum,
                    unconfirmed: open.outstanding,
                })
            })
            .collect()
    }
}

/// The two audited streams, in the order of the ledger's counts.
pub const STREAMS: [&str; 2] = ["y_true", "y_pred"];

/// What a reconciled window came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowResult {
    /// Every announced sample arrived on both streams, nothing else.
    #[default]
    Complete,
    /// Samples announced never arrived (on at least one stream).
    Missing,
    /// Samples arrived that were never announced, none missing.
    Unexpected,
    /// Counts agree but the checksums do not: as many others arrived as went missing.
    Mismatch,
    /// Samples arrived for a window whose record never came (a producer killed before it could
    /// announce), found when the window was dropped.
    Unannounced,
}

impl WindowResult {
    /// The label of `pipeline_audit_windows_total{result}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Missing => "missing",
            Self::Unexpected => "unexpected",
            Self::Mismatch => "mismatch",
            Self::Unannounced => "unannounced",
        }
    }
}

/// A window reconciled (or dropped unannounced): what to count and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// The window.
    pub key: WindowKey,
    /// Its result.
    pub result: WindowResult,
    /// Samples announced and received per stream ([`STREAMS`] order).
    pub announced: u64,
    /// Received per stream.
    pub received: [u64; 2],
    /// Missing per stream.
    pub missing: [u64; 2],
    /// Unexpected per stream.
    pub unexpected: [u64; 2],
}

/// What counting one received sample found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Counted in its window (reconciled or not yet).
    Counted,
    /// It belongs to a window already found missing on this stream: counted late, one fewer
    /// missing.
    Late,
    /// It arrived after its window was reconciled, beyond what was announced.
    Unexpected,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Reconciled {
    result: WindowResult,
    missing: [u64; 2],
    unexpected: [u64; 2],
    late: [u64; 2],
    at_us: u64,
}

/// One window as the metric service holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerWindow {
    received: [Tally; 2],
    record: Option<AuditRecord>,
    announced_at_us: Option<u64>,
    first_seen_us: u64,
    reconciled: Option<Reconciled>,
}

/// Totals of the windows reconciled since a time, for the dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Windows reconciled complete.
    pub complete: u64,
    /// Windows with missing, unexpected or mismatched samples.
    pub incomplete: u64,
    /// Samples missing now (found missing, not arrived late since), both streams.
    pub missing: u64,
    /// Samples counted late.
    pub late: u64,
    /// Windows announced, waiting for their grace to end.
    pub pending: u64,
}

/// The metric service's side: what arrived per window and stream, the producers' records, and
/// what reconciling them found. Serializable for the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    windows: Vec<(WindowKey, LedgerWindow)>,
    #[serde(skip)]
    index: BTreeMap<WindowKey, usize>,
}

impl Ledger {
    /// Rebuilds the index after deserializing.
    pub fn reindexed(mut self) -> Self {
        self.index = self
            .windows
            .iter()
            .enumerate()
            .map(|(i, (key, _))| (key.clone(), i))
            .collect();
        self
    }

    fn window(&mut self, key: &WindowKey, now_us: u64) -> &mut LedgerWindow {
        let i = match self.index.get(key) {
            Some(&i) => i,
            None => {
                self.windows.push((
                    key.clone(),
                    LedgerWindow {
                        first_seen_us: now_us,
                        ..LedgerWindow::default()
                    },
                ));
                self.index.insert(key.clone(), self.windows.len() - 1);
                self.windows.len() - 1
            }
        };
        &mut self.windows[i].1
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Where window `key` is held (created when new): a slot for [`Ledger::received_in`], valid
    /// until the next [`Ledger::expire`] that drops a window.
    pub fn slot(&mut self, key: &WindowKey, now_us: u64) -> usize {
        self.window(key, now_us);
        self.index.get(key).copied().unwrap_or(0)
    }

    /// Counts sample `id` of window `key` on `stream` (0 `y_true`, 1 `y_pred`); call once per
    /// sample and stream (the join's first sight of it).
    pub fn received(&mut self, key: &WindowKey, stream: usize, id: &str, now_us: u64) -> Received {
        let slot = self.slot(key, now_us);
        self.received_in(slot, stream, id)
    }

    /// [`Ledger::received`] by the window's slot, without looking the key up.
    pub fn received_in(&mut self, slot: usize, stream: usize, id: &str) -> Received {
        let Some((_, window)) = self.windows.get_mut(slot) else {
            return Received::Counted;
        };
        window.received[stream].add(id);
        let announced = window
            .record
            .as_ref()
            .map_or(0, |r| r.count + r.unconfirmed);
        match &mut window.reconciled {
            None => Received::Counted,
            Some(done) if done.missing[stream] > done.late[stream] => {
                done.late[stream] += 1;
                Received::Late
            }
            Some(done) if window.received[stream].count > announced => {
                done.unexpected[stream] += 1;
                Received::Unexpected
            }
            Some(_) => Received::Counted,
        }
    }

    /// The producer's record of a window; a second copy of one already held is ignored (returns
    /// false).
    pub fn announced(&mut self, record: AuditRecord, now_us: u64) -> bool {
        let window = self.window(&record.key(), now_us);
        if window.record.is_some() {
            return false;
        }
        window.record = Some(record);
        window.announced_at_us = Some(now_us);
        true
    }

    /// Reconciles every window whose record came at least `grace_us` ago.
    pub fn reconcile_due(&mut self, now_us: u64, grace_us: u64) -> Vec<Reconciliation> {
        let mut done = Vec::new();
        for (key, window) in &mut self.windows {
            let (Some(record), Some(at)) = (&window.record, window.announced_at_us) else {
                continue;
            };
            if window.reconciled.is_some() || at.saturating_add(grace_us) > now_us {
                continue;
            }
            let mut missing = [0; 2];
            let mut unexpected = [0; 2];
            let mut mismatch = false;
            for s in 0..2 {
                let got = window.received[s];
                missing[s] = record.count.saturating_sub(got.count);
                unexpected[s] = got.count.saturating_sub(record.count + record.unconfirmed);
                if record.unconfirmed == 0
                    && got.count == record.count
                    && got.checksum != record.checksum
                {
                    mismatch = true;
                }
            }
            let result = if missing.iter().any(|&n| n > 0) {
                WindowResult::Missing
            } else if unexpected.iter().any(|&n| n > 0) {
                WindowResult::Unexpected
            } else if mismatch {
                WindowResult::Mismatch
            } else {
                WindowResult::Complete
            };
            window.reconciled = Some(Reconciled {
                result,
                missing,
                unexpected,
                late: [0; 2],
                at_us: now_us,
            });
            done.push(Reconciliation {
                key: key.clone(),
                result,
                announced: record.count,
                received: [window.received[0].count, window.received[1].count],
                missing,
                unexpected,
            });
        }
        done
    }

    /// Drops the windows first seen more than `retain_us` ago; those that received samples but
    /// never got a record come back as [`WindowResult::Unannounced`].
    pub fn expire(&mut self, now_us: u64, retain_us: u64) -> Vec<Reconciliation> {
        let mut dropped = Vec::new();
        self.windows.retain(|(key, window)| {
            if window.first_seen_us.saturating_add(retain_us) > now_us {
                return true;
            }
            if window.record.is_none() {
                dropped.push(Reconciliation {
                    key: key.clone(),
                    result: WindowResult::Unannounced,
                    announced: 0,
                    received: [window.received[0].count, window.received[1].count],
                    missing: [0; 2],
                    unexpected: [window.received[0].count, window.received[1].count],
                });
            }
            false
        });
        if !dropped.is_empty() || self.index.len() != self.windows.len() {
            *self = std::mem::take(self).reindexed();
        }
        dropped
    }

    /// Samples missing now per stream: found missing and not arrived late since.
    pub fn missing_now(&self) -> [u64; 2] {
        let mut missing = [0; 2];
        for (_, window) in &self.windows {
            if let Some(done) = &window.reconciled {
                for (s, n) in missing.iter_mut().enumerate() {
                    *n += done.missing[s].saturating_sub(done.late[s]);
                }
            }
        }
        missing
    }

    /// Windows reconciled since `since_us`, and what is missing now.
    pub fn summary(&self, since_us: u64) -> Summary {
        let mut summary = Summary::default();
        for (_, window) in &self.windows {
            match &window.reconciled {
                Some(done) if done.at_us >= since_us => {
                    if done.result == WindowResult::Complete {
                        summary.complete += 1;
                    } else {
                        summary.incomplete += 1;
                    }
                    summary.late += done.late.iter().sum::<u64>();
                }
                Some(_) => {}
                None if window.record.is_some() => summary.pending += 1,
                None => {}
            }
        }
        summary.missing = self.missing_now().iter().sum();
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000;

    #[test]
    fn tags_round_trip_and_junk_is_not_a_tag() {
        assert_eq!(parse_tag(&tag("a1b2c3", 17)), Some(("a1b2c3", 17)));
        for junk in [
            "",
            ":",
            "a:",
            ":1",
            "a:1x",
            "a b:1",
            "a:-1",
            &format!("{}:1", "x".repeat(65)),
        ] {
            assert_eq!(parse_tag(junk), None, "{junk:?}");
        }
        let id = new_producer_id();
        assert_eq!(id.len(), 12);
        assert!(parse_tag(&tag(&id, 0)).is_some());
        assert_eq!(window_of(25 * S + 3, 10), 2);
    }

    #[test]
    fn a_window_is_announced_once_over_and_confirmed() {
        let mut outbox = Outbox::new("p".into(), 10);
        outbox.sent(0, 0);
        outbox.sent(0, 0);
        outbox.confirmed(0, 0, "a");
        assert!(outbox.due(11 * S, false).is_empty(), "one still owed");
        outbox.confirmed(0, 0, "b");
        assert!(outbox.due(9 * S, false).is_empty(), "not over yet");
        let records = outbox.due(10 * S, false);
        assert_eq!(records.len(), 1);
        let mut tally = Tally::default();
        tally.add("a");
        tally.add("b");
        assert_eq!((records[0].count, records[0].checksum), (2, tally.checksum));
        assert_eq!((records[0].start_us, records[0].end_us), (0, 10 * S));
        assert!(outbox.due(100 * S, false).is_empty(), "announced once");
    }

    #[test]
    fn closing_announces_what_was_confirmed_and_the_rest_as_unconfirmed() {
        let mut outbox = Outbox::new("p".into(), 10);
        for _ in 0..3 {
            outbox.sent(5, 1);
        }
        outbox.confirmed(5, 1, "a");
        let records = outbox.due(51 * S, true);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].count, records[0].unconfirmed), (1, 2));
        assert_eq!(records[0].partition, 1);
    }

    fn record(count_ids: &[&str], unconfirmed: u64) -> AuditRecord {
        let mut tally = Tally::default();
        count_ids.iter().for_each(|id| tally.add(id));
        AuditRecord {
            producer: "p".into(),
            window: 0,
            partition: 0,
            window_secs: 10,
            start_us: 0,
            end_us: 10 * S,
            count: tally.count,
            checksum: tally.checksum,
            unconfirmed,
        }
    }

    #[test]
    fn reconciling_finds_complete_missing_unexpected_mismatch_and_late() {
        let key = record(&[], 0).key();
        let ids = ["a", "b", "c"];
        // Complete, only after the grace.
        let mut ledger = Ledger::default();
        ledger.announced(record(&ids, 0), 100);
        assert!(!ledger.announced(record(&ids, 0), 100), "a copy is ignored");
        for id in ids {
            ledger.received(&key, 0, id, 50);
            ledger.received(&key, 1, id, 50);
        }
        assert!(ledger.reconcile_due(100 + 29, 30).is_empty());
        let done = ledger.reconcile_due(130, 30);
        assert_eq!(done[0].result, WindowResult::Complete);
        assert!(ledger.reconcile_due(1000, 30).is_empty(), "once");

        // One y_pred missing, then late.
        let mut ledger = Ledger::default();
        ledger.announced(record(&ids, 0), 0);
        for id in ids {
            ledger.received(&key, 0, id, 0);
        }
        ledger.received(&key, 1, "a", 0);
        let done = ledger.reconcile_due(30, 30);
        assert_eq!(
            (done[0].result, done[0].missing),
            (WindowResult::Missing, [0, 2])
        );
        assert_eq!(ledger.missing_now(), [0, 2]);
        assert_eq!(ledger.received(&key, 1, "b", 40), Received::Late);
        assert_eq!(ledger.missing_now(), [0, 1]);
        assert_eq!(ledger.summary(0).late, 1);

        // One never announced arrives: unexpected.
        let mut ledger = Ledger::default();
        ledger.announced(record(&ids[..2], 0), 0);
        for id in ids {
            ledger.received(&key, 0, id, 0);
            ledger.received(&key, 1, id, 0);
        }
        let done = ledger.reconcile_due(30, 30);
        assert_eq!(
            (done[0].result, done[0].unexpected),
            (WindowResult::Unexpected, [1, 1])
        );

        // ... unless the producer stopped without its confirm.
        let mut ledger = Ledger::default();
        ledger.announced(record(&ids[..2], 1), 0);
        for id in ids {
            ledger.received(&key, 0, id, 0);
            ledger.received(&key, 1, id, 0);
        }
        assert_eq!(
            ledger.reconcile_due(30, 30)[0].result,
            WindowResult::Complete
        );

        // Same count, other ids: mismatch.
        let mut ledger = Ledger::default();
        ledger.announced(record(&ids, 0), 0);
        for id in ["a", "b", "x"] {
            ledger.received(&key, 0, id, 0);
            ledger.received(&key, 1, id, 0);
        }
        assert_eq!(
            ledger.reconcile_due(30, 30)[0].result,
            WindowResult::Mismatch
        );
    }

    #[test]
    fn windows_without_a_record_are_reported_when_dropped_and_the_ledger_survives_json() {
        let key = record(&[], 0).key();
        let mut ledger = Ledger::default();
        ledger.received(&key, 0, "a", 0);
        let other = WindowKey {
            window: 1,
            ..key.clone()
        };
        ledger.announced(
            AuditRecord {
                window: 1,
                ..record(&["b"], 0)
            },
            5,
        );
        let text = serde_json::to_string(&ledger).unwrap();
        let mut back: Ledger = serde_json::from_str::<Ledger>(&text).unwrap().reindexed();
        assert_eq!(back, ledger);
        assert!(back.expire(99, 100).is_empty());
        let dropped = back.expire(100, 100);
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            (dropped[0].result, dropped[0].received),
            (WindowResult::Unannounced, [1, 0])
        );
        assert_eq!(back.len(), 1);
        back.received(&other, 0, "b", 101);
        assert_eq!(back.reconcile_due(200, 30)[0].missing, [0, 1]);
    }

    proptest! {
        /// Whatever the order of sends, confirms and resends, every confirmed sample is announced
        /// exactly once, in its window, and a ledger that saw a subset finds exactly the rest
        /// missing.
        #[test]
        fn every_confirmed_sample_is_announced_once_and_the_rest_found_missing(
            samples in proptest::collection::vec((0u64..5, 0u32..3, any::<bool>(), any::<bool>()), 0..200),
        ) {
            let mut outbox = Outbox::new("p".into(), 1);
            let ids: Vec<String> = (0..samples.len()).map(|i| format!("id-{i}")).collect();
            for (i, &(window, partition, _, _)) in samples.iter().enumerate() {
                outbox.sent(window, partition);
                outbox.confirmed(window, partition, &ids[i]);
            }
            let records = outbox.due(5 * S, false);
            prop_assert_eq!(records.iter().map(|r| r.count).sum::<u64>(), samples.len() as u64);
            prop_assert!(outbox.due(100 * S, true).is_empty());

            let mut ledger = Ledger::default();
            for record in &records {
                ledger.announced(record.clone(), 0);
            }
            let mut lost = [0u64; 2];
            for (i, &(window, partition, keep_true, keep_pred)) in samples.iter().enumerate() {
                let key = WindowKey { producer: "p".into(), window, partition };
                for (s, keep) in [keep_true, keep_pred].into_iter().enumerate() {
                    if keep {
                        ledger.received(&key, s, &ids[i], 0);
                    } else {
                        lost[s] += 1;
                    }
                }
            }
            let done = ledger.reconcile_due(1, 0);
            prop_assert_eq!(done.len(), records.len());
            let missing = done.iter().fold([0, 0], |acc, r| [acc[0] + r.missing[0], acc[1] + r.missing[1]]);
            prop_assert_eq!(missing, lost);
            prop_assert!(done.iter().all(|r| r.unexpected == [0, 0]));
            prop_assert!(done.iter().all(|r| (r.result == WindowResult::Complete) == (r.missing == [0, 0])));
        }
    }
}
