//! Replacing a file atomically and durably, the one way every service does it: a temporary file
//! in the same folder, written, synced, renamed over the target, then the folder synced (without
//! that last step a crash right after the rename may bring back the old file, or none).
//!
//! A reader sees the old file or the new one, never half of one; a failed write leaves the old
//! file and no temporary behind.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Mode of the files written: readable by others, like the log files (`tempfile` creates 0600,
/// which would hide a model artifact from a model service running as another user).
const MODE: u32 = 0o644;

/// A step of an atomic write failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct AtomicWriteError {
    /// What could not be done (`cannot write`, `cannot move the new file to`, ...).
    pub what: &'static str,
    /// The file (or folder) concerned.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn fail(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AtomicWriteError {
    let path = path.to_owned();
    move |source| AtomicWriteError { what, path, source }
}

/// Replaces `path` with `bytes`, atomically and durably (see the module notes).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
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
    pub fn create(path: &Path) -> Result<Self, AtomicWriteError> {
        Self::with_suffix(path, ".tmp")
    }

    /// Starts a new version of `path` whose temporary name ends in `suffix` (`.png` for a writer
    /// that picks its format by the extension).
    pub fn with_suffix(path: &Path, suffix: &str) -> Result<Self, AtomicWriteError> {
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
    pub fn commit(self) -> Result<(), AtomicWriteError> {
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
}
