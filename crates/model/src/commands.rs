//! The binary's one-shot commands: `model train`, `model rollback`, `model inspect` and
//! `model stamp`.

use crate::artifact;
use crate::logistic::LogisticArtifact;
use crate::onnx::keys;
use crate::served::{ArtifactKind, Engine, Evaluation, ServedModel};
use crate::stamp;
use anyhow::Context as _;
use pipeline::classes::Task;
use pipeline::dataset::Dataset;
use sha2::Digest as _;
use std::path::Path;

/// `model rollback --to VERSION`: puts the artifact back and prints what is served now.
pub fn rollback(model_path: Option<&std::path::Path>, version: &str) -> anyhow::Result<()> {
    let model_path =
        model_path.context("MODEL_PATH is not set: rollback needs the served artifact's path")?;
    let restored = artifact::rollback(model_path, version)?;
    match restored.artifact {
        Some(artifact) => println!(
            "{} now serves version {} (trained {}, {} rows, MAE {:.4})",
            model_path.display(),
            artifact.version,
            artifact.trained_at,
            artifact.metrics.rows,
            artifact.metrics.mae
        ),
        None => println!(
            "{} now serves version {} ({}, {} features)",
            model_path.display(),
            restored.model.version,
            restored.model.family(),
            restored.model.n_features()
        ),
    }
    Ok(())
}

/// `model train`: fits the built-in model of `task` (the linear regression, or the logistic
/// regression), writes its artifact, prints a summary.
pub fn train(
    data: &std::path::Path,
    out: &std::path::Path,
    version: Option<String>,
    target: Option<&str>,
    task: Task,
) -> anyhow::Result<()> {
    if task == Task::Classification {
        let artifact = LogisticArtifact::train(data, target, version)?;
        artifact.write(out)?;
        let classes: Vec<String> = artifact.classes.iter().map(ToString::to_string).collect();
        println!(
            "wrote {} (version {}, logistic regression, {} features, {} classes [{}], {} rows, \
             accuracy {:.4}, log loss {:.4}, drift reference of {} features)",
            out.display(),
            artifact.version,
            artifact.feature_names.len(),
            classes.len(),
            classes.join(", "),
            artifact.metrics.rows,
            artifact.metrics.accuracy,
            artifact.metrics.log_loss,
            artifact.reference.as_ref().map_or(0, |r| r.features.len())
        );
        return Ok(());
    }
    let artifact = artifact::Artifact::train(data, target, version)
        .context("cannot fit a linear regression (for class labels: --task classification)")?;
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

/// `model inspect`: what the service would make of an artifact.
pub fn inspect(path: &Path, data: Option<&Path>, target: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let model = ServedModel::parse(&bytes)
        .with_context(|| format!("the model service would refuse {}", path.display()))?;
    println!("{}: accepted", path.display());
    println!("  family:    {}", model.family());
    let (task, classes) = (model.task(), model.classes());
    println!("  task:      {task}");
    if let Some(classes) = classes {
        let names: Vec<String> = classes.iter().map(ToString::to_string).collect();
        println!("  classes:   {} [{}]", names.len(), names.join(", "));
    }
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
        if task == Task::Classification {
            // Scoring is MAE and R² on numeric targets; a classifier's labels may be strings.
            println!(
                "  data:      not scored: `model inspect --data` scores regression models only"
            );
            return Ok(());
        }
        let data = Dataset::from_csv(data, target)?;
        let Evaluation { mae, r2, .. } = model.evaluate(&data)?;
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
    let stamped = stamp::stamp_onnx(&bytes, &version, names.as_deref(), data.as_ref())?;
    if let (Some(data), Some(fit)) = (&data, &stamped.fit) {
        println!(
            "on {} rows of the data: MAE {:.4}, R² {:.4}",
            data.len(),
            fit.mae,
            fit.r2
        );
    }
    let (model, stamped) = (stamped.model, stamped.bytes);
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
