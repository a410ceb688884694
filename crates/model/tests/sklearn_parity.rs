//! The fitted model equals scikit-learn's `LinearRegression().fit(X, y)` within 1e-6 on the
//! fixtures written by `data/make_diabetes.py` (run it to regenerate them).

use model::regression::LinearModel;
use pipeline::dataset::Dataset;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Fixture {
    data: String,
    rows: usize,
    coefficients: Vec<f64>,
    intercept: f64,
    r2: f64,
    mae: f64,
    predictions_first5: Vec<f64>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(fixture_name: &str) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture_name),
    )
    .unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    let data = Dataset::from_csv(&repo_root().join(&fixture.data), None).unwrap();
    assert_eq!(data.len(), fixture.rows);
    let model = LinearModel::fit(&data).unwrap();
    assert_eq!(model.coefficients.len(), fixture.coefficients.len());
    for (i, (ours, theirs)) in model
        .coefficients
        .iter()
        .zip(&fixture.coefficients)
        .enumerate()
    {
        assert!(
            (ours - theirs).abs() <= 1e-6,
            "coefficient {i}: {ours} vs scikit-learn {theirs}"
        );
    }
    assert!(
        (model.intercept - fixture.intercept).abs() <= 1e-6,
        "intercept {} vs {}",
        model.intercept,
        fixture.intercept
    );
    let fit = model.evaluate(&data).unwrap();
    assert!(
        (fit.r2 - fixture.r2).abs() <= 1e-9,
        "r2 {} vs {}",
        fit.r2,
        fixture.r2
    );
    assert!(
        (fit.mae - fixture.mae).abs() <= 1e-6,
        "mae {} vs {}",
        fit.mae,
        fixture.mae
    );
    for (row, expected) in fixture.predictions_first5.iter().enumerate() {
        let ours = model.predict(data.row(row)).unwrap();
        assert!(
            (ours - expected).abs() <= 1e-6,
            "row {row}: {ours} vs {expected}"
        );
    }
}

#[test]
fn diabetes_matches_scikit_learn() {
    check("sklearn_diabetes_ols.json");
}

#[test]
fn tiny_data_set_matches_scikit_learn() {
    check("sklearn_tiny_ols.json");
}

#[test]
fn wrong_length_is_refused() {
    let data = Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).unwrap();
    let model = LinearModel::fit(&data).unwrap();
    assert_eq!(
        model.predict(&[1.0; 9]).unwrap_err().reason(),
        "wrong_length"
    );
    assert_eq!(
        model.predict(&[1.0; 11]).unwrap_err().reason(),
        "wrong_length"
    );
    assert!(model.version.starts_with("ols-"));
}
