//! The trainer's `MessageHandler`: joins each features or y_true delivery into the window and
//! acks it once its line is synced (`flush`).

use crate::metrics::StreamLabel;
use crate::policy::Trigger;
use crate::state::Request;
use crate::state::{Shared, lock};
use crate::store::{Added, Store};
use lapin::message::Delivery;
use pipeline::broker::HandlerError;
use pipeline::broker::publisher::header_str;
use pipeline::broker::{Disposition, MessageHandler};
use pipeline::classes::Task;
use pipeline::messages::{
    FeaturesMessage, LabelKind, MessageError, Target, parse_features, parse_label,
};
use pipeline::schema::{FEATURE_NAMES_HEADER, FeatureSchema};

/// Adds each delivery to the window; acks once its line is synced.
pub(crate) struct Handler {
    /// The window on disk: this handler's alone (see [`Shared::window`]).
    pub(crate) store: Store,
    pub(crate) shared: Shared,
    /// The store's count of halves dropped unpaired, as far as the counter has it.
    pub(crate) unpaired_reported: u64,
    /// The window's columns: `DATA_PATH`'s, in its order.
    pub(crate) schema: FeatureSchema,
    /// What a `y_true` must be: a number, or a class label.
    pub(crate) task: Task,
}

impl Handler {
    /// A features message's values in the window's column order: named features (an object, or
    /// an array whose producer announced its columns) by name; a plain array as it is (its width
    /// is checked when the window is used).
    fn columns(
        &self,
        message: &FeaturesMessage,
        delivery: &Delivery,
    ) -> Result<Vec<f64>, MessageError> {
        let announced = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| header_str(headers, FEATURE_NAMES_HEADER));
        if message.names.is_none() && announced.is_none() {
            return Ok(message.features.clone());
        }
        let mut arranged = Vec::new();
        self.schema
            .arrange(message, announced, &mut arranged)
            .map(<[f64]>::to_vec)
    }
}

impl MessageHandler for Handler {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
    ) -> Result<Disposition, HandlerError> {
        let message_id = pipeline::broker::message_id(delivery);
        let stream = if input == 0 { "features" } else { "y_true" };
        let parsed = if input == 0 {
            parse_features(&delivery.data, message_id).and_then(|message| {
                let features = self.columns(&message, delivery)?;
                Ok((message.id, Some(features), None))
            })
        } else {
            parse_label(LabelKind::YTrue, &delivery.data, message_id).and_then(|m| {
                // Checked as the task reads it; kept as it came (a label as the data has it).
                match self.task {
                    Task::Regression => m.value.number(LabelKind::YTrue).map(Target::Number)?,
                    Task::Classification => Target::Class(m.value.class(LabelKind::YTrue)?),
                };
                Ok((m.id, None, Some(m.value)))
            })
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
        let store = &mut self.store;
        let added = store.add(&id, features, target);
        lock(&self.shared.window).follow(added, store);
        let (len, waiting, unpaired) = (store.len(), store.waiting(), store.dropped_unpaired());
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

    async fn flush(&mut self) -> Result<(), HandlerError> {
        // No lock held: the retrainer reads its own copy of the window meanwhile.
        let store = &mut self.store;
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
