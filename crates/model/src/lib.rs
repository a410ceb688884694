//! The model service: serves a linear regression or, for classification, a logistic regression
//! (fitted, or a JSON artifact) or a user's ONNX graph, consumes `features`, publishes `y_pred`
//! with the same id, and acks each input only after its prediction is confirmed by the broker.

pub mod artifact;
pub mod class_eval;
mod commands;
pub mod config;
pub mod drift;
pub mod drift_monitor;
pub mod error;
mod handler;
pub mod logistic;
mod metrics;
pub mod onnx;
mod protobuf;
pub mod regression;
pub mod served;
pub mod source;
pub mod stamp;
mod startup;

pub use commands::{inspect, rollback, stamp_model, train};
pub use config::{Cli, Command, Config, IDENTITY};
pub use metrics::VersionLabel;
pub use startup::{StartModel, load_model, run};
