//! The metric service's files in `LOG_DIR`, appended with whole lines only.
//!
//! - `labels_log.txt`: one line per received message: `time queue id value [model_version]`,
//!   space-separated (`-` for a message without id).
//! - `metric_log.csv`: `id,y_true,y_pred,absolute_error,model_version`, one row per joined id.
//!
//! Lines are collected in memory and written with one `write_all` per file at each flush, before
//! the messages are acked; one process owns the files (a lock file), so lines never interleave. A
//! crash mid-write can leave a half line at the end; it belongs to messages that were never acked,
//! so start-up cuts it off and the broker delivers them again.

use crate::join::Pair;
use anyhow::Context as _;
use pipeline::messages::LabelKind;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// File name of the message log.
pub const LABELS_LOG: &str = "labels_log.txt";
/// File name of the joined rows.
pub const METRIC_CSV: &str = "metric_log.csv";
/// Header of [`METRIC_CSV`].
pub const CSV_HEADER: &str = "id,y_true,y_pred,absolute_error,model_version";
/// Lock file that keeps a second metric service away from the same files.
pub const LOCK_FILE: &str = ".metric.lock";

/// One line of `labels_log.txt`, read back at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelLine {
    /// `y_true` or `y_pred`.
    pub kind: LabelKind,
    /// Sample id; `None` for `-`.
    pub id: Option<String>,
    /// The value.
    pub value: f64,
    /// Model version of a prediction.
    pub model_version: Option<String>,
}

/// Holds the exclusive lock on `LOG_DIR` for as long as it lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the lock on `dir`, failing loudly when another metric service holds it.
pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create LOG_DIR {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another metric service is writing to {} (lock {} is held); run a single metric service",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Cuts a trailing half line (no final newline) left by a crash. Returns the bytes removed.
pub fn repair_tail(path: &Path) -> anyhow::Result<u64> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("cannot open {}", path.display())),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Walk back from the end in blocks to the last newline.
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(0);
        }
        if let Some(pos) = chunk.iter().rposition(|b| *b == b'\n') {
            break start + pos as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    file.set_len(keep)
        .with_context(|| format!("cannot cut the half line at the end of {}", path.display()))?;
    Ok(len - keep)
}

/// Parses one line of `labels_log.txt`; `None` for a line that is not ours.
pub fn parse_label_line(line: &str) -> Option<LabelLine> {
    let mut fields = line.split(' ');
    let _time = fields.next()?;
    let kind = match fields.next()? {
        "y_true" => LabelKind::YTrue,
        "y_pred" => LabelKind::YPred,
        _ => return None,
    };
    let id = match fields.next()? {
        "-" => None,
        id => Some(id.to_owned()),
    };
    let value = fields.next()?.parse().ok()?;
    let model_version = fields.next().map(str::to_owned);
    Some(LabelLine {
        kind,
        id,
        value,
        model_version,
    })
}

/// Calls `line` with the index and text of every line of `path`; a missing file has no lines.
fn for_each_line(path: &Path, mut line: impl FnMut(usize, &str)) -> anyhow::Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot open {}", path.display())),
    };
    for (index, text) in BufReader::new(file).lines().enumerate() {
        let text = text.with_context(|| format!("cannot read {}", path.display()))?;
        line(index, &text);
    }
    Ok(())
}

/// Reads the rows of `metric_log.csv` (after its header), calling `row` for each.
pub fn read_csv_rows(path: &Path, mut row: impl FnMut(Pair)) -> anyhow::Result<u64> {
    let mut rows = 0;
    for_each_line(path, |index, line| {
        if index == 0 {
            return;
        }
        let mut fields = line.split(',');
        let (Some(id), Some(y_true), Some(y_pred)) = (fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        let (Ok(y_true), Ok(y_pred)) = (y_true.parse(), y_pred.parse()) else {
            return;
        };
        let _absolute_error = fields.next();
        let model_version = fields.next().filter(|v| !v.is_empty()).map(str::to_owned);
        rows += 1;
        row(Pair {
            id: id.to_owned(),
            y_true,
            y_pred,
            model_version,
            sent_at_us: None,
        });
    })?;
    Ok(rows)
}

/// Reads `labels_log.txt` line by line, calling `line` for each well-formed one.
pub fn read_label_lines(path: &Path, mut line: impl FnMut(LabelLine)) -> anyhow::Result<u64> {
    let mut count = 0;
    for_each_line(path, |_, text| {
        if let Some(parsed) = parse_label_line(text) {
            count += 1;
            line(parsed);
        }
    })?;
    Ok(count)
}

/// The two append-only files and their pending lines.
pub struct LogFiles {
    labels: File,
    csv: File,
    labels_buf: Vec<u8>,
    csv_buf: Vec<u8>,
    csv_path: PathBuf,
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for appending", path.display()))
}

impl LogFiles {
    /// Opens (creating) both files in `dir`; writes the CSV header to a new CSV. A CSV with another
    /// header is moved aside, not mixed with ours.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let csv_path = dir.join(METRIC_CSV);
        if let Ok(file) = File::open(&csv_path) {
            let mut first = String::new();
            BufReader::new(file).read_line(&mut first)?;
            let first = first.trim_end();
            if !first.is_empty() && first != CSV_HEADER {
                let stamp = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = dir.join(format!("{METRIC_CSV}.{stamp}.old"));
                std::fs::rename(&csv_path, &aside)?;
                tracing::warn!(moved_to = %aside.display(), header = first, "metric_log.csv had another header; moved it aside");
            }
        }
        let mut csv = open_append(&csv_path)?;
        if csv.metadata()?.len() == 0 {
            csv.write_all(format!("{CSV_HEADER}\n").as_bytes())?;
        }
        Ok(Self {
            labels: open_append(&dir.join(LABELS_LOG))?,
            csv,
            labels_buf: Vec::with_capacity(64 * 1024),
            csv_buf: Vec::with_capacity(64 * 1024),
            csv_path,
        })
    }

    /// Queues one line of `labels_log.txt`.
    pub fn push_label(
        &mut self,
        kind: LabelKind,
        id: Option<&str>,
        value: f64,
        model_version: Option<&str>,
    ) {
        let time = humantime::format_rfc3339_micros(SystemTime::now());
        let id = id.unwrap_or("-");
        let kind = kind.as_str();
        // Writing to a Vec cannot fail.
        let _ = match model_version {
            Some(version) => writeln!(self.labels_buf, "{time} {kind} {id} {value} {version}"),
            None => writeln!(self.labels_buf, "{time} {kind} {id} {value}"),
        };
    }

    /// Queues one row of `metric_log.csv`.
    pub fn push_row(&mut self, pair: &Pair) {
        let _ = writeln!(
            self.csv_buf,
            "{},{},{},{},{}",
            pair.id,
            pair.y_true,
            pair.y_pred,
            pair.absolute_error(),
            pair.model_version.as_deref().unwrap_or("")
        );
    }

    /// Writes the queued lines, the message log first. After this returns, they are in the files.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if !self.labels_buf.is_empty() {
            self.labels
                .write_all(&self.labels_buf)
                .context("cannot append to labels_log.txt")?;
            self.labels_buf.clear();
        }
        if !self.csv_buf.is_empty() {
            self.csv
                .write_all(&self.csv_buf)
                .with_context(|| format!("cannot append to {}", self.csv_path.display()))?;
            self.csv_buf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_lines_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, "one\ntwo\nthr").unwrap();
        assert_eq!(repair_tail(&path).unwrap(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        assert_eq!(repair_tail(&path).unwrap(), 0);
        std::fs::write(&path, "no newline at all").unwrap();
        assert_eq!(repair_tail(&path).unwrap(), 17);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert_eq!(repair_tail(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn lines_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LogFiles::open(dir.path()).unwrap();
        files.push_label(LabelKind::YTrue, Some("a"), 151.0, None);
        files.push_label(LabelKind::YPred, Some("a"), 0.1 + 0.2, Some("ols-1"));
        files.push_label(LabelKind::YPred, None, 3.5, None);
        files.push_row(&Pair {
            id: "a".into(),
            y_true: 151.0,
            y_pred: 0.1 + 0.2,
            model_version: Some("ols-1".into()),
            sent_at_us: None,
        });
        files.flush().unwrap();
        let mut lines = Vec::new();
        read_label_lines(&dir.path().join(LABELS_LOG), |l| lines.push(l)).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].value, 0.1 + 0.2);
        assert_eq!(lines[1].model_version.as_deref(), Some("ols-1"));
        assert_eq!(lines[2].id, None);
        let mut rows = Vec::new();
        read_csv_rows(&dir.path().join(METRIC_CSV), |p| rows.push(p)).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].y_pred, 0.1 + 0.2);
        let csv = std::fs::read_to_string(dir.path().join(METRIC_CSV)).unwrap();
        assert!(csv.starts_with(CSV_HEADER));
    }

    #[test]
    fn second_lock_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _first = lock_dir(dir.path()).unwrap();
        let err = lock_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another metric service"), "{err}");
    }
}
