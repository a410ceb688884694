//! What the consume loop does when the broker refuses a message it published for an input (a
//! `basic.nack`, an unroutable return, a publish channel closed under it), as plain data.
//!
//! A refusal is a fault of the broker, not of the input: a quorum queue whose leader just died
//! nacks publishes for as long as its new leader is not known to the publishing channel (seen for
//! 24 s on RabbitMQ 3.10 after a node was killed). So the input is never given back to its queue:
//! a requeue would count against `x-delivery-limit`, and after five quick rounds the broker would
//! dead-letter an input that was never wrong. Instead [`Refusals`] holds the refused message (the
//! input stays unacked), and the loop publishes it again after a capped backoff; every
//! [`REOPEN_EVERY`]-th round in a row it opens a new publish channel first, which drops the
//! broker's per-channel route to a dead leader. The consume channels (and so the unacked inputs)
//! stay as they are. While messages are held the loop takes no new input.
//!
//! An episode starts with the first refusal and ends when every held message is confirmed: one
//! WARN at its start, one INFO at its end with what it cost ([`Episode`]).

use super::retry::Backoff;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First and longest pause before publishing held messages again.
pub const RESEND_DELAY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Every this many refused rounds in a row, the publish channel is opened anew before the round.
pub const REOPEN_EVERY: u32 = 3;

/// A refused message waiting to be published again, with the input delivery it acks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<M> {
    /// The input (queue number) of the delivery.
    pub input: usize,
    /// The delivery's tag on its consume channel.
    pub tag: u64,
    /// The message to publish again.
    pub message: M,
}

/// A round of publishing the held messages again.
#[derive(Debug, PartialEq, Eq)]
pub struct Round<M> {
    /// Open a new publish channel before publishing.
    pub reopen_channel: bool,
    /// The messages, oldest refusal first.
    pub messages: Vec<Held<M>>,
}

/// A refusal episode: from the first refused message to the last one confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    /// When the first refusal came.
    pub started: Instant,
    /// Refusals in the episode (a message refused twice counts twice).
    pub refused: u64,
    /// Rounds of publishing again.
    pub rounds: u32,
    /// Publish channels opened anew.
    pub reopened: u32,
}

/// What a refusal means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The first refusal of an episode: say so once.
    EpisodeStarted,
    /// One more in an episode already reported.
    Again,
}

/// The refused messages of one session and the episode they belong to.
#[derive(Debug)]
pub struct Refusals<M> {
    held: VecDeque<Held<M>>,
    /// Messages published again and not answered yet.
    resent: usize,
    backoff: Backoff,
    /// Refused rounds in a row (a round is scheduled by the first refusal after the last one).
    rounds_in_a_row: u32,
    next_round: Option<(Instant, bool)>,
    episode: Option<Episode>,
}

impl<M> Default for Refusals<M> {
    fn default() -> Self {
        Self::new(RESEND_DELAY.0, RESEND_DELAY.1)
    }
}

impl<M> Refusals<M> {
    /// No refusal yet; rounds wait from `base` up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            held: VecDeque::new(),
            resent: 0,
            backoff: Backoff::new(base, cap),
            rounds_in_a_row: 0,
            next_round: None,
            episode: None,
        }
    }

    /// The broker refused `message`, published for delivery `tag` of `input`; `resent` says
    /// whether it was itself published again by a [`Round`]. Holds it and schedules a round.
    pub fn refused(
        &mut self,
        input: usize,
        tag: u64,
        message: M,
        resent: bool,
        now: Instant,
    ) -> Refused {
        if resent {
            self.resent = self.resent.saturating_sub(1);
        }
        self.held.push_back(Held {
            input,
            tag,
            message,
        });
        if self.next_round.is_none() {
            self.rounds_in_a_row += 1;
            let reopen = self.rounds_in_a_row.is_multiple_of(REOPEN_EVERY);
            self.next_round = Some((now + self.backoff.next_delay(), reopen));
        }
        match &mut self.episode {
            Some(episode) => {
                episode.refused += 1;
                Refused::Again
            }
            None => {
                self.episode = Some(Episode {
                    started: now,
                    refused: 1,
                    rounds: 0,
                    reopened: 0,
                });
                Refused::EpisodeStarted
            }
        }
    }

    /// When the next round is due, if one is scheduled.
    pub fn due(&self) -> Option<Instant> {
        self.next_round.map(|(at, _)| at)
    }

    /// Whether a round is due at `now`, and if so whether it opens a new channel first (then the
    /// messages the old channel has not answered go to [`Self::hold`] before [`Self::take_round`]).
    pub fn round_due(&self, now: Instant) -> Option<bool> {
        self.next_round
            .filter(|(at, _)| *at <= now)
            .map(|(_, reopen)| reopen)
    }

    /// The round due at `now`, if any: every held message, to publish again.
    pub fn take_round(&mut self, now: Instant) -> Option<Round<M>> {
        let (at, reopen_channel) = self.next_round?;
        if at > now {
            return None;
        }
        self.next_round = None;
        let messages: Vec<Held<M>> = self.held.drain(..).collect();
        self.resent += messages.len();
        if let Some(episode) = &mut self.episode {
            episode.rounds += 1;
            episode.reopened += u32::from(reopen_channel);
        }
        Some(Round {
            reopen_channel,
            messages,
        })
    }

    /// The publish channel failed or is being replaced: the messages still unanswered on it
    /// (`resent` of them published by a round) are held like refused ones, and the next round
    /// opens a new channel.
    pub fn hold(&mut self, held: impl IntoIterator<Item = Held<M>>, resent: usize, now: Instant) {
        self.resent = self.resent.saturating_sub(resent);
        for Held {
            input,
            tag,
            message,
        } in held
        {
            self.refused(input, tag, message, false, now);
        }
        if let Some((_, reopen)) = &mut self.next_round {
            *reopen = true;
        }
    }

    /// The broker confirmed a message; `resent` says whether a round published it. Returns the
    /// episode once its last held message is confirmed.
    pub fn confirmed(&mut self, resent: bool) -> Option<Episode> {
        if resent {
            self.resent = self.resent.saturating_sub(1);
        }
        if self.held.is_empty() && self.resent == 0 && self.next_round.is_none() {
            self.rounds_in_a_row = 0;
            self.backoff.reset();
            return self.episode.take();
        }
        None
    }

    /// Whether messages are held or published again and unanswered: take no new input then.
    pub fn holding(&self) -> bool {
        !self.held.is_empty() || self.resent > 0
    }

    /// The episode under way, if any.
    pub fn episode(&self) -> Option<&Episode> {
        self.episode.as_ref()
    }

    /// Held messages.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn refusals() -> Refusals<&'static str> {
        Refusals::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    #[test]
    fn a_refused_message_is_held_then_sent_again_after_a_pause() {
        let t0 = Instant::now();
        let mut r = refusals();
        assert_eq!(r.refused(0, 7, "y", false, t0), Refused::EpisodeStarted);
        assert!(r.holding());
        let due = r.due().expect("a round is scheduled");
        assert!(due > t0 && due <= t0 + Duration::from_millis(100));
        assert_eq!(r.take_round(t0), None, "not before it is due");
        let round = r.take_round(due).expect("due");
        assert!(!round.reopen_channel);
        assert_eq!(
            round.messages,
            vec![Held {
                input: 0,
                tag: 7,
                message: "y"
            }]
        );
        assert!(r.holding(), "published again, not answered yet");
        let episode = r.confirmed(true).expect("the episode ends");
        assert_eq!(
            (episode.refused, episode.rounds, episode.reopened),
            (1, 1, 0)
        );
        assert!(!r.holding());
    }

    #[test]
    fn rounds_back_off_and_every_third_reopens_the_channel() {
        let mut now = Instant::now();
        let mut r = refusals();
        let mut pauses = Vec::new();
        let mut reopens = Vec::new();
        r.refused(0, 1, "y", false, now);
        for _ in 0..9 {
            let due = r.due().expect("scheduled");
            pauses.push(due - now);
            now = due;
            let round = r.take_round(now).expect("due");
            reopens.push(round.reopen_channel);
            for held in round.messages {
                r.refused(held.input, held.tag, held.message, true, now);
            }
        }
        assert_eq!(
            reopens,
            [false, false, true, false, false, true, false, false, true]
        );
        // Full jitter halves at most: each cap-free pause is at least the previous one's half-range.
        assert!(pauses[8] >= Duration::from_millis(2500), "{pauses:?}");
        assert!(pauses.iter().all(|p| *p <= Duration::from_secs(5)));
        assert!(pauses[0] <= Duration::from_millis(100));
        let episode = *r.episode().expect("under way");
        assert_eq!(
            (episode.refused, episode.rounds, episode.reopened),
            (10, 9, 3)
        );
    }

    #[test]
    fn refusals_while_a_round_is_scheduled_join_it() {
        let t0 = Instant::now();
        let mut r = refusals();
        assert_eq!(r.refused(0, 1, "a", false, t0), Refused::EpisodeStarted);
        assert_eq!(r.refused(1, 4, "b", false, t0), Refused::Again);
        let round = r.take_round(r.due().expect("scheduled")).expect("due");
        assert_eq!(round.messages.len(), 2);
        assert_eq!(r.confirmed(true), None, "one still unanswered");
        assert!(r.confirmed(true).is_some());
    }

    #[test]
    fn a_new_episode_starts_over() {
        let t0 = Instant::now();
        let mut r = refusals();
        r.refused(0, 1, "a", false, t0);
        for _ in 0..4 {
            let round = r.take_round(r.due().expect("scheduled")).expect("due");
            for held in round.messages {
                r.refused(held.input, held.tag, held.message, true, t0);
            }
        }
        let round = r.take_round(r.due().expect("scheduled")).expect("due");
        assert_eq!(round.messages.len(), 1);
        assert!(r.confirmed(true).is_some());
        assert_eq!(r.refused(0, 9, "b", false, t0), Refused::EpisodeStarted);
        let due = r.due().expect("scheduled");
        assert!(due <= t0 + Duration::from_millis(100), "backoff reset");
        assert!(!r.take_round(due).expect("due").reopen_channel);
    }

    /// One event of a random session: the broker answers a message (the n-th outstanding one),
    /// time passes to the next round, or a publish fails and the channel is replaced.
    #[derive(Clone, Debug)]
    enum Event {
        Deliver,
        Answer(usize, bool),
        Round,
        ChannelLost,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            2 => Just(Event::Deliver),
            4 => (any::<usize>(), any::<bool>()).prop_map(|(n, ok)| Event::Answer(n, ok)),
            2 => Just(Event::Round),
            1 => Just(Event::ChannelLost),
        ]
    }

    proptest! {
        /// Whatever the broker answers and however often: an input is never given back (there is
        /// no such answer to give: it is only ever acked), it is acked exactly once and only after
        /// a positive confirm of its message, no input is taken while messages are held, and once
        /// the broker takes everything every input is acked and the episode is over.
        #[test]
        fn a_refused_publish_never_returns_its_input(events in proptest::collection::vec(event(), 0..300)) {
            let mut now = Instant::now();
            let mut r: Refusals<u64> = Refusals::new(Duration::from_millis(100), Duration::from_secs(5));
            // Messages on the wire: (tag, resent).
            let mut outstanding: Vec<(u64, bool)> = Vec::new();
            let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
            let mut delivered = 0u64;
            let mut episodes = 0;
            let mut started = 0;
            for event in events {
                match event {
                    Event::Deliver if !r.holding() => {
                        delivered += 1;
                        outstanding.push((delivered, false));
                    }
                    Event::Deliver => {}
                    Event::Answer(n, ok) if !outstanding.is_empty() => {
                        let (tag, resent) = outstanding.remove(n % outstanding.len());
                        if ok {
                            *acked.entry(tag).or_default() += 1;
                            episodes += usize::from(r.confirmed(resent).is_some());
                        } else if r.refused(0, tag, tag, resent, now) == Refused::EpisodeStarted {
                            started += 1;
                        }
                    }
                    Event::Answer(..) => {}
                    Event::Round => {
                        if let Some(due) = r.due() {
                            now = now.max(due);
                        }
                        if let Some(round) = r.take_round(now) {
                            outstanding.extend(round.messages.iter().map(|held| (held.tag, true)));
                        }
                    }
                    Event::ChannelLost => {
                        let resent = outstanding.iter().filter(|(_, resent)| *resent).count();
                        let lost = outstanding.drain(..).map(|(tag, _)| Held { input: 0, tag, message: tag });
                        let before = r.episode().is_some();
                        r.hold(lost.collect::<Vec<_>>(), resent, now);
                        started += usize::from(!before && r.episode().is_some());
                    }
                }
                prop_assert!(acked.values().all(|n| *n == 1), "an input acked twice");
            }
            // The broker comes back: every round is taken.
            while r.holding() || !outstanding.is_empty() {
                if let Some((tag, resent)) = outstanding.pop() {
                    *acked.entry(tag).or_default() += 1;
                    episodes += usize::from(r.confirmed(resent).is_some());
                } else {
                    now = now.max(r.due().expect("held messages have a round"));
                    let round = r.take_round(now).expect("due");
                    outstanding.extend(round.messages.iter().map(|held| (held.tag, true)));
                }
            }
            prop_assert_eq!(acked.len() as u64, delivered, "every input acked");
            prop_assert!(acked.values().all(|n| *n == 1));
            prop_assert_eq!(episodes, started, "every episode ends once");
            prop_assert!(r.episode().is_none());
        }
    }
}
