//! A classifier's state across restarts: totals from the checkpoint or rebuilt from the rows,
//! waiting predictions (with their probabilities) restored, a redelivered prediction not joined
//! again, and a crash that kept a pair's row from the CSV.

use crate::files;
use crate::handler::testing::{config, recover};
use pipeline::messages::{LabelKind, parse_label};
use std::path::Path;

fn body_true(i: usize) -> String {
    let label = ["benign", "malignant", "benign"][i % 3];
    format!(r#"{{"id":"s{i}","y_true":"{label}"}}"#)
}

fn body_pred(i: usize) -> String {
    let p = [0.9, 0.3, 0.55][i % 3];
    format!(
        r#"{{"id":"s{i}","y_pred":"{}","probabilities":{{"benign":{p},"malignant":{}}},"model_version":"v1"}}"#,
        if p >= 0.5 { "benign" } else { "malignant" },
        1.0 - p
    )
}

fn offer(recorder: &mut crate::handler::Recorder, kind: LabelKind, body: &str) {
    let message = parse_label(kind, body.as_bytes(), None).unwrap();
    recorder.accept(kind, message).unwrap();
}

fn rows(dir: &Path) -> Vec<files::Row> {
    let mut rows = Vec::new();
    files::read_csv_segments(&[(dir.join(files::METRIC_CSV), 0)], |row| rows.push(row)).unwrap();
    rows
}

#[test]
fn a_classifier_restarts_with_its_figures_its_waiting_predictions_and_no_second_row() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &["--task", "classification", "--quality-window", "5"],
    );
    let mut recorder = recover(&config);
    for i in 0..30 {
        offer(&mut recorder, LabelKind::YTrue, &body_true(i));
        offer(&mut recorder, LabelKind::YPred, &body_pred(i));
    }
    // A prediction waiting for its label when the service stops.
    offer(&mut recorder, LabelKind::YPred, &body_pred(30));
    let before = recorder.classes.as_ref().unwrap().totals();
    recorder.finish();
    drop(recorder);
    let header = std::fs::read_to_string(dir.path().join(files::METRIC_CSV)).unwrap();
    assert!(header.starts_with(files::CLASS_CSV_HEADER), "{header}");

    // From the checkpoint: the same totals; the redelivered prediction is a duplicate; the
    // waiting one pairs with its label and keeps its probabilities.
    let mut recorder = recover(&config);
    assert_eq!(recorder.classes.as_ref().unwrap().totals(), before);
    offer(&mut recorder, LabelKind::YPred, &body_pred(3));
    offer(&mut recorder, LabelKind::YTrue, &body_true(30));
    let after = recorder.classes.as_ref().unwrap().totals();
    assert_eq!(after.all.n, 31);
    recorder.finish();
    drop(recorder);
    let all = rows(dir.path());
    assert_eq!(all.len(), 31, "one row per id");
    let Some(files::Row::Classes(last)) = all.last() else {
        panic!("{all:?}")
    };
    assert_eq!((last.id.as_str(), last.p_true), ("s30", Some(0.9)));

    // Without the checkpoint: every figure rebuilt from the rows, as it was.
    std::fs::remove_file(dir.path().join(crate::checkpoint::CHECKPOINT)).unwrap();
    let recorder = recover(&config);
    let rebuilt = recorder.classes.as_ref().unwrap().totals();
    assert_eq!(rebuilt.all.n, after.all.n);
    assert_eq!(rebuilt.all.correct, after.all.correct);
    let close = |a: Option<f64>, b: Option<f64>| (a.unwrap() - b.unwrap()).abs() < 1e-12;
    assert!(close(rebuilt.all.log_loss(), after.all.log_loss()));
    assert!(close(rebuilt.all.brier(), after.all.brier()));
}

#[test]
fn a_pair_whose_row_a_crash_kept_from_the_csv_is_written_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["--task", "classification"]);
    drop(recover(&config));
    // Both log lines reached labels_log.txt, the row did not (no checkpoint covers them).
    let lines = "2026-12-07T00:00:00.000000Z y_true s1 \"Iris\\u0020setosa\"\n\
                 2026-12-07T00:00:00.000001Z y_pred s1 \"Iris\\u0020setosa\" p={\"Iris\\u0020setosa\":0.75,\"other\":0.25} v1\n";
    std::fs::write(dir.path().join(files::LABELS_LOG), lines).unwrap();
    std::fs::remove_file(dir.path().join(crate::checkpoint::CHECKPOINT)).ok();
    drop(recover(&config));
    let all = rows(dir.path());
    assert_eq!(all.len(), 1, "{all:?}");
    let files::Row::Classes(row) = &all[0] else {
        panic!("{all:?}")
    };
    assert_eq!(row.y_true.key(), "Iris setosa");
    assert_eq!(row.p_true, Some(0.75));
}
