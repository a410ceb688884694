//! Start-up recovery: rebuilds the join and the figures from the checkpoint and the end of the log
//! files (or from the whole files when there is no usable checkpoint). It reads and repairs files
//! and returns what it rebuilt as a `Recovered`; the [`Recorder`](crate::handler::Recorder)
//! takes it from there (metrics, checkpoint, log line).

use crate::checkpoint;
use crate::classification::ClassQuality;
use crate::config::Config;
use crate::dashboard::Dashboard;
use crate::files::{self, LogFiles, Rotation, Row};
use crate::join::{JoinLimits, Joiner, Offer, fingerprint};
use crate::plotter::Plotter;
use crate::quality::Quality;
use pipeline::audit::Ledger;
use pipeline::messages::{LabelKind, now_us};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What start-up read, for its log line.
#[derive(Default)]
pub(crate) struct RecoveryStats {
    /// Rows read from the CSV (and bad ones skipped).
    pub(crate) csv: files::CsvRead,
    /// Lines of labels_log.txt replayed.
    pub(crate) label_lines: u64,
    /// Rows a crash had kept from the CSV, written now.
    pub(crate) rows_recovered: u64,
    /// Ids dropped from the join while replaying (beyond JOIN_CAPACITY).
    pub(crate) evicted: u64,
    /// Whether it started from the checkpoint (else from the whole files).
    pub(crate) from_checkpoint: bool,
}

/// What recovery rebuilt: the open, repaired log files (flushed), the join with the ids that wait
/// and the de-duplication window, and the dashboard with the recent pairs.
pub(crate) struct Recovered {
    pub(crate) files: LogFiles,
    pub(crate) joiner: Joiner,
    /// The loss audit's windows: the checkpoint's, plus the samples of the lines after it.
    pub(crate) audit: Ledger,
    pub(crate) dashboard: Dashboard,
    pub(crate) stats: RecoveryStats,
}

/// Opens the files in `LOG_DIR` and rebuilds the state from the checkpoint and the end of the
/// files (or from the whole files when there is no usable checkpoint): cuts half lines,
/// remembers the last `DEDUP_CAPACITY` ids of the CSV, and replays logged values written after
/// the checkpoint. The rows it reads go into `quality` and `plotter` as well.
pub(crate) fn recover(
    config: &Config,
    partition: u32,
    quality: &mut Quality,
    mut classes: Option<&mut ClassQuality>,
    plotter: &mut Plotter,
) -> anyhow::Result<Recovered> {
    let dir = &config.log_dir;
    // A foreign CSV goes before anything reads it: its ids are not ours.
    files::move_foreign_csv_aside_for(dir, config.task)?;
    for name in [files::LABELS_LOG, files::METRIC_CSV] {
        let cut = files::repair_tail(&dir.join(name))?;
        if cut > 0 {
            tracing::warn!(
                file = name,
                bytes = cut,
                "cut a half line left by a crash; its messages were never acked and come again"
            );
        }
    }
    let mut joiner = Joiner::new(JoinLimits {
        capacity: config.join_capacity,
        max_age: Duration::from_secs(config.join_max_age_secs),
        dedup_capacity: config.dedup_capacity,
    });
    let labels_chain = files::chain(&dir.join(files::LABELS_LOG));
    let csv_chain = files::chain(&dir.join(files::METRIC_CSV));
    let whole = |chain: &[PathBuf]| -> Vec<files::Segment> {
        chain.iter().map(|path| (path.clone(), 0)).collect()
    };
    let saved = match checkpoint::load(dir) {
        Ok(saved) => saved,
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "checkpoint unusable; reading the log files whole");
            None
        }
    };
    let resume = match saved {
        Some(saved) => match (
            files::segments_after(&labels_chain, &saved.labels)?,
            files::segments_after(&csv_chain, &saved.csv)?,
        ) {
            (Some(labels), Some(csv)) => Some((saved, labels, csv)),
            _ => {
                tracing::warn!(
                    "the checkpoint does not match the log files (moved or deleted?); reading them whole"
                );
                None
            }
        },
        None => None,
    };
    let now = Instant::now();
    let mut stats = RecoveryStats::default();
    let mut dashboard = Dashboard::new(config.quality_window, config.quality_alert_ratio);
    // Ids of the rows written after the checkpoint (all rows without one): their log lines
    // are not joined again, however many there are. Sorted 64-bit hashes, 8 bytes each (a
    // million rows: 8 MB, once): a collision could only make a line whose row is missing wait
    // no more, about once in 10^13 starts on a million-row history.
    let mut written: Vec<u64> = Vec::new();
    let short = |id: &str| fingerprint(id) as u64;
    let from_checkpoint = resume.is_some();
    let mut audit = Ledger::default();
    // Audit: the samples counted before the checkpoint while they waited (their kind), and those
    // of rows written after it counted once here (their log lines are not joined again).
    let audit_key = |id: &str, kind: LabelKind| fingerprint(id) as u64 ^ kind as u64;
    let mut audit_counted: HashSet<u64> = HashSet::new();
    let label_segments = match resume {
        Some((mut saved, label_segments, csv_segments)) => {
            quality.restore(&saved.totals);
            if let (Some(classes), Some(totals)) =
                (classes.as_deref_mut(), &saved.totals.classification)
            {
                classes.restore(totals);
            }
            audit = std::mem::take(&mut saved.audit);
            for entry in &saved.waiting {
                for (kind, had) in [
                    (LabelKind::YTrue, entry.y_true.is_some()),
                    (LabelKind::YPred, entry.y_pred.is_some()),
                ] {
                    if had {
                        audit_counted.insert(audit_key(&entry.id, kind));
                    }
                }
            }
            joiner.restore_waiting(saved.waiting);
            // While replaying, remember the rows after the checkpoint too: a line logged
            // then was checked against the last DEDUP_CAPACITY rows of its time, which are
            // all among the last DEDUP_CAPACITY + (rows since) rows now.
            let since = usize::try_from(files::count_lines(&csv_segments)?).unwrap_or(0);
            let replay_dedup = config.dedup_capacity.saturating_add(since);
            joiner.set_dedup_capacity(replay_dedup);
            // The last rows: the de-duplication window, the quality window and the picture.
            let recent =
                replay_dedup
                    .max(config.quality_window)
                    .max(if plotter.interval.is_some() {
                        config.plot_max_pairs
                    } else {
                        0
                    });
            let tail = files::tail_segments(&csv_chain, recent, true)?;
            stats.csv += files::read_csv_segments(&tail, |row| match row {
                Row::Numbers(pair) => {
                    joiner.mark_row_joined(&pair);
                    quality.add_to_window(&pair);
                    plotter.observe(pair.absolute_error());
                    dashboard.observe(pair.y_true, pair.y_pred);
                }
                Row::Classes(pair) => {
                    joiner.mark_class_row_joined(&pair);
                    if let Some(classes) = classes.as_deref_mut() {
                        classes.add_to_window(&pair);
                    }
                }
            })?;
            // Rows after the checkpoint: into the totals.
            files::read_csv_segments(&csv_segments, |row| {
                let id = match row {
                    Row::Numbers(pair) => {
                        joiner.mark_row_joined(&pair);
                        quality.add_to_totals(&pair);
                        pair.id
                    }
                    Row::Classes(pair) => {
                        joiner.mark_class_row_joined(&pair);
                        if let Some(classes) = classes.as_deref_mut() {
                            classes.add_to_totals(&pair);
                        }
                        pair.id
                    }
                };
                written.push(short(&id));
            })?;
            label_segments
        }
        None => {
            // Once, for files without a checkpoint: room for every id, no doubling on the way.
            let rows = files::count_lines(&whole(&csv_chain))?;
            written.reserve_exact(usize::try_from(rows).unwrap_or(0));
            stats.csv = files::read_csv_segments(&whole(&csv_chain), |row| {
                let id = match row {
                    Row::Numbers(pair) => {
                        joiner.mark_row_joined(&pair);
                        quality.observe(&pair);
                        plotter.observe(pair.absolute_error());
                        dashboard.observe(pair.y_true, pair.y_pred);
                        pair.id
                    }
                    Row::Classes(pair) => {
                        joiner.mark_class_row_joined(&pair);
                        if let Some(classes) = classes.as_deref_mut() {
                            classes.observe(&pair);
                        }
                        pair.id
                    }
                };
                written.push(short(&id));
            })?;
            whole(&labels_chain)
        }
    };
    written.sort_unstable();
    written.dedup();
    let mut files = LogFiles::open_for(
        dir,
        Rotation {
            max_bytes: config.log_max_bytes,
            keep: config.log_keep_files as usize,
        },
        config.task,
    )?;
    let replayed_at_us = now_us();
    stats.label_lines = files::read_label_segments(&label_segments, |line| {
        let Some(id) = line.id.as_deref() else { return };
        let count_audit = |audit: &mut Ledger| {
            if let Some((producer, window)) =
                line.audit.as_deref().and_then(pipeline::audit::parse_tag)
            {
                let key = pipeline::audit::WindowKey {
                    producer: producer.to_owned(),
                    window,
                    partition,
                };
                audit.received(&key, line.kind as usize, id, replayed_at_us);
            }
        };
        if written.binary_search(&short(id)).is_ok() {
            if line.audit.is_some() && audit_counted.insert(audit_key(id, line.kind)) {
                count_audit(&mut audit);
            }
            return;
        }
        // A line of the other task (the task changed) is not joined.
        let Some(value) = line.value.clone().for_task(config.task) else {
            return;
        };
        let offer = joiner.offer(
            line.kind,
            id,
            value,
            line.model_version.as_deref(),
            None,
            now,
        );
        if matches!(
            offer,
            Ok(Offer::Waiting | Offer::Paired(_) | Offer::PairedClass(_))
        ) {
            count_audit(&mut audit);
        }
        // A pair whose row a crash kept from the CSV is written now.
        match offer {
            Ok(Offer::Paired(pair)) => {
                files.push_row(&pair);
                quality.observe(&pair);
                plotter.observe(pair.absolute_error());
                dashboard.observe(pair.y_true, pair.y_pred);
                stats.rows_recovered += 1;
            }
            Ok(Offer::PairedClass(pair)) => {
                files.push_class_row(&pair);
                if let Some(classes) = classes.as_deref_mut() {
                    classes.observe(&pair);
                }
                stats.rows_recovered += 1;
            }
            _ => {}
        }
        // Keep the waiting ids within JOIN_CAPACITY while replaying.
        if joiner.waiting() > config.join_capacity.saturating_mul(2).max(1024) {
            stats.evicted += joiner.evict().len() as u64;
        }
    })?;
    drop(written);
    joiner.set_dedup_capacity(config.dedup_capacity);
    stats.evicted += joiner.evict().len() as u64;
    files.flush()?;
    quality.update_window();
    if let Some(classes) = classes {
        classes.update();
    }
    stats.from_checkpoint = from_checkpoint;
    Ok(Recovered {
        files,
        joiner,
        audit,
        dashboard,
        stats,
    })
}

#[cfg(test)]
mod tests;
