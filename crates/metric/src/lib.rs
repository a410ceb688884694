//! The metric service: consumes `y_true` and `y_pred`, appends every message to
//! `labels_log.txt`, joins the two by id into `metric_log.csv` with the absolute error, and keeps
//! the model's running quality as metrics.
//!
//! Its unit is the partition ([`startup`]): one with `PARTITIONS=1`, owning `LOG_DIR` (a lock file
//! and exclusive consumers make a second instance fail loudly); with more, each instance owns its
//! share, each in its own folder, a standby waiting for the locks. On start-up it rebuilds its state from its checkpoint and the end of
//! its own files (see [`checkpoint`] and [`recovery`]): ids already in the CSV are never written
//! again, values logged but not yet joined wait for their partner, and the time it takes does not
//! grow with the history.
//!
//! The rooms: [`config`] (settings), [`startup`] (`run`), [`handler`] (the message handler),
//! [`metrics`] (join metrics), [`recovery`], [`api`] (`GET /api/quality`); its own logic in [`join`], [`files`], [`quality`]
//! (a regressor's figures), [`classification`] (a classifier's),
//! [`checkpoint`], [`dashboard`], [`plot`] and [`plotter`].

pub mod alarm;
pub mod api;
mod audit;
pub mod checkpoint;
pub mod classification;
pub mod config;
pub mod dashboard;
pub mod files;
pub mod handler;
pub mod join;
pub mod metrics;
pub mod plot;
pub mod plotter;
pub mod quality;
pub mod recovery;
pub mod startup;

pub use config::{Cli, Config, IDENTITY};
pub use handler::Recorder;
pub use plotter::ERROR_PLOT;
pub use startup::run;
