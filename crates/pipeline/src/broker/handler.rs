//! What a consuming service implements ([`MessageHandler`]) and what it answers for each delivery
//! ([`Disposition`]), with the rules the consume loop ([`super::consumer`]) applies to a
//! handler's errors, as plain data: bad input is dead-lettered, a failed flush on the service's
//! own disk pauses, anything else ends the session.

use super::error::HandlerError;
use super::publisher::Outgoing;
use crate::messages::MessageError;
use lapin::message::Delivery;

/// What to do with a delivery once the handler has seen it.
pub enum Disposition {
    /// The work is done in the handler's buffers: ack after [`MessageHandler::flush`].
    Ack,
    /// The work is this message: the loop publishes it and acks the delivery when the broker
    /// confirms it (publishing it again, however often, if the broker refuses it).
    Publish(Outgoing),
    /// The message cannot be processed: send it to its dead-letter queue with this reason.
    DeadLetter(MessageError),
}

/// The AMQP `message_id` of a delivery, when it has one.
pub fn message_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
}

/// The service-specific part of a consumer.
pub trait MessageHandler: Send {
    /// Processes one delivery from input queue number `input`. [`HandlerError::BadInput`] sends
    /// the message to its dead-letter queue, like [`Disposition::DeadLetter`]. Any other `Err`
    /// means the service cannot work right now: the connection is dropped, so the broker
    /// redelivers everything unacked, and the loop reconnects.
    fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Disposition, HandlerError>> + Send;

    /// Makes everything handled so far durable (written and flushed). Called before any ack.
    /// [`HandlerError::LocalFault`] pauses consuming and calls it again with backoff; any other
    /// `Err` drops the connection.
    fn flush(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Periodic housekeeping, about twice a second. An `Err` drops the connection.
    fn tick(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Whether to take deliveries from input `input` now. While it says no, the loop does not poll
    /// that input: the broker keeps its messages (beyond the prefetch already sent) until the
    /// handler has room again ([`crate::broker::flow`]). Asked before every delivery.
    fn accepts(&self, input: usize) -> bool {
        let _ = input;
        true
    }
}

/// What the consume loop does when [`MessageHandler::flush`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushVerdict {
    /// The service's own disk failed ([`HandlerError::LocalFault`]): keep the connection, stop
    /// taking deliveries, retry the flush with backoff.
    Pause,
    /// Anything else: drop the connection (the broker redelivers what is unacked) and reconnect.
    Reconnect,
}

/// The rule for a failed flush: a local fault pauses, never reconnects.
pub fn on_flush_error(err: &HandlerError) -> FlushVerdict {
    match err {
        HandlerError::LocalFault(_) => FlushVerdict::Pause,
        HandlerError::Broker { .. } | HandlerError::BadInput(_) | HandlerError::Other(_) => {
            FlushVerdict::Reconnect
        }
    }
}

/// The rule for a failed `handle`: bad input is dead-lettered (`Ok`), anything else ends the
/// session (`Err`), a local fault included (only a flush can be retried in place).
pub fn on_handle_error(err: HandlerError) -> Result<Disposition, HandlerError> {
    match err {
        HandlerError::BadInput(error) => Ok(Disposition::DeadLetter(error)),
        err @ (HandlerError::LocalFault(_)
        | HandlerError::Broker { .. }
        | HandlerError::Other(_)) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::error::LocalFault;
    use proptest::prelude::*;

    fn fault() -> HandlerError {
        LocalFault {
            what: "cannot append to logs/labels_log.txt".into(),
            source: std::io::Error::other("No space left on device"),
        }
        .into()
    }

    #[test]
    fn a_local_fault_pauses_and_never_reconnects() {
        assert_eq!(on_flush_error(&fault()), FlushVerdict::Pause);
        let broker = HandlerError::from(lapin::Error::from(std::io::Error::other("reset")));
        assert_eq!(on_flush_error(&broker), FlushVerdict::Reconnect);
        let plain_io = HandlerError::from(anyhow::Error::from(std::io::Error::other("disk")));
        assert_eq!(on_flush_error(&plain_io), FlushVerdict::Reconnect);
    }

    #[test]
    fn bad_input_from_handle_is_dead_lettered() {
        let bad = HandlerError::from(MessageError::TooLarge { size: 2, limit: 1 });
        assert!(matches!(
            on_handle_error(bad),
            Ok(Disposition::DeadLetter(MessageError::TooLarge { .. }))
        ));
        assert!(matches!(
            on_handle_error(fault()),
            Err(HandlerError::LocalFault(_))
        ));
    }

    fn error(kind: u8, text: String) -> HandlerError {
        match kind {
            0 => LocalFault {
                what: text,
                source: std::io::Error::other("disk"),
            }
            .into(),
            1 => HandlerError::broker(text, lapin::Error::from(std::io::Error::other("reset"))),
            2 => MessageError::TooLarge { size: 2, limit: 1 }.into(),
            _ => anyhow::anyhow!(text).into(),
        }
    }

    proptest! {
        /// Only a local fault pauses a flush; only bad input turns a failed `handle` into a
        /// dead letter; everything else ends the session.
        #[test]
        fn errors_are_sorted_by_kind_alone(kind in 0u8..4, text in "[a-z ]{0,20}") {
            let paused = on_flush_error(&error(kind, text.clone())) == FlushVerdict::Pause;
            prop_assert_eq!(paused, kind == 0);
            let dead_lettered = on_handle_error(error(kind, text)).is_ok();
            prop_assert_eq!(dead_lettered, kind == 2);
        }
    }
}
