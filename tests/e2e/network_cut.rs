//! A silent network cut longer than the heartbeat: the services notice it within 30 s, wait it
//! out, and carry on by themselves when the network heals, every row once. (The metric service
//! used to say 200 for two minutes, then exit on its own stale exclusive consumer.)

use crate::broker_node::{BrokerNode, PortCut};
use crate::helpers::*;
use std::time::{Duration, Instant};

const SAMPLES: usize = 5000;
const CUT: Duration = Duration::from_secs(150);

fn status(service: &Service) -> Option<u16> {
    service.get("/healthz").map(|(status, _)| status)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_150_s_network_cut_is_noticed_and_survived() {
    if std::env::var("PIPELINE_SKIP_IPTABLES_TEST").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: the network cut test (PIPELINE_SKIP_IPTABLES_TEST=1)");
        return;
    }
    let node = BrokerNode::start("cut");
    let url = node.amqp_url();
    let mut run = Pipeline::start("cut", Options::new(url.clone(), SAMPLES as u64).rate(200.0));
    assert!(
        wait_until(Duration::from_secs(120), || run.rows().len() >= 500),
        "no rows before the cut:\n{}",
        run.logs()
    );
    assert_eq!(status(&run.metric), Some(200));

    let cut = PortCut::start(node.port);
    let cut_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || status(&run.metric) == Some(503)),
        "metric still healthy 30 s into the cut:\n{}",
        run.logs()
    );
    let noticed = cut_at.elapsed();
    eprintln!("metric /healthz turned 503 {noticed:?} after the cut");
    std::thread::sleep(CUT.saturating_sub(cut_at.elapsed()));
    cut.heal();
    let healed_at = Instant::now();

    run.wait_rows(SAMPLES, Duration::from_secs(240));
    eprintln!("all rows {:?} after the heal", healed_at.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&run.rows(), SAMPLES);
    let features = run.features.as_mut().expect("features started");
    let exit = features.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|s| s.success()),
        "features: {exit:?}\n{}",
        run.logs()
    );
    for service in [&run.metric, &run.model] {
        assert!(
            wait_until(Duration::from_secs(30), || status(service) == Some(200)),
            "{} not healthy after the heal:\n{}",
            service.name,
            run.logs()
        );
        assert!(
            service.metrics().get("pipeline_broker_reconnects_total") >= Some(&1.0),
            "{} did not reconnect",
            service.name
        );
    }
    assert!(run.metric.is_running() && run.model.is_running());
    assert_queues_empty(&url, &run.queues).await;
}
