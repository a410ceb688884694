//! The services' own files, written the one way every service does it.
//!
//! - Replacing a file atomically and durably ([`write_atomic`], [`AtomicFile`]): a temporary file
//!   in the same folder, written, synced, renamed over the target, then the folder synced (without
//!   that last step a crash right after the rename may bring back the old file, or none). A reader
//!   sees the old file or the new one, never half of one; a failed write leaves the old file and
//!   no temporary behind.
//! - Appending whole lines ([`AppendLog`]): a failed append (a full disk) is cut back to the
//!   length before it, so the file never keeps half a line, and the lines are kept for the retry.

use crate::broker::LocalFault;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Mode of the files written: readable by others, like the log files (`tempfile` creates 0600,
/// which would hide a model artifact from a model service running as another user).
const MODE: u32 = 0o644;

/// A step of writing a file failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct FileError {
    /// What could not be done (`cannot write`, `cannot move the new file to`, ...).
    pub what: &'static str,
    /// The file (or folder) concerned.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn fail(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError { what, path, source }
}

/// Replaces `path` with `bytes`, atomically and durably (see the module notes).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut file = AtomicFile::create(path)?;
    file.file()
        .write_all(bytes)
        .map_err(fail("cannot write", file.temp_path()))?;
    file.commit()
}

/// A new version of a file, written beside it under a hidden temporary name
/// (`.<name>.<random><suffix>`) and put in its place by [`AtomicFile::commit`]. Dropped without a
/// commit, the temporary file is deleted and the old file stays.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    /// Starts a new version of `path` (temporary name ending in `.tmp`).
    pub fn create(path: &Path) -> Result<Self, FileError> {
        Self::with_suffix(path, ".tmp")
    }

    /// Starts a new version of `path` whose temporary name ends in `suffix` (`.png` for a writer
    /// that picks its format by the extension).
    pub fn with_suffix(path: &Path, suffix: &str) -> Result<Self, FileError> {
        let dir = parent(path);
        let Some(name) = path.file_name() else {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name");
            return Err(fail("cannot write to a path that names no file:", path)(
                source,
            ));
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(suffix)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(MODE))
            .tempfile_in(dir)
            .map_err(fail("cannot create a temporary file in", dir))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
        })
    }

    /// The temporary file, to write to.
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// The temporary file's path, for writers that open a path themselves.
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Syncs the new version, renames it over the target and syncs the folder.
    pub fn commit(self) -> Result<(), FileError> {
        let Self { tmp, path } = self;
        // A writer given the path may have replaced the file: sync what is at the path now.
        File::open(tmp.path())
            .and_then(|file| file.sync_all())
            .map_err(fail("cannot sync", tmp.path()))?;
        // On error `persist` hands the temporary back, and dropping it deletes it.
        tmp.persist(&path)
            .map_err(|err| fail("cannot move the new file to", &path)(err.error))?;
        let dir = parent(&path);
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(fail("cannot sync the folder", dir))
    }
}

/// The folder of `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Opens `path` for appending, creating it if needed.
pub fn open_append(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(fail("cannot open for appending", path))
}

/// Something that can be cut back to a length: a file, or a fake disk in tests.
pub trait Truncate {
    /// Cuts to `len` bytes.
    fn truncate_to(&mut self, len: u64) -> io::Result<()>;
}

impl Truncate for File {
    fn truncate_to(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// One append-only file of whole lines, its known length and the lines waiting to be written.
///
/// Lines are queued in memory ([`AppendLog::buffer`]) and written by [`AppendLog::flush`], all or
/// none. The sink must append (a file opened by [`open_append`]): after a cut, the next write goes
/// to the new end.
pub struct AppendLog<W = File> {
    path: PathBuf,
    sink: W,
    /// Length of the file as last written whole: what a failed write is cut back to.
    len: u64,
    /// A failed write could not be cut back yet: cut before writing again.
    needs_cut: bool,
    buf: Vec<u8>,
}

impl<W: io::Write + Truncate> AppendLog<W> {
    /// A log writing to `sink` (the file at `path`), which is `len` bytes long.
    pub fn new(path: PathBuf, sink: W, len: u64) -> Self {
        Self {
            path,
            sink,
            len,
            needs_cut: false,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// The lines waiting to be written: push whole lines, each ending in `\n`.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes the pending lines, all or none: a failed or partial write is cut back to the length
    /// before it and the lines are kept, so calling it again after a failure is safe (a
    /// [`LocalFault`]: the consume loop pauses and calls it again).
    pub fn flush(&mut self) -> Result<(), LocalFault> {
        if self.buf.is_empty() && !self.needs_cut {
            return Ok(());
        }
        let fault = |what: &str, source| LocalFault {
            what: format!("cannot {what} {}", self.path.display()),
            source,
        };
        if self.needs_cut {
            self.sink
                .truncate_to(self.len)
                .map_err(|err| fault("cut back a failed write in", err))?;
            self.needs_cut = false;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(err) = self
            .sink
            .write_all(&self.buf)
            .and_then(|()| self.sink.flush())
        {
            // Whatever part went in is cut off now, or before the next write.
            self.needs_cut = self.sink.truncate_to(self.len).is_err();
            return Err(fault("append to", err));
        }
        self.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Pending bytes.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Length as last written whole.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was ever written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sink (the open file, for its metadata or a sync).
    pub fn sink(&self) -> &W {
        &self.sink
    }
}

impl AppendLog<File> {
    /// Opens (creating) `path` for appending; a new or empty file starts with `header`.
    pub fn open(path: PathBuf, header: Option<&str>) -> Result<Self, FileError> {
        let mut file = open_append(&path)?;
        let mut len = file
            .metadata()
            .map_err(fail("cannot read the metadata of", &path))?
            .len();
        if len == 0
            && let Some(header) = header
        {
            let line = format!("{header}\n");
            if let Err(err) = file.write_all(line.as_bytes()) {
                // No half header left for the next open to take as written.
                let _ = file.set_len(0);
                return Err(fail("cannot write the header of", &path)(err));
            }
            len = line.len() as u64;
        }
        Ok(Self::new(path, file, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["model.json"]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_bare_file_name_is_written_in_the_current_folder() {
        assert_eq!(parent(Path::new("x.json")), Path::new("."));
        assert_eq!(parent(Path::new("a/x.json")), Path::new("a"));
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        write_atomic(&path, b"old").unwrap();
        {
            let mut file = AtomicFile::with_suffix(&path, ".png").unwrap();
            assert!(file.temp_path().to_string_lossy().ends_with(".png"));
            file.file().write_all(b"half").unwrap();
            // Dropped without commit, as on an error.
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["checkpoint"]);
        assert!(write_atomic(Path::new("/"), b"x").is_err());
        let err = write_atomic(&dir.path().join("missing/x"), b"x").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot create a temporary file in")
        );
    }

    #[test]
    fn a_writer_may_write_to_the_temporary_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let file = AtomicFile::with_suffix(&path, ".png").unwrap();
        std::fs::write(file.temp_path(), b"png").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"png");
        assert_eq!(names(dir.path()), ["plot.png"]);
    }

    /// A disk with `room` bytes left: a write takes what fits (at most 7 bytes at a time), then
    /// fails like a full disk; `cut_fails` makes cutting back fail too.
    struct FakeDisk {
        data: Vec<u8>,
        room: usize,
        cut_fails: bool,
    }

    impl FakeDisk {
        fn with(data: &[u8], room: usize) -> Self {
            Self {
                data: data.to_vec(),
                room,
                cut_fails: false,
            }
        }
    }

    impl io::Write for FakeDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let take = buf.len().min(self.room).min(7);
            if take == 0 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            self.data.extend_from_slice(&buf[..take]);
            self.room -= take;
            Ok(take)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Truncate for FakeDisk {
        fn truncate_to(&mut self, len: u64) -> io::Result<()> {
            if self.cut_fails {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            let cut = self.data.len() - len as usize;
            self.data.truncate(len as usize);
            self.room += cut;
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_midway_leaves_nothing_and_is_written_once_on_retry() {
        let mut log = AppendLog::new(
            PathBuf::from("fake.txt"),
            FakeDisk::with(b"old line\n", 30),
            9,
        );
        log.buffer()
            .extend_from_slice(b"first line of twenty\nsecond line of twenty\n");
        let fault = log.flush().unwrap_err();
        assert_eq!(fault.source.kind(), io::ErrorKind::StorageFull);
        assert!(fault.to_string().contains("fake.txt"), "{fault}");
        assert!(
            matches!(
                crate::broker::HandlerError::from(fault),
                crate::broker::HandlerError::LocalFault(_)
            ),
            "a write error is a local fault"
        );
        // Nothing of the failed write is left, the lines are kept.
        assert_eq!(log.sink().data, b"old line\n");
        assert_eq!(log.pending(), 43);
        // More lines come while the disk is full: still nothing half written.
        log.buffer().extend_from_slice(b"third\n");
        assert!(log.flush().is_err());
        assert_eq!(log.sink().data, b"old line\n");
        // Space again: every line once, whole.
        log.sink.room = 1000;
        log.flush().unwrap();
        assert_eq!(
            String::from_utf8(log.sink().data.clone()).unwrap(),
            "old line\nfirst line of twenty\nsecond line of twenty\nthird\n"
        );
        assert_eq!((log.len(), log.pending()), (58, 0));
    }

    #[test]
    fn a_cut_that_fails_is_done_before_the_next_write() {
        let mut log = AppendLog::new(PathBuf::from("fake.txt"), FakeDisk::with(b"", 10), 0);
        log.buffer().extend_from_slice(b"a line of sixteen\n");
        log.sink.cut_fails = true;
        assert!(log.flush().is_err());
        // Half a line is on the fake disk; the next flush cuts it first, or fails without writing.
        assert_eq!(log.sink().data, b"a line of ");
        let fault = log.flush().unwrap_err();
        assert!(fault.what.starts_with("cannot cut back"), "{fault}");
        assert_eq!(log.sink().data, b"a line of ");
        log.sink.cut_fails = false;
        log.sink.room = 100;
        log.flush().unwrap();
        assert_eq!(log.sink().data, b"a line of sixteen\n");
        assert_eq!(log.len(), 18);
    }

    #[test]
    fn a_log_file_opens_at_its_end_and_starts_with_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        let mut log = AppendLog::open(path.clone(), Some("a,b")).unwrap();
        assert_eq!(log.len(), 4);
        log.buffer().extend_from_slice(b"1,2\n");
        log.flush().unwrap();
        drop(log);
        let log = AppendLog::open(path.clone(), Some("a,b")).unwrap();
        assert_eq!(log.len(), 8);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a,b\n1,2\n");
        let err = open_append(&dir.path().join("missing/x")).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open for appending"),
            "{err}"
        );
    }
}
