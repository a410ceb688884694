//! The built-in logistic regression against scikit-learn's `LogisticRegression` on the classifier
//! fixtures (breast_cancer: classes 0 and 1; iris: three string classes), from the numbers in
//! `fixtures/sklearn_logistic.json` (written by `fixtures/make_sklearn_logistic.py`; run it to
//! regenerate them). Run with `--nocapture` to see the figures.
//!
//! Regularisation and scaling differ from a raw `LogisticRegression()`, so coefficients are not
//! compared with it: our in-sample accuracy must be at least its accuracy minus
//! [`ACCURACY_MARGIN`], and our log loss finite and below [`LOG_LOSS_BOUND`]. Against the fit of
//! the same objective (`equivalent`: standardised features, the matching `C`) the probabilities
//! must agree row by row within [`PROBABILITY_TOLERANCE`].

use model::logistic::{LogisticArtifact, LogisticModel};
use model::served::{Prediction, ServedModel};
use pipeline::classes::{ClassLabel, Task};
use pipeline::dataset::Dataset;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// How far below scikit-learn's in-sample accuracy ours may be.
const ACCURACY_MARGIN: f64 = 0.03;
/// Our in-sample log loss is below this on both sets (scikit-learn's default fits: 0.121 and
/// 0.120).
const LOG_LOSS_BOUND: f64 = 0.15;
/// Largest difference of one class probability from the same objective's fit by scikit-learn
/// (both stop at a gradient tolerance, not at the exact optimum; measured: 3.7e-6 at most).
const PROBABILITY_TOLERANCE: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    sklearn_version: String,
    sets: Vec<Set>,
}

#[derive(Deserialize)]
struct Set {
    data: String,
    rows: usize,
    classes: Vec<ClassLabel>,
    equivalent_c: f64,
    default: Fit,
    converged: Fit,
    equivalent: Fit,
}

#[derive(Deserialize)]
struct Fit {
    estimator: String,
    accuracy: f64,
    log_loss: f64,
    n_iter: u64,
    converged: bool,
    #[serde(default)]
    probabilities: Vec<Vec<f64>>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sklearn_logistic.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn set(name: &str) -> Set {
    fixture()
        .sets
        .into_iter()
        .find(|set| set.data.contains(name))
        .unwrap()
}

fn check(name: &str) {
    let set = set(name);
    let data =
        Dataset::from_csv_for(&repo_root().join(&set.data), None, Task::Classification).unwrap();
    assert_eq!(data.len(), set.rows);
    let model = LogisticModel::fit(&data).unwrap();
    assert_eq!(model.classes, set.classes, "class order");
    let ours = model.evaluate(&data).unwrap();
    println!(
        "{name}: ours (linfa-logistic, standardised, alpha 1): accuracy {:.4}, log loss {:.4}",
        ours.accuracy, ours.log_loss
    );
    for fit in [&set.default, &set.converged, &set.equivalent] {
        println!(
            "{name}: scikit-learn {} {} ({} iterations{}): accuracy {:.4}, log loss {:.4}",
            fixture().sklearn_version,
            fit.estimator,
            fit.n_iter,
            if fit.converged { "" } else { ", not converged" },
            fit.accuracy,
            fit.log_loss
        );
        assert!(
            ours.accuracy >= fit.accuracy - ACCURACY_MARGIN,
            "{name}: accuracy {} vs scikit-learn's {} ({})",
            ours.accuracy,
            fit.accuracy,
            fit.estimator
        );
    }
    assert!(
        ours.log_loss.is_finite() && ours.log_loss < LOG_LOSS_BOUND,
        "{name}: log loss {}",
        ours.log_loss
    );
    // The same objective: the same probabilities, row by row.
    assert_eq!(set.equivalent.probabilities.len(), data.len());
    let mut worst: f64 = 0.0;
    for (row, theirs) in set.equivalent.probabilities.iter().enumerate() {
        let p = model.probabilities(data.row(row)).unwrap();
        for (a, b) in p.iter().zip(theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    println!(
        "{name}: largest probability difference from scikit-learn's C = {} fit: {worst:.2e}; \
         log loss difference {:.2e}",
        set.equivalent_c,
        (ours.log_loss - set.equivalent.log_loss).abs()
    );
    assert!(worst < PROBABILITY_TOLERANCE, "{name}: {worst}");
    assert!(
        (ours.log_loss - set.equivalent.log_loss).abs() < PROBABILITY_TOLERANCE,
        "{name}: log loss {} vs {}",
        ours.log_loss,
        set.equivalent.log_loss
    );
}

#[test]
fn breast_cancer_as_scikit_learn() {
    check("breast_cancer");
}

#[test]
fn iris_as_scikit_learn() {
    check("iris");
}

/// What `model train --task classification` writes, served: the same answers as the fit.
#[test]
fn the_trained_artifact_serves_the_fitted_model() {
    let path = repo_root().join("tests/models/fixtures/iris.csv");
    let artifact = LogisticArtifact::train(&path, None, None).unwrap();
    let served = ServedModel::parse(&artifact.to_bytes().unwrap()).unwrap();
    let data = Dataset::from_csv_for(&path, None, Task::Classification).unwrap();
    let fitted = LogisticModel::fit(&data).unwrap();
    assert_eq!(served.version, fitted.version);
    let mut correct = 0;
    for row in 0..data.len() {
        let Ok(Prediction::Class(label, p)) = served.answer(data.row(row)).unwrap() else {
            panic!("row {row}: no class");
        };
        assert_eq!((label.clone(), p), fitted.classify(data.row(row)).unwrap());
        correct += usize::from(pipeline::messages::Target::Class(label) == data.label(row));
    }
    assert_eq!(
        correct as f64 / data.len() as f64,
        artifact.metrics.accuracy
    );
}
