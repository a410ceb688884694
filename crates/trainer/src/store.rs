//! The training window on disk: `features` and `y_true` joined by id into the `TRAIN_WINDOW`
//! newest labelled samples, kept in `TRAIN_DIR/window.jsonl` across restarts.
//!
//! The file is a journal of JSON lines, one per message handled (`{"id","x"}` for a feature
//! vector, `{"id","y"}` for a label) and `{"id","x","y"}` for a whole sample once the file is
//! compacted. Every delivery's line is written and synced ([`Store::flush`]) before the delivery is
//! acked, so what was acked is on disk; replaying the file at start rebuilds the window and the
//! halves still waiting for their other half. A failed append (a full disk) is cut back to the
//! length before it ([`AppendLog`]), so the file never keeps half a line. The journal is rewritten
//! (atomically: temporary file, sync, rename) with only what the window and the waiting halves
//! hold when it grows past a few windows, so it stays bounded, and at every open, which needs
//! room for that copy (start-up waits while the disk is full). A half whose other half never
//! comes is dropped after `pending_limit` newer halves (a producer that publishes one stream
//! only).

use anyhow::Context as _;
use pipeline::broker::LocalFault;
use pipeline::fs::{AppendLog, AtomicFile};
use pipeline::messages::Target;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead as _, BufWriter, Write as _};
use std::path::{Path, PathBuf};

/// Name of the journal in `TRAIN_DIR`.
pub const JOURNAL: &str = "window.jsonl";

/// One labelled sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The id its two messages shared.
    pub id: String,
    /// The feature vector.
    pub features: Vec<f64>,
    /// The true target: a number, or a class label (`TASK=classification`).
    pub target: Target,
}

/// One line of the journal.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Record {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<Vec<f64>>,
    /// A number, or a class label as the data has it (a JSON integer reads back as a number,
    /// which a classifier's window takes as that label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<Target>,
}

/// What one message did to the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// Its other half was there: a new labelled sample.
    Joined,
    /// Waits for its other half.
    Waiting,
    /// The sample is already in the window (a message published again after a reconnect).
    Duplicate,
}

/// The window, the waiting halves and the journal.
pub struct Store {
    dir: PathBuf,
    capacity: usize,
    pending_limit: usize,
    window: VecDeque<Sample>,
    in_window: HashSet<String>,
    features: HashMap<String, Vec<f64>>,
    labels: HashMap<String, Target>,
    /// Ids of the waiting halves, oldest first (may hold ids already joined: skipped on eviction).
    pending_order: VecDeque<String>,
    /// The journal and the lines added since the last flush.
    journal: AppendLog,
    journal_lines: usize,
    /// Halves dropped unpaired since start.
    dropped_unpaired: u64,
}

impl Store {
    /// Opens (creating) `dir`, replays its journal and compacts it. `capacity` is `TRAIN_WINDOW`.
    pub fn open(dir: &Path, capacity: usize, pending_limit: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create TRAIN_DIR {}", dir.display()))?;
        let path = dir.join(JOURNAL);
        let mut store = Self {
            dir: dir.to_owned(),
            capacity: capacity.max(1),
            pending_limit: pending_limit.max(1),
            window: VecDeque::new(),
            in_window: HashSet::new(),
            features: HashMap::new(),
            labels: HashMap::new(),
            pending_order: VecDeque::new(),
            journal: AppendLog::open(path.clone(), None)?,
            journal_lines: 0,
            dropped_unpaired: 0,
        };
        let mut skipped = 0usize;
        if let Ok(file) = File::open(&path) {
            for line in std::io::BufReader::new(file).lines() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                // A line cut short by a crash (never acked) is skipped.
                match serde_json::from_str::<Record>(&line) {
                    Ok(record) => {
                        store.apply(record);
                    }
                    Err(_) if line.trim().is_empty() => {}
                    Err(_) => skipped += 1,
                }
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "skipped unreadable lines of {} (a write cut short)",
                path.display()
            );
        }
        // Rewrites the file from what was read, so the next line never follows a partial one.
        store.compact()?;
        Ok(store)
    }

    /// Adds a feature vector (`features`) or a label (`target`) of sample `id`. Call
    /// [`Store::flush`] before acking the delivery.
    pub fn add(&mut self, id: &str, features: Option<Vec<f64>>, target: Option<Target>) -> Added {
        let record = Record {
            id: id.to_owned(),
            x: features,
            y: target,
        };
        // Into memory only (cannot fail for these types); the flush writes it before any ack.
        let unwritten = self.journal.buffer();
        if serde_json::to_writer(&mut *unwritten, &record).is_ok() {
            unwritten.push(b'\n');
            self.journal_lines += 1;
        }
        self.apply(record)
    }

    fn apply(&mut self, record: Record) -> Added {
        let Record { id, x, y } = record;
        if self.in_window.contains(&id) {
            return Added::Duplicate;
        }
        let features = x.or_else(|| self.features.get(&id).cloned());
        let target = y.or_else(|| self.labels.get(&id).cloned());
        match (features, target) {
            (Some(features), Some(target)) => {
                self.features.remove(&id);
                self.labels.remove(&id);
                self.in_window.insert(id.clone());
                self.window.push_back(Sample {
                    id,
                    features,
                    target,
                });
                while self.window.len() > self.capacity {
                    if let Some(old) = self.window.pop_front() {
                        self.in_window.remove(&old.id);
                    }
                }
                Added::Joined
            }
            (Some(features), None) => {
                self.features.insert(id.clone(), features);
                self.wait(id);
                Added::Waiting
            }
            (None, Some(target)) => {
                self.labels.insert(id.clone(), target);
                self.wait(id);
                Added::Waiting
            }
            (None, None) => Added::Waiting,
        }
    }

    fn wait(&mut self, id: String) {
        self.pending_order.push_back(id);
        while self.waiting() > self.pending_limit {
            let Some(old) = self.pending_order.pop_front() else {
                break;
            };
            let dropped = self.features.remove(&old).is_some() | self.labels.remove(&old).is_some();
            self.dropped_unpaired += u64::from(dropped);
        }
        // Ids joined since they were queued are skipped lazily; keep the queue from growing.
        if self.pending_order.len() > 4 * self.pending_limit {
            let (features, labels) = (&self.features, &self.labels);
            self.pending_order
                .retain(|id| features.contains_key(id) || labels.contains_key(id));
        }
    }

    /// Writes and syncs every line added so far. Safe to call again after a failure: a failed
    /// write is cut back to the length before it and its lines kept, so no line is written twice
    /// or left cut, even if the process dies before the next try. A failure is a [`LocalFault`]:
    /// the consume loop pauses and retries.
    pub fn flush(&mut self) -> Result<(), LocalFault> {
        self.journal.flush()?;
        self.journal
            .sink()
            .sync_data()
            .map_err(|source| LocalFault {
                what: format!("cannot sync {}", self.journal.path().display()),
                source,
            })
    }

    /// Whether the journal has grown enough to be rewritten.
    pub fn needs_compaction(&self) -> bool {
        self.journal_lines > 2 * (self.capacity + self.waiting()) + 1000
    }

    /// Rewrites the journal with only the window and the waiting halves, atomically. Call after a
    /// successful [`Store::flush`].
    pub fn compact(&mut self) -> anyhow::Result<()> {
        let path = self.dir.join(JOURNAL);
        let mut tmp = AtomicFile::create(&path)?;
        let mut lines = 0;
        {
            let mut out = BufWriter::new(tmp.file());
            let mut write = |record: &Record| -> std::io::Result<()> {
                serde_json::to_writer(&mut out, record)?;
                out.write_all(b"\n")
            };
            let fail = |err| anyhow::Error::from(err).context("cannot compact the training window");
            for sample in &self.window {
                write(&Record {
                    id: sample.id.clone(),
                    x: Some(sample.features.clone()),
                    y: Some(sample.target.clone()),
                })
                .map_err(fail)?;
                lines += 1;
            }
            for id in &self.pending_order {
                let (x, y) = (self.features.get(id).cloned(), self.labels.get(id).cloned());
                if x.is_some() || y.is_some() {
                    write(&Record {
                        id: id.clone(),
                        x,
                        y,
                    })
                    .map_err(fail)?;
                    lines += 1;
                }
            }
            out.flush().map_err(fail)?;
        }
        // Synced, renamed over the journal, the folder synced; dropped on error.
        tmp.commit()
            .context("cannot replace the training window with its compacted copy")?;
        // The new file holds the whole state, lines not yet flushed too.
        self.journal = AppendLog::open(path, None)?;
        self.journal_lines = lines;
        Ok(())
    }

    /// The labelled samples, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> {
        self.window.iter()
    }

    /// Labelled samples in the window.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Halves waiting for their other half.
    pub fn waiting(&self) -> usize {
        self.features.len() + self.labels.len()
    }

    /// Halves dropped without their other half since start.
    pub fn dropped_unpaired(&self) -> u64 {
        self.dropped_unpaired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn ids(store: &Store) -> Vec<String> {
        store.samples().map(|s| s.id.clone()).collect()
    }

    #[test]
    fn halves_join_in_either_order_and_the_window_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 3, 100).unwrap();
        assert_eq!(store.add("a", Some(vec![1.0, 2.0]), None), Added::Waiting);
        assert_eq!(store.add("a", None, Some(10.0.into())), Added::Joined);
        assert_eq!(store.add("b", None, Some(20.0.into())), Added::Waiting);
        assert_eq!(store.add("b", Some(vec![3.0, 4.0]), None), Added::Joined);
        assert_eq!(store.add("b", Some(vec![3.0, 4.0]), None), Added::Duplicate);
        for id in ["c", "d"] {
            store.add(id, Some(vec![0.0, 0.0]), None);
            store.add(id, None, Some(0.0.into()));
        }
        assert_eq!(ids(&store), ["b", "c", "d"]);
        let b = store.samples().next().unwrap();
        assert_eq!(
            (b.features.clone(), b.target.clone()),
            (vec![3.0, 4.0], 20.0.into())
        );
        assert_eq!(store.waiting(), 0);
    }

    #[test]
    fn the_window_and_waiting_halves_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), 2, 100).unwrap();
            for (n, id) in ["a", "b", "c"].iter().enumerate() {
                store.add(id, Some(vec![n as f64]), None);
                store.add(id, None, Some((n as f64 * 10.0).into()));
            }
            store.add("d", Some(vec![0.1]), None);
            store.flush().unwrap();
            // Dropped without compacting: the journal holds every line.
        }
        // A crash in the middle of a line.
        let path = dir.path().join(JOURNAL);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"id\":\"e\",\"x\":[1.").unwrap();
        drop(file);
        let mut store = Store::open(dir.path(), 2, 100).unwrap();
        assert_eq!(ids(&store), ["b", "c"]);
        assert_eq!(store.waiting(), 1);
        assert_eq!(store.add("d", None, Some(4.0.into())), Added::Joined);
        assert_eq!(ids(&store), ["c", "d"]);
        store.flush().unwrap();
        drop(store);
        // The compacted file at open has whole lines only.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Record>(l).is_ok()),
            "{text}"
        );
        let store = Store::open(dir.path(), 2, 100).unwrap();
        assert_eq!(ids(&store), ["c", "d"]);
        assert_eq!(store.samples().last().unwrap().features, [0.1]);
    }

    #[test]
    fn a_failed_flush_leaves_the_journal_as_it_was_and_keeps_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL);
        let mut store = Store::open(dir.path(), 10, 100).unwrap();
        store.add("a", Some(vec![1.0]), Some(1.0.into()));
        store.flush().unwrap();
        let before = std::fs::read(&path).unwrap();
        // A journal that refuses writes (a cut after a write that failed midway is AppendLog's,
        // tested in pipeline::fs).
        let read_only = AppendLog::new(
            path.clone(),
            File::open(&path).unwrap(),
            before.len() as u64,
        );
        let writable = std::mem::replace(&mut store.journal, read_only);
        store.add("b", Some(vec![2.0]), None);
        store.add("b", None, Some(2.0.into()));
        let fault = store.flush().unwrap_err();
        assert!(fault.what.contains(JOURNAL), "{fault}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // The lines wait for the next flush, which writes each once.
        let pending = std::mem::take(store.journal.buffer());
        store.journal = writable;
        store.journal.buffer().extend_from_slice(&pending);
        store.flush().unwrap();
        drop(store);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        let store = Store::open(dir.path(), 10, 100).unwrap();
        assert_eq!(ids(&store), ["a", "b"]);
    }

    #[test]
    fn compaction_keeps_the_state_and_bounds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 10, 100).unwrap();
        for n in 0..3000 {
            let id = format!("s{n}");
            store.add(&id, Some(vec![n as f64]), None);
            store.add(&id, None, Some(1.0.into()));
        }
        store.add("half", None, Some(5.0.into()));
        store.flush().unwrap();
        assert!(store.needs_compaction());
        store.compact().unwrap();
        assert!(!store.needs_compaction());
        let lines = std::fs::read_to_string(dir.path().join(JOURNAL))
            .unwrap()
            .lines()
            .count();
        assert_eq!(lines, 11);
        let reopened = Store::open(dir.path(), 10, 100).unwrap();
        assert_eq!(ids(&reopened), ids(&store));
        assert_eq!(reopened.waiting(), 1);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [JOURNAL]);
    }

    #[test]
    fn halves_that_never_pair_are_dropped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 10, 3).unwrap();
        for n in 0..5 {
            store.add(&format!("f{n}"), Some(vec![1.0]), None);
        }
        assert_eq!(store.waiting(), 3);
        assert_eq!(store.dropped_unpaired(), 2);
        // The newest still pair.
        assert_eq!(store.add("f4", None, Some(1.0.into())), Added::Joined);
        assert_eq!(store.add("f0", None, Some(1.0.into())), Added::Waiting);
    }
}
