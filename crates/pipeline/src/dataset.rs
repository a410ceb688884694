//! Loading a CSV data set: one header row, numeric feature columns, and a target column (the last
//! one, or the one named by `TARGET_COLUMN`). Used by the producer and by the model's training.
//! Under `TASK=classification` the target column holds class labels, kept as the data has them
//! (integers or strings, [`ClassLabel`]).

use crate::classes::{ClassLabel, Task};
use std::path::{Path, PathBuf};

/// Why a data set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: csv::Error,
    },
    /// The named target column is not in the header.
    #[error("{path}: no column named {name:?} (columns: {columns})")]
    NoSuchColumn {
        /// The file.
        path: PathBuf,
        /// The missing name.
        name: String,
        /// The header, comma-separated.
        columns: String,
    },
    /// Fewer than two columns: no features, or no target.
    #[error("{path}: needs at least one feature column and a target column")]
    TooFewColumns {
        /// The file.
        path: PathBuf,
    },
    /// A cell that is not a finite number.
    #[error("{path}, line {line}, column {column:?}: {value:?} is not a finite number")]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column name.
        column: String,
        /// The cell.
        value: String,
    },
    /// A row with a different number of cells than the header.
    #[error("{path}, line {line}: {got} cells, the header has {expected}")]
    Ragged {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Cells in the header.
        expected: usize,
        /// Cells in the row.
        got: usize,
    },
    /// No data rows.
    #[error("{path}: no data rows")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A numeric data set held in memory, features row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Names of the feature columns, in order.
    pub feature_names: Vec<String>,
    /// Name of the target column.
    pub target_name: String,
    features: Vec<f64>,
    /// Regression: the targets. Classification: each row's index in `classes`.
    targets: Vec<f64>,
    /// Classification: the distinct labels, sorted (integers before strings), as scikit-learn
    /// orders `classes_`.
    classes: Option<Vec<ClassLabel>>,
}

impl Dataset {
    /// Reads `path`. The target is the column named `target_column`, or the last column when it
    /// is `None` or empty: every `TARGET_COLUMN` and `--target` comes here, and compose passes the
    /// variable empty when it is not set (clap hands an empty value on as `Some("")`).
    pub fn from_csv(path: &Path, target_column: Option<&str>) -> Result<Self, DatasetError> {
        Self::from_csv_for(path, target_column, Task::Regression)
    }

    /// Reads `path` for `task`: under classification the target cells are class labels (any
    /// text), every other cell a finite number.
    pub fn from_csv_for(
        path: &Path,
        target_column: Option<&str>,
        task: Task,
    ) -> Result<Self, DatasetError> {
        let io = |source| DatasetError::Io {
            path: path.to_owned(),
            source,
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .flexible(true)
            .from_path(path)
            .map_err(io)?;
        let header: Vec<String> = reader
            .headers()
            .map_err(io)?
            .iter()
            .map(str::to_owned)
            .collect();
        if header.len() < 2 {
            return Err(DatasetError::TooFewColumns {
                path: path.to_owned(),
            });
        }
        let target_index =
            match target_column.filter(|name| !name.is_empty()) {
                Some(name) => header.iter().position(|c| c == name).ok_or_else(|| {
                    DatasetError::NoSuchColumn {
                        path: path.to_owned(),
                        name: name.to_owned(),
                        columns: header.join(","),
                    }
                })?,
                None => header.len() - 1,
            };
        let mut features = Vec::new();
        let mut targets = Vec::new();
        let mut labels = Vec::new();
        for record in reader.records() {
            let record = record.map_err(io)?;
            let line = record.position().map_or(0, |p| p.line());
            if record.len() != header.len() {
                return Err(DatasetError::Ragged {
                    path: path.to_owned(),
                    line,
                    expected: header.len(),
                    got: record.len(),
                });
            }
            for (index, cell) in record.iter().enumerate() {
                if index == target_index && task == Task::Classification {
                    labels.push(ClassLabel::from_cell(cell));
                    continue;
                }
                let value = cell
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| DatasetError::NotANumber {
                        path: path.to_owned(),
                        line,
                        column: header[index].clone(),
                        value: cell.to_owned(),
                    })?;
                if index == target_index {
                    targets.push(value);
                } else {
                    features.push(value);
                }
            }
        }
        let classes = (task == Task::Classification).then(|| {
            let mut classes = labels.clone();
            classes.sort_unstable();
            classes.dedup();
            targets = labels
                .iter()
                .map(|label| classes.binary_search(label).unwrap_or(0) as f64)
                .collect();
            classes
        });
        if targets.is_empty() {
            return Err(DatasetError::Empty {
                path: path.to_owned(),
            });
        }
        let target_name = header[target_index].clone();
        let feature_names = header
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != target_index)
            .map(|(_, name)| name)
            .collect();
        Ok(Self {
            feature_names,
            target_name,
            features,
            targets,
            classes,
        })
    }

    /// A data set of rows already in memory: `features` row-major, one row per target. `None`
    /// when the shapes do not fit (no feature names, or a length that is not rows × features).
    pub fn from_rows(
        feature_names: Vec<String>,
        target_name: String,
        features: Vec<f64>,
        targets: Vec<f64>,
    ) -> Option<Self> {
        (!feature_names.is_empty() && features.len() == targets.len() * feature_names.len())
            .then_some(Self {
                feature_names,
                target_name,
                features,
                targets,
                classes: None,
            })
    }

    /// A classification data set of rows already in memory: `features` row-major, one label per
    /// row; its classes are the distinct labels, sorted. `None` when the shapes do not fit.
    pub fn from_labelled_rows(
        feature_names: Vec<String>,
        target_name: String,
        features: Vec<f64>,
        labels: &[ClassLabel],
    ) -> Option<Self> {
        let mut classes = labels.to_vec();
        classes.sort_unstable();
        classes.dedup();
        let targets = labels
            .iter()
            .map(|label| classes.binary_search(label).unwrap_or(0) as f64)
            .collect();
        let mut data = Self::from_rows(feature_names, target_name, features, targets)?;
        data.classes = Some(classes);
        Some(data)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no rows (never true for a loaded data set).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Number of feature columns.
    pub fn n_features(&self) -> usize {
        self.feature_names.len()
    }

    /// The features of row `index`.
    pub fn row(&self, index: usize) -> &[f64] {
        let n = self.n_features();
        &self.features[index * n..(index + 1) * n]
    }

    /// The target of row `index`.
    pub fn target(&self, index: usize) -> f64 {
        self.targets[index]
    }

    /// All features, row-major.
    pub fn features(&self) -> &[f64] {
        &self.features
    }

    /// All targets.
    pub fn targets(&self) -> &[f64] {
        &self.targets
    }

    /// Classification: the distinct labels, sorted; `None` for a regression data set.
    pub fn classes(&self) -> Option<&[ClassLabel]> {
        self.classes.as_deref()
    }

    /// What row `index` is labelled with: its class under classification, else its number.
    pub fn label(&self, index: usize) -> crate::messages::Target {
        match &self.classes {
            Some(classes) => {
                crate::messages::Target::Class(classes[self.targets[index] as usize].clone())
            }
            None => crate::messages::Target::Number(self.targets[index]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn csv_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn target_is_last_column_by_default() {
        let file = csv_file("a,b,y\n1,2,3\n4,5,6\n");
        let data = Dataset::from_csv(file.path(), None).unwrap();
        assert_eq!(data.feature_names, ["a", "b"]);
        assert_eq!(data.target_name, "y");
        assert_eq!(data.row(1), [4.0, 5.0]);
        assert_eq!(data.targets(), [3.0, 6.0]);
    }

    #[test]
    fn an_empty_target_name_means_the_last_column() {
        let file = csv_file("a,b,y\n1,2,3\n");
        let data = Dataset::from_csv(file.path(), Some("")).unwrap();
        assert_eq!(data.target_name, "y");
        assert_eq!(data.feature_names, ["a", "b"]);
    }

    #[test]
    fn target_can_be_named() {
        let file = csv_file("y,a,b\n3,1,2\n");
        let data = Dataset::from_csv(file.path(), Some("y")).unwrap();
        assert_eq!(data.row(0), [1.0, 2.0]);
        assert_eq!(data.target(0), 3.0);
    }

    #[test]
    fn bad_files_say_where() {
        let err = Dataset::from_csv(csv_file("a,y\n1,x\n").path(), None).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(matches!(err, DatasetError::NotANumber { .. }));
        let err = Dataset::from_csv(csv_file("a,y\n1,2,3\n").path(), None).unwrap_err();
        assert!(matches!(err, DatasetError::Ragged { .. }));
        let err = Dataset::from_csv(csv_file("a,y\n").path(), None).unwrap_err();
        assert!(matches!(err, DatasetError::Empty { .. }));
        let err = Dataset::from_csv(csv_file("a,y\n1,2\n").path(), Some("t")).unwrap_err();
        assert!(matches!(err, DatasetError::NoSuchColumn { .. }));
        let err = Dataset::from_csv(Path::new("/nonexistent.csv"), None).unwrap_err();
        assert!(matches!(err, DatasetError::Io { .. }));
    }

    #[test]
    fn a_classification_target_keeps_its_labels_as_the_data_has_them() {
        let file = csv_file("a,species\n1,setosa\n2,virginica\n3,setosa\n");
        let data = Dataset::from_csv_for(file.path(), None, Task::Classification).unwrap();
        assert_eq!(
            data.classes(),
            Some(
                &[
                    ClassLabel::Text("setosa".into()),
                    ClassLabel::Text("virginica".into())
                ][..]
            )
        );
        assert_eq!(data.targets(), [0.0, 1.0, 0.0]);
        assert_eq!(
            data.label(1),
            crate::messages::Target::Class(ClassLabel::Text("virginica".into()))
        );
        let file = csv_file("a,y\n1,1\n2,0\n");
        let data = Dataset::from_csv_for(file.path(), None, Task::Classification).unwrap();
        assert_eq!(
            data.label(0),
            crate::messages::Target::Class(ClassLabel::Integer(1))
        );
        // Regression reads the same file's labels as numbers, and refuses text.
        assert_eq!(
            Dataset::from_csv(file.path(), None).unwrap().label(0),
            crate::messages::Target::Number(1.0)
        );
        let text = csv_file("a,species\n1,setosa\n");
        assert!(matches!(
            Dataset::from_csv(text.path(), None),
            Err(DatasetError::NotANumber { .. })
        ));
    }

    #[test]
    fn labelled_rows_make_a_classification_data_set() {
        let labels = [
            ClassLabel::Text("b".into()),
            ClassLabel::Text("a".into()),
            ClassLabel::Text("b".into()),
        ];
        let data =
            Dataset::from_labelled_rows(vec!["x".into()], "y".into(), vec![1.0, 2.0, 3.0], &labels)
                .unwrap();
        assert_eq!(data.targets(), [1.0, 0.0, 1.0]);
        assert_eq!(
            data.label(0),
            crate::messages::Target::Class(ClassLabel::Text("b".into()))
        );
        assert!(
            Dataset::from_labelled_rows(vec!["x".into()], "y".into(), vec![1.0], &labels).is_none()
        );
    }

    #[test]
    fn shipped_diabetes_has_442_rows() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        let data = Dataset::from_csv(&path, None).unwrap();
        assert_eq!(data.len(), 442);
        assert_eq!(data.n_features(), 10);
        assert_eq!(data.target(441), 57.0);
    }
}
