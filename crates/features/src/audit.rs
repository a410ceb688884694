//! The producer's half of the loss audit ([`pipeline::audit`]): tags every sample with its
//! window, counts it once when the broker confirms it, and announces each window to the audit
//! queue of its partition once the window is over and every sample of it is confirmed.

use anyhow::Context as _;
use pipeline::audit::{self, AuditRecord, Outbox};
use pipeline::broker::Publisher;
use pipeline::broker::publisher::is_confirmed;
use pipeline::config::{QueueNames, TopologyMode};
use pipeline::messages::now_us;
use pipeline::partition::Partitions;
use std::collections::VecDeque;

/// The producer's audit state; `None` in the producer when the audit is off.
#[derive(Debug)]
pub(crate) struct AuditOut {
    outbox: Outbox,
    /// Records taken from the outbox, not yet confirmed by the broker: announced next.
    pending: VecDeque<AuditRecord>,
    partitions: Partitions,
    /// The audit queue of each partition of `y_true`.
    queues: Vec<String>,
    /// The last tag written and its window: one allocation per window, not per sample.
    tag: (u64, String),
}

impl AuditOut {
    /// The audit with windows of `window_secs`; `None` when 0 or under `TOPOLOGY=course` (bare
    /// messages carry no tag).
    pub(crate) fn new(
        window_secs: u64,
        topology: TopologyMode,
        queues: &QueueNames,
    ) -> Option<Self> {
        if window_secs == 0 || topology == TopologyMode::Course {
            return None;
        }
        let partitions = queues.partitions;
        Some(Self {
            outbox: Outbox::new(audit::new_producer_id(), window_secs),
            pending: VecDeque::new(),
            partitions,
            queues: audit::audit_queues(&queues.y_true_queue, partitions),
            tag: (u64::MAX, String::new()),
        })
    }

    /// The audit queues, to declare.
    pub(crate) fn queues(&self) -> &[String] {
        &self.queues
    }

    /// The producer instance, for the log.
    pub(crate) fn producer(&self) -> &str {
        self.outbox.producer()
    }

    /// A new sample: its window, and owed to the window until confirmed.
    pub(crate) fn sent(&mut self, id: &str) -> u64 {
        let window = self.outbox.window_of(now_us());
        self.outbox.sent(window, self.partitions.of(id));
        window
    }

    /// The tag of `window`, for the messages.
    pub(crate) fn tag(&mut self, window: u64) -> &str {
        if self.tag.0 != window {
            self.tag = (window, audit::tag(self.outbox.producer(), window));
        }
        &self.tag.1
    }

    /// The broker confirmed both messages of the sample `id`.
    pub(crate) fn confirmed(&mut self, window: u64, id: &str) {
        self.outbox.confirmed(window, self.partitions.of(id), id);
    }

    /// Publishes the records of every window that is over and confirmed (with `closing`, of
    /// every window), each confirmed before the next; what is not confirmed stays for the next
    /// call, so a window is announced once the broker has it, never twice by this instance.
    pub(crate) async fn announce(
        &mut self,
        publisher: &Publisher,
        closing: bool,
    ) -> anyhow::Result<()> {
        self.pending.extend(self.outbox.due(now_us(), closing));
        while let Some(record) = self.pending.front() {
            let body = serde_json::to_vec(record).context("cannot encode an audit record")?;
            let queue = &self.queues[record.partition as usize % self.queues.len()];
            let confirmation = publisher
                .publish_json(queue, &body, None)
                .await
                .with_context(|| format!("cannot publish the audit record to {queue}"))?
                .await
                .with_context(|| {
                    format!("waiting for the confirm of an audit record on {queue}")
                })?;
            anyhow::ensure!(
                is_confirmed(&confirmation),
                "the broker refused the audit record of window {} on {queue}",
                record.window
            );
            tracing::debug!(
                window = record.window,
                partition = record.partition,
                count = record.count,
                unconfirmed = record.unconfirmed,
                "audit window announced"
            );
            if record.unconfirmed > 0 {
                tracing::warn!(
                    window = record.window,
                    partition = record.partition,
                    confirmed = record.count,
                    unconfirmed = record.unconfirmed,
                    "announced a window with samples the broker never confirmed: they may or may not arrive"
                );
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}
