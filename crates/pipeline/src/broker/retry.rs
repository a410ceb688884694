//! The rules of retrying, as plain data: the capped exponential [`Backoff`] with jitter, the
//! pause between sessions ([`SessionBackoff`]), and what a failed step of a session means
//! ([`classify`]: retry with a reason for `/healthz`, or stop with a message naming the setting).
//!
//! A leaf: nothing here knows the connection, the consume loop or the supervisor, which all use it.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use std::time::Duration;

/// A session that stayed up this long was healthy: the backoff starts over after it.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// First and longest pause between two tries while the service's own disk fails (a
/// `LocalFault`: a flush of the consume loop, the trainer opening its window).
pub const LOCAL_FAULT_RETRY: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(5));

/// Capped exponential backoff with full jitter: the n-th pause is uniform in
/// `[base·2ⁿ/2, base·2ⁿ]`, never above the cap.
///
/// Written here rather than taken from `backon` (already in the lock file through lapin): the
/// supervisor resets it by a rule of its own (after a healthy session) and keeps it across
/// connections, where `backon`'s iterators are built per retried call.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never waiting longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + exp.mul_f64(fastrand::f64()) / 2
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The pause before each connection attempt, kept across sessions.
#[derive(Debug, Clone)]
pub struct SessionBackoff {
    backoff: Backoff,
    healthy_after: Duration,
}

impl SessionBackoff {
    /// Pauses from `base` up to `cap`; a session that lasted `healthy_after` resets them.
    pub fn new(base: Duration, cap: Duration, healthy_after: Duration) -> Self {
        Self {
            backoff: Backoff::new(base, cap),
            healthy_after,
        }
    }

    /// A connection attempt failed: the pause before the next.
    pub fn attempt_failed(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// A session that lasted `lasted` ended with an error: the pause before reconnecting.
    pub fn session_failed(&mut self, lasted: Duration) -> Duration {
        if lasted >= self.healthy_after {
            self.backoff.reset();
        }
        self.backoff.next_delay()
    }
}

/// Where in a session an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Opening the connection (TCP, TLS, login).
    Connect,
    /// Opening channels and declaring queues.
    Declare,
    /// Starting the consumers (`basic.consume`).
    Consume,
    /// Running: publishing, consuming, acking.
    Run,
}

/// An error as the supervisor needs to know it, without lapin's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `AMQP_URL` cannot be parsed.
    InvalidUrl(String),
    /// The broker answered 403 ACCESS_REFUSED (bad login, or an exclusive consumer in the way).
    AccessRefused(String),
    /// The broker answered 406 PRECONDITION_FAILED (a queue declared with other arguments, ...).
    PreconditionFailed(String),
    /// The broker answered 405 RESOURCE_LOCKED (an exclusive queue of another connection).
    ResourceLocked(String),
    /// The TLS handshake failed for a reason no retry fixes (a certificate problem, a port that
    /// does not speak TLS; see `broker::tls::TlsFailure`); the text is the operator's message.
    Tls(String),
    /// Anything else: the network, a closed connection, another broker error.
    Other(String),
}

impl Failure {
    /// What a lapin error means to the supervisor.
    pub fn of_lapin(err: &lapin::Error) -> Self {
        match err.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => {
                let text = amqp.get_message().to_string();
                match amqp.kind() {
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Self::AccessRefused(text),
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                        Self::PreconditionFailed(text)
                    }
                    AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => {
                        Self::ResourceLocked(text)
                    }
                    _ => Self::Other(err.to_string()),
                }
            }
            _ => Self::Other(err.to_string()),
        }
    }
}

/// `AMQP_URL` could not be parsed (the text says why, without the URL's password).
#[derive(Debug, thiserror::Error)]
#[error("AMQP_URL is not a valid AMQP URL: {0}")]
pub struct InvalidUrl(pub String);

/// What to do about a failed session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Wait and connect again; `reason` goes to `/healthz` and the log.
    Retry {
        /// Why the service is not working, for the operator.
        reason: String,
    },
    /// No retry can fix it: stop the service with this message (exit non-zero).
    Fatal {
        /// What is wrong and which setting fixes it.
        message: String,
    },
}

/// The queue named in a RabbitMQ error text such as `... for queue 'features' in vhost '/' ...`.
pub fn queue_in_text(text: &str) -> Option<&str> {
    let start = text.find("queue '")? + "queue '".len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

/// The operator's message when a stream's marker queue (`<queue>.partitions`, see
/// [`crate::partition::marker_queue`]) exists with another `x-max-length`: the streams were
/// declared with another `PARTITIONS`.
fn partitions_mismatch(text: &str) -> String {
    let marker = queue_in_text(text).unwrap_or("?");
    let stream = marker.strip_suffix(".partitions").unwrap_or(marker);
    // RabbitMQ 3.10: "inequivalent arg 'x-max-length' for queue 'features.partitions' in vhost
    // '/': received '3' but current is '4'"
    let value_after = |label: &str| {
        let start = text.find(label)? + label.len();
        let len = text[start..].find('\'')?;
        Some(&text[start..start + len])
    };
    match (value_after("received '"), value_after("current is '")) {
        (Some(ours), Some(theirs)) => format!(
            "PARTITIONS={ours}, but the queues of stream `{stream}` were declared with \
             PARTITIONS={theirs}: start every service with the same PARTITIONS (changing it \
             means draining and deleting the old partition queues and `{marker}`; broker said: {text})"
        ),
        _ => format!(
            "PARTITIONS differs from the count the queues of stream `{stream}` were declared \
             with: start every service with the same PARTITIONS (broker said: {text})"
        ),
    }
}

/// The rule for what is fatal and what is retried.
///
/// Fatal: a malformed URL; a TLS handshake refused for a certificate problem or a port that does
/// not speak TLS; a queue declare refused because the queue exists with other arguments (among
/// them a stream's partition marker: another `PARTITIONS`).
/// Everything else is retried: the broker not up yet, a login refused (an operator may fix the
/// user while the service waits), an exclusive consumer refused because the queue is in exclusive
/// use (most likely our own previous connection, not yet reaped after a network cut), a lost
/// connection.
pub fn classify(step: Step, failure: &Failure) -> Verdict {
    let retry = |reason: String| Verdict::Retry { reason };
    match (step, failure) {
        (_, Failure::InvalidUrl(text)) => Verdict::Fatal {
            message: format!("AMQP_URL is not a valid AMQP URL: {text}"),
        },
        (_, Failure::Tls(message)) => Verdict::Fatal {
            message: message.clone(),
        },
        (Step::Declare, Failure::PreconditionFailed(text))
            if queue_in_text(text).is_some_and(|q| q.ends_with(".partitions")) =>
        {
            Verdict::Fatal {
                message: partitions_mismatch(text),
            }
        }
        (Step::Declare, Failure::PreconditionFailed(text)) => Verdict::Fatal {
            message: format!(
                "queue `{}` already exists with other arguments (declared by the course code?): \
                 set TOPOLOGY=course, or delete the queue (broker said: {text})",
                queue_in_text(text).unwrap_or("?")
            ),
        },
        (Step::Connect, Failure::AccessRefused(text)) => retry(format!(
            "the broker refused the login (check the user and password of AMQP_URL): {text}"
        )),
        (Step::Consume, Failure::AccessRefused(text) | Failure::ResourceLocked(text)) => {
            retry(format!(
                "queue `{}` is in exclusive use by another consumer (our own previous connection \
                 until the broker drops it, or a second instance): {text}",
                queue_in_text(text).unwrap_or("?")
            ))
        }
        (Step::Connect, failure) => retry(format!("broker not reachable: {}", failure.text())),
        (_, failure) => retry(format!("broker connection lost: {}", failure.text())),
    }
}

impl Failure {
    fn text(&self) -> &str {
        match self {
            Self::InvalidUrl(text)
            | Self::AccessRefused(text)
            | Self::PreconditionFailed(text)
            | Self::ResourceLocked(text)
            | Self::Tls(text)
            | Self::Other(text) => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn sessions_that_fail_right_after_connecting_still_back_off() {
        let cap = Duration::from_secs(5);
        let mut backoff = SessionBackoff::new(Duration::from_millis(100), cap, HEALTHY_SESSION);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = backoff.session_failed(Duration::from_millis(20));
        }
        assert!(last >= cap / 2, "{last:?}");
        // Failed connection attempts in between do not reset it either.
        assert!(backoff.attempt_failed() >= cap / 2);
        // A session that stayed up starts the pauses over.
        assert!(backoff.session_failed(HEALTHY_SESSION) <= Duration::from_millis(100));
    }

    #[test]
    fn a_queue_declared_with_other_arguments_is_fatal_and_names_the_setting() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'features' in vhost '/': received 'true' but current is 'false'";
        let verdict = classify(Step::Declare, &Failure::PreconditionFailed(text.into()));
        let Verdict::Fatal { message } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(message.contains("queue `features` already exists with other arguments"));
        assert!(message.contains("TOPOLOGY=course"));
    }

    #[test]
    fn another_partition_count_is_fatal_and_names_partitions() {
        // The broker's words (RabbitMQ 3.10.8).
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'features.partitions' in vhost '/': received '3' but current is '4'";
        let verdict = classify(Step::Declare, &Failure::PreconditionFailed(text.into()));
        let Verdict::Fatal { message } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(
            message.starts_with(
                "PARTITIONS=3, but the queues of stream `features` were declared with PARTITIONS=4"
            ),
            "{message}"
        );
        // Another wording still names the setting.
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'y_true.partitions' in vhost '/'";
        let Verdict::Fatal { message } =
            classify(Step::Declare, &Failure::PreconditionFailed(text.into()))
        else {
            panic!()
        };
        assert!(
            message.contains("PARTITIONS differs") && message.contains("`y_true`"),
            "{message}"
        );
    }

    #[test]
    fn a_malformed_url_is_fatal() {
        assert!(matches!(
            classify(Step::Connect, &Failure::InvalidUrl("bad port".into())),
            Verdict::Fatal { .. }
        ));
    }

    #[test]
    fn a_refused_tls_handshake_is_fatal_with_its_message() {
        let message = "TLS: 127.0.0.1:5672 does not speak TLS".to_owned();
        assert_eq!(
            classify(Step::Connect, &Failure::Tls(message.clone())),
            Verdict::Fatal { message }
        );
    }

    #[test]
    fn an_exclusive_consumer_in_the_way_is_retried() {
        let text = "ACCESS_REFUSED - queue 'y_true' in vhost '/' in exclusive use";
        let Verdict::Retry { reason } =
            classify(Step::Consume, &Failure::AccessRefused(text.into()))
        else {
            panic!("fatal")
        };
        assert!(
            reason.contains("queue `y_true` is in exclusive use"),
            "{reason}"
        );
    }

    #[test]
    fn a_refused_login_is_retried() {
        let text = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN";
        let Verdict::Retry { reason } =
            classify(Step::Connect, &Failure::AccessRefused(text.into()))
        else {
            panic!("fatal")
        };
        assert!(reason.contains("user and password"), "{reason}");
    }

    fn failure() -> impl Strategy<Value = Failure> {
        let text = "[a-z' ]{0,30}";
        prop_oneof![
            text.prop_map(Failure::InvalidUrl),
            text.prop_map(Failure::AccessRefused),
            text.prop_map(Failure::PreconditionFailed),
            text.prop_map(Failure::ResourceLocked),
            text.prop_map(Failure::Tls),
            text.prop_map(Failure::Other),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Connect),
            Just(Step::Declare),
            Just(Step::Consume),
            Just(Step::Run)
        ]
    }

    proptest! {
        /// Only a malformed URL, a refused TLS handshake and a refused declare stop a service;
        /// everything else (the network, logins, exclusive use, lost connections) is retried.
        #[test]
        fn only_the_three_fatal_errors_are_fatal(step in step(), failure in failure()) {
            let fatal = matches!(classify(step, &failure), Verdict::Fatal { .. });
            let expected = matches!(failure, Failure::InvalidUrl(_) | Failure::Tls(_))
                || (step == Step::Declare && matches!(failure, Failure::PreconditionFailed(_)));
            prop_assert_eq!(fatal, expected);
        }

        /// However sessions end, a pause never exceeds the cap, and sessions shorter than the
        /// healthy time never bring it back to the first step.
        #[test]
        fn pauses_stay_under_the_cap_and_only_reset_after_a_healthy_session(
            lasted_ms in proptest::collection::vec(0u64..20_000, 1..40),
        ) {
            let base = Duration::from_millis(100);
            let cap = Duration::from_secs(5);
            let mut backoff = SessionBackoff::new(base, cap, HEALTHY_SESSION);
            // Pauses since the last reset, before this one.
            let mut attempt = 0u32;
            for ms in lasted_ms {
                let lasted = Duration::from_millis(ms);
                let delay = backoff.session_failed(lasted);
                if lasted >= HEALTHY_SESSION {
                    attempt = 0;
                }
                prop_assert!(delay <= cap);
                let floor = base.saturating_mul(1 << attempt.min(20)).min(cap) / 2;
                prop_assert!(delay >= floor, "{:?} < {:?}", delay, floor);
                attempt += 1;
            }
        }
    }
}
