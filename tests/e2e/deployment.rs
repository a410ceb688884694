//! What can be checked of the Docker set-up without a Docker engine: the paths the Dockerfile and
//! compose use exist, every variable compose sets is one the binary reads, ports agree and move
//! through variables, one image is built once, the `monitoring` profile's Prometheus and Grafana
//! get the repository's monitoring files and scrape the services on their ports, and the binaries
//! work with exactly the compose environment pointed at the local broker. `scripts/compose-test` runs the real thing on Docker.

use crate::helpers::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use yaml_rust2::{Yaml, YamlLoader};

/// Resolves YAML merge keys (`<<: *anchor`) in mappings, recursively.
fn merged(yaml: &Yaml) -> Yaml {
    match yaml {
        Yaml::Hash(hash) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            if let Some(base) = hash.get(&Yaml::String("<<".into())) {
                let bases = match base {
                    Yaml::Array(items) => items.clone(),
                    other => vec![other.clone()],
                };
                for base in bases {
                    if let Yaml::Hash(base) = merged(&base) {
                        out.extend(base);
                    }
                }
            }
            for (key, value) in hash {
                if key.as_str() != Some("<<") {
                    out.insert(key.clone(), merged(value));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merged).collect()),
        other => other.clone(),
    }
}

/// A compose value with every `${NAME:-default}` replaced by its default, as compose does when
/// NAME is not set.
fn compose_default(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').expect("unclosed ${ in compose");
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn scalar(yaml: &Yaml) -> String {
    match yaml {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

struct ComposeService {
    command: String,
    environment: BTreeMap<String, String>,
    ports: Vec<String>,
    volumes: Vec<String>,
    yaml: Yaml,
}

fn compose_doc() -> Yaml {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    merged(&YamlLoader::load_from_str(&text).unwrap()[0])
}

fn compose_services() -> BTreeMap<String, ComposeService> {
    let doc = compose_doc();
    let mut services = BTreeMap::new();
    for (name, service) in doc["services"].as_hash().unwrap() {
        let name = name.as_str().unwrap().to_owned();
        // The broker and the monitoring profile's images are not built from this repo.
        if name == "rabbitmq" || !service["profiles"].is_badvalue() {
            continue;
        }
        let list = |key: &str| {
            service[key]
                .as_vec()
                .map(|v| v.iter().map(scalar).collect())
                .unwrap_or_default()
        };
        let environment = service["environment"]
            .as_hash()
            .map(|env| env.iter().map(|(k, v)| (scalar(k), scalar(v))).collect())
            .unwrap_or_default();
        let command: Vec<String> = list("command");
        services.insert(
            name,
            ComposeService {
                command: command[0].clone(),
                environment,
                ports: list("ports"),
                volumes: list("volumes"),
                yaml: service.clone(),
            },
        );
    }
    services
}

#[test]
fn compose_and_dockerfile_agree_with_the_binaries() {
    let services = compose_services();
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["features", "metric", "model", "trainer"]
    );
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(
                repo_root().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
        }
    }
    for (name, service) in &services {
        assert_eq!(&service.command, name, "service {name} runs its own binary");
        assert!(
            dockerfile.contains(&format!("target/release/{name}")),
            "the image holds {name}"
        );
        assert!(
            dockerfile.contains(&format!("-p {name}")),
            "the image builds {name}"
        );
        let help = String::from_utf8(
            std::process::Command::new(bin_path(name))
                .arg("--help")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        for key in service.environment.keys() {
            // RUST_LOG is read by the log filter, not by clap.
            if key != "RUST_LOG" {
                assert!(
                    help.contains(&format!("[env: {key}")),
                    "compose sets {key} for {name}, which `{name} --help` does not list"
                );
            }
        }
        for volume in &service.volumes {
            let host = volume.split(':').next().unwrap();
            assert!(
                repo_root().join(host).exists(),
                "{name} mounts {host}, which does not exist"
            );
        }
        // Relative to the image's WORKDIR /app, where ./data is mounted: the same path works
        // with `cargo run` from the repository root.
        if let Some(path) = service.environment.get("DATA_PATH") {
            let local = compose_default(path);
            assert!(
                local.starts_with("data/") && repo_root().join(&local).exists(),
                "{name}: DATA_PATH {path} is not in ./data"
            );
        }
        // The HTTP port is the one published (model: none, so it can be scaled).
        let http: SocketAddr = service.environment["HTTP_ADDR"].parse().unwrap();
        if name == "model" {
            assert!(
                service.ports.is_empty(),
                "model must publish no host port to scale"
            );
            assert!(
                service.yaml["container_name"].is_badvalue(),
                "model must have no container_name"
            );
        } else {
            // Host port through a variable whose default is the HTTP port, on 127.0.0.1 unless
            // BIND_ADDRESS says otherwise.
            let variable = format!("{}_PORT", name.to_uppercase());
            assert_eq!(
                service.ports,
                [format!(
                    "${{BIND_ADDRESS:-127.0.0.1}}:${{{variable}:-{0}}}:{0}",
                    http.port()
                )],
                "{name} publishes its HTTP port"
            );
        }
        // Through the entrypoint, which unsets the empty MODEL_PATH as for the service itself.
        let healthcheck = &service.yaml["healthcheck"]["test"];
        assert_eq!(scalar(&healthcheck[1]), "docker-entrypoint");
        assert_eq!(scalar(&healthcheck[2]), *name);
        assert_eq!(scalar(&healthcheck[3]), "healthcheck");
    }
}

#[test]
fn compose_builds_one_image_and_keeps_the_broker_data() {
    let doc = compose_doc();
    let services = doc["services"].as_hash().unwrap();
    let building: Vec<&str> = services
        .iter()
        .filter(|(_, service)| !service["build"].is_badvalue())
        .map(|(name, _)| name.as_str().unwrap())
        .collect();
    assert_eq!(building, ["features"], "one service builds the image");
    for name in ["features", "model", "metric", "trainer"] {
        let service = &doc["services"][name];
        assert_eq!(service["image"].as_str(), Some("ml-pipeline:latest"));
        if name != "features" {
            assert_eq!(
                service["pull_policy"].as_str(),
                Some("never"),
                "{name} uses the image features builds"
            );
        }
    }
    let rabbitmq = &doc["services"]["rabbitmq"];
    let healthcheck: Vec<String> = rabbitmq["healthcheck"]["test"]
        .as_vec()
        .unwrap()
        .iter()
        .map(scalar)
        .collect();
    assert_eq!(
        healthcheck,
        [
            "CMD",
            "rabbitmq-diagnostics",
            "-q",
            "check_port_connectivity"
        ],
        "healthy only once AMQP is accepted"
    );
    assert!(rabbitmq["restart"].as_str().is_some());
    let ports: Vec<String> = rabbitmq["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(scalar)
        .collect();
    assert_eq!(
        ports,
        [
            "${BIND_ADDRESS:-127.0.0.1}:${RABBITMQ_PORT:-5672}:5672",
            "${BIND_ADDRESS:-127.0.0.1}:${RABBITMQ_UI_PORT:-15672}:15672"
        ]
    );
    let volume = scalar(&rabbitmq["volumes"][0]);
    let (named, path) = volume.split_once(':').unwrap();
    assert_eq!(path, "/var/lib/rabbitmq");
    assert!(
        !doc["volumes"][named].is_badvalue(),
        "{named} is a named volume"
    );

    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for (number, line) in dockerfile.lines().enumerate() {
        if line.to_lowercase().starts_with("# syntax=") {
            assert_eq!(number, 0, "a parser directive is ignored after line 1");
        }
    }
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_DEBUG=false"));
    let entrypoint = repo_root().join("scripts/docker-entrypoint.sh");
    assert!(dockerfile.contains("COPY scripts/docker-entrypoint.sh"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&entrypoint).unwrap().permissions().mode();
    assert!(mode & 0o111 != 0, "the entrypoint is executable");
}

#[test]
fn compose_defaults_replace_variables() {
    assert_eq!(
        compose_default("${DATA_PATH:-data/diabetes.csv}"),
        "data/diabetes.csv"
    );
    assert_eq!(compose_default("a${X:-1}b${Y:-2}"), "a1b2");
    assert_eq!(compose_default("${MODEL_PATH:-}"), "");
    assert_eq!(compose_default("plain"), "plain");
}

#[tokio::test(flavor = "multi_thread")]
async fn binaries_run_with_the_compose_environment() {
    let url = shared_amqp_url();
    let queues = Queues::unique("compose");
    let logs = tempfile::tempdir().unwrap();
    let mut running = Vec::new();
    // Order as compose starts them does not matter; producer last makes the check quicker.
    for (name, service) in compose_services().into_iter().rev() {
        let mut env: Vec<(String, String)> = Vec::new();
        for (key, value) in &service.environment {
            let value = &compose_default(value);
            // Empty means unset: the image's entrypoint removes empty optional settings.
            // METRIC_URL names the metric container: unset here (the alarm trigger is off).
            if value.is_empty() || key == "METRIC_URL" {
                continue;
            }
            // Only what cannot be the same here: the broker's host name, the container paths,
            // ports shared with other tests, and queue names shared with other tests.
            let value = match key.as_str() {
                "AMQP_URL" => value
                    .replace("@rabbitmq:5672", "@127.0.0.1:5672")
                    .replace("amqp://guest:guest@127.0.0.1:5672/%2f", &url),
                "DATA_PATH" => repo_root().join(value).display().to_string(),
                "LOG_DIR" => logs.path().display().to_string(),
                // ./models of the repository stays untouched.
                "MODEL_PATH" => logs.path().join("models/model.json").display().to_string(),
                "TRAIN_DIR" => logs.path().join("models/train").display().to_string(),
                "HTTP_ADDR" => format!("127.0.0.1:{}", free_port()),
                "FEATURES_QUEUE" => queues.features.clone(),
                "Y_TRUE_QUEUE" => queues.y_true.clone(),
                "Y_PRED_QUEUE" => queues.y_pred.clone(),
                _ => value.clone(),
            };
            env.push((key.clone(), value));
        }
        let mut command = std::process::Command::new(bin_path(&name));
        command
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(std::process::Stdio::null());
        running.push((name, command.spawn().unwrap()));
    }
    let csv = logs.path().join("metric_log.csv");
    let ok = wait_until(Duration::from_secs(30), || read_rows(&csv).len() >= 15);
    for (name, child) in &running {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = name;
    }
    for (name, mut child) in running {
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{name} exited with {status} after SIGTERM"
        );
    }
    assert!(
        ok,
        "with the compose settings (RATE=10), fewer than 15 rows in 30 s"
    );
    delete_queues(&url, &queues).await;
}

/// The `monitoring` profile: Prometheus and Grafana start only with it, publish their ports through
/// variables like the others, get the repository's monitoring files where their configs expect
/// them, and Prometheus scrapes the compose services on the ports they listen on.
#[test]
fn the_monitoring_profile_adds_prometheus_and_grafana() {
    let doc = compose_doc();
    let mut profiled = Vec::new();
    for (name, service) in doc["services"].as_hash().unwrap() {
        if let Some(profiles) = service["profiles"].as_vec() {
            let profiles: Vec<String> = profiles.iter().map(scalar).collect();
            assert_eq!(profiles, ["monitoring"], "{name:?}");
            profiled.push(scalar(name));
        }
    }
    assert_eq!(
        profiled,
        ["prometheus", "grafana"],
        "only these need the profile"
    );

    let list = |service: &Yaml, key: &str| -> Vec<String> {
        service[key]
            .as_vec()
            .map(|items| items.iter().map(scalar).collect())
            .unwrap_or_default()
    };
    for (name, variable, port) in [
        ("prometheus", "PROMETHEUS_PORT", 9090),
        ("grafana", "GRAFANA_PORT", 3000),
    ] {
        let service = &doc["services"][name];
        assert_eq!(
            list(service, "ports"),
            [format!(
                "${{BIND_ADDRESS:-127.0.0.1}}:${{{variable}:-{port}}}:{port}"
            )],
            "{name} publishes its port"
        );
        for volume in list(service, "volumes") {
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    repo_root().join(host).exists(),
                    "{name} mounts {host}, which does not exist"
                );
            } else {
                assert!(
                    !doc["volumes"][host].is_badvalue(),
                    "{host} is a named volume"
                );
            }
        }
    }

    let prometheus = &doc["services"]["prometheus"];
    assert!(
        list(prometheus, "volumes")
            .contains(&"./monitoring/prometheus:/etc/prometheus:ro".to_owned())
    );
    assert!(
        list(prometheus, "command")
            .contains(&"--config.file=/etc/prometheus/prometheus.yml".to_owned())
    );
    let grafana = &doc["services"]["grafana"];
    let grafana_volumes = list(grafana, "volumes");
    assert!(
        grafana_volumes
            .contains(&"./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro".to_owned())
    );
    assert!(
        grafana_volumes
            .contains(&"./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro".to_owned())
    );
    let load = |path: &str| {
        let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
        YamlLoader::load_from_str(&text).unwrap().remove(0)
    };
    let providers = load("monitoring/grafana/provisioning/dashboards/pipeline.yml");
    assert_eq!(
        providers["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards"),
        "the provider reads where compose mounts the dashboards"
    );
    let home = scalar(&grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]);
    let in_repo = home.replace(
        "/var/lib/grafana/dashboards",
        "monitoring/grafana/dashboards",
    );
    assert!(repo_root().join(&in_repo).exists(), "{home}");
    let datasources = load("monitoring/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasources["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );

    // Every scrape target is a compose service on the port it listens on (RabbitMQ: the
    // rabbitmq_prometheus plugin's 15692, inside the network only).
    let config = load("monitoring/prometheus/prometheus.yml");
    let services = compose_services();
    for job in config["scrape_configs"].as_vec().unwrap() {
        let mut targets: Vec<String> = job["static_configs"][0]["targets"]
            .as_vec()
            .map(|t| t.iter().map(scalar).collect())
            .unwrap_or_default();
        if let Some(dns) = job["dns_sd_configs"].as_vec() {
            for entry in dns {
                for name in entry["names"].as_vec().unwrap() {
                    targets.push(format!("{}:{}", scalar(name), scalar(&entry["port"])));
                }
            }
        }
        assert!(!targets.is_empty(), "{job:?}");
        for target in targets {
            let (host, port) = target.split_once(':').unwrap();
            if host == "rabbitmq" {
                assert_eq!(port, "15692", "{target}");
                assert!(!doc["services"]["rabbitmq"].is_badvalue());
            } else {
                let service = services
                    .get(host)
                    .unwrap_or_else(|| panic!("{target}: no compose service {host}"));
                let http: SocketAddr = service.environment["HTTP_ADDR"].parse().unwrap();
                assert_eq!(port, http.port().to_string(), "{target}");
            }
        }
    }
}
