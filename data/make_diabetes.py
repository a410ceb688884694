"""Write the diabetes dataset as CSV, plus scikit-learn OLS fixtures for tests.

Run from the repository root:

    python3 data/make_diabetes.py

It writes:

* ``data/diabetes.csv`` -- the 442 rows of ``sklearn.datasets.load_diabetes()``
  (default, scaled features): a header ``age,sex,bmi,bp,s1,...,s6,target``
  and every value written with ``repr`` so it reads back as exactly the same
  float.
* ``crates/model/tests/fixtures/tiny.csv`` -- a hand-made 6-row CSV.
* ``crates/model/tests/fixtures/sklearn_diabetes_ols.json`` and
  ``crates/model/tests/fixtures/sklearn_tiny_ols.json`` -- what
  ``LinearRegression().fit(X, y)`` gives on the numbers read back from each
  CSV: coefficients, intercept, in-sample R² and MAE, and the predictions for
  the first five rows.
"""

import csv
import json
from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, r2_score

ROOT = Path(__file__).resolve().parent.parent
DIABETES_CSV = "data/diabetes.csv"
FIXTURES = "crates/model/tests/fixtures"
TINY_CSV = f"{FIXTURES}/tiny.csv"

# Hand-made, non-collinear: y is roughly 1 + 1.5*x1 + 0.5*x2 plus some noise.
TINY_HEADER = ["x1", "x2", "y"]
TINY_ROWS = [
    [1.0, 2.0, 3.4],
    [2.0, 1.0, 4.1],
    [3.0, 5.0, 8.2],
    [4.0, 3.0, 8.4],
    [5.0, 6.0, 11.3],
    [6.0, 4.0, 11.6],
]


def write_csv(path, header, rows):
    with open(ROOT / path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([repr(float(v)) for v in row])


def read_csv(path):
    """Read a CSV back: last column is the target, the rest are features."""
    with open(ROOT / path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [[float(v) for v in row] for row in reader]
    values = np.array(rows, dtype=np.float64)
    return header, values[:, :-1], values[:, -1]


def write_fixture(csv_path, fixture_path):
    _, X, y = read_csv(csv_path)
    model = LinearRegression().fit(X, y)
    pred = model.predict(X)
    fixture = {
        "sklearn_version": sklearn.__version__,
        "data": csv_path,
        "rows": len(y),
        "coefficients": [float(c) for c in model.coef_],
        "intercept": float(model.intercept_),
        "r2": float(r2_score(y, pred)),
        "mae": float(mean_absolute_error(y, pred)),
        "predictions_first5": [float(p) for p in pred[:5]],
    }
    with open(ROOT / fixture_path, "w") as f:
        json.dump(fixture, f, indent=2)
        f.write("\n")
    return fixture


def main():
    diabetes = load_diabetes()  # scaled features, as sklearn ships them
    header = list(diabetes.feature_names) + ["target"]
    assert header == ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "target"]
    rows = np.column_stack([diabetes.data, diabetes.target])
    write_csv(DIABETES_CSV, header, rows)

    # The file must read back as exactly the same floats.
    read_header, X, y = read_csv(DIABETES_CSV)
    assert read_header == header
    assert X.shape == (442, 10)
    assert np.array_equal(X, diabetes.data)
    assert np.array_equal(y, diabetes.target)

    (ROOT / FIXTURES).mkdir(parents=True, exist_ok=True)
    write_csv(TINY_CSV, TINY_HEADER, TINY_ROWS)

    for csv_path, name in [(DIABETES_CSV, "diabetes"), (TINY_CSV, "tiny")]:
        fixture = write_fixture(csv_path, f"{FIXTURES}/sklearn_{name}_ols.json")
        print(f"{name}: rows={fixture['rows']} r2={fixture['r2']!r} mae={fixture['mae']!r}")


if __name__ == "__main__":
    main()
