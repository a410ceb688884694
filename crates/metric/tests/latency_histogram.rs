//! The end-to-end latency histogram is fine enough to read a p99 from Prometheus within 50 %:
//! every bucket between 1 ms and 1 s is at most ×1.5 wide, and the buckets cover that range.

use metric::quality::Quality;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// The `le` bounds of `pipeline_end_to_end_latency_seconds`, as the metric service exports them.
fn exported_bounds() -> Vec<f64> {
    let mut registry = Registry::default();
    let quality = Quality::register(&mut registry, 10, 10, 1.25);
    quality.observe_latency(0.004);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    let prefix = "pipeline_end_to_end_latency_seconds_bucket{le=\"";
    text.lines()
        .filter_map(|line| line.strip_prefix(prefix)?.split('"').next())
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse().unwrap())
        .collect()
}

#[test]
fn buckets_between_1_ms_and_1_s_are_at_most_1_5_times_wide() {
    let bounds = exported_bounds();
    assert!(bounds.len() > 2, "{bounds:?}");
    assert!(
        bounds[0] <= 0.001,
        "first bound {} is above 1 ms",
        bounds[0]
    );
    assert!(
        *bounds.last().unwrap() >= 1.0,
        "last finite bound {} is below 1 s",
        bounds.last().unwrap()
    );
    for pair in bounds.windows(2) {
        if pair[1] > 0.001 && pair[0] < 1.0 {
            let ratio = pair[1] / pair[0];
            assert!(
                ratio <= 1.5 + 1e-9,
                "bucket {} .. {} is ×{ratio:.2} wide",
                pair[0],
                pair[1]
            );
        }
    }
}
