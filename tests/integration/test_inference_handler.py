"""The inference handler invoked with API Gateway events (HTTP API v2, REST v1, Function URL)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import LambdaContext, TrainedModel
from tests.inference_support import (
    REQUEST_ID,
    http_api_event,
    response_body,
    response_headers,
    rest_api_event,
)
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve.registry.model_registry import ModelRegistry

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]


def invoke(module: ModuleType, event: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    response = module.handler(event, LambdaContext())
    return response["statusCode"], response_headers(response), response_body(response)


def booster_predict(model: TrainedModel, X: np.ndarray) -> np.ndarray:
    return model.booster.predict(xgb.DMatrix(X, feature_names=model.feature_names))


EVENT_KINDS = ["v2", "v1", "url"]


def event_for(
    kind: str, method: str, path: str, body: Any = None, headers: Any = None, **kw: Any
) -> dict[str, Any]:
    if kind == "v1":
        return rest_api_event(method, path, body, headers, **kw)
    return http_api_event(method, path, body, headers, function_url=kind == "url", **kw)


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_predict_binary_rows_equal_booster(
    kind: str, registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model, class_names=["no", "yes"])
    module = function()
    X = binary_model.X[:25]
    body = orjson.dumps({"instances": X.tolist()})
    status, headers, raw = invoke(
        module, event_for(kind, "POST", "/predict", body, {"Content-Type": "application/json"})
    )
    assert status == 200, raw
    assert headers["x-model-version"] == "1"
    assert headers["content-type"].startswith("application/json")
    answer = orjson.loads(raw)
    expected = booster_predict(binary_model, X)
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), expected)
    assert answer["labels"] == ["yes" if p >= 0.5 else "no" for p in expected]
    assert answer["model"] == {"name": "default", "version": 1, "alias": "champion"}
    assert answer["ids"] == [f"{REQUEST_ID}-{i}" for i in range(25)]


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_base64_body_without_content_type(
    kind: str, registry: ModelRegistry, function: Start, regression_model: TrainedModel
) -> None:
    # As `sam local generate-event apigateway http-api-proxy` writes it: base64, no Content-Type.
    publish(registry, regression_model)
    module = function()
    X = regression_model.X[:3]
    body = orjson.dumps({"instances": X.tolist(), "ids": ["a", "b", "c"]})
    event = event_for(kind, "POST", "/predict", body, base64_body=True)
    assert "content-type" not in {k.lower() for k in event["headers"]}
    status, headers, raw = invoke(module, event)
    assert status == 200, raw
    assert headers["x-model-version"] == "1"
    answer = orjson.loads(raw)
    np.testing.assert_array_equal(
        np.asarray(answer["predictions"], dtype=np.float32), booster_predict(regression_model, X)
    )
    assert "labels" not in answer
    assert answer["ids"] == ["a", "b", "c"]


def test_multiclass_records_by_name(
    registry: ModelRegistry, function: Start, multiclass_model: TrainedModel
) -> None:
    names = ["low", "mid", "high"]
    publish(registry, multiclass_model, class_names=names)
    module = function()
    X = multiclass_model.X[:30]
    records = [
        dict(zip(multiclass_model.feature_names[::-1], row[::-1], strict=True))
        for row in X.tolist()
    ]
    status, _, raw = invoke(
        module, http_api_event("POST", "/predict", orjson.dumps({"instances": records}))
    )
    assert status == 200, raw
    answer = orjson.loads(raw)
    expected = booster_predict(multiclass_model, X)
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), expected)
    assert answer["labels"] == [names[i] for i in expected.argmax(axis=1)]


def test_csv_in_csv_out_function_url(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    X = binary_model.X[:4].copy()
    X[1, 2] = np.nan
    lines = [",".join(binary_model.feature_names)] + [
        ",".join("" if np.isnan(v) else repr(float(v)) for v in row) for row in X
    ]
    event = http_api_event(
        "POST",
        "/predict",
        "\n".join(lines) + "\n",
        {"Content-Type": "text/csv", "Accept": "text/csv"},
        function_url=True,
    )
    status, headers, raw = invoke(module, event)
    assert status == 200, raw
    assert headers["content-type"].startswith("text/csv")
    assert headers["x-model-version"] == "1"
    rows = list(csv.reader(io.StringIO(raw.decode())))
    assert rows[0] == ["id", "prediction", "label"]
    expected = booster_predict(binary_model, X)
    np.testing.assert_array_equal(
        np.array([float(r[1]) for r in rows[1:]], dtype=np.float32), expected
    )
    assert [int(r[2]) for r in rows[1:]] == [int(p >= 0.5) for p in expected]


@pytest.mark.parametrize("fixture", ["binary_model", "multiclass_model", "regression_model"])
def test_explain_matches_pred_contribs(
    fixture: str, registry: ModelRegistry, function: Start, request: pytest.FixtureRequest
) -> None:
    model: TrainedModel = request.getfixturevalue(fixture)
    publish(registry, model)
    module = function()
    X = model.X[:5]
    status, headers, raw = invoke(
        module, http_api_event("POST", "/explain", orjson.dumps({"instances": X.tolist()}))
    )
    assert status == 200, raw
    assert headers["x-model-version"] == "1"
    answer = orjson.loads(raw)
    contribs = model.booster.predict(
        xgb.DMatrix(X, feature_names=model.feature_names), pred_contribs=True
    )
    assert answer["feature_names"] == model.feature_names
    np.testing.assert_allclose(
        np.asarray(answer["contributions"]), contribs[..., :-1], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(answer["bias"]), contribs[..., -1], rtol=1e-5, atol=1e-6)


def test_health_model_docs_openapi(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model, class_names=["no", "yes"])
    module = function()
    status, headers, raw = invoke(module, http_api_event("GET", "/health"))
    assert (status, headers["x-model-version"]) == (200, "1")
    assert orjson.loads(raw)["model"] == {"name": "default", "version": 1}
    status, headers, raw = invoke(module, rest_api_event("GET", "/model"))
    manifest = orjson.loads(raw)
    assert status == 200
    assert manifest["version"] == 1
    assert manifest["feature_names"] == binary_model.feature_names
    assert "reference" not in manifest
    assert "source" not in manifest
    status, headers, raw = invoke(module, http_api_event("GET", "/openapi.json"))
    assert status == 200
    assert headers["x-model-version"] == "1"
    spec = orjson.loads(raw)
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "text/csv"} <= set(body)
    assert "instances" in body["application/json"]["schema"]["properties"]
    assert "422" in spec["paths"]["/predict"]["post"]["responses"]
    status, headers, raw = invoke(module, http_api_event("GET", "/docs"))
    assert status == 200
    assert b"swagger" in raw.lower()


def test_no_model_is_503_everywhere(registry: ModelRegistry, function: Start) -> None:
    module = function()
    for event in (
        http_api_event("GET", "/health"),
        http_api_event("GET", "/model"),
        http_api_event("POST", "/predict", b'{"instances": [[1]]}'),
    ):
        status, headers, raw = invoke(module, event)
        assert status == 503
        assert headers["x-model-version"] == "none"
        assert orjson.loads(raw)["error"]["type"] == "no_model"


BAD_REQUESTS = [
    (b"", {}, 400, "malformed_body"),
    (b"{", {}, 400, "malformed_body"),
    (b'{"instances": [[1, 2, "\xff\xfe"]]}', {}, 400, "malformed_body"),
    (b'{"instances": [[NaN, 1, 2, 3, 4, 5]]}', {}, 400, "malformed_body"),
    (b"[" * 100_000, {}, 400, "malformed_body"),
    (b'{"instances": [[1e999, 1, 2, 3, 4, 5]]}', {}, 400, "malformed_body"),
    (
        b'{"instances": [[1, 2, 3, 4, 5, 6]], "instances": [[1, 2, 3, 4, 5, 6]]}',
        {},
        400,
        "malformed_body",
    ),
    (b'{"instances": [[1, 2, 3]]}', {}, 422, "input_mismatch"),
    (b'{"instances": [{"nope": 1}]}', {}, 422, "input_mismatch"),
    (b'{"instances": [[1, 2, 3, 4, 5, "x"]]}', {}, 422, "input_mismatch"),
    (b'{"instances": [[1, 2, 3, 4, 5, false]]}', {}, 422, "input_mismatch"),
    (b'{"instances": [[1, 2, 3, 4, 5, [6]]]}', {}, 422, "input_mismatch"),
    (b'{"instances": [[1, 2, 3, 4, 5, 1e300]]}', {}, 422, "input_mismatch"),
    (b"1,2,3,4,5,x\n1,2,3,4,5,6\n", {"Content-Type": "text/csv"}, 422, "input_mismatch"),
    (
        b'{"instances": [[1, 2, 3, 4, 5, 6]]}',
        {"Content-Type": "application/xml"},
        415,
        "unsupported_media_type",
    ),
    (
        b'{"instances": [[1, 2, 3, 4, 5, 6]]}',
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    (orjson.dumps({"instances": [[1, 2, 3, 4, 5, 6]] * 11}), {}, 413, "payload_too_large"),
]


def test_client_errors(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every bad request, on both routes, is its 4xx with the error shape and the version."""
    monkeypatch.setenv("MAX_ROWS", "10")
    publish(registry, binary_model)
    module = function()
    for route in ("/predict", "/explain"):
        for body, headers, status, kind in BAD_REQUESTS:
            event = http_api_event("POST", route, body, headers, base64_body=True)
            got, got_headers, raw = invoke(module, event)
            case = (route, body[:60], headers)
            assert got == status, (case, raw)
            assert got_headers["x-model-version"] == "1", case
            assert got_headers["content-type"].startswith("application/json"), case
            error = orjson.loads(raw)["error"]
            assert error["type"] == kind, case
            assert error["message"], case
    # and the environment still serves good requests afterwards
    good = orjson.dumps({"instances": binary_model.X[:2].tolist()})
    assert invoke(module, http_api_event("POST", "/predict", good))[0] == 200


def test_body_over_byte_limit_is_413(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_BODY_BYTES", "1000")
    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:40].tolist()})
    status, _, raw = invoke(module, http_api_event("POST", "/predict", body))
    assert status == 413
    assert orjson.loads(raw)["error"]["type"] == "payload_too_large"


def test_unknown_route_and_method(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    status, headers, raw = invoke(module, http_api_event("GET", "/nope"))
    assert (status, headers["x-model-version"]) == (404, "1")
    assert orjson.loads(raw)["error"]["type"] == "not_found"
    status, headers, raw = invoke(module, http_api_event("GET", "/predict"))
    assert status == 405
    assert orjson.loads(raw)["error"]["type"] == "method_not_allowed"


def test_metrics_and_logs_are_emitted(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish(registry, binary_model)
    module = function()
    capsys.readouterr()
    invoke(
        module,
        http_api_event(
            "POST", "/predict", orjson.dumps({"instances": binary_model.X[:3].tolist()})
        ),
    )
    out = capsys.readouterr().out
    blobs = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    emf = [b for b in blobs if "_aws" in b]
    names = {m["Name"] for b in emf for d in b["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    assert {"ColdStart", "PredictLatency", "PredictedRows"} <= names
    rows = next(b for b in emf if "PredictedRows" in b)
    assert rows["PredictedRows"] == [3.0]
    assert rows["model_version"] == 1


def test_tracing_follows_powertools_rule(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    assert module.tracer is None  # POWERTOOLS_TRACE_DISABLED in tests: no X-Ray SDK loaded
    assert module._tracing_enabled({"LAMBDA_TASK_ROOT": "/var/task"})
    assert not module._tracing_enabled(
        {"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"}
    )
    assert not module._tracing_enabled({"LAMBDA_TASK_ROOT": "/var/task", "AWS_SAM_LOCAL": "true"})
    assert not module._tracing_enabled({})


def test_streamed_body_is_read_whole_and_bounded(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under an ASGI server a body may arrive in chunks; the app reads them all, bounded."""
    import asyncio

    monkeypatch.setenv("MAX_BODY_BYTES", "5000")
    publish(registry, binary_model)
    module = function()

    def call(body: bytes) -> tuple[int, bytes]:
        chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {  # as an ASGI server sends it
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "server": ("127.0.0.1", 3000),
            "client": ("127.0.0.1", 50000),
        }
        asyncio.run(module.app(scope, receive, send))
        return sent[0]["status"], sent[1]["body"]

    X = binary_model.X[:5]
    status, raw = call(orjson.dumps({"instances": X.tolist()}))
    assert status == 200, raw
    np.testing.assert_array_equal(
        np.asarray(orjson.loads(raw)["predictions"], dtype=np.float32),
        booster_predict(binary_model, X),
    )
    status, raw = call(orjson.dumps({"instances": binary_model.X[:60].tolist()}))
    assert status == 413
    assert orjson.loads(raw)["error"]["type"] == "payload_too_large"


def test_explain_has_its_own_row_limit(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    from treeserve.settings import MAX_EXPLAIN_ROWS

    publish(registry, binary_model)
    module = function()
    rows = np.zeros((MAX_EXPLAIN_ROWS + 1, len(binary_model.feature_names))).tolist()
    body = orjson.dumps({"instances": rows})
    status, _, raw = invoke(module, http_api_event("POST", "/explain", body))
    assert status == 413
    assert "limit" in orjson.loads(raw)["error"]["message"]
    assert invoke(module, http_api_event("POST", "/predict", body))[0] == 200


# --- issue 13: events that are not requests, trailing slashes, bodies that are not base64 -----


def _without_context(event: dict[str, Any]) -> dict[str, Any]:
    event.pop("requestContext")
    return event


def _not_http_events() -> list[Any]:
    from tests.conftest import EVENTS

    files = ["s3-put-incoming.json", "monitoring-scheduled.json", "sqs-s3-put-incoming.json"]
    loaded = [orjson.loads((EVENTS / name).read_bytes()) for name in files]
    v2_no_headers = http_api_event("GET", "/health")
    v2_no_headers["headers"] = None
    v1_bad_identity = rest_api_event("GET", "/health")
    v1_bad_identity["requestContext"]["identity"] = None
    v1_bad_header = rest_api_event("GET", "/model", headers={"X-Trace": None})  # type: ignore[dict-item]
    v2_bad_host = http_api_event("GET", "/health", headers={"host": "a:b:c"})
    return [
        {},
        [],
        "x",
        None,
        *loaded,
        _without_context(http_api_event("POST", "/predict", b"{}")),
        _without_context(rest_api_event("GET", "/health")),
        {"version": "2.0", "requestContext": {"http": "x"}},
        v2_no_headers,
        v1_bad_identity,
        v1_bad_header,
        v2_bad_host,
    ]


def test_events_that_are_not_http_requests_are_refused_not_raised(
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from treeserve.serving import endpoints

    publish(registry, binary_model)
    module = function()
    warned: list[str] = []
    monkeypatch.setattr(endpoints.logger, "warning", lambda msg, **kw: warned.append(msg))
    events = _not_http_events()
    for event in events:
        status, headers, raw = invoke(module, event)
        assert status == 400, (event, raw)
        assert headers["content-type"] == "application/json"
        assert headers["x-model-version"] == "1"
        error = orjson.loads(raw)["error"]
        assert error["type"] == "bad_event", event
        assert "API Gateway" in error["message"]
    assert warned == ["event refused"] * len(events)
    good = orjson.dumps({"instances": binary_model.X[:2].tolist()})
    assert invoke(module, rest_api_event("POST", "/predict", good))[0] == 200


POWERTOOLS_BODY = "Hello from Lambda!"  # Powertools' apiGatewayProxyEvent.json: base64 claimed


@pytest.mark.parametrize("kind", EVENT_KINDS)
@pytest.mark.parametrize("route", ["POST /predict", "GET /health", "POST /model"])
def test_a_body_that_is_not_base64_is_400_on_every_event_type(
    kind: str,
    route: str,
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
) -> None:
    publish(registry, binary_model)
    module = function()
    method, path = route.split()
    event = event_for(kind, method, path, b"{}")
    event["body"], event["isBase64Encoded"] = POWERTOOLS_BODY, True
    status, headers, raw = invoke(module, event)
    assert status == 400, raw
    assert orjson.loads(raw)["error"]["type"] == "malformed_body"
    assert headers["x-model-version"] == "1"


ROUTES = [
    ("POST", "/predict"),
    ("POST", "/explain"),
    ("GET", "/health"),
    ("GET", "/model"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


@pytest.mark.parametrize("kind", [*EVENT_KINDS, "v1-stage"])
def test_every_route_answers_with_a_trailing_slash(
    kind: str,
    registry: ModelRegistry,
    function: Start,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = ""
    if kind == "v1-stage":  # a custom domain's base path mapping: the stage is in the path
        monkeypatch.setenv("API_BASE_PATH", "/prod")
        prefix, kind = "/prod", "v1"
    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:3].tolist(), "ids": [1, 2, 3]})
    for method, path in ROUTES:
        payload = body if method == "POST" else None
        plain = invoke(module, event_for(kind, method, prefix + path, payload))
        slashed = invoke(module, event_for(kind, method, prefix + path + "/", payload))
        assert plain[0] == 200, (path, plain[2][:200])
        assert slashed[0] == 200, (path, slashed[2][:200])
        assert slashed[2] == plain[2], path
    for path in ("/predict//", "/nope/", "/health//"):
        status, _, raw = invoke(module, event_for(kind, "GET", prefix + path))
        assert status == 404, (path, raw)
        assert orjson.loads(raw)["error"]["type"] == "not_found"


def test_the_asgi_app_answers_a_trailing_slash_too(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    from fastapi.testclient import TestClient

    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:2].tolist(), "ids": [1, 2]})
    with TestClient(module.app) as client:
        for method, path in ROUTES:
            kw: dict[str, Any] = {"content": body} if method == "POST" else {}
            plain = client.request(method, path, follow_redirects=False, **kw)
            slashed = client.request(method, path + "/", follow_redirects=False, **kw)
            assert (plain.status_code, slashed.status_code) == (200, 200), path
            assert slashed.content == plain.content, path
        r = client.get("/health//", follow_redirects=False)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"


def test_accept_q_values_through_every_path(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    body = orjson.dumps({"instances": binary_model.X[:2].tolist()})
    for kind in EVENT_KINDS:
        for accept, csv_out in (
            ("text/csv;q=0, application/json", False),
            ("application/json;q=0.5, text/csv", True),
        ):
            event = event_for(kind, "POST", "/predict", body, {"Accept": accept})
            status, headers, _ = invoke(module, event)
            assert status == 200
            assert headers["content-type"].startswith(
                "text/csv" if csv_out else "application/json"
            ), (kind, accept)
