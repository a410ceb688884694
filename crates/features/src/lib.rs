//! The producer: picks rows of a CSV (at random or in order) and publishes, for each, the feature
//! vector to `features` and the true target to `y_true`, both with the same fresh id. It publishes
//! through each stream's fanout exchange (`features.fanout`, `y_true.fanout`), declared and bound
//! to its queue at the start of every session, so the trainer's queues get a copy.
//!
//! Every sample stays in a confirm window until the broker has confirmed both of its messages; a
//! sample not confirmed when the connection drops is published again after the reconnect, so a
//! broker restart loses nothing (the metric service ignores the duplicates this can cause). The
//! shared supervisor runs the sessions: a queue declared with other arguments stops the producer
//! with an error instead of a reconnect loop. With `COUNT`, the producer exits non-zero when the
//! broker did not confirm every sample before the final drain timed out.

mod audit;
pub mod config;
pub mod drift;
mod pacer;
mod producer;
mod sampler;
mod startup;

pub use config::{Cli, Config, IDENTITY, Order};
pub use pacer::{MAX_CATCH_UP, Pacer};
pub use sampler::Sampler;
pub use startup::run;
