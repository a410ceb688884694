//! Queue names of one test or benchmark phase, connecting to the broker, and the one clean-up that
//! deletes everything a run may have declared: its queues, their dead-letter queues, the trainer's
//! copies and the producer's fanout exchanges.

use anyhow::{Context as _, bail};
use lapin::{Connection, ConnectionProperties};
use pipeline::broker::topology::{dead_letter_queue, fanout_exchange, training_queue};
use pipeline::config::QueueNames;
use std::time::Duration;

/// The three queue names of one run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Queues {
    /// FEATURES_QUEUE.
    pub features: String,
    /// Y_TRUE_QUEUE.
    pub y_true: String,
    /// Y_PRED_QUEUE.
    pub y_pred: String,
}

impl Queues {
    /// `<prefix>.features`, `<prefix>.y_true`, `<prefix>.y_pred`.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            features: format!("{prefix}.features"),
            y_true: format!("{prefix}.y_true"),
            y_pred: format!("{prefix}.y_pred"),
        }
    }

    /// Names of their own for one test (`t.<test>.<random>.*`), so tests can share a broker.
    pub fn unique(test: &str) -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Self::with_prefix(&format!("t.{test}.{tag}"))
    }

    /// The three queues and their dead-letter queues.
    pub fn all(&self) -> Vec<String> {
        let main = [&self.features, &self.y_true, &self.y_pred];
        main.iter()
            .map(|q| (*q).clone())
            .chain(main.iter().map(|q| dead_letter_queue(q)))
            .collect()
    }

    /// Every queue a run may declare: [`Queues::all`], the trainer's copies of `features` and
    /// `y_true`, and the loss audit's queue, with their dead-letter queues.
    pub fn declared(&self) -> Vec<String> {
        let mut all = self.all();
        let audit = pipeline::audit::audit_queue(&self.y_true);
        all.push(dead_letter_queue(&audit));
        all.push(audit);
        for stream in [&self.features, &self.y_true] {
            all.push(training_queue(stream));
            all.push(dead_letter_queue(&training_queue(stream)));
        }
        all
    }

    /// The producer's fanout exchanges (of `features` and `y_true`).
    pub fn exchanges(&self) -> Vec<String> {
        vec![
            fanout_exchange(&self.features),
            fanout_exchange(&self.y_true),
        ]
    }

    /// The services' settings for these names.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FEATURES_QUEUE".into(), self.features.clone()),
            ("Y_TRUE_QUEUE".into(), self.y_true.clone()),
            ("Y_PRED_QUEUE".into(), self.y_pred.clone()),
        ]
    }

    /// As the services' configuration holds them.
    pub fn names(&self) -> QueueNames {
        QueueNames {
            features_queue: self.features.clone(),
            y_true_queue: self.y_true.clone(),
            y_pred_queue: self.y_pred.clone(),
            partitions: pipeline::partition::Partitions::ONE,
        }
    }
}

/// Connects within 10 s, with a name that shows in the management UI.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, properties),
    )
    .await
    .context("timed out connecting to the broker")?
    .with_context(|| {
        format!(
            "cannot connect to {}",
            pipeline::broker::connection::redact(url)
        )
    })
}

/// Deletes everything the run on `queues` may have declared (a missing queue or exchange is fine).
/// The services must be stopped first: a live one would declare its queues again.
pub async fn delete_queues(url: &str, queues: &Queues) -> anyhow::Result<()> {
    let connection = connect(url, "testkit (cleanup)").await?;
    let mut channel = connection.create_channel().await?;
    let mut failed = Vec::new();
    for name in queues.declared() {
        if let Err(err) = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await
        {
            failed.push(format!("{name}: {err}"));
            // A refused delete closes the channel; carry on with a new one.
            channel = connection.create_channel().await?;
        }
    }
    for exchange in queues.exchanges() {
        // Deleting an exchange that was never declared may close the channel.
        if channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await
            .is_err()
        {
            channel = connection.create_channel().await?;
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("cannot delete {}", failed.join("; "))
    }
}
