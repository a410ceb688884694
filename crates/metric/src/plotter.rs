//! The error histogram's keeper: remembers the recent absolute errors and redraws
//! `error_distribution.png` now and then (drawing itself is in [`crate::plot`]), off the consume loop.

use crate::config::Config;
use crate::plot;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// File name of the error histogram in `LOG_DIR`.
pub const ERROR_PLOT: &str = "error_distribution.png";

/// Keeps the recent absolute errors and redraws the histogram now and then, off the consume loop.
pub(crate) struct Plotter {
    path: PathBuf,
    pub(crate) interval: Option<Duration>,
    width: u32,
    height: u32,
    max: usize,
    pub(crate) errors: std::collections::VecDeque<f64>,
    dirty: bool,
    last: Instant,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl Plotter {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            path: config.log_dir.join(ERROR_PLOT),
            interval: (config.plot_interval_secs > 0)
                .then(|| Duration::from_secs(config.plot_interval_secs)),
            width: config.plot_width,
            height: config.plot_height,
            max: config.plot_max_pairs.max(1),
            errors: std::collections::VecDeque::new(),
            dirty: false,
            last: Instant::now(),
            busy: Arc::default(),
        }
    }

    pub(crate) fn observe(&mut self, absolute_error: f64) {
        if self.errors.len() == self.max {
            self.errors.pop_front();
        }
        self.errors.push_back(absolute_error);
        self.dirty = true;
    }

    /// Starts a redraw when it is due, there is new data, and no redraw is running.
    pub(crate) fn maybe_redraw(&mut self) {
        use std::sync::atomic::Ordering;
        let Some(interval) = self.interval else {
            return;
        };
        if !self.dirty || self.last.elapsed() < interval || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        self.dirty = false;
        self.last = Instant::now();
        let errors: Vec<f64> = self.errors.iter().copied().collect();
        let (path, width, height, busy) = (
            self.path.clone(),
            self.width,
            self.height,
            Arc::clone(&self.busy),
        );
        tokio::task::spawn_blocking(move || {
            match plot::render_error_histogram(&errors, &path, width, height) {
                Ok(()) => {
                    tracing::debug!(pairs = errors.len(), path = %path.display(), "error histogram redrawn")
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "cannot draw the error histogram")
                }
            }
            busy.store(false, Ordering::Release);
        });
    }
}
