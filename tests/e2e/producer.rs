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
    let mut features = start_features(&queues, &url, "50", "10", dir.path());
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

/// A stop request that lands while a sample is being published: the producer lets that publish
/// finish, so what it reports as confirmed is exactly what the queues hold. (It used to drop the
/// publish half-way and count the sample as unsent although its messages had reached the broker,
/// so a producer restarted with the rest of COUNT sent one sample too many.)
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_mid_publish_reports_exactly_what_the_queues_hold() {
    let url = shared_amqp_url();
    for round in 0..6 {
        let queues = Queues::unique("stopmid");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut features = start_features(&queues, &url, "0", "0", dir.path());
        // At full speed a publish is under way nearly all the time.
        std::thread::sleep(Duration::from_millis(300 + 150 * round));
        features.signal("TERM");
        let exit = features
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("features still running:\n{}", features.stderr()));
        let stderr = features.stderr();
        assert!(exit.success(), "features exited {exit}:\n{stderr}");
        let confirmed = stopped_with_confirmed(&stderr);
        assert!(confirmed > 0, "nothing confirmed:\n{stderr}");
        let depths = queue_depths(&url, &[queues.y_true.clone(), queues.features.clone()]).await;
        assert_eq!(
            (depths[&queues.y_true], depths[&queues.features]),
            (confirmed as u32, confirmed as u32),
            "round {round}: the producer reported {confirmed} samples confirmed"
        );
        delete_queues(&url, &queues).await;
    }
}

/// `confirmed=N` of the producer's "producer stopped" line.
fn stopped_with_confirmed(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("producer stopped"))
        .unwrap_or_else(|| panic!("no stop line in:\n{stderr}"));
    line.split("confirmed")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no confirmed count in {line:?}"))
}

/// Starts a producer on `queues` at `url` with `COUNT` and `RATE`, and waits until it is healthy.
fn start_features(
    queues: &Queues,
    url: &str,
    count: &str,
    rate: &str,
    dir: &std::path::Path,
) -> Service {
    let mut env = queues.env();
    env.extend([
        ("AMQP_URL".to_owned(), url.to_owned()),
        ("COUNT".to_owned(), count.to_owned()),
        ("RATE".to_owned(), rate.to_owned()),
    ]);
    let features = spawn_service("features", env, dir);
    wait_healthy(&features, Duration::from_secs(30));
    features
}
