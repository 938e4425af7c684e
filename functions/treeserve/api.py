"""The inference HTTP API: a FastAPI app (DESIGN.md "HTTP API").

Routes: ``POST /predict``, ``POST /explain``, ``GET /health``, ``GET /model``, ``GET /docs``,
``GET /openapi.json``. Bodies are parsed by :mod:`treeserve.inputs` from the raw bytes (the
OpenAPI document still describes them, through ``openapi_extra``); answers are serialised with
orjson. Every answer, errors included, carries ``x-model-version``; errors are
``{"error": {"type", "message"}}`` and client input never yields a 5xx.

The hot path. :class:`InferenceApp` is a FastAPI app whose ``__call__`` hands ``POST /predict``
and ``POST /explain`` straight to :meth:`Endpoints.asgi`, the same code the declared FastAPI
routes call, skipping Starlette's middleware and routing stack and FastAPI's request/response
objects (about 90 microseconds per request on the bench machine, a third of a 1-row
``inplace_predict``). Everything else (docs, health, errors from the framework) goes through
FastAPI as usual. ``create_app(..., fast_path=False)`` serves the two routes through FastAPI;
the tests run both ways and compare.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from treeserve.errors import InvalidInput, NoModelInService, PayloadTooLarge
from treeserve.inputs import parse_body

if TYPE_CHECKING:
    from treeserve.capture import CaptureBuffer
    from treeserve.serving import LoadedModel, MetricsSink, ModelService
    from treeserve.settings import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Kind = Literal["predict", "explain"]

VERSION_HEADER = b"x-model-version"
JSON_TYPE = b"application/json"
CSV_TYPE = b"text/csv; charset=utf-8"
FAST_ROUTES: dict[str, Kind] = {"/predict": "predict", "/explain": "explain"}
# TreeSHAP costs far more per row than prediction; keep explain well inside the timeout.
MAX_EXPLAIN_ROWS = 1000
LATENCY_METRIC = "PredictLatency"
ROWS_METRIC = "PredictedRows"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


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


# --- the endpoints -----------------------------------------------------------------------------


def _error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "message": message}})


def _wants_csv(accept: bytes | None) -> bool:
    if not accept or b"csv" not in accept:
        return False
    first = accept.split(b",", 1)[0].strip().lower()
    return first.startswith(b"text/csv") or b"json" not in accept


class Endpoints:
    """Predict and explain, from raw bytes to (status, headers, body)."""

    def __init__(
        self,
        service: ModelService,
        settings: Settings,
        capture: CaptureBuffer | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.service = service
        self.max_rows = settings.max_rows
        self.max_explain_rows = min(settings.max_rows, MAX_EXPLAIN_ROWS)
        self.max_bytes = settings.max_body_bytes
        self.capture = capture if capture is not None and capture.enabled else None
        self.metrics = metrics

    def error(self, status: int, kind: str, message: str) -> Answer:
        return (
            status,
            [(b"content-type", JSON_TYPE), (VERSION_HEADER, self.service.version_header())],
            _error_body(kind, message),
        )

    def handle(
        self,
        kind: Kind,
        body: bytes,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
    ) -> Answer:
        """Serve one predict/explain request. Client errors become 4xx answers here."""
        started = time.perf_counter()
        service = self.service
        service.maybe_refresh()
        try:
            loaded = service.current()
            parsed = parse_body(
                body,
                content_type,
                loaded.schema,
                max_rows=self.max_rows if kind == "predict" else self.max_explain_rows,
                max_bytes=self.max_bytes,
                id_prefix=request_id,
            )
        except InvalidInput as exc:
            return self.error(exc.status, exc.type, exc.message)
        except NoModelInService as exc:
            return self.error(503, "no_model", str(exc))
        csv_out = _wants_csv(accept)
        if kind == "predict":
            payload = self._predict(loaded, parsed.X, parsed.ids, csv_out)
        else:
            payload = self._explain(loaded, parsed.X, parsed.ids, csv_out)
        if self.metrics is not None:
            self.metrics.add_metric(
                name=LATENCY_METRIC,
                unit="Milliseconds",
                value=(time.perf_counter() - started) * 1000.0,
            )
            self.metrics.add_metric(name=ROWS_METRIC, unit="Count", value=len(parsed.ids))
        return (
            200,
            [
                (b"content-type", CSV_TYPE if csv_out else JSON_TYPE),
                (VERSION_HEADER, loaded.version_header),
            ],
            payload,
        )

    def _predict(self, loaded: LoadedModel, X: np.ndarray, ids: list[Any], csv_out: bool) -> bytes:
        predictor = loaded.predictor
        prediction = predictor.predict(X)
        if self.capture is not None:
            self.capture.record(ids, X, prediction.values, prediction.labels, loaded.version)
        if csv_out:
            return _predict_csv(ids, prediction.values, prediction.labels, predictor.class_names)
        document: dict[str, Any] = {
            "model": {"name": predictor.manifest.name, "version": loaded.version},
            "predictions": prediction.values,
        }
        if prediction.labels is not None:
            document["labels"] = prediction.labels
        document["ids"] = ids
        return orjson.dumps(document, option=_NUMPY)

    def _explain(self, loaded: LoadedModel, X: np.ndarray, ids: list[Any], csv_out: bool) -> bytes:
        predictor = loaded.predictor
        explanation = predictor.explain(X)
        if csv_out:
            return _explain_csv(ids, explanation.contributions, explanation.bias, explanation)
        document: dict[str, Any] = {
            "model": {"name": predictor.manifest.name, "version": loaded.version},
            "feature_names": explanation.feature_names,
        }
        if explanation.class_names is not None:
            document["classes"] = explanation.class_names
        document["contributions"] = explanation.contributions
        document["bias"] = explanation.bias
        document["ids"] = ids
        document["space"] = "margin"
        return orjson.dumps(document, option=_NUMPY)

    async def asgi(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve predict/explain as a raw ASGI app (the hot path)."""
        content_type: str | None = None
        accept: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"accept":
                accept = value
        message = await receive()  # Mangum delivers the whole body in one message
        if message.get("more_body", False):
            status, headers, payload = await self.serve_asgi_body(
                kind, _replay(message, receive), content_type, accept, _request_id(scope)
            )
        else:
            status, headers, payload = self.safe_handle(
                kind, message.get("body", b""), content_type, accept, _request_id(scope)
            )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def serve_asgi_body(
        self,
        kind: Kind,
        receive: Receive,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
    ) -> Answer:
        try:
            body = await _read_body(receive, self.max_bytes)
        except PayloadTooLarge as exc:
            return self.error(exc.status, exc.type, exc.message)
        return self.safe_handle(kind, body, content_type, accept, request_id)

    def safe_handle(
        self,
        kind: Kind,
        body: bytes,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
    ) -> Answer:
        try:
            return self.handle(kind, body, content_type, accept, request_id)
        except Exception:  # a bug or a broken model, not the client's fault: 500, logged
            logger.exception("prediction failed", extra={"route": kind})
            return self.error(500, "internal_error", "the model could not answer; see the logs")


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive callable that yields ``first`` again, then the rest."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body is larger than the limit of {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _request_id(scope: Scope) -> str | None:
    event = scope.get("aws.event")
    if isinstance(event, dict):
        context = event.get("requestContext")
        if isinstance(context, dict):
            rid = context.get("requestId")
            if isinstance(rid, str) and rid:
                return rid[:64]
    return None


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _csv_text(rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    return out.getvalue().encode()


def _predict_csv(
    ids: list[Any], values: np.ndarray, labels: list[Any] | None, class_names: list[Any] | None
) -> bytes:
    if values.ndim == 2:
        k = values.shape[1]
        names = class_names if class_names and len(class_names) == k else list(range(k))
        header = ["id", *(f"prob_{name}" for name in names), "label"]
        rows = [
            [i, *probs, label]
            for i, probs, label in zip(ids, values.tolist(), labels or [], strict=True)
        ]
    elif labels is not None:
        header = ["id", "prediction", "label"]
        rows = [[i, p, lab] for i, p, lab in zip(ids, values.tolist(), labels, strict=True)]
    else:
        header = ["id", "prediction"]
        rows = [[i, p] for i, p in zip(ids, values.tolist(), strict=True)]
    return _csv_text([header, *rows])


def _explain_csv(ids: list[Any], contributions: np.ndarray, bias: np.ndarray, ex: Any) -> bytes:
    names: list[str] = ex.feature_names
    if contributions.ndim == 3:
        header = ["id", "class", "bias", *names]
        rows = [
            [row_id, cls, bias[r, c].item(), *contributions[r, c].tolist()]
            for r, row_id in enumerate(ids)
            for c, cls in enumerate(ex.class_names)
        ]
    else:
        header = ["id", "bias", *names]
        rows = [
            [row_id, bias[r].item(), *contributions[r].tolist()] for r, row_id in enumerate(ids)
        ]
    return _csv_text([header, *rows])


# --- the app -----------------------------------------------------------------------------------


class InferenceApp(FastAPI):
    """FastAPI with a direct ASGI path for the two hot routes (see the module docstring)."""

    endpoints: Endpoints
    fast_path: bool = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.fast_path and scope["method"] == "POST":
                kind = FAST_ROUTES.get(_route_path(scope))
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


def create_app(
    service: ModelService,
    settings: Settings,
    capture: CaptureBuffer | None = None,
    *,
    metrics: MetricsSink | None = None,
    fast_path: bool = True,
) -> FastAPI:
    """The inference app for one model service."""
    endpoints = Endpoints(service, settings, capture, metrics)
    app = InferenceApp(
        title="treeserve inference",
        description="Predictions and TreeSHAP explanations from the XGBoost model in service.",
        version="1",
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
            _request_id(request.scope),
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
        """200 with the model in service; 503 while none is promoted."""
        service.maybe_refresh()
        loaded = service.loaded
        if loaded is None:
            return answer(endpoints.error(503, "no_model", "no model is in service yet"))
        body = orjson.dumps(
            {"status": "ok", "model": {"name": service.name, "version": loaded.version}}
        )
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
