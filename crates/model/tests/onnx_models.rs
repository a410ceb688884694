//! Users' ONNX models through ONNX Runtime: the answers equal scikit-learn's own predictions
//! (written beside each fixture by `tests/models/make_fixtures.py`), every way a graph can be unfit
//! is refused with a message that says what to change, and `model stamp` writes what the service
//! reads. Needs ONNX Runtime: `ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)` (`scripts/test` sets it).

use model::served::ServedModel;
use pipeline::dataset::Dataset;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = repo().join("tests/models/fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn runtime() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "these tests need ONNX Runtime: ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)"
    );
}

fn diabetes() -> Dataset {
    Dataset::from_csv(&repo().join("data/diabetes.csv"), None).unwrap()
}

/// scikit-learn's predictions, by row.
fn expected(name: &str) -> Vec<f64> {
    let text = String::from_utf8(fixture(&format!("{name}.expected.csv"))).unwrap();
    text.lines()
        .skip(1)
        .map(|line| line.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// Largest absolute and relative differences between ONNX Runtime's answers, one row at a time
/// as the service asks, and scikit-learn's.
fn agreement(name: &str) -> (f64, f64) {
    runtime();
    let model = ServedModel::onnx(&fixture(&format!("{name}.onnx"))).unwrap();
    let data = diabetes();
    let sklearn = expected(name);
    assert_eq!(sklearn.len(), data.len());
    let (mut abs, mut rel) = (0.0f64, 0.0f64);
    for (row, theirs) in sklearn.iter().enumerate() {
        let ours = model.predict(data.row(row)).unwrap().unwrap();
        abs = abs.max((ours - theirs).abs());
        rel = rel.max((ours - theirs).abs() / theirs.abs().max(1.0));
    }
    // The batch path gives the same answers.
    let batch = model.predict_dataset(&data).unwrap();
    for (row, value) in batch.iter().enumerate() {
        assert_eq!(*value, model.predict(data.row(row)).unwrap().unwrap());
    }
    eprintln!("{name}: max abs {abs:e}, max rel {rel:e}");
    (abs, rel)
}

#[test]
fn a_linear_pipeline_equals_scikit_learn_to_double_precision() {
    let (abs, rel) = agreement("linear");
    assert!(rel <= 1e-12 && abs <= 1e-9, "{abs} {rel}");
}

/// Trees run in float32 inside ONNX Runtime (the double input is cast before them): the bound is
/// float32's, about 1e-6 relative (measured: tests/models/fixtures/agreement.txt).
#[test]
fn tree_ensembles_equal_scikit_learn_to_float32_precision() {
    for name in ["gbr", "rf", "xgb"] {
        let (abs, rel) = agreement(name);
        assert!(rel <= 2e-6 && abs <= 5e-4, "{name}: {abs} {rel}");
    }
}

/// The default float32 export (Scaler before the trees in float32) flips tree splits: it loads,
/// but does not answer what scikit-learn does. Documented; the test keeps the finding honest.
#[test]
fn the_default_float32_export_of_trees_differs_from_scikit_learn() {
    let (abs, _) = agreement("float32_default");
    assert!(abs > 1.0, "{abs}");
}

fn refusal(name: &str) -> String {
    runtime();
    let err = ServedModel::parse(&fixture(name)).expect_err(name);
    format!("{err:#}")
}

#[test]
fn unfit_graphs_are_refused_with_what_to_change() {
    for (name, says) in [
        ("truncated.onnx", "cannot load the graph"),
        ("two_inputs.onnx", "the graph has 2 inputs"),
        ("string_input.onnx", "feeds numbers"),
        ("nan_output.onnx", "finite numbers"),
        ("wrong_shape.onnx", "gives one per row"),
        ("double_trees.onnx", "CastTransformer"),
    ] {
        let text = refusal(name);
        assert!(text.contains(says), "{name}: {text}");
    }
    let text = format!("{:#}", ServedModel::parse(b"\x08\x07garbage").unwrap_err());
    assert!(text.contains("cannot load the graph"), "{text}");
}

#[test]
fn stamping_names_version_and_reference_is_what_the_service_reads() {
    runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rf.onnx");
    let out = dir.path().join("rf-stamped.onnx");
    std::fs::write(&path, fixture("rf.onnx")).unwrap();
    model::stamp_model(
        &path,
        Some(&out),
        Some(&repo().join("data/diabetes.csv")),
        None,
        None,
        Some("rf-7".into()),
    )
    .unwrap();
    let (served, _) = ServedModel::load(&out).unwrap();
    assert_eq!(served.version, "rf-7");
    assert_eq!(served.target_name.as_deref(), Some("target"));
    let reference = served.reference.as_ref().expect("a drift reference");
    assert_eq!(reference.rows, 442);
    assert!(
        reference.mae > 1.0 && reference.mae < 40.0,
        "{}",
        reference.mae
    );
    // Same answers as before stamping.
    let plain = ServedModel::onnx(&fixture("rf.onnx")).unwrap();
    let row = diabetes().row(3).to_vec();
    assert_eq!(
        served.predict(&row).unwrap().unwrap(),
        plain.predict(&row).unwrap().unwrap()
    );
}

#[test]
fn data_with_its_columns_in_another_order_is_matched_by_name() {
    runtime();
    let model = ServedModel::onnx(&fixture("gbr.onnx")).unwrap();
    let data = diabetes();
    let names: Vec<String> = data.feature_names.iter().rev().cloned().collect();
    let mut features = Vec::new();
    for row in 0..data.len() {
        features.extend(data.row(row).iter().rev());
    }
    let reversed = Dataset::from_rows(
        names,
        data.target_name.clone(),
        features,
        data.targets().to_vec(),
    )
    .unwrap();
    let arranged = model.arrange_dataset(&reversed).unwrap();
    assert_eq!(
        model.predict_dataset(&arranged).unwrap(),
        model.predict_dataset(&data).unwrap()
    );
}
