//! The one session supervisor every service runs: connect, run a session, and when it ends decide
//! (as plain data, [`classify`]) whether the error is fatal or worth another session, and how long
//! to wait first ([`SessionBackoff`]: the pause grows across sessions, so a session that fails
//! right after connecting still waits; it starts over only after a session that stayed up).
//!
//! It also keeps lapin from hanging the service: a finished session's connection is closed first,
//! then its lapin objects are dropped on a thread of their own ([`drop_detached`]). lapin 4.12.3 can
//! deadlock when a `Consumer` is dropped while its I/O thread tears down a failed channel (the I/O
//! thread holds the channel-status lock and waits for the consumers lock); on a tokio worker that
//! froze the whole service, on a spare thread it only holds that thread. At most
//! [`MAX_DETACHED_DROPS`] such threads live at once: beyond that the value is leaked, never
//! dropped on the caller's thread, so a broker that fails session after session costs memory
//! at worst, not a thread per session.

use super::connection::Broker;
use super::error::HandlerError;
use super::retry::{Step, Verdict, classify};
use lapin::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How one session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The work is done or shutdown was asked for: close and stop.
    Finished,
    /// An error at `step`: the supervisor decides between another session and stopping.
    Failed {
        /// Where it happened.
        step: Step,
        /// What happened.
        error: HandlerError,
    },
}

impl SessionEnd {
    /// A failure at `step`.
    pub fn failed(step: Step, error: impl Into<HandlerError>) -> Self {
        Self::Failed {
            step,
            error: error.into(),
        }
    }
}

/// Threads dropping finished sessions that may live at once (see the module notes).
pub const MAX_DETACHED_DROPS: usize = 8;

/// How [`Reaper::drop_detached`] disposed of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    /// Dropped on a thread of its own.
    Thread,
    /// Leaked: the cap of live threads was reached (earlier drops are stuck) or none could start.
    Leaked,
}

/// Drops values off the caller's thread, with at most `cap` dropping threads alive at once.
#[derive(Debug)]
pub struct Reaper {
    cap: usize,
    live: Arc<AtomicUsize>,
}

/// Gives a reaper's slot back when its thread ends, even if the drop panicked.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reaper {
    /// A reaper that keeps at most `cap` threads.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Threads dropping a value now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Drops `value` on a thread of its own, or leaks it when `cap` threads are still busy.
    pub fn drop_detached<T: Send + 'static>(&self, value: T) -> Detached {
        let taken = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live < self.cap).then_some(live + 1)
            });
        if taken.is_err() {
            tracing::warn!(
                threads = self.cap,
                "earlier finished sessions are still being dropped; leaking this one instead"
            );
            std::mem::forget(value);
            return Detached::Leaked;
        }
        let slot = Slot(Arc::clone(&self.live));
        // If no thread starts, `spawn` drops the closure here: `ManuallyDrop` leaks the value
        // then instead of dropping it on the caller's thread.
        let value = std::mem::ManuallyDrop::new(value);
        let spawned = std::thread::Builder::new()
            .name("lapin-drop".into())
            .spawn(move || {
                let _slot = slot;
                drop(std::mem::ManuallyDrop::into_inner(value));
            });
        match spawned {
            Ok(_) => Detached::Thread,
            Err(err) => {
                tracing::warn!(error = %err, "cannot start a thread to drop a finished session");
                Detached::Leaked
            }
        }
    }
}

/// The reaper of finished sessions.
static REAPER: std::sync::LazyLock<Reaper> =
    std::sync::LazyLock::new(|| Reaper::new(MAX_DETACHED_DROPS));

/// Drops `value` off the caller's thread, so that a lapin object whose drop blocks (see the module
/// notes) can never block a tokio worker; at most [`MAX_DETACHED_DROPS`] threads at once.
pub fn drop_detached<T: Send + 'static>(value: T) {
    REAPER.drop_detached(value);
}

/// Closes a connection, briefly: on a dead one it would only wait.
pub async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "bye".into())).await;
}

/// Runs sessions until one finishes or `shutdown`: connects (with backoff), runs `session` on the
/// connection, and on failure either reconnects after the pause [`SessionBackoff`] gives or, for a
/// fatal error, returns it. Returns `Ok` on shutdown or when a session finished.
pub async fn supervise<F>(
    broker: &mut Broker,
    shutdown: &CancellationToken,
    mut session: F,
) -> anyhow::Result<()>
where
    F: AsyncFnMut(&Connection, &mut Broker) -> SessionEnd,
{
    loop {
        let connection = match broker.connect(shutdown).await {
            Ok(Some(connection)) => connection,
            Ok(None) => return Ok(()),
            Err(err) => return Err(err),
        };
        let started = std::time::Instant::now();
        let end = session(&connection, broker).await;
        if matches!(end, SessionEnd::Failed { .. }) {
            // Before the close, which may wait up to 2 s on a dead broker, so that the gauge
            // says "disconnected" as soon as /healthz does.
            broker.metrics.connected.set(0);
        }
        close(&connection).await;
        broker.disconnected();
        drop_detached(connection);
        let (step, error) = match end {
            SessionEnd::Finished => return Ok(()),
            SessionEnd::Failed { step, error } => (step, error),
        };
        match classify(step, &error.failure()) {
            Verdict::Fatal { message } => {
                broker.health.set_unhealthy(message.clone());
                return Err(error.into_anyhow().context(message));
            }
            Verdict::Retry { reason } => {
                let delay = broker.session_failed(started.elapsed());
                tracing::warn!(
                    ?step,
                    error = %error.report(),
                    retry_in_ms = delay.as_millis() as u64,
                    "{reason}; connecting again"
                );
                broker.lost(&reason);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Blocks its drop until the test says so, like a lapin object caught in the deadlock.
    struct Stuck(mpsc::Receiver<()>);

    impl Drop for Stuck {
        fn drop(&mut self) {
            let _ = self.0.recv();
        }
    }

    #[test]
    fn many_stuck_sessions_do_not_take_many_threads() {
        let reaper = Reaper::new(3);
        let mut release = Vec::new();
        let mut outcomes = Vec::new();
        for _ in 0..50 {
            let (tx, rx) = mpsc::channel();
            release.push(tx);
            outcomes.push(reaper.drop_detached(Stuck(rx)));
        }
        assert_eq!(reaper.live(), 3);
        assert_eq!(
            outcomes.iter().filter(|o| **o == Detached::Thread).count(),
            3
        );
        // Once the stuck drops finish, their threads end and give their slots back.
        drop(release);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reaper.live() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(reaper.live(), 0);
        assert_eq!(reaper.drop_detached(vec![1u8]), Detached::Thread);
    }

    #[test]
    fn quick_drops_are_all_dropped() {
        let reaper = Reaper::new(2);
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut threads = 0;
        for _ in 0..200 {
            while reaper.live() == 2 {
                std::thread::yield_now();
            }
            if reaper.drop_detached(Count(Arc::clone(&dropped))) == Detached::Thread {
                threads += 1;
            }
            assert!(reaper.live() <= 2);
        }
        while reaper.live() > 0 {
            std::thread::yield_now();
        }
        assert_eq!(dropped.load(Ordering::SeqCst), threads);
    }
}
