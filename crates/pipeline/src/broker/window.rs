//! The ack window of a consume channel and the confirm window of a publisher, as plain data: delivery
//! tags, sequence numbers and states, no lapin types. The consume loop, the producer and the
//! benchmark's ceiling client keep the lapin futures beside these windows and report to them what the
//! broker answered; the windows alone decide what may be acked, nacked, counted or sent again.

use std::collections::VecDeque;

/// What a delivery waits for before it can be acked.
///
/// There is no other end: a delivery is only ever acked. Bad input is acked once its dead-letter
/// copy is confirmed, and a message the broker refused is published again while its delivery waits
/// ([`super::refusal`]), so the consume loop never gives an input back to its queue (which would
/// count against `x-delivery-limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// The handler's buffers being flushed.
    Flush,
    /// The broker's confirm of the message it caused.
    Confirm,
}

/// `basic.ack` with `multiple`: every delivery up to and including `upto` not yet settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckUpTo {
    /// The highest tag acked.
    pub upto: u64,
    /// How many deliveries this ack settles.
    pub count: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting(Pending),
    Done,
}

/// The deliveries of one channel between receipt and ack, in delivery (tag) order.
///
/// Acks come only from the front: a delivery is never acked (not even by a `multiple` ack)
/// before every delivery before it on the channel is done, and each is acked exactly once.
#[derive(Debug, Default)]
pub struct AckWindow {
    entries: VecDeque<(u64, State)>,
}

impl AckWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a delivery; tags must grow (the broker numbers deliveries per channel).
    pub fn push(&mut self, tag: u64, pending: Pending) {
        debug_assert!(self.entries.back().is_none_or(|(last, _)| *last < tag));
        self.entries.push_back((tag, State::Waiting(pending)));
    }

    /// The broker confirmed the message delivery `tag` caused. Unknown tags and deliveries not
    /// waiting for a confirm are ignored.
    pub fn confirmed(&mut self, tag: u64) {
        if let Ok(index) = self.entries.binary_search_by_key(&tag, |(tag, _)| *tag)
            && self.entries[index].1 == State::Waiting(Pending::Confirm)
        {
            self.entries[index].1 = State::Done;
        }
    }

    /// Whether some delivery waits for the handler's flush.
    pub fn needs_flush(&self) -> bool {
        self.entries
            .iter()
            .any(|(_, state)| *state == State::Waiting(Pending::Flush))
    }

    /// The handler flushed: every delivery handled so far is safe.
    pub fn flushed(&mut self) {
        for (_, state) in &mut self.entries {
            if *state == State::Waiting(Pending::Flush) {
                *state = State::Done;
            }
        }
    }

    /// Removes the done deliveries from the front and says what to ack, in one frame.
    pub fn take_settled(&mut self) -> Option<AckUpTo> {
        let mut ack: Option<AckUpTo> = None;
        while let Some(&(tag, State::Done)) = self.entries.front() {
            self.entries.pop_front();
            let count = ack.map_or(0, |ack| ack.count);
            ack = Some(AckUpTo {
                upto: tag,
                count: count + 1,
            });
        }
        ack
    }

    /// Deliveries not acked yet.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every delivery is acked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything (the channel is gone: the broker redelivers what was not acked).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// The fate of one published item (a sample of several messages, or one message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published<T> {
    /// Every message of it was confirmed.
    Confirmed(T),
    /// The broker refused at least one of its messages: publish it again.
    Refused(T),
}

#[derive(Debug)]
struct Slot<T> {
    seq: u64,
    item: T,
    waiting: u32,
    refused: bool,
}

/// Items published and not yet confirmed, in publish order. Each item has a number of messages
/// (parts); it is confirmed when every part is, refused when any part is refused.
#[derive(Debug)]
pub struct ConfirmWindow<T> {
    slots: VecDeque<Slot<T>>,
    next_seq: u64,
}

impl<T> Default for ConfirmWindow<T> {
    fn default() -> Self {
        Self {
            slots: VecDeque::new(),
            next_seq: 0,
        }
    }
}

impl<T> ConfirmWindow<T> {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an item of `parts` messages just published; returns its sequence number, which
    /// [`ConfirmWindow::answered`] takes.
    pub fn push(&mut self, item: T, parts: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back(Slot {
            seq,
            item,
            waiting: parts,
            refused: false,
        });
        seq
    }

    /// The broker answered one part of item `seq` (`positive`: acked and routed). Answers beyond
    /// the item's parts, or for an item no longer here, are ignored.
    pub fn answered(&mut self, seq: u64, positive: bool) {
        if let Ok(index) = self.slots.binary_search_by_key(&seq, |slot| slot.seq) {
            let slot = &mut self.slots[index];
            if slot.waiting > 0 {
                slot.waiting -= 1;
                slot.refused |= !positive;
            }
        }
    }

    /// Removes the answered items from the front, in publish order.
    pub fn take_answered(&mut self) -> Vec<Published<T>> {
        let mut out = Vec::new();
        while self.slots.front().is_some_and(|slot| slot.waiting == 0) {
            if let Some(slot) = self.slots.pop_front() {
                out.push(if slot.refused {
                    Published::Refused(slot.item)
                } else {
                    Published::Confirmed(slot.item)
                });
            }
        }
        out
    }

    /// The connection is gone: every item not yet taken, in publish order, to publish again.
    pub fn take_unanswered(&mut self) -> Vec<T> {
        self.slots.drain(..).map(|slot| slot.item).collect()
    }

    /// Items not yet taken.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn acks_wait_for_the_front() {
        let mut window = AckWindow::new();
        window.push(1, Pending::Confirm);
        window.push(2, Pending::Flush);
        window.push(3, Pending::Confirm);
        window.flushed();
        assert_eq!(window.take_settled(), None);
        window.confirmed(3);
        assert_eq!(window.take_settled(), None);
        window.confirmed(1);
        assert_eq!(window.take_settled(), Some(AckUpTo { upto: 3, count: 3 }));
        assert!(window.is_empty());
    }

    #[test]
    fn a_flush_is_needed_before_handled_deliveries_are_acked() {
        let mut window = AckWindow::new();
        window.push(7, Pending::Flush);
        assert!(window.needs_flush());
        assert_eq!(window.take_settled(), None);
        window.flushed();
        assert!(!window.needs_flush());
        assert_eq!(window.take_settled(), Some(AckUpTo { upto: 7, count: 1 }));
    }

    #[test]
    fn a_sample_is_confirmed_when_all_its_parts_are() {
        let mut window = ConfirmWindow::new();
        let a = window.push("a", 2);
        let b = window.push("b", 2);
        window.answered(b, true);
        window.answered(b, true);
        assert_eq!(window.take_answered(), vec![]);
        window.answered(a, true);
        window.answered(a, false);
        assert_eq!(
            window.take_answered(),
            vec![Published::Refused("a"), Published::Confirmed("b")]
        );
    }

    /// One step of a random consume session.
    #[derive(Clone, Debug)]
    enum Op {
        Deliver(Pending),
        /// Confirm the n-th (mod count) delivery waiting for one.
        Confirm(usize),
        Flush,
        Settle,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop_oneof![Just(Pending::Flush), Just(Pending::Confirm)].prop_map(Op::Deliver),
            3 => any::<usize>().prop_map(Op::Confirm),
            1 => Just(Op::Flush),
            2 => Just(Op::Settle),
        ]
    }

    /// What the broker sees, checked against what really happened to each delivery.
    #[derive(Default)]
    struct Broker {
        /// Tags delivered and not yet acked on the channel.
        outstanding: BTreeSet<u64>,
        acked: BTreeSet<u64>,
    }

    impl Broker {
        fn apply(&mut self, ack: Option<AckUpTo>, done: &BTreeSet<u64>) {
            let Some(AckUpTo { upto, count }) = ack else {
                return;
            };
            let covered: Vec<u64> = self.outstanding.range(..=upto).copied().collect();
            assert_eq!(covered.len(), count, "ack count");
            for tag in covered {
                assert!(
                    done.contains(&tag),
                    "acked tag {tag} before its work was safe"
                );
                assert!(self.outstanding.remove(&tag));
                assert!(self.acked.insert(tag), "tag {tag} acked twice");
            }
        }
    }

    proptest! {
        /// Any order of handled, confirmed and flushed deliveries: no tag is acked (even by a
        /// `multiple` ack) before its work is safe, each tag is acked exactly once, and once
        /// everything is confirmed and flushed, every tag is acked.
        #[test]
        fn the_ack_window_acks_each_tag_once_and_only_when_safe(ops in proptest::collection::vec(op(), 0..200)) {
            let mut window = AckWindow::new();
            let mut broker = Broker::default();
            let mut done = BTreeSet::new();
            let mut waiting_confirm: Vec<u64> = Vec::new();
            let mut waiting_flush: Vec<u64> = Vec::new();
            let mut next_tag = 1;
            for op in ops {
                match op {
                    Op::Deliver(pending) => {
                        let tag = next_tag;
                        next_tag += 1;
                        window.push(tag, pending);
                        broker.outstanding.insert(tag);
                        match pending {
                            Pending::Flush => waiting_flush.push(tag),
                            Pending::Confirm => waiting_confirm.push(tag),
                        }
                    }
                    Op::Confirm(n) if !waiting_confirm.is_empty() => {
                        let tag = waiting_confirm.remove(n % waiting_confirm.len());
                        window.confirmed(tag);
                        done.insert(tag);
                    }
                    Op::Confirm(..) => {}
                    Op::Flush => {
                        window.flushed();
                        done.extend(waiting_flush.drain(..));
                    }
                    Op::Settle => broker.apply(window.take_settled(), &done),
                }
            }
            for tag in waiting_confirm.drain(..) {
                window.confirmed(tag);
                done.insert(tag);
            }
            window.flushed();
            done.extend(waiting_flush.drain(..));
            broker.apply(window.take_settled(), &done);
            prop_assert!(window.is_empty());
            prop_assert!(broker.outstanding.is_empty());
            prop_assert_eq!(broker.acked.len() as u64, next_tag - 1);
        }

        /// Any order of answers: every item comes out exactly once, confirmed only when each of
        /// its parts was acked, and items lost with the connection come back for a retry.
        #[test]
        fn the_confirm_window_reports_each_item_once(
            parts in proptest::collection::vec(1u32..3, 0..60),
            answers in proptest::collection::vec((any::<usize>(), any::<bool>()), 0..150),
            lose_connection in any::<bool>(),
        ) {
            let mut window = ConfirmWindow::new();
            let mut left: Vec<(u64, u32)> = Vec::new();
            let mut refused_truth = BTreeSet::new();
            for (item, &n) in parts.iter().enumerate() {
                let seq = window.push(item, n);
                left.push((seq, n));
            }
            let mut seen = BTreeMap::new();
            for (pick, ok) in answers {
                if left.is_empty() {
                    break;
                }
                let index = pick % left.len();
                let (seq, remaining) = &mut left[index];
                window.answered(*seq, ok);
                if !ok {
                    refused_truth.insert(*seq as usize);
                }
                *remaining -= 1;
                if *remaining == 0 {
                    left.remove(index);
                }
                for published in window.take_answered() {
                    let (item, refused) = match published {
                        Published::Confirmed(item) => (item, false),
                        Published::Refused(item) => (item, true),
                    };
                    prop_assert_eq!(refused, refused_truth.contains(&item));
                    prop_assert!(!left.iter().any(|(seq, _)| *seq as usize == item), "item reported before all its answers");
                    prop_assert!(seen.insert(item, refused).is_none(), "item reported twice");
                }
            }
            if lose_connection || left.is_empty() {
                for item in window.take_unanswered() {
                    prop_assert!(seen.insert(item, true).is_none(), "item reported twice");
                }
                prop_assert_eq!(seen.len(), parts.len());
            }
        }
    }
}
