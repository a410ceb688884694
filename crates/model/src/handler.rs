//! The model service's `MessageHandler`: predicts each features message and hands the loop its
//! y_pred to publish (the loop acks the input once the broker confirms the prediction).

use crate::drift_monitor;
use crate::served::{Prediction, ServedModel};
use lapin::message::Delivery;
use pipeline::broker::publisher::header_str;
use pipeline::broker::{Disposition, HandlerError, MessageHandler, Outgoing};
use pipeline::messages::{
    BodyFormat, Target, check_partition, now_us, parse_features, write_y_pred,
};
use pipeline::metrics::QueueCounters;
use pipeline::partition::Router;
use pipeline::schema::FEATURE_NAMES_HEADER;
use std::sync::Arc;
use tokio::sync::watch;

/// Predicts each features message and publishes the prediction.
pub(crate) struct Predictor {
    pub(crate) model: watch::Receiver<Arc<ServedModel>>,
    /// Each features partition queue's counters, by input number: `pipeline_receive_delay_seconds`
    /// (send -> model) is recorded here.
    pub(crate) features_counters: Vec<QueueCounters>,
    /// The features partition queues, by input number (input `k` is partition `k`).
    pub(crate) features: Router,
    /// The partition queues of `y_pred`: a prediction goes to its id's partition.
    pub(crate) y_pred: Router,
    /// Bare under `TOPOLOGY=course`; native otherwise, except in answer to a bare message.
    pub(crate) format: BodyFormat,
    pub(crate) body: Vec<u8>,
    /// Where served features go for the drift figures (`None` with `DRIFT_WINDOW=0`).
    pub(crate) drift: Option<drift_monitor::DriftMonitor>,
    /// Named features put in the model's order.
    pub(crate) arranged: Vec<f64>,
}

impl MessageHandler for Predictor {
    async fn handle(
        &mut self,
        input: usize,
        delivery: &Delivery,
    ) -> Result<Disposition, HandlerError> {
        let message_id = pipeline::broker::message_id(delivery);
        let message = match parse_features(&delivery.data, message_id) {
            Ok(message) => message,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        if let Some(id) = message.id.as_deref()
            && let Err(misplaced) = check_partition(
                self.features.partitions(),
                input,
                self.features.queues().get(input).map_or("", String::as_str),
                id,
            )
        {
            return Ok(Disposition::DeadLetter(misplaced));
        }
        if let (Some(sent_at_us), Some(counters)) =
            (message.sent_at_us, self.features_counters.get(input))
        {
            counters.observe_receive_delay(sent_at_us, now_us());
        }
        let model = Arc::clone(&self.model.borrow());
        let announced = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| header_str(headers, FEATURE_NAMES_HEADER));
        let features = match model
            .schema
            .arrange(&message, announced, &mut self.arranged)
        {
            Ok(features) => features,
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        let (y_pred, probabilities) = match model.answer(features).map_err(anyhow::Error::from)? {
            Ok(Prediction::Number(y_pred)) => (Target::Number(y_pred), None),
            Ok(Prediction::Class(label, probabilities)) => {
                (Target::Class(label), Some(probabilities))
            }
            Err(err) => return Ok(Disposition::DeadLetter(err)),
        };
        if let Some(drift) = &self.drift {
            drift.observe(&model, features);
        }
        // Answer a bare course-style message in the same style.
        let format = if message.bare {
            BodyFormat::Bare
        } else {
            self.format
        };
        write_y_pred(
            &mut self.body,
            format,
            message.id.as_deref(),
            &y_pred,
            probabilities.as_ref(),
            &model.version,
            message.sent_at_us,
            message.audit.as_deref(),
        )
        .map_err(anyhow::Error::from)?;
        tracing::debug!(id = message.id.as_deref().unwrap_or("-"), %y_pred, version = %model.version, "predicted");
        Ok(Disposition::Publish(Outgoing::json(
            self.y_pred.queue_for(message.id.as_deref()),
            &self.body,
            message.id.as_deref(),
        )))
    }

    async fn flush(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}
