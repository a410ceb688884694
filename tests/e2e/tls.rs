//! TLS to the broker (`amqps://`, issue 18): the pipeline over a private node's TLS listener with a
//! CA the test makes, every id once, also across a broker restart; client certificates; and the
//! failures no retry fixes (a wrong CA, a plain port, an expired or mismatched certificate, an
//! unreadable file), each a quick non-zero exit with a message naming the cause and the setting,
//! never the password.

use crate::broker_node::BrokerNode;
use crate::helpers::*;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);
/// A password that must never show in any output.
const SECRET: &str = "S3CRET-tls";

/// Certificates for the tests, made with the `openssl` command (EC P-256 keys: fast), in a
/// directory the broker's `rabbitmq` user can read.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Two CAs (`ca`, `other-ca`) and, signed by `ca`: `server` (localhost, 127.0.0.1), `expired`
    /// (the same names, expired yesterday), `wrong-host` (only broker.invalid), `client`.
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tls-pki-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let pki = Self { dir };
        pki.ca("ca");
        pki.ca("other-ca");
        let server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        pki.leaf("server", server, "2");
        pki.leaf("expired", server, "-1");
        pki.leaf(
            "wrong-host",
            "subjectAltName=DNS:broker.invalid\nextendedKeyUsage=serverAuth\n",
            "2",
        );
        pki.leaf("client", "extendedKeyUsage=clientAuth\n", "2");
        for entry in std::fs::read_dir(pki.dir.path()).expect("pki dir") {
            let path = entry.expect("entry").path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("the openssl command (Debian package openssl)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=pipeline test {name}"),
        ]);
    }

    /// A certificate signed by `ca`, valid for `days` (negative: expired).
    fn leaf(&self, name: &str, extensions: &str, days: &str) {
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=pipeline test {name}"),
        ]);
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.path().join(&ext), extensions).expect("extensions");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            days,
            "-extfile",
            &ext,
        ]);
    }
}

/// A private node with a TLS listener serving `server.pem`, verifying client certificates against
/// `ca.pem`; `require_client_cert` refuses clients without one.
struct TlsNode {
    node: BrokerNode,
    tls_port: u16,
}

impl TlsNode {
    fn start(label: &str, pki: &Pki, require_client_cert: bool) -> Self {
        let tls_port = free_port();
        let config = format!(
            "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {require_client_cert}\n",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key"),
        );
        let node = BrokerNode::start_with_config(label, &config);
        assert!(
            wait_until(Duration::from_secs(30), || std::net::TcpStream::connect((
                "127.0.0.1",
                tls_port
            ))
            .is_ok()),
            "the TLS listener did not open:\n{}",
            node.log_tail()
        );
        Self { node, tls_port }
    }

    /// `amqps://guest:guest@127.0.0.1:<tls port>/%2f`
    fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.tls_port)
    }

    /// Each client connection's TLS flag and name, as the broker lists them.
    fn connections_ssl(&self) -> Vec<String> {
        let out = self.node.ctl(&[
            "list_connections",
            "ssl",
            "name",
            "--quiet",
            "--no-table-headers",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect()
    }
}

/// `openssl s_server` presenting `cert`: enough to test what the client makes of a certificate,
/// which it checks before a word of AMQP.
struct TlsStandIn {
    child: Child,
    port: u16,
}

impl TlsStandIn {
    fn start(pki: &Pki, name: &str) -> Self {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", &pki.path(&format!("{name}.pem"))])
            .args(["-key", &pki.path(&format!("{name}.key"))])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "openssl s_server did not listen"
        );
        Self { child, port }
    }
}

impl Drop for TlsStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `binary` with `env` and expects it to stop by itself within 10 s: its status and output.
fn run_until_exit(
    binary: &'static str,
    env: &[(&str, String)],
    dir: &Path,
) -> (ExitStatus, String) {
    let mut all: Vec<(String, String)> = Queues::unique("tlsfail").env();
    all.push(("RECONNECT_MAX_DELAY_MS".into(), "500".into()));
    all.push(("LOG_DIR".into(), dir.join("logs").display().to_string()));
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let mut service = spawn_service(binary, all, dir);
    let status = service
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "{binary} still running 10 s after start:\n{}",
                service.stderr()
            )
        });
    (status, service.stderr())
}

/// The service stopped with a non-zero status, said `expected`, and never the password.
fn assert_fatal(binary: &str, (status, stderr): &(ExitStatus, String), expected: &[&str]) {
    assert!(
        !status.success(),
        "{binary} exited with {status}:\n{stderr}"
    );
    for text in expected {
        assert!(
            stderr.contains(text),
            "{binary} did not say {text:?}:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains(SECRET),
        "{binary} printed the password:\n{stderr}"
    );
    eprintln!("--- {binary} ({status}):\n{}", stderr.trim_end());
}

fn secret_url(port: u16) -> String {
    format!("amqps://guest:{SECRET}@127.0.0.1:{port}/%2f")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_amqps_with_every_id_once() {
    const SAMPLES: usize = 1000;
    let pki = Pki::new();
    let node = TlsNode::start("tls", &pki, false);
    let options = Options::new(node.amqps_url(), SAMPLES as u64)
        .rate(200.0)
        .env("AMQP_CA_FILE", &pki.path("ca.pem"));
    let mut run = Pipeline::start("tls", options);
    run.wait_rows(100, LONG);
    // Every connection the broker has is a TLS one (the producer may be done already).
    let connections = node.connections_ssl();
    assert!(
        connections.len() >= 2 && connections.iter().all(|c| c.starts_with("true")),
        "connections (ssl, name): {connections:?}"
    );
    run.wait_rows(SAMPLES, LONG);
    let features = run.features.as_mut().expect("features");
    let status = features.wait_exit(LONG).expect("features exits");
    assert!(status.success(), "features exit status {status}");
    assert_exactly_once(&run.rows(), SAMPLES);
    let url = format!("amqps://guest:***@127.0.0.1:{}/%2f", node.tls_port);
    for service in [
        &run.metric,
        &run.model,
        run.features.as_ref().expect("features"),
    ] {
        let log = service.stderr();
        assert!(
            log.lines()
                .any(|line| line.contains("connected to the broker") && line.contains(&url)),
            "{}:\n{log}",
            service.name
        );
    }
    assert_queues_empty(&node.node.amqp_url(), &run.queues).await;
    eprintln!(
        "{SAMPLES} samples over amqps, {} rows, connections (ssl, name) {connections:?}",
        run.rows().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_over_tls_loses_nothing() {
    const SAMPLES: usize = 2000;
    let pki = Pki::new();
    let mut node = TlsNode::start("tlsrestart", &pki, false);
    let options = Options::new(node.amqps_url(), SAMPLES as u64)
        .rate(300.0)
        .env("AMQP_CA_FILE", &pki.path("ca.pem"));
    let mut run = Pipeline::start("tlsrestart", options);
    run.wait_rows(300, LONG);
    let before = run.rows().len();
    node.node.restart();
    run.wait_rows(SAMPLES, LONG);
    let features = run.features.as_mut().expect("features");
    let status = features.wait_exit(LONG).expect("features exits");
    assert!(status.success(), "features exit status {status}");
    assert_exactly_once(&run.rows(), SAMPLES);
    assert!(
        wait_until(Duration::from_secs(10), || run
            .model
            .metrics()
            .get("pipeline_broker_reconnects_total")
            >= Some(&1.0)),
        "the model did not reconnect:\n{}",
        run.logs()
    );
    assert!(run.metric.is_running() && run.model.is_running());
    assert_queues_empty(&node.node.amqp_url(), &run.queues).await;
    eprintln!("{SAMPLES} samples, restart after {before} rows, every id once");
}

#[test]
fn a_wrong_ca_or_a_plain_port_stops_the_services_with_the_cause() {
    let pki = Pki::new();
    let node = TlsNode::start("tlsfail", &pki, false);
    let dir = tempfile::tempdir().unwrap();
    for binary in ["features", "model", "metric"] {
        let result = run_until_exit(
            binary,
            &[
                ("AMQP_URL", secret_url(node.tls_port)),
                ("AMQP_CA_FILE", pki.path("other-ca.pem")),
            ],
            dir.path(),
        );
        assert_fatal(
            binary,
            &result,
            &[
                "not signed by a CA we trust",
                "AMQP_CA_FILE",
                "other-ca.pem",
            ],
        );
    }
    // No AMQP_CA_FILE: the system's store does not know the test CA either.
    let result = run_until_exit(
        "model",
        &[("AMQP_URL", secret_url(node.tls_port))],
        dir.path(),
    );
    assert_fatal(
        "model",
        &result,
        &["not signed by a CA we trust", "AMQP_CA_FILE is not set"],
    );
    // amqps:// on the node's plain AMQP port.
    let result = run_until_exit(
        "model",
        &[
            ("AMQP_URL", secret_url(node.node.port)),
            ("AMQP_CA_FILE", pki.path("ca.pem")),
        ],
        dir.path(),
    );
    assert_fatal(
        "model",
        &result,
        &[&format!("127.0.0.1:{} does not speak TLS", node.node.port)],
    );
}

#[test]
fn an_expired_or_mismatched_certificate_is_named() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let expired = TlsStandIn::start(&pki, "expired");
    let result = run_until_exit(
        "model",
        &[
            ("AMQP_URL", secret_url(expired.port)),
            ("AMQP_CA_FILE", pki.path("ca.pem")),
        ],
        dir.path(),
    );
    assert_fatal("model", &result, &["has expired"]);
    let wrong_host = TlsStandIn::start(&pki, "wrong-host");
    let result = run_until_exit(
        "model",
        &[
            ("AMQP_URL", secret_url(wrong_host.port)),
            ("AMQP_CA_FILE", pki.path("ca.pem")),
        ],
        dir.path(),
    );
    assert_fatal(
        "model",
        &result,
        &["not valid for `127.0.0.1`, the host in AMQP_URL"],
    );
}

#[test]
fn a_client_certificate_is_accepted_and_its_absence_named() {
    let pki = Pki::new();
    let node = TlsNode::start("tlsclient", &pki, true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = Queues::unique("tlsclient").env();
    env.extend([
        ("AMQP_URL".to_owned(), node.amqps_url()),
        ("AMQP_CA_FILE".to_owned(), pki.path("ca.pem")),
        ("AMQP_CLIENT_CERT_FILE".to_owned(), pki.path("client.pem")),
        ("AMQP_CLIENT_KEY_FILE".to_owned(), pki.path("client.key")),
    ]);
    let mut model = spawn_service("model", env, dir.path());
    wait_healthy(&model, Duration::from_secs(60));
    let out = node.node.ctl(&[
        "list_connections",
        "peer_cert_subject",
        "--quiet",
        "--no-table-headers",
    ]);
    let subjects = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        subjects.contains("pipeline test client"),
        "the broker saw no client certificate: {subjects}"
    );
    model.kill();

    let result = run_until_exit(
        "model",
        &[
            ("AMQP_URL", secret_url(node.tls_port)),
            ("AMQP_CA_FILE", pki.path("ca.pem")),
        ],
        dir.path(),
    );
    assert_fatal(
        "model",
        &result,
        &["asks for a client certificate", "AMQP_CLIENT_CERT_FILE"],
    );
}

#[test]
fn an_unreadable_tls_file_stops_the_service_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let missing: PathBuf = dir.path().join("no-such-ca.pem");
    let result = run_until_exit(
        "model",
        &[
            ("AMQP_URL", secret_url(5671)),
            ("AMQP_CA_FILE", missing.display().to_string()),
        ],
        dir.path(),
    );
    assert_fatal(
        "model",
        &result,
        &["cannot read AMQP_CA_FILE", "no-such-ca.pem", "No such file"],
    );
    let pki = Pki::new();
    let result = run_until_exit(
        "metric",
        &[
            ("AMQP_URL", secret_url(5671)),
            ("AMQP_CLIENT_CERT_FILE", pki.path("client.pem")),
        ],
        dir.path(),
    );
    assert_fatal(
        "metric",
        &result,
        &["AMQP_CLIENT_CERT_FILE is set but AMQP_CLIENT_KEY_FILE is not"],
    );
}
