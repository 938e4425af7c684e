"""Issue 13: crafted models refused statically, before XGBoost loads them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel
from tests.corpus import chain_tree_model, edited_model, make_package
from treeserve.errors import UploadRejected
from treeserve.model.package import read_upload
from treeserve.model.sandbox import MAX_TREE_DEPTH

pytestmark = pytest.mark.unit


def _refused(data: bytes, filename: str = "model.json") -> UploadRejected:
    with pytest.raises(UploadRejected) as info:
        read_upload(data, filename)
    return info.value


def _trees(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["learner"]["gradient_booster"]["model"]["trees"]  # type: ignore[no-any-return]


def test_row3_a_tree_deeper_than_the_bound_is_refused(binary_model: TrainedModel) -> None:
    err = _refused(chain_tree_model(binary_model, MAX_TREE_DEPTH + 1))
    assert err.code == "too_deep"
    assert "max_depth" in err.message


def test_row6_a_nan_leaf_no_smoke_row_reaches_is_refused(binary_model: TrainedModel) -> None:
    def edit(doc: dict[str, Any]) -> None:
        tree = _trees(doc)[0]
        tree["split_conditions"][0] = 1e30  # only huge feature-0 values go right
        right = tree["right_children"][0]
        tree["split_conditions"][right] = float("nan")

    err = _refused(edited_model(binary_model, edit))
    assert err.code == "non_finite"
    assert "retrain" in err.message


@pytest.mark.parametrize("name", ["f[0]", "f<1", "f1"])
def test_row5_feature_names_xgboost_refuses(binary_model: TrainedModel, name: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["learner"]["feature_names"][0] = name

    err = _refused(edited_model(binary_model, edit))
    assert err.code == "bad_feature_names"
    assert "rename" in err.message


def test_row11_declared_types_the_splits_contradict(binary_model: TrainedModel) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["learner"]["feature_types"] = []

    model = TrainedModel(
        xgb.Booster(model_file=bytearray(edited_model(binary_model, edit))),
        binary_model.X,
        binary_model.y,
        binary_model.feature_names,
        binary_model.objective,
    )
    package = make_package(model, manifest={"feature_types": ["c"] * 6})
    err = _refused(package, "model.tar.gz")
    assert err.code == "manifest_mismatch"
    assert "split numerically but declared 'c'" in err.message


def test_row1_a_huge_category_code_is_refused() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"a": pd.Categorical(rng.choice(list("xyz"), 300)), "b": rng.normal(size=300)}
    )
    y = (df["a"] == "x") ^ (df["b"] > 0)
    clf = xgb.XGBClassifier(enable_categorical=True, n_estimators=3, max_depth=2).fit(df, y)
    doc = json.loads(bytes(clf.get_booster().save_raw("json")))
    for tree in _trees(doc):
        tree["categories"] = [1 << 30 for _ in tree["categories"]]
    err = _refused(json.dumps(doc).encode())
    assert err.code == "bad_category"
    assert "pandas category" in err.message
