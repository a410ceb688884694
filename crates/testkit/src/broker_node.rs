//! Private RabbitMQ nodes for tests that stop, restart or cluster a broker, so they never touch the
//! machine's broker or each other: own node name, AMQP, distribution and epmd ports, data dir and
//! Erlang cookie. The node runs as user `rabbitmq` (its files belong to that user) through
//! `setpriv`, so the spawned process is the node's own start script and the test owns it.

use crate::{free_port, wait_until};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A port outside the ranges RabbitMQ's own tools use.
fn node_port() -> u16 {
    loop {
        let port = free_port();
        if !(35672..=35682).contains(&port) {
            return port;
        }
    }
}

/// A private broker node.
pub struct BrokerNode {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    _base: Option<tempfile::TempDir>,
}

impl BrokerNode {
    /// Prepares and starts a single node.
    pub fn start(label: &str) -> Self {
        let mut node = Self::prepare(
            label,
            node_port(),
            &format!("cookie-{}", uuid::Uuid::new_v4().simple()),
            None,
        );
        node.spawn();
        node.wait_ready();
        node
    }

    /// Prepares and starts a single node with `extra` lines added to its `rabbitmq.conf` (a TLS
    /// listener, ...). Files it names must be readable by the `rabbitmq` user.
    pub fn start_with_config(label: &str, extra: &str) -> Self {
        let mut node = Self::prepare(
            label,
            node_port(),
            &format!("cookie-{}", uuid::Uuid::new_v4().simple()),
            None,
        );
        let conf = node.dir.join("rabbitmq.conf");
        let mut text = std::fs::read_to_string(&conf).expect("rabbitmq.conf");
        text.push_str(extra);
        std::fs::write(&conf, text).expect("rabbitmq.conf");
        node.spawn();
        node.wait_ready();
        node
    }

    /// Prepares a node without starting it. Nodes of one cluster share `epmd_port` and `cookie`.
    pub fn prepare(label: &str, epmd_port: u16, cookie: &str, base: Option<&Path>) -> Self {
        assert!(
            Path::new(RABBITMQ_BIN).join("rabbitmq-server").exists(),
            "RabbitMQ is not installed ({RABBITMQ_BIN}); scripts/test installs Debian's rabbitmq-server"
        );
        let (base_dir, owned) = match base {
            Some(base) => (base.to_owned(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("rmqtest-")
                    .tempdir()
                    .expect("tempdir");
                (dir.path().to_owned(), Some(dir))
            }
        };
        // The node runs as `rabbitmq`, which must be able to reach its dir.
        std::fs::set_permissions(&base_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let name = format!(
            "{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let port = node_port();
        let dir = base_dir.join(&name);
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node dir");
        }
        let cookie_path = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie_path, cookie).expect("cookie");
        std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o400))
            .expect("chmod cookie");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("env conf");
        std::fs::write(dir.join("enabled_plugins"), "[].").expect("plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\ndisk_free_limit.absolute = 1MB\nlog.console = false\nlog.file.level = info\n"
            ),
        )
        .expect("rabbitmq.conf");
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the node dir failed");
        Self {
            name,
            port,
            dist_port: node_port(),
            epmd_port,
            dir,
            child: None,
            _base: owned,
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's OS process (the Erlang VM), from the pid file it writes once started; for
    /// reading its CPU time.
    pub fn os_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("rabbit.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn node_name(&self) -> String {
        format!("{}@localhost", self.name)
    }

    /// Starts the node process (returns at once; see [`Self::wait_ready`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.name);
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("log");
        let stderr = stdout.try_clone().expect("log");
        let dir = &self.dir;
        let child = Command::new("setpriv")
            .args([
                "--reuid=rabbitmq",
                "--regid=rabbitmq",
                "--init-groups",
                "--",
            ])
            .arg(Path::new(RABBITMQ_BIN).join("rabbitmq-server"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", self.node_name())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONFIG_FILES", dir.join("conf.d"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("cannot start rabbitmq-server through setpriv");
        self.child = Some(child);
    }

    /// Waits until the AMQP port accepts connections (panics with the node's log after 90 s or
    /// when the node exits first).
    pub fn wait_ready(&mut self) {
        let port = self.port;
        let ready = wait_until(Duration::from_secs(90), || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return true;
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let exited = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
        if !ready || exited {
            panic!(
                "broker node {} did not start:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// Stops the node cleanly (SIGTERM), killing it if it takes more than 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let stopped = wait_until(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
        }
        let _ = child.wait();
    }

    /// Kills the node at once (SIGKILL to its whole process group), as a machine lost would: no
    /// goodbye to its peers or clients. Its data stays; [`Self::spawn`] starts it again.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", child.id())])
            .status();
        let _ = child.wait();
    }

    /// Stops and starts the node again with the same data (durable queues and persistent messages
    /// survive).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Runs `rabbitmqctl -n <node> args...` against this node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", self.dir.join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .current_dir(&self.dir)
            .arg("-n")
            .arg(self.node_name())
            .args(args)
            .output()
            .expect("rabbitmqctl")
    }

    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for file in [
            self.dir.join("stdout.log"),
            self.dir
                .join("log")
                .join(format!("{}.log", self.node_name())),
        ] {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- {}\n{}\n",
                file.display(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
        }
        out
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // The whole process group: start script, beam and its helpers.
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A cluster of private nodes joined to the first one.
pub struct BrokerCluster {
    pub nodes: Vec<BrokerNode>,
    _base: tempfile::TempDir,
}

impl BrokerCluster {
    /// Starts `size` nodes (in parallel) and joins them into one cluster.
    pub fn start(size: usize) -> Self {
        let base = tempfile::Builder::new()
            .prefix("rmqcluster-")
            .tempdir()
            .expect("tempdir");
        let epmd_port = node_port();
        let cookie = format!("cluster-{}", uuid::Uuid::new_v4().simple());
        let mut nodes: Vec<BrokerNode> = (0..size)
            .map(|i| BrokerNode::prepare(&format!("c{i}"), epmd_port, &cookie, Some(base.path())))
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_ready();
        }
        let first = nodes[0].node_name();
        for node in &nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                let out = node.ctl(&args);
                assert!(
                    out.status.success(),
                    "rabbitmqctl {args:?} on {}: {}{}",
                    node.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let out = nodes[0].ctl(&["await_online_nodes", &size.to_string(), "--timeout", "60"]);
        assert!(
            out.status.success(),
            "cluster did not form: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { nodes, _base: base }
    }

    /// All nodes' URLs, comma-separated, as `AMQP_URL` takes them.
    pub fn amqp_urls(&self) -> String {
        self.nodes
            .iter()
            .map(BrokerNode::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        // Nodes first (they hold the shared epmd), then the directory.
        self.nodes.clear();
    }
}

/// Drops every packet to and from a local TCP port with iptables (a silent network cut, as a
/// pulled cable or a partition looks); the rules go away when this is dropped.
pub struct PortCut {
    port: String,
}

/// The four rules of a cut: both directions, as seen by INPUT and OUTPUT on loopback.
fn cut_rules(port: &str) -> [[&str; 6]; 4] {
    [
        ["INPUT", "-p", "tcp", "--dport", port, "-j"],
        ["INPUT", "-p", "tcp", "--sport", port, "-j"],
        ["OUTPUT", "-p", "tcp", "--dport", port, "-j"],
        ["OUTPUT", "-p", "tcp", "--sport", port, "-j"],
    ]
}

fn iptables(action: &str, rule: &[&str]) -> bool {
    Command::new("iptables")
        .arg(action)
        .args(rule)
        .arg("DROP")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

impl PortCut {
    /// Cuts `port`; panics when iptables is missing or not allowed (scripts/test installs it;
    /// it needs root or CAP_NET_ADMIN).
    pub fn start(port: u16) -> Self {
        let port = port.to_string();
        for rule in cut_rules(&port) {
            assert!(
                iptables("-I", &rule),
                "iptables -I {} failed: the network cut test needs iptables and root \
                 (set PIPELINE_SKIP_IPTABLES_TEST=1 to skip it)",
                rule.join(" ")
            );
        }
        Self { port }
    }

    /// Ends the cut.
    pub fn heal(self) {}
}

impl Drop for PortCut {
    fn drop(&mut self) {
        for rule in cut_rules(&self.port) {
            while iptables("-D", &rule) {}
        }
    }
}

impl BrokerNode {
    /// Freezes the whole node (SIGSTOP to its process group): connections stay open, nothing is
    /// answered, as with a broker that hangs.
    pub fn freeze(&self) {
        self.signal_group("STOP");
    }

    /// Lets a frozen node run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_group("CONT");
    }

    fn signal_group(&self, signal: &str) {
        let child = self.child.as_ref().expect("node running");
        let status = Command::new("kill")
            .args(["-s", signal, "--", &format!("-{}", child.id())])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} of node {}", self.name);
    }
}
