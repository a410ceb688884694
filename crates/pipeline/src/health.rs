//! The service's own view of whether it works, shown by `GET /healthz`.
//!
//! Three kinds of state, kept apart so that one part of a service cannot clear another's report:
//! - the broker session (healthy once consuming or producing, unhealthy with a reason otherwise);
//! - named problems (a full disk, ...): any one makes the service unhealthy until it is cleared;
//! - named notes (publishing blocked by the broker, guarantees that are off, ...): shown in the
//!   body of `/healthz` without changing its status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct State {
    session: Result<(), String>,
    problems: BTreeMap<&'static str, String>,
    notes: BTreeMap<&'static str, String>,
}

/// Shared health state of one service.
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl Health {
    /// Starts unhealthy: nothing is connected yet.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                session: Err("starting".to_owned()),
                problems: BTreeMap::new(),
                notes: BTreeMap::new(),
            })),
        }
    }

    /// Marks the broker session as working.
    pub fn set_healthy(&self) {
        self.with(|state| state.session = Ok(()));
    }

    /// Marks the broker session as not working, with a short reason for the operator.
    pub fn set_unhealthy(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.with(|state| state.session = Err(reason));
    }

    /// Reports (`Some`) or clears (`None`) the problem named `key`; while any problem is reported
    /// the service is unhealthy.
    pub fn set_problem(&self, key: &'static str, reason: Option<String>) {
        self.with(|state| match reason {
            Some(reason) => {
                state.problems.insert(key, reason);
            }
            None => {
                state.problems.remove(key);
            }
        });
    }

    /// Shows (`Some`) or removes (`None`) the note named `key` in the body of `/healthz`.
    pub fn set_note(&self, key: &'static str, note: Option<String>) {
        self.with(|state| match note {
            Some(note) => {
                state.notes.insert(key, note);
            }
            None => {
                state.notes.remove(key);
            }
        });
    }

    /// `Ok` when the session works and no problem is reported; otherwise every reason, one per
    /// line, problems first.
    pub fn get(&self) -> Result<(), String> {
        self.with(|state| {
            let mut reasons: Vec<String> = state.problems.values().cloned().collect();
            if let Err(reason) = &state.session {
                reasons.push(reason.clone());
            }
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons.join("\n"))
            }
        })
    }

    /// Takes the state of several parts of one service (a metric instance's partitions), each
    /// with its own `Health`: the session works when every part works (else each part's reasons,
    /// prefixed with its name), and every part's notes show under the note `key`.
    pub fn gather(&self, key: &'static str, parts: &[(String, Health)]) {
        let mut reasons = Vec::new();
        let mut notes = Vec::new();
        for (name, part) in parts {
            if let Err(reason) = part.get() {
                reasons.extend(reason.lines().map(|line| format!("{name}: {line}")));
            }
            notes.extend(
                part.notes()
                    .into_iter()
                    .map(|note| format!("{name}: {note}")),
            );
        }
        self.with(|state| {
            state.session = if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons.join("\n"))
            };
            if notes.is_empty() {
                state.notes.remove(key);
            } else {
                state.notes.insert(key, notes.join("\n"));
            }
        });
    }

    /// The notes, in key order.
    pub fn notes(&self) -> Vec<String> {
        self.with(|state| state.notes.values().cloned().collect())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.state.lock() {
            Ok(mut state) => f(&mut state),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_parts_are_healthy_only_together() {
        let (p0, p2) = (Health::new(), Health::new());
        let whole = Health::new();
        let parts = [("p0".to_owned(), p0.clone()), ("p2".to_owned(), p2.clone())];
        p0.set_healthy();
        whole.gather("partitions", &parts);
        assert_eq!(whole.get(), Err("p2: starting".to_owned()));
        p2.set_healthy();
        p2.set_note("disk", Some("slow".into()));
        whole.gather("partitions", &parts);
        assert_eq!(whole.get(), Ok(()));
        assert_eq!(whole.notes(), ["p2: slow"]);
        p0.set_problem("disk", Some("disk full".into()));
        whole.gather("partitions", &parts);
        assert_eq!(whole.get(), Err("p0: disk full".to_owned()));
    }

    #[test]
    fn a_problem_outlives_a_healthy_session() {
        let health = Health::new();
        assert!(health.get().is_err());
        health.set_healthy();
        assert_eq!(health.get(), Ok(()));
        health.set_problem("disk", Some("cannot write logs".into()));
        health.set_healthy();
        assert_eq!(health.get(), Err("cannot write logs".into()));
        health.set_unhealthy("broker connection lost");
        assert_eq!(
            health.get(),
            Err("cannot write logs\nbroker connection lost".into())
        );
        health.set_problem("disk", None);
        health.set_healthy();
        assert_eq!(health.get(), Ok(()));
    }

    #[test]
    fn notes_do_not_change_the_status() {
        let health = Health::new();
        health.set_healthy();
        health.set_note("blocked", Some("publishing blocked: memory alarm".into()));
        assert_eq!(health.get(), Ok(()));
        assert_eq!(health.notes(), vec!["publishing blocked: memory alarm"]);
        health.set_note("blocked", None);
        assert!(health.notes().is_empty());
    }
}
