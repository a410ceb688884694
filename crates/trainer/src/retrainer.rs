//! The retrainer task: runs retrain requests one at a time, in the order asked, and reports each
//! outcome in the log and the metrics.

use crate::metrics::{Metrics, ModelLabel, RetrainLabels};
use crate::policy;
use crate::retrain::{Outcome, Promoter};
use crate::state::Request;
use crate::state::{Shared, lock};
use crate::store;
use pipeline::health::Health;
use tokio::sync::mpsc;

/// Runs retrains one at a time, in the order asked.
pub(crate) async fn retrainer(
    promoter: Promoter,
    shared: Shared,
    mut requests: mpsc::Receiver<Request>,
    health: Health,
) {
    // The receiver ends once every sender is dropped; the state's own sender must not keep it.
    let Shared {
        window,
        schedule,
        metrics,
        requests: own_sender,
    } = shared;
    drop(own_sender);
    while let Some(request) = requests.recv().await {
        let samples: Vec<store::Sample> = lock(&window).snapshot();
        lock(&schedule).retrained();
        let trigger = request.trigger;
        let promoter = promoter.clone();
        let result = tokio::task::spawn_blocking(move || promoter.retrain(trigger, &samples))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|result| result);
        let reply = match result {
            Ok(outcome) => {
                report(&outcome, &metrics);
                if let Some(note) = command_note(&outcome) {
                    health.set_note(COMMAND_NOTE, note);
                }
                Ok(outcome)
            }
            Err(err) => {
                let text = format!("{err:#}");
                tracing::error!(trigger = trigger.as_str(), error = %text, "retrain failed");
                metrics
                    .retrains
                    .get_or_create(&RetrainLabels {
                        trigger: trigger.as_str(),
                        result: "failed",
                    })
                    .inc();
                Err(text)
            }
        };
        if let Some(tx) = request.reply {
            let _ = tx.send(reply);
        }
    }
}

/// The `/healthz` note of a failing `TRAIN_COMMAND`.
const COMMAND_NOTE: &str = "train_command";

/// What a retrain changes in the `TRAIN_COMMAND` note: set by a failure (`failed`), cleared by a
/// candidate that was made (promoted or refused on its merits); a skipped retrain says nothing.
pub(crate) fn command_note(outcome: &Outcome) -> Option<Option<String>> {
    match outcome.result {
        "failed" => Some(Some(format!(
            "the last retrain got no usable model: {}; the served model stays",
            outcome.detail
        ))),
        "promoted" | "refused" => Some(None),
        _ => None,
    }
}

/// The log line and metrics of one retrain.
pub(crate) fn report(outcome: &Outcome, metrics: &Metrics) {
    metrics
        .retrains
        .get_or_create(&RetrainLabels {
            trigger: outcome.trigger,
            result: outcome.result,
        })
        .inc();
    if let (Some(serving), Some(candidate)) = (outcome.serving_mae, outcome.candidate_mae) {
        metrics
            .holdout_mae
            .get_or_create(&ModelLabel { model: "serving" })
            .set(serving);
        metrics
            .holdout_mae
            .get_or_create(&ModelLabel { model: "candidate" })
            .set(candidate);
    }
    let candidate = outcome.candidate_version.as_deref().unwrap_or("-");
    // The relative gain of the guarded loss: MAE, or a classifier's log loss.
    let gain = outcome
        .serving_mae
        .zip(outcome.candidate_mae)
        .or(outcome.serving_log_loss.zip(outcome.candidate_log_loss))
        .map(|(s, c)| policy::gain(s, c));
    match outcome.result {
        "promoted" => tracing::info!(
            trigger = outcome.trigger,
            from = %outcome.serving_version,
            to = candidate,
            serving_mae = outcome.serving_mae,
            candidate_mae = outcome.candidate_mae,
            serving_log_loss = outcome.serving_log_loss,
            candidate_log_loss = outcome.candidate_log_loss,
            serving_accuracy = outcome.serving_accuracy,
            candidate_accuracy = outcome.candidate_accuracy,
            gain,
            train_rows = outcome.train_rows,
            holdout_rows = outcome.holdout_rows,
            "candidate promoted: {}",
            outcome.detail
        ),
        "failed" | "refused" => tracing::warn!(
            trigger = outcome.trigger,
            serving = %outcome.serving_version,
            candidate,
            serving_mae = outcome.serving_mae,
            candidate_mae = outcome.candidate_mae,
            serving_log_loss = outcome.serving_log_loss,
            candidate_log_loss = outcome.candidate_log_loss,
            serving_accuracy = outcome.serving_accuracy,
            candidate_accuracy = outcome.candidate_accuracy,
            gain,
            train_rows = outcome.train_rows,
            holdout_rows = outcome.holdout_rows,
            "{}: {}",
            if outcome.result == "failed" {
                "retrain failed, the served model stays"
            } else {
                "candidate refused"
            },
            outcome.detail
        ),
        _ => tracing::info!(
            trigger = outcome.trigger,
            "retrain skipped: {}",
            outcome.detail
        ),
    }
}
