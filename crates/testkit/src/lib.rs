//! `testkit`: what the end-to-end tests (`tests/e2e`) and the benchmark (`crates/bench`) share, so
//! neither copies the other: private RabbitMQ nodes ([`broker_node`]), the service processes with
//! their environment built in one place and killed on drop ([`process`]), queue names and their
//! clean-up ([`queues`]), and the HTTP and Prometheus helpers ([`http`], [`metrics`]) over kept
//! crates (reqwest, prometheus-parse) rather than hand-written protocol code.

pub mod broker_node;
pub mod http;
pub mod metrics;
pub mod process;
pub mod queues;

pub use metrics::{Histogram, Metrics};
pub use process::{Env, Exit, Service, Usage};
pub use queues::{Queues, connect, delete_queues};

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The repository root (the services run there, so their relative default paths resolve).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    // The kernel may hand out a port again as soon as the probe lets it go, before the service
    // that was given it binds it: never give the same port twice in one test process.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("no free port");
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}

/// A loopback address on a [`free_port`].
pub fn local_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
