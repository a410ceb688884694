//! Feature names: how a `features` message's values are put in the order a model takes them.
//!
//! A message carries its features as an array (positional, today's default) or as an object
//! `{"<name>": number, …}` in any key order. A producer that knows its column names (the
//! `features` service reads them from the CSV header) announces them on each array message in the
//! [`FEATURE_NAMES_HEADER`] AMQP header, so the body stays as it always was. A model that knows
//! its feature names ([`FeatureSchema`]) maps an object by name and checks an announced array's
//! names; whatever does not fit is [`MessageError::SchemaMismatch`] (dead-lettered, never
//! predicted), so a CSV with its columns in another order is never served wrong.

use crate::messages::{FeaturesMessage, MessageError};
use std::collections::HashMap;

/// The AMQP header in which a producer announces the names of an array's values,
/// comma-separated in order.
pub const FEATURE_NAMES_HEADER: &str = "x-feature-names";

/// The feature names a model takes, in order; or only their count when the model does not know
/// them (an ONNX graph without `feature_names` metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSchema {
    names: Option<Vec<String>>,
    width: usize,
    /// The names joined as a producer announces them: compared whole, on every message.
    announced: String,
    positions: HashMap<String, usize>,
}

impl FeatureSchema {
    /// A schema of named features, in order.
    pub fn named(names: Vec<String>) -> Self {
        let positions = names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect();
        Self {
            width: names.len(),
            announced: names.join(","),
            names: Some(names),
            positions,
        }
    }

    /// A schema that knows only how many features there are.
    pub fn positional(width: usize) -> Self {
        Self {
            names: None,
            width,
            announced: String::new(),
            positions: HashMap::new(),
        }
    }

    /// The names, when known.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// How many features.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The value of [`FEATURE_NAMES_HEADER`] for these names (empty when unknown).
    pub fn announcement(&self) -> &str {
        &self.announced
    }

    /// The message's values in this schema's order: an object's by name (into `scratch`), an
    /// array's as they are once its length (and its announced names, if any) fit.
    pub fn arrange<'a>(
        &self,
        message: &'a FeaturesMessage,
        announced: Option<&str>,
        scratch: &'a mut Vec<f64>,
    ) -> Result<&'a [f64], MessageError> {
        let Some(sent) = &message.names else {
            if message.features.len() != self.width {
                return Err(MessageError::WrongLength {
                    expected: self.width,
                    got: message.features.len(),
                });
            }
            if let (Some(announced), Some(_)) = (announced, &self.names)
                && announced != self.announced
            {
                let sent: Vec<&str> = announced.split(',').collect();
                return Err(self.mismatch(&sent, "the producer's columns"));
            }
            return Ok(&message.features);
        };
        if self.names.is_none() {
            return Err(MessageError::SchemaMismatch(
                "the features are named but the model does not know its feature names: stamp \
                 them into the model (`model stamp --data <csv>`) or send an array"
                    .to_owned(),
            ));
        }
        scratch.clear();
        scratch.resize(self.width, f64::NAN);
        let mut filled = 0;
        for (name, value) in sent.iter().zip(&message.features) {
            match self.positions.get(name) {
                Some(&i) if scratch[i].is_nan() => {
                    scratch[i] = *value;
                    filled += 1;
                }
                _ => {
                    let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
                    return Err(self.mismatch(&sent, "the message's features"));
                }
            }
        }
        if filled != self.width {
            let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
            return Err(self.mismatch(&sent, "the message's features"));
        }
        Ok(scratch)
    }

    /// What differs between `sent` and this schema's names, naming the fields.
    fn mismatch(&self, sent: &[&str], what: &str) -> MessageError {
        let expected = self.names.as_deref().unwrap_or_default();
        let missing: Vec<&str> = expected
            .iter()
            .map(String::as_str)
            .filter(|name| !sent.contains(name))
            .collect();
        let unknown: Vec<&str> = sent
            .iter()
            .copied()
            .filter(|name| !self.positions.contains_key(*name))
            .collect();
        let mut repeated: Vec<&str> = sent
            .iter()
            .enumerate()
            .filter(|(i, name)| sent[..*i].contains(name))
            .map(|(_, name)| *name)
            .collect();
        repeated.dedup();
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing [{}]", missing.join(", ")));
        }
        if !unknown.is_empty() {
            parts.push(format!("unknown [{}]", unknown.join(", ")));
        }
        if !repeated.is_empty() {
            parts.push(format!("repeated [{}]", repeated.join(", ")));
        }
        if parts.is_empty() {
            parts.push(format!(
                "the same names in another order [{}]",
                sent.join(", ")
            ));
        }
        MessageError::SchemaMismatch(format!(
            "{what} do not match the model's features [{}]: {}",
            expected.join(", "),
            parts.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema() -> FeatureSchema {
        FeatureSchema::named(vec!["age".into(), "sex".into(), "bmi".into()])
    }

    fn array(values: &[f64]) -> FeaturesMessage {
        FeaturesMessage {
            id: Some("a".into()),
            features: values.to_vec(),
            names: None,
            sent_at_us: None,
            bare: false,
            audit: None,
        }
    }

    fn object(pairs: &[(&str, f64)]) -> FeaturesMessage {
        FeaturesMessage {
            names: Some(pairs.iter().map(|(n, _)| (*n).to_owned()).collect()),
            features: pairs.iter().map(|(_, v)| *v).collect(),
            ..array(&[])
        }
    }

    #[test]
    fn an_object_is_mapped_by_name() {
        let mut scratch = Vec::new();
        let message = object(&[("bmi", 3.0), ("age", 1.0), ("sex", 2.0)]);
        let values = schema().arrange(&message, None, &mut scratch).unwrap();
        assert_eq!(values, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn missing_unknown_and_repeated_names_are_named() {
        let mut scratch = Vec::new();
        let err = schema()
            .arrange(
                &object(&[("age", 1.0), ("sex", 2.0), ("bmj", 3.0)]),
                None,
                &mut scratch,
            )
            .unwrap_err();
        assert_eq!(err.reason(), "schema_mismatch");
        let text = err.to_string();
        assert!(
            text.contains("missing [bmi]") && text.contains("unknown [bmj]"),
            "{text}"
        );
        let err = schema()
            .arrange(
                &object(&[("age", 1.0), ("age", 2.0), ("bmi", 3.0)]),
                None,
                &mut scratch,
            )
            .unwrap_err();
        assert!(err.to_string().contains("repeated [age]"), "{err}");
        let err = schema()
            .arrange(&object(&[("age", 1.0), ("bmi", 3.0)]), None, &mut scratch)
            .unwrap_err();
        assert!(err.to_string().contains("missing [sex]"), "{err}");
    }

    #[test]
    fn an_array_is_checked_against_its_announced_names() {
        let mut scratch = Vec::new();
        let message = array(&[1.0, 2.0, 3.0]);
        let schema = schema();
        assert_eq!(
            schema
                .arrange(&message, Some("age,sex,bmi"), &mut scratch)
                .unwrap(),
            [1.0, 2.0, 3.0]
        );
        assert_eq!(
            schema.arrange(&message, None, &mut scratch).unwrap(),
            [1.0, 2.0, 3.0]
        );
        let err = schema
            .arrange(&message, Some("sex,age,bmi"), &mut scratch)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the same names in another order [sex, age, bmi]"),
            "{err}"
        );
        let err = schema
            .arrange(&array(&[1.0, 2.0]), None, &mut scratch)
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_length");
    }

    #[test]
    fn a_model_without_names_takes_arrays_only() {
        let mut scratch = Vec::new();
        let schema = FeatureSchema::positional(3);
        let message = array(&[1.0, 2.0, 3.0]);
        assert_eq!(
            schema
                .arrange(&message, Some("x,y,z"), &mut scratch)
                .unwrap(),
            [1.0, 2.0, 3.0]
        );
        let err = schema
            .arrange(
                &object(&[("age", 1.0), ("sex", 2.0), ("bmi", 3.0)]),
                None,
                &mut scratch,
            )
            .unwrap_err();
        assert!(err.to_string().contains("model stamp"), "{err}");
    }

    proptest! {
        /// Any order of the right names gives the same values as the array in the model's order.
        #[test]
        fn any_key_order_gives_the_same_vector(
            values in proptest::collection::vec(-1e6f64..1e6, 5),
            order in Just((0..5usize).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            let names: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
            let schema = FeatureSchema::named(names.clone());
            let pairs: Vec<(&str, f64)> = order.iter().map(|&i| (names[i].as_str(), values[i])).collect();
            let mut scratch = Vec::new();
            let message = object(&pairs);
            let arranged = schema.arrange(&message, None, &mut scratch).unwrap();
            prop_assert_eq!(arranged, values.as_slice());
        }
    }
}
