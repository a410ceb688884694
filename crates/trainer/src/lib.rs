//! The trainer service: consumes its own copies of `features` and `y_true` (the queues
//! `<queue>.train`, bound to the producer's fanout exchanges), joins them by id into the training
//! window on disk ([`store`]), and retrains when triggered ([`policy`]): every `RETRAIN_EVERY` new
//! labels, on `POST /retrain`, and when the metric service's quality alarm rises for the served
//! version (`METRIC_URL`). A candidate is promoted only when it beats the served model on the
//! newest part of the window ([`retrain`]); the candidate is the built-in linear fit or what the
//! user's `TRAIN_COMMAND` trains ([`train_command`]); the model services pick the new
//! `MODEL_PATH` up. A
//! `MODEL_PATH` that is not a valid artifact does not stop it ([`model_file`]). `GET /model` serves
//! the promoted artifact to replicas on other machines (`MODEL_URL`).

mod alarm;
pub mod config;
mod handler;
mod http;
mod metrics;
pub mod model_file;
mod opening;
pub mod policy;
pub mod retrain;
mod retrainer;
mod served;
mod startup;
mod state;
pub mod store;
pub mod train_command;

pub use config::{Cli, Config, IDENTITY, metric_authority};
pub use startup::run;
