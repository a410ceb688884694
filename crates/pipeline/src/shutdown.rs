//! Turning SIGTERM and SIGINT (what `docker compose stop` and Ctrl-C send) into a future, with a
//! last-resort deadline so that a stop request can never hang the process.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// After SIGTERM/SIGINT, the process exits (code 1, with an error line) if it has not stopped by
/// itself within this time: the drain takes at most about 11 s (5 s for in-flight work, then
/// bounded closes), so only a hang gets here.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// Exits the process `deadline` from now unless it has exited before: on a plain thread, so a
/// stuck runtime (every worker blocked) cannot stop it.
fn arm_deadline(deadline: Duration) {
    let armed = std::thread::Builder::new()
        .name("shutdown-deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            tracing::error!(
                deadline_secs = deadline.as_secs(),
                "shutdown did not finish in time; exiting without finishing it"
            );
            eprintln!(
                "error: shutdown did not finish within {} s; exiting",
                deadline.as_secs()
            );
            std::process::exit(1);
        });
    if let Err(err) = armed {
        tracing::warn!(error = %err, "cannot start the shutdown deadline thread");
    }
}

/// Completes on the first SIGTERM or SIGINT, and arms [`SHUTDOWN_DEADLINE`].
pub async fn signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        _ = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
    arm_deadline(SHUTDOWN_DEADLINE);
}

/// A token cancelled when `shutdown` completes, for code that checks it in many places.
pub fn token_from(shutdown: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    token
}
