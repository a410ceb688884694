//! State shared by the consumer, the retrainer and the HTTP route: the window, the schedule, the
//! retrain request queue and the metrics.

use crate::metrics::Metrics;
use crate::policy::{RetrainSchedule, Trigger};
use crate::retrain::Outcome;
use crate::store::Store;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot};

/// A retrain request; `reply` gets the outcome (from `POST /retrain`).
pub(crate) struct Request {
    pub(crate) trigger: Trigger,
    pub(crate) reply: Option<oneshot::Sender<Result<Outcome, String>>>,
}

/// State shared by the consumer, the retrainer and the HTTP route.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) schedule: Arc<Mutex<RetrainSchedule>>,
    pub(crate) requests: mpsc::Sender<Request>,
    pub(crate) metrics: Metrics,
}

/// Locks `mutex`; a panic elsewhere while it was held does not make the state unusable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
