"""One request path: what a user adds to the inference function's FastAPI app runs for every
event type (HTTP API 2.0, REST API 1.0, Function URL) and for the local stack, on every route.

The events are the canonical ones of ``events/`` (``sam local generate-event`` shapes: base64
bodies without Content-Type, REST events with a stage), pointed at each route; the local stack is
the real :class:`treeserve_cli.local.LambdaGateway` under uvicorn, spoken to over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Depends, Request

from tests.conftest import EVENTS, LambdaContext, TrainedModel
from tests.e2e.test_local_stack import free_port
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve.registry.model_registry import ModelRegistry
from treeserve_cli.local import LambdaGateway, make_server

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]

ROUTES = [
    ("POST", "/predict"),
    ("POST", "/explain"),
    ("GET", "/health"),
    ("GET", "/model"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v2/health/ready"),  # the Open Inference Protocol's routes: the same app
    ("GET", "/v2/models/default"),
    ("GET", "/whoami"),  # the user's own route, with the user's own dependency
    ("GET", "/nope"),  # no route: the framework's 404 goes through the middleware too
]
CANONICAL = {
    "http-api": "apigw-v2-predict-base64-no-content-type.json",
    "rest-api": "apigw-v1-rest-predict.json",
    "function-url": "function-url-predict.json",
}


def canonical_event(kind: str, method: str, path: str, body: bytes | None) -> dict[str, Any]:
    """The canonical event of ``kind`` from events/, for ``method path`` with ``body``."""
    event: dict[str, Any] = copy.deepcopy(orjson.loads((EVENTS / CANONICAL[kind]).read_bytes()))
    if kind == "rest-api":
        event["path"], event["httpMethod"] = path, method
        event["pathParameters"] = {"proxy": path.lstrip("/")}
        context = event["requestContext"]
        context["httpMethod"] = method
        context["path"] = f"/{context['stage']}{path}"
    else:
        event["rawPath"] = path
        event["requestContext"]["http"].update(method=method, path=path)
        event["headers"].pop("content-type", None)  # as sam local generate-event: none
        event["headers"].pop("content-length", None)
    if body is None:
        event.pop("body", None)
        event["isBase64Encoded"] = False
    else:
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    return event


class Seen:
    """What the user's middleware and dependency saw."""

    def __init__(self) -> None:
        self.middleware: list[tuple[str, str]] = []
        self.dependency: list[str] = []


def extend(app: Any, seen: Seen) -> None:
    """What a user adds to the app in their handler module: a middleware, a route with a
    dependency."""

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Any:
        seen.middleware.append((request.method, request.url.path))
        response = await call_next(request)
        response.headers["x-seen-by"] = "user-middleware"
        return response

    def caller(request: Request) -> str:
        seen.dependency.append(request.url.path)
        return request.headers.get("user-agent", "")

    @app.get("/whoami")
    async def whoami(agent: str = Depends(caller)) -> dict[str, str]:
        return {"agent": agent}


@pytest.fixture(name="extended")
def extended_fixture(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> tuple[ModuleType, Seen]:
    publish(registry, binary_model)
    module = function()
    seen = Seen()
    extend(module.app, seen)
    return module, seen


def _body(model: TrainedModel) -> bytes:
    return orjson.dumps({"instances": model.X[:2].tolist()})


def _check(answers: list[tuple[str, str, int, dict[str, str]]], seen: Seen) -> None:
    for method, path, status, headers in answers:
        assert headers.get("x-seen-by") == "user-middleware", (method, path, status)
        assert headers.get("x-model-version") == "1", (method, path)
        assert status == (404 if path == "/nope" else 200), (method, path)
    assert seen.middleware == [(m, p) for m, p, _, _ in answers]
    assert seen.dependency == ["/whoami"]


@pytest.mark.parametrize("kind", list(CANONICAL))
def test_a_users_middleware_and_dependency_run_for_every_event_type(
    kind: str, extended: tuple[ModuleType, Seen], binary_model: TrainedModel
) -> None:
    module, seen = extended
    answers = []
    for method, path in ROUTES:
        body = _body(binary_model) if method == "POST" else None
        answer = module.handler(canonical_event(kind, method, path, body), LambdaContext())
        headers = {k.lower(): v for k, v in (answer.get("headers") or {}).items()}
        for key, values in (answer.get("multiValueHeaders") or {}).items():
            headers.setdefault(key.lower(), values[-1])
        answers.append((method, path, answer["statusCode"], headers))
    _check(answers, seen)


@pytest.fixture(name="local_api")
def local_api_fixture(extended: tuple[ModuleType, Seen]) -> Iterator[tuple[str, Seen]]:
    """The local stack's API server (LambdaGateway under uvicorn) around the function."""
    module, seen = extended
    gateway = LambdaGateway(module.handler, LambdaContext)
    port = free_port()
    server = make_server(gateway, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the local API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        gateway.close()


def test_a_users_middleware_and_dependency_run_in_the_local_stack(
    local_api: tuple[str, Seen], binary_model: TrainedModel
) -> None:
    url, seen = local_api
    answers = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path in ROUTES:
            body = _body(binary_model) if method == "POST" else None
            r = client.request(method, path, content=body)
            answers.append((method, path, r.status_code, dict(r.headers)))
    _check(answers, seen)
    assert answers[0][3]["content-type"] == "application/json"


def test_the_local_stack_sends_the_handler_api_gateway_events(
    extended: tuple[ModuleType, Seen], binary_model: TrainedModel
) -> None:
    """What the gateway hands the handler is an HTTP API event, answered as production does."""
    module, _ = extended
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        events.append(event)
        answer: dict[str, Any] = module.handler(event, context)
        return answer

    gateway = LambdaGateway(handler, LambdaContext)
    transport = httpx.ASGITransport(app=gateway)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            return await client.post(
                "/predict?x=1&x=2",
                content=_body(binary_model),
                headers={"Accept": "text/csv", "Cookie": "a=1; b=2"},
            )

    # On a thread of its own: asyncio.run would leave this thread without the event loop that
    # Mangum runs on (as the Lambda runtime's main thread has one).
    with ThreadPoolExecutor(1) as pool:
        try:
            r = pool.submit(asyncio.run, call()).result()
        finally:
            gateway.close()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    (event,) = events
    assert event["version"] == "2.0"
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["rawPath"] == "/predict"
    assert event["rawQueryString"] == "x=1&x=2"
    assert event["queryStringParameters"] == {"x": "1,2"}
    assert event["cookies"] == ["a=1", "b=2"]
    assert event["headers"]["accept"] == "text/csv"
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == _body(binary_model)
    same = module.handler(copy.deepcopy(event), LambdaContext())
    assert same["body"].encode() == r.content
