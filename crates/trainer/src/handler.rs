//! The trainer's `MessageHandler`: joins each features or y_true delivery into the window and
//! acks it once its line is synced (`flush`).

use crate::metrics::StreamLabel;
use crate::policy::Trigger;
use crate::state::Request;
use crate::state::{Shared, lock};
use crate::store::Added;
use lapin::message::Delivery;
use pipeline::broker::{Disposition, MessageHandler, Publisher};
use pipeline::messages::{LabelKind, parse_features, parse_label};

/// Adds each delivery to the window; acks once its line is synced.
pub(crate) struct Handler {
    pub(crate) shared: Shared,
    /// The store's count of halves dropped unpaired, as far as the counter has it.
    pub(crate) unpaired_reported: u64,
}

impl MessageHandler for Handler {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
        _publisher: &Publisher,
    ) -> anyhow::Result<Disposition> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let stream = if input == 0 { "features" } else { "y_true" };
        let parsed = if input == 0 {
            parse_features(&delivery.data, message_id).map(|m| (m.id, Some(m.features), None))
        } else {
            parse_label(LabelKind::YTrue, &delivery.data, message_id)
                .map(|m| (m.id, None, Some(m.value)))
        };
        let (id, features, target) = match parsed {
            Ok(parsed) => parsed,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        let metrics = &self.shared.metrics;
        metrics
            .received
            .get_or_create(&StreamLabel { stream })
            .inc();
        // A bare message without message_id cannot be joined: nothing to keep.
        let Some(id) = id else {
            metrics.unpaired.inc();
            return Ok(Disposition::Ack);
        };
        let (added, len, waiting, unpaired) = {
            let mut store = lock(&self.shared.store);
            let added = store.add(&id, features, target);
            (
                added,
                store.len(),
                store.waiting(),
                store.dropped_unpaired(),
            )
        };
        metrics.window.set(len as i64);
        metrics.waiting.set(waiting as i64);
        metrics
            .unpaired
            .inc_by(unpaired.saturating_sub(self.unpaired_reported));
        self.unpaired_reported = unpaired;
        match added {
            Added::Joined => {
                metrics.joined.inc();
                if lock(&self.shared.schedule).labelled(1) {
                    // A full queue already holds a retrain: it will see these samples too.
                    let _ = self.shared.requests.try_send(Request {
                        trigger: Trigger::Labels,
                        reply: None,
                    });
                }
            }
            Added::Duplicate => {
                metrics.duplicates.inc();
            }
            Added::Waiting => {}
        }
        Ok(Disposition::Ack)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        let mut store = lock(&self.shared.store);
        store.flush()?;
        if store.needs_compaction()
            && let Err(err) = store.compact()
        {
            // Everything is already synced in the journal; compaction is tried again later.
            tracing::warn!(error = %format!("{err:#}"), "cannot compact the training window");
        }
        Ok(())
    }
}
