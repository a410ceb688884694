//! Micro-benchmarks of the per-message hot paths of `pipeline::messages`: parsing each message the
//! services receive (`features` in the model, `y_true` and `y_pred` in the metric service) and
//! serializing each message they send, with the bodies the real producer and model write.
//!
//! Run: `cargo bench -p pipeline --bench messages` (add `-- --quick` for a short run).

use criterion::{Criterion, criterion_group, criterion_main};
use pipeline::dataset::Dataset;
use pipeline::messages::{
    FeaturesOut, LabelKind, Target, YPredOut, YTrueOut, parse_features, parse_label,
};
use std::hint::black_box;
use std::path::Path;

/// A sample id as the producer makes them (a v4 uuid).
const ID: &str = "0b7e6a4e-3f0c-4a59-9d1e-2a7f3c1b5e90";

/// A send time of today's magnitude (same digit count as the real ones).
const SENT_AT_US: u64 = 1_764_000_000_000_123;

/// A prediction with the digits a real one has.
const Y_PRED: Target = Target::Number(206.116_977_023_291_7);

/// A model version as the model service derives it.
const MODEL_VERSION: &str = "ols-1a2b3c4d5e6f";

/// The loss-audit tag every producer message carries by default.
const AUDIT_TAG: &str = "5f3a9c2e81d0:176400000";

/// The data set the producer streams.
fn data() -> Dataset {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
    Dataset::from_csv(&path, None).expect("data/diabetes.csv")
}

fn features_out(row: &[f64]) -> FeaturesOut<'_> {
    FeaturesOut {
        id: ID,
        features: row,
        sent_at_us: SENT_AT_US,
        audit: Some(AUDIT_TAG),
    }
}

fn y_true_out(y_true: &Target) -> YTrueOut<'_> {
    YTrueOut {
        id: ID,
        y_true,
        sent_at_us: SENT_AT_US,
        audit: Some(AUDIT_TAG),
    }
}

fn y_pred_out() -> YPredOut<'static> {
    YPredOut {
        id: ID,
        y_pred: &Y_PRED,
        probabilities: None,
        model_version: MODEL_VERSION,
        sent_at_us: Some(SENT_AT_US),
        audit: Some(AUDIT_TAG),
    }
}

fn parse(c: &mut Criterion) {
    let data = data();
    let features = serde_json::to_vec(&features_out(data.row(0))).expect("features body");
    let y_true = serde_json::to_vec(&y_true_out(&data.target(0).into())).expect("y_true body");
    let y_pred = serde_json::to_vec(&y_pred_out()).expect("y_pred body");

    let mut group = c.benchmark_group("parse");
    group.bench_function("features", |b| {
        b.iter(|| parse_features(black_box(&features), Some(ID)))
    });
    group.bench_function("y_true", |b| {
        b.iter(|| parse_label(LabelKind::YTrue, black_box(&y_true), Some(ID)))
    });
    group.bench_function("y_pred", |b| {
        b.iter(|| parse_label(LabelKind::YPred, black_box(&y_pred), Some(ID)))
    });
    group.finish();
}

fn serialize(c: &mut Criterion) {
    let data = data();
    let row = data.row(0).to_vec();
    let y_true = Target::Number(data.target(0));
    // One buffer reused, as the services do.
    let mut body = Vec::with_capacity(512);

    let mut group = c.benchmark_group("serialize");
    group.bench_function("features", |b| {
        b.iter(|| {
            body.clear();
            serde_json::to_writer(&mut body, black_box(&features_out(&row))).expect("serialize");
            body.len()
        })
    });
    group.bench_function("y_true", |b| {
        b.iter(|| {
            body.clear();
            serde_json::to_writer(&mut body, black_box(&y_true_out(&y_true))).expect("serialize");
            body.len()
        })
    });
    group.bench_function("y_pred", |b| {
        b.iter(|| {
            body.clear();
            serde_json::to_writer(&mut body, black_box(&y_pred_out())).expect("serialize");
            body.len()
        })
    });
    group.finish();
}

criterion_group!(benches, parse, serialize);
criterion_main!(benches);
