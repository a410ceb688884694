//! The service's own view of whether it works, shown by `GET /healthz`.

use std::sync::{Arc, Mutex};

/// Shared health state: healthy, or unhealthy with a short reason.
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<Result<(), String>>>,
}

impl Health {
    /// Starts unhealthy: nothing is connected yet.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(Err("starting".to_owned()))),
        }
    }

    /// Marks the service as working.
    pub fn set_healthy(&self) {
        self.set(Ok(()));
    }

    /// Marks the service as not working, with a short reason for the operator.
    pub fn set_unhealthy(&self, reason: impl Into<String>) {
        self.set(Err(reason.into()));
    }

    /// The current state.
    pub fn get(&self) -> Result<(), String> {
        match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, value: Result<(), String>) {
        match self.state.lock() {
            Ok(mut state) => *state = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}
