//! The model service: fits (or loads) a linear regression, consumes `features`, publishes `y_pred`
//! with the same id, and acks each input only after its prediction is confirmed by the broker.

pub mod artifact;
mod commands;
pub mod config;
pub mod drift;
pub mod drift_monitor;
pub mod error;
mod handler;
mod metrics;
pub mod regression;
pub mod source;
mod startup;

pub use commands::{rollback, train};
pub use config::{Cli, Command, Config, IDENTITY};
pub use metrics::VersionLabel;
pub use startup::{StartModel, load_model, run};
