"""Challengers on live traffic, the serving side: a canary in the request path (DESIGN.md).

Two real models of the default model's registry under moto: version 1 in service (the
champion) and version 2 behind the alias ``challenger``, which ``routing.json`` sends 30% of the
unpinned requests. Through the real handler: the share, stickiness by row ids and by
``x-request-id``, answers matching the answering version's own predictions, pinned routes never
rerouted, a cleared alias falling back to the champion, a routing change picked up after
MODEL_REFRESH_SECONDS, captures recording the alias and the latency, metrics by alias.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, LambdaContext, TrainedModel, train
from tests.inference_support import http_api_event, response_body, response_headers
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    FakeClock,
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve import captures
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.routing import Canary, Routing, canary_bucket, ids_key

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]
PERCENT = 30.0
ALIAS = "challenger"


@pytest.fixture(scope="module")
def pair() -> tuple[TrainedModel, TrainedModel]:
    """Two binary models on the same 6 features whose predictions differ (champion, challenger)."""
    return train("binary:logistic", d=6), train("binary:logistic", d=6, seed=5, shift=1.0)


def own(model: TrainedModel, X: np.ndarray) -> np.ndarray:
    """The model's own predictions (float32, as served)."""
    dmatrix = xgb.DMatrix(X, feature_names=model.feature_names)
    return np.asarray(model.booster.predict(dmatrix), dtype=np.float32)


@pytest.fixture
def canaried(
    registry: ModelRegistry, pair: tuple[TrainedModel, TrainedModel]
) -> tuple[TrainedModel, TrainedModel]:
    champion, challenger = pair
    assert publish(registry, champion) == 1
    assert publish(registry, challenger, promote=False) == 2
    registry.set_alias(ALIAS, 2)
    registry.set_routing(lambda seen: Routing(Canary(ALIAS, PERCENT)))
    return pair


def call(
    module: ModuleType,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    event = http_api_event(
        "POST", path, orjson.dumps(body), {"content-type": "application/json", **(headers or {})}
    )
    if request_id is not None:
        event["requestContext"]["requestId"] = request_id
    response = module.handler(event, LambdaContext())
    return response["statusCode"], response_headers(response), orjson.loads(response_body(response))


def to_canary(key: bytes) -> bool:
    return canary_bucket(key) < PERCENT


def test_a_30_percent_canary_answers_30_percent_of_the_ids_sticky_and_as_its_version(
    canaried: tuple[TrainedModel, TrainedModel],
    function: Start,
    capsys: pytest.CaptureFixture[str],
) -> None:
    champion, challenger = canaried
    module = function()
    X = champion.X
    expected = {1: own(champion, X), 2: own(challenger, X)}
    assert not np.array_equal(expected[1], expected[2])
    n = 10_000
    answered: dict[str, int] = {}
    for i in range(n):
        row = i % len(X)
        customer = f"customer-{i}"
        status, headers, body = call(
            module, "/predict", {"instances": [X[row].tolist()], "ids": [customer]}
        )
        assert status == 200, body
        version = body["model"]["version"]
        alias = "champion" if version == 1 else ALIAS
        assert body["model"] == {"name": "default", "version": version, "alias": alias}
        assert (headers["x-model-version"], headers["x-model-alias"]) == (str(version), alias)
        assert (version == 2) == to_canary(ids_key([customer]))  # the documented rule
        assert np.float32(body["predictions"][0]) == expected[version][row]
        answered[customer] = version
        if i % 1000 == 999:
            capsys.readouterr()  # the EMF and log lines of 1,000 requests
    share = 100.0 * sum(v == 2 for v in answered.values()) / n
    assert abs(share - PERCENT) <= 2.0, share
    # Sticky: the same id is answered by the same version, again and on every route that
    # follows the champion (short route, by name, explain).
    for customer in list(answered)[:300]:
        row = X[:1].tolist()
        for path in ("/predict", "/models/default/predict", "/explain"):
            status, headers, body = call(module, path, {"instances": row, "ids": [customer]})
            assert status == 200, body
            assert body["model"]["version"] == answered[customer], (customer, path)
    capsys.readouterr()
    # Several rows: their ids together are the key.
    for start in range(0, 600, 3):
        ids = [f"customer-{j}" for j in range(start, start + 3)]
        status, _, body = call(module, "/predict", {"instances": X[:3].tolist(), "ids": ids})
        assert status == 200
        assert (body["model"]["version"] == 2) == to_canary(ids_key(ids))
        np.testing.assert_array_equal(
            np.asarray(body["predictions"], np.float32), expected[body["model"]["version"]][:3]
        )


def test_without_ids_the_request_id_header_decides_and_is_sticky(
    canaried: tuple[TrainedModel, TrainedModel], function: Start
) -> None:
    champion, _ = canaried
    module = function()
    body = {"instances": champion.X[:2].tolist()}
    versions = Counter()
    for i in range(1000):
        rid = f"req-{i}"
        seen = set()
        for retry in range(2):  # a retry sends the same header, API Gateway a new requestId
            status, headers, answer = call(
                module, "/predict", body, {"x-request-id": rid}, request_id=f"apigw-{i}-{retry}"
            )
            assert status == 200
            seen.add(answer["model"]["version"])
        assert seen == {2 if to_canary(rid.encode()) else 1}
        versions[seen.pop()] += 1
    assert abs(versions[2] / 10.0 - PERCENT) <= 5.0, versions  # 1,000 keys: sd 1.45 points
    # No header either: API Gateway's requestId (a retry gets a new one, so it may move).
    for i in range(200):
        rid = f"apigw-only-{i}"
        _, _, answer = call(module, "/predict", body, request_id=rid)
        assert answer["model"]["version"] == (2 if to_canary(rid.encode()) else 1)
    # The v2 inference route without a version: the same keys.
    v2 = {"inputs": [{"name": "x", "shape": [2, 6], "datatype": "FP32", "data": body["instances"]}]}
    for i in range(200):
        rid = f"req-{i}"
        status, headers, answer = call(
            module, "/v2/models/default/infer", v2, {"x-request-id": rid}
        )
        assert status == 200, answer
        want = 2 if to_canary(rid.encode()) else 1
        assert answer["model_version"] == str(want)
        assert headers["x-model-alias"] == (ALIAS if want == 2 else "champion")


def test_pinned_routes_are_never_rerouted(
    canaried: tuple[TrainedModel, TrainedModel], function: Start
) -> None:
    champion, challenger = canaried
    module = function()
    X = champion.X[:1].tolist()
    ids = [f"customer-{i}" for i in range(300)]
    assert any(to_canary(ids_key([c])) for c in ids)
    pins = {
        "/models/default@champion/predict": (1, "champion"),
        f"/models/default@{ALIAS}/predict": (2, ALIAS),
        "/models/default/versions/1/predict": (1, None),
        "/models/default/versions/2/predict": (2, None),
    }
    for path, (version, alias) in pins.items():
        for customer in ids:
            status, headers, body = call(module, path, {"instances": X, "ids": [customer]})
            assert status == 200, body
            assert body["model"] == {"name": "default", "version": version, "alias": alias}
            assert headers["x-model-alias"] == (alias or "none")
    v2 = {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "data": X}]}
    for i in range(100):
        status, _, answer = call(
            module, "/v2/models/default/versions/1/infer", v2, {"x-request-id": f"req-{i}"}
        )
        assert (status, answer["model_version"]) == (200, "1")
    del challenger


def test_a_cleared_canary_alias_falls_back_to_the_champion_logged_once(
    canaried: tuple[TrainedModel, TrainedModel],
    registry: ModelRegistry,
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    champion, _ = canaried
    monkeypatch.setenv("MODEL_REFRESH_SECONDS", "0")  # every request looks again
    module = function()
    warnings = Warnings()
    service_logger = logging.getLogger("treeserve.serving.service")
    service_logger.addHandler(warnings)
    try:
        X = champion.X[:1].tolist()
        canaried_ids = [c for c in (f"customer-{i}" for i in range(200)) if to_canary(ids_key([c]))]
        status, _, body = call(module, "/predict", {"instances": X, "ids": canaried_ids[:1]})
        assert (status, body["model"]["version"]) == (200, 2)
        assert warnings.fallbacks() == 0
        registry.clear_alias(ALIAS)  # the routing still names it
        for customer in canaried_ids:
            status, _, body = call(module, "/predict", {"instances": X, "ids": [customer]})
            assert status == 200, body
            assert body["model"] == {"name": "default", "version": 1, "alias": "champion"}
        assert warnings.fallbacks() == 1
        # The alias set again: the canary answers again.
        registry.set_alias(ALIAS, 2)
        _, _, body = call(module, "/predict", {"instances": X, "ids": canaried_ids[:1]})
        assert body["model"]["version"] == 2
        # An unreadable routing.json: the champion answers everything, never a 5xx.
        registry.store.put(registry.routing_key, b"{not json")
        for customer in canaried_ids[:20]:
            status, _, body = call(module, "/predict", {"instances": X, "ids": [customer]})
            assert (status, body["model"]["version"]) == (200, 1)
        assert warnings.fallbacks() == 2  # read once per version of the object
    finally:
        service_logger.removeHandler(warnings)


class Warnings(logging.Handler):
    """The warnings the service logs (whatever handlers an earlier test left configured)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def fallbacks(self) -> int:
        return sum("canary not in effect" in m for m in self.messages)


def test_a_routing_change_is_picked_up_after_model_refresh_seconds(
    pair: tuple[TrainedModel, TrainedModel], registry: ModelRegistry, function: Start
) -> None:
    champion, challenger = pair
    publish(registry, champion)
    publish(registry, challenger, promote=False)
    registry.set_alias(ALIAS, 2)
    module = function()
    clock = FakeClock()
    module.service.clock = clock
    module.function.models.clock = clock
    X = champion.X[:1].tolist()
    ids = [f"customer-{i}" for i in range(200)]

    def versions() -> set[int]:
        return {
            call(module, "/predict", {"instances": X, "ids": [c]})[2]["model"]["version"]
            for c in ids
            if to_canary(ids_key([c]))
        }

    assert versions() == {1}
    registry.set_routing(lambda seen: Routing(Canary(ALIAS, PERCENT)))
    clock.advance(59)
    assert versions() == {1}  # within the interval: not read yet
    clock.advance(2)
    assert versions() == {2}
    registry.set_routing(lambda seen: Routing())  # `treeserve route --off`
    assert versions() == {2}
    clock.advance(61)
    assert versions() == {1}


def test_captures_record_the_alias_that_answered_and_the_latency(
    canaried: tuple[TrainedModel, TrainedModel],
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
    s3: Any,
) -> None:
    champion, _ = canaried
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    monkeypatch.setenv("CAPTURE_MAX_ROWS", "100000")
    module = function()
    X = champion.X
    answered = {}
    for i in range(300):
        customer = f"customer-{i}"
        _, _, body = call(module, "/predict", {"instances": [X[i].tolist()], "ids": [customer]})
        answered[customer] = body["model"]["version"]
    module.capture.flush(wait=True)
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/default/")["Contents"]
    ]
    rows = [
        captures.decode_capture(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys
    ]
    got = {
        row_id: (int(version), alias, float(latency))
        for r in rows
        for row_id, version, alias, latency in zip(
            r.ids,
            r.versions,
            r.aliases or [],
            r.latency_ms if r.latency_ms is not None else [],
            strict=True,
        )
    }
    assert set(got) == set(answered)
    for customer, (version, alias, latency) in got.items():
        assert version == answered[customer]
        assert alias == ("champion" if version == 1 else ALIAS)
        assert 0.0 < latency < 10_000.0
    assert {alias for _, alias, _ in got.values()} == {"champion", ALIAS}


def emf(out: str) -> list[dict[str, Any]]:
    return [d for d in map(_json, out.splitlines()) if d is not None and "_aws" in d]


def _json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def test_metrics_by_alias_and_5xx_by_function_version(
    canaried: tuple[TrainedModel, TrainedModel],
    function: Start,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    champion, _ = canaried
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_VERSION", "7")
    module = function()
    X = champion.X[:1].tolist()
    by_alias = {}
    for i in range(40):
        customer = f"customer-{i}"
        capsys.readouterr()
        _, headers, _ = call(module, "/predict", {"instances": X, "ids": [customer]})
        [blob] = [d for d in emf(capsys.readouterr().out) if "PredictLatency" in d]
        dims = blob["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
        assert ["service"] in dims  # the series the alarms watch stay as they are
        assert ["model", "alias"] in dims
        assert (blob["model"], blob["alias"]) == ("default", headers["x-model-alias"])
        by_alias[blob["alias"]] = blob["PredictLatency"]
    assert set(by_alias) == {"champion", ALIAS}
    # A 5xx (a fault, not the client's input) is counted by the version that answered it.
    loaded = module.service.loaded

    def broken(_: Any) -> Any:
        raise RuntimeError("a broken model")

    monkeypatch.setattr(loaded.predictor, "predict", broken)
    champion_ids = [c for c in (f"customer-{i}" for i in range(50)) if not to_canary(ids_key([c]))]
    capsys.readouterr()
    status, _, _ = call(module, "/predict", {"instances": X, "ids": champion_ids[:1]})
    assert status == 500
    [blob] = [d for d in emf(capsys.readouterr().out) if "ServerErrors" in d]
    assert ["function_version"] in blob["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    assert (blob["function_version"], blob["ServerErrors"]) == ("7", [1.0])


def test_a_canary_with_its_features_in_another_order_reads_the_records_by_name(
    pair: tuple[TrainedModel, TrainedModel], registry: ModelRegistry, function: Start
) -> None:
    champion, _ = pair
    names = list(reversed(champion.feature_names))
    X = champion.X[:, ::-1].copy()
    dtrain = xgb.DMatrix(X, label=champion.y, feature_names=names)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 3}, dtrain, 7
    )
    reordered = TrainedModel(booster, X, champion.y, names, "binary:logistic")
    publish(registry, champion)
    publish(registry, reordered, promote=False)
    registry.set_alias(ALIAS, 2)
    registry.set_routing(lambda seen: Routing(Canary(ALIAS, PERCENT)))
    module = function()
    seen = set()
    for i in range(100):
        customer = f"customer-{i}"
        record = dict(zip(champion.feature_names, champion.X[i].tolist(), strict=True))
        status, _, body = call(module, "/predict", {"instances": [record], "ids": [customer]})
        assert status == 200, body
        version = body["model"]["version"]
        seen.add(version)
        want = (
            own(champion, champion.X[i : i + 1]) if version == 1 else own(reordered, X[i : i + 1])
        )
        assert np.float32(body["predictions"][0]) == want[0]
    assert seen == {1, 2}
