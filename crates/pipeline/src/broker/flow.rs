//! Flow control of one input queue: when a consumer holds too much that it cannot finish yet (the
//! metric service's join, full of `y_true` waiting for a lagging model), it stops taking that queue
//! so the broker keeps the backlog, and takes it again once it has room.
//!
//! [`Hysteresis`] is the rule, as plain data: hold at a high-water mark, take again at a lower
//! one, so the consumer does not flap at the boundary. The consume loop asks
//! [`crate::broker::MessageHandler::accepts`] before it polls an input ([`Deliveries`]).

use super::handler::MessageHandler;
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use std::task::Poll;

/// Whether an input is being taken, after an [`Hysteresis::update`] that changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowChange {
    /// The level reached the high-water mark: stop taking the input.
    Held,
    /// The level fell to the low-water mark: take the input again.
    Resumed,
}

/// Holds an input at `hold_at` or more, resumes it at `resume_at` or less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    hold_at: usize,
    resume_at: usize,
    held: bool,
}

impl Hysteresis {
    /// Hold at `hold_at` (at least 1), resume at three quarters of it.
    pub fn with_high_water(hold_at: usize) -> Self {
        Self::new(hold_at, hold_at / 4 * 3 + hold_at % 4 * 3 / 4)
    }

    /// Hold at `hold_at` (at least 1), resume at `resume_at` (below `hold_at`, else one below).
    pub fn new(hold_at: usize, resume_at: usize) -> Self {
        let hold_at = hold_at.max(1);
        Self {
            hold_at,
            resume_at: resume_at.min(hold_at - 1),
            held: false,
        }
    }

    /// Whether the input is held now.
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The high-water mark.
    pub fn hold_at(&self) -> usize {
        self.hold_at
    }

    /// Takes the current level; returns the change it caused, if any.
    pub fn update(&mut self, level: usize) -> Option<FlowChange> {
        if !self.held && level >= self.hold_at {
            self.held = true;
            Some(FlowChange::Held)
        } else if self.held && level <= self.resume_at {
            self.held = false;
            Some(FlowChange::Resumed)
        } else {
            None
        }
    }
}

/// The consumers of a session's inputs, polled in turn (so a busy input cannot starve the
/// others), skipping the inputs the handler does not accept now.
pub(crate) struct Deliveries<S> {
    pub(crate) streams: Vec<S>,
    /// Input polled first next time.
    pub(crate) start: usize,
}

impl<S> Deliveries<S>
where
    S: futures_util::Stream<Item = lapin::Result<Delivery>> + Unpin,
{
    /// Which inputs the handler takes now.
    pub(crate) fn open<H: MessageHandler>(&self, handler: &H) -> Vec<bool> {
        (0..self.streams.len())
            .map(|i| handler.accepts(i))
            .collect()
    }

    /// The next delivery of an open input, with its input number; `None` when the broker ended a
    /// consumer. Pending while no input is open: the loop's other branches go on.
    pub(crate) async fn next(&mut self, open: &[bool]) -> Option<(usize, lapin::Result<Delivery>)> {
        futures_util::future::poll_fn(|cx| {
            let n = self.streams.len();
            for k in 0..n {
                let i = (self.start + k) % n;
                if !open.get(i).copied().unwrap_or(true) {
                    continue;
                }
                match self.streams[i].poll_next_unpin(cx) {
                    Poll::Ready(Some(item)) => {
                        self.start = (i + 1) % n;
                        return Poll::Ready(Some((i, item)));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn holds_at_the_high_mark_and_resumes_at_the_low_one() {
        let mut flow = Hysteresis::new(90, 75);
        assert_eq!(Hysteresis::with_high_water(100).resume_at, 75);
        assert_eq!(flow.update(89), None);
        assert_eq!(flow.update(90), Some(FlowChange::Held));
        assert_eq!(flow.update(95), None);
        assert_eq!(flow.update(76), None);
        assert!(flow.is_held());
        assert_eq!(flow.update(75), Some(FlowChange::Resumed));
        assert_eq!(flow.update(80), None);
        assert!(!flow.is_held());
    }

    #[test]
    fn tiny_capacities_still_hold_and_resume() {
        for high in 0..12 {
            let mut flow = Hysteresis::with_high_water(high);
            assert!(flow.hold_at >= 1 && flow.resume_at < flow.hold_at, "{high}");
            assert_eq!(flow.update(flow.hold_at), Some(FlowChange::Held));
            assert_eq!(flow.update(0), Some(FlowChange::Resumed));
        }
        assert_eq!(Hysteresis::with_high_water(10_000).resume_at, 7_500);
    }

    proptest! {
        /// Held exactly when the level last crossed the high mark and has not fallen to the low
        /// one since; every change is reported once.
        #[test]
        fn held_iff_the_last_mark_crossed_was_the_high_one(
            high in 0usize..1000,
            levels in proptest::collection::vec(0usize..1200, 0..200),
        ) {
            let mut flow = Hysteresis::with_high_water(high);
            let mut expected = false;
            for level in levels {
                let before = flow.is_held();
                let change = flow.update(level);
                if level >= flow.hold_at {
                    expected = true;
                } else if level <= flow.resume_at {
                    expected = false;
                }
                prop_assert_eq!(flow.is_held(), expected);
                let reported = match change {
                    Some(FlowChange::Held) => !before && flow.is_held(),
                    Some(FlowChange::Resumed) => before && !flow.is_held(),
                    None => before == flow.is_held(),
                };
                prop_assert!(reported);
                // Never held below the low mark, never taking at or above the high mark.
                prop_assert!(!(flow.is_held() && level <= flow.resume_at));
                prop_assert!(flow.is_held() || level < flow.hold_at);
            }
        }
    }
}
