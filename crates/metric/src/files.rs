//! The metric service's files in `LOG_DIR`, appended with whole lines only.
//!
//! - `labels_log.txt`: one line per received message: `time queue id value [model_version]
//!   [audit=<producer>:<window>]`, space-separated (`-` for a message without id; the last field
//!   only for a message that carried a loss-audit tag).
//! - `metric_log.csv`: `id,y_true,y_pred,absolute_error,model_version`, one row per joined id
//!   (a classifier's columns are in [`rows`]).
//!
//! Lines are collected in memory and written with one `write_all` per file at each flush, before
//! the messages are acked; one process owns the files (a lock file), so lines never interleave. A
//! crash mid-write can leave a half line at the end; it belongs to messages that were never acked,
//! so start-up cuts it off and the broker delivers them again. A failed write (disk full) is cut
//! back to the length before it and its lines kept for the next try ([`AppendLog`], shared with
//! the trainer), so a retry never leaves a broken or doubled line; the error is a [`LocalFault`],
//! which pauses consumption.
//!
//! Both files rotate by size: at `LOG_MAX_BYTES` the file is renamed to `<name>.1` (older ones to
//! `.2` … up to `LOG_KEEP_FILES`, the oldest deleted) and a new one started, with the CSV header.
//! `tail -F` follows the name. Start-up reads back across the rotated files where it needs to.

use crate::classification::ClassPair;
use crate::join::{Pair, Value};
use anyhow::Context as _;
use pipeline::broker::LocalFault;
use pipeline::classes::Task;
use pipeline::fs::AppendLog;
use pipeline::messages::LabelKind;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// File name of the message log.
pub const LABELS_LOG: &str = "labels_log.txt";
/// File name of the joined rows.
pub const METRIC_CSV: &str = "metric_log.csv";
mod rows;
pub use rows::{CLASS_CSV_HEADER, CSV_HEADER, LabelLine, Row, header_of, parse_label_line};
/// What starts the loss-audit field of a `labels_log.txt` line (a model version has no `=`).
pub(crate) const AUDIT_PREFIX: &str = "audit=";
/// Lock file that keeps a second metric service away from the same files.
pub const LOCK_FILE: &str = ".metric.lock";
/// Bad rows of the CSV named one by one in the log, per read; beyond it only counted.
const BAD_ROWS_LOGGED: u64 = 10;

/// Holds the exclusive lock on `LOG_DIR` for as long as it lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the lock on `dir`, failing loudly when another metric service holds it.
pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    match try_lock_dir(dir)? {
        Some(lock) => Ok(lock),
        None => anyhow::bail!(
            "another metric service is writing to {} (lock {} is held); run a single metric service",
            dir.display(),
            dir.join(LOCK_FILE).display()
        ),
    }
}

/// Takes the lock on `dir`; `None` while another process holds it.
pub fn try_lock_dir(dir: &Path) -> anyhow::Result<Option<DirLock>> {
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
        Ok(()) => Ok(Some(DirLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Takes the lock on a partition's folder, waiting as a standby while another instance holds it
/// (the lock goes with its process, however it ends); `None` when `shutdown` comes first.
pub async fn lock_dir_waiting(
    dir: &Path,
    shutdown: &pipeline::CancellationToken,
) -> anyhow::Result<Option<DirLock>> {
    let mut waiting = false;
    loop {
        if let Some(lock) = try_lock_dir(dir)? {
            if waiting {
                tracing::info!(dir = %dir.display(), "the folder's lock is free: taking over");
            }
            return Ok(Some(lock));
        }
        if !waiting {
            tracing::info!(
                dir = %dir.display(),
                "standby: another metric instance holds this folder's lock; taking over when it ends"
            );
            waiting = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            _ = shutdown.cancelled() => return Ok(None),
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

/// Which file a position is in: device and inode, so a rotated (renamed) file is still found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A byte position in one log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FilePos {
    /// The file.
    pub file: FileId,
    /// Bytes from its start.
    pub offset: u64,
}

/// `<path>.<n>`: the `n`-th newest rotated file of `path`.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of one log that exist, oldest first: `<path>.N` … `<path>.1`, `<path>`.
pub fn chain(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..)
        .map(|n| rotated_path(path, n))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    if path.exists() {
        files.push(path.to_owned());
    }
    files
}

/// A part of a file to read: from `start` to its end.
pub type Segment = (PathBuf, u64);

/// The parts of `chain` written after `pos`: the rest of the file it is in, then every newer file
/// whole. `None` when that file is no longer there (or is shorter than the position).
pub fn segments_after(chain: &[PathBuf], pos: &FilePos) -> anyhow::Result<Option<Vec<Segment>>> {
    for (index, path) in chain.iter().enumerate() {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read the metadata of {}", path.display()))?;
        if FileId::of(&meta) == pos.file {
            if meta.len() < pos.offset {
                return Ok(None);
            }
            let mut segments = vec![(path.clone(), pos.offset)];
            segments.extend(chain[index + 1..].iter().map(|p| (p.clone(), 0)));
            return Ok(Some(segments));
        }
    }
    Ok(None)
}

/// The parts of `chain` that hold its last `lines` lines (the CSV header of each file not
/// counted when `header` is set), oldest first.
pub fn tail_segments(
    chain: &[PathBuf],
    lines: usize,
    header: bool,
) -> anyhow::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut wanted = lines;
    for path in chain.iter().rev() {
        if wanted == 0 {
            break;
        }
        let (start, found) = tail_start(path, wanted)?;
        segments.push((path.clone(), start));
        let found = if start == 0 && header {
            found.saturating_sub(1)
        } else {
            found
        };
        wanted = wanted.saturating_sub(found);
        if start > 0 {
            break;
        }
    }
    segments.reverse();
    Ok(segments)
}

/// Where the last `lines` lines of `path` start, read backwards in blocks; and how many lines
/// there are from there (fewer when the file is shorter).
fn tail_start(path: &Path, lines: usize) -> anyhow::Result<(u64, usize)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    // Newlines seen from the end; the file ends with one, so line k starts after newline k + 1.
    let mut newlines = 0usize;
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (pos, byte) in chunk.iter().enumerate().rev() {
            if *byte == b'\n' {
                newlines += 1;
                if newlines == lines + 1 {
                    return Ok((start + pos as u64 + 1, lines));
                }
            }
        }
        end = start;
    }
    Ok((0, newlines))
}

/// Moves a `metric_log.csv` with a header that is not ours aside (`metric_log.csv.<secs>.old`),
/// before anything reads it, so its ids are never taken for ours.
pub fn move_foreign_csv_aside(dir: &Path) -> anyhow::Result<()> {
    move_foreign_csv_aside_for(dir, Task::Regression)
}

/// [`move_foreign_csv_aside`] for `task`'s header: a regressor's CSV is foreign to a classifier's
/// run and the other way round.
pub fn move_foreign_csv_aside_for(dir: &Path, task: Task) -> anyhow::Result<()> {
    let csv_path = dir.join(METRIC_CSV);
    let file = match File::open(&csv_path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot open {}", csv_path.display())),
    };
    let mut first = Vec::new();
    BufReader::new(file)
        .take(4096)
        .read_until(b'\n', &mut first)
        .with_context(|| format!("cannot read {}", csv_path.display()))?;
    let first = String::from_utf8_lossy(&first);
    let first = first.trim_end();
    if first.is_empty() || first == header_of(task) {
        return Ok(());
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.join(format!("{METRIC_CSV}.{stamp}.old"));
    std::fs::rename(&csv_path, &aside)
        .with_context(|| format!("cannot move {} aside", csv_path.display()))?;
    tracing::warn!(moved_to = %aside.display(), header = first, "metric_log.csv had another header; moved it aside");
    Ok(())
}

/// What reading the CSV found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CsvRead {
    /// Good rows.
    pub rows: u64,
    /// Rows that are not ours (too few fields, a number that is not one); each reported.
    pub bad_rows: u64,
}

impl std::ops::AddAssign for CsvRead {
    fn add_assign(&mut self, other: Self) {
        self.rows += other.rows;
        self.bad_rows += other.bad_rows;
    }
}

/// A segment's file opened at its start, buffered; `None` when the file is gone (rotated away
/// meanwhile: nothing left to read of it).
fn open_segment(path: &Path, start: u64) -> anyhow::Result<Option<BufReader<File>>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot open {}", path.display())),
    };
    file.seek(SeekFrom::Start(start))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(BufReader::with_capacity(256 * 1024, file)))
}

/// Reads the rows of the CSV segments (a header line is skipped), calling `row` for each good one;
/// a bad row is reported with its file and line (the first few) and counted, never silently skipped.
pub fn read_csv_segments(
    segments: &[Segment],
    mut row: impl FnMut(Row),
) -> anyhow::Result<CsvRead> {
    let mut read = CsvRead::default();
    for (path, start) in segments {
        let Some(segment) = open_segment(path, *start)? else {
            continue;
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(segment);
        let mut record = csv::StringRecord::new();
        loop {
            let problem = match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true)
                    if record.iter().eq(CSV_HEADER.split(','))
                        || record.iter().eq(CLASS_CSV_HEADER.split(',')) =>
                {
                    continue;
                }
                Ok(true) => match rows::parse_row(&record) {
                    Ok(pair) => {
                        read.rows += 1;
                        row(pair);
                        continue;
                    }
                    Err(problem) => problem,
                },
                Err(err) if err.is_io_error() => {
                    return Err(err).with_context(|| format!("cannot read {}", path.display()));
                }
                Err(err) => err.to_string(),
            };
            read.bad_rows += 1;
            if read.bad_rows <= BAD_ROWS_LOGGED {
                let byte = start + reader.position().byte();
                tracing::warn!(file = %path.display(), byte, problem, "bad row in the CSV, not taken as a joined id");
            }
        }
    }
    if read.bad_rows > BAD_ROWS_LOGGED {
        tracing::warn!(
            bad_rows = read.bad_rows,
            "bad rows in the CSV (only the first {BAD_ROWS_LOGGED} named)"
        );
    }
    Ok(read)
}

/// Reads `labels_log.txt` segments line by line, calling `line` for each well-formed one.
pub fn read_label_segments(
    segments: &[Segment],
    mut line: impl FnMut(LabelLine),
) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut text = String::new();
    for (path, start) in segments {
        let Some(mut reader) = open_segment(path, *start)? else {
            continue;
        };
        loop {
            text.clear();
            let read = reader
                .read_line(&mut text)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if read == 0 {
                break;
            }
            if let Some(parsed) = parse_label_line(text.trim_end_matches('\n')) {
                count += 1;
                line(parsed);
            }
        }
    }
    Ok(count)
}

/// Lines in the segments (a count of newlines, read in large blocks).
pub fn count_lines(segments: &[Segment]) -> anyhow::Result<u64> {
    let mut lines = 0;
    for (path, start) in segments {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.seek(SeekFrom::Start(*start))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        loop {
            let buf = reader
                .fill_buf()
                .with_context(|| format!("cannot read {}", path.display()))?;
            if buf.is_empty() {
                break;
            }
            lines += buf.iter().filter(|b| **b == b'\n').count() as u64;
            let len = buf.len();
            reader.consume(len);
        }
    }
    Ok(lines)
}

/// Reads every regressor's row of `metric_log.csv` (not its rotated files).
pub fn read_csv_rows(path: &Path, mut row: impl FnMut(Pair)) -> anyhow::Result<CsvRead> {
    read_csv_segments(&[(path.to_owned(), 0)], |read| {
        if let Row::Numbers(pair) = read {
            row(pair)
        }
    })
}

/// Reads every line of `labels_log.txt` (not its rotated files).
pub fn read_label_lines(path: &Path, line: impl FnMut(LabelLine)) -> anyhow::Result<u64> {
    read_label_segments(&[(path.to_owned(), 0)], line)
}

/// Where `log` stands (identity and length as last written whole).
fn pos(log: &AppendLog) -> anyhow::Result<FilePos> {
    let meta = log
        .sink()
        .metadata()
        .with_context(|| format!("cannot read the metadata of {}", log.path().display()))?;
    Ok(FilePos {
        file: FileId::of(&meta),
        offset: log.len(),
    })
}

/// Renames `log`'s file to `.1` (shifting older ones up to `.keep`, the oldest deleted) and starts
/// a new one with `header`. Call with nothing pending. Safe to call again after a failure: a file
/// already renamed is not shifted twice, and a new file left without its header is removed.
fn rotate(log: &mut AppendLog, keep: usize, header: Option<&str>) -> anyhow::Result<()> {
    let keep = keep.max(1);
    let path = log.path().to_owned();
    // Until the new file is open, lines still go to the old one (now `.1`): whole, in order.
    if path.exists() {
        match std::fs::remove_file(rotated_path(&path, keep)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("cannot delete the oldest rotated {}", path.display())
                });
            }
        }
        for n in (1..keep).rev() {
            let from = rotated_path(&path, n);
            match std::fs::rename(&from, rotated_path(&path, n + 1)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("cannot rotate {}", from.display()));
                }
            }
        }
        std::fs::rename(&path, rotated_path(&path, 1))
            .with_context(|| format!("cannot rotate {}", path.display()))?;
    }
    match AppendLog::open(path.clone(), header) {
        Ok(fresh) => {
            *log = fresh;
            Ok(())
        }
        Err(err) => {
            if std::fs::metadata(&path).is_ok_and(|meta| meta.len() == 0) {
                let _ = std::fs::remove_file(&path);
            }
            Err(err.into())
        }
    }
}

/// When the files rotate.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// Size at which a file is rotated; 0 = never.
    pub max_bytes: u64,
    /// Rotated files kept per log.
    pub keep: usize,
}

/// The two append-only files and their pending lines.
pub struct LogFiles {
    labels: AppendLog,
    csv: AppendLog,
    number: String,
    rotation: Rotation,
    /// The CSV's header, by task.
    header: &'static str,
}

impl LogFiles {
    /// Opens (creating) both files in `dir`; writes the CSV header to a new CSV. Call
    /// [`move_foreign_csv_aside`] first.
    pub fn open(dir: &Path, rotation: Rotation) -> anyhow::Result<Self> {
        Self::open_for(dir, rotation, Task::Regression)
    }

    /// [`LogFiles::open`] with `task`'s CSV header.
    pub fn open_for(dir: &Path, rotation: Rotation, task: Task) -> anyhow::Result<Self> {
        let header = header_of(task);
        Ok(Self {
            labels: AppendLog::open(dir.join(LABELS_LOG), None)?,
            csv: AppendLog::open(dir.join(METRIC_CSV), Some(header))?,
            number: String::new(),
            rotation,
            header,
        })
    }

    /// Queues one line of `labels_log.txt`.
    pub fn push_label(
        &mut self,
        kind: LabelKind,
        id: Option<&str>,
        value: &Value,
        model_version: Option<&str>,
        audit: Option<&str>,
    ) {
        let value = value.log_text();
        let time = humantime::format_rfc3339_micros(SystemTime::now());
        let id = id.unwrap_or("-");
        let kind = kind.as_str();
        let buf = self.labels.buffer();
        // Writing to a Vec cannot fail.
        let _ = match model_version {
            Some(version) => write!(buf, "{time} {kind} {id} {value} {version}"),
            None => write!(buf, "{time} {kind} {id} {value}"),
        };
        let _ = match audit {
            Some(tag) => writeln!(buf, " {AUDIT_PREFIX}{tag}"),
            None => writeln!(buf),
        };
    }

    /// Queues one row of `metric_log.csv`, encoded by the `csv` crate; numbers as Rust prints
    /// them (shortest form that reads back to the same value).
    pub fn push_row(&mut self, pair: &Pair) {
        use std::fmt::Write as _;
        let mut field = |row: &mut csv::Writer<&mut Vec<u8>>, value: f64| {
            self.number.clear();
            let _ = write!(self.number, "{value}");
            row.write_field(&self.number)
        };
        let mut writer = csv::WriterBuilder::new()
            .has_headers(false)
            .buffer_capacity(256)
            .from_writer(self.csv.buffer());
        let row = &mut writer;
        // Writing to a Vec cannot fail.
        let _ = row
            .write_field(&pair.id)
            .and_then(|()| field(row, pair.y_true))
            .and_then(|()| field(row, pair.y_pred))
            .and_then(|()| field(row, pair.absolute_error()))
            .and_then(|()| row.write_field(pair.model_version.as_deref().unwrap_or("")))
            .and_then(|()| row.write_record(None::<&[u8]>));
        let _ = row.flush();
    }

    /// Queues one classifier's row of `metric_log.csv` ([`rows`]).
    pub fn push_class_row(&mut self, pair: &ClassPair) {
        let mut writer = csv::WriterBuilder::new()
            .has_headers(false)
            .buffer_capacity(256)
            .from_writer(self.csv.buffer());
        // Writing to a Vec cannot fail.
        let _ = rows::write_class_row(&mut writer, pair);
        let _ = writer.flush();
    }

    /// Whether nothing is waiting to be written.
    pub fn is_flushed(&self) -> bool {
        self.labels.pending() == 0 && self.csv.pending() == 0
    }

    /// Writes the queued lines, the message log first; rotates a file that reached its size.
    /// Returns whether one rotated. After `Ok`, the lines are in the files. After an error
    /// (a [`LocalFault`]: every failure here is one of the service's own files), nothing partial
    /// is left and it can be called again.
    pub fn flush(&mut self) -> Result<bool, LocalFault> {
        self.labels.flush()?;
        self.csv.flush()?;
        let mut rotated = false;
        if self.rotation.max_bytes > 0 {
            for (log, header) in [(&mut self.labels, None), (&mut self.csv, Some(self.header))] {
                if log.len() >= self.rotation.max_bytes {
                    rotate(log, self.rotation.keep, header).map_err(|err| {
                        let what = format!("{err:#}");
                        let source = err
                            .downcast::<io::Error>()
                            .unwrap_or_else(|err| io::Error::other(format!("{err:#}")));
                        LocalFault { what, source }
                    })?;
                    tracing::info!(file = %log.path().display(), "rotated");
                    rotated = true;
                }
            }
        }
        Ok(rotated)
    }

    /// Positions of both files as written (call when flushed).
    pub fn positions(&self) -> anyhow::Result<(FilePos, FilePos)> {
        Ok((pos(&self.labels)?, pos(&self.csv)?))
    }
}

#[cfg(test)]
mod tests;
