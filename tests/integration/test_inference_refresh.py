"""The model in service while warm: promotions, rollbacks, corrupt versions, no model yet."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, LambdaContext, TrainedModel, train
from tests.inference_support import http_api_event, manifest_for, response_body, response_headers
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    FakeClock,
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve.registry.model_registry import ModelRegistry

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]


def predict(module: ModuleType, X: np.ndarray) -> tuple[int, str, Any]:
    event = http_api_event("POST", "/predict", orjson.dumps({"instances": X.tolist()}))
    response = module.handler(event, LambdaContext())
    return (
        response["statusCode"],
        response_headers(response)["x-model-version"],
        orjson.loads(response_body(response)),
    )


def expected(model: TrainedModel, X: np.ndarray) -> list[float]:
    out = model.booster.predict(xgb.DMatrix(X, feature_names=model.feature_names))
    return np.asarray(out, dtype=np.float32).tolist()


def served(answer: Any) -> list[float]:
    return np.asarray(answer["predictions"], dtype=np.float32).tolist()


@pytest.fixture(scope="module")
def second_model() -> TrainedModel:
    return train("binary:logistic", seed=3, shift=0.8)


def test_promotion_and_rollback_served_after_refresh_interval(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    second_model: TrainedModel,
) -> None:
    publish(registry, binary_model)
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    X = binary_model.X[:10]
    assert expected(binary_model, X) != expected(second_model, X)

    status, version, answer = predict(module, X)
    assert (status, version) == (200, "1")
    assert served(answer) == expected(binary_model, X)

    publish(registry, second_model)  # version 2 promoted while warm
    clock.advance(59)
    assert predict(module, X)[1] == "1"  # within the interval: no S3 read yet
    clock.advance(2)
    status, version, answer = predict(module, X)
    assert (status, version) == (200, "2")
    assert served(answer) == expected(second_model, X)
    assert answer["model"]["version"] == 2

    registry.rollback()
    assert predict(module, X)[1] == "2"
    clock.advance(61)
    status, version, answer = predict(module, X)
    assert (status, version) == (200, "1")
    assert served(answer) == expected(binary_model, X)
    assert module.service.reload_failures == 0


def test_unchanged_pointer_is_a_not_modified_read(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel, s3: Any
) -> None:
    publish(registry, binary_model)
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    calls: list[dict[str, Any]] = []
    s3.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: calls.append(params)
    )
    for _ in range(3):
        clock.advance(61)
        assert predict(module, binary_model.X[:1])[1] == "1"
    # per interval: one conditional GET of current.json and one of routing.json (absent here:
    # a 404, so no ETag to send), nothing else read
    assert len(calls) == 6
    pointer_reads = [c for c in calls if c["Key"].endswith("current.json")]
    assert len(pointer_reads) == 3
    assert all(c.get("IfNoneMatch") for c in pointer_reads)
    assert [c["Key"] for c in calls if c not in pointer_reads] == [
        "registry/default/routing.json"
    ] * 3


def _bad_versions(registry: ModelRegistry, s3: Any, good: TrainedModel) -> list[int]:
    """Version 2: bytes overwritten in storage (sha256 mismatch). Version 3: unloadable bytes
    registered with a matching sha256. Version 4: a manifest that disagrees with the model."""
    v2 = registry.register(good.ubj(), manifest_for(good))
    s3.put_object(Bucket=BUCKET, Key=registry.model_key(v2), Body=good.ubj()[:-10] + b"corrupted!")
    junk = b"{this is not an xgboost model"
    v3 = registry.register(junk, manifest_for(good, ubj=junk))
    wrong = manifest_for(good)
    wrong.num_features = 99
    v4 = registry.register(good.ubj(), wrong)
    return [v2, v3, v4]


def test_corrupt_new_versions_are_never_served(  # noqa: PLR0917 -- fixtures
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    second_model: TrainedModel,
    s3: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish(registry, binary_model)
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    X = binary_model.X[:5]
    failures = 0
    for bad in _bad_versions(registry, s3, second_model):
        registry.promote(bad)
        clock.advance(61)
        status, version, answer = predict(module, X)
        assert (status, version) == (200, "1"), bad
        assert served(answer) == expected(binary_model, X)
        failures += 1
        assert module.service.reload_failures == failures
        clock.advance(61)  # retried at the next interval, still refused, still serving v1
        assert predict(module, X)[1] == "1"
        failures += 1
        assert module.service.reload_failures == failures
        assert "ModelLoadError" in (module.service.last_error or "")
    out = capsys.readouterr().out
    assert '"ModelReloadFailures"' in out  # the EMF metric
    good = publish(registry, second_model)
    clock.advance(61)
    status, version, answer = predict(module, X)
    assert (status, version) == (200, str(good))
    assert served(answer) == expected(second_model, X)


def test_corrupt_version_at_cold_start_means_no_model(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel, s3: Any
) -> None:
    bad = _bad_versions(registry, s3, binary_model)[0]
    registry.promote(bad)
    module = function()
    status, version, answer = predict(module, binary_model.X[:1])
    assert (status, version) == (503, "none")
    assert answer["error"]["type"] == "no_model"


def test_no_model_then_promotion_is_picked_up(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    assert predict(module, binary_model.X[:1])[0] == 503
    publish(registry, binary_model)
    clock.advance(61)
    status, version, answer = predict(module, binary_model.X[:2])
    assert (status, version) == (200, "1")
    assert served(answer) == expected(binary_model, binary_model.X[:2])


def test_storage_failure_keeps_serving(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel, s3: Any
) -> None:
    publish(registry, binary_model)
    module = function()
    clock = FakeClock()
    module.service.clock = clock

    def boom(**_: Any) -> None:
        raise ConnectionError("S3 is down")

    s3.meta.events.register("before-call.s3.GetObject", boom)
    clock.advance(61)
    status, version, _ = predict(module, binary_model.X[:1])
    assert (status, version) == (200, "1")
    assert module.service.reload_failures == 1
    s3.meta.events.unregister("before-call.s3.GetObject", boom)


def test_after_restore_rechecks_pointer_with_new_clients(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel, second_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    module.warm()  # what the SnapStart hook runs before the snapshot
    publish(registry, second_model)
    module.after_restore()  # what the SnapStart hook runs: no waiting for the interval
    assert predict(module, binary_model.X[:1])[1] == "2"
