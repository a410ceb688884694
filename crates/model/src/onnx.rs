//! Users' own models: an ONNX graph (scikit-learn through skl2onnx, XGBoost and LightGBM through
//! onnxmltools, PyTorch's `torch.onnx.export`) run by ONNX Runtime through the `ort` crate.
//!
//! The runtime is a shared library opened at run time from `ORT_DYLIB_PATH` (the image carries
//! it; outside Docker, the one inside the `onnxruntime` PyPI wheel, see `scripts/onnxruntime-lib`),
//! so the default JSON model needs no runtime at all. A graph is checked when it is loaded, never
//! while serving: one input `[rows, features]` of float or double, and a probe row that must come
//! out right. What the service needs beyond the graph (feature names, version, target name, drift
//! reference) is in the graph's `metadata_props`, written by `model stamp` ([`crate::stamp`]).
//!
//! Two kinds of graph are served:
//! - a regression: its first output is one number per row ([`OnnxModel::predict_rows`]);
//! - a classifier: an output of labels (an int64 or string tensor `[rows]`) and one of
//!   probabilities, a float tensor `[rows, classes]` or skl2onnx's default ZipMap, a sequence of
//!   one class-to-probability map per row ([`OnnxModel::classify_rows`]). The class list, the
//!   order of the probability columns, is read from the graph itself: the `classlabels_*`
//!   attribute of the node that writes the probabilities or the labels (`LinearClassifier`,
//!   `TreeEnsembleClassifier`, `SVMClassifier`, `ZipMap`), or the constant list an
//!   `ArrayFeatureExtractor` picks the label from (skl2onnx's double-precision linear models);
//!   metadata `classes` overrides it ([`keys::CLASSES`]).

use crate::drift::Reference;
use crate::error::ModelError;
use crate::protobuf::{self, Graph, NotProtobuf, TensorValues};
use ort::environment::Environment;
use ort::session::{Session, SessionOutputs};
use ort::value::{DynMapValueType, DynValue, TensorElementType, TensorRef, ValueType};
use pipeline::classes::{ClassLabel, Probabilities, Task};
use pipeline::messages::MessageError;
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
    /// A classifier's classes in the order of its probability columns: a JSON array of integers
    /// or strings (`[0, 1]`, `["setosa", "versicolor", "virginica"]`). Overrides the class list
    /// read from the graph's nodes; only needed for a graph that names none.
    pub const CLASSES: &str = "classes";
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

/// A classified row: the predicted label and the probability of every class.
pub type Classified = (ClassLabel, Probabilities);

/// How a classifier's label output holds its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelType {
    /// int64: [`ClassLabel::Integer`].
    Integer,
    /// string: [`ClassLabel::Text`].
    Text,
}

impl LabelType {
    fn of(ty: TensorElementType) -> Option<Self> {
        match ty {
            TensorElementType::Int64 => Some(Self::Integer),
            TensorElementType::String => Some(Self::Text),
            _ => None,
        }
    }
}

/// How a classifier gives its probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// A float or double tensor `[rows, classes]`, its columns in class order.
    Tensor,
    /// skl2onnx's default ZipMap: a sequence of one map per row, class (of this type) to
    /// probability.
    ZipMap(LabelType),
}

impl Form {
    fn of(dtype: &ValueType) -> Option<Self> {
        match dtype {
            ValueType::Tensor {
                ty: TensorElementType::Float32 | TensorElementType::Float64,
                shape,
                ..
            } if shape.len() == 2 => Some(Self::Tensor),
            ValueType::Sequence(inner) => match inner.as_ref() {
                ValueType::Map {
                    key,
                    value: TensorElementType::Float32,
                } => LabelType::of(*key).map(Self::ZipMap),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A classifier graph's outputs and classes.
#[derive(Debug)]
struct Classifier {
    label: String,
    label_type: LabelType,
    probabilities: String,
    form: Form,
    classes: Vec<ClassLabel>,
    /// The classes' keys ([`ClassLabel::key`]), as every row's probabilities name them.
    keys: Vec<String>,
}

/// A loaded, checked ONNX graph: a regression or a classifier.
pub struct OnnxModel {
    /// `Session::run` takes `&mut`; one model service predicts on one task, so this is never
    /// contended (the trainer's evaluation holds its own model).
    session: Mutex<Session>,
    input: String,
    /// A regression's output (a classifier's label output, unused: see `classifier`).
    output: String,
    precision: Precision,
    n_features: usize,
    /// `Some` for a classifier graph; boxed so that a regression graph's model stays as small as
    /// it was (`served::Engine` holds it inline).
    classifier: Option<Box<Classifier>>,
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
        ValueType::Sequence(inner) => format!("seq({})", describe(inner)),
        ValueType::Map { key, value } => format!("map({key:?}, {value:?})"),
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
        let Some(first) = session.outputs().first() else {
            return Err(invalid("the graph has no output"));
        };
        // A label output (int64 or string) makes the graph a classifier.
        let label = session
            .outputs()
            .iter()
            .find_map(|output| match output.dtype() {
                ValueType::Tensor { ty, .. } => LabelType::of(*ty).map(|kind| (output, kind)),
                _ => None,
            });
        if label.is_none()
            && !matches!(
                first.dtype(),
                ValueType::Tensor {
                    ty: TensorElementType::Float32 | TensorElementType::Float64,
                    ..
                }
            )
        {
            return Err(invalid(format!(
                "the first output {} is {}; a regression model's first output is one number per \
                 row (float or double), a classifier's are a label tensor [rows] (int64 or \
                 string) and a probability tensor [rows, classes]",
                first.name(),
                describe(first.dtype())
            )));
        }
        let (metadata, classes) = read_metadata(&session)?;
        let classifier = match label {
            Some((label, label_type)) => Some(Box::new(classifier(
                bytes,
                &session,
                label.name(),
                label_type,
                classes,
                &outputs,
            )?)),
            None => None,
        };
        let output = match &classifier {
            Some(classifier) => classifier.label.clone(),
            None => first.name().to_owned(),
        };
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
            output,
            session: Mutex::new(session),
            precision,
            n_features,
            classifier,
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

    /// `classification` for a classifier graph, else `regression`.
    pub fn task(&self) -> Task {
        if self.classifier.is_some() {
            Task::Classification
        } else {
            Task::Regression
        }
    }

    /// A classifier's classes, in the order of its probability columns; `None` for a regression.
    pub fn classes(&self) -> Option<&[ClassLabel]> {
        self.classifier
            .as_ref()
            .map(|classifier| classifier.classes.as_slice())
    }

    /// One row through the graph at load time (the reference means when known, else zeros): a
    /// graph that cannot run, answers in another shape, answers NaN, or (a classifier) gives
    /// probabilities that are not a distribution over its classes is refused here, never while
    /// serving.
    fn probe(&self) -> Result<(), ModelError> {
        let row: Vec<f64> = match &self.metadata.reference {
            Some(reference) => reference.features.iter().map(|f| f.mean).collect(),
            None => vec![0.0; self.n_features],
        };
        if self.classifier.is_some() {
            let answers = self
                .classify_rows(&row, 1)
                .map_err(|err| invalid(format!("a probe row fails: {err}")))?;
            return match answers.as_slice() {
                [Ok(_)] => Ok(()),
                [Err(err)] => Err(invalid(format!(
                    "the graph's answer to a probe row is refused: {err}"
                ))),
                answers => Err(invalid(format!(
                    "the graph gives {} answers for one probe row",
                    answers.len()
                ))),
            };
        }
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

    /// Runs the graph on `n_rows` rows laid out one after another in `rows`, and hands its
    /// outputs to `read`.
    fn run<T>(
        &self,
        rows: &[f64],
        n_rows: usize,
        read: impl FnOnce(&SessionOutputs<'_>) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
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
        read(&outputs)
    }

    /// Predicts `n_rows` rows laid out one after another in `rows` (a regression graph).
    pub fn predict_rows(&self, rows: &[f64], n_rows: usize) -> Result<Vec<f64>, ModelError> {
        if self.classifier.is_some() {
            return Err(invalid(
                "the graph is a classifier: it answers a class per row (classify_rows), not a \
                 number",
            ));
        }
        let run = |err: ort::Error| ModelError::Runtime(format!("running the graph: {err}"));
        let values = self.run(rows, n_rows, |outputs| {
            let output = &outputs[self.output.as_str()];
            Ok(match output.dtype().tensor_type() {
                Some(TensorElementType::Float32) => output
                    .try_extract_tensor::<f32>()
                    .map_err(run)?
                    .1
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect::<Vec<f64>>(),
                Some(TensorElementType::Float64) => {
                    output.try_extract_tensor::<f64>().map_err(run)?.1.to_vec()
                }
                other => {
                    return Err(invalid(format!("the output {} is {other:?}", self.output)));
                }
            })
        })?;
        if values.len() != n_rows {
            return Err(invalid(format!(
                "the graph answers {} numbers for {n_rows} row(s); a regression model gives one per row",
                values.len()
            )));
        }
        Ok(values)
    }

    /// Classifies `n_rows` rows laid out one after another in `rows` (a classifier graph): per
    /// row, the predicted label and the probability of every class in [`Self::classes`] order.
    /// A row whose probabilities are not a distribution holding the predicted class is that
    /// row's [`MessageError`] (an input far out of range can make a graph answer NaN); a graph
    /// that cannot run or answers in another shape is a [`ModelError`].
    pub fn classify_rows(
        &self,
        rows: &[f64],
        n_rows: usize,
    ) -> Result<Vec<Result<Classified, MessageError>>, ModelError> {
        let Some(classifier) = &self.classifier else {
            return Err(invalid(
                "the graph is a regression: it answers a number per row (predict_rows), not a \
                 class",
            ));
        };
        self.run(rows, n_rows, |outputs| classifier.read(outputs, n_rows))
    }
}

impl Classifier {
    /// Labels and probabilities of `n_rows` rows from the graph's outputs.
    fn read(
        &self,
        outputs: &SessionOutputs<'_>,
        n_rows: usize,
    ) -> Result<Vec<Result<Classified, MessageError>>, ModelError> {
        let labels = self.labels(output(outputs, &self.label)?)?;
        if labels.len() != n_rows {
            return Err(invalid(format!(
                "the graph answers {} labels for {n_rows} row(s); a classifier gives one per row",
                labels.len()
            )));
        }
        let width = self.classes.len();
        let probabilities = output(outputs, &self.probabilities)?;
        let probabilities = match self.form {
            Form::Tensor => tensor_numbers(probabilities, &self.probabilities)?,
            Form::ZipMap(keys) => self.zipmap(probabilities, keys)?,
        };
        if probabilities.len() != n_rows * width {
            return Err(invalid(format!(
                "the graph answers {} probabilities for {n_rows} row(s) of {width} classes",
                probabilities.len()
            )));
        }
        Ok(labels
            .into_iter()
            .zip(probabilities.chunks_exact(width))
            .map(|(label, row)| {
                let probabilities = Probabilities::new(
                    self.keys.iter().cloned().zip(row.iter().copied()).collect(),
                )?;
                probabilities.check_predicted(&label)?;
                Ok((label, probabilities))
            })
            .collect())
    }

    fn labels(&self, value: &DynValue) -> Result<Vec<ClassLabel>, ModelError> {
        let label = &self.label;
        let read = |err: ort::Error| {
            ModelError::Runtime(format!("reading the graph's labels {label}: {err}"))
        };
        Ok(match self.label_type {
            LabelType::Integer => value
                .try_extract_tensor::<i64>()
                .map_err(read)?
                .1
                .iter()
                .map(|&label| ClassLabel::Integer(label))
                .collect(),
            LabelType::Text => value
                .try_extract_strings()
                .map_err(read)?
                .1
                .into_iter()
                .map(ClassLabel::Text)
                .collect(),
        })
    }

    /// A ZipMap's maps as rows of probabilities in class order.
    fn zipmap(&self, value: &DynValue, keys: LabelType) -> Result<Vec<f64>, ModelError> {
        let name = &self.probabilities;
        let read = |err: ort::Error| {
            ModelError::Runtime(format!(
                "reading the graph's probability maps {name}: {err}"
            ))
        };
        let maps = value
            .try_extract_sequence::<DynMapValueType>()
            .map_err(read)?;
        let mut out = Vec::with_capacity(maps.len() * self.keys.len());
        for map in &maps {
            let entries: Vec<(String, f32)> = match keys {
                LabelType::Integer => map
                    .try_extract_key_values::<i64, f32>()
                    .map_err(read)?
                    .into_iter()
                    .map(|(class, p)| (class.to_string(), p))
                    .collect(),
                LabelType::Text => map.try_extract_key_values::<String, f32>().map_err(read)?,
            };
            if entries.len() != self.keys.len() {
                return Err(invalid(format!(
                    "a probability map of {name} has {} classes, the graph names {}",
                    entries.len(),
                    self.keys.len()
                )));
            }
            for key in &self.keys {
                let p = entries
                    .iter()
                    .find(|(class, _)| class == key)
                    .map(|(_, p)| f64::from(*p))
                    .ok_or_else(|| {
                        invalid(format!("a probability map of {name} lacks class {key:?}"))
                    })?;
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// The output called `name`.
fn output<'a>(outputs: &'a SessionOutputs<'_>, name: &str) -> Result<&'a DynValue, ModelError> {
    outputs
        .get(name)
        .ok_or_else(|| invalid(format!("the graph gives no output {name}")))
}

/// A float or double tensor's numbers as f64.
fn tensor_numbers(value: &DynValue, name: &str) -> Result<Vec<f64>, ModelError> {
    let read = |err: ort::Error| ModelError::Runtime(format!("reading the output {name}: {err}"));
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => Ok(value
            .try_extract_tensor::<f32>()
            .map_err(read)?
            .1
            .iter()
            .map(|&x| f64::from(x))
            .collect()),
        Some(TensorElementType::Float64) => {
            Ok(value.try_extract_tensor::<f64>().map_err(read)?.1.to_vec())
        }
        other => Err(invalid(format!("the output {name} is {other:?}"))),
    }
}

/// Ops that hand a label on unchanged in value (if not in type or shape).
const PASS_THROUGH: [&str; 6] = [
    "Identity",
    "Cast",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
];

/// The attributes in which ONNX-ML's classifier ops (and ZipMap) name their classes, in the
/// order of their probability columns.
const CLASS_ATTRIBUTES: [&str; 3] = [
    "classlabels_int64s",
    "classlabels_ints",
    "classlabels_strings",
];

/// What to do about a classifier graph that names no classes.
const NAME_THE_CLASSES: &str = "name the classes in the order of the probability columns in \
    metadata_props `classes`, a JSON array such as [0, 1] or [\"setosa\", \"versicolor\"] (Python: \
    entry = model.metadata_props.add(); entry.key = \"classes\"; entry.value = json.dumps(classes))";

/// The classes a node names in a `classlabels_*` attribute.
fn node_classes(node: &protobuf::Node<'_>) -> Result<Option<Vec<ClassLabel>>, NotProtobuf> {
    for name in CLASS_ATTRIBUTES {
        let Some(attribute) = node.attribute(name)? else {
            continue;
        };
        if !attribute.ints.is_empty() {
            return Ok(Some(
                attribute
                    .ints
                    .into_iter()
                    .map(ClassLabel::Integer)
                    .collect(),
            ));
        }
        if !attribute.strings.is_empty() {
            return Ok(Some(
                attribute
                    .strings
                    .into_iter()
                    .map(ClassLabel::Text)
                    .collect(),
            ));
        }
    }
    Ok(None)
}

/// The values of a constant: an initializer, or a `Constant` node's `value`.
fn constant_classes(graph: &Graph<'_>, name: &str) -> Result<Option<Vec<ClassLabel>>, NotProtobuf> {
    let tensor = match graph.initializer(name)? {
        Some(tensor) => Some(tensor),
        None => match graph.producer(name) {
            Some(node) if node.op_type == "Constant" => {
                node.attribute("value")?.and_then(|value| value.tensor)
            }
            _ => None,
        },
    };
    let Some(tensor) = tensor else {
        return Ok(None);
    };
    Ok(match protobuf::tensor_values(tensor)? {
        Some(TensorValues::Integers(values)) => {
            Some(values.into_iter().map(ClassLabel::Integer).collect())
        }
        Some(TensorValues::Strings(values)) => {
            Some(values.into_iter().map(ClassLabel::Text).collect())
        }
        None => None,
    })
}

/// The classes of the node that writes `value`, looking through the ops that pass a label on:
/// a `classlabels_*` attribute, or the constant list an `ArrayFeatureExtractor` picks from.
fn traced_classes(graph: &Graph<'_>, value: &str) -> Result<Option<Vec<ClassLabel>>, NotProtobuf> {
    let mut value = value.to_owned();
    // A graph is acyclic; the bound only guards against a malformed one.
    for _ in 0..=graph.nodes.len() {
        let Some(node) = graph.producer(&value) else {
            return Ok(None);
        };
        if let Some(classes) = node_classes(node)? {
            return Ok(Some(classes));
        }
        match (node.op_type.as_str(), node.inputs.first()) {
            ("ArrayFeatureExtractor", Some(list)) => return constant_classes(graph, list),
            (op, Some(input)) if PASS_THROUGH.contains(&op) => value = input.clone(),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// A classifier's classes from its graph: those of the node writing the probabilities, else of
/// the one writing the labels, else the one class list every classifier node agrees on.
fn graph_classes(
    bytes: &[u8],
    label: &str,
    probabilities: &str,
) -> Result<Vec<ClassLabel>, ModelError> {
    let unreadable = |err: NotProtobuf| {
        invalid(format!(
            "cannot read the graph's nodes for its classes: {err}"
        ))
    };
    let graph = protobuf::graph(bytes).map_err(unreadable)?;
    for value in [probabilities, label] {
        if let Some(classes) = traced_classes(&graph, value).map_err(unreadable)? {
            return Ok(classes);
        }
    }
    let mut lists: Vec<Vec<ClassLabel>> = Vec::new();
    for node in &graph.nodes {
        if let Some(classes) = node_classes(node).map_err(unreadable)?
            && !lists.contains(&classes)
        {
            lists.push(classes);
        }
    }
    let mut lists = lists.into_iter();
    match (lists.next(), lists.next()) {
        (Some(classes), None) => Ok(classes),
        (None, _) => Err(invalid(format!(
            "the classifier's outputs {label} and {probabilities} come with no class list: no \
             node has a classlabels_int64s, classlabels_ints or classlabels_strings attribute \
             (ZipMap, LinearClassifier, TreeEnsembleClassifier, SVMClassifier) and the label is \
             not picked from a constant list; {NAME_THE_CLASSES}"
        ))),
        (Some(_), Some(_)) => Err(invalid(format!(
            "the classifier's nodes name different class lists and none writes {label} or \
             {probabilities}; {NAME_THE_CLASSES}"
        ))),
    }
}

/// Refuses an empty class list or one that names a class twice.
fn check_classes(classes: &[ClassLabel], source: &str) -> Result<(), ModelError> {
    if classes.is_empty() {
        return Err(invalid(format!("{source} names no class")));
    }
    for (i, class) in classes.iter().enumerate() {
        if classes[..i].iter().any(|other| other.key() == class.key()) {
            return Err(invalid(format!("{source} names class {class} twice")));
        }
    }
    Ok(())
}

/// A classifier graph's outputs and classes, checked: a probability output beside the label
/// output `label`, a class list (metadata `classes`, else the graph's) that fits both.
fn classifier(
    bytes: &[u8],
    session: &Session,
    label: &str,
    label_type: LabelType,
    named: Option<Vec<ClassLabel>>,
    outputs: &[String],
) -> Result<Classifier, ModelError> {
    let Some((probabilities, form, width)) = session.outputs().iter().find_map(|output| {
        let form = Form::of(output.dtype()).filter(|_| output.name() != label)?;
        let width = match output.dtype() {
            ValueType::Tensor { shape, .. } => {
                shape.get(1).and_then(|&width| usize::try_from(width).ok())
            }
            _ => None,
        };
        Some((output.name().to_owned(), form, width))
    }) else {
        return Err(invalid(format!(
            "the graph has a label output {label} but no probabilities (outputs: {}): a \
             classifier also gives a float tensor [rows, classes] (skl2onnx: \
             options={{id(model): {{\"zipmap\": False}}}}) or a ZipMap",
            outputs.join(", ")
        )));
    };
    let (classes, source) = match named {
        Some(classes) => (classes, "metadata classes"),
        None => (
            graph_classes(bytes, label, &probabilities)?,
            "the graph's class list",
        ),
    };
    check_classes(&classes, source)?;
    let keyed = match form {
        Form::ZipMap(keys) => [label_type, keys],
        Form::Tensor => [label_type, label_type],
    };
    if keyed.contains(&LabelType::Integer)
        && let Some(text) = classes
            .iter()
            .find(|class| matches!(class, ClassLabel::Text(_)))
    {
        return Err(invalid(format!(
            "the graph's labels are integers but {source} has the class \"{text}\""
        )));
    }
    if let Some(width) = width.filter(|&width| width != classes.len()) {
        return Err(invalid(format!(
            "the probability output {probabilities} has {width} columns but {source} names {} \
             classes",
            classes.len()
        )));
    }
    Ok(Classifier {
        label: label.to_owned(),
        label_type,
        probabilities,
        form,
        keys: classes
            .iter()
            .map(|class| class.key().into_owned())
            .collect(),
        classes,
    })
}

/// Reads the pipeline's keys of `metadata_props`, and the classes ([`keys::CLASSES`]) apart: they
/// end up in the classifier, which a regression graph's model does without.
fn read_metadata(session: &Session) -> Result<(Metadata, Option<Vec<ClassLabel>>), ModelError> {
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
    let classes = match text(keys::CLASSES) {
        Some(json) => {
            let classes: Vec<ClassLabel> = serde_json::from_str(&json).map_err(|err| {
                invalid(format!(
                    "metadata classes {json:?} is not a JSON array of integers and strings: {err}"
                ))
            })?;
            check_classes(&classes, "metadata classes")?;
            Some(classes)
        }
        None => None,
    };
    Ok((
        Metadata {
            feature_names,
            version,
            target_name: text(keys::TARGET_NAME),
            reference,
        },
        classes,
    ))
}
