//! The JSON messages on the three queues, how they are written, and how received bodies are read
//! and classified when they are bad.
//!
//! Native format (what our services publish):
//! - `features`: `{"id": "...", "features": [f64, ...], "sent_at_us": u64}`
//! - `y_true`:   `{"id": "...", "y_true": f64, "sent_at_us": u64}`
//! - `y_pred`:   `{"id": "...", "y_pred": f64, "model_version": "..."}`
//!
//! Under `TASK=classification` ([`crate::classes`]) a target is a class label as the data has it,
//! a JSON integer or string, and a prediction carries the class probabilities:
//! - `y_true`:   `{"id": "...", "y_true": "setosa", "sent_at_us": u64}`
//! - `y_pred`:   `{"id": "...", "y_pred": "setosa", "probabilities": {"setosa": 0.9, ...},
//!   "model_version": "..."}`
//!
//! `sent_at_us` (the producer's send time, microseconds since the Unix epoch) is optional on input.
//! So is `audit` (`"<producer>:<window>"`, [`crate::audit`]): the producer's loss-audit window,
//! which the model copies from `features` into `y_pred`; a message without a valid one is simply
//! not audited.
//! The bare format of the Python course version is accepted too: a `features` body that is a JSON
//! array of numbers, and a `y_true`/`y_pred` body that is a JSON number. A bare message takes its id
//! from the AMQP `message_id` property, and has none when that is absent. Under `TOPOLOGY=course`
//! our services write the bare format too ([`BodyFormat::Bare`]), the id in `message_id` only.

pub use crate::classes::Target;
use crate::classes::{Probabilities, ProbabilityMap};
use crate::config::TopologyMode;
use crate::partition::Partitions;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why a message body cannot be processed. [`MessageError::reason`] is the short label used in
/// metrics and in the dead-letter header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    /// The body has no bytes.
    #[error("empty body")]
    EmptyBody,
    /// The body is larger than `MAX_MESSAGE_BYTES`.
    #[error("body of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Body size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is not UTF-8, so it cannot be JSON.
    #[error("body is not valid UTF-8")]
    NotUtf8,
    /// The body is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but not of the expected shape.
    #[error("wrong shape: {0}")]
    WrongShape(String),
    /// A native message without an id, or with an empty one.
    #[error("missing or empty id")]
    MissingId,
    /// An id that is too long or holds characters other than `A-Za-z0-9._:-`.
    #[error("invalid id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidId(String),
    /// A feature vector of the wrong length for the model.
    #[error("expected {expected} features, got {got}")]
    WrongLength {
        /// Features the model takes.
        expected: usize,
        /// Features in the message.
        got: usize,
    },
    /// A number that is NaN or infinite.
    #[error("{0} is not a finite number")]
    NonFinite(String),
    /// Named features (or an array's announced names) that do not fit the model's feature names
    /// ([`crate::schema::FeatureSchema`]); the text names the fields.
    #[error("{0}")]
    SchemaMismatch(String),
    /// The same id arrived before with a different value; the first one is kept.
    #[error("id {id} already has {kind} = {first}; the conflicting value {second} is ignored")]
    ConflictingDuplicate {
        /// The id.
        id: String,
        /// `y_true` or `y_pred`.
        kind: &'static str,
        /// The value kept, as text.
        first: String,
        /// The value refused, as text.
        second: String,
    },
    /// A prediction's class probabilities that are not a distribution over distinct classes, or
    /// that leave out the predicted class.
    #[error("bad class probabilities: {0}")]
    BadProbabilities(String),
    /// With `PARTITIONS > 1`: the id hashes to another partition than the queue it was found in
    /// (a producer that routes differently, or a message moved by hand). Never joined.
    #[error("id {id} belongs in partition {belongs}, but was found in {queue}")]
    WrongPartition {
        /// The id.
        id: String,
        /// The partition its hash names.
        belongs: u32,
        /// The queue it was found in.
        queue: String,
    },
}

/// With `PARTITIONS > 1`: an `id` found in `queue`, the queue of partition `k`, must hash to `k`;
/// else it is [`MessageError::WrongPartition`], dead-lettered and never joined. Always `Ok` with
/// one partition.
pub fn check_partition(
    partitions: Partitions,
    k: usize,
    queue: &str,
    id: &str,
) -> Result<(), MessageError> {
    let belongs = partitions.of(id);
    if !partitions.is_partitioned() || usize::try_from(belongs).ok() == Some(k) {
        return Ok(());
    }
    Err(MessageError::WrongPartition {
        id: id.to_owned(),
        belongs,
        queue: queue.to_owned(),
    })
}

impl MessageError {
    /// Short snake_case label of the error, for metrics and the dead-letter header.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::EmptyBody => "empty_body",
            Self::WrongPartition { .. } => crate::partition::WRONG_PARTITION,
            Self::TooLarge { .. } => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::InvalidJson(_) => "invalid_json",
            Self::WrongShape(_) => "wrong_shape",
            Self::MissingId => "missing_id",
            Self::InvalidId(_) => "invalid_id",
            Self::WrongLength { .. } => "wrong_length",
            Self::NonFinite(_) => "non_finite",
            Self::SchemaMismatch(_) => "schema_mismatch",
            Self::ConflictingDuplicate { .. } => "conflicting_duplicate",
            Self::BadProbabilities(_) => "bad_probabilities",
        }
    }
}

/// Which label a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// The true target, from the producer.
    YTrue,
    /// The prediction, from the model.
    YPred,
}

impl LabelKind {
    /// The field name and the name used in the log files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::YTrue => "y_true",
            Self::YPred => "y_pred",
        }
    }
}

/// A feature vector received from the `features` queue.
#[derive(Debug, Clone, PartialEq)]
pub struct FeaturesMessage {
    /// Sample id; `None` for a bare message without `message_id`.
    pub id: Option<String>,
    /// The feature values, all finite, in the message's order.
    pub features: Vec<f64>,
    /// The names of `features` when the message sent them as an object `{"<name>": value, …}`;
    /// [`crate::schema::FeatureSchema::arrange`] puts them in a model's order.
    pub names: Option<Vec<String>>,
    /// Producer's send time, if given.
    pub sent_at_us: Option<u64>,
    /// Whether it came in the bare course format (answered in the same format).
    pub bare: bool,
    /// The loss-audit tag, when it carried a valid one.
    pub audit: Option<String>,
}

/// A `y_true` or `y_pred` message.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMessage {
    /// Sample id; `None` for a bare message without `message_id` (logged, never paired).
    pub id: Option<String>,
    /// The value: a finite number, or a class label.
    pub value: Target,
    /// A classifier's prediction: the class probabilities (the predicted class among them).
    pub probabilities: Option<Probabilities>,
    /// Version of the model that made a prediction.
    pub model_version: Option<String>,
    /// Producer's send time, if given.
    pub sent_at_us: Option<u64>,
    /// The loss-audit tag, when it carried a valid one.
    pub audit: Option<String>,
}

/// A valid audit tag, owned; anything else is not audited.
fn audit_tag(tag: Option<Cow<'_, str>>) -> Option<String> {
    tag.filter(|tag| crate::audit::parse_tag(tag).is_some())
        .map(Cow::into_owned)
}

#[derive(Deserialize)]
struct FeaturesWire<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    features: WireFeatures,
    #[serde(default)]
    sent_at_us: Option<u64>,
    #[serde(borrow, default)]
    audit: Option<Cow<'a, str>>,
}

/// `features` as an array of numbers or an object of named numbers (any key order).
struct WireFeatures {
    values: Vec<f64>,
    names: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for WireFeatures {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WireFeatures;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of numbers or an object of named numbers")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(value) = seq.next_element::<f64>()? {
                    values.push(value);
                }
                Ok(WireFeatures {
                    values,
                    names: None,
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let (mut names, mut values) = (Vec::new(), Vec::new());
                while let Some((name, value)) = map.next_entry::<String, f64>()? {
                    names.push(name);
                    values.push(value);
                }
                Ok(WireFeatures {
                    values,
                    names: Some(names),
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
struct YTrueWire<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    y_true: Target,
    #[serde(default)]
    sent_at_us: Option<u64>,
    #[serde(borrow, default)]
    audit: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct YPredWire<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    y_pred: Target,
    #[serde(default)]
    probabilities: Option<ProbabilityMap>,
    #[serde(borrow, default)]
    model_version: Option<Cow<'a, str>>,
    #[serde(default)]
    sent_at_us: Option<u64>,
    #[serde(borrow, default)]
    audit: Option<Cow<'a, str>>,
}

/// The `features` message our producer sends.
#[derive(Serialize)]
pub struct FeaturesOut<'a> {
    /// Sample id.
    pub id: &'a str,
    /// Feature values.
    pub features: &'a [f64],
    /// Send time, microseconds since the Unix epoch.
    pub sent_at_us: u64,
    /// The loss-audit tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<&'a str>,
}

/// The `y_true` message our producer sends.
#[derive(Serialize)]
pub struct YTrueOut<'a> {
    /// Sample id.
    pub id: &'a str,
    /// True target.
    pub y_true: &'a Target,
    /// Send time, microseconds since the Unix epoch.
    pub sent_at_us: u64,
    /// The loss-audit tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<&'a str>,
}

/// The `y_pred` message our model sends.
#[derive(Serialize)]
pub struct YPredOut<'a> {
    /// Sample id.
    pub id: &'a str,
    /// Prediction.
    pub y_pred: &'a Target,
    /// A classifier's class probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<&'a Probabilities>,
    /// Version of the model that made it.
    pub model_version: &'a str,
    /// Producer's send time, carried over from the features message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at_us: Option<u64>,
    /// The loss-audit tag, carried over from the features message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<&'a str>,
}

/// How our services write bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// JSON objects with the id (and the send time, the model version).
    Native,
    /// The course's bare values: a JSON array of numbers for `features`, a JSON number for
    /// `y_true`/`y_pred`. The id goes in the AMQP `message_id` only.
    Bare,
}

impl BodyFormat {
    /// The format published under `topology`: bare under `course`, native otherwise.
    pub fn of(topology: TopologyMode) -> Self {
        match topology {
            TopologyMode::Durable => Self::Native,
            TopologyMode::Course => Self::Bare,
        }
    }
}

/// Writes a `features` body into `out` (replacing its content).
pub fn write_features(
    out: &mut Vec<u8>,
    format: BodyFormat,
    id: &str,
    features: &[f64],
    sent_at_us: u64,
    audit: Option<&str>,
) -> serde_json::Result<()> {
    out.clear();
    match format {
        BodyFormat::Native => serde_json::to_writer(
            out,
            &FeaturesOut {
                id,
                features,
                sent_at_us,
                audit,
            },
        ),
        BodyFormat::Bare => serde_json::to_writer(out, features),
    }
}

/// Writes a `y_true` body into `out` (replacing its content).
pub fn write_y_true(
    out: &mut Vec<u8>,
    format: BodyFormat,
    id: &str,
    y_true: &Target,
    sent_at_us: u64,
    audit: Option<&str>,
) -> serde_json::Result<()> {
    out.clear();
    match format {
        BodyFormat::Native => serde_json::to_writer(
            out,
            &YTrueOut {
                id,
                y_true,
                sent_at_us,
                audit,
            },
        ),
        BodyFormat::Bare => serde_json::to_writer(out, y_true),
    }
}

/// Writes a `y_pred` body into `out` (replacing its content). Without an id the body is bare
/// whatever `format` says: a native message needs one (and a bare one has no probabilities).
#[allow(clippy::too_many_arguments)]
pub fn write_y_pred(
    out: &mut Vec<u8>,
    format: BodyFormat,
    id: Option<&str>,
    y_pred: &Target,
    probabilities: Option<&Probabilities>,
    model_version: &str,
    sent_at_us: Option<u64>,
    audit: Option<&str>,
) -> serde_json::Result<()> {
    out.clear();
    match (format, id) {
        (BodyFormat::Native, Some(id)) => serde_json::to_writer(
            out,
            &YPredOut {
                id,
                y_pred,
                probabilities,
                model_version,
                sent_at_us,
                audit,
            },
        ),
        _ => serde_json::to_writer(out, y_pred),
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Checks an id: 1 to [`MAX_ID_LEN`] characters of `A-Za-z0-9._:-`, so it is safe in every log.
pub fn validate_id(id: &str) -> Result<(), MessageError> {
    if id.is_empty() {
        return Err(MessageError::MissingId);
    }
    let ok = id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        let shown: String = id.chars().take(MAX_ID_LEN).collect();
        Err(MessageError::InvalidId(shown))
    }
}

/// The `id` of a body that is a JSON object with a string `id`, whatever else is wrong with it; for
/// logging a message that cannot be processed.
pub fn body_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_slice::<IdOnly>(body)
        .ok()?
        .id
        .filter(|id| !id.is_empty())
}

/// What the first significant byte says the body is.
enum Shape {
    Object,
    Array,
    Number,
    /// A JSON string: a bare class label.
    Text,
    Other(&'static str),
}

fn shape_of(body: &[u8]) -> Result<Shape, MessageError> {
    if body.is_empty() {
        return Err(MessageError::EmptyBody);
    }
    if std::str::from_utf8(body).is_err() {
        return Err(MessageError::NotUtf8);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    Ok(match first {
        None => return Err(MessageError::EmptyBody),
        Some(b'{') => Shape::Object,
        Some(b'[') => Shape::Array,
        Some(b'-' | b'0'..=b'9') => Shape::Number,
        Some(b'"') => Shape::Text,
        Some(b't' | b'f') => Shape::Other("a boolean"),
        Some(b'n') => Shape::Other("null"),
        Some(_) => Shape::Other("not JSON"),
    })
}

fn json_error(err: serde_json::Error) -> MessageError {
    use serde_json::error::Category;
    // serde_json reports 1e999 as a syntax error; to the sender it is an infinity.
    if err.to_string().starts_with("number out of range") {
        return MessageError::NonFinite(format!("a number out of range ({err})"));
    }
    match err.classify() {
        Category::Data => MessageError::WrongShape(err.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            MessageError::InvalidJson(err.to_string())
        }
    }
}

/// The id of a message: from the body when it has one (native format, required), else from the
/// AMQP `message_id` property (bare format, optional).
fn resolve_id(
    body_id: Option<Cow<'_, str>>,
    native: bool,
    message_id: Option<&str>,
) -> Result<Option<String>, MessageError> {
    let id = match (body_id, native) {
        (Some(id), _) => Some(id.into_owned()),
        (None, true) => return Err(MessageError::MissingId),
        (None, false) => message_id.map(str::to_owned),
    };
    if let Some(id) = &id {
        validate_id(id)?;
    }
    Ok(id)
}

fn check_finite(value: f64, what: impl FnOnce() -> String) -> Result<f64, MessageError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(MessageError::NonFinite(what()))
    }
}

/// Reads a `features` message, native or bare.
pub fn parse_features(
    body: &[u8],
    message_id: Option<&str>,
) -> Result<FeaturesMessage, MessageError> {
    let (id, features, names, sent_at_us, bare, audit) = match shape_of(body)? {
        Shape::Object => {
            let wire: FeaturesWire<'_> = serde_json::from_slice(body).map_err(json_error)?;
            (
                resolve_id(wire.id, true, message_id)?,
                wire.features.values,
                wire.features.names,
                wire.sent_at_us,
                false,
                audit_tag(wire.audit),
            )
        }
        Shape::Array => {
            let features: Vec<f64> = serde_json::from_slice(body).map_err(json_error)?;
            (
                resolve_id(None, false, message_id)?,
                features,
                None,
                None,
                true,
                None,
            )
        }
        Shape::Number => {
            return Err(MessageError::WrongShape(
                "expected an object {\"id\", \"features\"} or an array of numbers, got a number"
                    .to_owned(),
            ));
        }
        Shape::Text => return Err(not_json_or_shape(body, "a string")),
        Shape::Other(what) => return Err(not_json_or_shape(body, what)),
    };
    if features.is_empty() {
        return Err(MessageError::WrongShape(
            "the feature vector is empty".to_owned(),
        ));
    }
    for (index, value) in features.iter().enumerate() {
        check_finite(*value, || match &names {
            Some(names) => format!("features.{}", names[index]),
            None => format!("features[{index}]"),
        })?;
    }
    Ok(FeaturesMessage {
        id,
        features,
        names,
        sent_at_us,
        bare,
        audit,
    })
}

/// Reads a `y_true` or `y_pred` message, native or bare.
pub fn parse_label(
    kind: LabelKind,
    body: &[u8],
    message_id: Option<&str>,
) -> Result<LabelMessage, MessageError> {
    let message = match shape_of(body)? {
        Shape::Object => match kind {
            LabelKind::YTrue => {
                let wire: YTrueWire<'_> = serde_json::from_slice(body).map_err(json_error)?;
                LabelMessage {
                    id: resolve_id(wire.id, true, message_id)?,
                    value: wire.y_true,
                    probabilities: None,
                    model_version: None,
                    sent_at_us: wire.sent_at_us,
                    audit: audit_tag(wire.audit),
                }
            }
            LabelKind::YPred => {
                let wire: YPredWire<'_> = serde_json::from_slice(body).map_err(json_error)?;
                let (value, probabilities) = match wire.probabilities {
                    None => (wire.y_pred, None),
                    Some(ProbabilityMap(classes)) => {
                        let label = wire.y_pred.class(kind)?;
                        let probabilities = Probabilities::new(classes)?;
                        probabilities.check_predicted(&label)?;
                        (Target::Class(label), Some(probabilities))
                    }
                };
                LabelMessage {
                    id: resolve_id(wire.id, true, message_id)?,
                    value,
                    probabilities,
                    model_version: wire.model_version.map(Cow::into_owned),
                    sent_at_us: wire.sent_at_us,
                    audit: audit_tag(wire.audit),
                }
            }
        },
        Shape::Number | Shape::Text => {
            let value: Target = serde_json::from_slice(body).map_err(json_error)?;
            LabelMessage {
                id: resolve_id(None, false, message_id)?,
                value,
                probabilities: None,
                model_version: None,
                sent_at_us: None,
                audit: None,
            }
        }
        Shape::Array => {
            return Err(MessageError::WrongShape(format!(
                "expected an object {{\"id\", \"{}\"}}, a number or a label, got an array",
                kind.as_str()
            )));
        }
        Shape::Other(what) => return Err(not_json_or_shape(body, what)),
    };
    if let Target::Number(value) = message.value {
        check_finite(value, || kind.as_str().to_owned())?;
    }
    Ok(message)
}

/// A body starting with a string, boolean or null: wrong shape if it is valid JSON, else invalid.
fn not_json_or_shape(body: &[u8], what: &str) -> MessageError {
    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) => MessageError::WrongShape(format!("expected an object, got {what}")),
        Err(err) => json_error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::ClassLabel;

    fn reason_of_features(body: &[u8]) -> &'static str {
        parse_features(body, None)
            .map(|_| "ok")
            .unwrap_or_else(|e| e.reason())
    }

    #[test]
    fn native_features_round_trip() {
        let values = [0.1, -2.5e-3, 3.0];
        let body = serde_json::to_vec(&FeaturesOut {
            id: "abc-1",
            features: &values,
            sent_at_us: 42,
            audit: None,
        })
        .unwrap();
        let parsed = parse_features(&body, Some("ignored")).unwrap();
        assert_eq!(parsed.id.as_deref(), Some("abc-1"));
        assert_eq!(parsed.features, values);
        assert_eq!(parsed.sent_at_us, Some(42));
        assert!(!parsed.bare);
    }

    #[test]
    fn the_audit_tag_travels_and_a_bad_one_only_turns_the_audit_off() {
        let mut out = Vec::new();
        write_features(
            &mut out,
            BodyFormat::Native,
            "s1",
            &[1.0],
            7,
            Some("ab12:9"),
        )
        .unwrap();
        let features = parse_features(&out, None).unwrap();
        assert_eq!(features.audit.as_deref(), Some("ab12:9"));
        write_y_pred(
            &mut out,
            BodyFormat::Native,
            Some("s1"),
            &Target::Number(2.0),
            None,
            "v1",
            None,
            features.audit.as_deref(),
        )
        .unwrap();
        let y_pred = parse_label(LabelKind::YPred, &out, None).unwrap();
        assert_eq!(y_pred.audit.as_deref(), Some("ab12:9"));
        for body in [
            r#"{"id":"s1","y_true":1.0,"audit":"no window"}"#,
            r#"{"id":"s1","y_true":1.0,"audit":"a b:1"}"#,
            r#"{"id":"s1","y_true":1.0}"#,
        ] {
            let y_true = parse_label(LabelKind::YTrue, body.as_bytes(), None).unwrap();
            assert_eq!(
                (y_true.value, y_true.audit),
                (Target::Number(1.0), None),
                "{body}"
            );
        }
        // A tag that is not a string is a wrong shape, as any other field of the wrong type.
        let wrong = parse_label(
            LabelKind::YTrue,
            br#"{"id":"s1","y_true":1.0,"audit":5}"#,
            None,
        );
        assert_eq!(wrong.unwrap_err().reason(), "wrong_shape");
    }

    #[test]
    fn a_message_in_another_partition_is_refused_as_wrong_partition() {
        let eight = Partitions::new(8).unwrap();
        // "0" hashes to partition 7 of 8, "1" to 4.
        assert_eq!(check_partition(eight, 7, "features.p7", "0"), Ok(()));
        let err = check_partition(eight, 4, "features.p4", "0").unwrap_err();
        assert_eq!(err.reason(), "wrong_partition");
        assert_eq!(
            err.to_string(),
            "id 0 belongs in partition 7, but was found in features.p4"
        );
        // One partition: everything belongs.
        assert_eq!(check_partition(Partitions::ONE, 0, "features", "0"), Ok(()));
    }

    #[test]
    fn bodies_in_both_formats_read_back() {
        let mut out = b"left over".to_vec();
        let values = [0.25, -1.5];
        write_features(&mut out, BodyFormat::Bare, "s1", &values, 7, Some("p:1")).unwrap();
        assert_eq!(out, b"[0.25,-1.5]");
        let parsed = parse_features(&out, Some("s1")).unwrap();
        assert_eq!((parsed.id.as_deref(), parsed.bare), (Some("s1"), true));
        assert_eq!(parsed.features, values);
        write_features(&mut out, BodyFormat::Native, "s1", &values, 7, None).unwrap();
        let parsed = parse_features(&out, None).unwrap();
        assert_eq!(
            (parsed.id.as_deref(), parsed.sent_at_us),
            (Some("s1"), Some(7))
        );

        write_y_true(
            &mut out,
            BodyFormat::Bare,
            "s1",
            &151.0.into(),
            7,
            Some("p:1"),
        )
        .unwrap();
        assert_eq!(out, b"151.0");
        let y = parse_label(LabelKind::YTrue, &out, Some("s1")).unwrap();
        assert_eq!(
            (y.id.as_deref(), y.value),
            (Some("s1"), Target::Number(151.0))
        );
        write_y_true(&mut out, BodyFormat::Native, "s1", &151.0.into(), 7, None).unwrap();
        let y = parse_label(LabelKind::YTrue, &out, None).unwrap();
        assert_eq!((y.id.as_deref(), y.sent_at_us), (Some("s1"), Some(7)));

        write_y_pred(
            &mut out,
            BodyFormat::Bare,
            Some("s1"),
            &Target::Number(2.5),
            None,
            "v1",
            None,
            None,
        )
        .unwrap();
        assert_eq!(out, b"2.5");
        write_y_pred(
            &mut out,
            BodyFormat::Native,
            None,
            &2.5.into(),
            None,
            "v1",
            None,
            None,
        )
        .unwrap();
        assert_eq!(out, b"2.5");
        write_y_pred(
            &mut out,
            BodyFormat::Native,
            Some("s1"),
            &Target::Number(2.5),
            None,
            "v1",
            Some(7),
            None,
        )
        .unwrap();
        let p = parse_label(LabelKind::YPred, &out, None).unwrap();
        assert_eq!(p.model_version.as_deref(), Some("v1"));
        assert_eq!(
            (p.id.as_deref(), p.value),
            (Some("s1"), Target::Number(2.5))
        );
        assert_eq!(BodyFormat::of(TopologyMode::Course), BodyFormat::Bare);
        assert_eq!(BodyFormat::of(TopologyMode::Durable), BodyFormat::Native);
    }

    #[test]
    fn bare_features_take_id_from_message_id() {
        let parsed = parse_features(b"[1, 2.5]", Some("m-7")).unwrap();
        assert_eq!(parsed.id.as_deref(), Some("m-7"));
        assert!(parsed.bare);
        let anonymous = parse_features(b"[1]", None).unwrap();
        assert_eq!(anonymous.id, None);
    }

    #[test]
    fn bad_features_are_classified() {
        assert_eq!(reason_of_features(b""), "empty_body");
        assert_eq!(reason_of_features(b"   "), "empty_body");
        assert_eq!(reason_of_features(b"{not json"), "invalid_json");
        assert_eq!(reason_of_features(b"[1, NaN]"), "invalid_json");
        assert_eq!(reason_of_features(b"[1, Infinity]"), "invalid_json");
        assert_eq!(
            reason_of_features(b"{\"id\":\"a\",\"x\":[1]}"),
            "wrong_shape"
        );
        assert_eq!(reason_of_features(b"[1, \"2\"]"), "wrong_shape");
        assert_eq!(reason_of_features(b"[1, null]"), "wrong_shape");
        assert_eq!(reason_of_features(b"[1, \"NaN\"]"), "wrong_shape");
        assert_eq!(reason_of_features(b"[\"-Infinity\"]"), "wrong_shape");
        assert_eq!(reason_of_features(b"[1e999]"), "non_finite");
        assert_eq!(reason_of_features(b"42"), "wrong_shape");
        assert_eq!(reason_of_features(b"\"hello\""), "wrong_shape");
        assert_eq!(reason_of_features(b"[]"), "wrong_shape");
        assert_eq!(reason_of_features(b"{\"features\":[1]}"), "missing_id");
        assert_eq!(
            reason_of_features(b"{\"id\":\"\",\"features\":[1]}"),
            "missing_id"
        );
        assert_eq!(
            reason_of_features(b"{\"id\":null,\"features\":[1]}"),
            "missing_id"
        );
        assert_eq!(
            reason_of_features(b"{\"id\":\"a b\",\"features\":[1]}"),
            "invalid_id"
        );
        assert_eq!(reason_of_features(&[0xff, 0xfe, b'[', b']']), "not_utf8");
    }

    #[test]
    fn class_labels_and_probabilities_read_back_as_written() {
        let mut out = Vec::new();
        let setosa = Target::Class(ClassLabel::Text("setosa".to_owned()));
        write_y_true(&mut out, BodyFormat::Native, "s1", &setosa, 7, None).unwrap();
        assert_eq!(out, br#"{"id":"s1","y_true":"setosa","sent_at_us":7}"#);
        let y = parse_label(LabelKind::YTrue, &out, None).unwrap();
        assert_eq!(y.value, setosa);
        // An integer label stays an integer on the wire and reads back as that class.
        write_y_true(
            &mut out,
            BodyFormat::Bare,
            "s1",
            &Target::Class(ClassLabel::Integer(1)),
            7,
            None,
        )
        .unwrap();
        assert_eq!(out, b"1");
        let y = parse_label(LabelKind::YTrue, &out, Some("s1")).unwrap();
        assert_eq!(y.value.class(LabelKind::YTrue), Ok(ClassLabel::Integer(1)));
        let bare = parse_label(LabelKind::YTrue, br#""virginica""#, Some("s2")).unwrap();
        assert_eq!(
            bare.value.class(LabelKind::YTrue),
            Ok(ClassLabel::Text("virginica".to_owned()))
        );

        let probabilities = crate::classes::Probabilities::new(vec![
            ("setosa".to_owned(), 0.75),
            ("versicolor".to_owned(), 0.25),
        ])
        .unwrap();
        write_y_pred(
            &mut out,
            BodyFormat::Native,
            Some("s1"),
            &setosa,
            Some(&probabilities),
            "v1",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":"s1","y_pred":"setosa","probabilities":{"setosa":0.75,"versicolor":0.25},"model_version":"v1"}"#
        );
        let p = parse_label(LabelKind::YPred, &out, None).unwrap();
        assert_eq!((p.value, p.probabilities), (setosa, Some(probabilities)));
        // An integer prediction with probabilities is a class.
        let p = parse_label(
            LabelKind::YPred,
            br#"{"id":"a","y_pred":1,"probabilities":{"0":0.1,"1":0.9}}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.value, Target::Class(ClassLabel::Integer(1)));
    }

    #[test]
    fn bad_class_predictions_are_classified() {
        let reason = |body: &str| {
            parse_label(LabelKind::YPred, body.as_bytes(), None)
                .unwrap_err()
                .reason()
        };
        assert_eq!(
            reason(r#"{"id":"a","y_pred":"x","probabilities":{"x":0.7,"y":0.7}}"#),
            "bad_probabilities"
        );
        assert_eq!(
            reason(r#"{"id":"a","y_pred":"z","probabilities":{"x":0.5,"y":0.5}}"#),
            "bad_probabilities"
        );
        assert_eq!(
            reason(r#"{"id":"a","y_pred":0.5,"probabilities":{"x":0.5,"y":0.5}}"#),
            "wrong_shape"
        );
        assert_eq!(
            reason(r#"{"id":"a","y_pred":"x","probabilities":[0.5,0.5]}"#),
            "wrong_shape"
        );
        assert_eq!(
            reason(r#"{"id":"a","y_pred":"x","probabilities":{"x":"high"}}"#),
            "wrong_shape"
        );
    }

    #[test]
    fn labels_native_and_bare() {
        let y = parse_label(LabelKind::YTrue, br#"{"id":"a","y_true":151.0}"#, None).unwrap();
        assert_eq!(
            (y.id.as_deref(), y.value),
            (Some("a"), Target::Number(151.0))
        );
        let p = parse_label(
            LabelKind::YPred,
            br#"{"id":"a","y_pred":1.5,"model_version":"v1"}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.model_version.as_deref(), Some("v1"));
        let bare = parse_label(LabelKind::YTrue, b"75.5", Some("m1")).unwrap();
        assert_eq!(
            (bare.id.as_deref(), bare.value),
            (Some("m1"), Target::Number(75.5))
        );
        let anonymous = parse_label(LabelKind::YPred, b"3", None).unwrap();
        assert_eq!(anonymous.id, None);
    }

    #[test]
    fn bad_labels_are_classified() {
        let reason = |kind, body: &[u8]| parse_label(kind, body, None).unwrap_err().reason();
        // A label where a number is expected is refused by the regression reader, Target::number.
        let number = |body: &[u8]| {
            parse_label(LabelKind::YTrue, body, None)
                .and_then(|m| m.value.number(LabelKind::YTrue))
                .unwrap_err()
                .reason()
        };
        assert_eq!(number(b"\"abc\""), "wrong_shape");
        assert_eq!(number(b"{\"id\":\"a\",\"y_true\":\"1\"}"), "wrong_shape");
        assert_eq!(
            reason(LabelKind::YTrue, b"{\"id\":\"a\",\"y_pred\":1}"),
            "wrong_shape"
        );
        assert_eq!(reason(LabelKind::YTrue, b"[1]"), "wrong_shape");
        assert_eq!(reason(LabelKind::YTrue, b"{\"y_true\":1}"), "missing_id");
        assert_eq!(reason(LabelKind::YPred, b"nul"), "invalid_json");
        assert_eq!(reason(LabelKind::YPred, b"null"), "wrong_shape");
        assert_eq!(reason(LabelKind::YPred, b"1e400"), "non_finite");
    }

    #[test]
    fn ids_of_bad_bodies_are_found_for_the_log() {
        assert_eq!(
            body_id(br#"{"id":"a1","features":[1,"x"]}"#).as_deref(),
            Some("a1")
        );
        assert_eq!(body_id(br#"{"features":[1]}"#), None);
        assert_eq!(body_id(b"[1,2]"), None);
        assert_eq!(body_id(b"{broken"), None);
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("0b7e2d9c-4f1a-4c55-9a4e-0e5d1f3b2a10").is_ok());
        assert_eq!(validate_id("").unwrap_err().reason(), "missing_id");
        assert_eq!(validate_id("a,b").unwrap_err().reason(), "invalid_id");
        assert_eq!(
            validate_id(&"x".repeat(129)).unwrap_err().reason(),
            "invalid_id"
        );
    }
}
