//! Tests of recovery: restarts from the checkpoint or the whole files, crashes between flushes and
//! checkpoints, and a property test over any run of deliveries, crashes and restarts.

use super::*;
use crate::handler::KINDS;
use crate::handler::testing::{config, recover};
use crate::join;
use pipeline::messages::{LabelKind, LabelMessage};
use std::io::Write as _;
use std::path::Path;

/// Appends `ids` as a history: both log lines of each, and its row when `row` says so.
fn append_history(dir: &Path, ids: impl Iterator<Item = String>, row: impl Fn(usize) -> bool) {
    let mut labels = String::new();
    let mut csv = String::new();
    if !dir.join(files::METRIC_CSV).exists() {
        csv.push_str(files::CSV_HEADER);
        csv.push('\n');
    }
    for (n, id) in ids.enumerate() {
        labels.push_str(&format!("2026-11-26T00:00:00.000000Z y_true {id} 100\n"));
        labels.push_str(&format!(
            "2026-11-26T00:00:00.000001Z y_pred {id} 90.5 v1\n"
        ));
        if row(n) {
            csv.push_str(&format!("{id},100,90.5,9.5,v1\n"));
        }
    }
    for (name, text) in [(files::LABELS_LOG, labels), (files::METRIC_CSV, csv)] {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }
}

fn csv_ids(dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    let chain = files::chain(&dir.join(files::METRIC_CSV));
    let segments: Vec<_> = chain.into_iter().map(|p| (p, 0)).collect();
    files::read_csv_segments(&segments, |pair| ids.push(pair.id().to_owned())).unwrap();
    ids
}

fn assert_once(ids: &[String], n: usize) {
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (n, n), "rows, distinct ids");
}

#[test]
fn a_history_longer_than_dedup_capacity_is_never_joined_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["--dedup-capacity", "100"]);
    append_history(dir.path(), (0..3000).map(|i| format!("a{i}")), |_| true);
    // Files of an older version (no checkpoint): one whole read, then a checkpoint.
    drop(recover(&config));
    assert_once(&csv_ids(dir.path()), 3000);
    assert!(dir.path().join(checkpoint::CHECKPOINT).exists());
    // Restarts from the checkpoint.
    for _ in 0..2 {
        let recorder = recover(&config);
        assert_eq!(recorder.quality.all().n, 3000);
        drop(recorder);
        assert_once(&csv_ids(dir.path()), 3000);
    }
    // A crash after the checkpoint: 500 more pairs logged, the last 20 rows never written.
    append_history(dir.path(), (0..500).map(|i| format!("b{i}")), |n| n < 480);
    let recorder = recover(&config);
    assert_eq!(recorder.quality.all().n, 3500);
    drop(recorder);
    assert_once(&csv_ids(dir.path()), 3500);
    drop(recover(&config));
    assert_once(&csv_ids(dir.path()), 3500);
}

#[test]
fn orphans_dropped_before_a_checkpoint_do_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &["--join-max-age-secs", "1"]);
    let mut labels = String::new();
    for i in 0..200 {
        labels.push_str(&format!("2026-11-26T00:00:00.000000Z y_true orphan{i} 1\n"));
    }
    std::fs::write(dir.path().join(files::LABELS_LOG), labels).unwrap();
    let mut recorder = recover(&config);
    assert_eq!(recorder.joiner.waiting(), 200);
    // Predictions (without ids) arrive for 5 s and nothing pairs: the orphans are old.
    let start = Instant::now();
    for s in 0..=5 {
        let at = start + Duration::from_secs(s);
        recorder.joiner.note_activity(LabelKind::YPred, at);
    }
    let dropped = recorder.joiner.evict();
    assert_eq!(dropped.len(), 200);
    recorder.checkpoints.changed = true;
    recorder.finish();
    drop(recorder);
    let recorder = recover(&config);
    assert_eq!(recorder.joiner.waiting(), 0);
}

#[test]
fn waiting_ids_come_back_from_the_checkpoint_and_pair() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &[]);
    std::fs::write(
        dir.path().join(files::LABELS_LOG),
        "2026-11-26T00:00:00.000000Z y_true w1 10\n",
    )
    .unwrap();
    // Whole read, checkpoint with w1 waiting; then a restart from the checkpoint.
    drop(recover(&config));
    let recorder = recover(&config);
    assert_eq!(recorder.joiner.waiting(), 1);
    drop(recorder);
    // Its prediction was logged after the checkpoint, the row not written (a crash).
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(files::LABELS_LOG))
        .unwrap();
    writeln!(file, "2026-11-26T00:00:01.000000Z y_pred w1 7 v2").unwrap();
    let recorder = recover(&config);
    assert_eq!(recorder.joiner.waiting(), 0);
    drop(recorder);
    let csv = std::fs::read_to_string(dir.path().join(files::METRIC_CSV)).unwrap();
    assert!(csv.ends_with("\nw1,10,7,3,v2\n"), "{csv}");
}

#[test]
fn a_foreign_csv_does_not_seed_the_joined_ids() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(files::METRIC_CSV),
        "sample,truth,guess,err\nx1,100,90.5,9.5\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join(files::LABELS_LOG),
        "2026-11-26T00:00:00.000000Z y_true x1 100\n2026-11-26T00:00:00.000001Z y_pred x1 90.5 v1\n",
    )
    .unwrap();
    drop(recover(&config(dir.path(), &[])));
    assert_eq!(csv_ids(dir.path()), ["x1"]);
}

#[test]
fn recovery_reads_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[
            "--dedup-capacity",
            "50",
            "--log-max-bytes",
            "1000",
            "--log-keep-files",
            "100",
        ],
    );
    drop(recover(&config));
    for round in 0..5 {
        let mut recorder = recover(&config);
        for i in 0..100 {
            let pair = join::Pair {
                id: format!("r{round}-{i}"),
                y_true: 1.0,
                y_pred: 2.0,
                model_version: None,
                sent_at_us: None,
            };
            recorder
                .files
                .push_label(LabelKind::YTrue, Some(&pair.id), &1.0.into(), None, None);
            recorder
                .files
                .push_label(LabelKind::YPred, Some(&pair.id), &2.0.into(), None, None);
            recorder.files.push_row(&pair);
            recorder.joiner.mark_joined(&pair.id, 1.0, 2.0, None);
            recorder.quality.observe(&pair);
            // Flushes rotate and checkpoint now and then; the last rows have none after them.
            let rotated = recorder.files.flush().unwrap();
            if rotated {
                recorder.save_checkpoint();
            }
        }
    }
    assert!(files::rotated_path(&dir.path().join(files::METRIC_CSV), 2).exists());
    let recorder = recover(&config);
    assert_eq!(recorder.quality.all().n, 500);
    drop(recorder);
    assert_once(&csv_ids(dir.path()), 500);
}

/// One step of a run of the metric service, for the property test below.
#[derive(Debug, Clone)]
enum Step {
    /// Deliver one of the messages not yet acked (picked by index).
    Deliver(usize),
    /// Deliver the last message again (a republish).
    Again,
    /// A prediction for a sample (one whose prediction came) from another model version,
    /// with another value.
    Repredict(usize),
    /// Both messages of the sample joined last, published again (a producer's republish).
    RepublishLast,
    /// Flush: what was delivered is written and acked.
    Flush,
    /// Write the checkpoint now (when nothing is pending).
    Checkpoint,
    /// SIGKILL: unflushed work is lost and comes again; restart.
    Crash,
    /// SIGTERM: finish, restart.
    Restart,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        8 => any::<usize>().prop_map(Step::Deliver),
        1 => Just(Step::Again),
        1 => any::<usize>().prop_map(Step::Repredict),
        1 => Just(Step::RepublishLast),
        3 => Just(Step::Flush),
        1 => Just(Step::Checkpoint),
        1 => Just(Step::Crash),
        1 => Just(Step::Restart),
    ]
}

fn message(kind: LabelKind, sample: usize, version: &str) -> LabelMessage {
    let value = match kind {
        LabelKind::YTrue => sample as f64,
        LabelKind::YPred => sample as f64 + if version == "v1" { 0.5 } else { 0.25 },
    };
    LabelMessage {
        id: Some(format!("s{sample}")),
        value: value.into(),
        probabilities: None,
        model_version: (kind == LabelKind::YPred).then(|| version.to_owned()),
        sent_at_us: None,
        audit: None,
    }
}

/// Runs `steps` on `samples` samples against a fresh LOG_DIR; returns the rows at the end.
fn simulate(samples: usize, steps: Vec<Step>) -> Vec<join::Pair> {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[
            "--dedup-capacity",
            "3",
            "--checkpoint-every",
            "1000000",
            "--checkpoint-interval-secs",
            "3600",
        ],
    );
    // Messages the broker still holds (not acked), and those delivered since the last flush.
    let mut pending: Vec<(LabelKind, usize)> = (0..samples)
        .flat_map(|s| [(LabelKind::YTrue, s), (LabelKind::YPred, s)])
        .collect();
    let mut unacked: Vec<(LabelKind, usize)> = Vec::new();
    let mut last: Option<(LabelKind, usize)> = None;
    // Which messages of each sample came, and the sample joined last (the newest row,
    // within DEDUP_CAPACITY however many restarts follow).
    let mut came = vec![[false; 2]; samples];
    let mut joined_last: Option<usize> = None;
    let mut recorder = recover(&config);
    for step in steps {
        match step {
            Step::Deliver(pick) if !pending.is_empty() => {
                let delivery = pending.remove(pick % pending.len());
                recorder
                    .accept(delivery.0, message(delivery.0, delivery.1, "v1"))
                    .unwrap();
                unacked.push(delivery);
                last = Some(delivery);
                let came = &mut came[delivery.1];
                came[delivery.0 as usize] = true;
                if came[0] && came[1] {
                    joined_last = Some(delivery.1);
                }
            }
            Step::Again => {
                if let Some((kind, sample)) = last {
                    recorder.accept(kind, message(kind, sample, "v1")).unwrap();
                }
            }
            Step::Repredict(pick) => {
                // A model swap re-predicts a sample whose prediction came already.
                let sample = pick % samples;
                if came[sample][1] {
                    recorder
                        .accept(LabelKind::YPred, message(LabelKind::YPred, sample, "v2"))
                        .unwrap();
                }
            }
            Step::RepublishLast => {
                if let Some(sample) = joined_last {
                    for kind in KINDS {
                        recorder.accept(kind, message(kind, sample, "v1")).unwrap();
                    }
                }
            }
            Step::Flush => {
                recorder.files.flush().unwrap();
                unacked.clear();
            }
            Step::Checkpoint => {
                recorder.save_checkpoint();
            }
            Step::Crash => {
                // A row lost with the unflushed work is written again later, not last.
                if unacked
                    .iter()
                    .any(|(_, sample)| Some(*sample) == joined_last)
                {
                    joined_last = None;
                }
                for (kind, sample) in &unacked {
                    came[*sample][*kind as usize] = false;
                }
                drop(recorder);
                pending.append(&mut unacked);
                last = None;
                recorder = recover(&config);
            }
            Step::Restart => {
                recorder.finish();
                unacked.clear();
                drop(recorder);
                recorder = recover(&config);
            }
            Step::Deliver(_) => {}
        }
    }
    for (kind, sample) in pending.drain(..) {
        recorder.accept(kind, message(kind, sample, "v1")).unwrap();
    }
    recorder.finish();
    drop(recorder);
    drop(recover(&config));
    let mut rows = Vec::new();
    let segments = vec![(dir.path().join(files::METRIC_CSV), 0)];
    files::read_csv_segments(&segments, |row| {
        if let files::Row::Numbers(pair) = row {
            rows.push(pair)
        }
    })
    .unwrap();
    rows
}

fn ids_of(rows: &[join::Pair]) -> Vec<String> {
    let mut ids: Vec<String> = rows.iter().map(|p| p.id.clone()).collect();
    ids.sort_unstable();
    ids
}

fn expected_ids(samples: usize) -> Vec<String> {
    let mut expected: Vec<String> = (0..samples).map(|s| format!("s{s}")).collect();
    expected.sort_unstable();
    expected
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever the order of deliveries, republishes, re-predictions, flushes, checkpoints,
    /// crashes and restarts, every sample ends up as exactly one row, with its own y_true.
    #[test]
    fn any_run_with_crashes_and_restarts_writes_each_sample_once(
        samples in 1usize..25,
        steps in proptest::collection::vec(step(), 0..120),
    ) {
        let rows = simulate(samples, steps);
        proptest::prop_assert_eq!(ids_of(&rows), expected_ids(samples));
        for pair in &rows {
            proptest::prop_assert_eq!(format!("s{}", pair.y_true), pair.id.clone());
        }
    }
}

/// Found by the property test: a republished sample logged (as a duplicate) after the
/// checkpoint, its row before it; three more rows, then a crash. The replay must still see
/// it as joined, though it is no longer among the last DEDUP_CAPACITY rows.
#[test]
fn a_duplicate_logged_after_the_checkpoint_is_not_joined_again_after_a_crash() {
    use Step::*;
    let steps = vec![
        Deliver(0),
        Deliver(41186847998319985),
        Deliver(13789255759644117416),
        Deliver(8721880138643292414),
        Deliver(16680692249433264387),
        Crash,
        Deliver(8940205582609144288),
        Deliver(17067134542868008289),
        Deliver(1727712315584282666),
        Flush,
        Checkpoint,
        RepublishLast,
        Deliver(12765435175874619921),
        Deliver(3016025102610222661),
        Deliver(12738439308273870913),
        Deliver(8145449790482368945),
        Deliver(361456095246578129),
        Deliver(10696554487814358987),
        Flush,
        Crash,
    ];
    let rows = simulate(7, steps);
    assert_eq!(ids_of(&rows), expected_ids(7));
}
