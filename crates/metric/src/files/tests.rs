//! Tests of the log files: appends, rotation, half-line repair, tails and positions.

use super::*;

const NO_ROTATION: Rotation = Rotation {
    max_bytes: 0,
    keep: 1,
};

#[test]
fn half_lines_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.txt");
    std::fs::write(&path, "one\ntwo\nthr").unwrap();
    assert_eq!(repair_tail(&path).unwrap(), 3);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    assert_eq!(repair_tail(&path).unwrap(), 0);
    std::fs::write(&path, "no newline at all").unwrap();
    assert_eq!(repair_tail(&path).unwrap(), 17);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    assert_eq!(repair_tail(&dir.path().join("missing")).unwrap(), 0);
}

#[test]
fn lines_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = LogFiles::open(dir.path(), NO_ROTATION).unwrap();
    files.push_label(LabelKind::YTrue, Some("a"), &Value::from(151.0), None, None);
    files.push_label(
        LabelKind::YPred,
        Some("a"),
        &Value::from(0.1 + 0.2),
        Some("ols-1"),
        None,
    );
    files.push_label(LabelKind::YPred, None, &Value::from(3.5), None, None);
    files.push_label(
        LabelKind::YTrue,
        Some("b"),
        &Value::from(2.0),
        None,
        Some("ab12:7"),
    );
    files.push_label(
        LabelKind::YPred,
        Some("b"),
        &Value::from(2.5),
        Some("v2"),
        Some("ab12:7"),
    );
    files.push_row(&Pair {
        id: "a".into(),
        y_true: 151.0,
        y_pred: 0.1 + 0.2,
        model_version: Some("ols-1".into()),
        sent_at_us: None,
    });
    files.flush().unwrap();
    let mut lines = Vec::new();
    read_label_lines(&dir.path().join(LABELS_LOG), |l| lines.push(l)).unwrap();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[1].value, Value::Number(0.1 + 0.2));
    assert_eq!(lines[1].model_version.as_deref(), Some("ols-1"));
    assert_eq!(lines[2].id, None);
    assert_eq!(
        (lines[1].audit.as_deref(), lines[2].audit.as_deref()),
        (None, None)
    );
    // The audit tag is the last field, after the model version if any.
    assert_eq!(
        (lines[3].model_version.as_deref(), lines[3].audit.as_deref()),
        (None, Some("ab12:7"))
    );
    assert_eq!(
        (lines[4].model_version.as_deref(), lines[4].audit.as_deref()),
        (Some("v2"), Some("ab12:7"))
    );
    let text = std::fs::read_to_string(dir.path().join(LABELS_LOG)).unwrap();
    assert!(
        text.lines()
            .nth(4)
            .unwrap()
            .ends_with(" b 2.5 v2 audit=ab12:7"),
        "{text}"
    );
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .ends_with(" a 0.30000000000000004 ols-1"),
        "{text}"
    );
    let mut rows = Vec::new();
    let read = read_csv_rows(&dir.path().join(METRIC_CSV), |p| rows.push(p)).unwrap();
    assert_eq!(
        read,
        CsvRead {
            rows: 1,
            bad_rows: 0
        }
    );
    assert_eq!(rows[0].y_pred, 0.1 + 0.2);
    let csv = std::fs::read_to_string(dir.path().join(METRIC_CSV)).unwrap();
    assert!(csv.starts_with(CSV_HEADER));
}

#[test]
fn second_lock_fails() {
    let dir = tempfile::tempdir().unwrap();
    let _first = lock_dir(dir.path()).unwrap();
    let err = lock_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("another metric service"), "{err}");
}

#[test]
fn bad_csv_rows_are_counted_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRIC_CSV);
    std::fs::write(
        &path,
        format!("{CSV_HEADER}\na,1,2,1,v1\nb,1\nc,x,2,1,\nd,1,2,1\ne f,1,2,1,\ng,1,2,1,v,extra\n"),
    )
    .unwrap();
    let mut ids = Vec::new();
    let read = read_csv_rows(&path, |p| ids.push(p.id)).unwrap();
    assert_eq!(ids, ["a", "d"]);
    assert_eq!(
        read,
        CsvRead {
            rows: 2,
            bad_rows: 4
        }
    );
}

#[test]
fn rows_written_with_the_csv_crate_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = LogFiles::open(dir.path(), NO_ROTATION).unwrap();
    let pairs: Vec<Pair> = (0..50)
        .map(|i| Pair {
            id: format!("id-{i}"),
            y_true: f64::from(i) * 1.1,
            y_pred: 1.0 / f64::from(i + 3),
            model_version: (i % 2 == 0).then(|| format!("v{i}")),
            sent_at_us: None,
        })
        .collect();
    for pair in &pairs {
        files.push_row(pair);
    }
    files.flush().unwrap();
    let text = std::fs::read_to_string(dir.path().join(METRIC_CSV)).unwrap();
    assert!(
        text.contains("\nid-1,1.1,0.25,0.8500000000000001,\n"),
        "{text}"
    );
    let mut back = Vec::new();
    read_csv_rows(&dir.path().join(METRIC_CSV), |p| back.push(p)).unwrap();
    assert_eq!(back, pairs);
}

#[test]
fn rotation_keeps_n_files_and_the_tail_reads_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let rotation = Rotation {
        max_bytes: 200,
        keep: 2,
    };
    let mut files = LogFiles::open(dir.path(), rotation).unwrap();
    for i in 0..40 {
        files.push_row(&Pair {
            id: format!("id{i:02}"),
            y_true: 1.0,
            y_pred: 2.0,
            model_version: None,
            sent_at_us: None,
        });
        files.flush().unwrap();
    }
    let csv = dir.path().join(METRIC_CSV);
    let chain = chain(&csv);
    assert_eq!(
        chain,
        [rotated_path(&csv, 2), rotated_path(&csv, 1), csv.clone()]
    );
    assert!(!rotated_path(&csv, 3).exists());
    for path in &chain {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with(CSV_HEADER), "{text}");
    }
    let mut all = Vec::new();
    read_csv_segments(
        &chain.iter().map(|p| (p.clone(), 0)).collect::<Vec<_>>(),
        |p| all.push(p.id().to_owned()),
    )
    .unwrap();
    assert_eq!(all.last().map(String::as_str), Some("id39"));
    // The last 15 rows span the current file and the one before.
    let segments = tail_segments(&chain, 15, true).unwrap();
    let mut tail = Vec::new();
    read_csv_segments(&segments, |p| tail.push(p.id().to_owned())).unwrap();
    assert_eq!(tail, all[all.len() - 15..]);
    // Asking for more than there is gives all there is.
    let segments = tail_segments(&chain, 1000, true).unwrap();
    let mut tail = Vec::new();
    read_csv_segments(&segments, |p| tail.push(p.id().to_owned())).unwrap();
    assert_eq!(tail, all);
    // A position in a rotated file is still found, with every newer file after it.
    let (_, pos) = files.positions().unwrap();
    let after = segments_after(&chain, &pos).unwrap().unwrap();
    assert_eq!(after, [(csv.clone(), pos.offset)]);
    files.push_row(&Pair {
        id: "late".into(),
        y_true: 1.0,
        y_pred: 1.0,
        model_version: None,
        sent_at_us: None,
    });
    files.flush().unwrap();
    let mut late = Vec::new();
    read_csv_segments(&after, |p| late.push(p.id().to_owned())).unwrap();
    assert_eq!(late, ["late"]);
}

#[test]
fn a_foreign_csv_is_moved_aside_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(METRIC_CSV), "id,score\na,1\n").unwrap();
    move_foreign_csv_aside(dir.path()).unwrap();
    assert!(!dir.path().join(METRIC_CSV).exists());
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".old"))
        .count();
    assert_eq!(aside, 1);
}
