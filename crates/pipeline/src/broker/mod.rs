//! Everything that talks to RabbitMQ: connecting with backoff ([`connection`]), the queues and
//! dead-letter queues ([`topology`]), confirmed publishing ([`publisher`]) and the one consume loop
//! all consuming services run ([`consumer`]).
//!
//! Recovery is ours, not lapin's (`enable_auto_recover` has had bugs around broker restarts): on
//! any connection error a service drops the connection, reconnects with capped exponential
//! backoff and jitter, declares its topology again and carries on. Whatever was not acked is
//! redelivered by the broker; whatever was not confirmed is published again.

pub mod connection;
pub mod consumer;
pub mod publisher;
pub mod topology;

pub use connection::{Backoff, Broker, is_fatal};
pub use consumer::{Disposition, LocalFault, MessageHandler, run_consumer};
pub use publisher::Publisher;
pub use topology::Topology;
