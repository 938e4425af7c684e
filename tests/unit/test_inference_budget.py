"""Issue 13: no model is promoted whose footprint does not fit the inference function.

The sandbox child measures the load (RSS growth and peak, time) and one explain; the budget is
the inference function's memory (INFERENCE_MEMORY_MB, the template's InferenceMemoryMB). To keep
these tests fast the budget is lowered through the settings instead of building huge models; the
real sizes of the issue run in tests/reliability/test_bad_models.py (``make fuzz``).
"""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel
from tests.corpus import repeated_trees_model
from treeserve.errors import ConfigurationError, UploadRejected
from treeserve.model.package import (
    EXPLAIN_BYTES_PER_VALUE,
    InferenceBudget,
    footprint,
    read_upload,
)
from treeserve.settings import INFERENCE_RUNTIME_MB, Settings

pytestmark = pytest.mark.unit

MiB = 1 << 20


def _budget(memory_mb: int, **settings: int) -> InferenceBudget:
    return InferenceBudget.from_settings(
        Settings("b", inference_memory_mb=memory_mb, **settings)  # type: ignore[arg-type]
    )


def test_the_budget_follows_the_inference_memory() -> None:
    default = InferenceBudget.from_settings(Settings("b"))
    assert default.memory_mb == 1024
    assert default.explain_rows == 1000
    # (1024 MB less 20% headroom, less the runtime) shared by the model serving and the next one
    assert default.model_mb == pytest.approx((1024 * 0.8 - INFERENCE_RUNTIME_MB) / 2)
    assert _budget(2048).model_mb > default.model_mb
    assert _budget(2048, max_rows=10).explain_rows == 10
    assert (
        Settings.from_env({"MODEL_BUCKET": "b", "INFERENCE_MEMORY_MB": "3008"}).inference_memory_mb
        == 3008
    )
    with pytest.raises(ConfigurationError, match="INFERENCE_MEMORY_MB"):
        Settings.from_env({"MODEL_BUCKET": "b", "INFERENCE_MEMORY_MB": "64"})


def test_row2_a_model_too_big_for_the_inference_function_is_refused(
    binary_model: TrainedModel,
) -> None:
    big = repeated_trees_model(binary_model, 4000)
    accepted = read_upload(big, "model.ubj")  # fits 1024 MB
    fp = accepted.footprint
    assert fp is not None
    assert fp["measured"]
    assert fp["loaded_mb"] > 5  # thousands of trees: XGBoost's in-memory trees are measured
    assert fp["peak_mb"] >= fp["load_peak_mb"] >= fp["loaded_mb"]

    small = _budget(340)  # (340 * 0.8 - 256) / 2 = 8 MB for one model
    assert small.model_mb < fp["peak_mb"]
    with pytest.raises(UploadRejected) as info:
        read_upload(big, "model.ubj", budget=small)
    err = info.value
    assert err.code == "too_big_for_inference"
    # The figures, the budget and what to do.
    assert f"{small.model_mb:g} MB" in err.message
    assert "340 MB" in err.message
    assert "fewer or shallower trees" in err.message
    assert "InferenceMemoryMB" in err.message


def test_a_model_whose_worst_explain_does_not_fit_is_refused() -> None:
    """Wide and multiclass: one explain of 1000 rows answers rows x classes x features values."""
    rng = np.random.default_rng(0)
    features, classes = 2000, 30
    X = rng.normal(size=(60, features)).astype(np.float32)
    y = np.arange(60) % classes
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": classes, "max_depth": 1, "nthread": 1},
        xgb.DMatrix(X, label=y),
        num_boost_round=1,
    )
    with pytest.raises(UploadRejected) as info:
        read_upload(bytes(booster.save_raw("ubj")), "model.ubj")
    err = info.value
    assert err.code == "too_big_for_inference"
    assert "one explain of 1000 rows" in err.message
    # Fewer explain rows (a lower MAX_ROWS) make the same model fit.
    upload = read_upload(
        bytes(booster.save_raw("ubj")), "model.ubj", budget=_budget(1024, max_rows=5)
    )
    assert upload.footprint is not None
    assert upload.footprint["explain_rows"] == 5


def test_a_model_too_slow_to_load_is_refused(binary_model: TrainedModel) -> None:
    big = repeated_trees_model(binary_model, 2000)
    with pytest.raises(UploadRejected) as info:
        read_upload(big, "model.ubj", budget=InferenceBudget(load_seconds=1e-6))
    assert info.value.code == "too_slow_to_load"
    assert "cold start" in info.value.message


def test_the_explain_bound() -> None:
    budget = InferenceBudget()
    measured = {"baseline_bytes": 1, "loaded_bytes": 10 * MiB, "load_peak_bytes": 12 * MiB}

    def explain_mb(**kw: int | bool) -> float:
        args = {"model_bytes": 0, "num_features": 10, "num_outputs": 1, "max_depth": 6}
        args.update(kw)
        return float(
            footprint(measured, explainable=True, budget=budget, **args)["explain_peak_mb"]
        )

    # One explain: 1000 rows x (10 features + bias) values.
    assert explain_mb() == pytest.approx(1000 * 11 * EXPLAIN_BYTES_PER_VALUE / MiB + 0.15, abs=0.1)
    assert explain_mb(num_outputs=3) > 2.5 * explain_mb()  # the values, not the input, triple
    # TreeSHAP's path buffer grows with depth squared: a 1000-deep tree costs 8 MB or more.
    assert explain_mb(max_depth=1000) >= 8 * 1002**2 / MiB
    # A request carries at most 6 MB: 100,000 features fit 62 rows, not 1000.
    wide = footprint(
        measured,
        model_bytes=0,
        num_features=100_000,
        num_outputs=1,
        max_depth=6,
        explainable=True,
        budget=budget,
    )
    assert wide["explain_rows"] == (6 * MiB) // 100_000
    # No TreeSHAP for vector-leaf trees: explain answers 422 without computing anything.
    none = footprint(
        measured,
        model_bytes=MiB,
        num_features=10,
        num_outputs=3,
        max_depth=6,
        explainable=False,
        budget=budget,
    )
    assert none["explain_peak_mb"] == 0
    assert none["load_peak_mb"] == 14.0  # the child's peak plus the bytes held twice


def test_the_model_cache_and_the_loading_slot_share_what_the_runtime_leaves() -> None:
    usable = 1024 * 0.8 - INFERENCE_RUNTIME_MB
    # Unset: half each, the figure of one model in service and one loading.
    default = Settings.from_env({"MODEL_BUCKET": "b"})
    assert default.cache_mb == pytest.approx(usable / 2)
    assert InferenceBudget.from_settings(default).model_mb == pytest.approx(usable / 2)
    # A small cache bounds each model by the cache (it must fit to be cached) ...
    small = Settings.from_env({"MODEL_BUCKET": "b", "MODEL_CACHE_MB": "100"})
    assert small.cache_mb == 100
    assert InferenceBudget.from_settings(small).model_mb == pytest.approx(100)
    # ... a large one by the slot it leaves for loading the next model.
    large = Settings.from_env({"MODEL_BUCKET": "b", "MODEL_CACHE_MB": "400"})
    assert InferenceBudget.from_settings(large).model_mb == pytest.approx(usable - 400)
    with pytest.raises(ConfigurationError, match="leaves no room to load a model"):
        Settings.from_env({"MODEL_BUCKET": "b", "MODEL_CACHE_MB": "900"})
