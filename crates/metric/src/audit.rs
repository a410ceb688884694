//! The metric service's half of the loss audit ([`pipeline::audit`]): counts each audited sample
//! once per stream as the join takes it, keeps the producers' window records from the audit
//! queue, reconciles each window `AUDIT_GRACE_SECS` after its record came, and reports what it
//! found (metrics, a WARN line per incomplete window, a `/healthz` note, the dashboard line).
//! Its [`Ledger`] is saved in the checkpoint; the tags are in `labels_log.txt`, so samples counted
//! after the checkpoint are counted again when start-up replays the log.

use pipeline::audit::{
    AuditRecord, Ledger, Received, Reconciliation, STREAMS, Summary, WindowKey, WindowResult,
    parse_tag,
};
use pipeline::health::Health;
use pipeline::messages::{LabelKind, MessageError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Largest audit record accepted, in bytes.
const MAX_RECORD_BYTES: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StreamLabel {
    pub(crate) stream: &'static str,
}

/// The audit's metrics (`pipeline_audit_*`).
#[derive(Clone, Default)]
pub(crate) struct AuditMetrics {
    pub(crate) windows: Family<ResultLabel, Counter>,
    pub(crate) missing: Family<StreamLabel, Counter>,
    pub(crate) unexpected: Family<StreamLabel, Counter>,
    pub(crate) late: Family<StreamLabel, Counter>,
    pub(crate) missing_now: Family<StreamLabel, Gauge>,
}

impl AuditMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // Every series exists from the start, so rate() and alerts see zeros, not gaps.
        for result in [
            "complete",
            "missing",
            "unexpected",
            "mismatch",
            "unannounced",
        ] {
            let _ = metrics.windows.get_or_create(&ResultLabel { result });
        }
        for stream in STREAMS {
            let label = StreamLabel { stream };
            let _ = metrics.missing.get_or_create(&label);
            let _ = metrics.unexpected.get_or_create(&label);
            let _ = metrics.late.get_or_create(&label);
            let _ = metrics.missing_now.get_or_create(&label);
        }
        let registry = registry.sub_registry_with_prefix("pipeline_audit");
        registry.register(
            "windows",
            "Audit windows reconciled, by result (complete, missing, unexpected, mismatch; unannounced: samples of a window whose record never came)",
            metrics.windows.clone(),
        );
        registry.register(
            "missing",
            "Samples the producer announced that had not arrived when their window was reconciled, by stream",
            metrics.missing.clone(),
        );
        registry.register(
            "unexpected",
            "Samples that arrived but were never announced, by stream",
            metrics.unexpected.clone(),
        );
        registry.register(
            "late",
            "Samples that arrived after their window was reconciled as missing (taken off the missing count), by stream",
            metrics.late.clone(),
        );
        registry.register(
            "missing_samples",
            "Samples missing now: found missing in the windows kept (AUDIT_RETAIN_SECS) and not arrived since, by stream",
            metrics.missing_now.clone(),
        );
        metrics
    }
}

/// Settings of the audit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuditSettings {
    pub(crate) grace_us: u64,
    pub(crate) retain_us: u64,
}

/// The audit state of one recorder (one partition).
pub(crate) struct AuditIn {
    pub(crate) ledger: Ledger,
    pub(crate) metrics: AuditMetrics,
    pub(crate) settings: AuditSettings,
    /// The partition these queues are (0 with one).
    pub(crate) partition: u32,
    /// The tag of the last sample counted and its window's slot in the ledger: samples come in
    /// runs of one window, so most need no lookup.
    last: Option<(String, usize)>,
    /// A record was taken since the last checkpoint: save one before acking it.
    pub(crate) records_unsaved: bool,
    /// Late samples came since the last tick: the `/healthz` note is due again.
    late_since_tick: bool,
    /// Whether records are consumed (`AUDIT`, not course): else the dashboard shows nothing.
    pub(crate) enabled: bool,
    health: Health,
}

impl AuditIn {
    pub(crate) fn new(
        ledger: Ledger,
        metrics: AuditMetrics,
        settings: AuditSettings,
        health: Health,
    ) -> Self {
        let audit = Self {
            ledger,
            metrics,
            settings,
            partition: 0,
            last: None,
            records_unsaved: false,
            late_since_tick: false,
            enabled: true,
            health,
        };
        audit.publish_missing_now();
        audit
    }

    /// Counts a sample the join took for the first time on its stream. `tag` is valid (checked
    /// when the message was read).
    pub(crate) fn received(&mut self, tag: &str, kind: LabelKind, id: &str, now_us: u64) {
        let slot = match &self.last {
            Some((last, slot)) if last == tag => *slot,
            _ => {
                let Some((producer, window)) = parse_tag(tag) else {
                    return;
                };
                let key = WindowKey {
                    producer: producer.to_owned(),
                    window,
                    partition: self.partition,
                };
                let slot = self.ledger.slot(&key, now_us);
                self.last = Some((tag.to_owned(), slot));
                slot
            }
        };
        // Indexed as the join indexes its per-kind state (y_true 0, y_pred 1, as `STREAMS`).
        let stream = kind as usize;
        let label = StreamLabel {
            stream: STREAMS[stream],
        };
        match self.ledger.received_in(slot, stream, id) {
            Received::Counted => {}
            Received::Late => {
                self.metrics.late.get_or_create(&label).inc();
                // The gauge now; the note at the next tick (a backlog can be many late samples).
                self.metrics.missing_now.get_or_create(&label).dec();
                self.late_since_tick = true;
            }
            Received::Unexpected => {
                self.metrics.unexpected.get_or_create(&label).inc();
            }
        }
    }

    /// A producer's record from the audit queue; a bad one is refused (dead-lettered), a copy of
    /// one already held is taken and ignored.
    pub(crate) fn record(&mut self, body: &[u8], now_us: u64) -> Result<(), MessageError> {
        if body.len() > MAX_RECORD_BYTES {
            return Err(MessageError::TooLarge {
                size: body.len(),
                limit: MAX_RECORD_BYTES,
            });
        }
        let record: AuditRecord = serde_json::from_slice(body)
            .map_err(|err| MessageError::WrongShape(format!("not an audit record: {err}")))?;
        if parse_tag(&pipeline::audit::tag(&record.producer, record.window)).is_none() {
            return Err(MessageError::InvalidId(record.producer));
        }
        if record.partition != self.partition {
            return Err(MessageError::WrongShape(format!(
                "an audit record of partition {} in the audit queue of partition {}",
                record.partition, self.partition
            )));
        }
        if self.ledger.announced(record, now_us) {
            self.records_unsaved = true;
        }
        Ok(())
    }

    /// Reconciles the windows whose grace is over and drops the old ones; true when the ledger
    /// changed (the checkpoint is due).
    pub(crate) fn tick(&mut self, now_us: u64) -> bool {
        if std::mem::take(&mut self.late_since_tick) {
            self.publish_missing_now();
        }
        let mut done = self.ledger.reconcile_due(now_us, self.settings.grace_us);
        let before = self.ledger.len();
        done.extend(self.ledger.expire(now_us, self.settings.retain_us));
        if self.ledger.len() != before {
            // Slots moved.
            self.last = None;
        }
        if done.is_empty() {
            return false;
        }
        for reconciliation in &done {
            self.report(reconciliation);
        }
        self.publish_missing_now();
        true
    }

    fn report(&self, r: &Reconciliation) {
        self.metrics
            .windows
            .get_or_create(&ResultLabel {
                result: r.result.as_str(),
            })
            .inc();
        for (s, stream) in STREAMS.into_iter().enumerate() {
            let label = StreamLabel { stream };
            self.metrics
                .missing
                .get_or_create(&label)
                .inc_by(r.missing[s]);
            self.metrics
                .unexpected
                .get_or_create(&label)
                .inc_by(r.unexpected[s]);
        }
        let key = &r.key;
        match r.result {
            WindowResult::Complete => {
                tracing::debug!(producer = %key.producer, window = key.window, partition = key.partition, samples = r.announced, "audit window complete")
            }
            _ => tracing::warn!(
                producer = %key.producer,
                window = key.window,
                partition = key.partition,
                result = r.result.as_str(),
                announced = r.announced,
                y_true_received = r.received[0],
                y_pred_received = r.received[1],
                y_true_missing = r.missing[0],
                y_pred_missing = r.missing[1],
                y_true_unexpected = r.unexpected[0],
                y_pred_unexpected = r.unexpected[1],
                "audit window {}: {} announced, received y_true {} y_pred {}",
                r.result.as_str(),
                r.announced,
                r.received[0],
                r.received[1]
            ),
        }
    }

    fn publish_missing_now(&self) {
        let missing = self.ledger.missing_now();
        for (s, stream) in STREAMS.into_iter().enumerate() {
            self.metrics
                .missing_now
                .get_or_create(&StreamLabel { stream })
                .set(i64::try_from(missing[s]).unwrap_or(i64::MAX));
        }
        let note = (missing != [0, 0]).then(|| {
            format!(
                "audit: {} y_true and {} y_pred samples announced by the producer have not arrived \
                 (pipeline_audit_missing_samples); they count as late if they still come",
                missing[0], missing[1]
            )
        });
        self.health.set_note("audit", note);
    }

    /// The last hour, for the dashboard.
    pub(crate) fn summary(&self, now_us: u64) -> Summary {
        self.ledger.summary(now_us.saturating_sub(3_600_000_000))
    }
}

#[cfg(test)]
mod tests {
    use crate::handler::testing::{config, recover_with_metrics};
    use pipeline::audit::{AuditRecord, Tally, tag};
    use pipeline::messages::{LabelKind, LabelMessage, now_us};

    fn message(kind: LabelKind, id: &str, window: u64) -> LabelMessage {
        LabelMessage {
            id: Some(id.to_owned()),
            value: 1.0.into(),
            probabilities: None,
            model_version: (kind == LabelKind::YPred).then(|| "v1".to_owned()),
            sent_at_us: None,
            audit: Some(tag("ab12", window)),
        }
    }

    fn record(window: u64, ids: &[String]) -> Vec<u8> {
        let mut tally = Tally::default();
        ids.iter().for_each(|id| tally.add(id));
        serde_json::to_vec(&AuditRecord {
            producer: "ab12".into(),
            window,
            partition: 0,
            window_secs: 10,
            start_us: 0,
            end_us: 1,
            count: tally.count,
            checksum: tally.checksum,
            unconfirmed: 0,
        })
        .unwrap()
    }

    /// Counts after the checkpoint come back from labels_log.txt after a crash; redeliveries
    /// (before and after the checkpoint) are not counted twice; a lost y_pred is found missing,
    /// and counted late when it comes.
    #[test]
    fn counts_survive_a_crash_once_each_and_a_late_sample_is_taken_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &["--audit-grace-secs", "0"]);
        let ids: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        {
            let (mut recorder, _) = recover_with_metrics(&config);
            for id in &ids[..5] {
                recorder
                    .accept(LabelKind::YTrue, message(LabelKind::YTrue, id, 7))
                    .unwrap();
                recorder
                    .accept(LabelKind::YPred, message(LabelKind::YPred, id, 7))
                    .unwrap();
            }
            // s5's y_true waits across the checkpoint.
            recorder
                .accept(LabelKind::YTrue, message(LabelKind::YTrue, &ids[5], 7))
                .unwrap();
            recorder.files.flush().unwrap();
            assert!(recorder.save_checkpoint());
            // After the checkpoint: a redelivered y_true of a waiting id and of a joined one, the
            // rest of the window but s9's y_pred.
            recorder
                .accept(LabelKind::YTrue, message(LabelKind::YTrue, &ids[5], 7))
                .unwrap();
            recorder
                .accept(LabelKind::YTrue, message(LabelKind::YTrue, &ids[0], 7))
                .unwrap();
            for id in &ids[5..] {
                recorder
                    .accept(LabelKind::YTrue, message(LabelKind::YTrue, id, 7))
                    .unwrap();
                if id != "s9" {
                    recorder
                        .accept(LabelKind::YPred, message(LabelKind::YPred, id, 7))
                        .unwrap();
                }
            }
            recorder.files.flush().unwrap();
            // Crash: no checkpoint, no finish.
        }
        let (mut recorder, registry) = recover_with_metrics(&config);
        recorder.audit.record(&record(7, &ids), now_us()).unwrap();
        assert!(recorder.audit.records_unsaved);
        assert!(recorder.audit.tick(now_us()));
        assert_eq!(
            recorder.audit.ledger.missing_now(),
            [0, 1],
            "only s9's y_pred"
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "pipeline_audit_windows_total{result=\"missing\"} 1",
            "pipeline_audit_missing_total{stream=\"y_pred\"} 1",
            "pipeline_audit_missing_total{stream=\"y_true\"} 0",
            "pipeline_audit_missing_samples{stream=\"y_pred\"} 1",
            "pipeline_audit_unexpected_total{stream=\"y_true\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            recorder
                .health
                .notes()
                .iter()
                .any(|note| note.contains("1 y_pred samples"))
        );
        // s9's prediction after all: late, nothing missing.
        recorder
            .accept(LabelKind::YPred, message(LabelKind::YPred, "s9", 7))
            .unwrap();
        assert_eq!(recorder.audit.ledger.missing_now(), [0, 0]);
        // The note follows at the next tick.
        recorder.audit.tick(now_us());
        assert!(!recorder.health.notes().iter().any(|n| n.contains("audit")));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("pipeline_audit_late_total{stream=\"y_pred\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pipeline_audit_missing_samples{stream=\"y_pred\"} 0"),
            "{text}"
        );
        let summary = recorder.audit.summary(now_us());
        assert_eq!(
            (summary.incomplete, summary.missing, summary.late),
            (1, 0, 1)
        );
    }

    #[test]
    fn a_bad_record_is_refused_and_a_copy_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut recorder, _) = recover_with_metrics(&config(dir.path(), &[]));
        for body in [&b"{}"[..], b"not json", &[b'x'; 5000]] {
            assert!(recorder.audit.record(body, 0).is_err());
        }
        let mut wrong_partition: serde_json::Value =
            serde_json::from_slice(&record(1, &[])).unwrap();
        wrong_partition["partition"] = 3.into();
        let err = recorder
            .audit
            .record(&serde_json::to_vec(&wrong_partition).unwrap(), 0)
            .unwrap_err();
        assert!(err.to_string().contains("partition 3"), "{err}");
        assert!(!recorder.audit.records_unsaved);
        recorder.audit.record(&record(1, &[]), 0).unwrap();
        assert!(recorder.audit.records_unsaved);
        recorder.audit.records_unsaved = false;
        recorder.audit.record(&record(1, &[]), 0).unwrap();
        assert!(!recorder.audit.records_unsaved, "a copy changes nothing");
    }
}
