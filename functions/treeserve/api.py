"""The inference HTTP API: a FastAPI app (DESIGN.md "HTTP API").

Routes: ``POST /predict``, ``POST /explain``, ``GET /health``, ``GET /model``, ``GET /docs``,
``GET /openapi.json``. Bodies are parsed by :mod:`treeserve.inputs` from the raw bytes (the
OpenAPI document still describes them, through ``openapi_extra``); answers are serialised with
orjson. Every answer, errors included, carries ``x-model-version``; errors are
``{"error": {"type", "message"}}`` and client input never yields a 5xx.

The hot path. :class:`InferenceApp` is a FastAPI app whose ``__call__`` hands ``POST /predict``
and ``POST /explain`` straight to :meth:`~treeserve.endpoints.Endpoints.asgi`, the same code the
declared FastAPI routes call, skipping Starlette's middleware and routing stack and FastAPI's
request/response objects (about 90 microseconds per request on the bench machine).
Everything else (docs, health, errors from the framework) goes through FastAPI as usual.
``create_app(..., fast_path=False)`` serves the two routes through FastAPI; the tests run both
ways and compare. On Lambda, payload 2.0 events skip even this app
(:func:`treeserve.endpoints.answer_v2_event`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from treeserve.endpoints import (
    FAST_ROUTES,
    VERSION_HEADER,
    Answer,
    Endpoints,
    Kind,
    Message,
    Receive,
    Scope,
    Send,
    route_path,
    scope_request_id,
)
from treeserve.errors import NoModelInService

if TYPE_CHECKING:
    from treeserve.capture import CaptureBuffer
    from treeserve.serving import MetricsSink, ModelService
    from treeserve.settings import Settings

logger = logging.getLogger(__name__)

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
PREDICT_RESPONSE = {
    "description": "predictions, one per instance",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "model": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
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


class InferenceApp(FastAPI):
    """FastAPI with a direct ASGI path for the two hot routes (see the module docstring)."""

    endpoints: Endpoints
    fast_path: bool = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = route_path(scope)
            if len(route) > 1 and route.endswith("/"):
                scope = _without_trailing_slash(scope)
                route = route[:-1]
            if self.fast_path and scope["method"] == "POST":
                kind = FAST_ROUTES.get(route)
                if kind is not None:
                    await self.endpoints.asgi(kind, scope, receive, send)
                    return
            send = self._with_version_header(send)
        await super().__call__(scope, receive, send)

    def _with_version_header(self, send: Send) -> Send:
        service = self.endpoints.service

        async def sender(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != VERSION_HEADER
                ]
                headers.append((VERSION_HEADER, service.version_header()))
                message = {**message, "headers": headers}
            await send(message)

        return sender


def _without_trailing_slash(scope: Scope) -> Scope:
    # Every route answers with one trailing slash too (Starlette would redirect: a 307 with an
    # empty body whose Location drops an API Gateway stage).
    scope = {**scope, "path": scope["path"][:-1]}
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw.endswith(b"/"):
        scope["raw_path"] = raw[:-1]
    return scope


def create_app(
    service: ModelService,
    settings: Settings,
    capture: CaptureBuffer | None = None,
    *,
    metrics: MetricsSink | None = None,
    fast_path: bool = True,
    endpoints: Endpoints | None = None,
) -> FastAPI:
    """The inference app for one model service (around ``endpoints`` when given: the
    inference function shares them with its direct path)."""
    if endpoints is None:
        endpoints = Endpoints(service, settings, capture, metrics)
    app = InferenceApp(
        title="treeserve inference",
        description="Predictions and TreeSHAP explanations from the XGBoost model in service.",
        version="1",
        redirect_slashes=False,  # see _without_trailing_slash
    )
    app.endpoints = endpoints
    app.fast_path = fast_path

    def answer(result: Answer) -> Response:
        status, headers, payload = result
        response = Response(payload, status_code=status)
        for key, value in headers:
            response.headers[key.decode()] = value.decode()
        return response

    async def serve(kind: Kind, request: Request) -> Response:
        # Same code as the fast path, through FastAPI's request object.
        accept = request.headers.get("accept")
        result = await endpoints.serve_asgi_body(
            kind,
            request.receive,
            request.headers.get("content-type"),
            None if accept is None else accept.encode("latin-1"),
            scope_request_id(request.scope),
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
