//! Pacing of new samples at `RATE`.

use std::time::Duration;
use tokio::time::Instant;

/// Paces new samples at `RATE`. The pace is anchored to when sending (re)starts, not to the first
/// start: after an outage the missed samples are not sent in a burst; the stream simply goes on at
/// `RATE`. A short stall (under [`MAX_CATCH_UP`]) is still caught up.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    anchor: Option<Instant>,
    sent: u32,
}

/// Longest delay the pacer makes up for by sending faster than `RATE`.
pub const MAX_CATCH_UP: Duration = Duration::from_secs(1);

impl Pacer {
    /// A pacer for `rate` samples per second; 0 means no pacing.
    pub fn new(rate: f64) -> Self {
        let interval =
            (rate > 0.0 && rate.is_finite()).then(|| Duration::from_secs_f64(1.0 / rate));
        Self {
            interval,
            anchor: None,
            sent: 0,
        }
    }

    /// When the next sample is due (`None`: at once). A due time more than [`MAX_CATCH_UP`] in
    /// the past restarts the pace at `now`.
    pub fn next_due(&mut self, now: Instant) -> Option<Instant> {
        let interval = self.interval?;
        let anchor = *self.anchor.get_or_insert(now);
        let due = anchor + interval.saturating_mul(self.sent);
        if now.saturating_duration_since(due) > MAX_CATCH_UP {
            self.anchor = Some(now);
            self.sent = 0;
            return Some(now);
        }
        Some(due)
    }

    /// One sample was sent.
    pub fn sent(&mut self) {
        self.sent = self.sent.saturating_add(1);
    }

    /// Sending resumes after a pause (a new broker session): the pace starts again from now.
    pub fn resume(&mut self) {
        self.anchor = None;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples the pacer lets out in `span` starting at `from`, sending each as soon as it is due.
    fn sent_within(pacer: &mut Pacer, from: Instant, span: Duration) -> u32 {
        let mut now = from;
        let mut sent = 0;
        loop {
            let due = pacer.next_due(now).unwrap_or(now);
            now = now.max(due);
            if now >= from + span {
                return sent;
            }
            pacer.sent();
            sent += 1;
        }
    }

    #[test]
    fn the_pacer_keeps_the_rate() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        let sent = sent_within(&mut pacer, start, Duration::from_secs(2));
        assert!((199..=201).contains(&sent), "{sent}");
    }

    #[test]
    fn after_an_outage_the_missed_samples_do_not_go_out_in_a_burst() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        sent_within(&mut pacer, start, Duration::from_secs(1));
        // 30 s without a broker: 3,000 samples "missed".
        let back = start + Duration::from_secs(31);
        let sent = sent_within(&mut pacer, back, Duration::from_secs(1));
        assert!(
            sent <= 101,
            "{sent} samples in the first second after the outage"
        );
        // Also when the session was not restarted (a stall), and after a resume.
        pacer.resume();
        let later = back + Duration::from_secs(60);
        let sent = sent_within(&mut pacer, later, Duration::from_secs(1));
        assert!(sent <= 101, "{sent}");
    }

    #[test]
    fn a_short_stall_is_caught_up() {
        let mut pacer = Pacer::new(100.0);
        let start = Instant::now();
        sent_within(&mut pacer, start, Duration::from_secs(1));
        // 0.5 s late: the 50 samples due meanwhile go out at once, then the pace goes on.
        let late = start + Duration::from_millis(1500);
        let sent = sent_within(&mut pacer, late, Duration::from_millis(500));
        assert!((99..=101).contains(&sent), "{sent}");
    }

    #[test]
    fn rate_zero_does_not_pace() {
        assert_eq!(Pacer::new(0.0).next_due(Instant::now()), None);
    }
}
