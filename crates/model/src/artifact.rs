//! Model artifacts: a small, human-readable JSON file with everything needed to serve a fitted
//! model and to know where it came from (`model train` writes one; `MODEL_PATH` serves one), and
//! the watcher that swaps in a new artifact while the service runs.

use crate::drift::Reference;
use crate::regression::{FitMetrics, LinearModel, ModelError, derived_version, hex};
use crate::served::{ArtifactKind, ServedModel};
use anyhow::Context as _;
use pipeline::dataset::Dataset;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Identifies the file format, so a wrong file is refused with a clear error.
pub const FORMAT: &str = "ml-pipeline/linear-model/1";

/// The artifact file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Always [`FORMAT`].
    pub format: String,
    /// Version carried on every prediction.
    pub version: String,
    /// Feature names, in order.
    pub feature_names: Vec<String>,
    /// Target column name.
    pub target_name: String,
    /// One coefficient per feature.
    pub coefficients: Vec<f64>,
    /// Intercept.
    pub intercept: f64,
    /// SHA-256 of the training CSV file.
    pub training_data_sha256: String,
    /// In-sample quality.
    pub metrics: FitMetrics,
    /// When it was trained (RFC 3339).
    pub trained_at: String,
    /// Statistics of the training data, the reference of the drift figures. Absent in artifacts
    /// written before they were recorded: those still load, without drift figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

impl Artifact {
    /// Fits on `data_path` and describes the result. The version is `version`, or derived from the
    /// coefficients.
    pub fn train(
        data_path: &Path,
        target_column: Option<&str>,
        version: Option<String>,
    ) -> anyhow::Result<Self> {
        let bytes = std::fs::read(data_path)
            .with_context(|| format!("cannot read {}", data_path.display()))?;
        let data = Dataset::from_csv(data_path, target_column)?;
        Self::fit(&data, hex(&Sha256::digest(&bytes)), version)
    }

    /// Fits on `data` (in memory, e.g. the trainer's window) and describes the result;
    /// `data_sha256` names the data it came from. The version is `version`, or derived from the
    /// coefficients.
    pub fn fit(
        data: &Dataset,
        data_sha256: String,
        version: Option<String>,
    ) -> anyhow::Result<Self> {
        let mut model = LinearModel::fit(data)?;
        if let Some(version) = version {
            model.version = version;
        }
        Self::of(&model, data, data_sha256)
    }

    /// The artifact of a fitted `model`, with its in-sample quality on `data`.
    pub fn of(model: &LinearModel, data: &Dataset, data_sha256: String) -> anyhow::Result<Self> {
        let metrics = model.evaluate(data)?;
        Ok(Self {
            format: FORMAT.to_owned(),
            version: model.version.clone(),
            feature_names: model.feature_names.clone(),
            target_name: data.target_name.clone(),
            coefficients: model.coefficients.clone(),
            intercept: model.intercept,
            training_data_sha256: data_sha256,
            metrics,
            trained_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            reference: model.reference.as_deref().cloned(),
        })
    }

    /// Reads and validates an artifact file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::load_with_hash(path).map(|(artifact, _)| artifact)
    }

    /// Reads and validates an artifact file, with the hash of the exact bytes read: the baseline
    /// of [`watch_artifact`], so a file replaced after this read is seen as new.
    pub fn load_with_hash(path: &Path) -> anyhow::Result<(Self, ContentHash)> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read model artifact {}", path.display()))?;
        let artifact = std::str::from_utf8(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(Self::parse)
            .with_context(|| format!("refusing model artifact {}", path.display()))?;
        Ok((artifact, ContentHash::of(&bytes)))
    }

    /// Parses and validates artifact JSON.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let artifact: Self = serde_json::from_str(text).context("not a model artifact (JSON)")?;
        if artifact.format != FORMAT {
            anyhow::bail!("format is {:?}, expected {FORMAT:?}", artifact.format);
        }
        pipeline::messages::validate_id(&artifact.version).map_err(|_| {
            ModelError::Invalid(format!(
                "version {:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
                artifact.version
            ))
        })?;
        artifact.model().validate()?;
        Ok(artifact)
    }

    /// The servable model.
    pub fn model(&self) -> LinearModel {
        LinearModel {
            feature_names: self.feature_names.clone(),
            coefficients: self.coefficients.clone(),
            intercept: self.intercept,
            version: self.version.clone(),
            reference: self.reference.clone().map(Arc::new),
        }
    }

    /// Writes the artifact atomically (a temporary file in the same folder, synced, then renamed
    /// over `path`), so a watcher never reads half of it and a crash leaves the old file or the
    /// new one. Two writers never share a temporary file.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        Ok(write_atomically(path, &self.to_bytes()?)?)
    }

    /// The file's bytes: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok((serde_json::to_string_pretty(self)? + "\n").into_bytes())
    }
}

/// Replaces `path` with `bytes` atomically and durably, readable by others (model services may
/// run as another user): the one atomic write of the pipeline, kept at this path for the trainer.
pub use pipeline::fs::write_atomic as write_atomically;

/// The file of version `version` beside the served artifact `model_path`:
/// `<folder of model_path>/<version>.json` or `.onnx` (by `kind`), where the trainer writes every
/// promoted version. `None` for a string that is not a version (so it cannot name a path
/// elsewhere).
pub fn versioned_path(model_path: &Path, version: &str, kind: ArtifactKind) -> Option<PathBuf> {
    pipeline::messages::validate_id(version).ok()?;
    let dir = model_path.parent().unwrap_or(Path::new(""));
    Some(dir.join(format!("{version}.{}", kind.extension())))
}

/// The file of version `version` that exists beside `model_path`, JSON or ONNX; `None` when
/// there is none (or `version` is not a version).
pub fn find_version(model_path: &Path, version: &str) -> Option<PathBuf> {
    [ArtifactKind::LinearJson, ArtifactKind::Onnx]
        .into_iter()
        .filter_map(|kind| versioned_path(model_path, version, kind))
        .find(|path| path.is_file())
}

/// What `rollback` put back.
#[derive(Debug)]
pub struct Restored {
    /// The model now served.
    pub model: ServedModel,
    /// Its JSON artifact, when it is the built-in linear one (when and on what it was trained).
    pub artifact: Option<Artifact>,
}

/// `model rollback --to VERSION`: puts `<folder of model_path>/<VERSION>.json` (or `.onnx`) back
/// as the served artifact, atomically, after checking it is a valid artifact of that version.
/// The model services watching `model_path` swap to it.
pub fn rollback(model_path: &Path, version: &str) -> anyhow::Result<Restored> {
    if pipeline::messages::validate_id(version).is_err() {
        anyhow::bail!("{version:?} is not a version (1 to 128 characters of A-Z a-z 0-9 . _ : -)");
    }
    let source = find_version(model_path, version).with_context(|| {
        format!(
            "no artifact of version {version}: neither {version}.json nor {version}.onnx is \
             beside {}",
            model_path.display()
        )
    })?;
    let bytes =
        std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
    let model =
        ServedModel::parse(&bytes).with_context(|| format!("refusing {}", source.display()))?;
    if model.version != version {
        anyhow::bail!(
            "{} holds version {}, not {version}",
            source.display(),
            model.version
        );
    }
    let artifact = match ArtifactKind::of(&bytes) {
        ArtifactKind::LinearJson => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| Artifact::parse(text).ok()),
        ArtifactKind::Onnx => None,
    };
    write_atomically(model_path, &bytes)?;
    Ok(Restored { model, artifact })
}

/// The version a fit on data would get, for the log.
pub fn version_of(model: &LinearModel) -> String {
    derived_version(&model.coefficients, model.intercept)
}

/// SHA-256 of an artifact file's bytes, to tell a new file from the one already seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

/// Watches the artifact at `source` (a file or a URL, polling every `interval`) and sends each new valid model on
/// `models`. `loaded` is the hash of the file the served model was read from (taken at that read,
/// so a file replaced between the first load and the watcher's start is still loaded); `None`
/// when there was no file yet (the model was fitted on `DATA_PATH`): the first file to appear
/// is loaded. A file that
/// cannot be read, is not a valid artifact, or has other features or another task than the model
/// being served is refused with an error log; the current model keeps serving.
pub async fn watch_artifact(
    mut source: crate::source::ArtifactSource,
    loaded: Option<ContentHash>,
    interval: Duration,
    models: watch::Sender<Arc<ServedModel>>,
    reloads: prometheus_client::metrics::family::Family<
        ReloadLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    health: pipeline::health::Health,
    shutdown: pipeline::CancellationToken,
) {
    use crate::source::{Outage, Reading, announce};
    let mut last = loaded;
    let mut outage = Outage::default();
    let path = source.describe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        let reading = tokio::select! {
            reading = source.read() => reading,
            _ = shutdown.cancelled() => return,
        };
        if let Some(change) = outage.observe(&reading) {
            announce(&change, &source, &models.borrow().version, &health);
        }
        let Reading::Bytes(bytes) = reading else {
            continue;
        };
        let hash = ContentHash::of(&bytes);
        if Some(hash) == last {
            continue;
        }
        last = Some(hash);
        let current = models.borrow().clone();
        // Loading an ONNX graph runs a probe: off the runtime's workers.
        let result = tokio::task::spawn_blocking(move || ServedModel::parse(&bytes))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|parsed| parsed)
            .and_then(|model| {
                model.same_features(&current).map_err(anyhow::Error::msg)?;
                model.same_task(&current).map_err(anyhow::Error::msg)?;
                Ok(model)
            });
        match result {
            Ok(model) => {
                let to = model.version.clone();
                // Swap first: once the line is logged, every new prediction uses the new model.
                models.send_replace(Arc::new(model));
                reloads
                    .get_or_create(&ReloadLabel { result: "loaded" })
                    .inc();
                tracing::info!(path = %path, from = %current.version, %to, "model reloaded");
                health.set_note(REFUSED_NOTE, None);
            }
            Err(err) => {
                tracing::error!(path = %path, version = %current.version, error = %format!("{err:#}"), "refused a new model artifact; still serving the current model");
                health.set_note(
                    REFUSED_NOTE,
                    Some(format!(
                        "refused the model artifact at {path} ({err:#}); serving {}",
                        current.version
                    )),
                );
                reloads
                    .get_or_create(&ReloadLabel { result: "refused" })
                    .inc();
            }
        }
    }
}

/// The `/healthz` note of a refused artifact (until a valid one is loaded).
const REFUSED_NOTE: &str = "model artifact";

/// Label of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReloadLabel {
    /// `loaded` or `refused`.
    pub result: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diabetes() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv")
    }

    #[test]
    fn artifacts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        let artifact = Artifact::train(&diabetes(), None, Some("v1".into())).unwrap();
        artifact.write(&path).unwrap();
        let loaded = Artifact::load(&path).unwrap();
        assert_eq!(loaded, artifact);
        assert_eq!(loaded.version, "v1");
        assert_eq!(loaded.feature_names.len(), 10);
        assert_eq!(loaded.training_data_sha256.len(), 64);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.json"], "no temporary file left");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644, "mode {mode:o}");
    }

    #[test]
    fn artifacts_record_the_reference_statistics() {
        let artifact = Artifact::train(&diabetes(), None, Some("v1".into())).unwrap();
        let reference = artifact
            .reference
            .as_ref()
            .expect("no reference statistics");
        assert_eq!(reference.rows, 442);
        assert_eq!(reference.mae, artifact.metrics.mae);
        let names: Vec<&str> = reference.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, artifact.feature_names);
        let bmi = &reference.features[2];
        assert_eq!(bmi.name, "bmi");
        // The diabetes features are centred and scaled so that the sum of squares is 1.
        assert!(bmi.mean.abs() < 1e-6, "{}", bmi.mean);
        assert!((bmi.std_dev - (1.0f64 / 442.0).sqrt()).abs() < 1e-6);
        assert_eq!(bmi.decile_edges.len(), 9);
        let share: f64 = bmi.bin_fractions.iter().sum();
        assert!((share - 1.0).abs() < 1e-9);
        // The written file carries it, and the served model has it.
        let text = serde_json::to_string(&artifact).unwrap();
        assert!(text.contains("\"decile_edges\""));
        assert_eq!(
            Artifact::parse(&text).unwrap().model().reference.as_deref(),
            Some(reference)
        );
    }

    /// An artifact written before the reference statistics existed still loads, without them.
    #[test]
    fn older_artifacts_without_reference_statistics_load() {
        let mut old =
            serde_json::to_value(Artifact::train(&diabetes(), None, Some("v1".into())).unwrap())
                .unwrap();
        old.as_object_mut().unwrap().remove("reference");
        let artifact = Artifact::parse(&old.to_string()).unwrap();
        assert_eq!(artifact.reference, None);
        assert_eq!(artifact.model().reference, None);
        // And it is written back without the field.
        assert!(
            !serde_json::to_string(&artifact)
                .unwrap()
                .contains("reference")
        );
    }

    #[test]
    fn a_broken_reference_is_refused() {
        let mut artifact =
            serde_json::to_value(Artifact::train(&diabetes(), None, Some("v1".into())).unwrap())
                .unwrap();
        artifact["reference"]["features"][0]["decile_edges"] = serde_json::json!([1.0]);
        let err = Artifact::parse(&artifact.to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("decile edges"), "{err:#}");
    }

    #[test]
    fn derived_version_without_a_given_one() {
        let artifact = Artifact::train(&diabetes(), None, None).unwrap();
        assert_eq!(artifact.version, version_of(&artifact.model()));
    }

    /// The file is replaced after the service loaded it and before the watcher looked at it: the
    /// new artifact must still be swapped in.
    #[tokio::test]
    async fn an_artifact_replaced_before_the_watcher_starts_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        Artifact::train(&diabetes(), None, Some("v1".into()))
            .unwrap()
            .write(&path)
            .unwrap();
        let (served, loaded) = Artifact::load_with_hash(&path).unwrap();
        Artifact::train(&diabetes(), None, Some("v2".into()))
            .unwrap()
            .write(&path)
            .unwrap();
        let (models, mut current) = watch::channel(Arc::new(ServedModel::of_artifact(&served)));
        let shutdown = pipeline::CancellationToken::new();
        let reloads = prometheus_client::metrics::family::Family::<ReloadLabel, _>::default();
        let watcher = tokio::spawn(watch_artifact(
            crate::source::ArtifactSource::File(path),
            Some(loaded),
            Duration::from_millis(10),
            models,
            reloads.clone(),
            pipeline::health::Health::new(),
            shutdown.clone(),
        ));
        let swapped = tokio::time::timeout(
            Duration::from_secs(10),
            current.wait_for(|model| model.version == "v2"),
        )
        .await
        .is_ok();
        // An unchanged file is not loaded again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        watcher.await.unwrap();
        assert!(swapped, "the replaced artifact was never loaded");
        let loads: prometheus_client::metrics::counter::Counter = reloads
            .get_or_create(&ReloadLabel { result: "loaded" })
            .clone();
        assert_eq!(loads.get(), 1);
    }

    #[test]
    fn rollback_puts_a_versioned_artifact_back() {
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("model.json");
        let v1 = Artifact::train(&diabetes(), None, Some("v1".into())).unwrap();
        v1.write(&dir.path().join("v1.json")).unwrap();
        Artifact::train(&diabetes(), None, Some("v2".into()))
            .unwrap()
            .write(&served)
            .unwrap();
        let back = rollback(&served, "v1").unwrap();
        assert_eq!(back.artifact.as_ref(), Some(&v1));
        assert_eq!(back.model.version, "v1");
        assert_eq!(Artifact::load(&served).unwrap(), v1);
        // Unknown versions, names that are not versions, and a file of another version.
        assert!(format!("{:#}", rollback(&served, "v9").unwrap_err()).contains("no artifact"));
        assert!(rollback(&served, "../v1").is_err());
        std::fs::copy(dir.path().join("v1.json"), dir.path().join("v3.json")).unwrap();
        assert!(format!("{:#}", rollback(&served, "v3").unwrap_err()).contains("not v3"));
        assert_eq!(Artifact::load(&served).unwrap(), v1);
    }

    /// A model started before its artifact exists picks the file up when it appears.
    #[tokio::test]
    async fn an_artifact_that_appears_later_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        let fitted = Artifact::train(&diabetes(), None, Some("fitted".into())).unwrap();
        let (models, mut current) = watch::channel(Arc::new(ServedModel::of_artifact(&fitted)));
        let shutdown = pipeline::CancellationToken::new();
        let reloads = prometheus_client::metrics::family::Family::<ReloadLabel, _>::default();
        let watcher = tokio::spawn(watch_artifact(
            crate::source::ArtifactSource::File(path.clone()),
            None,
            Duration::from_millis(10),
            models,
            reloads,
            pipeline::health::Health::new(),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(current.borrow().version, "fitted");
        Artifact::train(&diabetes(), None, Some("v1".into()))
            .unwrap()
            .write(&path)
            .unwrap();
        let swapped = tokio::time::timeout(
            Duration::from_secs(10),
            current.wait_for(|model| model.version == "v1"),
        )
        .await
        .is_ok();
        shutdown.cancel();
        watcher.await.unwrap();
        assert!(swapped, "the new artifact was never loaded");
    }

    #[test]
    fn broken_artifacts_are_refused() {
        let good =
            serde_json::to_value(Artifact::train(&diabetes(), None, Some("v1".into())).unwrap())
                .unwrap();
        assert!(Artifact::parse("{not json").is_err());
        let mut wrong_format = good.clone();
        wrong_format["format"] = "other".into();
        assert!(Artifact::parse(&wrong_format.to_string()).is_err());
        let mut short = good.clone();
        short["coefficients"] = serde_json::json!([1.0]);
        assert!(Artifact::parse(&short.to_string()).is_err());
        let mut bad_version = good.clone();
        bad_version["version"] = "a b".into();
        assert!(Artifact::parse(&bad_version.to_string()).is_err());
        assert!(Artifact::parse(&good.to_string()).is_ok());
    }

    #[tokio::test]
    async fn a_url_is_polled_with_its_etag_and_an_outage_keeps_the_served_model() {
        use axum::http::{HeaderMap, StatusCode, header};
        use std::sync::Mutex;
        // What the stand-in answers: status, bytes, ETag; and the If-None-Match it was sent.
        type Served = Arc<Mutex<(u16, Vec<u8>, String, Vec<Option<String>>)>>;
        let v1 = Artifact::train(&diabetes(), None, Some("v1".into())).unwrap();
        let bytes = |a: &Artifact| serde_json::to_vec(a).unwrap();
        let served: Served = Arc::new(Mutex::new((200, bytes(&v1), "\"t1\"".into(), Vec::new())));
        let route = axum::Router::new()
            .route(
                "/model",
                axum::routing::get(
                    |axum::extract::State(served): axum::extract::State<Served>,
                     headers: HeaderMap| async move {
                        let mut s = served.lock().unwrap();
                        let asked = headers
                            .get(header::IF_NONE_MATCH)
                            .map(|v| v.to_str().unwrap().to_owned());
                        s.3.push(asked.clone());
                        if s.0 == 200 && asked.as_deref() == Some(s.2.as_str()) {
                            return (
                                StatusCode::NOT_MODIFIED,
                                [(header::ETAG, s.2.clone())],
                                Vec::new(),
                            );
                        }
                        (
                            StatusCode::from_u16(s.0).unwrap(),
                            [(header::ETAG, s.2.clone())],
                            s.1.clone(),
                        )
                    },
                ),
            )
            .with_state(served.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, route).await });

        let fitted = Artifact::train(&diabetes(), None, Some("fitted".into())).unwrap();
        let (models, mut current) = watch::channel(Arc::new(ServedModel::of_artifact(&fitted)));
        let health = pipeline::health::Health::new();
        let shutdown = pipeline::CancellationToken::new();
        let watcher = tokio::spawn(watch_artifact(
            crate::source::ArtifactSource::Url {
                url: format!("http://{addr}/model"),
                etag: None,
            },
            None,
            Duration::from_millis(10),
            models,
            Default::default(),
            health.clone(),
            shutdown.clone(),
        ));
        let wait = |current: &mut watch::Receiver<Arc<ServedModel>>, version: &'static str| {
            let mut current = current.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    current.wait_for(|m| m.version == version),
                )
                .await
                .is_ok()
            }
        };
        assert!(wait(&mut current, "v1").await, "v1 not loaded");
        // Polled with the tag it got: 304s.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            served
                .lock()
                .unwrap()
                .3
                .iter()
                .any(|t| t.as_deref() == Some("\"t1\""))
        );
        // The source goes down: v1 stays, and /healthz says why.
        served.lock().unwrap().0 = 503;
        served.lock().unwrap().1 = b"MODEL_PATH is not a valid artifact".to_vec();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(current.borrow().version, "v1");
        let notes = health.notes().join("\n");
        assert!(
            notes.contains("cannot fetch the model artifact") && notes.contains("503"),
            "{notes}"
        );
        // A garbage answer is refused and said; then v2 is swapped in and the notes go.
        {
            let mut s = served.lock().unwrap();
            *s = (
                200,
                b"not an artifact".to_vec(),
                "\"bad\"".into(),
                Vec::new(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(current.borrow().version, "v1");
        assert!(
            health
                .notes()
                .join("\n")
                .contains("refused the model artifact"),
            "{:?}",
            health.notes()
        );
        let mut v2 = v1.clone();
        v2.version = "v2".into();
        {
            let mut s = served.lock().unwrap();
            *s = (200, bytes(&v2), "\"t2\"".into(), Vec::new());
        }
        assert!(wait(&mut current, "v2").await, "v2 not loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(health.notes().is_empty(), "{:?}", health.notes());
        shutdown.cancel();
        watcher.await.unwrap();
    }

    /// A logistic artifact is hot-swapped like the linear one; an artifact of the other task on
    /// the same features is refused, and the classifier keeps serving.
    #[tokio::test]
    async fn a_logistic_artifact_is_swapped_in_and_a_regressor_refused() {
        use crate::logistic::LogisticArtifact;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.csv");
        std::fs::write(
            &data,
            "a,b,y\n-2,1,0\n-1,0,0\n-0.5,2,0\n0.5,1,1\n1,0,1\n2,2,1\n",
        )
        .unwrap();
        let path = dir.path().join("model.json");
        let v1 = LogisticArtifact::train(&data, None, Some("v1".into())).unwrap();
        v1.write(&path).unwrap();
        let (served, loaded) = ServedModel::load(&path).unwrap();
        assert_eq!(served.family(), "logistic");
        let (models, current) = watch::channel(Arc::new(served));
        let shutdown = pipeline::CancellationToken::new();
        let reloads = prometheus_client::metrics::family::Family::<ReloadLabel, _>::default();
        let health = pipeline::health::Health::new();
        let watcher = tokio::spawn(watch_artifact(
            crate::source::ArtifactSource::File(path.clone()),
            Some(loaded),
            Duration::from_millis(10),
            models,
            reloads.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        // The linear regression of the same file (integer labels read as numbers).
        Artifact::train(&data, None, Some("linear".into()))
            .unwrap()
            .write(&path)
            .unwrap();
        let count = |result: &'static str| {
            let counter: prometheus_client::metrics::counter::Counter =
                reloads.get_or_create(&ReloadLabel { result }).clone();
            counter.get()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count("refused") == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(current.borrow().version, "v1");
        let notes = health.notes().join("\n");
        assert!(
            notes.contains("it is a regression model (linear), the model being served is a classification model (logistic)"),
            "{notes}"
        );
        LogisticArtifact::train(&data, None, Some("v2".into()))
            .unwrap()
            .write(&path)
            .unwrap();
        let swapped = tokio::time::timeout(
            Duration::from_secs(10),
            current.clone().wait_for(|model| model.version == "v2"),
        )
        .await
        .is_ok();
        shutdown.cancel();
        watcher.await.unwrap();
        assert!(swapped, "the new logistic artifact was never loaded");
        assert_eq!(current.borrow().family(), "logistic");
        assert_eq!((count("loaded"), count("refused")), (1, 1));
    }
}
