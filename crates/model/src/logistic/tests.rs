//! Unit tests of the logistic regression and its artifact.

use super::*;
use std::io::Write as _;
use std::path::PathBuf;

fn csv_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// Three string classes, each apart from the others along one of two features.
fn separable() -> tempfile::NamedTempFile {
    let mut text = String::from("a,b,kind\n");
    for i in 0..10 {
        let jitter = f64::from(i) * 0.05;
        text += &format!("{},{},low\n", -3.0 + jitter, jitter);
        text += &format!("{},{},high\n", 3.0 + jitter, jitter);
        text += &format!("{},{},up\n", jitter, 4.0 + jitter);
    }
    csv_file(&text)
}

fn classes(path: &Path) -> Dataset {
    Dataset::from_csv_for(path, None, Task::Classification).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/models/fixtures")
        .join(name)
}

#[test]
fn a_separable_set_is_learned_exactly() {
    let file = separable();
    let data = classes(file.path());
    let model = LogisticModel::fit(&data).unwrap();
    assert_eq!(
        model.classes,
        ["high", "low", "up"].map(|c| ClassLabel::Text(c.into()))
    );
    let fit = model.evaluate(&data).unwrap();
    assert_eq!(fit.accuracy, 1.0);
    assert_eq!(fit.rows, 30);
    assert!(fit.log_loss.is_finite() && fit.log_loss < 0.2, "{fit:?}");
    assert!(model.version.starts_with("logreg-"), "{}", model.version);
    let (label, p) = model.classify(&[0.1, 4.2]).unwrap();
    assert_eq!(label, ClassLabel::Text("up".into()));
    assert!(p.of("up").unwrap() > 0.5, "{p:?}");
    // The reference's in-sample error is the log loss.
    assert_eq!(model.reference.as_ref().unwrap().mae, fit.log_loss);
    // The same data gives the same model, and so the same version.
    assert_eq!(LogisticModel::fit(&data).unwrap().version, model.version);
}

#[test]
fn two_integer_classes_are_fitted_as_two_softmax_rows() {
    let file = csv_file("x,y\n-2,0\n-1,0\n-0.5,0\n0.5,1\n1,1\n2,1\n");
    let model = LogisticModel::fit(&classes(file.path())).unwrap();
    assert_eq!(
        model.classes,
        [ClassLabel::Integer(0), ClassLabel::Integer(1)]
    );
    assert_eq!(model.coefficients.len(), 2);
    let (label, p) = model.classify(&[3.0]).unwrap();
    assert_eq!(label, ClassLabel::Integer(1));
    assert!(p.of("1").unwrap() > 0.9, "{p:?}");
    assert_eq!(model.classify(&[-3.0]).unwrap().0, ClassLabel::Integer(0));
}

#[test]
fn probabilities_are_a_distribution_and_a_tie_goes_to_the_first_class() {
    let model = LogisticModel {
        feature_names: vec!["a".into(), "b".into()],
        classes: vec![
            ClassLabel::Integer(7),
            ClassLabel::Text("x".into()),
            ClassLabel::Integer(2),
        ],
        coefficients: vec![vec![1.0, -2.0], vec![0.5, 3.0], vec![-1.0, 0.0]],
        intercepts: vec![0.0, -1.0, 2.0],
        version: "t".into(),
        reference: None,
    };
    model.validate().unwrap();
    for x in [[0.0, 0.0], [10.0, -4.0], [-700.0, 800.0], [1e6, 1e6]] {
        let p = model.probabilities(&x).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|p| (0.0..=1.0).contains(p)), "{p:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{p:?}");
        let (_, checked) = model.classify(&x).unwrap();
        let keys: Vec<&str> = checked.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["7", "x", "2"]);
    }
    // Scores 0, -1 + 0.5 + 3 = 2.5, 2 - 1 = 1 at (1, 1): "x" wins.
    assert_eq!(
        model.classify(&[1.0, 1.0]).unwrap().0,
        ClassLabel::Text("x".into())
    );
    let mut tie = model.clone();
    tie.coefficients = vec![vec![0.0, 0.0]; 3];
    tie.intercepts = vec![1.0, 1.0, 0.0];
    let (label, p) = tie.classify(&[5.0, 5.0]).unwrap();
    assert_eq!(label, ClassLabel::Integer(7));
    assert_eq!(p.of("7"), p.of("x"));
    // Wrong length and a score overflowing are the message's problem.
    assert!(matches!(
        model.classify(&[1.0]),
        Err(MessageError::WrongLength {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        model.classify(&[f64::MAX, f64::MAX]),
        Err(MessageError::NonFinite(_))
    ));
}

#[test]
fn artifacts_round_trip_with_labels_as_the_data_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.json");
    let artifact = LogisticArtifact::train(&fixture("iris.csv"), None, Some("v1".into())).unwrap();
    artifact.write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(is_logistic_json(&text));
    let back = LogisticArtifact::parse(&text).unwrap();
    assert_eq!(back, artifact);
    assert_eq!(
        back.model().reference.as_deref(),
        artifact.reference.as_ref()
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["format"], FORMAT);
    assert_eq!(
        json["classes"],
        serde_json::json!(["setosa", "versicolor", "virginica"])
    );
    assert_eq!(json["coefficients"].as_array().unwrap().len(), 3);
    assert_eq!(json["coefficients"][0].as_array().unwrap().len(), 4);
    assert_eq!(json["metrics"]["rows"], 150);
    assert_eq!(json["training_data_sha256"].as_str().unwrap().len(), 64);
    // Integer labels stay JSON integers.
    let file = csv_file("x,y\n-2,0\n-1,0\n1,1\n2,1\n");
    let integers = LogisticArtifact::train(file.path(), None, None).unwrap();
    let json = serde_json::to_value(&integers).unwrap();
    assert_eq!(json["classes"], serde_json::json!([0, 1]));
    assert_eq!(
        LogisticArtifact::parse(&json.to_string()).unwrap().classes,
        [ClassLabel::Integer(0), ClassLabel::Integer(1)]
    );
}

#[test]
fn bad_artifacts_are_refused_with_a_clear_message() {
    let file = separable();
    let good = serde_json::to_value(
        LogisticArtifact::fit(&classes(file.path()), "0".repeat(64), Some("v1".into())).unwrap(),
    )
    .unwrap();
    assert!(LogisticArtifact::parse(&good.to_string()).is_ok());
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut bad = good.clone();
        edit(&mut bad);
        format!(
            "{:#}",
            LogisticArtifact::parse(&bad.to_string()).unwrap_err()
        )
    };
    let err = refused(&|a| {
        a["coefficients"].as_array_mut().unwrap().pop();
    });
    assert!(
        err.contains("3 classes but 2 rows of coefficients"),
        "{err}"
    );
    let err = refused(&|a| {
        a["classes"].as_array_mut().unwrap().push("extra".into());
    });
    assert!(
        err.contains("4 classes but 3 rows of coefficients"),
        "{err}"
    );
    let err = refused(&|a| a["intercepts"] = serde_json::json!([0.0]));
    assert!(err.contains("3 classes but 1 intercepts"), "{err}");
    // JSON has no NaN or infinity: an overflowing literal is refused as it is read, and a
    // model built in memory with one is refused by validate.
    let overflow = good
        .to_string()
        .replacen(&good["coefficients"][1][0].to_string(), "1e999", 1);
    let err = format!("{:#}", LogisticArtifact::parse(&overflow).unwrap_err());
    assert!(err.contains("not a logistic model artifact"), "{err}");
    let mut infinite = LogisticArtifact::parse(&good.to_string()).unwrap().model();
    infinite.coefficients[1][0] = f64::INFINITY;
    let err = infinite.validate().unwrap_err().to_string();
    assert!(err.contains("must be finite numbers"), "{err}");
    infinite.coefficients[1][0] = 0.0;
    infinite.intercepts[2] = f64::NAN;
    assert!(infinite.validate().is_err());
    let err = refused(&|a| a["classes"] = serde_json::json!(["low", "high", "low"]));
    assert!(err.contains("class \"low\" appears twice"), "{err}");
    // The integer 1 and the string "1" are one class to the pipeline.
    let err = refused(&|a| a["classes"] = serde_json::json!([1, "1", 2]));
    assert!(err.contains("class \"1\" appears twice"), "{err}");
    let err = refused(&|a| a["coefficients"][2] = serde_json::json!([1.0]));
    assert!(err.contains("are 1, for 2 feature names"), "{err}");
    let err = refused(&|a| a["format"] = "ml-pipeline/linear-model/1".into());
    assert!(
        err.contains("expected \"ml-pipeline/logistic-model/1\""),
        "{err}"
    );
    let err = refused(&|a| a["version"] = "a b".into());
    assert!(err.contains("version \"a b\""), "{err}");
    let err = refused(&|a| a["classes"] = serde_json::json!([1.5, 2, 3]));
    assert!(err.contains("not a logistic model artifact"), "{err}");
    let err = refused(&|a| {
        a["classes"] = serde_json::json!(["only"]);
        a["coefficients"] = serde_json::json!([[1.0, 2.0]]);
        a["intercepts"] = serde_json::json!([0.0]);
    });
    assert!(err.contains("needs at least 2"), "{err}");
}

#[test]
fn one_class_or_regression_data_cannot_be_fitted() {
    let file = csv_file("x,y\n1,a\n2,a\n");
    let err = LogisticModel::fit(&classes(file.path())).unwrap_err();
    assert!(err.to_string().contains("holds 1 class(es)"), "{err}");
    let numbers = Dataset::from_csv(file.path(), Some("x")).unwrap_err();
    assert!(numbers.to_string().contains("not a finite number"));
    let regression = csv_file("x,y\n1,2\n2,3\n");
    let data = Dataset::from_csv(regression.path(), None).unwrap();
    let err = LogisticModel::fit(&data).unwrap_err();
    assert!(err.to_string().contains("no class labels"), "{err}");
}

#[test]
fn evaluating_on_a_class_the_model_does_not_know_names_it() {
    let file = separable();
    let model = LogisticModel::fit(&classes(file.path())).unwrap();
    let other = csv_file("a,b,kind\n0,0,sideways\n");
    let err = model.evaluate(&classes(other.path())).unwrap_err();
    assert!(err.to_string().contains("class \"sideways\""), "{err}");
}

/// What the solver reaches on the two fixtures with and without standardisation (run with
/// `--ignored --nocapture` to see it): the reason `standardize` is on by default.
#[test]
#[ignore = "prints numbers for the choice of defaults"]
fn options_on_the_fixtures() {
    for name in ["breast_cancer.csv", "iris.csv"] {
        let data = classes(&fixture(name));
        for standardize in [true, false] {
            for max_iterations in [100, 1000] {
                let options = FitOptions {
                    standardize,
                    max_iterations,
                    ..FitOptions::default()
                };
                let started = std::time::Instant::now();
                match LogisticModel::fit_with(&data, options) {
                    Ok(model) => {
                        let fit = model.evaluate(&data).unwrap();
                        println!(
                            "{name} standardize={standardize} max_iterations={max_iterations}: \
                             accuracy {:.4} log loss {:.4} ({:?})",
                            fit.accuracy,
                            fit.log_loss,
                            started.elapsed()
                        );
                    }
                    Err(err) => println!("{name} standardize={standardize}: {err}"),
                }
            }
        }
    }
}

#[test]
fn the_served_model_reads_the_format_and_answers_with_classes() {
    use crate::served::{Prediction, ServedModel};
    let artifact = LogisticArtifact::train(&fixture("iris.csv"), None, Some("v1".into())).unwrap();
    let served = ServedModel::parse(&artifact.to_bytes().unwrap()).unwrap();
    assert_eq!(
        (served.family(), served.task(), served.version.as_str()),
        ("logistic", Task::Classification, "v1")
    );
    assert_eq!(served.classes().map(<[_]>::len), Some(3));
    assert_eq!(served.target_name.as_deref(), Some("target"));
    assert_eq!(served.n_features(), 4);
    assert!(served.reference.is_some());
    let Ok(Prediction::Class(label, p)) = served.answer(&[5.1, 3.5, 1.4, 0.2]).unwrap() else {
        panic!("no class");
    };
    assert_eq!(label, ClassLabel::Text("setosa".into()));
    assert!(p.of("setosa").unwrap() > 0.9, "{p:?}");
    assert!(matches!(
        served.answer(&[1.0]).unwrap(),
        Err(MessageError::WrongLength { .. })
    ));
    // The regression paths refuse it, saying why.
    let err = served
        .predict(&[5.1, 3.5, 1.4, 0.2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("model v1 (logistic) is a classifier"), "{err}");
    let data = classes(&fixture("iris.csv"));
    assert!(served.predict_dataset(&data).is_err());
    let err = format!("{:#}", served.evaluate(&data).unwrap_err());
    assert!(err.contains("is a classifier"), "{err}");
    // A fit for the classification task is the same model.
    let fitted = ServedModel::fit_for(&data, Task::Classification).unwrap();
    assert_eq!(fitted.family(), "logistic");
    assert_eq!(fitted.version, LogisticModel::fit(&data).unwrap().version);
    assert_eq!(fitted.target_name.as_deref(), Some("target"));
}

#[test]
fn json_that_is_not_logistic_still_gets_the_linear_artifacts_messages() {
    use crate::served::ServedModel;
    let err = |text: &str| format!("{:#}", ServedModel::parse(text.as_bytes()).unwrap_err());
    assert!(err("{not json").contains("not a model artifact (JSON)"));
    let other = err(r#"{"format": "other"}"#);
    assert!(other.contains("not a model artifact (JSON)"), "{other}");
    let diabetes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
    let mut linear = serde_json::to_value(
        crate::artifact::Artifact::train(&diabetes, None, Some("v1".into())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ServedModel::parse(linear.to_string().as_bytes())
            .unwrap()
            .family(),
        "linear"
    );
    linear["format"] = "other".into();
    let wrong = err(&linear.to_string());
    assert!(
        wrong.contains("format is \"other\", expected \"ml-pipeline/linear-model/1\""),
        "{wrong}"
    );
    // A logistic artifact with a broken body is refused by the logistic parser.
    let mut logistic = serde_json::to_value(
        LogisticArtifact::train(&fixture("iris.csv"), None, Some("v1".into())).unwrap(),
    )
    .unwrap();
    logistic["intercepts"] = serde_json::json!([0.0]);
    let broken = err(&logistic.to_string());
    assert!(broken.contains("3 classes but 1 intercepts"), "{broken}");
}

/// The trainer's guard scores a classifier with `ServedModel::evaluate_classes` (what the
/// replicas answer): for the logistic regression that is its own in-sample evaluation.
#[test]
fn the_guards_evaluation_of_the_served_model_is_the_models_own() {
    use crate::served::ServedModel;
    for name in ["iris.csv", "breast_cancer.csv"] {
        let data = classes(&fixture(name));
        let served = ServedModel::fit_for(&data, Task::Classification).unwrap();
        let crate::served::Engine::Logistic(model) = &served.engine else {
            panic!("not logistic");
        };
        let own = model.evaluate(&data).unwrap();
        let guard = served.evaluate_classes(&data).unwrap();
        assert_eq!(
            (guard.rows, guard.accuracy),
            (own.rows, own.accuracy),
            "{name}"
        );
        assert!(
            (guard.log_loss - own.log_loss).abs() < 1e-12,
            "{name}: {guard:?} {own:?}"
        );
    }
}
