//! Users' own models: an ONNX graph (scikit-learn through skl2onnx, XGBoost and LightGBM through
//! onnxmltools, PyTorch's `torch.onnx.export`) run by ONNX Runtime through the `ort` crate.
//!
//! The runtime is a shared library opened at run time from `ORT_DYLIB_PATH` (the image carries
//! it; outside Docker, the one inside the `onnxruntime` PyPI wheel, see `scripts/onnxruntime-lib`),
//! so the default JSON model needs no runtime at all. A graph is checked when it is loaded, never
//! while serving: one input `[rows, features]` of float or double, a first output of one number per
//! row, and a probe row that must come out finite. What the service needs beyond the graph (feature
//! names, version, target name, drift reference) is in the graph's `metadata_props`, written by
//! `model stamp` ([`crate::stamp`]).

use crate::drift::Reference;
use crate::error::ModelError;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The `metadata_props` keys the pipeline reads and `model stamp` writes.
pub mod keys {
    /// Comma-separated feature names, in the order of the input's columns.
    pub const FEATURE_NAMES: &str = "feature_names";
    /// The version carried on every prediction.
    pub const VERSION: &str = "version";
    /// The target column's name.
    pub const TARGET_NAME: &str = "target_name";
    /// The drift reference (JSON, as in the JSON artifact's `reference`).
    pub const REFERENCE: &str = "reference";
}

/// The runtime library configured at start-up (`ORT_DYLIB_PATH` through clap); tests and tools
/// fall back to the process environment.
static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
/// ONNX Runtime allows one environment per process, ever: built once, cloned for every session.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// Names the runtime library to open when the first ONNX model is loaded.
pub fn use_runtime_library(path: Option<&Path>) {
    if let Some(path) = path {
        let _ = LIBRARY.set(path.to_owned());
    }
}

/// Where a user gets the runtime, for every error that says it is missing.
const HOW_TO_GET_IT: &str = "an .onnx model needs ONNX Runtime: set ORT_DYLIB_PATH to its \
    libonnxruntime.so (the image has it; outside Docker `pip install onnxruntime` and \
    ORT_DYLIB_PATH=$(scripts/onnxruntime-lib))";

/// The process's ONNX Runtime environment, opening the library on first use.
fn environment() -> Result<Environment, ModelError> {
    let mut slot = ENVIRONMENT
        .lock()
        .map_err(|_| ModelError::Runtime("the ONNX Runtime lock is poisoned".to_owned()))?;
    if let Some(environment) = slot.as_ref() {
        return Ok(environment.clone());
    }
    let path = match LIBRARY.get() {
        Some(path) => path.clone(),
        None => match std::env::var_os("ORT_DYLIB_PATH") {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => {
                return Err(ModelError::Runtime(format!(
                    "ORT_DYLIB_PATH is not set: {HOW_TO_GET_IT}"
                )));
            }
        },
    };
    // ort's own message for a missing file is a bare "dlopen failed".
    if !path.is_file() {
        return Err(ModelError::Runtime(format!(
            "ORT_DYLIB_PATH={} is not a file: {HOW_TO_GET_IT}",
            path.display()
        )));
    }
    let environment = ort::init_from(&path)
        .map_err(|err| {
            ModelError::Runtime(format!(
                "cannot open ONNX Runtime at ORT_DYLIB_PATH={}: {err} ({HOW_TO_GET_IT})",
                path.display()
            ))
        })?
        .with_name("ml-pipeline")
        .build()
        .map_err(|err| ModelError::Runtime(format!("cannot start ONNX Runtime: {err}")))?;
    *slot = Some(environment.clone());
    Ok(environment)
}

/// What to change in the export, for the load errors users meet most.
fn load_hint(error: &str) -> &'static str {
    if error.contains("TreeEnsemble") && error.contains("expected type (tensor(float))") {
        " (a tree model exported with a double input and no cast: put \
         skl2onnx.sklapi.CastTransformer(dtype=np.float32) before the trees in the Pipeline; \
         see docs/own-model.md)"
    } else if error.contains("protobuf parsing failed") {
        " (the file is truncated or not an ONNX model)"
    } else {
        ""
    }
}

/// The element type of the graph's input: rows are converted to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    F32,
    F64,
}

/// What the graph's `metadata_props` say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// Feature names in column order.
    pub feature_names: Option<Vec<String>>,
    /// Version carried on predictions.
    pub version: Option<String>,
    /// Target column name.
    pub target_name: Option<String>,
    /// Drift reference.
    pub reference: Option<Reference>,
}

/// A loaded, checked ONNX regression graph.
pub struct OnnxModel {
    /// `Session::run` takes `&mut`; one model service predicts on one task, so this is never
    /// contended (the trainer's evaluation holds its own model).
    session: Mutex<Session>,
    input: String,
    output: String,
    precision: Precision,
    n_features: usize,
    /// What the graph says about itself.
    pub metadata: Metadata,
    /// The graph's input and output, for `model inspect` and errors.
    pub signature: String,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("signature", &self.signature)
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

fn describe(dtype: &ValueType) -> String {
    match dtype {
        ValueType::Tensor { ty, shape, .. } => {
            let dims: Vec<String> = shape
                .iter()
                .map(|d| {
                    if *d < 0 {
                        "?".to_owned()
                    } else {
                        d.to_string()
                    }
                })
                .collect();
            format!("{ty:?}[{}]", dims.join(", "))
        }
        other => format!("{other:?}"),
    }
}

fn invalid(text: impl Into<String>) -> ModelError {
    ModelError::Invalid(text.into())
}

impl OnnxModel {
    /// Loads and checks a graph. Every way a graph can be unfit for serving is an
    /// [`ModelError::Invalid`] that says what to change in the export.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let environment = environment()?;
        let configure =
            |err: String| ModelError::Runtime(format!("cannot configure a session: {err}"));
        let session = Session::builder(&environment)
            .map_err(|err| configure(err.to_string()))?
            .with_intra_threads(1)
            .map_err(|err| configure(err.to_string()))?
            .with_inter_threads(1)
            .map_err(|err| configure(err.to_string()))?
            .commit_from_memory(bytes)
            .map_err(|err| {
                let text = err.to_string();
                invalid(format!(
                    "ONNX Runtime cannot load the graph: {text}{}",
                    load_hint(&text)
                ))
            })?;
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|input| format!("{} {}", input.name(), describe(input.dtype())))
            .collect();
        let outputs: Vec<String> = session
            .outputs()
            .iter()
            .map(|output| format!("{} {}", output.name(), describe(output.dtype())))
            .collect();
        let signature = format!(
            "inputs: {}; outputs: {}",
            inputs.join(", "),
            outputs.join(", ")
        );
        let [input] = session.inputs() else {
            return Err(invalid(format!(
                "the graph has {} inputs ({}); the model service feeds one tensor [rows, features]: \
                 export with one input (skl2onnx: initial_types=[(\"input\", \
                 DoubleTensorType([None, n_features]))])",
                inputs.len(),
                inputs.join(", ")
            )));
        };
        let (precision, width) = match input.dtype() {
            ValueType::Tensor { ty, shape, .. } if shape.len() == 2 => {
                let precision = match ty {
                    TensorElementType::Float64 => Precision::F64,
                    TensorElementType::Float32 => Precision::F32,
                    other => {
                        return Err(invalid(format!(
                            "the input {} holds {other:?}; the model service feeds numbers: \
                             export with a double (or float) input tensor",
                            input.name()
                        )));
                    }
                };
                (precision, usize::try_from(shape[1]).ok())
            }
            other => {
                return Err(invalid(format!(
                    "the input {} is {}; the model service feeds a tensor [rows, features]",
                    input.name(),
                    describe(other)
                )));
            }
        };
        let Some(output) = session.outputs().first() else {
            return Err(invalid("the graph has no output"));
        };
        if !matches!(
            output.dtype(),
            ValueType::Tensor {
                ty: TensorElementType::Float32 | TensorElementType::Float64,
                ..
            }
        ) {
            return Err(invalid(format!(
                "the first output {} is {}; a regression model's first output is one number per \
                 row (float or double)",
                output.name(),
                describe(output.dtype())
            )));
        }
        let metadata = read_metadata(&session)?;
        let named = metadata.feature_names.as_ref().map(Vec::len);
        let n_features = match (width, named) {
            (Some(width), Some(named)) if width != named => {
                return Err(invalid(format!(
                    "the input takes {width} features but metadata feature_names names {named}"
                )));
            }
            (Some(width), _) => width,
            (None, Some(named)) => named,
            (None, None) => {
                return Err(invalid(
                    "the input's feature count is not fixed and the graph names no features: \
                     stamp it with `model stamp --data <csv>`",
                ));
            }
        };
        if n_features == 0 {
            return Err(invalid("the input takes no features"));
        }
        let model = Self {
            input: input.name().to_owned(),
            output: output.name().to_owned(),
            session: Mutex::new(session),
            precision,
            n_features,
            metadata,
            signature,
        };
        model.probe()?;
        Ok(model)
    }

    /// What a user should know about this export although it is served: a float input means
    /// every step (a scaler before trees included) runs in float32, which can flip tree splits.
    pub fn caveat(&self) -> Option<&'static str> {
        (self.precision == Precision::F32).then_some(
            "the graph takes float32: scalers and trees run in float32 and can answer otherwise \
             than scikit-learn (export with a double input and a CastTransformer before the \
             trees; docs/own-model.md)",
        )
    }

    /// Features per row.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// One row through the graph at load time (the reference means when known, else zeros): a
    /// graph that cannot run, answers in another shape, or answers NaN is refused here, never
    /// while serving.
    fn probe(&self) -> Result<(), ModelError> {
        let row: Vec<f64> = match &self.metadata.reference {
            Some(reference) => reference.features.iter().map(|f| f.mean).collect(),
            None => vec![0.0; self.n_features],
        };
        let out = self
            .predict_rows(&row, 1)
            .map_err(|err| invalid(format!("a probe row fails: {err}")))?;
        match out.as_slice() {
            [value] if value.is_finite() => Ok(()),
            [value] => Err(invalid(format!(
                "the graph answers {value} for a probe row: it must give finite numbers"
            ))),
            values => Err(invalid(format!(
                "the graph answers {} numbers for one row; a regression model gives one",
                values.len()
            ))),
        }
    }

    /// Predicts `n_rows` rows laid out one after another in `rows`.
    pub fn predict_rows(&self, rows: &[f64], n_rows: usize) -> Result<Vec<f64>, ModelError> {
        let run = |err: ort::Error| ModelError::Runtime(format!("running the graph: {err}"));
        if rows.len() != n_rows * self.n_features {
            return Err(invalid(format!(
                "{} values for {n_rows} rows of {} features",
                rows.len(),
                self.n_features
            )));
        }
        let shape = [n_rows, self.n_features];
        let mut session = self
            .session
            .lock()
            .map_err(|_| ModelError::Runtime("the session lock is poisoned".to_owned()))?;
        let single: Vec<f32>;
        let input = match self.precision {
            Precision::F64 => TensorRef::from_array_view((shape, rows))
                .map_err(run)?
                .into_dyn(),
            Precision::F32 => {
                single = rows.iter().map(|&x| x as f32).collect();
                TensorRef::from_array_view((shape, single.as_slice()))
                    .map_err(run)?
                    .into_dyn()
            }
        };
        let outputs = session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(run)?;
        let output = &outputs[self.output.as_str()];
        let values: Vec<f64> = match output.dtype().tensor_type() {
            Some(TensorElementType::Float32) => output
                .try_extract_tensor::<f32>()
                .map_err(run)?
                .1
                .iter()
                .map(|&x| f64::from(x))
                .collect(),
            Some(TensorElementType::Float64) => {
                output.try_extract_tensor::<f64>().map_err(run)?.1.to_vec()
            }
            other => {
                return Err(invalid(format!("the output {} is {other:?}", self.output)));
            }
        };
        if values.len() != n_rows {
            return Err(invalid(format!(
                "the graph answers {} numbers for {n_rows} row(s); a regression model gives one per row",
                values.len()
            )));
        }
        Ok(values)
    }
}

/// Reads the pipeline's keys of `metadata_props`.
fn read_metadata(session: &Session) -> Result<Metadata, ModelError> {
    let metadata = session
        .metadata()
        .map_err(|err| invalid(format!("cannot read the graph's metadata: {err}")))?;
    let text = |key: &str| {
        metadata
            .custom(key)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let feature_names = text(keys::FEATURE_NAMES).map(|names| {
        names
            .split(',')
            .map(|name| name.trim().to_owned())
            .collect::<Vec<_>>()
    });
    if let Some(names) = &feature_names {
        let mut seen = std::collections::HashSet::new();
        if let Some(bad) = names
            .iter()
            .find(|name| name.is_empty() || !seen.insert(name.as_str()))
        {
            return Err(invalid(format!(
                "metadata feature_names has an empty or repeated name {bad:?}"
            )));
        }
    }
    let version = text(keys::VERSION);
    if let Some(version) = &version {
        pipeline::messages::validate_id(version).map_err(|_| {
            invalid(format!(
                "metadata version {version:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -"
            ))
        })?;
    }
    let reference = match text(keys::REFERENCE) {
        Some(json) => {
            let reference: Reference = serde_json::from_str(json.as_str())
                .map_err(|err| invalid(format!("metadata reference is not valid: {err}")))?;
            if let Some(names) = &feature_names {
                reference.validate(names)?;
            }
            Some(reference)
        }
        None => None,
    };
    Ok(Metadata {
        feature_names,
        version,
        target_name: text(keys::TARGET_NAME),
        reference,
    })
}
