//! The [`Recorder`]: logs every message, offers it to the join, writes the joined rows and keeps
//! the quality figures; the [`MessageHandler`] of the metric service.

use crate::audit::{AuditIn, AuditMetrics, AuditSettings};
use crate::checkpoint;
use crate::classification::ClassQuality;
use crate::config::{Config, read_ahead_limit};
use crate::dashboard;
use crate::files::LogFiles;
use crate::join::{Joiner, Offer, Value};
use crate::metrics::{JoinMetrics, ReasonLabel};
use crate::plotter::Plotter;
use crate::quality::Quality;
use crate::recovery::{self, Recovered};
use lapin::message::Delivery;
use pipeline::broker::flow::{FlowChange, Hysteresis};
use pipeline::broker::{Disposition, MessageHandler};
use pipeline::broker::{HandlerError, LocalFault};
use pipeline::health::Health;
use pipeline::messages::{
    LabelKind, LabelMessage, MessageError, check_partition, now_us, parse_label, validate_id,
};
use pipeline::metrics::{QueueCounters, QueueLabel};
use pipeline::partition::Partitions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Order of the inputs in [`ConsumerSpec::inputs`](pipeline::broker::consumer::ConsumerSpec::inputs).
pub(crate) const KINDS: [LabelKind; 2] = [LabelKind::YTrue, LabelKind::YPred];
/// The third input, when the audit is on: the producers' window records.
pub(crate) const AUDIT_INPUT: usize = 2;

/// Logs, joins and measures; the [`MessageHandler`] of the metric service.
pub struct Recorder {
    pub(crate) files: LogFiles,
    pub(crate) joiner: Joiner,
    pub(crate) quality: Quality,
    /// A classifier's figures (`TASK=classification`), beside the regression ones.
    pub(crate) classes: Option<ClassQuality>,
    pub(crate) metrics: JoinMetrics,
    pub(crate) plotter: Plotter,
    pub(crate) dashboard: dashboard::Dashboard,
    pub(crate) queue_names: [String; 2],
    pub(crate) log_dir: PathBuf,
    pub(crate) checkpoints: CheckpointPolicy,
    /// Holds back `y_true` while the join is nearly full, so a lagging model loses no pair.
    pub(crate) y_true_flow: Hysteresis,
    pub(crate) health: Health,
    /// Counters of the two inputs (in [`KINDS`] order), for the receive delay.
    pub(crate) inputs: [QueueCounters; 2],
    /// What `y_true` and `y_pred` are: numbers or class labels.
    pub(crate) task: pipeline::classes::Task,
    /// With `PARTITIONS > 1`, the partition these queues are: a message whose id hashes
    /// elsewhere is dead-lettered (`wrong_partition`), never joined.
    pub(crate) partition: Option<(Partitions, usize)>,
    /// The loss audit of these queues.
    pub(crate) audit: AuditIn,
}

/// When the checkpoint is written again.
pub(crate) struct CheckpointPolicy {
    pub(crate) every_pairs: u64,
    pub(crate) interval: Duration,
    pub(crate) pairs_since: u64,
    pub(crate) changed: bool,
    pub(crate) last: Instant,
    /// The last save failed (logged once until one succeeds again).
    pub(crate) failing: bool,
}

impl CheckpointPolicy {
    pub(crate) fn due(&self) -> bool {
        self.changed
            && (self.pairs_since >= self.every_pairs || self.last.elapsed() >= self.interval)
    }
}

impl Recorder {
    /// Rebuilds the state from `LOG_DIR` (see [`recovery`]), counts what recovery dropped, writes
    /// a checkpoint and logs what it read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        config: &Config,
        partition: Option<(Partitions, usize)>,
        mut quality: Quality,
        mut classes: Option<ClassQuality>,
        metrics: JoinMetrics,
        audit_metrics: AuditMetrics,
        mut plotter: Plotter,
        health: Health,
        inputs: [QueueCounters; 2],
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let k = partition.map_or(0, |(_, k)| u32::try_from(k).unwrap_or(0));
        let Recovered {
            files,
            joiner,
            audit,
            mut dashboard,
            stats,
        } = recovery::recover(config, k, &mut quality, classes.as_mut(), &mut plotter)?;
        let mut audit = AuditIn::new(
            audit,
            audit_metrics,
            AuditSettings {
                grace_us: config.audit_grace_secs.saturating_mul(1_000_000),
                retain_us: config.audit_retain_secs.saturating_mul(1_000_000),
            },
            health.clone(),
        );
        audit.partition = k;
        audit.enabled = config.audits();
        if stats.evicted > 0 {
            metrics
                .evicted
                .get_or_create(&ReasonLabel { reason: "capacity" })
                .inc_by(stats.evicted);
        }
        metrics.waiting.set(joiner.waiting() as i64);
        dashboard.maybe_update(
            &quality,
            classes.as_ref(),
            joiner.waiting(),
            plotter.errors.iter(),
        );
        let mut recorder = Self {
            files,
            joiner,
            quality,
            classes,
            metrics,
            plotter,
            dashboard,
            task: config.task,
            queue_names: [
                config.queues.y_true_queue.clone(),
                config.queues.y_pred_queue.clone(),
            ],
            log_dir: config.log_dir.clone(),
            checkpoints: CheckpointPolicy {
                every_pairs: config.checkpoint_every,
                interval: Duration::from_secs(config.checkpoint_interval_secs),
                pairs_since: 0,
                changed: true,
                last: Instant::now(),
                failing: false,
            },
            y_true_flow: Hysteresis::with_high_water(read_ahead_limit(config)),
            health,
            inputs,
            partition,
            audit,
        };
        recorder.save_checkpoint();
        tracing::info!(
            audit_windows = recorder.audit.ledger.len(),
            log_dir = %config.log_dir.display(),
            from = if stats.from_checkpoint { "checkpoint" } else { "whole files" },
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

    /// Writes the checkpoint when nothing is pending (so it matches the files); a failure is
    /// logged, not fatal: the previous checkpoint stays valid, start-up only reads more.
    pub(crate) fn save_checkpoint(&mut self) -> bool {
        if !self.files.is_flushed() {
            return false;
        }
        let result = self.files.positions().and_then(|(labels, csv)| {
            let saved = checkpoint::Checkpoint::new(
                labels,
                csv,
                crate::quality::Totals {
                    classification: self.classes.as_ref().map(ClassQuality::totals),
                    ..self.quality.totals()
                },
                self.joiner.waiting_entries(),
                self.audit.ledger.clone(),
            );
            checkpoint::save(&self.log_dir, &saved)
        });
        match result {
            Ok(()) => {
                if self.checkpoints.failing {
                    tracing::info!("checkpoint written again");
                }
                self.checkpoints.failing = false;
                self.checkpoints.changed = false;
                self.checkpoints.pairs_since = 0;
                self.checkpoints.last = Instant::now();
                self.audit.records_unsaved = false;
                true
            }
            Err(err) => {
                if !self.checkpoints.failing {
                    tracing::warn!(error = %format!("{err:#}"), "cannot write the checkpoint; the previous one stays, start-up reads more");
                }
                self.checkpoints.failing = true;
                // Try again at the next interval, not at every flush.
                self.checkpoints.last = Instant::now();
                false
            }
        }
    }

    /// Holds back or takes again `y_true` as the join fills and empties: while the model lags,
    /// the broker keeps the `y_true` backlog instead of the join dropping the oldest ids.
    pub(crate) fn update_flow(&mut self) {
        // Only true values waiting for a prediction: holding y_true cannot lower the others.
        let waiting = self.joiner.waiting_for(LabelKind::YPred);
        match self.y_true_flow.update(waiting) {
            Some(FlowChange::Held) => {
                let note = format!(
                    "{waiting} true values wait for their prediction (JOIN_READ_AHEAD): {} is \
                     not taken until the model catches up; the broker keeps it",
                    self.queue_names[0]
                );
                tracing::warn!("{note}");
                self.health.set_note("join", Some(note));
                self.metrics.y_true_held.set(1);
            }
            Some(FlowChange::Resumed) => {
                tracing::info!(waiting, "{} is taken again", self.queue_names[0]);
                self.health.set_note("join", None);
                self.metrics.y_true_held.set(0);
            }
            None => {}
        }
    }

    /// At shutdown: writes what is pending and a last checkpoint.
    pub(crate) fn finish(&mut self) {
        if let Err(err) = self.files.flush() {
            tracing::warn!(error = %format!("{err:#}"), "cannot write the log files at shutdown; the unacked messages come again");
            return;
        }
        if self.checkpoints.changed {
            let _ = self.save_checkpoint();
        }
    }

    fn record(&mut self, kind: LabelKind, delivery: &Delivery) -> Result<(), MessageError> {
        let message_id = pipeline::broker::message_id(delivery);
        let message = parse_label(kind, &delivery.data, message_id)?;
        if let (Some((partitions, k)), Some(id)) = (self.partition, message.id.as_deref()) {
            check_partition(partitions, k, &self.queue_names[kind as usize], id)?;
        }
        if let Some(sent) = message.sent_at_us {
            self.inputs[kind as usize].observe_receive_delay(sent, now_us());
        }
        if let Some(version) = &message.model_version {
            validate_id(version).map_err(|_| {
                MessageError::WrongShape(format!(
                    "model_version {version:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
                ))
            })?;
        }
        self.accept(kind, message)
    }

    /// Logs one parsed message and offers it to the join.
    pub(crate) fn accept(
        &mut self,
        kind: LabelKind,
        message: LabelMessage,
    ) -> Result<(), MessageError> {
        let LabelMessage {
            id,
            value,
            probabilities,
            model_version,
            sent_at_us,
            audit,
        } = message;
        let value = Value::of(value, probabilities, kind, self.task)?;
        let Some(id) = id.as_deref() else {
            // Not joinable, but its kind is arriving: ids waiting for it age.
            self.joiner.note_activity(kind, Instant::now());
            self.files
                .push_label(kind, None, &value, model_version.as_deref(), None);
            self.metrics.unpaired.inc();
            tracing::debug!(queue = kind.as_str(), %value, "message without id logged, not joined");
            return Ok(());
        };
        let offer = self.joiner.offer(
            kind,
            id,
            value.clone(),
            model_version.as_deref(),
            sent_at_us,
            Instant::now(),
        );
        self.checkpoints.changed = true;
        let offer = match offer {
            Ok(offer) => offer,
            Err(err) => {
                self.metrics.conflicts.inc();
                return Err(err);
            }
        };
        self.files.push_label(
            kind,
            Some(id),
            &value,
            model_version.as_deref(),
            audit.as_deref(),
        );
        if let (Some(tag), Offer::Waiting | Offer::Paired(_) | Offer::PairedClass(_)) =
            (&audit, &offer)
        {
            self.audit.received(tag, kind, id, now_us());
        }
        match offer {
            Offer::Waiting => tracing::trace!(id, queue = kind.as_str(), "waiting for partner"),
            Offer::Duplicate => {
                tracing::debug!(id, queue = kind.as_str(), "duplicate ignored");
                self.metrics
                    .duplicates
                    .get_or_create(&QueueLabel {
                        queue: self.queue_names[kind as usize].clone(),
                    })
                    .inc();
            }
            Offer::Paired(pair) => {
                self.checkpoints.pairs_since += 1;
                self.files.push_row(&pair);
                self.quality.observe(&pair);
                self.plotter.observe(pair.absolute_error());
                self.dashboard.observe(pair.y_true, pair.y_pred);
                self.observe_latency(pair.sent_at_us);
                tracing::debug!(id, y_true = pair.y_true, y_pred = pair.y_pred, "joined");
            }
            Offer::PairedClass(pair) => {
                self.checkpoints.pairs_since += 1;
                self.files.push_class_row(&pair);
                if let Some(classes) = &mut self.classes {
                    classes.observe(&pair);
                }
                self.observe_latency(pair.sent_at_us);
                tracing::debug!(id, y_true = %pair.y_true, y_pred = %pair.y_pred, "joined");
            }
        }
        Ok(())
    }

    fn observe_latency(&self, sent_at_us: Option<u64>) {
        if let Some(sent) = sent_at_us {
            self.quality
                .observe_latency(now_us().saturating_sub(sent) as f64 / 1e6);
        }
    }
}

impl MessageHandler for Recorder {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
    ) -> Result<Disposition, HandlerError> {
        if input == AUDIT_INPUT {
            return Ok(match self.audit.record(&delivery.data, now_us()) {
                Ok(()) => Disposition::Ack,
                Err(err) => {
                    tracing::warn!(error = %err, "refused an audit record");
                    Disposition::DeadLetter(err)
                }
            });
        }
        let disposition = match self.record(KINDS[input], delivery) {
            Ok(()) => Disposition::Ack,
            Err(err) => {
                self.dashboard
                    .dead_lettered(&self.queue_names[input], err.reason());
                Disposition::DeadLetter(err)
            }
        };
        self.update_flow();
        Ok(disposition)
    }

    fn accepts(&self, input: usize) -> bool {
        !(input == 0 && self.y_true_flow.is_held())
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        self.metrics.waiting.set(self.joiner.waiting() as i64);
        // A write error is a LocalFault: the loop pauses and calls again.
        let rotated = self.files.flush()?;
        if self.audit.records_unsaved {
            // An audit record is acked only once the checkpoint holds it.
            if !self.save_checkpoint() {
                return Err(LocalFault {
                    what: format!(
                        "cannot save the audit records in the checkpoint in {}",
                        self.log_dir.display()
                    ),
                    source: std::io::Error::other("checkpoint not written"),
                }
                .into());
            }
        } else if rotated || self.checkpoints.due() {
            self.save_checkpoint();
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<(), HandlerError> {
        for evicted in self.joiner.evict() {
            self.checkpoints.changed = true;
            tracing::warn!(
                id = %evicted.id,
                had = evicted.had.as_str(),
                reason = evicted.reason.as_str(),
                "dropped an id that waited too long for its partner"
            );
            self.metrics
                .evicted
                .get_or_create(&ReasonLabel {
                    reason: evicted.reason.as_str(),
                })
                .inc();
        }
        self.metrics.waiting.set(self.joiner.waiting() as i64);
        let now = now_us();
        if self.audit.tick(now) {
            self.checkpoints.changed = true;
        }
        self.dashboard
            .set_audit(self.audit.enabled.then(|| self.audit.summary(now)));
        self.update_flow();
        self.quality.update_window();
        if let Some(classes) = &mut self.classes {
            classes.update();
        }
        self.dashboard.maybe_update(
            &self.quality,
            self.classes.as_ref(),
            self.joiner.waiting(),
            self.plotter.errors.iter(),
        );
        self.plotter.maybe_redraw();
        if self.checkpoints.due() {
            // Only when nothing is pending; else the next flush writes it.
            self.save_checkpoint();
        }
        Ok(())
    }
}

/// What tests of the Recorder share: settings from flags and a Recorder started on them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::{Cli, IDENTITY};
    use pipeline::metrics::BrokerMetrics;
    use prometheus_client::registry::Registry;
    use std::path::Path;

    /// The settings of `metric --log-dir <dir> <extra>`.
    pub(crate) fn config(dir: &Path, extra: &[&str]) -> Config {
        let mut args = vec!["metric", "--log-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        Cli::try_parse_for(&IDENTITY, args).unwrap().config
    }

    /// A Recorder started (recovered) on `config`'s LOG_DIR, with metrics of its own.
    pub(crate) fn recover(config: &Config) -> Recorder {
        recover_with_metrics(config).0
    }

    /// The same, and the registry of its metrics.
    pub(crate) fn recover_with_metrics(config: &Config) -> (Recorder, Registry) {
        let mut registry = Registry::default();
        let join_metrics = JoinMetrics::register(&mut registry);
        let broker = BrokerMetrics::register(&mut registry);
        let mut quality = Quality::register(&mut registry, config.quality_window, 20, 1.25);
        let audit = AuditMetrics::register(&mut registry);
        let classes = ClassQuality::for_task(config, &mut registry, &mut quality);
        let recorder = Recorder::start(
            config,
            None,
            quality,
            classes,
            join_metrics,
            audit,
            Plotter::new(config),
            Health::new(),
            [broker.queue("y_true"), broker.queue("y_pred")],
        )
        .unwrap();
        (recorder, registry)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{config, recover_with_metrics};
    use super::*;

    fn delivery(body: &str) -> Delivery {
        Delivery::mock(1, "".into(), "".into(), false, body.as_bytes().to_vec())
    }

    #[test]
    fn the_receive_delay_is_recorded_for_messages_that_carry_a_send_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut recorder, registry) = recover_with_metrics(&config(dir.path(), &[]));
        let sent = now_us() - 250_000;
        let with = format!(r#"{{"id":"a","y_true":1.0,"sent_at_us":{sent}}}"#);
        recorder.record(LabelKind::YTrue, &delivery(&with)).unwrap();
        recorder
            .record(LabelKind::YPred, &delivery(r#"{"id":"a","y_pred":2.0}"#))
            .unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = |name: &str, queue: &str| {
            let prefix = format!("pipeline_receive_delay_seconds_{name}{{queue=\"{queue}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&prefix));
            line.and_then(|l| l[prefix.len()..].parse::<f64>().ok())
        };
        assert_eq!(line("count", "y_true"), Some(1.0), "{text}");
        let delay = line("sum", "y_true").unwrap();
        assert!((0.25..5.0).contains(&delay), "{delay}");
        // Without sent_at_us: nothing to measure.
        assert_eq!(line("count", "y_pred"), Some(0.0), "{text}");
    }
}
