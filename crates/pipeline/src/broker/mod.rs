//! Everything that talks to RabbitMQ: connecting with backoff ([`connection`]), the queues,
//! dead-letter queues and fanout exchanges ([`topology`]), confirmed publishing ([`publisher`])
//! and the one consume loop all consuming services run ([`consumer`], with what a service
//! implements for it in [`handler`]), which stops taking an input
//! its handler cannot keep up with ([`flow`]).
//!
//! Recovery is ours, not lapin's (`enable_auto_recover` has had bugs around broker restarts): one
//! [`supervisor`] runs every service's sessions, by the plain-data rules of [`retry`]; handlers and
//! sessions fail with a typed [`HandlerError`] ([`error`]) those rules match on. On a connection error a service drops the
//! connection, reconnects with capped exponential backoff and jitter (kept across sessions),
//! declares its topology again and carries on; errors no retry fixes stop it. What may be acked
//! or counted as sent is decided by plain-data windows ([`window`]). Whatever was not acked is
//! redelivered by the broker; whatever was not confirmed is published again, and a message the
//! broker refuses is held and published again with backoff, its input never requeued ([`refusal`]).

pub mod connection;
pub mod consumer;
pub mod error;
pub mod flow;
pub mod handler;
pub mod publisher;
pub mod refusal;
pub mod retry;
pub mod supervisor;
pub mod tls;
pub mod topology;
pub mod window;

pub use connection::Broker;
pub use consumer::run_consumer;
pub use error::{BrokerContext, HandlerError, LocalFault};
pub use handler::{Disposition, MessageHandler, message_id};
pub use publisher::{Outgoing, Publisher};
pub use retry::{Backoff, Failure, LOCAL_FAULT_RETRY, SessionBackoff, Step, Verdict, classify};
pub use supervisor::{SessionEnd, supervise};
pub use topology::{Stream, Topology};
