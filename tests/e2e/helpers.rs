//! Test harness: runs the real service binaries as processes on fresh queue names, a fresh log dir
//! and free ports per test, against a real RabbitMQ (the machine's, or a private node of the test's
//! own when the test stops or restarts the broker).

#![allow(dead_code)]

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

pub use pipeline::broker::topology::{dead_letter_queue, training_queue};
pub use testkit::process::bin_path;
pub use testkit::{Env, Metrics, Queues, free_port, repo_root, wait_until};

/// The broker the tests share (`TEST_AMQP_URL`, default the local one).
pub fn shared_amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// One running service process ([`testkit::Service`]), killed when dropped, with the tests'
/// synchronous waits and panics on failure.
pub struct Service(testkit::Service);

impl Deref for Service {
    type Target = testkit::Service;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Service {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Service {
    fn spawn(name: &str, env: Env, dir: &Path) -> Self {
        Self(
            testkit::Service::spawn(name, &bin_path(name), env, dir)
                .unwrap_or_else(|e| panic!("cannot start {name}: {e:#}")),
        )
    }

    /// Starts the same service again with the same settings.
    pub fn restart(&mut self, dir: &Path) {
        self.restart_with(dir, &[]);
    }

    /// Starts the service again with some settings changed (its stderr goes to a new file in the
    /// folder it was first started in; `_dir` is kept for the tests' calls).
    pub fn restart_with(&mut self, _dir: &Path, overrides: &[(&str, String)]) {
        let name = self.name.clone();
        self.0
            .respawn(overrides)
            .unwrap_or_else(|e| panic!("cannot restart {name}: {e:#}"));
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`, `INT`, `HUP`).
    pub fn signal(&self, signal: &str) {
        let number = match signal {
            "TERM" => libc::SIGTERM,
            "KILL" => libc::SIGKILL,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            other => panic!("unknown signal {other}"),
        };
        self.0.signal(number);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.0.wait_exit_blocking(timeout).map(|exit| exit.status)
    }
}

/// `GET path` on `addr`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    testkit::http::get_blocking(addr, path)
}

/// `POST path` with an empty body, with `Authorization: Bearer <token>` when given: (status,
/// body). Waits up to 60 s for the answer (a retrain).
pub fn http_post(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    // A thread of its own: reqwest's blocking client panics inside the test's async runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let client = reqwest::blocking::Client::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(60))
                    .build()
                    .ok()?;
                let mut request = client.post(format!("http://{addr}{path}"));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().ok()?;
                let status = response.status().as_u16();
                Some((status, response.text().ok()?))
            })
            .join()
            .ok()
            .flatten()
    })
}

/// Settings of one pipeline run.
#[derive(Clone, Debug)]
pub struct Options {
    pub amqp_url: String,
    pub count: u64,
    pub rate: f64,
    pub extra: Vec<(String, String)>,
}

impl Options {
    pub fn new(amqp_url: String, count: u64) -> Self {
        Self {
            amqp_url,
            count,
            rate: 0.0,
            extra: Vec::new(),
        }
    }

    pub fn rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// The three services of one test, on their own queues, log dir and ports.
pub struct Pipeline {
    pub queues: Queues,
    pub dir: tempfile::TempDir,
    pub options: Options,
    pub metric: Service,
    pub model: Service,
    pub features: Option<Service>,
}

/// A test that fails leaves no queues behind on the shared broker (passing tests delete theirs
/// themselves): the services are killed first, since a live one would declare its queues again,
/// then the queues are deleted.
impl Drop for Pipeline {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        self.stop_services();
        clean_up_on_a_thread(|| testkit::delete_queues(&self.options.amqp_url, &self.queues));
    }
}

/// Runs the future that `clean_up` makes, best effort (its result is dropped) and 10 s at most, on
/// a thread and runtime of its own: a failed test's `Drop` may run inside the test's runtime, where
/// blocking panics.
pub fn clean_up_on_a_thread<F: Future>(clean_up: impl FnOnce() -> F + Send) {
    std::thread::scope(|scope| {
        let _ = scope
            .spawn(|| {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), clean_up()).await;
                });
            })
            .join();
    });
}

impl Pipeline {
    fn common_env(options: &Options, queues: &Queues) -> Env {
        Env::new(&options.amqp_url, queues)
            .set("RECONNECT_MAX_DELAY_MS", 1000)
            .with(options.extra.iter().cloned())
    }

    /// Starts metric and model (consumers) but not the producer.
    pub fn start_consumers(test: &str, options: Options) -> Self {
        Self::start_consumers_on(Queues::unique(test), options)
    }

    /// [`Pipeline::start_consumers`] on queue names made already (shared with another service).
    pub fn start_consumers_on(queues: Queues, options: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        let metric_env = Self::common_env(&options, &queues).set("LOG_DIR", logs.display());
        let metric = Service::spawn("metric", metric_env, dir.path());
        let model = Service::spawn("model", Self::common_env(&options, &queues), dir.path());
        Self {
            queues,
            dir,
            options,
            metric,
            model,
            features: None,
        }
    }

    /// Starts the producer with the run's COUNT and RATE.
    pub fn start_features(&mut self) {
        let env = Self::common_env(&self.options, &self.queues)
            .set("COUNT", self.options.count)
            .set("RATE", self.options.rate);
        self.features = Some(Service::spawn("features", env, self.dir.path()));
    }

    /// Kills the run's services (before its queues are deleted: a live service whose queue is
    /// deleted reconnects and declares it again).
    pub fn stop_services(&mut self) {
        for service in [&mut self.metric, &mut self.model]
            .into_iter()
            .chain(self.features.as_mut())
        {
            service.kill();
        }
    }

    /// Starts all three.
    pub fn start(test: &str, options: Options) -> Self {
        let mut pipeline = Self::start_consumers(test, options);
        pipeline.start_features();
        pipeline
    }

    /// Starts one more service of this run (for example a second model), with extra settings.
    pub fn extra_service(&self, name: &'static str, extra: &[(&str, String)]) -> Service {
        let env = Self::common_env(&self.options, &self.queues).with(extra.iter().cloned());
        // A folder of its own, so its stderr does not overwrite another instance's.
        let dir = self.dir.path().join(format!("{name}.{}", free_port()));
        std::fs::create_dir_all(&dir).expect("service dir");
        Service::spawn(name, env, &dir)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn rows(&self) -> Vec<Row> {
        read_rows(&self.log_dir().join("metric_log.csv"))
    }

    pub fn label_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_dir().join("labels_log.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the CSV has `n` rows, panicking with the services' logs after `timeout`.
    pub fn wait_rows(&self, n: usize, timeout: Duration) {
        let ok = wait_until(timeout, || self.rows().len() >= n);
        if !ok {
            panic!(
                "{} rows after {timeout:?}, expected {n}\n{}",
                self.rows().len(),
                self.logs()
            );
        }
    }

    /// The last lines of each service's stderr, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |s: &Service| {
            let text = s.stderr();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut out = format!(
            "--- metric\n{}\n--- model\n{}\n",
            tail(&self.metric),
            tail(&self.model)
        );
        if let Some(f) = &self.features {
            out += &format!("--- features\n{}\n", tail(f));
        }
        out
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// One row of metric_log.csv.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub y_true: f64,
    pub y_pred: f64,
    pub absolute_error: f64,
    pub model_version: String,
}

pub fn read_rows(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only whole lines: a line without its newline is still being written (or a crash's leftover).
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 5, "bad CSV row {l:?}");
            Row {
                id: f[0].to_owned(),
                y_true: f[1].parse().unwrap(),
                y_pred: f[2].parse().unwrap(),
                absolute_error: f[3].parse().unwrap(),
                model_version: f[4].to_owned(),
            }
        })
        .collect()
}

/// Asserts the rows are exactly `n` distinct ids, each with a consistent absolute error.
pub fn assert_exactly_once(rows: &[Row], n: usize) {
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(rows.len(), n, "rows in metric_log.csv");
    assert_eq!(ids.len(), n, "distinct ids in metric_log.csv");
    for row in rows {
        assert_eq!(
            row.absolute_error,
            (row.y_true - row.y_pred).abs(),
            "row {row:?}"
        );
    }
}

/// A connection for the test itself (publishing bad input, reading queue depths).
pub async fn connect(url: &str) -> Connection {
    testkit::connect(url, "e2e test")
        .await
        .expect("test connection to the broker")
}

/// Messages ready in each queue (passive declare, so a missing queue is an error).
pub async fn queue_depths(url: &str, queues: &[String]) -> HashMap<String, u32> {
    let connection = connect(url).await;
    let mut depths = HashMap::new();
    for queue in queues {
        let channel = connection.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
        depths.insert(queue.clone(), declared.message_count());
    }
    let _ = connection.close(200, "bye".into()).await;
    depths
}

/// Asserts every queue of the test (dead-letter queues included) is empty.
pub async fn assert_queues_empty(url: &str, queues: &Queues) {
    let depths = queue_depths(url, &queues.all()).await;
    assert!(
        depths.values().all(|d| *d == 0),
        "queues not drained: {depths:?}"
    );
}

/// Deletes the test's queues (best effort), the trainer's copies and the producer's fanout
/// exchanges included.
pub async fn delete_queues(url: &str, queues: &Queues) {
    let _ = testkit::delete_queues(url, queues).await;
}

/// Publishes a raw body to a queue through the default exchange.
pub async fn publish_raw(
    connection: &Connection,
    queue: &str,
    body: &[u8],
    message_id: Option<&str>,
) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirm_select");
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = channel.close(200, "bye".into()).await;
}

/// Waits until `service` answers `/healthz` with 200, panicking with its log after `timeout`.
pub fn wait_healthy(service: &Service, timeout: Duration) {
    assert!(
        wait_until(timeout, || service.get("/healthz").map(|r| r.0)
            == Some(200)),
        "{} not healthy after {timeout:?}:\n{}",
        service.name,
        service.stderr()
    );
}

/// Stops `service` with SIGTERM (it must exit 0 within 10 s) and starts it again.
pub fn restart_gracefully(service: &mut Service, dir: &Path) {
    service.signal("TERM");
    let status = service
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{} did not exit within 10 s of SIGTERM", service.name));
    assert!(status.success(), "{} exit status {status}", service.name);
    service.restart(dir);
}

/// Writes a metric history of `pairs` joined samples straight into `log_dir` (as the metric
/// service writes them: both log lines of each sample and its CSV row); returns the ids.
pub fn write_history(log_dir: &Path, pairs: usize) -> Vec<String> {
    use std::io::Write;
    std::fs::create_dir_all(log_dir).expect("log dir");
    let mut labels =
        std::io::BufWriter::new(File::create(log_dir.join("labels_log.txt")).expect("labels"));
    let mut csv =
        std::io::BufWriter::new(File::create(log_dir.join("metric_log.csv")).expect("csv"));
    writeln!(csv, "id,y_true,y_pred,absolute_error,model_version").unwrap();
    let mut ids = Vec::with_capacity(pairs);
    for n in 0..pairs {
        let id = uuid::Uuid::new_v4().to_string();
        let y_true = (n % 300) as f64 + 25.0;
        let y_pred = y_true + 0.5;
        writeln!(labels, "2026-11-26T00:00:00.000000Z y_true {id} {y_true}").unwrap();
        writeln!(
            labels,
            "2026-11-26T00:00:00.000001Z y_pred {id} {y_pred} ols-history"
        )
        .unwrap();
        writeln!(csv, "{id},{y_true},{y_pred},0.5,ols-history").unwrap();
        ids.push(id);
    }
    labels.flush().unwrap();
    csv.flush().unwrap();
    ids
}

/// Starts one service on its own, with exactly these settings (plus HTTP_ADDR), its stderr in `dir`.
pub fn spawn_service(name: &'static str, env: Vec<(String, String)>, dir: &Path) -> Service {
    Service::spawn(name, Env::default().with(env), dir)
}

/// `model train --data <data> --out <out> --version <version>`, panicking when it fails.
pub fn train(data: &Path, out: &Path, version: &str) {
    let status = std::process::Command::new(bin_path("model"))
        .args(["train", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--version", version])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("cannot run model train");
    assert!(status.success(), "model train failed");
}

/// Publishes `count` rows of the diabetes data straight to the trainer's queues (both halves), as
/// samples `row-0`, `row-1`, ...
pub async fn publish_rows(url: &str, queues: &Queues, count: usize) {
    let data =
        pipeline::dataset::Dataset::from_csv(&repo_root().join("data/diabetes.csv"), None).unwrap();
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut confirms = Vec::new();
    for n in 0..count {
        let row = n % data.len();
        let id = format!("row-{n}");
        for (queue, body) in [
            (
                training_queue(&queues.features),
                serde_json::json!({"id": id, "features": data.row(row)}),
            ),
            (
                training_queue(&queues.y_true),
                serde_json::json!({"id": id, "y_true": data.target(row)}),
            ),
        ] {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
    }
    for confirm in confirms {
        confirm.await.unwrap();
    }
    let _ = connection.close(200, "bye".into()).await;
}
