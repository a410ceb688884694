//! The model service's own metrics: `pipeline_model_served{version}`.

use crate::served::ServedModel;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use tokio::sync::watch;

/// Label of `pipeline_model_served`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct VersionLabel {
    /// The model version.
    pub version: String,
}

/// Keeps `pipeline_model_served{version}` at 1 for the served version only, so a scrape of each
/// replica tells which version it serves.
pub(crate) async fn export_version(
    mut models: watch::Receiver<Arc<ServedModel>>,
    served: Family<VersionLabel, Gauge>,
) {
    loop {
        let version = models.borrow_and_update().version.clone();
        served.clear();
        served.get_or_create(&VersionLabel { version }).set(1);
        if models.changed().await.is_err() {
            return;
        }
    }
}
