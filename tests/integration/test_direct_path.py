"""The Lambda hot path without Mangum and FastAPI, and XGBoost's C call without its wrapper.

``answer_v2_event`` must give, for every payload 2.0 event it takes, the dict Mangum gives for the
same event through the FastAPI app; ``DenseCall`` must give what ``inplace_predict`` gives.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
from mangum import Mangum

from tests.conftest import ROOT, LambdaContext, TrainedModel
from tests.inference_support import http_api_event, rest_api_event
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve.model.predictor import DenseCall, Predictor
from treeserve.registry.model_registry import ModelRegistry
from treeserve.serving.api import create_app
from treeserve.serving.endpoints import answer_v2_event, strip_base_path

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]


def _via_mangum(module: ModuleType, event: dict[str, Any], base_path: str) -> dict[str, Any]:
    app = create_app(
        module.service, module.settings, metrics=module.metrics, endpoints=module.endpoints
    )
    return Mangum(app, lifespan="off", api_gateway_base_path=base_path)(event, LambdaContext())


def _events(model: TrainedModel) -> list[tuple[str, dict[str, Any]]]:
    rows = model.X[:4].tolist()
    body = orjson.dumps({"instances": rows, "ids": ["a", "b", "c", "d"]})
    names = ",".join(model.feature_names)
    csv_body = (names + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n").encode()
    json_type = {"content-type": "application/json"}
    cases = [
        ("predict json", http_api_event("POST", "/predict", body, json_type)),
        ("predict, no content-type", http_api_event("POST", "/predict", body)),
        ("predict base64", http_api_event("POST", "/predict", body, base64_body=True)),
        ("predict function url", http_api_event("POST", "/predict", body, function_url=True)),
        (
            "predict csv in",
            http_api_event("POST", "/predict", csv_body, {"content-type": "text/csv"}),
        ),
        (
            "predict csv out",
            http_api_event("POST", "/predict", body, {**json_type, "accept": "text/csv"}),
        ),
        ("explain", http_api_event("POST", "/explain", body, json_type)),
        ("explain csv", http_api_event("POST", "/explain", body, {"accept": "text/csv"})),
        ("malformed", http_api_event("POST", "/predict", b"{", json_type)),
        ("empty body", http_api_event("POST", "/predict", None, json_type)),
        ("wrong width", http_api_event("POST", "/predict", b'{"instances": [[1, 2]]}')),
        ("media type", http_api_event("POST", "/predict", body, {"content-type": "text/xml"})),
        (
            "charset",
            http_api_event(
                "POST", "/predict", body, {"content-type": "application/json; charset=latin-1"}
            ),
        ),
        (
            "non-latin header",
            http_api_event("POST", "/predict", body, {"content-type": "application/jsön"}),
        ),
        (
            "too many rows",
            http_api_event("POST", "/predict", orjson.dumps({"instances": [rows[0]] * 2000})),
        ),
        ("percent-encoded path", http_api_event("POST", "/%70redict", body)),
        ("trailing slash", http_api_event("POST", "/predict/", body)),
        (
            "trailing slash, url, csv by q",
            http_api_event(
                "POST",
                "/explain/",
                body,
                {"accept": "application/json;q=0.5, text/csv"},
                function_url=True,
            ),
        ),
        (
            "json by q",
            http_api_event("POST", "/predict", body, {"accept": "text/csv;q=0, application/json"}),
        ),
    ]
    mixed = http_api_event("POST", "/predict", body)
    mixed["headers"]["Content-Type"] = "text/xml"  # two spellings: the last one wins, as in Mangum
    cases.append(("duplicate header names", mixed))
    return cases


@pytest.mark.parametrize("base_path", ["/", "/prod"])
def test_direct_answers_equal_mangums(
    base_path: str,
    registry: ModelRegistry,
    function: Start,
    multiclass_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_BASE_PATH", base_path)
    monkeypatch.setenv("MAX_ROWS", "1000")
    publish(registry, multiclass_model, class_names=["a", "b", "c"])
    module = function()
    prefix = "" if base_path == "/" else base_path
    statuses = []
    for label, event in _events(multiclass_model):
        event["requestContext"]["http"]["path"] = prefix + event["requestContext"]["http"]["path"]
        direct = answer_v2_event(module.endpoints, event, base_path)
        assert direct is not None, label
        assert direct == _via_mangum(module, event, base_path), label
        statuses.append((label, direct["statusCode"]))
    assert dict(statuses) == {
        **{label: 200 for label, _ in statuses[:8]},
        "malformed": 400,
        "empty body": 400,
        "wrong width": 422,
        "media type": 415,
        "charset": 415,
        "non-latin header": 415,
        "too many rows": 413,
        "percent-encoded path": 200,
        "trailing slash": 200,
        "trailing slash, url, csv by q": 200,
        "json by q": 200,
        "duplicate header names": 415,
    }
    assert not module._web, "the FastAPI app was built for requests that do not need it"


def test_no_model_answer_equals_mangums(registry: ModelRegistry, function: Start) -> None:
    module = function()
    event = http_api_event("POST", "/predict", b'{"instances": [[1]]}')
    direct = answer_v2_event(module.endpoints, event)
    assert direct is not None
    assert direct["statusCode"] == 503
    assert direct == _via_mangum(module, event, "/")


def test_other_events_are_left_to_mangum(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:1].tolist()})
    for event in (
        http_api_event("GET", "/predict"),
        http_api_event("GET", "/health"),
        http_api_event("POST", "/model", body),
        http_api_event("POST", "/predict/more", body),
        rest_api_event("POST", "/predict", body),
        {"version": "2.0", "requestContext": "nonsense"},
        {"version": "2.0", "requestContext": {"http": {"method": "POST", "path": None}}},
        {},
    ):
        assert answer_v2_event(module.endpoints, event) is None
    # ... and the handler still answers them (through the FastAPI app, built on demand)
    assert not module._web
    health = module.handler(http_api_event("GET", "/health"), LambdaContext())
    assert health["statusCode"] == 200
    assert module._web
    rest = module.handler(rest_api_event("POST", "/predict", body), LambdaContext())
    assert rest["statusCode"] == 200


def test_a_body_that_is_not_base64_is_a_client_error(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    event = http_api_event("POST", "/predict", b"{}")
    event["body"], event["isBase64Encoded"] = "not base64!", True
    response = module.handler(event, LambdaContext())
    assert response["statusCode"] == 400
    assert orjson.loads(response["body"])["error"]["type"] == "malformed_body"
    assert response["headers"]["x-model-version"] == "1"
    event["body"], event["isBase64Encoded"] = "\udcff", False  # not text: cannot come from JSON
    assert module.handler(event, LambdaContext())["statusCode"] == 400


def test_the_handler_answers_predictions_without_fastapi(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:3].tolist()})
    for event in (
        http_api_event("POST", "/predict", body),
        http_api_event("POST", "/explain", body, function_url=True),
    ):
        assert module.handler(event, LambdaContext())["statusCode"] == 200
    assert not module._web  # neither FastAPI nor Mangum was built: the direct path answered
    event = http_api_event("POST", "/predict", body)
    event["body"] = 10**10  # not text (a direct Invoke could send it): no 10 GB of zeros
    event["headers"]["accept"] = None
    response = module.handler(event, LambdaContext())
    assert response["statusCode"] == 400


def test_base_path_rule_matches_mangums() -> None:
    from mangum.handlers.utils import strip_api_gateway_path

    for path in ("", "/", "/predict", "/prod/predict", "/prodx/predict", "/a%20b", "/prod"):
        for base in ("/", "", "/prod", "prod"):
            assert strip_base_path(path, base) == strip_api_gateway_path(
                path, api_gateway_base_path=base
            ), (path, base)


def test_endpoints_do_not_import_the_web_framework() -> None:
    code = (
        "import sys, treeserve.serving.endpoints, treeserve.serving.service, treeserve.serving.capture\n"
        "heavy = sorted(m for m in ('fastapi', 'starlette', 'mangum', 'pydantic') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "functions"), "PATH": ""},
    )
    assert out.stdout.strip() == "[]"


# --- DenseCall ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["binary_model", "multiclass_model", "regression_model"])
def test_dense_call_equals_inplace_predict(name: str, request: pytest.FixtureRequest) -> None:
    model: TrainedModel = request.getfixturevalue(name)
    X = model.X[:200].astype(np.float32)
    X[::7, 1] = np.nan
    call = DenseCall.checked(model.booster, X[:2])
    assert call is not None
    expected = model.booster.inplace_predict(X, validate_features=False)
    got = call(X)
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    one = call(X[:1])  # the 1-row shape too
    np.testing.assert_array_equal(one, expected[:1])
    # the output is a copy: XGBoost's per-thread buffer is reused by the next call
    call(X[5:9])
    np.testing.assert_array_equal(one, expected[:1])


def test_dense_call_from_several_threads(multiclass_model: TrainedModel) -> None:
    # XGBoost writes each thread's output to that thread's own buffer; each call copies it out.
    from concurrent.futures import ThreadPoolExecutor

    X = multiclass_model.X[:64].astype(np.float32)
    call = DenseCall.checked(multiclass_model.booster, X[:2])
    assert call is not None
    expected = multiclass_model.booster.inplace_predict(X, validate_features=False)
    chunks = [(i % 60, i % 60 + 1 + i % 4) for i in range(400)]

    def one(bounds: tuple[int, int]) -> bool:
        lo, hi = bounds
        return bool(np.array_equal(call(X[lo:hi]), expected[lo:hi]))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(one, chunks))


def test_predictor_uses_the_direct_call_only_where_it_applies(
    binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.inference_support import manifest_for

    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model))
    assert predictor._dense is not None
    calls: list[tuple[int, ...]] = []
    real = predictor._dense

    def spy(X: np.ndarray) -> np.ndarray:
        calls.append(X.shape)
        return real(X)

    monkeypatch.setattr(predictor, "_dense", spy)
    X = binary_model.X[:10]
    expected = binary_model.booster.inplace_predict(X.astype(np.float32))
    for variant in (X.astype(np.float32), X, np.asfortranarray(X.astype(np.float32))):
        np.testing.assert_array_equal(predictor.raw_predict(variant), expected)
    # float64 and Fortran order take the public path
    assert calls == [(10, len(binary_model.feature_names))]


def _internals_moved(self: DenseCall, booster: object) -> None:
    raise AttributeError("module 'xgboost.core' has no attribute '_LIB'")


@pytest.mark.parametrize(
    ("name", "replacement"),
    [
        ("__call__", lambda self, X: np.zeros(len(X), np.float32)),  # disagrees
        ("__init__", _internals_moved),  # an XGBoost without the private names
    ],
)
def test_the_public_path_serves_when_the_direct_call_cannot(
    name: str, replacement: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.inference_support import manifest_for

    monkeypatch.setattr(DenseCall, name, replacement)
    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model))
    assert predictor._dense is None
    X = binary_model.X[:10].astype(np.float32)
    np.testing.assert_array_equal(
        predictor.predict(X).values, binary_model.booster.inplace_predict(X)
    )


def test_the_direct_call_waits_for_a_known_xgboost_major(
    binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xgboost as xgb

    X = binary_model.X[:2].astype(np.float32)
    assert DenseCall.checked(binary_model.booster, X) is not None
    monkeypatch.setattr(xgb, "__version__", "4.0.0")
    assert DenseCall.checked(binary_model.booster, X) is None


def test_a_failing_c_call_raises_xgboosts_error(binary_model: TrainedModel) -> None:
    import xgboost as xgb

    call = DenseCall(binary_model.booster)
    with pytest.raises(xgb.core.XGBoostError):
        call(np.zeros((2, len(binary_model.feature_names) + 3), dtype=np.float32))
