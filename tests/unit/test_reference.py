"""Reference statistics: schema, JSON safety, edge cases, and the model-only reference."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel
from treeserve.model.reference import (
    MIN_QUANTILES,
    MODEL_CHECKS,
    QUANTILE_BUDGET,
    QUANTILES,
    bin_counts,
    compute_reference,
    quantiles_per_column,
    reference_from_model,
)

pytestmark = pytest.mark.unit


def walk_numbers(obj: Any) -> list[float]:
    """Every number in a JSON-like structure."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in walk_numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in walk_numbers(x)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    return [float(obj)]


def assert_json_safe(obj: Any) -> None:
    assert all(math.isfinite(v) for v in walk_numbers(obj))
    # The standard library refuses NaN/inf with allow_nan=False: the dict is plain JSON.
    assert json.loads(json.dumps(obj, allow_nan=False)) == obj


def test_reference_schema_counts_and_quantiles(binary_model: TrainedModel) -> None:
    X = np.vstack([binary_model.X] * 6)  # 2400 rows: more than QUANTILES
    X[::5, 1] = np.nan
    preds = binary_model.booster.inplace_predict(X)
    ref = compute_reference(X, binary_model.feature_names, ["float"] * 6, preds)
    assert_json_safe(ref)
    assert ref["n_rows"] == 2400
    assert ref["counts_exact"] is True
    assert "ks" in ref["checks"]
    for j, feat in enumerate(ref["features"]):
        col = X[:, j].astype(np.float32)
        present = col[~np.isnan(col)]
        edges = np.asarray(feat["edges"], dtype=np.float32)
        assert np.all(np.diff(edges) > 0)
        assert len(feat["counts"]) == edges.size + 1
        assert sum(feat["counts"]) == present.size
        # counts recomputed independently: values <= edge i and > edge i-1
        expected = [
            int(np.sum((present > (edges[i - 1] if i else -np.inf)) & (present <= e)))
            for i, e in enumerate([*edges.tolist(), np.inf])
        ]
        assert feat["counts"] == expected
        assert feat["n_missing"] == int(np.isnan(col).sum())
        assert feat["missing_rate"] == pytest.approx(np.isnan(col).mean())
        assert np.float32(feat["min"]) == present.min()
        assert np.float32(feat["max"]) == present.max()
        quantiles = np.asarray(feat["quantiles"], dtype=np.float32)
        assert quantiles.size == min(QUANTILES, present.size)
        assert np.all(np.diff(quantiles) >= 0)
        assert np.all(np.isin(quantiles, present))
        assert "sample" not in feat
    preds_ref = ref["predictions"]
    assert preds_ref["names"] == ["prediction"]
    assert sum(preds_ref["columns"][0]["counts"]) == 2400


def test_small_reference_keeps_every_value_and_float32_roundtrips(
    binary_model: TrainedModel,
) -> None:
    X = binary_model.X[:50]
    ref = compute_reference(X, binary_model.feature_names, None, None)
    assert ref["predictions"] is None
    quantiles = np.asarray(ref["features"][0]["quantiles"], dtype=np.float32)
    assert np.array_equal(quantiles, np.sort(X[:, 0].astype(np.float32)))
    # Through JSON and back, every float32 value is the same float32 value.
    back = orjson.loads(orjson.dumps(ref))
    assert np.array_equal(np.asarray(back["features"][0]["quantiles"], dtype=np.float32), quantiles)


def test_multiclass_predictions_have_one_column_per_class(multiclass_model: TrainedModel) -> None:
    preds = multiclass_model.booster.inplace_predict(multiclass_model.X)
    ref = compute_reference(multiclass_model.X, multiclass_model.feature_names, None, preds)
    assert ref["predictions"]["names"] == ["prediction[0]", "prediction[1]", "prediction[2]"]
    assert all(sum(c["counts"]) == 400 for c in ref["predictions"]["columns"])


def test_edge_cases_constant_all_missing_one_row() -> None:
    X = np.array([[1.0, np.nan, 3.0], [1.0, np.nan, 4.0]])
    ref = compute_reference(
        X, ["const", "gone", "c"], ["float", "float", "c"], np.array([0.5, 0.5])
    )
    assert_json_safe(ref)
    const, gone, cat = ref["features"]
    assert const["edges"] == [1.0]
    assert const["counts"] == [2, 0]
    assert const["std"] == 0.0
    assert gone["counts"] == [0]
    assert gone["min"] is None
    assert gone["missing_rate"] == 1.0
    assert gone["quantiles"] == []
    assert cat["kind"] == "categorical"
    assert cat["categories"] == [3.0, 4.0]
    assert cat["category_counts"] == [1, 1]
    one = compute_reference(np.array([[2.5]]), ["x"], None, np.array([0.1]))
    assert_json_safe(one)
    assert one["features"][0]["counts"] == [1, 0]


def test_bin_counts_open_outer_bins() -> None:
    edges = np.array([0.0, 1.0], dtype=np.float32)
    values = np.array([-100, 0.0, 0.5, 1.0, 1.5, 1e30], dtype=np.float32)
    assert bin_counts(values, edges).tolist() == [2, 2, 2]


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        compute_reference(np.zeros((3, 2)), ["a"], None, None)


def _dump_thresholds(booster: xgb.Booster, names: list[str]) -> dict[str, set[float]]:
    """Split thresholds per feature from XGBoost's own JSON dump (an independent reader)."""
    found: dict[str, set[float]] = {n: set() for n in names}

    def visit(node: dict[str, Any]) -> None:
        if "split" in node and "split_condition" in node:
            found[node["split"]].add(float(np.float32(node["split_condition"])))
        for child in node.get("children", []):
            visit(child)

    for tree in booster.get_dump(dump_format="json"):
        visit(json.loads(tree))
    return found


def test_reference_from_model_uses_split_thresholds(regression_model: TrainedModel) -> None:
    names = regression_model.feature_names
    ref = reference_from_model(regression_model.ubj(), names, None)
    assert_json_safe(ref)
    assert ref["source"] == "model"
    assert ref["counts_exact"] is False
    assert ref["checks"] == MODEL_CHECKS
    expected = _dump_thresholds(regression_model.booster, names)
    for feat in ref["features"]:
        assert feat["counts"] is None
        assert feat["quantiles"] is None
        assert set(np.asarray(feat["edges"], dtype=np.float32).tolist()) == expected[feat["name"]]
    assert reference_from_model(regression_model.booster, names, None) == ref


def test_reference_from_model_records_split_categories() -> None:
    rng = np.random.default_rng(3)
    cat = rng.integers(0, 6, size=300).astype(float)
    num = rng.normal(size=300)
    y = ((cat == 2) | (cat == 4)).astype(float) + 0.1 * num
    dtrain = xgb.DMatrix(
        np.column_stack([cat, num]),
        label=y,
        feature_names=["colour", "x"],
        feature_types=["c", "q"],
        enable_categorical=True,
    )
    booster = xgb.train(
        {"max_depth": 3, "nthread": 1, "max_cat_to_onehot": 1, "tree_method": "hist"},
        dtrain,
        num_boost_round=5,
    )
    ref = reference_from_model(bytes(booster.save_raw("ubj")), ["colour", "x"], ["c", "q"])
    colour, x = ref["features"]
    assert colour["kind"] == "categorical"
    assert colour["category_counts"] is None
    assert colour["categories"], "the categorical splits name at least one category"
    assert set(colour["categories"]) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    assert x["kind"] == "numeric"


def test_wide_models_share_the_quantile_budget() -> None:
    assert quantiles_per_column(30) == QUANTILES
    assert quantiles_per_column(300) == QUANTILE_BUDGET // 300
    assert quantiles_per_column(10_000) == MIN_QUANTILES
    X = np.random.default_rng(4).normal(size=(3000, 299))
    ref = compute_reference(X, [f"f{j}" for j in range(299)], None, X[:, 0])  # 300 columns
    sizes = {len(f["quantiles"]) for f in ref["features"]}
    sizes.add(len(ref["predictions"]["columns"][0]["quantiles"]))
    assert sizes == {QUANTILE_BUDGET // 300}
    assert len(orjson.dumps(ref)) < 3 << 20
