//! The producer's promise about COUNT: it exits 0 only when the broker confirmed COUNT samples.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use std::time::Duration;

/// The broker freezes (SIGSTOP) while the producer sends its last samples: the final drain times
/// out, and the producer must say so and exit non-zero (it used to exit 0).
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_that_times_out_short_of_count_exits_non_zero() {
    let node = BrokerNode::start("drain");
    let url = node.amqp_url();
    let queues = Queues::unique("drain");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = queues.env();
    env.extend([
        ("AMQP_URL".to_owned(), url.clone()),
        ("COUNT".to_owned(), "50".to_owned()),
        ("RATE".to_owned(), "10".to_owned()),
    ]);
    let mut features = spawn_service("features", env, dir.path());
    assert!(
        wait_until(Duration::from_secs(30), || features
            .get("/healthz")
            .is_some_and(|(status, _)| status == 200)),
        "{}",
        features.stderr()
    );
    node.freeze();
    let exit = features.wait_exit(Duration::from_secs(40));
    node.thaw();
    let stderr = features.stderr();
    let exit = exit.unwrap_or_else(|| panic!("features still running:\n{stderr}"));
    assert!(
        !exit.success(),
        "features exited 0 short of COUNT:\n{stderr}"
    );
    assert!(stderr.contains("of COUNT=50 samples confirmed"), "{stderr}");
    drop(node);
}
