//! Opening the training window at start-up when `TRAIN_DIR` is full.
//!
//! Opening rewrites the journal (see [`crate::store`]), which needs room for a copy of it. A full
//! disk passes when someone frees space, so the trainer waits rather than exits (an exit is a crash
//! loop under compose or Kubernetes): one WARN, `/healthz` 503 saying why, tries again with the
//! backoff of every other local fault, and one INFO when the window opens. Any other error still
//! stops the start-up: a wrong `TRAIN_DIR` is not fixed by waiting.

use pipeline::CancellationToken;
use pipeline::broker::{Backoff, LOCAL_FAULT_RETRY};
use pipeline::health::Health;
use std::io::ErrorKind;
use std::path::Path;

/// The `/healthz` problem reported while the window waits for space.
const PROBLEM: &str = "train_dir_full";

/// Whether `err` comes from a full disk (no space left, or a quota reached): worth waiting for.
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded))
}

/// Calls `open` until it succeeds, waiting between tries while it fails for a full disk (see the
/// module notes). `Ok(None)` when `shutdown` comes first; `Err` for any other failure.
pub(crate) async fn open_waiting<T>(
    open: impl FnMut() -> anyhow::Result<T>,
    dir: &Path,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<T>> {
    let backoff = Backoff::new(LOCAL_FAULT_RETRY.0, LOCAL_FAULT_RETRY.1);
    open_waiting_with(open, dir, health, shutdown, backoff).await
}

async fn open_waiting_with<T>(
    mut open: impl FnMut() -> anyhow::Result<T>,
    dir: &Path,
    health: &Health,
    shutdown: &CancellationToken,
    mut backoff: Backoff,
) -> anyhow::Result<Option<T>> {
    let mut waited = false;
    loop {
        let err = match open() {
            Ok(opened) => {
                if waited {
                    tracing::info!(
                        dir = %dir.display(),
                        "TRAIN_DIR has room again: the training window is open"
                    );
                    health.set_problem(PROBLEM, None);
                }
                return Ok(Some(opened));
            }
            Err(err) if is_disk_full(&err) => err,
            Err(err) => return Err(err),
        };
        let delay = backoff.next_delay();
        if !waited {
            waited = true;
            tracing::warn!(
                dir = %dir.display(),
                error = %format!("{err:#}"),
                "TRAIN_DIR is full: waiting for space before opening the training window \
                 (retrying; nothing is consumed meanwhile, the broker keeps the messages)"
            );
        }
        // Set again on every try: the error may change (another file, a quota instead).
        health.set_problem(
            PROBLEM,
            Some(format!(
                "TRAIN_DIR {} is full: cannot open the training window ({err:#}); waiting for \
                 space, retrying",
                dir.display()
            )),
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;
    use std::io;
    use std::time::Duration;

    fn full() -> anyhow::Error {
        anyhow::Error::from(io::Error::from(ErrorKind::StorageFull))
            .context("cannot compact the training window")
    }

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(10), Duration::from_millis(50))
    }

    #[test]
    fn only_a_full_disk_is_waited_for() {
        assert!(is_disk_full(&full()));
        let quota = anyhow::Error::from(io::Error::from(ErrorKind::QuotaExceeded));
        assert!(is_disk_full(&quota));
        // Through a typed error's source, as `AtomicFile` gives it.
        let typed = anyhow::Error::from(pipeline::fs::FileError {
            what: "cannot write",
            path: "/t/x".into(),
            source: io::Error::from(ErrorKind::StorageFull),
        });
        assert!(is_disk_full(&typed.context("cannot compact")));
        let denied = Err::<(), _>(io::Error::from(ErrorKind::PermissionDenied))
            .context("cannot create TRAIN_DIR")
            .unwrap_err();
        assert!(!is_disk_full(&denied));
        assert!(!is_disk_full(&anyhow::anyhow!("no space left on device")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_disk_is_reported_until_the_window_opens() {
        let health = Health::new();
        health.set_healthy();
        let mut tries = 0;
        let seen = health.clone();
        let opened = open_waiting_with(
            || {
                tries += 1;
                // While it waits, /healthz is 503 and says why.
                if tries > 1 {
                    let reason = seen.get().unwrap_err();
                    assert!(
                        reason.contains("TRAIN_DIR /t is full")
                            && reason.contains("cannot compact the training window"),
                        "{reason}"
                    );
                }
                if tries < 4 { Err(full()) } else { Ok(tries) }
            },
            Path::new("/t"),
            &health,
            &CancellationToken::new(),
            backoff(),
        )
        .await
        .unwrap();
        assert_eq!(opened, Some(4));
        assert_eq!(health.get(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn another_error_stops_the_start_up_and_shutdown_ends_the_wait() {
        let health = Health::new();
        let err = open_waiting_with(
            || Err::<(), _>(anyhow::anyhow!("TRAIN_DIR is a file")),
            Path::new("/t"),
            &health,
            &CancellationToken::new(),
            backoff(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "TRAIN_DIR is a file");

        let shutdown = CancellationToken::new();
        let mut tries = 0;
        let waited = open_waiting_with(
            || {
                tries += 1;
                if tries == 3 {
                    shutdown.cancel();
                }
                Err::<(), _>(full())
            },
            Path::new("/t"),
            &health,
            &shutdown,
            backoff(),
        )
        .await
        .unwrap();
        assert_eq!((waited, tries), (None, 3));
    }
}
