//! `TOPOLOGY=course`: each of our services shares the queues with a service of the course's Python
//! version (`tests/course/course_peer.py`: pika, default-argument declares, bare JSON bodies, no
//! message id, `auto_ack=True`), in both start orders, and real data flows with the right values.
//! Without a Python peer, our three services under `course` still join every sample by the AMQP
//! `message_id`, and still dead-letter bad input themselves.

use crate::helpers::*;
use model::artifact::Artifact;
use model::regression::LinearModel;
use pipeline::dataset::Dataset;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Samples per scenario.
const N: usize = 100;
const WAIT: Duration = Duration::from_secs(60);

/// A process of the test (ours or the Python peer), killed when dropped.
struct Proc {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    http_addr: Option<SocketAddr>,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, dir: &Path, http_addr: Option<SocketAddr>) -> Self {
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let child = command
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("stdout file"))
            .stderr(File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
            http_addr,
        }
    }

    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {} stdout\n{}--- {} stderr\n{}",
            self.name,
            read(&self.stdout_path),
            self.name,
            read(&self.stderr_path)
        )
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.unwrap_or_else(|| {
            panic!(
                "{} still running after {timeout:?}\n{}",
                self.name,
                self.output()
            )
        })
    }

    fn wait_stdout(&self, text: &str) {
        let seen = wait_until(WAIT, || {
            std::fs::read_to_string(&self.stdout_path)
                .unwrap_or_default()
                .contains(text)
        });
        assert!(
            seen,
            "{} never printed {text:?}\n{}",
            self.name,
            self.output()
        );
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_addr?, path)
    }

    fn wait_healthy(&self) {
        let ok = wait_until(WAIT, || matches!(self.get("/healthz"), Some((200, _))));
        assert!(ok, "{} never healthy\n{}", self.name, self.output());
    }

    /// Under `course`, the service says which guarantees are off: WARN at start, note in /healthz.
    fn assert_course_warning(&self) {
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        assert!(
            stderr.lines().any(|l| l.contains("WARN")
                && l.contains("TOPOLOGY=course")
                && l.contains("do not survive a broker restart")),
            "{}: no WARN line about TOPOLOGY=course\n{stderr}",
            self.name
        );
        let (status, body) = self.get("/healthz").expect("/healthz answers");
        assert_eq!(status, 200, "{}: {body}", self.name);
        assert!(
            body.contains("note: TOPOLOGY=course")
                && body.contains("dead-lettered by this service"),
            "{}: /healthz has no topology note: {body}",
            self.name
        );
    }

    fn metric_value(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        Metrics::parse(&body).get(name).copied().unwrap_or(0.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scenario: its queues, folder, the data set and the model our model service fits.
struct Course {
    url: String,
    queues: Queues,
    dir: tempfile::TempDir,
    data: Dataset,
    fitted: LinearModel,
}

impl Course {
    fn new(test: &str) -> Self {
        let data = Dataset::from_csv(&data_path(), None).expect("data set");
        let fitted = LinearModel::fit(&data).expect("fit");
        Self {
            url: shared_amqp_url(),
            queues: Queues::unique(test),
            dir: tempfile::tempdir().expect("tempdir"),
            data,
            fitted,
        }
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// One of our services under `TOPOLOGY=course`.
    fn rust(&self, name: &str, extra: &[(&str, String)]) -> Proc {
        let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let env = Env::new(&self.url, &self.queues)
            .set("RUST_LOG", "info")
            .set("TOPOLOGY", "course")
            .set("RECONNECT_MAX_DELAY_MS", 1000)
            .set("LOG_DIR", self.log_dir().display())
            .set("HTTP_ADDR", http_addr)
            .with(extra.iter().cloned());
        let mut command = Command::new(bin_path(name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.pairs().iter().map(|(k, v)| (k, v)));
        Proc::spawn(name, command, self.dir.path(), Some(http_addr))
    }

    /// Our producer: `N` samples, rows 0..N in order, as fast as confirmed.
    fn rust_features(&self) -> Proc {
        self.rust(
            "features",
            &[
                ("COUNT", N.to_string()),
                ("RATE", "0".into()),
                ("ORDER", "sequential".into()),
            ],
        )
    }

    /// The course's Python service in `role`.
    fn python(&self, role: &str, args: &[String]) -> Proc {
        require_pika();
        let mut command = Command::new("python3");
        command
            .arg(repo_root().join("tests/course/course_peer.py"))
            .arg(role)
            .args(["--url", &self.url])
            .args(["--features-queue", &self.queues.features])
            .args(["--y-true-queue", &self.queues.y_true])
            .args(["--y-pred-queue", &self.queues.y_pred])
            .args(["--count", &N.to_string()])
            .args(["--timeout", "90"])
            .args(args);
        Proc::spawn(&format!("python-{role}"), command, self.dir.path(), None)
    }

    /// `(queue kind, id, value)` of each line of the metric service's labels_log.txt.
    fn label_lines(&self) -> Vec<(String, String, f64)> {
        let text =
            std::fs::read_to_string(self.log_dir().join("labels_log.txt")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                assert!(fields.len() >= 4, "bad log line {line:?}");
                let value = fields[3]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}"));
                (fields[1].to_owned(), fields[2].to_owned(), value)
            })
            .collect()
    }

    fn wait_label_lines(&self, n: usize, services: &[&Proc]) {
        let ok = wait_until(WAIT, || self.label_lines().len() >= n);
        assert!(
            ok,
            "{} log lines, expected {n}\n{}",
            self.label_lines().len(),
            outputs(services)
        );
    }

    fn target(&self, row: usize) -> f64 {
        self.data.target(row)
    }

    fn predicted(&self, model: &LinearModel, row: usize) -> f64 {
        model.predict(self.data.row(row)).expect("predict")
    }

    /// Stops the services first: a consumer whose queue is deleted reconnects and declares it again.
    async fn finish(self, services: Vec<Proc>) {
        drop(services);
        delete_queues(&self.url, &self.queues).await;
    }
}

fn data_path() -> PathBuf {
    repo_root().join("data/diabetes.csv")
}

fn outputs(services: &[&Proc]) -> String {
    services.iter().map(|s| s.output()).collect()
}

/// The Python peer needs pika (`scripts/test` installs it).
fn require_pika() {
    let ok = Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with pika is needed: run scripts/test, or `python3 -m pip install pika`"
    );
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

/// The course's features service with our model and metric service.
async fn python_features(python_first: bool) {
    let course = Course::new(if python_first {
        "course_pyfeat_first"
    } else {
        "course_pyfeat_second"
    });
    let data = data_path().display().to_string();
    let start_python = || course.python("features", &["--data".into(), data.clone()]);
    let (mut python, metric, model);
    if python_first {
        python = start_python();
        assert!(python.wait_exit(WAIT).success(), "{}", python.output());
        metric = course.rust("metric", &[]);
        model = course.rust("model", &[]);
    } else {
        metric = course.rust("metric", &[]);
        model = course.rust("model", &[]);
        metric.wait_healthy();
        model.wait_healthy();
        python = start_python();
        assert!(python.wait_exit(WAIT).success(), "{}", python.output());
    }
    course.wait_label_lines(2 * N, &[&python, &metric, &model]);
    let lines = course.label_lines();
    // Bare bodies without a message_id: logged with id `-`, in the order sent, never joined.
    let y_true: Vec<&(String, String, f64)> = lines.iter().filter(|l| l.0 == "y_true").collect();
    let y_pred: Vec<&(String, String, f64)> = lines.iter().filter(|l| l.0 == "y_pred").collect();
    assert_eq!((y_true.len(), y_pred.len()), (N, N), "{lines:?}");
    for row in 0..N {
        assert_eq!(y_true[row].1, "-");
        assert_eq!(y_true[row].2, course.target(row), "y_true of row {row}");
        assert_eq!(y_pred[row].1, "-");
        assert_eq!(
            y_pred[row].2,
            course.predicted(&course.fitted, row),
            "y_pred of row {row}"
        );
    }
    assert_eq!(
        metric.metric_value("pipeline_join_unpaired_total"),
        (2 * N) as f64
    );
    assert!(read_rows(&course.log_dir().join("metric_log.csv")).is_empty());
    metric.assert_course_warning();
    model.assert_course_warning();
    course.finish(vec![python, metric, model]).await;
}

/// The course's model service with our producer and metric service.
async fn python_model(python_first: bool) {
    let course = Course::new(if python_first {
        "course_pymodel_first"
    } else {
        "course_pymodel_second"
    });
    let artifact = Artifact::train(&data_path(), None, Some("course-py".into())).expect("train");
    let artifact_path = course.dir.path().join("model.json");
    artifact.write(&artifact_path).expect("write artifact");
    let python_model = artifact.model();
    let start_python = || {
        course.python(
            "model",
            &["--model".into(), artifact_path.display().to_string()],
        )
    };
    let (python, metric, mut features);
    if python_first {
        python = start_python();
        python.wait_stdout("consuming");
        metric = course.rust("metric", &[]);
        metric.wait_healthy();
        features = course.rust_features();
    } else {
        metric = course.rust("metric", &[]);
        metric.wait_healthy();
        features = course.rust_features();
        assert!(features.wait_exit(WAIT).success(), "{}", features.output());
        python = start_python();
    }
    course.wait_label_lines(2 * N, &[&python, &metric, &features]);
    assert!(features.wait_exit(WAIT).success(), "{}", features.output());
    let lines = course.label_lines();
    let y_true: Vec<&(String, String, f64)> = lines.iter().filter(|l| l.0 == "y_true").collect();
    let y_pred: Vec<&(String, String, f64)> = lines.iter().filter(|l| l.0 == "y_pred").collect();
    assert_eq!((y_true.len(), y_pred.len()), (N, N), "{lines:?}");
    for row in 0..N {
        // Our y_true carries its id in message_id; the course's y_pred has none.
        assert_ne!(y_true[row].1, "-");
        assert_eq!(y_true[row].2, course.target(row), "y_true of row {row}");
        assert_eq!(y_pred[row].1, "-");
        let expected = course.predicted(&python_model, row);
        assert!(
            close(y_pred[row].2, expected),
            "y_pred of row {row}: {} vs {expected}",
            y_pred[row].2
        );
    }
    assert_eq!(
        metric.metric_value("pipeline_join_unpaired_total"),
        N as f64
    );
    assert_eq!(metric.metric_value("pipeline_join_waiting"), N as f64);
    assert!(read_rows(&course.log_dir().join("metric_log.csv")).is_empty());
    metric.assert_course_warning();
    course.finish(vec![python, metric, features]).await;
}

/// The course's metric service with our producer and model.
async fn python_metric(python_first: bool) {
    let course = Course::new(if python_first {
        "course_pymetric_first"
    } else {
        "course_pymetric_second"
    });
    let out = course.dir.path().join("python_metric.txt");
    let start_python = || course.python("metric", &["--out".into(), out.display().to_string()]);
    let (mut python, model, mut features);
    if python_first {
        python = start_python();
        python.wait_stdout("consuming");
        model = course.rust("model", &[]);
        model.wait_healthy();
        features = course.rust_features();
    } else {
        model = course.rust("model", &[]);
        model.wait_healthy();
        features = course.rust_features();
        assert!(features.wait_exit(WAIT).success(), "{}", features.output());
        python = start_python();
    }
    assert!(
        python.wait_exit(WAIT).success(),
        "{}",
        outputs(&[&python, &model, &features])
    );
    assert!(features.wait_exit(WAIT).success(), "{}", features.output());
    // The Python metric logged `<kind> <message_id> <body>`: bare numbers, with our ids.
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let mut row_of_id = std::collections::HashMap::new();
    let mut predictions = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "bad line {line:?}");
        let value: f64 = fields[2]
            .parse()
            .unwrap_or_else(|_| panic!("not a bare number: {line:?}"));
        match fields[0] {
            "y_true" => {
                let row = row_of_id.len();
                assert_eq!(value, course.target(row), "y_true of row {row}");
                assert!(
                    row_of_id.insert(fields[1].to_owned(), row).is_none(),
                    "{line:?} twice"
                );
            }
            _ => predictions.push((fields[1].to_owned(), value)),
        }
    }
    assert_eq!((row_of_id.len(), predictions.len()), (N, N), "{text}");
    for (id, value) in predictions {
        let row = *row_of_id
            .get(&id)
            .unwrap_or_else(|| panic!("y_pred id {id} has no y_true"));
        assert_eq!(
            value,
            course.predicted(&course.fitted, row),
            "y_pred of row {row}"
        );
    }
    model.assert_course_warning();
    course.finish(vec![python, model, features]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_features_first_then_ours() {
    python_features(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ours_first_then_python_features() {
    python_features(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_model_first_then_ours() {
    python_model(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ours_first_then_python_model() {
    python_model(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_metric_first_then_ours() {
    python_metric(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ours_first_then_python_metric() {
    python_metric(false).await;
}

/// Our three services under `course`: bare bodies on the wire, every sample joined by its AMQP
/// `message_id`, and bad input still dead-lettered by the service itself.
#[tokio::test(flavor = "multi_thread")]
async fn our_services_under_course_join_by_message_id_and_dead_letter() {
    let course = Course::new("course_ours");
    let metric = course.rust("metric", &[]);
    let model = course.rust("model", &[]);
    metric.wait_healthy();
    model.wait_healthy();
    let connection = connect(&course.url).await;
    publish_raw(
        &connection,
        &course.queues.features,
        b"{not json",
        Some("bad-1"),
    )
    .await;
    let _ = connection.close(200, "bye".into()).await;
    let mut features = course.rust_features();
    assert!(features.wait_exit(WAIT).success(), "{}", features.output());
    let csv = course.log_dir().join("metric_log.csv");
    let joined = wait_until(WAIT, || read_rows(&csv).len() >= N);
    assert!(joined, "{}", outputs(&[&metric, &model, &features]));
    let rows = read_rows(&csv);
    assert_exactly_once(&rows, N);
    // The ids of the y_true lines, in the order sent, are rows 0..N.
    let lines = course.label_lines();
    let ids: Vec<&str> = lines
        .iter()
        .filter(|l| l.0 == "y_true")
        .map(|l| l.1.as_str())
        .collect();
    for row in &rows {
        let sample = ids
            .iter()
            .position(|id| *id == row.id)
            .expect("row id in the log");
        assert_eq!(row.y_true, course.target(sample));
        assert_eq!(row.y_pred, course.predicted(&course.fitted, sample));
        // A bare y_pred carries no model version.
        assert_eq!(row.model_version, "");
    }
    let dlq = dead_letter_queue(&course.queues.features);
    let mut dead = false;
    for _ in 0..600 {
        let depths = queue_depths(&course.url, std::slice::from_ref(&dlq)).await;
        dead = depths.get(&dlq) == Some(&1);
        if dead {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dead, "the bad message is not in {dlq}\n{}", model.output());
    assert_eq!(
        model.metric_value(&format!(
            "pipeline_messages_dead_lettered_total{{queue=\"{}\",reason=\"invalid_json\"}}",
            course.queues.features
        )),
        1.0,
        "{}",
        model.get("/metrics").unwrap_or_default().1
    );
    for service in [&metric, &model, &features] {
        let stderr = std::fs::read_to_string(&service.stderr_path).unwrap_or_default();
        assert!(
            stderr.contains("TOPOLOGY=course"),
            "{}: {stderr}",
            service.name
        );
    }
    metric.assert_course_warning();
    model.assert_course_warning();
    course.finish(vec![metric, model, features]).await;
}
