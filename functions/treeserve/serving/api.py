"""The inference HTTP API: a FastAPI app (DESIGN.md "HTTP API"), and the function around it.

Routes: ``POST /predict``, ``POST /explain``, ``GET /health``, ``GET /model`` (the default model,
``MODEL_NAME``); ``POST /models/{name}/predict|explain``, ``GET /models/{name}`` and ``GET /models``
(every model of the registry, through the :class:`~treeserve.serving.service.ModelCache`), with
``{name}`` also ``name@alias`` and the ``/models/{name}/versions/{n}/...`` pins; the Open Inference
Protocol's ``/v2/...`` routes (:func:`add_v2_routes`, wire format in :mod:`treeserve.serving.oip`)
for the same models; ``GET /docs``,
``GET /openapi.json``, each defined once, here. Bodies are parsed by :mod:`treeserve.serving.inputs`
from the raw bytes (the OpenAPI document still describes them, through ``openapi_extra``);
answers are serialised with orjson. Every answer, errors included, carries ``x-model-version``
and ``x-model-name``;
errors are ``{"error": {"type", "message"}}`` (on ``/v2``, the protocol's ``{"error": "..."}``) and
client input never yields a 5xx.

There is one request path. :class:`InferenceFunction` wraps the app in Mangum
(``lifespan="off"``: ``"auto"`` would run the app's startup on every invocation), and every event
type (HTTP API 2.0, REST API 1.0, Function URL) reaches the app through it; the local stack turns
its HTTP requests into the same events and calls the same handler. A middleware, dependency or
route that a user adds to ``app`` therefore applies everywhere. Only events that are not HTTP
requests Mangum can read are answered before it (:func:`treeserve.serving.endpoints.refuse_event`).
"""

from __future__ import annotations

import base64
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from mangum import Mangum
from starlette.exceptions import HTTPException as StarletteHTTPException

from treeserve import __version__
from treeserve.aws import reset_clients
from treeserve.errors import InvalidInput, NoModelInService, NotFound, PayloadTooLarge
from treeserve.registry.model_registry import CHAMPION, ModelRegistry, model_names
from treeserve.registry.routing import canary_bucket
from treeserve.registry.store import S3RegistryStore
from treeserve.serving import oip
from treeserve.serving.capture import CaptureBuffer
from treeserve.serving.endpoints import (
    ALIAS_HEADER,
    JSON_TYPE,
    LATENCY_METRIC,
    MAX_REQUEST_ID_BYTES,
    NAME_HEADER,
    REQUEST_ID_HEADER,
    ROWS_METRIC,
    VERSION_HEADER,
    Answer,
    Endpoints,
    Kind,
    Message,
    Receive,
    Scope,
    Send,
    _read_body,
    alias_dimensions,
    bad_base64_body,
    proxy_response,
    refuse_event,
    scope_request_id,
)
from treeserve.serving.service import (
    LoadedModel,
    MetricsSink,
    ModelCache,
    ModelRef,
    ModelService,
    Served,
)
from treeserve.settings import Settings

logger = logging.getLogger(__name__)

# 5xx answers (never client input: a fault), by function version (a dimension set of its own).
SERVER_ERRORS_METRIC = "ServerErrors"

# --- OpenAPI descriptions of the raw bodies --------------------------------------------------

_NUMBER_OR_NULL = {"anyOf": [{"type": "number"}, {"type": "null"}]}
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["instances"],
                "additionalProperties": False,
                "properties": {
                    "instances": {
                        "type": "array",
                        "minItems": 1,
                        "description": "rows in the model's feature order, or records by "
                        "feature name; null or an absent feature is a missing value",
                        "items": {
                            "oneOf": [
                                {"type": "array", "items": _NUMBER_OR_NULL},
                                {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
                            ]
                        },
                    },
                    "ids": {
                        "type": "array",
                        "description": "one id per instance (generated when absent)",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                },
            },
            "examples": {
                "rows": {"value": {"instances": [[0.1, 2.0, None]]}},
                "records": {"value": {"instances": [{"f0": 0.1, "f1": 2.0}], "ids": ["a1"]}},
            },
        },
        "text/csv": {
            "schema": {"type": "string"},
            "example": "f0,f1,f2\n0.1,2.0,\n",
        },
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_ERR = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed body", **_ERR},
    413: {"description": "too many rows or bytes", **_ERR},
    415: {"description": "unsupported media type", **_ERR},
    422: {"description": "input does not fit the model", **_ERR},
    503: {"description": "no model in service", **_ERR},
}
NAMED_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"description": "unknown model, version or alias", **_ERR},
}
_NAME_PARAMETER = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "a model name, or name@alias (e.g. churn@challenger)",
    "schema": {"type": "string"},
}
_VERSION_PARAMETER = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "a registered version",
    "schema": {"type": "integer", "minimum": 1},
}
PREDICT_RESPONSE = {
    "description": "predictions, one per instance",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "model": {
                        "type": "object",
                        "description": "who answered (also in the x-model-name, "
                        "x-model-version and x-model-alias headers)",
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "integer"},
                            "alias": {
                                "type": ["string", "null"],
                                "description": "champion; the canary's alias when routing.json "
                                "sent the request to it; the alias a name@alias route named; "
                                "null for a /versions/{n} route",
                            },
                        },
                    },
                    "predictions": {
                        "type": "array",
                        "description": "positive-class probability (binary), class "
                        "probabilities (multiclass) or value (regression)",
                    },
                    "labels": {"type": "array", "description": "classification only"},
                    "ids": {"type": "array"},
                },
            }
        },
        "text/csv": {"schema": {"type": "string"}},
    },
}


# --- the app -----------------------------------------------------------------------------------


class ServingConventions:
    """ASGI middleware for what every answer of the app shares, whatever the route: a path
    with one trailing slash is routed as without it (Starlette would redirect: a 307 with an
    empty body whose ``Location`` drops an API Gateway stage), and an answer without
    ``x-model-version`` (docs, framework errors) gets the default model's version and name."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any], service: ModelService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = _without_trailing_slash(scope)
        service = self.service

        async def sender(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                if not any(key == VERSION_HEADER for key, _ in headers):
                    headers = [
                        *headers,
                        (VERSION_HEADER, service.version_header()),
                        (NAME_HEADER, service.name_header),
                        (ALIAS_HEADER, service.alias_header),
                    ]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sender)


def _without_trailing_slash(scope: Scope) -> Scope:
    scope = {**scope, "path": scope["path"][:-1]}
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw.endswith(b"/"):
        scope["raw_path"] = raw[:-1]
    return scope


class RequestRoute(APIRoute):
    """The route class of the app's own routes, whose endpoints take the request alone and
    answer a :class:`Response` (FastAPI's extension point for custom routes, "Custom Request
    and APIRoute class"). With nothing for FastAPI to solve, validate or serialise, the handler
    awaits the endpoint with the request; routing, the middleware stack and the exception
    handlers are FastAPI's as for any route. A route with parameters or dependencies gets
    FastAPI's own handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        if not _only_the_request(dependant) or not inspect.iscoroutinefunction(self.endpoint):
            return super().get_route_handler()
        endpoint, name = self.endpoint, dependant.request_param_name

        async def handler(request: Request) -> Response:
            response: Response = await (endpoint(request) if name else endpoint())
            return response

        return handler


def _only_the_request(dependant: Any) -> bool:
    return not (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or dependant.dependencies
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
    )


def answer(result: Answer) -> Response:
    """A response carrying ``result``'s status, headers (content type included) and body."""
    status, headers, payload = result
    response = Response(payload, status_code=status)  # no media type: ours is in ``headers``
    response.raw_headers.extend(headers)
    return response


def create_app(
    service: ModelService,
    settings: Settings,
    capture: CaptureBuffer | None = None,
    *,
    metrics: MetricsSink | None = None,
    endpoints: Endpoints | None = None,
    models: ModelCache | None = None,
) -> FastAPI:
    """The inference app of the default model ``service`` (around ``endpoints`` when given)
    and of every model of its registry (through ``models``; one is made when not given)."""
    if endpoints is None:
        endpoints = Endpoints(service, settings, capture, metrics)
    if models is None:
        models = model_cache(service, settings, capture, metrics=metrics)
    cache = models
    if endpoints.models is None:
        endpoints.models = cache  # where the champion's canaries are found
    app = FastAPI(
        title="treeserve inference",
        description="Predictions and TreeSHAP explanations from the XGBoost model in service.",
        version="1",
        redirect_slashes=False,  # see ServingConventions
        openapi_url=None,  # the docs routes come after the app's own (see below)
    )
    app.add_middleware(ServingConventions, service=service)
    app.router.route_class = RequestRoute  # the routes below; a user's are FastAPI's own

    async def serve(kind: Kind, request: Request) -> Response:
        content_type: str | None = None
        accept: bytes | None = None
        client_id: bytes | None = None
        for name, value in request.scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"accept":
                accept = value
            elif name == REQUEST_ID_HEADER:
                client_id = value[:MAX_REQUEST_ID_BYTES] or None
        result = await endpoints.serve_asgi_body(
            kind,
            request.receive,
            content_type,
            accept,
            scope_request_id(request.scope),
            routing_key=client_id,
        )
        return answer(result)

    @app.post(
        "/predict",
        summary="Predict",
        openapi_extra={"requestBody": REQUEST_BODY},
        responses={200: PREDICT_RESPONSE, **ERROR_RESPONSES},
        response_class=Response,
    )
    async def predict(request: Request) -> Response:
        """Predictions (probabilities and labels, or values) for each instance."""
        return await serve("predict", request)

    @app.post(
        "/explain",
        summary="Explain",
        openapi_extra={"requestBody": REQUEST_BODY},
        responses={
            200: {"description": "TreeSHAP contributions per row and feature, plus bias"},
            **ERROR_RESPONSES,
        },
        response_class=Response,
    )
    async def explain(request: Request) -> Response:
        """Per-feature TreeSHAP contributions (margin space) and bias for each instance."""
        return await serve("explain", request)

    @app.get(
        "/health",
        summary="Health",
        responses={503: ERROR_RESPONSES[503]},
        response_class=Response,
    )
    async def health() -> Response:
        """200 with the model in service ("degraded" with a broken pointer); 503 while none is
        promoted."""
        service.maybe_refresh()
        loaded = service.loaded
        problem = service.pointer_problem
        if loaded is None:
            if problem is not None:
                return answer(endpoints.error(503, "broken_pointer", problem))
            return answer(endpoints.error(503, "no_model", "no model is in service yet"))
        document: dict[str, Any] = {
            "status": "ok",
            "model": {"name": service.name, "version": loaded.version},
        }
        if problem is not None:
            # Warm environments keep serving what they loaded; new ones cannot load anything.
            document["status"] = "degraded"
            document["problem"] = (
                f"{problem}; this environment still serves version {loaded.version}, new "
                "environments cannot load a model until the pointer is repaired"
            )
        body = orjson.dumps(document)
        return Response(body, media_type="application/json")

    @app.get(
        "/model",
        summary="Model",
        responses={503: ERROR_RESPONSES[503]},
        response_class=Response,
    )
    async def model() -> Response:
        """The public manifest of the model in service."""
        service.maybe_refresh()
        try:
            loaded = service.current()
        except NoModelInService as exc:
            return answer(endpoints.error(503, "no_model", str(exc)))
        return Response(orjson.dumps(loaded.manifest.public()), media_type="application/json")

    def resolve(request: Request) -> Served | Answer:
        params = request.scope.get("path_params") or {}
        segment: str = params.get("name", "")
        ref = ModelRef.parse(segment, params.get("version"))
        if ref is None:
            return missing(segment, f"{segment[:80]!r} is not a model name (or name@alias)")
        try:
            return cache.get(ref)
        except NotFound as exc:
            return missing(ref.name, str(exc))

    def missing(name: str, message: str) -> Answer:
        header = name.encode() if ModelRef.parse(name) is not None else b""
        return (
            404,
            [
                (b"content-type", JSON_TYPE),
                (VERSION_HEADER, b"none"),
                (NAME_HEADER, header),
                (ALIAS_HEADER, b"none"),
            ],
            orjson.dumps({"error": {"type": "not_found", "message": message}}),
        )

    async def serve_named(kind: Kind, request: Request) -> Response:
        served = resolve(request)
        if isinstance(served, tuple):
            return answer(served)
        content_type: str | None = None
        accept: bytes | None = None
        client_id: bytes | None = None
        for name, value in request.scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"accept":
                accept = value
            elif name == REQUEST_ID_HEADER:
                client_id = value[:MAX_REQUEST_ID_BYTES] or None
        result = await endpoints.serve_asgi_body(
            kind,
            request.receive,
            content_type,
            accept,
            scope_request_id(request.scope),
            service=served.service,
            capture=served.capture,
            routing_key=client_id,
            routed=not is_pinned(request),
        )
        return answer(result)

    def describe(served: Served) -> Response:
        service = served.service
        try:
            loaded = service.current()
        except NoModelInService as exc:
            return answer(endpoints.error(503, "no_model", str(exc), service))
        except NotFound as exc:
            return answer(endpoints.error(404, "not_found", str(exc), service))
        response = Response(orjson.dumps(loaded.manifest.public()), media_type="application/json")
        response.raw_headers.extend(
            [
                (VERSION_HEADER, loaded.version_header),
                (NAME_HEADER, service.name_header),
                (ALIAS_HEADER, service.alias_header),
            ]
        )
        return response

    for prefix, parameters in (
        ("/models/{name}", [_NAME_PARAMETER]),
        ("/models/{name}/versions/{version}", [_NAME_PARAMETER, _VERSION_PARAMETER]),
    ):
        pinned = "versions" in prefix

        async def predict_named(request: Request) -> Response:
            """Predictions of the model named in the path (or its alias, or a version)."""
            return await serve_named("predict", request)

        async def explain_named(request: Request) -> Response:
            """TreeSHAP contributions from the model named in the path."""
            return await serve_named("explain", request)

        async def model_named(request: Request) -> Response:
            """The public manifest of the model named in the path."""
            served = resolve(request)
            return answer(served) if isinstance(served, tuple) else describe(served)

        suffix = " (a version)" if pinned else ""
        app.post(
            f"{prefix}/predict",
            summary=f"Predict with a model by name{suffix}",
            openapi_extra={"requestBody": REQUEST_BODY, "parameters": parameters},
            responses={200: PREDICT_RESPONSE, **NAMED_ERROR_RESPONSES},
            response_class=Response,
            name=f"predict_named{'_version' if pinned else ''}",
        )(predict_named)
        app.post(
            f"{prefix}/explain",
            summary=f"Explain with a model by name{suffix}",
            openapi_extra={"requestBody": REQUEST_BODY, "parameters": parameters},
            responses={
                200: {"description": "TreeSHAP contributions per row and feature, plus bias"},
                **NAMED_ERROR_RESPONSES,
            },
            response_class=Response,
            name=f"explain_named{'_version' if pinned else ''}",
        )(explain_named)
        app.get(
            prefix,
            summary=f"A model by name{suffix}",
            openapi_extra={"parameters": parameters},
            responses={404: NAMED_ERROR_RESPONSES[404], 503: ERROR_RESPONSES[503]},
            response_class=Response,
            name=f"model_named{'_version' if pinned else ''}",
        )(model_named)

    add_v2_routes(app, service, endpoints, resolve, settings)

    @app.get("/models", summary="Models", response_class=Response)
    async def models_list() -> Response:
        """Every model with a version in service: name, version, task, features."""
        return Response(orjson.dumps({"models": list_models(cache)}), media_type="application/json")

    app.router.route_class = APIRoute
    # Routes match in order: the hot ones first, then OpenAPI and the docs pages.
    app.openapi_url = "/openapi.json"
    app.setup()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101 -- registered for it
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return answer(endpoints.error(exc.status_code, kind, str(exc.detail)))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101 -- registered for it
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return answer(endpoints.error(422, "invalid_request", message[:300]))

    async def on_server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error", extra={"path": request.url.path})
        return answer(endpoints.error(500, "internal_error", "internal error; see the logs"))

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_server_error)
    return app


def add_v2_routes(
    app: FastAPI,
    service: ModelService,
    endpoints: Endpoints,
    resolve: Callable[[Request], Served | Answer],
    settings: Settings,
) -> None:
    """The Open Inference Protocol (v2) routes (DESIGN.md "Open Inference Protocol"), for every
    model ``resolve`` finds; the wire format is :mod:`treeserve.serving.oip`'s."""

    def v2_error(status: int, message: str, of: ModelService | None = None) -> Response:
        of = service if of is None else of
        return answer(
            (
                status,
                [
                    (b"content-type", JSON_TYPE),
                    (VERSION_HEADER, of.version_header()),
                    (NAME_HEADER, of.name_header),
                    (ALIAS_HEADER, of.alias_header),
                ],
                oip.error_body(message),
            )
        )

    def v2_json(document: Any, of: ModelService, loaded: Any = None) -> Response:
        version = of.version_header() if loaded is None else loaded.version_header
        return answer(
            (
                200,
                [
                    (b"content-type", JSON_TYPE),
                    (VERSION_HEADER, version),
                    (NAME_HEADER, of.name_header),
                    (ALIAS_HEADER, of.alias_header),
                ],
                orjson.dumps(document),
            )
        )

    def v2_model(request: Request) -> tuple[Served, LoadedModel] | Response:
        served = resolve(request)
        if isinstance(served, tuple):  # 404: the message of the JSON API, v2's shape
            message = orjson.loads(served[2])["error"]["message"]
            return answer((404, served[1], oip.error_body(message)))
        of = served.service
        try:
            return served, of.current()
        except NoModelInService as exc:
            return v2_error(503, str(exc), of)
        except NotFound as exc:
            return v2_error(404, str(exc), of)

    @app.get("/v2", summary="v2: server metadata", response_class=Response)
    async def v2_server() -> Response:
        """Open Inference Protocol server metadata."""
        document = {
            "name": "treeserve",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }
        return v2_json(document, service)

    @app.get("/v2/health/live", summary="v2: live", response_class=Response)
    async def v2_live() -> Response:
        """200 while the function answers."""
        return v2_json({"live": True}, service)

    @app.get("/v2/health/ready", summary="v2: ready", response_class=Response)
    async def v2_ready() -> Response:
        """200 with the default model in service, else 503."""
        service.maybe_refresh()
        if service.loaded is None:
            return v2_error(503, "no model is in service yet")
        return v2_json({"ready": True}, service)

    async def v2_metadata(request: Request) -> Response:
        """Model metadata: versions, platform, inputs and outputs (datatype, shape)."""
        found = v2_model(request)
        if isinstance(found, Response):
            return found
        served, loaded = found
        of = served.service
        predictor = loaded.predictor
        document = {
            "name": of.name,
            "versions": [] if loaded.version is None else [str(loaded.version)],
            "platform": "xgboost",
            "inputs": oip.input_metadata(loaded.schema),
            "outputs": oip.output_metadata(predictor),
        }
        return v2_json(document, of, loaded)

    async def v2_model_ready(request: Request) -> Response:
        """200 when the model (version) is in service."""
        found = v2_model(request)
        if isinstance(found, Response):
            return found
        served, loaded = found
        of = served.service
        version = "" if loaded.version is None else str(loaded.version)
        return v2_json({"name": of.name, "version": version, "ready": True}, of, loaded)

    async def v2_infer(request: Request) -> Response:
        """Open Inference Protocol inference: JSON or the binary tensor extension."""
        started = time.perf_counter()
        found = v2_model(request)
        if isinstance(found, Response):
            return found
        served, loaded = found
        of = served.service
        header_length: bytes | None = None
        client_id: bytes | None = None
        for name, value in request.scope["headers"]:
            if name == oip.HEADER_LENGTH:
                header_length = value
            elif name == REQUEST_ID_HEADER:
                client_id = value[:MAX_REQUEST_ID_BYTES] or None
        alias, alias_header = of.alias, of.alias_header
        canary = None if is_pinned(request) else of.canary
        request_id = scope_request_id(request.scope)
        if canary is not None and endpoints.models is not None:
            # No row ids in a v2 request: the client's x-request-id, else API Gateway's.
            key = client_id or (request_id or uuid.uuid4().hex).encode()
            if canary_bucket(key) < canary.percent:
                target = endpoints.models.canary(of)
                chosen = None if target is None else target.service.loaded
                if target is not None and chosen is not None:
                    loaded, alias = chosen, canary.alias
                    alias_header = target.service.alias_header
        try:
            body = await _read_body(request.receive, endpoints.max_bytes)
            if len(body) > endpoints.max_bytes:
                raise PayloadTooLarge(
                    f"body is {len(body)} bytes; the limit is {endpoints.max_bytes} bytes"
                )
            parsed = oip.parse_infer(body, header_length, loaded.schema, endpoints.max_rows)
            prediction = loaded.predictor.predict(parsed.X)
            content_type, payload, json_size = oip.encode_response(
                of.name, loaded.version, parsed, oip.outputs(loaded.predictor, prediction)
            )
        except InvalidInput as exc:
            return v2_error(exc.status, exc.message, of)
        except Exception:  # a bug or a broken model, not the client's fault: 500, logged
            logger.exception("prediction failed", extra={"route": "v2 infer"})
            return v2_error(500, "the model could not answer; see the logs", of)
        capture = served.capture
        n = parsed.X.shape[0]
        latency_ms = (time.perf_counter() - started) * 1000.0
        if capture is not None:
            prefix = request_id or uuid.uuid4().hex
            ids = [f"{prefix}-{i}" for i in range(n)]
            capture.record(
                ids,
                parsed.X,
                prediction.values,
                prediction.labels,
                loaded.version,
                manifest=loaded.manifest,
                alias=alias,
                latency_ms=latency_ms,
            )
        metrics = endpoints.metrics
        if metrics is not None:
            metrics.add_metric(name=LATENCY_METRIC, unit="Milliseconds", value=latency_ms)
            metrics.add_metric(name=ROWS_METRIC, unit="Count", value=n)
            if canary is not None or alias != CHAMPION:
                alias_dimensions(metrics, of.name, alias)
        headers = [
            (b"content-type", content_type),
            (VERSION_HEADER, loaded.version_header),
            (NAME_HEADER, of.name_header),
            (ALIAS_HEADER, alias_header),
        ]
        if json_size is not None:
            headers.append((oip.HEADER_LENGTH, str(json_size).encode()))
        return answer((200, headers, payload))

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        pinned = "_version" if "versions" in prefix else ""
        app.get(
            prefix,
            summary="v2: model metadata",
            response_class=Response,
            name=f"v2_metadata{pinned}",
        )(v2_metadata)
        app.get(
            f"{prefix}/ready",
            summary="v2: model ready",
            response_class=Response,
            name=f"v2_model_ready{pinned}",
        )(v2_model_ready)
        app.post(
            f"{prefix}/infer",
            summary="v2: infer",
            response_class=Response,
            name=f"v2_infer{pinned}",
        )(v2_infer)


def is_pinned(request: Request) -> bool:
    """Whether the route names its alias (``name@alias``, ``name@champion`` too) or a version:
    such a request is answered by what it names, never rerouted to a canary."""
    params = request.scope.get("path_params") or {}
    return "version" in params or "@" in params.get("name", "")


def list_models(cache: ModelCache) -> list[dict[str, Any]]:
    """``GET /models``: each model of the registry with a version in service (read from the
    cache when it holds the champion, else from its pointer and manifest, no model load)."""
    default = cache.default.service
    store = default.registry.store
    found = []
    for name in model_names(store):
        try:
            served = cache.peek(ModelRef(name))
            loaded = None if served is None else served.service.loaded
            if loaded is not None:
                manifest, version = loaded.manifest, loaded.version
            else:
                registry = ModelRegistry(store, name)
                pointer = registry.current()
                if pointer is None:
                    continue
                manifest, version = registry.manifest(pointer.version), pointer.version
        except Exception as exc:  # one broken model must not hide the others
            logger.warning("model not listed", extra={"model": name, "error": str(exc)[:300]})
            continue
        found.append(
            {
                "name": name,
                "version": version,
                "task": manifest.task,
                "objective": manifest.objective,
                "features": manifest.feature_names,
                "default": name == default.name,
            }
        )
    return found


def model_cache(
    service: ModelService,
    settings: Settings,
    capture: CaptureBuffer | None = None,
    *,
    metrics: MetricsSink | None = None,
) -> ModelCache:
    """The cache of every model, around the default ``service`` (and its capture buffer): the
    other models' registries share its store, each model name gets a capture buffer like it."""

    def registry_for(name: str) -> ModelRegistry:
        return ModelRegistry(service.registry.store, name)

    def capture_for(name: str) -> CaptureBuffer | None:
        buffer = CaptureBuffer(
            settings.model_bucket,
            name,
            settings.capture_sample_rate,
            settings.capture_max_rows,
            settings.capture_max_age_seconds,
            metrics=metrics,
            # as the default model's buffer writes: in the background on Lambda
            background=capture.background if capture is not None else True,
        )
        if not buffer.enabled:
            return None
        buffer.install_sigterm_flush()  # chained: every model's buffer is written at SIGTERM
        return buffer

    enabled = capture if capture is not None and capture.enabled else None
    return ModelCache(
        Served(service, enabled),
        registry_for,
        settings,
        limit_mb=settings.cache_mb,
        capture_for=capture_for if enabled is not None else None,
        metrics=metrics,
        clock=service.clock,
    )


# --- the function -------------------------------------------------------------------------------


class InferenceFunction:
    """The inference function for one execution environment: the model service (the model in
    service is loaded now, so with SnapStart it is in the snapshot), the capture buffer, the
    FastAPI app and Mangum around it. Call it with a Lambda event and context."""

    def __init__(self, settings: Settings, *, metrics: MetricsSink | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service = ModelService(_registry(settings), settings, metrics=metrics)
        self.capture = CaptureBuffer(
            settings.model_bucket,
            settings.model_name,
            settings.capture_sample_rate,
            settings.capture_max_rows,
            settings.capture_max_age_seconds,
            metrics=metrics,
            background=True,  # the request that fills the buffer does not wait for its write
        )
        if self.capture.enabled:
            self.capture.install_sigterm_flush()
        self.endpoints = Endpoints(self.service, settings, self.capture, metrics)
        self.models = model_cache(self.service, settings, self.capture, metrics=metrics)
        self.app = create_app(
            self.service,
            settings,
            self.capture,
            metrics=metrics,
            endpoints=self.endpoints,
            models=self.models,
        )
        self.mangum = Mangum(self.app, lifespan="off", api_gateway_base_path=settings.api_base_path)

    def __call__(self, event: Any, context: Any) -> dict[str, Any]:
        """The answer to one event: through Mangum to the app, or a 400 for an event that is
        not an HTTP request Mangum can read."""
        refused = refuse_event(self.endpoints, event)
        if refused is not None:
            return refused
        try:
            response: dict[str, Any] = self.mangum(event, context)
        except Exception:  # a body that is not base64, or an event refuse_event let through
            bad_body = bad_base64_body(self.endpoints, event)
            if bad_body is not None:
                return bad_body
            logger.exception("the event could not be served")
            response = proxy_response(
                *self.endpoints.error(
                    500, "internal_error", "the event could not be served; see the logs"
                )
            )
        if response.get("statusCode", 200) >= 500 and self.metrics is not None:
            self.server_error()
        return response

    def server_error(self) -> None:
        """Count a 5xx answer by the function version that gave it: a code deploy's alarm
        watches the new version's (template.yaml, InferenceNewVersion5xxAlarm)."""
        assert self.metrics is not None  # noqa: S101 -- checked by the caller
        self.metrics.add_metric(name=SERVER_ERRORS_METRIC, unit="Count", value=1)
        self.metrics.add_dimensions(function_version=self.settings.function_version)

    def warm(self, context: Any) -> None:
        """Before a snapshot: one prediction through the whole path (imports, caches, the
        app's middleware stack), captured nowhere."""
        loaded = self.service.loaded
        if loaded is None:
            return
        row = b"[" + b",".join([b"null"] * loaded.schema.width) + b"]"
        capture_state, self.endpoints.capture = self.endpoints.capture, None
        try:
            self(warm_event(b'{"instances": [' + row + b"]}"), context)
        finally:
            self.endpoints.capture = capture_state

    def after_restore(self) -> None:
        """A restored snapshot may run much later, elsewhere: new clients, a fresh pointer
        check."""
        reset_clients()
        self.service.registry = _registry(self.settings)
        for buffer in {id(b): b for b in [self.capture, *self.models.captures()]}.values():
            buffer.reseed()
        self.models.clear()  # the other models load again, with the new clients
        self.service.refresh()


def _registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(S3RegistryStore(settings.model_bucket), settings.model_name)


def warm_event(body: bytes) -> dict[str, Any]:
    """An HTTP API (payload 2.0) ``POST /predict`` event with ``body``, as API Gateway sends."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/predict",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "localhost"},
        "requestContext": {
            "http": {"method": "POST", "path": "/predict", "sourceIp": "127.0.0.1"},
            "requestId": "warm",
            "routeKey": "$default",
            "stage": "$default",
        },
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }
