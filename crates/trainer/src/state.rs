//! State shared by the consumer, the retrainer and the HTTP route: the retrainer's copy of the
//! window, the schedule, the retrain request queue and the metrics.

use crate::metrics::Metrics;
use crate::policy::{RetrainSchedule, Trigger};
use crate::retrain::Outcome;
use crate::store::{Added, Sample, Store};
use std::collections::VecDeque;
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
    /// The window as the retrainer reads it. The store itself is the handler's alone, so its
    /// disk I/O (the fsync before each ack, compaction) holds no lock a retrain waits for.
    pub(crate) window: Arc<Mutex<WindowCopy>>,
    pub(crate) schedule: Arc<Mutex<RetrainSchedule>>,
    pub(crate) requests: mpsc::Sender<Request>,
    pub(crate) metrics: Metrics,
}

/// The labelled samples of the window, oldest first: a copy the handler keeps in step with the
/// [`Store`] (same samples, same capacity), locked only to push one sample or to copy them all.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct WindowCopy {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl WindowCopy {
    /// A copy of what `store` holds now.
    pub(crate) fn of(store: &Store, capacity: usize) -> Self {
        Self {
            samples: store.samples().cloned().collect(),
            capacity,
        }
    }

    /// Follows one [`Store::add`]: a joined sample is the store's newest; the oldest beyond the
    /// capacity go, as in the store.
    pub(crate) fn follow(&mut self, added: Added, store: &Store) {
        if added != Added::Joined {
            return;
        }
        if let Some(sample) = store.samples().last() {
            self.samples.push_back(sample.clone());
        }
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
    }

    /// The samples, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }
}

/// Locks `mutex`; a panic elsewhere while it was held does not make the state unusable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever arrives (halves in any order, duplicates, halves that never pair), the copy
        /// holds exactly the store's window.
        #[test]
        fn the_copy_follows_the_store(
            adds in prop::collection::vec((0u8..40, any::<bool>()), 0..200),
            capacity in 1usize..20,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path(), capacity, 15).unwrap();
            let mut copy = WindowCopy::of(&store, capacity);
            for (id, is_label) in adds {
                let id = format!("s{id}");
                let added = if is_label {
                    store.add(&id, None, Some(1.0.into()))
                } else {
                    store.add(&id, Some(vec![1.0, 2.0]), None)
                };
                copy.follow(added, &store);
                let expected: Vec<Sample> = store.samples().cloned().collect();
                prop_assert_eq!(copy.snapshot(), expected);
            }
            // And after a restart, from what the journal replays.
            store.flush().unwrap();
            drop(store);
            let store = Store::open(dir.path(), capacity, 15).unwrap();
            let expected: Vec<Sample> = store.samples().cloned().collect();
            prop_assert_eq!(WindowCopy::of(&store, capacity).snapshot(), expected);
        }
    }
}
