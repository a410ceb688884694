//! Secrets in `AMQP_URL` are never printed: not in the argument error of a malformed URL, not in
//! `--help` (which would otherwise show the variable's value), not in the connect log lines.

use crate::helpers::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const SECRET: &str = "S3CRET";

/// Every binary that takes `AMQP_URL`.
const BINARIES: [&str; 4] = ["features", "model", "metric", "bench"];

fn run_with_url(binary: &str, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin_path(binary))
        .current_dir(repo_root())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", url)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"))
}

#[test]
fn a_malformed_url_is_refused_without_its_password() {
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:notaport/%2f");
    for binary in BINARIES {
        let output = run_with_url(binary, &url, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("AMQP_URL"), "{binary}: {stderr}");
        assert!(
            stderr.contains("amqp://guest:***@127.0.0.1:notaport/%2f"),
            "{binary} does not show the redacted URL: {stderr}"
        );
        assert!(
            !stderr.contains(SECRET) && !stdout.contains(SECRET),
            "{binary} printed the password: {stderr}{stdout}"
        );
    }
}

#[test]
fn help_does_not_show_the_url_of_the_environment() {
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f");
    for binary in BINARIES {
        let output = run_with_url(binary, &url, &["--help"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary} --help failed");
        assert!(stdout.contains("[env: AMQP_URL"), "{binary}: {stdout}");
        assert!(
            !stdout.contains(SECRET),
            "{binary} --help shows the password: {stdout}"
        );
    }
}

/// Guards what already held: the retry lines and `/healthz` of a service that cannot reach its
/// broker name the URL with the password hidden.
#[test]
fn connect_retries_do_not_show_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let closed_port = free_port();
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:{closed_port}/%2f");
    let http_port = free_port();
    let stderr_path = dir.path().join("model.stderr");
    let mut child = Command::new(bin_path("model"))
        .current_dir(repo_root())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .env("AMQP_URL", &url)
        .env("RECONNECT_MAX_DELAY_MS", "200")
        .env("HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    // Until a retry line is logged and /healthz gives the reason (however long a loaded machine
    // takes), so both checks below have something to look at.
    let mut health = None;
    let retried = wait_until(Duration::from_secs(120), || {
        health = http_get(addr, "/healthz");
        std::fs::read_to_string(&stderr_path)
            .unwrap_or_default()
            .contains("broker not reachable, retrying")
            && health
                .as_ref()
                .is_some_and(|(_, body)| body.contains("broker not reachable"))
    });
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        retried,
        "no retry line, or no reason on /healthz ({health:?}): {stderr}"
    );
    assert!(
        stderr.contains(&format!("amqp://guest:***@127.0.0.1:{closed_port}/%2f")),
        "{stderr}"
    );
    assert!(
        !stderr.contains(SECRET),
        "the log shows the password: {stderr}"
    );
    let (status, body) = health.expect("/healthz answers");
    assert_eq!(status, 503);
    assert!(
        !body.contains(SECRET),
        "/healthz shows the password: {body}"
    );
}
