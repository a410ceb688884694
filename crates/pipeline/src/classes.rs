//! What a classifier's messages carry: the task (`TASK=regression|classification`), a target
//! that is a number or a class label as the data has it (an integer or a string), and a
//! prediction's class probabilities, checked once where they are read.
//!
//! A label is compared by its text: the integer `1` and the string `"1"` are the same class, which
//! is what a probability map's keys (always JSON strings) need.

use crate::messages::{LabelKind, MessageError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What the pipeline predicts and measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// A number per sample: MAE, RMSE, R².
    #[default]
    Regression,
    /// A class label and class probabilities per sample: accuracy, log loss, Brier, F1, AUC.
    Classification,
}

impl Task {
    /// `regression` or `classification`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Regression => "regression",
            Self::Classification => "classification",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A class label, kept as the data has it: written back as a JSON integer or string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(untagged)]
pub enum ClassLabel {
    /// An integer label (`0`, `1`, `7`).
    Integer(i64),
    /// Any other label (`"setosa"`, `"churn"`).
    Text(String),
}

impl ClassLabel {
    /// The label of a CSV cell: an integer when the whole cell is one, else the trimmed text.
    pub fn from_cell(cell: &str) -> Self {
        let cell = cell.trim();
        match cell.parse::<i64>() {
            Ok(value) => Self::Integer(value),
            Err(_) => Self::Text(cell.to_owned()),
        }
    }

    /// A JSON number taken as a label: only an integer is one.
    pub fn from_number(value: f64, what: &str) -> Result<Self, MessageError> {
        if value.is_finite() && value.fract() == 0.0 && value.abs() < 9.0e15 {
            Ok(Self::Integer(value as i64))
        } else {
            Err(MessageError::WrongShape(format!(
                "{what} {value} is not a class label: a class is a string or an integer \
                 (is TASK=classification meant?)"
            )))
        }
    }

    /// The text the class is known by (an integer's decimal digits).
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Integer(value) => std::borrow::Cow::Owned(value.to_string()),
            Self::Text(text) => std::borrow::Cow::Borrowed(text),
        }
    }
}

impl fmt::Display for ClassLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Integer(value) => write!(f, "{value}"),
            Self::Text(text) => f.write_str(text),
        }
    }
}

/// What a `y_true` or `y_pred` says: a number, or a class label (a JSON string; a JSON integer
/// reads as a number, which [`Target::class`] takes as a label).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Target {
    /// A regression target or prediction, finite.
    Number(f64),
    /// A class label.
    Class(ClassLabel),
}

impl Target {
    /// The number, or `wrong_shape` for a label where a number is expected.
    pub fn number(&self, kind: LabelKind) -> Result<f64, MessageError> {
        match self {
            Self::Number(value) => Ok(*value),
            Self::Class(label) => Err(MessageError::WrongShape(format!(
                "{} {:?} is not a number (is TASK=classification meant?)",
                kind.as_str(),
                label.key()
            ))),
        }
    }

    /// The class label: a string, or an integral number.
    pub fn class(&self, kind: LabelKind) -> Result<ClassLabel, MessageError> {
        match self {
            Self::Number(value) => ClassLabel::from_number(*value, kind.as_str()),
            Self::Class(label) => Ok(label.clone()),
        }
    }
}

impl From<f64> for Target {
    fn from(value: f64) -> Self {
        Self::Number(value)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(value) => write!(f, "{value}"),
            Self::Class(label) => write!(f, "{:?}", label.key()),
        }
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Target;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or a class label (a string or an integer)")
            }
            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Target, E> {
                Ok(Target::Number(value))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Target, E> {
                Ok(Target::Number(value as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Target, E> {
                Ok(Target::Number(value as f64))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Target, E> {
                Ok(Target::Class(ClassLabel::Text(value.to_owned())))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `-ln p` of the probability a model gave the true class, clipped to `[ε, 1-ε]` as scikit-learn's
/// `log_loss` does for float64: one definition for the metric service and the trainer's guard.
pub fn log_loss_of(p_true: f64) -> f64 {
    -p_true.clamp(f64::EPSILON, 1.0 - f64::EPSILON).ln()
}

/// How far from one the probabilities of a prediction may sum (float32 graphs round).
pub const SUM_TOLERANCE: f64 = 1e-3;

/// A prediction's class probabilities: one per class, in the model's class order, each in
/// `[0, 1]`, summing to one within [`SUM_TOLERANCE`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Probabilities {
    classes: Vec<(String, f64)>,
}

impl Probabilities {
    /// Checks and keeps `classes` (class key, probability).
    pub fn new(classes: Vec<(String, f64)>) -> Result<Self, MessageError> {
        if classes.is_empty() {
            return Err(bad("no classes"));
        }
        let mut sum = 0.0;
        for (class, p) in &classes {
            if !p.is_finite() || !(-SUM_TOLERANCE..=1.0 + SUM_TOLERANCE).contains(p) {
                return Err(bad(&format!("p({class}) = {p} is not in [0, 1]")));
            }
            sum += p;
        }
        if (sum - 1.0).abs() > SUM_TOLERANCE {
            return Err(bad(&format!("they sum to {sum:.6}, not 1")));
        }
        for (i, (class, _)) in classes.iter().enumerate() {
            if classes[..i].iter().any(|(other, _)| other == class) {
                return Err(bad(&format!("class {class:?} appears twice")));
            }
        }
        Ok(Self { classes })
    }

    /// The probability of `class`, or `None` for a class the model does not know.
    pub fn of(&self, class: &str) -> Option<f64> {
        self.classes
            .iter()
            .find(|(known, _)| known == class)
            .map(|(_, p)| p.clamp(0.0, 1.0))
    }

    /// The probability of `class` divided by the sum of all (a float32 graph's sum is not
    /// exactly one), as scikit-learn's metrics read it; `None` for an unknown class.
    pub fn normalised(&self, class: &str) -> Option<f64> {
        let sum: f64 = self.classes.iter().map(|(_, p)| p.clamp(0.0, 1.0)).sum();
        self.of(class).map(|p| p / sum)
    }

    /// (class key, probability), in the model's class order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.classes.iter().map(|(class, p)| (class.as_str(), *p))
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Never true for checked probabilities; for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// Checks that `predicted` is one of the classes.
    pub fn check_predicted(&self, predicted: &ClassLabel) -> Result<(), MessageError> {
        let key = predicted.key();
        if self.of(&key).is_some() {
            Ok(())
        } else {
            Err(bad(&format!(
                "the predicted class {key:?} is not among them"
            )))
        }
    }
}

impl Serialize for Probabilities {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(self.classes.len()))?;
        for (class, p) in &self.classes {
            map.serialize_entry(class, p)?;
        }
        map.end()
    }
}

/// A validated distribution from its JSON object (the metric's checkpoint).
impl<'de> Deserialize<'de> for Probabilities {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let ProbabilityMap(classes) = ProbabilityMap::deserialize(deserializer)?;
        Self::new(classes).map_err(serde::de::Error::custom)
    }
}

/// Class probabilities as a JSON object has them (class -> probability, in the sender's order),
/// not yet checked: reading a message keeps a bad distribution apart from bad JSON.
pub struct ProbabilityMap(pub Vec<(String, f64)>);

impl<'de> Deserialize<'de> for ProbabilityMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ProbabilityMap;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of class -> probability")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut classes = Vec::with_capacity(map.size_hint().unwrap_or(2));
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    classes.push(entry);
                }
                Ok(ProbabilityMap(classes))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn bad(why: &str) -> MessageError {
    MessageError::BadProbabilities(why.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn probabilities(values: &[(&str, f64)]) -> Result<Probabilities, MessageError> {
        Probabilities::new(values.iter().map(|(c, p)| ((*c).to_owned(), *p)).collect())
    }

    #[test]
    fn cells_keep_integers_as_integers_and_text_as_text() {
        assert_eq!(ClassLabel::from_cell(" 1 "), ClassLabel::Integer(1));
        assert_eq!(ClassLabel::from_cell("-3"), ClassLabel::Integer(-3));
        assert_eq!(
            ClassLabel::from_cell("setosa"),
            ClassLabel::Text("setosa".to_owned())
        );
        assert_eq!(
            ClassLabel::from_cell("1.5"),
            ClassLabel::Text("1.5".to_owned())
        );
        assert_eq!(ClassLabel::Integer(1).key(), "1");
        assert_eq!(serde_json::to_string(&ClassLabel::Integer(1)).unwrap(), "1");
        assert_eq!(
            serde_json::to_string(&ClassLabel::Text("a".to_owned())).unwrap(),
            "\"a\""
        );
    }

    #[test]
    fn only_an_integral_number_is_a_class() {
        assert_eq!(
            ClassLabel::from_number(2.0, "y_true"),
            Ok(ClassLabel::Integer(2))
        );
        let err = ClassLabel::from_number(2.5, "y_true").unwrap_err();
        assert_eq!(err.reason(), "wrong_shape");
        assert!(err.to_string().contains("string or an integer"), "{err}");
    }

    #[test]
    fn probabilities_must_be_a_distribution_over_distinct_classes() {
        let ok = probabilities(&[("0", 0.25), ("1", 0.75)]).unwrap();
        assert_eq!(ok.of("1"), Some(0.75));
        assert_eq!(ok.of("2"), None);
        assert!(ok.check_predicted(&ClassLabel::Integer(1)).is_ok());
        assert_eq!(
            ok.check_predicted(&ClassLabel::Integer(2))
                .unwrap_err()
                .reason(),
            "bad_probabilities"
        );
        for (values, says) in [
            (&[("0", 0.5), ("1", 0.6)][..], "sum to 1.1"),
            (&[("0", 1.5), ("1", -0.5)][..], "not in [0, 1]"),
            (&[("0", f64::NAN), ("1", 1.0)][..], "not in [0, 1]"),
            (&[("0", 0.5), ("0", 0.5)][..], "appears twice"),
            (&[][..], "no classes"),
        ] {
            let err = probabilities(values).unwrap_err();
            assert_eq!(err.reason(), "bad_probabilities");
            assert!(err.to_string().contains(says), "{err} lacks {says}");
        }
        // float32 rounding is tolerated
        assert!(probabilities(&[("a", 0.3333333), ("b", 0.3333333), ("c", 0.3333333)]).is_ok());
    }

    proptest! {
        #[test]
        fn any_normalised_vector_is_accepted_and_reads_back(raw in prop::collection::vec(0.001f64..1.0, 1..12)) {
            let sum: f64 = raw.iter().sum();
            let classes: Vec<(String, f64)> =
                raw.iter().enumerate().map(|(i, p)| (format!("c{i}"), p / sum)).collect();
            let checked = Probabilities::new(classes.clone()).unwrap();
            for (class, p) in &classes {
                prop_assert!((checked.of(class).unwrap() - p).abs() < 1e-12);
            }
            let json = serde_json::to_string(&checked).unwrap();
            let back: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.len(), classes.len());
        }
    }
}
