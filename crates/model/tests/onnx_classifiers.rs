//! Users' ONNX classifiers through ONNX Runtime: every row's label is scikit-learn's and every
//! probability within 1e-6 of scikit-learn's (written beside each fixture by
//! `tests/models/make_fixtures.py`), the class list comes from the graph (or metadata `classes`),
//! and a classifier graph that names no classes is refused with what to do. Needs ONNX Runtime:
//! `ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)` (`scripts/test` sets it).

use model::onnx::OnnxModel;
use model::served::{Engine, ServedModel};
use pipeline::classes::{ClassLabel, Task};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/models/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn runtime() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "these tests need ONNX Runtime: ORT_DYLIB_PATH=$(scripts/onnxruntime-lib)"
    );
}

/// A fixture CSV (no quoting in these): its header and its rows of cells.
fn table(name: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let text = String::from_utf8(fixture(name)).unwrap();
    let mut lines = text
        .lines()
        .map(|line| line.split(',').map(str::to_owned).collect::<Vec<String>>());
    let header = lines.next().unwrap();
    (header, lines.collect())
}

/// The rows a fixture's model is fed: feature names, features row-major, and the row count.
fn data(name: &str) -> (Vec<String>, Vec<f64>, usize) {
    let (header, rows) = table(name);
    let names = header[..header.len() - 1].to_vec();
    let mut features = Vec::new();
    for row in &rows {
        features.extend(row[..names.len()].iter().map(|v| v.parse::<f64>().unwrap()));
    }
    (names, features, rows.len())
}

fn load(name: &str) -> OnnxModel {
    runtime();
    OnnxModel::from_bytes(&fixture(&format!("{name}.onnx")))
        .unwrap_or_else(|err| panic!("{name}: {err}"))
}

/// Rows compared and the largest probability difference from scikit-learn, after checking that
/// every label is scikit-learn's, both for the whole batch and for one row at a time as the
/// service asks (the two may differ in float32's last bits: ONNX Runtime's kernels sum in
/// another order for another batch size).
fn agreement(name: &str, rows: &str) -> (usize, f64) {
    let model = load(name);
    assert_eq!(model.task(), Task::Classification, "{name}");
    let (names, features, n_rows) = data(rows);
    assert_eq!(
        model.metadata.feature_names.as_ref(),
        Some(&names),
        "{name}"
    );
    let (header, expected) = table(&format!("{name}.expected.csv"));
    assert_eq!(expected.len(), n_rows, "{name}");
    // The columns of the probability output are the classes, in scikit-learn's classes_ order.
    let keys: Vec<String> = model
        .classes()
        .unwrap()
        .iter()
        .map(|class| format!("p_{}", class.key()))
        .collect();
    assert_eq!(keys, header[1..], "{name}");
    let batch = model.classify_rows(&features, n_rows).unwrap();
    assert_eq!(batch.len(), n_rows);
    let width = model.n_features();
    let mut worst = 0.0f64;
    for (row, theirs) in expected.iter().enumerate() {
        let single = model
            .classify_rows(&features[row * width..(row + 1) * width], 1)
            .unwrap();
        for answer in [&batch[row], &single[0]] {
            let (label, probabilities) = answer
                .as_ref()
                .unwrap_or_else(|err| panic!("{name} row {row}: {err}"));
            assert_eq!(
                *label,
                ClassLabel::from_cell(&theirs[0]),
                "{name} row {row}"
            );
            assert_eq!(probabilities.len(), theirs.len() - 1);
            for ((_, ours), theirs) in probabilities.iter().zip(&theirs[1..]) {
                worst = worst.max((ours - theirs.parse::<f64>().unwrap()).abs());
            }
        }
    }
    eprintln!("{name}: {n_rows} rows, labels equal, max probability difference {worst:e}");
    (n_rows, worst)
}

#[test]
fn binary_classifiers_with_integer_labels_equal_scikit_learn() {
    for name in ["breast_cancer_logreg", "breast_cancer_gbc"] {
        let (rows, worst) = agreement(name, "breast_cancer.csv");
        assert_eq!(rows, 569);
        assert!(worst <= 1e-6, "{name}: {worst}");
        let model = load(name);
        assert_eq!(
            model.classes(),
            Some(&[ClassLabel::Integer(0), ClassLabel::Integer(1)][..])
        );
    }
}

/// String labels; the same model exported as a float tensor, as skl2onnx's default ZipMap
/// (a map per row), and with a double input (no classifier node: the classes are the constant
/// list an ArrayFeatureExtractor picks the label from).
#[test]
fn multi_class_string_labels_equal_scikit_learn_in_every_export() {
    let iris: Vec<ClassLabel> = ["setosa", "versicolor", "virginica"]
        .map(|class| ClassLabel::Text(class.to_owned()))
        .into();
    for name in ["iris_strings", "iris_zipmap", "iris_double"] {
        let (rows, worst) = agreement(name, "iris.csv");
        assert_eq!(rows, 150);
        let bound = if name == "iris_double" { 1e-12 } else { 1e-6 };
        assert!(worst <= bound, "{name}: {worst}");
        assert_eq!(load(name).classes(), Some(iris.as_slice()), "{name}");
    }
    assert!(
        load("iris_zipmap")
            .signature
            .contains("seq(map(String, Float32))"),
        "{}",
        load("iris_zipmap").signature
    );
}

fn refusal(bytes: &[u8]) -> String {
    runtime();
    OnnxModel::from_bytes(bytes).unwrap_err().to_string()
}

#[test]
fn a_classifier_graph_without_a_class_list_is_refused_and_metadata_classes_names_them() {
    let bytes = fixture("no_classes.onnx");
    let text = refusal(&bytes);
    for says in ["no class list", "classlabels_", "metadata_props `classes`"] {
        assert!(text.contains(says), "{says}: {text}");
    }

    // ArgMax answers 0, 1 or 2: metadata names those classes.
    let named = model::stamp::stamp(&bytes, &[("classes", "[0, 1, 2]")]).unwrap();
    let model = OnnxModel::from_bytes(&named).unwrap();
    assert_eq!(
        model.classes(),
        Some(&[0, 1, 2].map(ClassLabel::Integer)[..])
    );
    let (_, features, n_rows) = data("iris.csv");
    for answer in model.classify_rows(&features, n_rows).unwrap() {
        let (label, probabilities) = answer.unwrap();
        assert!(probabilities.of(&label.key()).is_some());
    }

    for (classes, says) in [
        (r#"["a", "b", "c"]"#, "labels are integers"),
        ("[0, 1]", "3 columns but metadata classes names 2"),
        ("[0, 0, 1]", "names class 0 twice"),
        ("[]", "names no class"),
        ("[0.5, 1, 2]", "not a JSON array of integers and strings"),
        ("{\"0\": 1}", "not a JSON array"),
    ] {
        let stamped = model::stamp::stamp(&bytes, &[("classes", classes)]).unwrap();
        let text = refusal(&stamped);
        assert!(text.contains(says), "{classes}: {text}");
    }
}

/// Metadata `classes` is taken over the graph's own list: a wrong one is caught by the probe.
#[test]
fn metadata_classes_override_the_graph_and_are_probed() {
    let bytes = fixture("iris_strings.onnx");
    let renamed = model::stamp::stamp(&bytes, &[("classes", r#"["a", "b", "c"]"#)]).unwrap();
    let text = refusal(&renamed);
    assert!(
        text.contains("probe row") && text.contains("not among them"),
        "{text}"
    );
}

#[test]
fn each_kind_refuses_the_other_kinds_question() {
    let classifier = load("breast_cancer_logreg");
    let (_, features, _) = data("breast_cancer.csv");
    let text = classifier
        .predict_rows(&features[..30], 1)
        .unwrap_err()
        .to_string();
    assert!(text.contains("classifier"), "{text}");

    let regression = load("linear");
    assert_eq!(regression.task(), Task::Regression);
    assert_eq!(regression.classes(), None);
    let text = regression
        .classify_rows(&[0.0; 10], 1)
        .unwrap_err()
        .to_string();
    assert!(text.contains("regression"), "{text}");
}

/// An input far out of float32's range makes the float graph answer NaN: that row's own error,
/// not the model's.
#[test]
fn a_row_whose_probabilities_are_not_a_distribution_is_that_rows_error() {
    let model = load("breast_cancer_logreg");
    let (_, features, _) = data("breast_cancer.csv");
    let mut rows = features[..60].to_vec();
    for value in &mut rows[30..] {
        *value = 1e39;
    }
    let answers = model.classify_rows(&rows, 2).unwrap();
    assert!(answers[0].is_ok());
    let err = answers[1].as_ref().unwrap_err();
    assert_eq!(err.reason(), "bad_probabilities", "{err}");
}

/// A classifier loads through the served model (its names, version and target come from its
/// metadata as a regression graph's do).
#[test]
fn a_classifier_loads_as_a_served_model() {
    runtime();
    let served = ServedModel::parse(&fixture("iris_strings.onnx")).unwrap();
    assert_eq!(served.version, "iris_strings-1");
    assert_eq!(served.target_name.as_deref(), Some("target"));
    assert_eq!(served.n_features(), 4);
    let Engine::Onnx(graph) = &served.engine else {
        panic!("not an ONNX engine")
    };
    assert_eq!(graph.task(), Task::Classification);
}

/// `model inspect` accepts a classifier (it prints the task and classes) and leaves `--data`
/// unscored rather than failing on string labels.
#[test]
fn inspect_accepts_a_classifier_with_or_without_data() {
    runtime();
    let path = fixtures().join("iris_zipmap.onnx");
    model::inspect(&path, None, None).unwrap();
    model::inspect(&path, Some(&fixtures().join("iris.csv")), None).unwrap();
}
