#!/usr/bin/env python3
"""Builds the ONNX test fixtures: diabetes regressors exported from scikit-learn,
sklearn's own predictions for each (<name>.expected.csv), deliberately broken
models for the loader's refusal tests, and agreement.txt (onnxruntime vs sklearn).
Classifiers too: breast cancer and iris models, the rows they are fed
(breast_cancer.csv, iris.csv), sklearn's labels and probabilities for each row
(<name>.expected.csv) and classifier_agreement.txt.

Usage: python3 tests/models/make_fixtures.py [OUT_DIR]   (default tests/models/fixtures)
Needs tests/models/requirements-fixtures.txt. Deterministic; runs in a few seconds.
"""

import os
import re
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from skl2onnx.sklapi import CastTransformer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
TARGET = "target"
N_FEATURES = len(FEATURES)
# One opset for every export: the newest skl2onnx has tested, and the
# TreeEnsembleRegressor form of ai.onnx.ml that onnxmltools' XGBoost converter emits.
OPSET = {"": 22, "ai.onnx.ml": 3}
# Hand-built graphs: an IR version and opset every ONNX Runtime since 1.16 reads.
HAND_OPSET = [helper.make_opsetid("", 18)]
HAND_IR = 9


def load_data():
    """sklearn's bundled (scaled) diabetes set; must equal data/diabetes.csv row for row."""
    frame = load_diabetes(as_frame=True).frame
    assert list(frame.columns) == FEATURES + [TARGET], list(frame.columns)
    x = frame[FEATURES].to_numpy(dtype=np.float64)
    y = frame[TARGET].to_numpy(dtype=np.float64)
    csv = os.path.join(REPO, "data", "diabetes.csv")
    if os.path.exists(csv):
        # The Rust side feeds data/diabetes.csv; the expected predictions are only
        # valid if it is the very same table, bit for bit.
        with open(csv) as f:
            header = f.readline().strip().split(",")
        assert header == FEATURES + [TARGET], f"{csv} header {header}"
        table = np.loadtxt(csv, delimiter=",", skiprows=1)
        assert np.array_equal(table, np.column_stack([x, y])), f"{csv} differs from sklearn's data"
    return x, y


def tag(model, version):
    """The metadata the Rust loader checks: feature order, target, model version."""
    helper.set_model_props(
        model,
        {"feature_names": ",".join(FEATURES), "target_name": TARGET, "version": version},
    )
    return model


def save(model, out, name):
    # skl2onnx lists opsets in set order, which follows Python's per-run string hashing;
    # sorting them keeps the bytes identical from run to run.
    opsets = sorted(model.opset_import, key=lambda o: o.domain)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    path = os.path.join(out, name + ".onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def write_expected(out, name, pred):
    # repr keeps every digit, so the Rust comparison sees sklearn's exact float64.
    with open(os.path.join(out, name + ".expected.csv"), "w") as f:
        f.write("id,prediction\n")
        for i, p in enumerate(pred):
            f.write(f"{i},{float(p)!r}\n")


def ort_predict(path, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x})
    return out.reshape(-1).astype(np.float64), out.dtype


def tree_pipeline(model, cast=True):
    # The cast makes the ONNX trees see float32 exactly as sklearn's trees do internally
    # (sklearn casts X to float32 before comparing with the thresholds).
    steps = [("scaler", StandardScaler())]
    if cast:
        steps.append(("cast", CastTransformer(dtype=np.float32)))
    steps.append(("model", model))
    return Pipeline(steps)


def export(pipe, x, input_type):
    return to_onnx(pipe, initial_types=[("input", input_type([None, N_FEATURES]))], target_opset=OPSET)


def register_xgboost():
    """Teaches skl2onnx to convert XGBRegressor inside a Pipeline; None if xgboost is absent."""
    try:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from skl2onnx import update_registered_converter
        from skl2onnx.common.shape_calculator import calculate_linear_regressor_output_shapes
        from xgboost import XGBRegressor
    except ImportError as e:
        print(f"xgboost skipped: {e}")
        return None
    update_registered_converter(
        XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes, convert_xgboost
    )
    return XGBRegressor


def hand_model(nodes, inputs, outputs, initializers=(), name="fixture"):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=HAND_OPSET, ir_version=HAND_IR)
    onnx.checker.check_model(model)
    return model


def bad_fixtures(out, gbr_path, x, y):
    """Models the loader must refuse (or, for float32_default, must be caught by agreement)."""
    with open(gbr_path, "rb") as f:
        data = f.read()
    with open(os.path.join(out, "truncated.onnx"), "wb") as f:
        f.write(data[: len(data) // 2])

    rows = [None, N_FEATURES]
    dbl_in = helper.make_tensor_value_info("input", TensorProto.DOUBLE, rows)

    two = hand_model(
        [helper.make_node("Add", ["a", "b"], ["variable"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, rows),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, rows)],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, rows)],
    )
    save(tag(two, "two_inputs-1"), out, "two_inputs")

    strings = hand_model(
        [helper.make_node("Identity", ["input"], ["variable"])],
        [helper.make_tensor_value_info("input", TensorProto.STRING, rows)],
        [helper.make_tensor_value_info("variable", TensorProto.STRING, rows)],
    )
    save(tag(strings, "string_input-1"), out, "string_input")

    # Row sums times NaN: the right shape [N,1] and type, but every answer is NaN.
    nan = hand_model(
        [helper.make_node("ReduceSum", ["input", "axes"], ["sum"], keepdims=1),
         helper.make_node("Mul", ["sum", "nan"], ["variable"])],
        [dbl_in],
        [helper.make_tensor_value_info("variable", TensorProto.DOUBLE, [None, 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
         helper.make_tensor("nan", TensorProto.DOUBLE, [1], [float("nan")])],
    )
    save(tag(nan, "nan_output-1"), out, "nan_output")

    # Three answers per row where the loader expects one.
    wide = hand_model(
        [helper.make_node("MatMul", ["input", "w"], ["variable"])],
        [dbl_in],
        [helper.make_tensor_value_info("variable", TensorProto.DOUBLE, [None, 3])],
        [helper.make_tensor("w", TensorProto.DOUBLE, [N_FEATURES, 3], [0.1] * (N_FEATURES * 3))],
    )
    save(tag(wide, "wrong_shape-1"), out, "wrong_shape")

    # The usual export: float32 input, so the scaler runs in float32 and rows near a
    # threshold can fall on the other side of it. Loads fine; answers drift from sklearn.
    rf = RandomForestRegressor(n_estimators=50, random_state=0, max_depth=8)
    pipe = tree_pipeline(rf, cast=False).fit(x, y)
    model = tag(export(pipe, x.astype(np.float32), FloatTensorType), "float32_default-1")
    save(model, out, "float32_default")
    write_expected(out, "float32_default", pipe.predict(x))

    # Trees fed double with no cast: either skl2onnx or ONNX Runtime is expected to balk.
    rf = RandomForestRegressor(n_estimators=5, random_state=0, max_depth=4)
    pipe = tree_pipeline(rf, cast=False).fit(x, y)
    try:
        model = tag(export(pipe, x, DoubleTensorType), "double_trees-1")
        save(model, out, "double_trees")
    except Exception as e:  # noqa: BLE001 - any converter refusal means there is no fixture
        print(f"double_trees skipped, skl2onnx refused: {type(e).__name__}: {e}")


def sanitize(name):
    """A feature name as the pipeline's CSV and metadata carry it: `mean radius` -> `mean_radius`."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def write_rows(out, name, features, x, target, labels):
    """The rows the Rust tests feed: feature columns, then the label column."""
    with open(os.path.join(out, name + ".csv"), "w") as f:
        f.write(",".join(features + [target]) + "\n")
        for row, label in zip(x, labels):
            f.write(",".join([repr(float(v)) for v in row] + [str(label)]) + "\n")


def write_classes_expected(out, name, classes, labels, proba):
    # The columns follow the model's class order (classes_), as its probability output does.
    with open(os.path.join(out, name + ".expected.csv"), "w") as f:
        f.write(",".join(["label"] + [f"p_{c}" for c in classes]) + "\n")
        for label, row in zip(labels, proba):
            f.write(",".join([str(label)] + [repr(float(p)) for p in row]) + "\n")


def ort_classify(path, x, classes):
    """onnxruntime's labels and probabilities; a ZipMap's list of dicts is put in class order."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    label, proba = sess.run(None, {sess.get_inputs()[0].name: x})[:2]
    if isinstance(proba, list):
        proba = np.array([[row[c] for c in classes] for row in proba])
    return label, np.asarray(proba, dtype=np.float64)


def classifier_fixtures(out):
    """Classifiers exported without ZipMap (a label tensor and a [N, C] probability tensor), one
    with it, and one whose classes live only in an initializer (double input)."""
    cancer = load_breast_cancer()
    cancer_names = [sanitize(n) for n in cancer.feature_names]
    cancer_x = cancer.data.astype(np.float64)
    cancer_y = cancer.target.astype(np.int64)
    write_rows(out, "breast_cancer", cancer_names, cancer_x, TARGET, cancer_y)
    iris = load_iris()
    iris_names = [sanitize(n) for n in iris.feature_names]
    iris_x = iris.data.astype(np.float64)
    iris_y = np.array([str(iris.target_names[t]) for t in iris.target])
    write_rows(out, "iris", iris_names, iris_x, TARGET, iris_y)

    def logreg():
        return Pipeline([("scaler", StandardScaler()), ("model", LogisticRegression(max_iter=1000))])

    # name: (model, data, input type, skl2onnx options)
    nozip = {"zipmap": False}
    models = {
        "breast_cancer_logreg": (logreg(), "cancer", FloatTensorType, {LogisticRegression: nozip}),
        "breast_cancer_gbc": (
            GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=0),
            "cancer", FloatTensorType, "direct"),
        "iris_strings": (logreg(), "iris", FloatTensorType, {LogisticRegression: nozip}),
        "iris_zipmap": (logreg(), "iris", FloatTensorType, None),
        "iris_double": (logreg(), "iris", DoubleTensorType, {LogisticRegression: nozip}),
    }
    data = {"cancer": (cancer_names, cancer_x, cancer_y), "iris": (iris_names, iris_x, iris_y)}
    lines = ["# onnxruntime (1 thread) vs scikit-learn predict() and predict_proba(), every row",
             "# model input rows labels_equal max_abs_diff_probability"]
    for name, (clf, which, input_type, options) in models.items():
        features, x, y = data[which]
        clf.fit(x, y)
        if options == "direct":
            options = {id(clf): nozip}
        model = to_onnx(clf, initial_types=[("input", input_type([None, len(features)]))],
                        target_opset=OPSET, options=options)
        helper.set_model_props(
            model, {"feature_names": ",".join(features), "target_name": TARGET, "version": f"{name}-1"})
        path = save(model, out, name)
        classes = list(clf.classes_)
        labels, proba = clf.predict(x), clf.predict_proba(x)
        write_classes_expected(out, name, classes, labels, proba)
        fed = x.astype(np.float32) if input_type is FloatTensorType else x
        got_labels, got_proba = ort_classify(path, fed, classes)
        equal = int((np.asarray(got_labels) == labels).sum())
        line = (f"{name} {'float' if input_type is FloatTensorType else 'double'} {len(x)} {equal} "
                f"{np.abs(got_proba - proba).max():.6e}")
        print(line)
        lines.append(line)

    # A classifier graph that names no classes: ArgMax over softmax scores.
    n = len(iris_names)
    scores = hand_model(
        [helper.make_node("MatMul", ["input", "w"], ["scores"]),
         helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [n, 3], [0.1 * (i % 7) for i in range(n * 3)])],
    )
    helper.set_model_props(
        scores, {"feature_names": ",".join(iris_names), "target_name": TARGET, "version": "no_classes-1"})
    save(scores, out, "no_classes")

    with open(os.path.join(out, "classifier_agreement.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "tests", "models", "fixtures")
    os.makedirs(out, exist_ok=True)
    start = time.time()
    x, y = load_data()

    good = {
        "linear": (Pipeline([("scaler", StandardScaler()), ("model", LinearRegression())]), False),
        "gbr": (tree_pipeline(GradientBoostingRegressor(n_estimators=100, random_state=0)), True),
        "rf": (tree_pipeline(RandomForestRegressor(n_estimators=50, random_state=0, max_depth=8)), True),
    }
    xgb = register_xgboost()
    if xgb is not None:
        # n_jobs=1 and a fixed seed keep the boosted trees identical from run to run.
        model = xgb(n_estimators=100, max_depth=4, learning_rate=0.1, random_state=0, n_jobs=1)
        good["xgb"] = (tree_pipeline(model), True)

    lines = ["# onnxruntime (float64 input, 1 thread) vs scikit-learn predict(), 442 rows",
             "# model output_type max_abs_diff max_rel_diff"]
    for name, (pipe, _) in good.items():
        pipe.fit(x, y)
        model = tag(export(pipe, x, DoubleTensorType), f"{name}-1")
        path = save(model, out, name)
        want = pipe.predict(x)
        write_expected(out, name, want)
        got, dtype = ort_predict(path, x)
        diff = np.abs(got - want)
        line = f"{name} {dtype} {diff.max():.6e} {(diff / np.abs(want)).max():.6e}"
        print(line)
        lines.append(line)

    bad_fixtures(out, os.path.join(out, "gbr.onnx"), x, y)
    got, dtype = ort_predict(os.path.join(out, "float32_default.onnx"), x.astype(np.float32))
    want = np.loadtxt(os.path.join(out, "float32_default.expected.csv"), delimiter=",", skiprows=1)[:, 1]
    diff = np.abs(got - want)
    line = (f"float32_default {dtype} {diff.max():.6e} {(diff / np.abs(want)).max():.6e}"
            f" (float32 input; {int((diff > 1e-3).sum())} rows off by more than 1e-3)")
    print(line)
    lines.append(line)

    with open(os.path.join(out, "agreement.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    classifier_fixtures(out)
    print(f"fixtures written to {out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
