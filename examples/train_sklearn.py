#!/usr/bin/env python3
"""A TRAIN_COMMAND for the trainer: a scikit-learn Pipeline (a scaler, then a
gradient-boosted regressor, or classifier) fitted on the trainer's window and exported to ONNX.

The trainer runs it with (see docs/closed-loop.md, "Your own training code"):
  TRAIN_DATA     the window's older rows as CSV: a header of feature names, then the target column
  TRAIN_TARGET   the target column's name (the last column of TRAIN_DATA)
  TRAIN_OUTPUT   where to write the .onnx
  TRAIN_VERSION  the version the candidate will carry (the trainer stamps it; shown for logs)
  TRAIN_TASK     regression, or classification (the target column holds class labels: a
                 gradient-boosted classifier, exported without ZipMap)
and evaluates the .onnx itself on the newest rows, which this script never sees.

Export settings (measured in docs/own-model.md): double input, the scaler in double, then a cast
to float32 before the trees, which is what scikit-learn's trees compare against.

Tuning for tests, by environment: TRAIN_ESTIMATORS (default 100), TRAIN_SLEEP_SECS (sleep first,
to play a hanging command), TRAIN_FAIL=1 (exit 3 after printing to stderr), TRAIN_GARBAGE=1
(write bytes that are not ONNX), TRAIN_WORSE=1 (fit on shuffled targets: a worse model).
"""

import csv
import os
import sys
import time

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx
from skl2onnx.common.data_types import DoubleTensorType
from skl2onnx.sklapi import CastTransformer

# The opset the fixtures use (tests/models/make_fixtures.py).
OPSET = {"": 22, "ai.onnx.ml": 3}


def main():
    data, target, output = (os.environ[k] for k in ("TRAIN_DATA", "TRAIN_TARGET", "TRAIN_OUTPUT"))
    time.sleep(float(os.environ.get("TRAIN_SLEEP_SECS", "0")))
    if os.environ.get("TRAIN_FAIL") == "1":
        print("train_sklearn.py: failing on purpose (TRAIN_FAIL=1)", file=sys.stderr)
        sys.exit(3)
    if os.environ.get("TRAIN_GARBAGE") == "1":
        with open(output, "wb") as f:
            f.write(b"this is not an ONNX graph")
        return

    with open(data) as f:
        header = f.readline().strip().split(",")
    if header[-1] != target:
        sys.exit(f"train_sklearn.py: the last column of {data} is {header[-1]!r}, not {target!r}")
    classify = os.environ.get("TRAIN_TASK") == "classification"
    if classify:
        # Labels as the data has them: integers stay integers, anything else is a string.
        with open(data, newline="") as f:
            rows = list(csv.reader(f))[1:]
        x = np.array([[float(v) for v in row[:-1]] for row in rows])
        labels = [row[-1] for row in rows]
        try:
            y = np.array([int(v) for v in labels], dtype=np.int64)
        except ValueError:
            y = np.array(labels)
    else:
        table = np.loadtxt(data, delimiter=",", skiprows=1, ndmin=2)
        x, y = table[:, :-1], table[:, -1]
    if os.environ.get("TRAIN_WORSE") == "1":
        y = np.random.default_rng(0).permutation(y)

    estimators = int(os.environ.get("TRAIN_ESTIMATORS", "100"))
    model = (
        GradientBoostingClassifier(n_estimators=estimators, random_state=0)
        if classify
        else GradientBoostingRegressor(n_estimators=estimators, random_state=0)
    )
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("cast", CastTransformer(dtype=np.float32)),
            ("model", model),
        ]
    ).fit(x, y)
    onx = to_onnx(
        pipe,
        initial_types=[("input", DoubleTensorType([None, x.shape[1]]))],
        target_opset=OPSET,
        # A label tensor and a probability tensor, which the model service reads directly.
        options={id(model): {"zipmap": False}} if classify else None,
    )
    # Written whole, then renamed: the trainer never reads half a file.
    partial = output + ".partial"
    with open(partial, "wb") as f:
        f.write(onx.SerializeToString())
    os.replace(partial, output)
    print(f"train_sklearn.py: {len(y)} rows, {x.shape[1]} features -> {output}")


if __name__ == "__main__":
    main()
