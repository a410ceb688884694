//! A broker memory alarm blocks publishing: each publisher says so (log, `/healthz` note, gauge)
//! while it lasts, and nothing is lost after.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use std::time::Duration;

const SAMPLES: usize = 4000;

fn blocked(service: &Service) -> bool {
    let note = service
        .get("/healthz")
        .is_some_and(|(_, body)| body.contains("note: publishing blocked by the broker"));
    let gauge = service.metrics().get("pipeline_broker_blocked") == Some(&1.0);
    note && gauge
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_alarm_is_visible_and_loses_nothing() {
    let node = BrokerNode::start("blocked");
    let url = node.amqp_url();
    let mut run = Pipeline::start(
        "blocked",
        // 40 s of samples: the alarm must come (rabbitmqctl takes seconds on a loaded machine)
        // and end while the producer still publishes.
        Options::new(url.clone(), SAMPLES as u64).rate(100.0),
    );
    // The producer's own count, not the rows: on a loaded machine the rows can lag until the
    // producer is done, and the alarm must come while it still publishes.
    let published = |service: &Service| -> f64 {
        service
            .metrics()
            .iter()
            .filter(|(name, _)| name.starts_with("pipeline_messages_published_total"))
            .map(|(_, n)| *n)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(120), || run
            .features
            .as_ref()
            .is_some_and(|f| published(f) >= 600.0)),
        "no samples published before the alarm:\n{}",
        run.logs()
    );
    let set = node.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    assert!(set.status.success(), "{set:?}");
    let features = run.features.as_ref().expect("features started");
    assert!(
        wait_until(Duration::from_secs(20), || blocked(features)),
        "features does not show the block:\n{}",
        run.logs()
    );
    std::thread::sleep(Duration::from_secs(20));
    assert!(
        blocked(features),
        "the block note went away during the alarm"
    );
    let rows_blocked = run.rows().len();
    let reset = node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert!(reset.status.success(), "{reset:?}");
    assert!(
        wait_until(Duration::from_secs(30), || !blocked(features)
            && features.metrics().get("pipeline_broker_blocked") == Some(&0.0)),
        "features still shows the block after the alarm:\n{}",
        run.logs()
    );
    assert!(features.stderr().contains("the broker blocked publishing"));
    assert!(
        features
            .stderr()
            .contains("the broker unblocked publishing")
    );

    run.wait_rows(SAMPLES, Duration::from_secs(180));
    assert!(rows_blocked < SAMPLES, "the alarm did not hold anything up");
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&run.rows(), SAMPLES);
    let exit = run
        .features
        .as_mut()
        .expect("features started")
        .wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|s| s.success()), "features: {exit:?}");
    assert_queues_empty(&url, &run.queues).await;

    // A stop request while blocked: the producer must not wait for the alarm to end (it used to
    // wait forever in its declare, which a blocked connection never sends).
    let set = node.ctl(&["set_vm_memory_high_watermark", "0.00001"]);
    assert!(set.status.success(), "{set:?}");
    let mut stuck = run.extra_service("features", &[("COUNT", "50".into()), ("RATE", "0".into())]);
    assert!(
        wait_until(Duration::from_secs(20), || stuck
            .stderr()
            .contains("the broker blocked publishing")),
        "{}",
        stuck.stderr()
    );
    stuck.signal("TERM");
    let exit = stuck.wait_exit(Duration::from_secs(20));
    assert!(
        exit.is_some(),
        "features ignored SIGTERM while blocked:\n{}",
        stuck.stderr()
    );
    let reset = node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert!(reset.status.success(), "{reset:?}");
}
