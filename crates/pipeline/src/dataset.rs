//! Loading a numeric CSV data set: one header row, feature columns, and a target column (the last
//! one, or the one named by `TARGET_COLUMN`). Used by the producer and by the model's training.

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
    targets: Vec<f64>,
}

impl Dataset {
    /// Reads `path`. The target is the column named `target_column`, or the last column when it
    /// is `None` or empty: every `TARGET_COLUMN` and `--target` comes here, and compose passes the
    /// variable empty when it is not set (clap hands an empty value on as `Some("")`).
    pub fn from_csv(path: &Path, target_column: Option<&str>) -> Result<Self, DatasetError> {
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
            })
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
    fn shipped_diabetes_has_442_rows() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/diabetes.csv");
        let data = Dataset::from_csv(&path, None).unwrap();
        assert_eq!(data.len(), 442);
        assert_eq!(data.n_features(), 10);
        assert_eq!(data.target(441), 57.0);
    }
}
