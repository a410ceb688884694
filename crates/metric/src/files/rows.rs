//! The rows of `metric_log.csv` for each task, and the lines of `labels_log.txt`: how they are
//! written and read back.
//!
//! - regression: `id,y_true,y_pred,absolute_error,model_version`
//! - classification: `id,y_true,y_pred,p_true,correct,model_version,brier`: the labels as the
//!   data has them, the probability the model gave the true class, `1`/`0`, and the pair's Brier
//!   score (so start-up rebuilds every figure from the rows). Without probabilities (a bare
//!   prediction) `p_true` and `brier` are empty; for a true class the model did not know, `p_true`
//!   is `0` and `brier` empty.

use crate::classification::ClassPair;
use crate::join::{Pair, Value};
use pipeline::classes::{ClassLabel, Probabilities, ProbabilityMap, Task};
use pipeline::messages::LabelKind;

/// Header of a regressor's `metric_log.csv`.
pub const CSV_HEADER: &str = "id,y_true,y_pred,absolute_error,model_version";
/// Header of a classifier's `metric_log.csv`.
pub const CLASS_CSV_HEADER: &str = "id,y_true,y_pred,p_true,correct,model_version,brier";

/// The CSV header of `task`.
pub fn header_of(task: Task) -> &'static str {
    match task {
        Task::Regression => CSV_HEADER,
        Task::Classification => CLASS_CSV_HEADER,
    }
}

/// A row read back from `metric_log.csv`.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A regressor's.
    Numbers(Pair),
    /// A classifier's.
    Classes(ClassPair),
}

impl Row {
    /// The row's id.
    pub fn id(&self) -> &str {
        match self {
            Self::Numbers(pair) => &pair.id,
            Self::Classes(pair) => &pair.id,
        }
    }
}

fn valid_id(record: &csv::StringRecord) -> Result<&str, String> {
    let id = &record[0];
    pipeline::messages::validate_id(id).map_err(|_| format!("id {id:?} is not a valid id"))?;
    Ok(id)
}

/// Parses one CSV record: a regressor's row (4 or 5 fields) or a classifier's (7).
pub(super) fn parse_row(record: &csv::StringRecord) -> Result<Row, String> {
    match record.len() {
        4 | 5 => parse_number_row(record).map(Row::Numbers),
        7 => parse_class_row(record).map(Row::Classes),
        n => Err(format!(
            "{n} fields, expected 4 or 5 (regression) or 7 (classification)"
        )),
    }
}

fn parse_number_row(record: &csv::StringRecord) -> Result<Pair, String> {
    let id = valid_id(record)?;
    let number = |index: usize, name: &str| -> Result<f64, String> {
        record[index]
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{name} {:?} is not a finite number", &record[index]))
    };
    let y_true = number(1, "y_true")?;
    let y_pred = number(2, "y_pred")?;
    let model_version = record.get(4).filter(|v| !v.is_empty()).map(str::to_owned);
    Ok(Pair {
        id: id.to_owned(),
        y_true,
        y_pred,
        model_version,
        sent_at_us: None,
    })
}

fn parse_class_row(record: &csv::StringRecord) -> Result<ClassPair, String> {
    let id = valid_id(record)?;
    let optional = |index: usize, name: &str| -> Result<Option<f64>, String> {
        match &record[index] {
            "" => Ok(None),
            text => text
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| format!("{name} {text:?} is not a finite number")),
        }
    };
    let brier = optional(6, "brier")?;
    // A p_true without a Brier score: the model did not know the class.
    let (p_true, known) = match (optional(3, "p_true")?, brier) {
        (Some(_), None) => (None, false),
        (p_true, _) => (p_true, true),
    };
    if !matches!(&record[4], "1" | "0") {
        return Err(format!("correct {:?} is not 1 or 0", &record[4]));
    }
    Ok(ClassPair {
        id: id.to_owned(),
        y_true: ClassLabel::from_cell(&record[1]),
        y_pred: ClassLabel::from_cell(&record[2]),
        p_true,
        brier,
        p_pred: None,
        binary: None,
        known,
        model_version: Some(&record[5])
            .filter(|v| !v.is_empty())
            .map(|v| v.to_owned()),
        sent_at_us: None,
    })
}

/// Writes a classifier's row.
pub(super) fn write_class_row(
    row: &mut csv::Writer<&mut Vec<u8>>,
    pair: &ClassPair,
) -> csv::Result<()> {
    let number = |value: Option<f64>| value.map(|v| v.to_string()).unwrap_or_default();
    let p_true = if pair.known {
        number(pair.p_true)
    } else {
        "0".to_owned()
    };
    row.write_record([
        pair.id.as_str(),
        &pair.y_true.key(),
        &pair.y_pred.key(),
        &p_true,
        if pair.correct() { "1" } else { "0" },
        pair.model_version.as_deref().unwrap_or(""),
        &number(pair.brier),
    ])
}

/// One line of `labels_log.txt`, read back at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelLine {
    /// `y_true` or `y_pred`.
    pub kind: LabelKind,
    /// Sample id; `None` for `-`.
    pub id: Option<String>,
    /// The value (a label as the log wrote it: a JSON string, or a number that the task may take
    /// for an integer label), with a class prediction's probabilities.
    pub value: Value,
    /// Model version of a prediction.
    pub model_version: Option<String>,
    /// The loss-audit tag the message carried (`audit=<producer>:<window>` at the end).
    pub audit: Option<String>,
}

/// Parses one line of `labels_log.txt`; `None` for a line that is not ours.
pub fn parse_label_line(line: &str) -> Option<LabelLine> {
    let mut fields = line.split(' ');
    let _time = fields.next()?;
    let kind = match fields.next()? {
        "y_true" => LabelKind::YTrue,
        "y_pred" => LabelKind::YPred,
        _ => return None,
    };
    let id = match fields.next()? {
        "-" => None,
        id => Some(id.to_owned()),
    };
    let mut value = parse_value(fields.next()?)?;
    let (mut model_version, mut audit) = (None, None);
    for field in fields {
        if let Some(tag) = field.strip_prefix(super::AUDIT_PREFIX) {
            audit = Some(tag.to_owned());
        } else if let Some(json) = field.strip_prefix("p=") {
            let probabilities = parse_probabilities(json)?;
            value = match value {
                Value::Class(class) => Value::class(class.label, Some(probabilities)),
                Value::Number(number) => {
                    let label =
                        pipeline::classes::ClassLabel::from_number(number, "y_pred").ok()?;
                    Value::class(label, Some(probabilities))
                }
            };
        } else {
            model_version = Some(field.to_owned());
        }
    }
    Some(LabelLine {
        kind,
        id,
        value,
        model_version,
        audit,
    })
}

/// Reads the value field of a `labels_log.txt` line (with the ` p=` field that follows a
/// class prediction): a number, or a label written as JSON ([`Value::log_text`]).
fn parse_value(token: &str) -> Option<Value> {
    if token.starts_with('"') {
        let label: String = serde_json::from_str(token).ok()?;
        return Some(Value::class(ClassLabel::Text(label), None));
    }
    token.parse::<f64>().ok().map(Value::Number)
}

/// Reads a ` p=` field: the probabilities of the prediction before it.
fn parse_probabilities(json: &str) -> Option<Probabilities> {
    let ProbabilityMap(classes) = serde_json::from_str(json).ok()?;
    Probabilities::new(classes).ok()
}
