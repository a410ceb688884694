//! Micro-benchmarks of the model service's per-message work: the prediction itself
//! (`LinearModel::predict`, a dot product), the `y_pred` body, and the whole handling of one
//! `features` message short of the broker (parse, predict, serialize), and the drift monitor's
//! per-message work (binning 10 features into the window's ring under its lock).
//!
//! Run: `cargo bench -p model --bench predict` (add `-- --quick` for a short run).

use criterion::{Criterion, criterion_group, criterion_main};
use model::drift_monitor::DriftMonitor;
use model::regression::LinearModel;
use pipeline::dataset::Dataset;
use pipeline::messages::{FeaturesOut, Target, YPredOut, parse_features};
use std::hint::black_box;
use std::path::Path;

/// A sample id as the producer makes them (a v4 uuid).
const ID: &str = "0b7e6a4e-3f0c-4a59-9d1e-2a7f3c1b5e90";

/// A send time of today's magnitude.
const SENT_AT_US: u64 = 1_764_000_000_000_123;
/// The loss-audit tag every producer message carries by default.
const AUDIT_TAG: &str = "5f3a9c2e81d0:176400000";

fn model_and_row() -> (LinearModel, Vec<f64>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
    let data = Dataset::from_csv(&path, None).expect("data/diabetes.csv");
    let model = LinearModel::fit(&data).expect("fit");
    (model, data.row(0).to_vec())
}

fn predict(c: &mut Criterion) {
    let (model, row) = model_and_row();
    let mut group = c.benchmark_group("model");
    group.bench_function("predict", |b| b.iter(|| model.predict(black_box(&row))));

    let y_pred = model.predict(&row).expect("predict");
    let mut body = Vec::with_capacity(256);
    group.bench_function("serialize_y_pred", |b| {
        b.iter(|| {
            body.clear();
            serde_json::to_writer(
                &mut body,
                black_box(&YPredOut {
                    id: ID,
                    y_pred: &Target::Number(y_pred),
                    probabilities: None,
                    model_version: &model.version,
                    sent_at_us: Some(SENT_AT_US),
                    audit: Some(AUDIT_TAG),
                }),
            )
            .expect("serialize");
            body.len()
        })
    });

    let input = serde_json::to_vec(&FeaturesOut {
        id: ID,
        features: &row,
        sent_at_us: SENT_AT_US,
        audit: Some(AUDIT_TAG),
    })
    .expect("features body");
    group.bench_function("handle_features", |b| {
        b.iter(|| {
            let message = parse_features(black_box(&input), Some(ID)).expect("parse");
            let y_pred = model.predict(&message.features).expect("predict");
            body.clear();
            serde_json::to_writer(
                &mut body,
                &YPredOut {
                    id: message.id.as_deref().unwrap_or(ID),
                    y_pred: &Target::Number(y_pred),
                    probabilities: None,
                    model_version: &model.version,
                    sent_at_us: message.sent_at_us,
                    audit: message.audit.as_deref(),
                },
            )
            .expect("serialize");
            body.len()
        })
    });

    let drift = DriftMonitor::new(1000);
    let served = model::served::ServedModel::linear(model.clone());
    group.bench_function("drift_observe", |b| {
        b.iter(|| drift.observe(&served, black_box(&row)))
    });
    group.finish();
}

criterion_group!(benches, predict);
criterion_main!(benches);
