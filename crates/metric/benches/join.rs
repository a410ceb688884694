//! Micro-benchmark of the metric service's join: `Joiner::offer` of a `y_true`, then of the
//! `y_pred` with the same id, which makes the pair (and remembers the id for de-duplication),
//! with the service's default limits. Every iteration uses a new id, as in the pipeline.
//!
//! Run: `cargo bench -p metric --bench join` (add `-- --quick` for a short run).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use metric::join::{JoinLimits, Joiner, Offer};
use pipeline::messages::LabelKind;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// A send time of today's magnitude.
const SENT_AT_US: u64 = 1_764_000_000_000_123;

fn join(c: &mut Criterion) {
    // JOIN_CAPACITY, JOIN_MAX_AGE_SECS and DEDUP_CAPACITY at their defaults.
    let mut joiner = Joiner::new(JoinLimits {
        capacity: 100_000,
        max_age: Duration::from_secs(600),
        dedup_capacity: 500_000,
    });
    let now = Instant::now();
    let mut counter = 0u64;
    c.bench_function("join/offer_y_true_then_y_pred", |b| {
        b.iter_batched(
            || {
                counter += 1;
                // 36 characters, like the producer's uuids.
                format!("00000000-0000-4000-8000-{counter:012x}")
            },
            |id| {
                let first = joiner.offer(LabelKind::YTrue, &id, 151.0, None, Some(SENT_AT_US), now);
                let second = joiner.offer(
                    LabelKind::YPred,
                    &id,
                    206.116_977_023_291_7,
                    Some("ols-1a2b3c4d5e6f"),
                    Some(SENT_AT_US),
                    now,
                );
                debug_assert!(matches!(second, Ok(Offer::Paired(_))));
                black_box((first, second))
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, join);
criterion_main!(benches);
