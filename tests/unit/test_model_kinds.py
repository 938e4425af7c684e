"""Model kinds beyond plain gbtree (issue 12): vector-leaf trees, early stopping's rounds,
binary decision rules per objective, gblinear and legacy binary files refused with a fix."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes

from treeserve.errors import UploadRejected
from treeserve.model import decision
from treeserve.model.package import read_upload
from treeserve.model.predictor import Predictor
from treeserve.model.sandbox import check_trees, model_facts
from treeserve.monitoring import pipeline as monitoring
from treeserve.refresh import gate


@pytest.fixture(scope="module")
def cancer() -> tuple[pd.DataFrame, pd.Series]:
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    return X, y


def _json_doc(model: Any) -> dict[str, Any]:
    raw = model.get_booster().save_raw("json")
    doc: dict[str, Any] = json.loads(bytes(raw))
    return doc


@pytest.fixture(scope="module")
def vector_leaf_doc() -> dict[str, Any]:
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    Y = pd.DataFrame({"a": y, "b": -y})
    model = xgb.XGBRegressor(
        n_estimators=3, max_depth=2, tree_method="hist", multi_strategy="multi_output_tree"
    ).fit(X, Y)
    return _json_doc(model)


def _served(upload: Any) -> Predictor:
    manifest = upload.to_manifest("m")
    return Predictor.load(upload.model_ubj, manifest)


def test_vector_leaf_trees_pass_the_structural_checks(vector_leaf_doc: dict[str, Any]) -> None:
    facts = model_facts(vector_leaf_doc)
    assert facts["vector_leaf"]
    assert facts["num_target"] == 2
    check_trees(vector_leaf_doc, facts["num_features"], 2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["right_children"].__setitem__(-1, 10_000), "outside leaf_weights"),
        (lambda t: t["right_children"].__setitem__(-1, -5), "outside leaf_weights"),
        (lambda t: t["leaf_weights"].pop(), "whole number of leaf vectors"),
        (lambda t: t["tree_param"].__setitem__("size_leaf_vector", "3"), "3 values"),
        (lambda t: t["right_children"].__setitem__(0, -1), "only one child"),
    ],
)
def test_vector_leaf_trees_that_point_out_of_bounds_are_refused(
    vector_leaf_doc: dict[str, Any], edit: Any, message: str
) -> None:
    doc = json.loads(json.dumps(vector_leaf_doc))
    edit(doc["learner"]["gradient_booster"]["model"]["trees"][0])
    with pytest.raises(ValueError, match=message):
        check_trees(doc, 10, 2)


def test_a_best_iteration_beyond_the_rounds_is_refused(
    cancer: tuple[pd.DataFrame, pd.Series],
) -> None:
    X, y = cancer
    model = xgb.XGBClassifier(n_estimators=4, max_depth=2).fit(X, y)
    booster = model.get_booster()
    booster.set_attr(best_iteration="9")
    with pytest.raises(UploadRejected, match="beyond the model's 4 boosting rounds") as info:
        read_upload(bytes(booster.save_raw("ubj")), "model.ubj")
    assert info.value.code == "corrupt"


def test_the_early_stopped_rounds_are_what_is_served(
    cancer: tuple[pd.DataFrame, pd.Series],
) -> None:
    X, y = cancer
    model = xgb.XGBClassifier(n_estimators=200, early_stopping_rounds=3, learning_rate=0.5)
    model.fit(X[:400], y[:400], eval_set=[(X[400:], y[400:])], verbose=False)
    upload = read_upload(bytes(model.get_booster().save_raw("ubj")), "model.ubj")
    assert upload.to_manifest("m").iteration_range == [0, model.best_iteration + 1]
    predictor = _served(upload)
    rows = X[400:].to_numpy(np.float32)
    assert predictor._dense is not None  # the direct C call, with the iteration range
    assert np.array_equal(predictor.predict(rows).values, model.predict_proba(X[400:])[:, 1])
    every_round = model.get_booster().inplace_predict(rows, iteration_range=(0, 0))
    assert not np.array_equal(predictor.predict(rows).values, every_round)


@pytest.mark.parametrize("threshold", [None, 0.3, 0.7])
def test_logitraw_labels_are_decided_on_the_margin(
    cancer: tuple[pd.DataFrame, pd.Series], threshold: float | None
) -> None:
    X, y = cancer
    model = xgb.XGBClassifier(objective="binary:logitraw", n_estimators=5, max_depth=2)
    model.fit(X, y)
    upload = read_upload(bytes(model.get_booster().save_raw("ubj")), "model.ubj")
    manifest = upload.to_manifest("m")
    manifest.threshold = threshold if threshold is not None else manifest.threshold
    predictor = Predictor.load(upload.model_ubj, manifest)
    rows = X.to_numpy(np.float32)
    served = predictor.predict(rows)
    margin = model.predict(X, output_margin=True)
    probability = 1.0 / (1.0 + np.exp(-margin.astype(np.float64)))
    p = 0.5 if threshold is None else threshold
    assert served.labels == (probability > p).astype(int).tolist()
    assert decision.value_cut("binary:logitraw", p) == pytest.approx(math.log(p / (1 - p)))
    # Monitoring's accuracy and the gate's count the labels that were served.
    truth = y.to_numpy(np.float64)
    want = float(np.mean(np.asarray(served.labels) == truth))
    perf = monitoring.performance("binary", truth, served.values, p, "binary:logitraw")
    assert perf["accuracy"] == pytest.approx(want)
    outputs = gate.model_outputs(upload.model_ubj, rows.astype(np.float64), "binary")
    metrics = gate.score("binary", truth, outputs, "binary:logitraw", p)
    assert metrics["accuracy"] == pytest.approx(want)
    assert perf["log_loss"] == pytest.approx(metrics["logloss"], rel=1e-5)


def test_hinge_labels_are_its_outputs_whatever_the_threshold(
    cancer: tuple[pd.DataFrame, pd.Series],
) -> None:
    X, y = cancer
    model = xgb.XGBClassifier(objective="binary:hinge", n_estimators=5, max_depth=2).fit(X, y)
    upload = read_upload(bytes(model.get_booster().save_raw("ubj")), "model.ubj")
    manifest = upload.to_manifest("m")
    manifest.threshold = 0.9
    served = Predictor.load(upload.model_ubj, manifest).predict(X.to_numpy(np.float32))
    assert served.labels == model.predict(X).tolist()
    truth = y.to_numpy(np.float64)
    outputs = gate.model_outputs(upload.model_ubj, X.to_numpy(np.float64), "binary")
    accuracy = gate.score("binary", truth, outputs, "binary:hinge", 0.9)["accuracy"]
    assert accuracy == pytest.approx(float(np.mean(model.predict(X) == truth)))


def test_gblinear_is_refused_with_what_to_do(cancer: tuple[pd.DataFrame, pd.Series]) -> None:
    X, y = cancer
    model = xgb.XGBClassifier(booster="gblinear", n_estimators=3).fit(X, y)
    with pytest.raises(UploadRejected) as info:
        read_upload(bytes(model.get_booster().save_raw("ubj")), "linear.ubj")
    assert info.value.code == "unsupported_booster"
    assert "gblinear" in str(info.value)
    assert "booster='gbtree'" in str(info.value)
    assert "Booster.predict" in str(info.value)


def _legacy_binary(objective: bytes, booster: bytes, tag: bytes = b"") -> bytes:
    # XGBoost < 2's binary layout (checked against a file Booster.save_model('m.bin') wrote with
    # xgboost 1.7.6): an optional "binf" tag, LearnerModelParamLegacy (136 bytes: base_score,
    # num_feature, num_class, ...), then the objective's and the booster's names as dmlc strings.
    param = struct.pack("<fIi", 0.5, 30, 0) + b"\0" * (136 - 12)
    names = b"".join(struct.pack("<Q", len(s)) + s for s in (objective, booster))
    return tag + param + names + b"\0" * 64


@pytest.mark.parametrize("tag", [b"", b"binf"])
def test_a_legacy_binary_model_is_named_and_the_fix_given(tag: bytes) -> None:
    with pytest.raises(UploadRejected) as info:
        read_upload(_legacy_binary(b"binary:logistic", b"gbtree", tag), "model.bin")
    message = str(info.value)
    assert info.value.code == "unknown_format"
    assert "legacy binary format" in message
    assert "before 3.1" in message
    assert "save_model('model.ubj')" in message


def test_other_bytes_are_not_called_a_legacy_model() -> None:
    with pytest.raises(UploadRejected) as info:
        read_upload(b"\x01\x02" * 200, "noise.bin")
    assert "legacy" not in str(info.value)
