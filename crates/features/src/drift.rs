//! Drift on demand, for demos and tests: after `DRIFT_AFTER` samples the producer adds a fixed
//! amount to the named features (`DRIFT_SHIFT`, e.g. `bmi=0.05,s5=0.04`). Off by default.

use std::fmt;

/// `DRIFT_SHIFT` as written: feature names and the amount added to each.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShiftSpec(pub Vec<(String, f64)>);

impl fmt::Display for ShiftSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, by)| format!("{name}={by}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `name=amount[,name=amount...]` (clap value parser of `DRIFT_SHIFT`); empty means none.
pub fn parse_shift_spec(text: &str) -> Result<ShiftSpec, String> {
    let mut shifts: Vec<(String, f64)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, amount)) = part.split_once('=') else {
            return Err(format!(
                "{part:?} is not FEATURE=AMOUNT (for example bmi=0.05,s5=0.04)"
            ));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("{part:?} has no feature name"));
        }
        let amount: f64 = match amount.trim().parse() {
            Ok(amount) if f64::is_finite(amount) => amount,
            _ => return Err(format!("{part:?}: {amount:?} is not a finite number")),
        };
        if shifts.iter().any(|(seen, _)| seen == name) {
            return Err(format!("feature {name:?} is named twice"));
        }
        shifts.push((name.to_owned(), amount));
    }
    Ok(ShiftSpec(shifts))
}

/// A feature of `DRIFT_SHIFT` that the data set does not have.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("DRIFT_SHIFT names {unknown}, which the data set does not have (its features: {known})")]
pub struct UnknownFeatures {
    /// The unknown names, comma-separated.
    pub unknown: String,
    /// The data set's feature names, comma-separated.
    pub known: String,
}

/// The drift applied to the samples: from sample number `after` on (counted from 0), each listed
/// feature column gets its amount added.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    after: u64,
    shifts: Vec<(usize, f64)>,
}

impl Drift {
    /// Resolves `spec`'s names against the data set's `feature_names`; every unknown name is
    /// reported at once.
    pub fn new(
        after: u64,
        spec: &ShiftSpec,
        feature_names: &[String],
    ) -> Result<Self, UnknownFeatures> {
        let mut shifts = Vec::new();
        let mut unknown = Vec::new();
        for (name, amount) in &spec.0 {
            match feature_names.iter().position(|known| known == name) {
                Some(column) => shifts.push((column, *amount)),
                None => unknown.push(format!("{name:?}")),
            }
        }
        if !unknown.is_empty() {
            return Err(UnknownFeatures {
                unknown: unknown.join(", "),
                known: feature_names.join(", "),
            });
        }
        Ok(Self { after, shifts })
    }

    /// True when some feature is shifted at all.
    pub fn is_on(&self) -> bool {
        !self.shifts.is_empty()
    }

    /// The features of sample number `sample` (from 0): `row` itself, or a shifted copy in
    /// `scratch`.
    pub fn apply<'a>(&self, sample: u64, row: &'a [f64], scratch: &'a mut Vec<f64>) -> &'a [f64] {
        if sample < self.after || self.shifts.is_empty() {
            return row;
        }
        scratch.clear();
        scratch.extend_from_slice(row);
        for &(column, amount) in &self.shifts {
            if let Some(value) = scratch.get_mut(column) {
                *value += amount;
            }
        }
        scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["age", "bmi", "s5"].map(String::from).to_vec()
    }

    #[test]
    fn parses_the_spec() {
        assert_eq!(
            parse_shift_spec("bmi=0.05, s5=-0.04").unwrap(),
            ShiftSpec(vec![("bmi".into(), 0.05), ("s5".into(), -0.04)])
        );
        assert_eq!(parse_shift_spec("").unwrap(), ShiftSpec::default());
        assert_eq!(
            parse_shift_spec("bmi=0.05,s5=0.04").unwrap().to_string(),
            "bmi=0.05,s5=0.04"
        );
        for bad in ["bmi", "bmi=x", "=1", "bmi=inf", "bmi=1,bmi=2", "bmi=NaN"] {
            assert!(parse_shift_spec(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unknown_features_are_named() {
        let spec = parse_shift_spec("bmi=1,weight=2,height=3").unwrap();
        let err = Drift::new(0, &spec, &names()).unwrap_err();
        assert_eq!(err.unknown, "\"weight\", \"height\"");
        let text = err.to_string();
        assert!(
            text.contains("weight") && text.contains("age, bmi, s5"),
            "{text}"
        );
    }

    #[test]
    fn shifts_only_from_sample_after_on() {
        let spec = parse_shift_spec("bmi=0.5,s5=-1").unwrap();
        let drift = Drift::new(2, &spec, &names()).unwrap();
        assert!(drift.is_on());
        let row = [1.0, 2.0, 3.0];
        let mut scratch = Vec::new();
        assert_eq!(drift.apply(0, &row, &mut scratch), &row);
        assert_eq!(drift.apply(1, &row, &mut scratch), &row);
        assert_eq!(drift.apply(2, &row, &mut scratch), &[1.0, 2.5, 2.0]);
        assert_eq!(drift.apply(1000, &row, &mut scratch), &[1.0, 2.5, 2.0]);
        // Off: the row unchanged.
        let off = Drift::new(0, &ShiftSpec::default(), &names()).unwrap();
        assert!(!off.is_on());
        assert_eq!(off.apply(5, &row, &mut scratch), &row);
    }
}
