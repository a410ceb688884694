//! What one side of a pair holds: a number (regression), or a class label with, on a prediction,
//! the class probabilities (classification). The task decides which, once, when a message is taken
//! in ([`Value::of`]); the join only stores, compares and hands values back.

use pipeline::classes::{ClassLabel, Probabilities, Task};
use pipeline::messages::{LabelKind, MessageError, Target};
use std::hash::{Hash as _, Hasher as _};

/// A `y_true` or `y_pred` as the join keeps it. A class is boxed so a number costs no more than
/// before (16 bytes in an `Option`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A finite number.
    Number(f64),
    /// A class label, and a prediction's probabilities.
    Class(Box<ClassValue>),
}

/// A class label and, for a prediction, the probabilities of every class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassValue {
    /// The label.
    pub label: ClassLabel,
    /// A prediction's class probabilities (none for a true label or a bare prediction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<Probabilities>,
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Self::Number(value)
    }
}

impl Value {
    /// A class value.
    pub fn class(label: ClassLabel, probabilities: Option<Probabilities>) -> Self {
        Self::Class(Box::new(ClassValue {
            label,
            probabilities,
        }))
    }

    /// What a message holds for `task`: a number under regression (a label is `wrong_shape`), a
    /// class under classification (a number that is not an integer is `wrong_shape`).
    pub fn of(
        value: Target,
        probabilities: Option<Probabilities>,
        kind: LabelKind,
        task: Task,
    ) -> Result<Self, MessageError> {
        match task {
            Task::Regression => value.number(kind).map(Self::Number),
            Task::Classification => Ok(Self::class(value.class(kind)?, probabilities)),
        }
    }

    /// A number read back from a file, as `task` takes it (an integer is a class label then).
    pub fn for_task(self, task: Task) -> Option<Self> {
        match (task, self) {
            (Task::Regression, Self::Number(value)) => Some(Self::Number(value)),
            (Task::Classification, Self::Number(value)) => {
                ClassLabel::from_number(value, "a label")
                    .ok()
                    .map(|label| Self::class(label, None))
            }
            (Task::Classification, class @ Self::Class(_)) => Some(class),
            (Task::Regression, Self::Class(_)) => None,
        }
    }

    /// The number, if it is one.
    pub fn number(&self) -> Option<f64> {
        match self {
            Self::Number(value) => Some(*value),
            Self::Class(_) => None,
        }
    }

    /// 64 bits that differ between different values: a number's own bits, a hash of a class's
    /// label (its text: `1` and `"1"` are one class). What the de-duplication window keeps of a
    /// joined id; the rows read back at start-up have no probabilities, so they are left out.
    pub(crate) fn print(&self) -> u64 {
        match self {
            Self::Number(value) => value.to_bits(),
            Self::Class(class) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                class.label.key().hash(&mut hasher);
                hasher.finish()
            }
        }
    }

    /// The value as `labels_log.txt` writes it: the number, or the label as JSON with
    /// ` p=<probabilities as JSON>`; spaces inside strings are escaped so the line keeps its
    /// space-separated fields.
    pub fn log_text(&self) -> String {
        match self {
            Self::Number(value) => value.to_string(),
            Self::Class(class) => {
                let mut text = json_without_spaces(&class.label);
                if let Some(probabilities) = &class.probabilities {
                    text.push_str(" p=");
                    text.push_str(&json_without_spaces(probabilities));
                }
                text
            }
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(value) => write!(f, "{value}"),
            Self::Class(class) => write!(f, "{:?}", class.label.key()),
        }
    }
}

/// Compact JSON with every space escaped (compact JSON has spaces only inside strings).
fn json_without_spaces(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_default()
        .replace(' ', "\\u0020")
}

/// The checkpoint's form: a number stays a JSON number (older checkpoints read as before), a class
/// is an object.
impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(value) => serializer.serialize_f64(*value),
            Self::Class(class) => class.serialize(serializer),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(f64),
            Class(ClassValue),
        }
        Ok(match Either::deserialize(deserializer)? {
            Either::Number(value) => Self::Number(value),
            Either::Class(class) => Self::Class(Box::new(class)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iris() -> Probabilities {
        Probabilities::new(vec![
            ("Iris setosa".to_owned(), 0.75),
            ("Iris virginica".to_owned(), 0.25),
        ])
        .unwrap()
    }

    #[test]
    fn a_number_costs_what_an_f64_did() {
        assert_eq!(std::mem::size_of::<Option<Value>>(), 16);
    }

    #[test]
    fn classes_survive_the_checkpoint_and_numbers_stay_numbers() {
        let class = Value::class(ClassLabel::Text("Iris setosa".into()), Some(iris()));
        let json = serde_json::to_string(&class).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), class);
        assert_eq!(serde_json::to_string(&Value::Number(1.5)).unwrap(), "1.5");
        assert_eq!(
            serde_json::from_str::<Value>("151.0").unwrap(),
            Value::Number(151.0)
        );
    }

    #[test]
    fn the_log_text_has_no_spaces_inside_a_class() {
        let class = Value::class(ClassLabel::Text("Iris setosa".into()), Some(iris()));
        let text = class.log_text();
        assert_eq!(text.matches(' ').count(), 1, "{text}");
        assert!(text.starts_with("\"Iris\\u0020setosa\" p={"), "{text}");
    }

    #[test]
    fn prints_tell_labels_apart_whatever_the_probabilities() {
        let a = Value::class(ClassLabel::Integer(1), Some(iris()));
        let b = Value::class(ClassLabel::Text("1".into()), None);
        let c = Value::class(ClassLabel::Integer(2), None);
        assert_eq!(a.print(), b.print());
        assert_ne!(a.print(), c.print());
        assert_eq!(Value::Number(2.0).print(), 2.0f64.to_bits());
    }

    #[test]
    fn the_task_decides_what_a_message_is() {
        let message = |body: &str| {
            pipeline::messages::parse_label(LabelKind::YTrue, body.as_bytes(), None).unwrap()
        };
        let number = message(r#"{"id":"a","y_true":1}"#);
        assert_eq!(
            Value::of(
                number.value.clone(),
                None,
                LabelKind::YTrue,
                Task::Regression
            ),
            Ok(Value::Number(1.0))
        );
        assert_eq!(
            Value::of(number.value, None, LabelKind::YTrue, Task::Classification),
            Ok(Value::class(ClassLabel::Integer(1), None))
        );
        let text = message(r#"{"id":"a","y_true":"yes"}"#);
        assert_eq!(
            Value::of(text.value, None, LabelKind::YTrue, Task::Regression)
                .unwrap_err()
                .reason(),
            "wrong_shape"
        );
        let fraction = message(r#"{"id":"a","y_true":0.5}"#);
        assert_eq!(
            Value::of(fraction.value, None, LabelKind::YTrue, Task::Classification)
                .unwrap_err()
                .reason(),
            "wrong_shape"
        );
    }
}
