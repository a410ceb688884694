//! A classifier's holdout score, for the trainer's guard: accuracy and log loss of its answers on
//! a labelled data set, computed as the metric service computes them
//! ([`pipeline::classes::log_loss_of`] of the normalised probability of the true class).

use crate::served::{Prediction, ServedModel};
use anyhow::Context as _;
use pipeline::classes::log_loss_of;
use pipeline::dataset::Dataset;
use pipeline::messages::Target;

/// How a classifier did on a labelled data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassEvaluation {
    /// Rows scored.
    pub rows: usize,
    /// Share of right predictions.
    pub accuracy: f64,
    /// Mean log loss (a true class the model does not know counts as probability 0, clipped).
    pub log_loss: f64,
}

impl ServedModel {
    /// Accuracy and log loss on `data` (a classification data set; columns matched by name, as
    /// [`ServedModel::evaluate`] does). A row the model cannot answer is an error naming it.
    pub fn evaluate_classes(&self, data: &Dataset) -> anyhow::Result<ClassEvaluation> {
        let arranged = self.arrange_dataset(data).map_err(anyhow::Error::msg)?;
        let rows = data.len();
        anyhow::ensure!(rows > 0, "no rows to score");
        let (mut right, mut loss) = (0usize, 0.0);
        for row in 0..rows {
            let truth = match data.label(row) {
                Target::Class(label) => label,
                Target::Number(value) => {
                    pipeline::classes::ClassLabel::from_number(value, "y_true")
                        .map_err(|err| anyhow::anyhow!("row {row}: {err}"))?
                }
            };
            let answer = self
                .answer(arranged.row(row))
                .context("the model cannot be run")?
                .map_err(|err| anyhow::anyhow!("row {row}: {err}"))?;
            let Prediction::Class(label, probabilities) = answer else {
                anyhow::bail!("the model answers numbers, not classes: it is not a classifier");
            };
            right += usize::from(label.key() == truth.key());
            loss += log_loss_of(probabilities.normalised(&truth.key()).unwrap_or(0.0));
        }
        Ok(ClassEvaluation {
            rows,
            accuracy: right as f64 / rows as f64,
            log_loss: loss / rows as f64,
        })
    }
}
