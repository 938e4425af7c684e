"""Capture through the handler: sampled rows land in S3 as Parquet objects, in batches, written
off the request (a writer thread)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, LambdaContext, TrainedModel
from tests.inference_support import http_api_event
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve import captures
from treeserve.registry.model_registry import ModelRegistry

pytestmark = pytest.mark.integration


def test_captured_in_batches_with_schema(
    registry: ModelRegistry,
    function: Callable[[], ModuleType],
    binary_model: TrainedModel,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    monkeypatch.setenv("CAPTURE_MAX_ROWS", "10")
    publish(registry, binary_model, class_names=["no", "yes"])
    module = function()
    puts: list[str] = []
    # Capture writes through its own short-timeout client (treeserve.aws.capture_s3_client).
    module.capture.s3().meta.events.register(
        "provide-client-params.s3.PutObject", lambda params, **_: puts.append(params["Key"])
    )
    X = binary_model.X[:4].copy()
    X[0, 0] = np.nan
    for k in range(6):  # 24 rows: two batches of 12, not six writes
        body = orjson.dumps({"instances": X.tolist(), "ids": [f"q{k}-{i}" for i in range(4)]})
        response = module.handler(http_api_event("POST", "/predict", body), LambdaContext())
        assert response["statusCode"] == 200
    module.capture.wait()
    assert len(puts) == 2
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/default/")["Contents"]
    )
    assert keys == sorted(puts)
    assert all(k.startswith("captures/default/dt=") and k.endswith(".parquet") for k in keys)
    files = [
        captures.decode_capture(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        for key in keys
    ]
    ids = [i for f in files for i in f.ids]
    assert sorted(ids) == sorted(f"q{k}-{i}" for k in range(6) for i in range(4))
    f = next(f for f in files if "q0-0" in f.ids)
    row = f.ids.index("q0-0")
    p = binary_model.booster.predict(xgb.DMatrix(X[:1], feature_names=binary_model.feature_names))[
        0
    ]
    assert np.isnan(f.inputs[row, 0])
    assert np.array_equal(f.inputs[row, 1:], X[0, 1:].astype(np.float32))
    assert f.outputs[row, 0] == pytest.approx(float(p), rel=1e-6)
    assert f.labels is not None
    assert f.labels[row] == ("yes" if p >= 0.5 else "no")
    assert f.versions[row] == 1
    assert f.model == "default"


def test_capture_failure_never_fails_requests(
    registry: ModelRegistry,
    function: Callable[[], ModuleType],
    binary_model: TrainedModel,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    monkeypatch.setenv("CAPTURE_MAX_ROWS", "2")
    publish(registry, binary_model)
    module = function()

    def boom(**_: Any) -> None:
        raise ConnectionError("S3 is down")

    module.capture.s3().meta.events.register("before-call.s3.PutObject", boom)
    body = orjson.dumps({"instances": binary_model.X[:3].tolist()})
    for _ in range(3):
        response = module.handler(http_api_event("POST", "/predict", body), LambdaContext())
        assert response["statusCode"] == 200
    module.capture.wait()
    assert module.capture.flush_failures == 3
    assert module.capture.buffered_rows == 0
