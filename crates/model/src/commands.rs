//! The binary's one-shot commands: `model train` and `model rollback`.

use crate::artifact;
use anyhow::Context as _;

/// `model rollback --to VERSION`: puts the artifact back and prints what is served now.
pub fn rollback(model_path: Option<&std::path::Path>, version: &str) -> anyhow::Result<()> {
    let model_path =
        model_path.context("MODEL_PATH is not set: rollback needs the served artifact's path")?;
    let artifact = artifact::rollback(model_path, version)?;
    println!(
        "{} now serves version {} (trained {}, {} rows, MAE {:.4})",
        model_path.display(),
        artifact.version,
        artifact.trained_at,
        artifact.metrics.rows,
        artifact.metrics.mae
    );
    Ok(())
}

/// `model train`: fits, writes the artifact, prints a summary.
pub fn train(
    data: &std::path::Path,
    out: &std::path::Path,
    version: Option<String>,
    target: Option<&str>,
) -> anyhow::Result<()> {
    let artifact = artifact::Artifact::train(data, target, version)?;
    artifact.write(out)?;
    println!(
        "wrote {} (version {}, {} features, {} rows, R² {:.4}, MAE {:.4}, drift reference of {} features)",
        out.display(),
        artifact.version,
        artifact.feature_names.len(),
        artifact.metrics.rows,
        artifact.metrics.r2,
        artifact.metrics.mae,
        artifact.reference.as_ref().map_or(0, |r| r.features.len())
    );
    Ok(())
}
