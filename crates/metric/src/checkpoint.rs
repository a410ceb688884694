//! The checkpoint: a small file in `LOG_DIR` that lets start-up read only the end of the log files.
//!
//! Written after a flush (nothing pending), so it matches the files exactly: where each file stood,
//! the ids waiting for their partner with their age, and the quality totals of the whole history.
//! Start-up then reads the CSV rows and log lines after those positions only, plus the last
//! `DEDUP_CAPACITY` rows for the de-duplication window: time and memory are bounded by the settings,
//! not by the length of the history. An id dropped (evicted) before the checkpoint is not in it, so
//! it does not come back. Written to a temporary file, synced and renamed over the old one
//! ([`pipeline::fs`]), so a crash leaves the old checkpoint or the new one, never half of one.

use crate::files::FilePos;
use crate::join::WaitingEntry;
use crate::quality::Totals;
use anyhow::Context as _;
use pipeline::audit::Ledger;
use pipeline::fs::AtomicFile;
use std::io::Write as _;
use std::path::Path;

/// File name of the checkpoint in `LOG_DIR`.
pub const CHECKPOINT: &str = ".metric.checkpoint.json";

/// Format version; a checkpoint of another version is ignored (full read instead).
const FORMAT: u32 = 1;

/// The saved state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub format: u32,
    /// End of `labels_log.txt` as written.
    pub labels: FilePos,
    /// End of `metric_log.csv` as written.
    pub csv: FilePos,
    /// Quality totals over every row up to `csv`.
    pub totals: Totals,
    /// Ids waiting for their partner, oldest first.
    pub waiting: Vec<WaitingEntry>,
    /// The loss audit's windows as counted up to `labels` (absent in checkpoints written before
    /// the audit: empty).
    #[serde(default)]
    pub audit: Ledger,
}

impl Checkpoint {
    /// A checkpoint of the current format.
    pub fn new(
        labels: FilePos,
        csv: FilePos,
        totals: Totals,
        waiting: Vec<WaitingEntry>,
        audit: Ledger,
    ) -> Self {
        Self {
            format: FORMAT,
            labels,
            csv,
            totals,
            waiting,
            audit,
        }
    }
}

/// Reads the checkpoint in `dir`: `None` when there is none; an error when it cannot be read or is
/// not one of ours (the caller falls back to reading the files whole).
pub fn load(dir: &Path) -> anyhow::Result<Option<Checkpoint>> {
    let path = dir.join(CHECKPOINT);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut checkpoint: Checkpoint = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a checkpoint", path.display()))?;
    checkpoint.audit = std::mem::take(&mut checkpoint.audit).reindexed();
    anyhow::ensure!(
        checkpoint.format == FORMAT,
        "{} has format {}, this version reads {FORMAT}",
        path.display(),
        checkpoint.format
    );
    Ok(Some(checkpoint))
}

/// Writes the checkpoint to `dir` atomically and durably ([`pipeline::fs::AtomicFile`]: synced,
/// renamed, the folder synced).
pub fn save(dir: &Path, checkpoint: &Checkpoint) -> anyhow::Result<()> {
    let path = dir.join(CHECKPOINT);
    let mut tmp = AtomicFile::create(&path)?;
    {
        let mut out = std::io::BufWriter::new(tmp.file());
        serde_json::to_writer(&mut out, checkpoint).context("cannot encode the checkpoint")?;
        out.flush()
            .with_context(|| format!("cannot write the checkpoint in {}", dir.display()))?;
    }
    // On error the temporary file is deleted when `tmp` drops.
    tmp.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::FileId;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let pos = |offset| FilePos {
            file: FileId { dev: 1, ino: 2 },
            offset,
        };
        let checkpoint = Checkpoint::new(
            pos(10),
            pos(20),
            Totals::default(),
            vec![WaitingEntry {
                id: "a".into(),
                y_true: Some(1.5.into()),
                y_pred: None,
                model_version: None,
                sent_at_us: Some(3),
                age_ms: 40,
            }],
            Ledger::default(),
        );
        save(dir.path(), &checkpoint).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(checkpoint));
        // Only the checkpoint is left: no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(dir.path().join(CHECKPOINT), "{\"half\":").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
