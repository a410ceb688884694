//! Disk full in `LOG_DIR` (issue 10, defect 4, the metric's side): a 2 MiB tmpfs over the metric's
//! log dir fills up mid-stream. The metric service must pause (no new deliveries taken, nothing
//! unwritten acked, no reconnect loop), then resume by itself when the filesystem is made larger:
//! every sample's row exactly once, and not one broken line in `labels_log.txt`.
//!
//! Disk full in `TRAIN_DIR` (issue 27, the trainer's side): the trainer's window fills a small
//! tmpfs, the trainer is SIGKILLed and started again on the full disk. It must wait (running,
//! `/healthz` 503 saying `TRAIN_DIR` is full, `/metrics` served) instead of exiting, and go on by
//! itself when space returns; `window.jsonl` never holds a line that does not parse.
//!
//! Needs root (to mount a tmpfs). Set `PIPELINE_SKIP_DISK_FULL_TEST=1` on a machine that cannot.

use crate::helpers::*;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(300);

/// A tmpfs mounted over a directory; lazily unmounted when dropped (the service may still hold
/// its files open).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {} (needs root; set PIPELINE_SKIP_DISK_FULL_TEST=1 to skip)",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot resize the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Whether `line` is one whole line of `labels_log.txt`: `time queue id value [model_version]
/// [audit=<tag>]`.
fn is_whole_label_line(line: &str) -> bool {
    let mut fields: Vec<&str> = line.split(' ').collect();
    if let Some(tag) = fields.last().and_then(|f| f.strip_prefix("audit=")) {
        if pipeline::audit::parse_tag(tag).is_none() {
            return false;
        }
        fields.pop();
    }
    (4..=5).contains(&fields.len())
        && fields[0].len() == 27
        && fields[0].ends_with('Z')
        && fields[0].matches('T').count() == 1
        && matches!(fields[1], "y_true" | "y_pred")
        && !fields[2].is_empty()
        && fields[3].parse::<f64>().is_ok()
        && (fields[1] == "y_pred") == (fields.len() == 5)
}

fn broken_label_lines(run: &Pipeline) -> Vec<String> {
    run.label_lines()
        .into_iter()
        .filter(|line| !is_whole_label_line(line))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_pauses_the_metric_and_every_row_is_written_once_when_space_returns() {
    if std::env::var("PIPELINE_SKIP_DISK_FULL_TEST").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: the disk-full test (PIPELINE_SKIP_DISK_FULL_TEST=1)");
        return;
    }
    const SAMPLES: usize = 30_000;
    let url = shared_amqp_url();
    let mut run = Pipeline::start_consumers("diskfull", Options::new(url.clone(), SAMPLES as u64));
    let dir = run.dir.path().to_owned();
    // Move the metric's LOG_DIR onto a small tmpfs.
    run.metric.signal("TERM");
    run.metric
        .wait_exit(Duration::from_secs(10))
        .expect("metric exits on SIGTERM");
    let disk = Tmpfs::mount(&run.log_dir(), "2m");
    run.metric.restart(&dir);
    wait_healthy(&run.metric, LONG);
    run.start_features();

    // The disk fills: the metric says so in /healthz and takes no more deliveries.
    let full = wait_until(LONG, || {
        run.metric.get("/healthz").map(|r| r.0) == Some(503)
    });
    assert!(
        full,
        "the metric never reported the full disk:\n{}",
        run.logs()
    );
    let rows_when_full = run.rows().len();
    assert!(rows_when_full < SAMPLES, "the disk did not fill");
    let consumed = || {
        let metrics = run.metric.metrics();
        ["y_true", "y_pred"]
            .map(|kind| {
                let queue = if kind == "y_true" {
                    &run.queues.y_true
                } else {
                    &run.queues.y_pred
                };
                metrics
                    .get(&format!(
                        "pipeline_messages_consumed_total{{queue=\"{queue}\"}}"
                    ))
                    .copied()
                    .unwrap_or(0.0)
            })
            .iter()
            .sum::<f64>()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = consumed();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        consumed(),
        before,
        "deliveries taken while the disk is full"
    );
    assert!(
        run.metric.is_running(),
        "the metric service exited:\n{}",
        run.metric.stderr()
    );
    assert_eq!(
        broken_label_lines(&run),
        Vec::<String>::new(),
        "broken lines while full"
    );

    // Space returns: it resumes by itself.
    disk.resize("64m");
    run.wait_rows(SAMPLES, LONG);
    let features = run.features.as_mut().expect("features");
    let status = features.wait_exit(LONG).expect("features exits");
    assert!(status.success(), "features exit status {status}");
    std::thread::sleep(Duration::from_secs(1));
    assert_exactly_once(&run.rows(), SAMPLES);
    assert_eq!(
        broken_label_lines(&run),
        Vec::<String>::new(),
        "broken lines"
    );
    assert!(run.label_lines().len() >= 2 * SAMPLES);
    wait_healthy(&run.metric, Duration::from_secs(30));
    eprintln!(
        "disk full at {rows_when_full} rows; {} rows, {} log lines, 0 broken after remount",
        run.rows().len(),
        run.label_lines().len()
    );
    assert_queues_empty(&url, &run.queues).await;
    run.stop_services();
    delete_queues(&url, &run.queues).await;
}

/// Fills the filesystem of `dir` with a file of its own until no byte fits.
fn fill(dir: &Path) {
    let mut file = std::fs::File::create(dir.join("filler")).expect("filler file");
    let block = [0u8; 4096];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::StorageFull => break,
            Err(err) => panic!("cannot fill {}: {err}", dir.display()),
        }
    }
}

/// The lines of `window.jsonl` that are not one whole record (`{"id", "x"}`, `{"id", "y"}` or
/// both), and whether the file ends with a line cut short.
fn broken_window_lines(train_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(train_dir.join("window.jsonl")).expect("window.jsonl");
    let mut broken: Vec<String> = text
        .lines()
        .filter(|line| {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                return true;
            };
            !(record["id"].is_string() && (record["x"].is_array() || record["y"].is_number()))
        })
        .map(str::to_owned)
        .collect();
    if !text.is_empty() && !text.ends_with('\n') {
        broken.push(format!(
            "(no newline at the end: {:?})",
            text.lines().last()
        ));
    }
    broken
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trainer_killed_on_a_full_disk_waits_at_start_up_and_goes_on_when_space_returns() {
    if std::env::var("PIPELINE_SKIP_DISK_FULL_TEST").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: the disk-full test (PIPELINE_SKIP_DISK_FULL_TEST=1)");
        return;
    }
    // About 260 bytes of journal per sample: 256 KiB fill up after about a thousand.
    const ROWS: usize = 1500;
    let url = shared_amqp_url();
    let queues = Queues::unique("trainerdiskfull");
    let work = tempfile::tempdir().unwrap();
    let train_dir = work.path().join("train");
    let disk = Tmpfs::mount(&train_dir, "256k");
    let mut env = queues.env();
    env.extend([
        ("AMQP_URL".to_owned(), url.clone()),
        ("RECONNECT_MAX_DELAY_MS".to_owned(), "1000".to_owned()),
        (
            "MODEL_PATH".to_owned(),
            work.path().join("model.json").display().to_string(),
        ),
        ("TRAIN_DIR".to_owned(), train_dir.display().to_string()),
        ("TRAIN_WINDOW".to_owned(), "2000".to_owned()),
        ("RETRAIN_EVERY".to_owned(), "0".to_owned()),
    ]);
    let mut trainer = spawn_service("trainer", env, work.path());
    wait_healthy(&trainer, LONG);
    let window = |trainer: &Service| {
        trainer
            .metrics()
            .get("pipeline_trainer_window_samples")
            .copied()
    };

    // The disk fills while the window grows: consuming pauses, nothing half written.
    publish_rows(&url, &queues, ROWS).await;
    let paused = wait_until(LONG, || {
        trainer.get("/healthz").is_some_and(|(status, body)| {
            status == 503 && body.contains("window.jsonl") && body.contains("consuming paused")
        })
    });
    assert!(
        paused,
        "the trainer never reported the full disk: {:?}\n{}",
        trainer.get("/healthz"),
        trainer.stderr()
    );
    let before_kill = window(&trainer).unwrap_or(0.0);
    assert!(before_kill < ROWS as f64, "the disk did not fill");
    assert_eq!(broken_window_lines(&train_dir), Vec::<String>::new());

    // Killed, and started again on a disk with no byte left.
    trainer.signal("KILL");
    trainer
        .wait_exit(Duration::from_secs(10))
        .expect("trainer exits on SIGKILL");
    fill(&train_dir);
    trainer.restart(work.path());
    let note = |body: &str| body.contains("TRAIN_DIR") && body.contains("is full");
    let waiting = wait_until(LONG, || {
        trainer
            .get("/healthz")
            .is_some_and(|(status, body)| status == 503 && note(&body))
    });
    assert!(
        waiting,
        "no /healthz note about the full TRAIN_DIR: {:?}\n{}",
        trainer.get("/healthz"),
        trainer.stderr()
    );
    // It keeps waiting (the backoff retries for several rounds meanwhile), serving /metrics.
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        trainer.is_running(),
        "the trainer exited on the full disk:\n{}",
        trainer.stderr()
    );
    let (status, body) = trainer
        .get("/healthz")
        .expect("/healthz answers while waiting");
    assert!(status == 503 && note(&body), "{status}: {body}");
    eprintln!("trainer on a full TRAIN_DIR: /healthz {status}: {body:?}");
    assert_eq!(window(&trainer), Some(0.0), "/metrics while waiting");
    let warnings: Vec<String> = trainer
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("TRAIN_DIR is full"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "one WARN per wait: {warnings:#?}");

    // Space returns: the window opens, the trainer consumes the rest by itself.
    disk.resize("64m");
    wait_healthy(&trainer, LONG);
    let (_, body) = trainer.get("/healthz").expect("/healthz");
    assert!(!note(&body), "{body}");
    assert!(
        wait_until(LONG, || window(&trainer) == Some(ROWS as f64)),
        "the window did not grow to {ROWS}: {:?}\n{}",
        window(&trainer),
        trainer.stderr()
    );
    let depths = queue_depths(
        &url,
        &[
            training_queue(&queues.features),
            training_queue(&queues.y_true),
        ],
    )
    .await;
    assert!(depths.values().all(|d| *d == 0), "{depths:?}");
    assert!(trainer.is_running(), "{}", trainer.stderr());
    assert_eq!(broken_window_lines(&train_dir), Vec::<String>::new());
    eprintln!(
        "trainer disk full: {before_kill} samples in the window when full, {ROWS} after space returned"
    );
    drop(trainer);
    drop(disk);
    delete_queues(&url, &queues).await;
}
