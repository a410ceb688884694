//! What can go wrong in a service's message handler or broker session, as a type the consume loop
//! and the supervisor match on ([`HandlerError`]) rather than an `anyhow` chain they search.
//!
//! Services still write `?`: a [`LocalFault`], a `lapin::Error`, a [`MessageError`] and an
//! `anyhow::Error` each convert into their variant.

use super::retry::Failure;
use crate::messages::MessageError;
use std::error::Error as _;

/// A failure of the service's own resources (a full or unwritable disk), not of the broker.
///
/// A [`HandlerError::LocalFault`] from `MessageHandler::flush` does not drop the connection: the
/// consume loop stops taking deliveries, keeps what it holds unacked, reports the fault in
/// `/healthz` and a gauge, and calls `flush` again with backoff until it succeeds. So `flush` must
/// be safe to call again after a failure: it may not leave part of its output behind.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct LocalFault {
    /// What could not be done, for the operator (e.g. `cannot append to logs/labels_log.txt`).
    pub what: String,
    /// The I/O error behind it.
    #[source]
    pub source: std::io::Error,
}

/// Why a message handler (or a session) could not go on.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The service's own files cannot be written: a failed flush pauses consuming.
    #[error(transparent)]
    LocalFault(#[from] LocalFault),
    /// The broker failed (a publish, an ack, a declare): the session ends, and the supervisor
    /// decides from the broker's answer whether to reconnect or stop.
    #[error("{what}")]
    Broker {
        /// What was being done, for the operator (e.g. `cannot publish y_pred`).
        what: String,
        /// lapin's error: the broker's reply code, or the network's.
        #[source]
        source: lapin::Error,
    },
    /// The message itself cannot be processed: from `handle`, it goes to its dead-letter queue.
    #[error(transparent)]
    BadInput(#[from] MessageError),
    /// Anything else: the session ends and the supervisor reconnects.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<lapin::Error> for HandlerError {
    fn from(source: lapin::Error) -> Self {
        Self::Broker {
            what: "broker error".to_owned(),
            source,
        }
    }
}

impl HandlerError {
    /// A broker error with what was being done.
    pub fn broker(what: impl Into<String>, source: lapin::Error) -> Self {
        Self::Broker {
            what: what.into(),
            source,
        }
    }

    /// What the error means to the supervisor's rules ([`super::retry::classify`]).
    pub fn failure(&self) -> Failure {
        match self {
            Self::Broker { source, .. } => Failure::of_lapin(source),
            _ => Failure::Other(self.report()),
        }
    }

    /// The error and its causes on one line, outermost first (like anyhow's `{:#}`).
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = self.source();
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }

    /// As an `anyhow::Error` for the edges (an `Other` is unwrapped, not wrapped again).
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            Self::Other(err) => err,
            err => anyhow::Error::new(err),
        }
    }
}

/// `.broker_context("cannot publish y_pred")?` on a lapin result, like anyhow's `.context`.
pub trait BrokerContext<T> {
    /// Wraps the lapin error as [`HandlerError::Broker`] saying what was being done.
    fn broker_context(self, what: &str) -> Result<T, HandlerError>;
}

impl<T> BrokerContext<T> for lapin::Result<T> {
    fn broker_context(self, what: &str) -> Result<T, HandlerError> {
        self.map_err(|source| HandlerError::broker(what, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset() -> lapin::Error {
        lapin::Error::from(std::io::Error::other("reset"))
    }

    #[test]
    fn question_mark_sorts_errors_into_their_variant() {
        fn fault() -> Result<(), HandlerError> {
            Err(LocalFault {
                what: "cannot append to logs/labels_log.txt".into(),
                source: std::io::Error::other("No space left on device"),
            })?
        }
        fn broker() -> Result<(), HandlerError> {
            Err(reset())?
        }
        fn other() -> Result<(), HandlerError> {
            Err(anyhow::anyhow!("boom"))?
        }
        assert!(matches!(fault(), Err(HandlerError::LocalFault(_))));
        assert!(matches!(broker(), Err(HandlerError::Broker { .. })));
        assert!(matches!(other(), Err(HandlerError::Other(_))));
        fn bad() -> Result<(), HandlerError> {
            Err(MessageError::TooLarge { size: 2, limit: 1 })?
        }
        assert!(matches!(bad(), Err(HandlerError::BadInput(_))));
    }

    #[test]
    fn the_report_names_every_cause() {
        let err = Err::<(), _>(reset())
            .broker_context("cannot publish y_pred")
            .unwrap_err();
        assert_eq!(
            err.report(),
            "cannot publish y_pred: IO error: reset: reset"
        );
        assert!(matches!(err.failure(), Failure::Other(text) if text == "IO error: reset"));
        let err = HandlerError::from(anyhow::anyhow!("inner").context("outer"));
        assert_eq!(err.report(), "outer: inner");
        assert_eq!(format!("{:#}", err.into_anyhow()), "outer: inner");
        let fault = HandlerError::from(LocalFault {
            what: "cannot write x".into(),
            source: std::io::Error::other("disk full"),
        });
        assert_eq!(fault.report(), "cannot write x: disk full");
        assert_eq!(
            format!("{:#}", fault.into_anyhow()),
            "cannot write x: disk full"
        );
    }
}
