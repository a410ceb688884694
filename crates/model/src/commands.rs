//! The binary's one-shot commands: `model train`, `model rollback`, `model inspect` and
//! `model stamp`.

use crate::artifact;
use crate::drift::Reference;
use crate::onnx::keys;
use crate::served::{ArtifactKind, Engine, ServedModel};
use crate::stamp;
use anyhow::Context as _;
use pipeline::dataset::Dataset;
use sha2::Digest as _;
use std::path::Path;

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

/// MAE and R² of `predictions` against `targets`.
fn score(predictions: &[f64], targets: &[f64]) -> (f64, f64) {
    let n = targets.len() as f64;
    let mean = targets.iter().sum::<f64>() / n;
    let (mut abs, mut ss_res, mut ss_tot) = (0.0, 0.0, 0.0);
    for (p, y) in predictions.iter().zip(targets) {
        abs += (y - p).abs();
        ss_res += (y - p) * (y - p);
        ss_tot += (y - mean) * (y - mean);
    }
    (
        abs / n,
        if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        },
    )
}

/// Predictions of `model` for `data` (columns matched by name) and their MAE and R².
fn evaluate(model: &ServedModel, data: &Dataset) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let data = model.arrange_dataset(data).map_err(anyhow::Error::msg)?;
    let predictions = model.predict_dataset(&data)?;
    if let Some(row) = predictions.iter().position(|p| !p.is_finite()) {
        anyhow::bail!(
            "the model answers {} for row {row} of the data",
            predictions[row]
        );
    }
    let (mae, r2) = score(&predictions, data.targets());
    Ok((predictions, mae, r2))
}

/// `model inspect`: what the service would make of an artifact.
pub fn inspect(path: &Path, data: Option<&Path>, target: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let model = ServedModel::parse(&bytes)
        .with_context(|| format!("the model service would refuse {}", path.display()))?;
    println!("{}: accepted", path.display());
    println!("  family:    {}", model.family());
    println!("  version:   {}", model.version);
    match model.feature_names() {
        Some(names) => println!("  features:  {} [{}]", names.len(), names.join(", ")),
        None => println!(
            "  features:  {} (unnamed: objects cannot be mapped and arrays are checked by count only; `model stamp` names them)",
            model.n_features()
        ),
    }
    println!(
        "  target:    {}",
        model.target_name.as_deref().unwrap_or("(not named)")
    );
    println!(
        "  drift:     {}",
        if model.reference.is_some() {
            "reference statistics present"
        } else {
            "no reference (no drift figures; `model stamp --data` adds one)"
        }
    );
    if let Engine::Onnx(graph) = &model.engine {
        println!("  graph:     {}", graph.signature);
        if let Some(caveat) = graph.caveat() {
            println!("  caution:   {caveat}");
        }
    }
    if let Some(data) = data {
        let data = Dataset::from_csv(data, target)?;
        let (_, mae, r2) = evaluate(&model, &data)?;
        println!(
            "  on {} rows of the data: MAE {mae:.4}, R² {r2:.4}",
            data.len()
        );
    }
    Ok(())
}

/// `model stamp`: writes the pipeline's metadata keys into an ONNX file.
pub fn stamp_model(
    path: &Path,
    out: Option<&Path>,
    data: Option<&Path>,
    target: Option<&str>,
    feature_names: Option<Vec<String>>,
    version: Option<String>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if ArtifactKind::of(&bytes) == ArtifactKind::LinearJson {
        anyhow::bail!(
            "{} is a JSON artifact: it carries its names and reference already",
            path.display()
        );
    }
    let existing = stamp::metadata_props(&bytes)?;
    let data = data
        .map(|data| Dataset::from_csv(data, target))
        .transpose()?;
    let names = match (feature_names, &data) {
        (Some(names), _) => Some(names),
        (None, Some(data)) => Some(data.feature_names.clone()),
        (None, None) => None,
    };
    let version = version
        .or_else(|| {
            existing
                .iter()
                .find(|(k, _)| k == keys::VERSION)
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| {
            format!(
                "onnx-{}",
                &crate::regression::hex(&sha2::Sha256::digest(&bytes))[..12]
            )
        });
    pipeline::messages::validate_id(&version).map_err(|_| {
        anyhow::anyhow!("version {version:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    })?;
    let joined = names.as_ref().map(|names| names.join(","));
    let mut props: Vec<(&str, &str)> = vec![(keys::VERSION, version.as_str())];
    if let Some(joined) = &joined {
        props.push((keys::FEATURE_NAMES, joined));
    }
    if let Some(data) = &data {
        props.push((keys::TARGET_NAME, data.target_name.as_str()));
    }
    let named = stamp::stamp(&bytes, &props)?;
    let model = ServedModel::onnx(&named).context("the stamped model is refused")?;
    let stamped = match &data {
        Some(data) => {
            let (_, mae, r2) = evaluate(&model, data)?;
            let arranged = model.arrange_dataset(data).map_err(anyhow::Error::msg)?;
            let reference = serde_json::to_string(&Reference::of(&arranged, mae))?;
            println!(
                "on {} rows of the data: MAE {mae:.4}, R² {r2:.4}",
                data.len()
            );
            stamp::stamp(&named, &[(keys::REFERENCE, reference.as_str())])?
        }
        None => named,
    };
    let model = ServedModel::onnx(&stamped).context("the stamped model is refused")?;
    let out = out.unwrap_or(path);
    artifact::write_atomically(out, &stamped)?;
    println!(
        "wrote {} (version {}, {} features{}, {})",
        out.display(),
        model.version,
        model.n_features(),
        model
            .feature_names()
            .map_or(String::from(", unnamed"), |n| format!(
                " [{}]",
                n.join(", ")
            )),
        if model.reference.is_some() {
            "drift reference"
        } else {
            "no drift reference"
        }
    );
    Ok(())
}
