//! Start-up recovery: rebuilds the [`Recorder`]'s state from the checkpoint and the end of the
//! log files (or from the whole files when there is no usable checkpoint).

use crate::checkpoint;
use crate::config::{Config, read_ahead_limit};
use crate::dashboard;
use crate::files::{self, LogFiles, Rotation};
use crate::handler::{CheckpointPolicy, Recorder};
use crate::join::{JoinLimits, Joiner, Offer, fingerprint};
use crate::metrics::{JoinMetrics, ReasonLabel};
use crate::plotter::Plotter;
use crate::quality::Quality;
use pipeline::broker::flow::Hysteresis;
use pipeline::health::Health;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What start-up read, for its log line.
#[derive(Default)]
struct RecoveryStats {
    csv: files::CsvRead,
    label_lines: u64,
    rows_recovered: u64,
    evicted: u64,
}

impl Recorder {
    /// Opens the files in `LOG_DIR` and rebuilds the state from the checkpoint and the end of the
    /// files (or from the whole files when there is no usable checkpoint, then writes one): cuts
    /// half lines, remembers the last `DEDUP_CAPACITY` ids of the CSV, and replays logged values
    /// written after the checkpoint.
    pub(crate) fn recover(
        config: &Config,
        mut quality: Quality,
        metrics: JoinMetrics,
        mut plotter: Plotter,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let dir = &config.log_dir;
        // A foreign CSV goes before anything reads it: its ids are not ours.
        files::move_foreign_csv_aside(dir)?;
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
        let mut dashboard =
            dashboard::Dashboard::new(config.quality_window, config.quality_alert_ratio);
        // Ids of the rows written after the checkpoint (all rows without one): their log lines
        // are not joined again, however many there are. Sorted 64-bit hashes, 8 bytes each (a
        // million rows: 8 MB, once): a collision could only make a line whose row is missing wait
        // no more, about once in 10^13 starts on a million-row history.
        let mut written: Vec<u64> = Vec::new();
        let short = |id: &str| fingerprint(id) as u64;
        let from_checkpoint = resume.is_some();
        let label_segments = match resume {
            Some((saved, label_segments, csv_segments)) => {
                quality.restore(&saved.totals);
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
                stats.csv += files::read_csv_segments(&tail, |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.add_to_window(&pair);
                    plotter.observe(pair.absolute_error());
                    dashboard.observe(pair.y_true, pair.y_pred);
                })?;
                // Rows after the checkpoint: into the totals.
                files::read_csv_segments(&csv_segments, |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.add_to_totals(&pair);
                    written.push(short(&pair.id));
                })?;
                label_segments
            }
            None => {
                // Once, for files without a checkpoint: room for every id, no doubling on the way.
                let rows = files::count_lines(&whole(&csv_chain))?;
                written.reserve_exact(usize::try_from(rows).unwrap_or(0));
                stats.csv = files::read_csv_segments(&whole(&csv_chain), |pair| {
                    joiner.mark_row_joined(&pair);
                    quality.observe(&pair);
                    plotter.observe(pair.absolute_error());
                    dashboard.observe(pair.y_true, pair.y_pred);
                    written.push(short(&pair.id));
                })?;
                whole(&labels_chain)
            }
        };
        written.sort_unstable();
        written.dedup();
        let mut files = LogFiles::open(
            dir,
            Rotation {
                max_bytes: config.log_max_bytes,
                keep: config.log_keep_files as usize,
            },
        )?;
        stats.label_lines = files::read_label_segments(&label_segments, |line| {
            let Some(id) = line.id.as_deref() else { return };
            if written.binary_search(&short(id)).is_ok() {
                return;
            }
            // A pair whose row a crash kept from the CSV is written now.
            if let Ok(Offer::Paired(pair)) = joiner.offer(
                line.kind,
                id,
                line.value,
                line.model_version.as_deref(),
                None,
                now,
            ) {
                files.push_row(&pair);
                quality.observe(&pair);
                plotter.observe(pair.absolute_error());
                dashboard.observe(pair.y_true, pair.y_pred);
                stats.rows_recovered += 1;
            }
            // Keep the waiting ids within JOIN_CAPACITY while replaying.
            if joiner.waiting() > config.join_capacity.saturating_mul(2).max(1024) {
                stats.evicted += joiner.evict().len() as u64;
            }
        })?;
        drop(written);
        joiner.set_dedup_capacity(config.dedup_capacity);
        stats.evicted += joiner.evict().len() as u64;
        if stats.evicted > 0 {
            metrics
                .evicted
                .get_or_create(&ReasonLabel { reason: "capacity" })
                .inc_by(stats.evicted);
        }
        files.flush()?;
        quality.update_window();
        metrics.waiting.set(joiner.waiting() as i64);
        dashboard.maybe_update(&quality, joiner.waiting(), plotter.errors.iter());
        let mut recorder = Self {
            files,
            joiner,
            quality,
            metrics,
            plotter,
            dashboard,
            queue_names: [
                config.queues.y_true_queue.clone(),
                config.queues.y_pred_queue.clone(),
            ],
            log_dir: dir.clone(),
            checkpoints: CheckpointPolicy {
                every_pairs: config.checkpoint_every,
                interval: Duration::from_secs(config.checkpoint_interval_secs),
                pairs_since: 0,
                changed: true,
                last: Instant::now(),
                failing: false,
            },
            y_true_flow: Hysteresis::with_high_water(read_ahead_limit(config)),
            health: Health::new(),
        };
        recorder.save_checkpoint();
        tracing::info!(
            log_dir = %dir.display(),
            from = if from_checkpoint { "checkpoint" } else { "whole files" },
            csv_rows_read = stats.csv.rows,
            csv_bad_rows = stats.csv.bad_rows,
            label_lines_replayed = stats.label_lines,
            rows_recovered = stats.rows_recovered,
            evicted_while_replaying = stats.evicted,
            waiting = recorder.joiner.waiting(),
            pairs = recorder.quality.all().n,
            millis = started.elapsed().as_millis() as u64,
            "state rebuilt from the log files"
        );
        Ok(recorder)
    }
}

#[cfg(test)]
mod tests;
