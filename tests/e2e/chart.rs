//! One real run of the Helm chart's shape, as far as this machine allows (no cluster can run
//! here): the exact env each workload gets in the rendered default and large settings
//! (`tests/helm/check.py --dump-env`), run as processes against a private three-node broker
//! cluster, with only what a cluster would resolve mapped to this machine: Service names to the
//! processes' loopback ports, the operator's Secret to a user made on the nodes, volumes to
//! folders, each pod's host name to HOSTNAME (as Kubernetes sets it). Rows flow, a promotion
//! through the trainer's token-protected `POST /rollback` reaches every model replica over
//! `MODEL_URL`, every id once.

use crate::broker_node::BrokerCluster;
use crate::helpers::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The broker user the operator's `<cluster>-default-user` Secret would hold; its password has
/// characters a URL would need encoded, taken as they are through AMQP_PASSWORD.
const BROKER_USER: &str = "pipeline";
const BROKER_PASSWORD: &str = "p@ss/w:rd+=?";
const ADMIN_TOKEN: &str = "chart-test-token";

/// The rendered settings: `{"default"|"large": {"workloads": {...}, "services": {...}}}`.
fn rendered(dir: &Path) -> Value {
    let out = dir.join("env.json");
    let status = std::process::Command::new("python3")
        .arg(repo_root().join("tests/helm/check.py"))
        .arg("--dump-env")
        .arg(&out)
        .arg("--dump-only")
        .status()
        .expect("python3 tests/helm/check.py");
    assert!(status.success(), "rendering the chart failed");
    serde_json::from_str(&std::fs::read_to_string(out).expect("env.json")).expect("JSON")
}

/// What a cluster resolves, mapped to this machine.
struct World {
    amqp_urls: String,
    /// Service name → address of the process behind it.
    services: BTreeMap<String, SocketAddr>,
    data: PathBuf,
}

impl World {
    /// The env of one pod: the chart's, with addresses, secrets and volumes resolved here.
    fn env(&self, rendered: &Value, pod: &str, volume: &Path) -> Vec<(String, String)> {
        let mut env = vec![("HOSTNAME".to_owned(), pod.to_owned())];
        let Value::Object(vars) = &rendered["env"] else {
            panic!("no env in {rendered}");
        };
        for (name, value) in vars {
            if name == "HTTP_ADDR" {
                // Each process gets a free loopback port of its own (the harness sets it).
                continue;
            }
            let value = match value {
                Value::String(value) => self.resolve(name, value, volume),
                Value::Object(from) => {
                    let secret = &from["secretKeyRef"];
                    match (secret["name"].as_str(), secret["key"].as_str()) {
                        (Some(s), Some("username")) if s.ends_with("-default-user") => {
                            BROKER_USER.to_owned()
                        }
                        (Some(s), Some("password")) if s.ends_with("-default-user") => {
                            BROKER_PASSWORD.to_owned()
                        }
                        (Some(s), Some("token")) if s.ends_with("-trainer-token") => {
                            ADMIN_TOKEN.to_owned()
                        }
                        other => panic!("{name}: no stand-in for {other:?}"),
                    }
                }
                other => panic!("{name}: {other}"),
            };
            env.push((name.clone(), value));
        }
        env
    }

    fn resolve(&self, name: &str, value: &str, volume: &Path) -> String {
        if name == "AMQP_URL" {
            // The RabbitmqCluster's Service: every node of the private cluster, and no
            // credentials in the URL (the chart puts none there).
            assert!(
                value.starts_with("amqp://")
                    && value.contains(".svc:5672/")
                    && !value.contains('@'),
                "{value}"
            );
            return self.amqp_urls.clone();
        }
        if name == "DATA_PATH" {
            assert_eq!(value, "/app/data/diabetes.csv");
            return self.data.display().to_string();
        }
        if let Some(rest) = value.strip_prefix("/var/lib/ml-pipeline/") {
            return volume.join(rest).display().to_string();
        }
        if let Some(rest) = value.strip_prefix("http://") {
            let (host_port, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = host_port.split(':').next().unwrap_or_default();
            let addr = self
                .services
                .get(host)
                .unwrap_or_else(|| panic!("{name}={value}: no process behind Service {host}"));
            return if path.is_empty() {
                format!("http://{addr}")
            } else {
                format!("http://{addr}/{path}")
            };
        }
        assert!(
            !value.contains("/var/lib/") && !value.contains(".svc"),
            "{name}={value} left unresolved"
        );
        value.to_owned()
    }
}

/// Every row of every metric pod's CSV (in `LOG_DIR`, or `LOG_DIR/p<k>/` when partitioned).
fn all_rows(volumes: &[PathBuf]) -> Vec<Row> {
    let mut rows = Vec::new();
    for volume in volumes {
        let logs = volume.join("logs");
        rows.extend(read_rows(&logs.join("metric_log.csv")));
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with('p') {
                rows.extend(read_rows(&entry.path().join("metric_log.csv")));
            }
        }
    }
    rows
}

/// The ids of the true values every metric pod logged (labels_log.txt, all partitions).
fn true_value_ids(volumes: &[PathBuf]) -> HashSet<String> {
    let mut ids = HashSet::new();
    for volume in volumes {
        let logs = volume.join("logs");
        let mut files = vec![logs.join("labels_log.txt")];
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with('p') {
                files.push(entry.path().join("labels_log.txt"));
            }
        }
        for file in files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for line in text.lines() {
                let fields: Vec<&str> = line.split(' ').collect();
                if fields.get(1) == Some(&"y_true") {
                    ids.insert(fields[2].to_owned());
                }
            }
        }
    }
    ids
}

/// One setting of the chart on the cluster: returns the rows written.
fn run_setting(setting: &str, rendered: &Value, amqp_urls: &str, work: &Path) -> usize {
    let workloads = &rendered["workloads"];
    let service_of = |component: &str| -> String {
        rendered["services"]
            .as_object()
            .expect("services")
            .iter()
            .find(|(name, s)| s["component"] == component && !name.ends_with("-headless"))
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| panic!("no Service of {component}"))
    };
    let mut world = World {
        amqp_urls: amqp_urls.to_owned(),
        services: BTreeMap::new(),
        data: repo_root().join("data/diabetes.csv"),
    };
    let dir = work.join(setting);
    let pod_dir = |pod: &str| {
        let path = dir.join(pod);
        std::fs::create_dir_all(&path).expect("pod folder");
        path
    };
    let replicas = |component: &str| workloads[component]["replicas"].as_u64().expect("replicas");
    let name = |component: &str| {
        workloads[component]["name"]
            .as_str()
            .expect("name")
            .to_owned()
    };

    // The metric StatefulSet: pods <name>-0 .. -(N-1), each with its own volume.
    let mut metrics = Vec::new();
    let mut metric_volumes = Vec::new();
    for i in 0..replicas("metric") {
        let pod = format!("{}-{i}", name("metric"));
        let volume = pod_dir(&pod);
        let env = world.env(&workloads["metric"], &pod, &volume);
        metrics.push(spawn_service("metric", env, &volume));
        metric_volumes.push(volume);
    }
    world
        .services
        .insert(service_of("metric"), metrics[0].http_addr);
    // The trainer, on its own volume; the Service name its MODEL_URL uses.
    let trainer_volume = pod_dir("trainer");
    let mut trainer = spawn_service(
        "trainer",
        world.env(
            &workloads["trainer"],
            &format!("{}-0", name("trainer")),
            &trainer_volume,
        ),
        &trainer_volume,
    );
    world
        .services
        .insert(service_of("trainer"), trainer.http_addr);
    wait_healthy(&trainer, Duration::from_secs(60));
    let mut models = Vec::new();
    for i in 0..replicas("model") {
        let pod = format!("{}-{i}", name("model"));
        let volume = pod_dir(&pod);
        models.push(spawn_service(
            "model",
            world.env(&workloads["model"], &pod, &volume),
            &volume,
        ));
    }
    for service in metrics.iter().chain(&models) {
        wait_healthy(service, Duration::from_secs(60));
    }
    let features_volume = pod_dir("features");
    let mut features = spawn_service(
        "features",
        world.env(
            &workloads["features"],
            &format!("{}-0", name("features")),
            &features_volume,
        ),
        &features_volume,
    );

    // Rows flow (the chart's RATE, 10 a second).
    assert!(
        wait_until(Duration::from_secs(60), || all_rows(&metric_volumes).len()
            >= 50),
        "{setting}: {} rows\n{}",
        all_rows(&metric_volumes).len(),
        metrics[0].stderr_tail(20)
    );

    // The POST routes need the token; a promotion through POST /rollback reaches every replica.
    assert_eq!(
        http_post(trainer.http_addr, "/retrain", None).map(|r| r.0),
        Some(401)
    );
    assert_eq!(
        http_post(trainer.http_addr, "/rollback?to=v9", Some("wrong")).map(|r| r.0),
        Some(401)
    );
    let (status, body) =
        http_post(trainer.http_addr, "/retrain", Some(ADMIN_TOKEN)).expect("POST /retrain");
    assert_eq!(status, 200, "{body}");
    train(&world.data, &trainer_volume.join("models/v9.json"), "v9");
    let (status, body) =
        http_post(trainer.http_addr, "/rollback?to=v9", Some(ADMIN_TOKEN)).expect("POST /rollback");
    assert_eq!(status, 200, "{body}");
    let served = |model: &Service| {
        model.metrics().get("pipeline_model_served{version=\"v9\"}") == Some(&1.0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || models.iter().all(served)),
        "{setting}: not every replica serves v9\n{}",
        models[0].stderr_tail(20)
    );
    let before = all_rows(&metric_volumes).len();
    assert!(
        wait_until(Duration::from_secs(30), || all_rows(&metric_volumes)
            .iter()
            .any(|row| row.model_version == "v9")),
        "{setting}: no row of v9 after {before}"
    );

    // Stop the producer; every sample it sent joins, each once.
    features.signal("TERM");
    assert!(
        features
            .wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    let sent = |rows: &[Row]| rows.len();
    let mut last = 0;
    let settled = wait_until(Duration::from_secs(30), || {
        let now = sent(&all_rows(&metric_volumes));
        let stable = now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(500));
        stable && now > 0
    });
    assert!(settled, "{setting}: rows keep changing");
    let rows = all_rows(&metric_volumes);
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "{setting}: an id written twice");
    // Every true value logged was joined: nothing missing either.
    let logged = true_value_ids(&metric_volumes);
    assert_eq!(
        logged.len(),
        rows.len(),
        "{setting}: true values without a row"
    );
    assert!(rows.iter().all(|r| logged.contains(&r.id)));
    eprintln!(
        "{setting}: {} metric pod(s), {} model replica(s), {} rows, each id once, v9 on every replica",
        metrics.len(),
        models.len(),
        rows.len()
    );
    // Partitioned: every metric pod wrote rows (each owns some partitions).
    if metrics.len() > 1 {
        for volume in &metric_volumes {
            assert!(
                !all_rows(std::slice::from_ref(volume)).is_empty(),
                "{} wrote nothing",
                volume.display()
            );
        }
    }
    for service in metrics.iter_mut().chain(models.iter_mut()) {
        service.kill();
    }
    trainer.kill();
    rows.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_charts_env_runs_against_a_three_node_cluster_in_both_settings() {
    let work = tempfile::tempdir().expect("tempdir");
    let settings = rendered(work.path());
    let cluster = BrokerCluster::start(3);
    let ctl = |args: &[&str]| {
        let out = cluster.nodes[0].ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["add_user", BROKER_USER, BROKER_PASSWORD]);
    ctl(&["set_permissions", "-p", "/", BROKER_USER, ".*", ".*", ".*"]);
    // Without its user the services could not connect: the URL carries none.
    ctl(&["delete_user", "guest"]);
    let urls: Vec<String> = cluster
        .amqp_urls()
        .split(',')
        .map(|url| url.replace("guest:guest@", ""))
        .collect();
    let amqp_urls = urls.join(",");
    let encoded = BROKER_PASSWORD
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect::<String>();
    let own_url = urls[0].replace("amqp://", &format!("amqp://{BROKER_USER}:{encoded}@"));
    let queues = testkit::Queues {
        features: "features".to_owned(),
        y_true: "y_true".to_owned(),
        y_pred: "y_pred".to_owned(),
    };
    for setting in ["default", "large"] {
        let rows = run_setting(setting, &settings[setting], &amqp_urls, work.path());
        assert!(rows >= 50, "{setting}: {rows} rows");
        // The next setting has another PARTITIONS: its services would refuse these queues.
        crate::partitions::clean_up(
            &own_url,
            &queues,
            pipeline::partition::Partitions::new(6).expect("6"),
        )
        .await;
    }
}
