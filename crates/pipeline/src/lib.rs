//! The shared library of the pipeline: everything the `features`, `model`, `metric` and `trainer`
//! services have in common, so each service's crate holds only its own logic.
//!
//! - [`messages`]: the JSON messages on the three queues, and how bad input is classified.
//! - [`classes`]: the task (regression or classification), class labels and probabilities.
//! - [`schema`]: feature names, and how a message's values are put in a model's order.
//! - [`dataset`]: loading a numeric CSV (features, target) for the producer and the model.
//! - [`config`]: settings shared by the services (environment variables and flags).
//! - [`broker`]: connecting with backoff, topology, confirmed publishing, and the one consume loop.
//! - [`telemetry`], [`metrics`], [`health`], [`http`]: logs, Prometheus metrics, `/healthz`.
//! - [`service`]: the command line every service binary shares (`healthcheck`, settings).
//! - [`partition`]: partitioned streams (`PARTITIONS`): routing by id, queue names, ownership.
//! - [`audit`]: the loss audit: windows the producer announces and the metric service reconciles.
//! - [`shutdown`]: SIGTERM/SIGINT handling.
//! - [`fs`]: replacing a file atomically and durably.

pub mod audit;
pub mod broker;
pub mod classes;
pub mod config;
pub mod dataset;
pub mod fs;
pub mod health;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod partition;
pub mod schema;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use tokio_util::sync::CancellationToken;
