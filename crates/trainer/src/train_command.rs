//! `TRAIN_COMMAND`: the user's own training code as the trainer's candidate maker. The window's
//! training rows go to a CSV, the command runs under `sh -c` in a folder of its own with the paths
//! in environment variables and a time limit, and the `.onnx` it writes is the candidate, which
//! the trainer then stamps and scores itself ([`crate::retrain`]): the command never sees the
//! holdout and never decides a promotion.

use pipeline::CancellationToken;
use pipeline::dataset::Dataset;
use pipeline::messages::Target;
use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of the command's output a failure report carries.
const TAIL_BYTES: u64 = 2048;
/// How often a running command is checked on.
const POLL: Duration = Duration::from_millis(50);

/// The command and its limits.
#[derive(Clone, Debug)]
pub struct TrainCommand {
    /// Run by `sh -c`.
    pub command: String,
    /// Killed (with its process group) after this long.
    pub timeout: Duration,
    /// Cancelled at shutdown: a running command is killed.
    pub stop: CancellationToken,
}

/// Why the command gave no candidate. Each is the command's failure, not the trainer's: the
/// served model stays and the next retrain tries again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandFailure {
    /// It could not be started, or its files written.
    Start(String),
    /// It ended with a failure status.
    Exit { status: String, tail: String },
    /// It ran past `TRAIN_TIMEOUT_SECS` and was killed.
    TimedOut { secs: u64, tail: String },
    /// The trainer was stopping: it was killed.
    Stopped,
    /// It succeeded but wrote nothing at `TRAIN_OUTPUT`.
    NoModel { tail: String },
}

impl std::fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with_tail = |f: &mut std::fmt::Formatter<'_>, what: String, tail: &str| {
            if tail.is_empty() {
                write!(f, "{what} (it printed nothing)")
            } else {
                write!(f, "{what}; the end of its output: {tail}")
            }
        };
        match self {
            Self::Start(why) => write!(f, "TRAIN_COMMAND could not be run: {why}"),
            Self::Exit { status, tail } => with_tail(f, format!("TRAIN_COMMAND {status}"), tail),
            Self::TimedOut { secs, tail } => with_tail(
                f,
                format!(
                    "TRAIN_COMMAND ran longer than TRAIN_TIMEOUT_SECS ({secs} s) and was killed"
                ),
                tail,
            ),
            Self::Stopped => write!(f, "TRAIN_COMMAND was killed: the trainer is stopping"),
            Self::NoModel { tail } => with_tail(
                f,
                "TRAIN_COMMAND succeeded but wrote no model at TRAIN_OUTPUT".to_owned(),
                tail,
            ),
        }
    }
}

/// The rows the command trains on, as CSV: a header of the feature names and the target's, then
/// every value in Rust's shortest exact form (`1e-300`, `2.0`: it reads back to the same `f64`);
/// a classifier's label as the data has it (quoted when it holds a comma or a quote).
pub fn write_csv(data: &Dataset, path: &Path) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut line = String::new();
    line.push_str(&data.feature_names.join(","));
    let _ = write!(line, ",{}", data.target_name);
    writeln!(out, "{line}")?;
    for row in 0..data.len() {
        line.clear();
        for value in data.row(row) {
            let _ = write!(line, "{value:?},");
        }
        match data.label(row) {
            Target::Number(value) => {
                let _ = write!(line, "{value:?}");
            }
            Target::Class(label) => {
                let text = label.key();
                if text.contains([',', '"', '\n']) {
                    let _ = write!(line, "\"{}\"", text.replace('"', "\"\""));
                } else {
                    line.push_str(&text);
                }
            }
        }
        writeln!(out, "{line}")?;
    }
    out.into_inner().map_err(|err| err.into_error())?.sync_all()
}

impl TrainCommand {
    /// Runs the command on `data` for a candidate of `version`; the bytes it wrote at
    /// `TRAIN_OUTPUT`. Blocking: call it off the async workers.
    pub fn run(&self, data: &Dataset, version: &str) -> Result<Vec<u8>, CommandFailure> {
        let start =
            |what: &str, err: std::io::Error| CommandFailure::Start(format!("{what}: {err}"));
        let dir = tempfile::Builder::new()
            .prefix("train-command-")
            .tempdir()
            .map_err(|err| start("cannot create its folder", err))?;
        let (csv, output, log) = (
            dir.path().join("train.csv"),
            dir.path().join("candidate.onnx"),
            dir.path().join("output.log"),
        );
        write_csv(data, &csv).map_err(|err| start("cannot write TRAIN_DATA", err))?;
        let log_file =
            std::fs::File::create(&log).map_err(|err| start("cannot create its log", err))?;
        let stderr = log_file
            .try_clone()
            .map_err(|err| start("cannot create its log", err))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .current_dir(dir.path())
            .env("TRAIN_DATA", &csv)
            .env("TRAIN_OUTPUT", &output)
            .env("TRAIN_TARGET", &data.target_name)
            .env("TRAIN_FEATURES", data.feature_names.join(","))
            .env("TRAIN_VERSION", version)
            // What to fit: `classification` when the target is a class label.
            .env(
                "TRAIN_TASK",
                if data.classes().is_some() {
                    "classification"
                } else {
                    "regression"
                },
            )
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            // Its own process group, so a timeout kills whatever it started too.
            .process_group(0)
            .spawn()
            .map_err(|err| start("cannot start sh", err))?;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(err) => break Err(CommandFailure::Start(format!("cannot wait for it: {err}"))),
            }
            let stopping = self.stop.is_cancelled();
            if stopping || Instant::now() >= deadline {
                kill_group(child.id());
                let _ = child.wait();
                break Err(if stopping {
                    CommandFailure::Stopped
                } else {
                    CommandFailure::TimedOut {
                        secs: self.timeout.as_secs(),
                        tail: tail(&log),
                    }
                });
            }
            std::thread::sleep(POLL);
        }?;
        if !status.success() {
            return Err(CommandFailure::Exit {
                status: describe(status),
                tail: tail(&log),
            });
        }
        match std::fs::read(&output) {
            Ok(bytes) if !bytes.is_empty() => Ok(bytes),
            _ => Err(CommandFailure::NoModel { tail: tail(&log) }),
        }
    }
}

/// SIGKILL to the process group `pid` leads.
fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// `exited with status 3`, `was killed by signal 9`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// The last lines of the command's output, on one line.
fn tail(log: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Dataset {
        Dataset::from_rows(
            vec!["a".into(), "b".into()],
            "y".into(),
            vec![0.1, 2.0, 1e-300, -3.5],
            vec![1.0, 2.5],
        )
        .unwrap()
    }

    fn command(text: &str, timeout: Duration) -> TrainCommand {
        TrainCommand {
            command: text.to_owned(),
            timeout,
            stop: CancellationToken::new(),
        }
    }

    #[test]
    fn the_command_gets_the_rows_and_its_output_is_the_candidate() {
        // The command copies its inputs into its output: the CSV and the variables it saw.
        let run = command(
            r#"{ cat "$TRAIN_DATA"; echo "$TRAIN_TARGET $TRAIN_FEATURES $TRAIN_VERSION"; } > "$TRAIN_OUTPUT""#,
            Duration::from_secs(10),
        );
        let bytes = run.run(&data(), "v7").unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "a,b,y\n0.1,2.0,1.0\n1e-300,-3.5,2.5\ny a,b v7\n"
        );
    }

    #[test]
    fn failures_say_what_happened_with_the_end_of_the_output() {
        let failed = command(
            "echo first; echo 'bad things' >&2; exit 3",
            Duration::from_secs(10),
        )
        .run(&data(), "v1")
        .unwrap_err();
        assert_eq!(
            failed,
            CommandFailure::Exit {
                status: "exited with status 3".into(),
                tail: "first | bad things".into()
            }
        );
        assert!(
            failed.to_string().contains("exited with status 3"),
            "{failed}"
        );
        let nothing = command("echo done", Duration::from_secs(10))
            .run(&data(), "v1")
            .unwrap_err();
        assert_eq!(
            nothing,
            CommandFailure::NoModel {
                tail: "done".into()
            }
        );
        let missing = command("no-such-program-here", Duration::from_secs(10))
            .run(&data(), "v1")
            .unwrap_err();
        assert!(
            matches!(missing, CommandFailure::Exit { ref status, .. } if status == "exited with status 127"),
            "{missing:?}"
        );
    }

    #[test]
    fn a_hanging_command_and_its_children_are_killed_at_the_limit() {
        let started = Instant::now();
        let hung = command(
            "echo going; sleep 30 & sleep 30; echo never > \"$TRAIN_OUTPUT\"",
            Duration::from_millis(300),
        )
        .run(&data(), "v1")
        .unwrap_err();
        assert_eq!(
            hung,
            CommandFailure::TimedOut {
                secs: 0,
                tail: "going".into()
            }
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_stopping_trainer_kills_the_command() {
        let run = command("sleep 30", Duration::from_secs(60));
        let stop = run.stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stop.cancel();
        });
        assert_eq!(run.run(&data(), "v1").unwrap_err(), CommandFailure::Stopped);
    }
}
