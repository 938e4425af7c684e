"""Predict and explain from raw bytes to (status, headers, body), without a web framework.

:class:`Endpoints` is what ``POST /predict`` and ``POST /explain`` do; the FastAPI app's routes
(:mod:`treeserve.serving.api`) call it, and nothing else serves those routes. Every answer, errors
included, carries ``x-model-version`` and ``x-model-alias`` (who answered: ``champion``, a
canary's or a pinned alias, ``none`` for a pinned version); errors are ``{"error": {"type", "message"}}``; client
input never yields a 5xx. :func:`refuse_event` answers, with a 400, the Lambda events that are
not HTTP requests Mangum can read.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import io
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson

from treeserve.errors import InvalidInput, NoModelInService, NotFound, PayloadTooLarge
from treeserve.registry.model_registry import CHAMPION
from treeserve.registry.routing import canary_bucket, ids_key
from treeserve.serving.inputs import ParsedInput, parse_body

if TYPE_CHECKING:
    from treeserve.model.predictor import Prediction
    from treeserve.serving.capture import CaptureBuffer
    from treeserve.serving.service import LoadedModel, MetricsSink, ModelCache, ModelService
    from treeserve.settings import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Kind = Literal["predict", "explain"]

VERSION_HEADER = b"x-model-version"
NAME_HEADER = b"x-model-name"
# Who answered: "champion", the alias (a canary, or a name@alias route), "none" (a version pin).
ALIAS_HEADER = b"x-model-alias"
# The client's request id: a canary's routing key when the request names no row ids (a retry
# that sends the same header lands on the same version; API Gateway's requestId does not).
REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_BYTES = 128
JSON_TYPE = b"application/json"
CSV_TYPE = b"text/csv; charset=utf-8"
LATENCY_METRIC = "PredictLatency"
ROWS_METRIC = "PredictedRows"
_NUMPY = orjson.OPT_SERIALIZE_NUMPY

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


# --- the endpoints -----------------------------------------------------------------------------


def _error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "message": message}})


def _wants_csv(accept: bytes | None) -> bool:
    """Whether ``Accept`` prefers ``text/csv`` to ``application/json`` (every path asks this).

    Content negotiation as RFC 9110 12.5.1: each type takes the q of the most specific range
    that matches it (``text/csv`` over ``text/*`` over ``*/*``; parameters other than q are
    ignored, a range with an invalid q is skipped). CSV only when its q is higher, or equal and
    matched more specifically, or equal and as specific but listed first; otherwise JSON, also
    when neither is acceptable (no 406: the default is always served).
    """
    if not accept or accept in _PLAIN_ACCEPT:  # most requests: no parsing at all
        return False
    if len(accept) > _CACHED_ACCEPT_BYTES:
        return _prefers_csv(accept)
    return _prefers_csv_cached(accept)


_PLAIN_ACCEPT = frozenset((b"*/*", b"application/json"))
_CACHED_ACCEPT_BYTES = 256
# (q, specificity, -position) of the range that decides each type: higher wins.
_Match = tuple[float, int, int]
_NO_MATCH: _Match = (0.0, 0, 0)


def _prefers_csv(accept: bytes) -> bool:
    json_match, csv_match = _NO_MATCH, _NO_MATCH
    json_rank = csv_rank = 0  # specificity of the range chosen so far (0: none)
    for position, element in enumerate(accept.lower().split(b",")):
        media, _, params = element.partition(b";")
        media = media.strip()
        q = _quality(params)
        if q is None:
            continue
        json_rank_here = _specificity(media, b"application/", b"application/json")
        if json_rank_here > json_rank:
            json_rank, json_match = json_rank_here, (q, json_rank_here, -position)
        csv_rank_here = _specificity(media, b"text/", b"text/csv")
        if csv_rank_here > csv_rank:
            csv_rank, csv_match = csv_rank_here, (q, csv_rank_here, -position)
    return csv_match[0] > 0.0 and csv_match > json_match


_prefers_csv_cached = functools.lru_cache(maxsize=128)(_prefers_csv)


def _specificity(media: bytes, type_prefix: bytes, full: bytes) -> int:
    if media == full:
        return 3
    if media == type_prefix + b"*":
        return 2
    return 1 if media == b"*/*" else 0


def _quality(params: bytes) -> float | None:
    """The q parameter (1 when absent); None when it is not a number in [0, 1]."""
    if b"q=" not in params:
        return 1.0
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip() == b"q":
            try:
                q = float(value.strip())
            except ValueError:
                return None
            return q if 0.0 <= q <= 1.0 else None
    return 1.0


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
        self.max_explain_rows = settings.max_explain_rows
        self.max_bytes = settings.max_body_bytes
        self.capture = capture if capture is not None and capture.enabled else None
        self.metrics = metrics
        # Where canaries are found (the app's model cache; create_app sets it). None: no canary.
        self.models: ModelCache | None = None

    def error(
        self, status: int, kind: str, message: str, service: ModelService | None = None
    ) -> Answer:
        service = self.service if service is None else service
        return (
            status,
            [
                (b"content-type", JSON_TYPE),
                (VERSION_HEADER, service.version_header()),
                (NAME_HEADER, service.name_header),
                (ALIAS_HEADER, service.alias_header),
            ],
            _error_body(kind, message),
        )

    def handle(
        self,
        kind: Kind,
        body: bytes,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
        *,
        service: ModelService | None = None,
        capture: CaptureBuffer | bool | None = True,
        routing_key: bytes | None = None,
        routed: bool = True,
    ) -> Answer:
        """Serve one predict/explain request (of the default model, or of ``service`` with its
        ``capture`` buffer). Client errors become 4xx answers here.

        A champion's request goes to its model's canary (:attr:`ModelService.canary`) when
        :func:`canary_bucket` of its key is below the canary's percent: the key is the row ids
        the client sent, else ``routing_key`` (the client's ``x-request-id``), else
        ``request_id`` (API Gateway's, which a retry does not keep). ``routed=False``: a
        request that named its alias (``name@champion``) is never rerouted."""
        started = time.perf_counter()
        if service is None:
            service = self.service
            service.maybe_refresh()
        buffer: CaptureBuffer | None = (
            self.capture if capture is True else None if isinstance(capture, bool) else capture
        )
        max_rows = self.max_rows if kind == "predict" else self.max_explain_rows
        try:
            loaded = service.current()
            if kind == "explain":
                loaded.predictor.check_explainable()
            parsed = parse_body(
                body,
                content_type,
                loaded.schema,
                max_rows=max_rows,
                max_bytes=self.max_bytes,
                id_prefix=request_id,
            )
        except InvalidInput as exc:
            return self.error(exc.status, exc.type, exc.message, service)
        except NoModelInService as exc:
            return self.error(503, "no_model", str(exc), service)
        except NotFound as exc:
            return self.error(404, "not_found", str(exc), service)
        alias, alias_header = service.alias, service.alias_header
        canary = service.canary if routed else None
        if canary is not None and self.models is not None:
            if parsed.ids_generated:
                key = routing_key or (request_id or parsed.ids[0]).encode()
            else:
                key = ids_key(parsed.ids)
            target = self.models.canary(service) if canary_bucket(key) < canary.percent else None
            if target is not None and target.service.loaded is not None:
                try:
                    loaded, parsed = self._for_canary(
                        target.service.loaded,
                        loaded,
                        parsed,
                        kind=kind,
                        body=body,
                        content_type=content_type,
                        max_rows=max_rows,
                    )
                except InvalidInput as exc:
                    return self.error(exc.status, exc.type, exc.message, target.service)
                alias, alias_header = canary.alias, target.service.alias_header
        csv_out = _wants_csv(accept)
        if kind == "predict":
            payload, prediction = self._predict(loaded, parsed.X, parsed.ids, csv_out, alias)
        else:
            payload = self._explain(loaded, parsed.X, parsed.ids, csv_out, alias)
        if buffer is not None or self.metrics is not None:
            latency_ms = (time.perf_counter() - started) * 1000.0
            if buffer is not None and kind == "predict":
                buffer.record(
                    parsed.ids,
                    parsed.X,
                    prediction.values,
                    prediction.labels,
                    loaded.version,
                    manifest=loaded.manifest,
                    alias=alias,
                    latency_ms=latency_ms,
                )
            if self.metrics is not None:
                self.metrics.add_metric(name=LATENCY_METRIC, unit="Milliseconds", value=latency_ms)
                self.metrics.add_metric(name=ROWS_METRIC, unit="Count", value=len(parsed.ids))
                if canary is not None or alias != CHAMPION:
                    alias_dimensions(self.metrics, service.name, alias)
        return (
            200,
            [
                (b"content-type", CSV_TYPE if csv_out else JSON_TYPE),
                (VERSION_HEADER, loaded.version_header),
                (NAME_HEADER, service.name_header),
                (ALIAS_HEADER, alias_header),
            ],
            payload,
        )

    def _for_canary(
        self,
        chosen: LoadedModel,
        champion: LoadedModel,
        parsed: ParsedInput,
        *,
        kind: Kind,
        body: bytes,
        content_type: str | None,
        max_rows: int,
    ) -> tuple[LoadedModel, ParsedInput]:
        """The canary's model and the request's rows for it: parsed again (ids kept) only when
        its features differ from the champion's. InvalidInput when they do not fit it."""
        if kind == "explain":
            chosen.predictor.check_explainable()
        if same_features(chosen, champion):
            return chosen, parsed
        again = parse_body(
            body, content_type, chosen.schema, max_rows=max_rows, max_bytes=self.max_bytes
        )
        return chosen, ParsedInput(again.X, parsed.ids, parsed.ids_generated)

    def _predict(
        self,
        loaded: LoadedModel,
        X: np.ndarray,
        ids: list[Any],
        csv_out: bool,
        alias: str | None,
    ) -> tuple[bytes, Prediction]:
        predictor = loaded.predictor
        prediction = predictor.predict(X)
        if csv_out:
            payload = _predict_csv(
                ids,
                prediction.values,
                prediction.labels,
                predictor.class_names,
                predictor.output_names,
            )
            return payload, prediction
        document: dict[str, Any] = {
            "model": {"name": predictor.manifest.name, "version": loaded.version, "alias": alias},
            "predictions": prediction.values,
        }
        if prediction.labels is not None:
            document["labels"] = prediction.labels
        document["ids"] = ids
        return orjson.dumps(document, option=_NUMPY), prediction

    def _explain(
        self, loaded: LoadedModel, X: np.ndarray, ids: list[Any], csv_out: bool, alias: str | None
    ) -> bytes:
        predictor = loaded.predictor
        explanation = predictor.explain(X)
        if csv_out:
            return _explain_csv(ids, explanation.contributions, explanation.bias, explanation)
        document: dict[str, Any] = {
            "model": {"name": predictor.manifest.name, "version": loaded.version, "alias": alias},
            "feature_names": explanation.feature_names,
        }
        if explanation.class_names is not None:
            document["classes"] = explanation.class_names
        if explanation.output_names is not None:
            document["outputs"] = explanation.output_names
        document["contributions"] = explanation.contributions
        document["bias"] = explanation.bias
        document["ids"] = ids
        document["space"] = "margin"
        return orjson.dumps(document, option=_NUMPY)

    async def serve_asgi_body(
        self,
        kind: Kind,
        receive: Receive,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
        *,
        service: ModelService | None = None,
        capture: CaptureBuffer | bool | None = True,
        routing_key: bytes | None = None,
        routed: bool = True,
    ) -> Answer:
        try:
            body = await _read_body(receive, self.max_bytes)
        except PayloadTooLarge as exc:
            return self.error(exc.status, exc.type, exc.message, service)
        return self.safe_handle(
            kind,
            body,
            content_type,
            accept,
            request_id,
            service=service,
            capture=capture,
            routing_key=routing_key,
            routed=routed,
        )

    def safe_handle(
        self,
        kind: Kind,
        body: bytes,
        content_type: str | None,
        accept: bytes | None,
        request_id: str | None,
        *,
        service: ModelService | None = None,
        capture: CaptureBuffer | bool | None = True,
        routing_key: bytes | None = None,
        routed: bool = True,
    ) -> Answer:
        try:
            return self.handle(
                kind,
                body,
                content_type,
                accept,
                request_id,
                service=service,
                capture=capture,
                routing_key=routing_key,
                routed=routed,
            )
        except Exception:  # a bug or a broken model, not the client's fault: 500, logged
            logger.exception("prediction failed", extra={"route": kind})
            return self.error(
                500, "internal_error", "the model could not answer; see the logs", service
            )


def same_features(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether rows parsed for ``b`` are rows for ``a`` (same features, same categories)."""
    return a.schema is b.schema or (
        a.schema.names == b.schema.names and a.schema.categories == b.schema.categories
    )


def alias_dimensions(metrics: MetricsSink, model: str, alias: str | None) -> None:
    """Publish this invocation's metrics also by ``model`` and ``alias`` (an extra EMF
    dimension set: the service-level series, which the alarms watch, stay as they are)."""
    metrics.add_dimensions(model=model, alias=alias or "none")


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


def scope_request_id(scope: Scope) -> str | None:
    event = scope.get("aws.event")
    return _context_request_id(event.get("requestContext")) if isinstance(event, dict) else None


def _context_request_id(context: Any) -> str | None:
    if isinstance(context, dict):
        rid = context.get("requestId")
        if isinstance(rid, str) and rid:
            return rid[:64]
    return None


def _csv_text(rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    return out.getvalue().encode()


def prediction_table(
    ids: list[Any],
    values: np.ndarray,
    labels: list[Any] | None,
    class_names: list[Any] | None,
    output_names: list[str] | None,
) -> tuple[list[Any], list[list[Any]]]:
    """The CSV answer's header and rows: ``id,prediction[,label]``, ``id,prob_<class>...,label``
    or ``id,<output name>...`` (predict with ``Accept: text/csv``, and batch scoring's output)."""
    if values.ndim == 2 and labels is not None:  # class probabilities
        k = values.shape[1]
        names = class_names if class_names and len(class_names) == k else list(range(k))
        header = ["id", *(f"prob_{name}" for name in names), "label"]
        rows = [
            [i, *probs, label] for i, probs, label in zip(ids, values.tolist(), labels, strict=True)
        ]
    elif values.ndim == 2:  # several quantiles or targets: one named column each
        k = values.shape[1]
        outputs = output_names if output_names and len(output_names) == k else None
        header = ["id", *(outputs or (f"output_{j}" for j in range(k)))]
        rows = [[i, *row] for i, row in zip(ids, values.tolist(), strict=True)]
    elif labels is not None:
        header = ["id", "prediction", "label"]
        rows = [[i, p, lab] for i, p, lab in zip(ids, values.tolist(), labels, strict=True)]
    else:
        header = ["id", "prediction"]
        rows = [[i, p] for i, p in zip(ids, values.tolist(), strict=True)]
    return header, rows


def _predict_csv(
    ids: list[Any],
    values: np.ndarray,
    labels: list[Any] | None,
    class_names: list[Any] | None,
    output_names: list[str] | None,
) -> bytes:
    header, rows = prediction_table(ids, values, labels, class_names, output_names)
    return _csv_text([header, *rows])


def _explain_csv(ids: list[Any], contributions: np.ndarray, bias: np.ndarray, ex: Any) -> bytes:
    """One row per input row, or per (row, class) / (row, output) when there are several."""
    names: list[str] = ex.feature_names
    if contributions.ndim == 3:
        column, blocks = (
            ("class", ex.class_names) if ex.class_names is not None else ("output", ex.output_names)
        )
        header = ["id", column, "bias", *names]
        rows = [
            [row_id, block, bias[r, c].item(), *contributions[r, c].tolist()]
            for r, row_id in enumerate(ids)
            for c, block in enumerate(blocks)
        ]
    else:
        header = ["id", "bias", *names]
        rows = [
            [row_id, bias[r].item(), *contributions[r].tolist()] for r, row_id in enumerate(ids)
        ]
    return _csv_text([header, *rows])


# --- events Mangum cannot take -----------------------------------------------------------------

NOT_HTTP = (
    "this function answers HTTP requests: API Gateway (HTTP API or REST API) and Function URL "
    "proxy events; send the request through the API, or invoke with such an event (see events/)"
)


def refuse_event(endpoints: Endpoints, event: Any) -> dict[str, Any] | None:
    """A 400 for an event Mangum would raise on (an S3 or scheduled event, ``{}``, an API event
    without ``requestContext``, fields of the wrong type, a body that is not base64 or text);
    None for an event it can serve. Logs a warning for each refusal."""
    problem = _event_problem(event)
    if problem is None:
        return None
    kind, message = problem
    logger.warning("event refused", extra={"reason": message, "keys": _keys(event)})
    return proxy_response(*endpoints.error(400, kind, message))


def _keys(event: Any) -> list[str]:
    return sorted(str(k)[:40] for k in event)[:20] if isinstance(event, dict) else []


def _event_problem(event: Any) -> tuple[str, str] | None:
    if not isinstance(event, dict):
        return "bad_event", f"{NOT_HTTP}; this event is a {type(event).__name__}"
    context = event.get("requestContext")
    if not isinstance(context, dict):
        return "bad_event", f"{NOT_HTTP}; this event has no requestContext"
    if "elb" in context:  # Mangum's ALB handler: not wired by the template, but HTTP
        return None
    if "version" in event and event["version"] == "2.0":
        wrong = _v2_fields(event, context)
    elif "version" in event or "resource" in event:
        wrong = _v1_fields(event, context)
    else:
        return "bad_event", f"{NOT_HTTP}; this event has neither version nor resource"
    if wrong:
        return "bad_event", f"the event's {wrong} is not what API Gateway sends; {NOT_HTTP}"
    try:
        _check_event_body(event)
    except (binascii.Error, ValueError, TypeError):
        return "malformed_body", "the event's body is not valid base64 or text"
    return None


def _v2_fields(event: dict[str, Any], context: dict[str, Any]) -> str | None:
    http = context.get("http")
    if not isinstance(http, dict) or "sourceIp" not in http:
        return "requestContext.http"
    if not isinstance(http.get("method"), str) or not isinstance(http.get("path"), str):
        return "requestContext.http"
    headers = event.get("headers", {})
    if not _text_map(headers) or not _host_and_port(_lowered(headers)):
        return "headers"
    cookies = event.get("cookies")
    if cookies and not (isinstance(cookies, list) and all(_is_text(c) for c in cookies)):
        return "cookies"
    if not _is_text(event.get("rawQueryString", "")):
        return "rawQueryString"
    return None


def _v1_fields(event: dict[str, Any], context: dict[str, Any]) -> str | None:
    if not isinstance(event.get("httpMethod"), str) or not isinstance(event.get("path"), str):
        return "httpMethod or path"
    if not isinstance(context.get("identity", {}), dict):
        return "requestContext.identity"
    headers = event.get("headers") or {}
    if not _text_map(headers):
        return "headers"
    effective = _lowered(headers)
    multi = event.get("multiValueHeaders")
    if multi:  # as Mangum: these override ``headers``, a list joined by ", "
        if not isinstance(multi, dict) or not all(_is_text(k) for k in multi):
            return "multiValueHeaders"
        for name, values in multi.items():
            if isinstance(values, list) and not all(_is_text(v) for v in values):
                return "multiValueHeaders"
            effective[name.lower()] = ", ".join(values) if isinstance(values, list) else ""
    if not _host_and_port(effective):
        return "headers"
    for name in ("multiValueQueryStringParameters", "queryStringParameters"):
        if event.get(name) and not isinstance(event[name], dict):
            return name
    return None


def _is_text(value: Any) -> bool:
    # Text that encodes as UTF-8 (Mangum encodes header names and values).
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text_map(headers: Any) -> bool:
    return isinstance(headers, dict) and all(
        _is_text(k) and _is_text(v) for k, v in headers.items()
    )


def _lowered(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _host_and_port(headers: dict[str, str]) -> bool:
    # Mangum reads the server from ``host`` ("name" or "name:port") or ``x-forwarded-port``.
    host = headers.get("host", "mangum")
    port = host.split(":", 1)[1] if ":" in host else headers.get("x-forwarded-port", "80")
    return port.isascii() and port.isdigit() and ":" not in port


def bad_base64_body(endpoints: Endpoints, event: Any) -> dict[str, Any] | None:
    """The 400 for an event whose body says it is base64 and is not (what Mangum raised on);
    None otherwise."""
    if not (isinstance(event, dict) and event.get("isBase64Encoded", False)):
        return None
    try:
        base64.b64decode(event.get("body", b"") or b"")
    except (binascii.Error, ValueError):
        message = "the event's body is not valid base64 or text"
        logger.warning("event refused", extra={"reason": message, "keys": _keys(event)})
        return proxy_response(*endpoints.error(400, "malformed_body", message))
    return None


def proxy_response(
    status: int, headers: list[tuple[bytes, bytes]], payload: bytes
) -> dict[str, Any]:
    # A Lambda proxy answer for what Mangum never sees: header names distinct and lower-case,
    # bodies UTF-8 text (JSON).
    return {
        "statusCode": status,
        "body": payload.decode(),
        "headers": {key.decode(): value.decode() for key, value in headers},
        "isBase64Encoded": False,
    }


def _check_event_body(event: Mapping[str, Any]) -> None:
    """Raise unless the event's body is what Mangum can decode: text or bytes (and, when it says
    so, base64: that is checked by :func:`bad_base64_body` only when Mangum could not decode it,
    so that a large binary body is decoded once, not twice)."""
    raw = event.get("body", b"") or b""
    if event.get("isBase64Encoded", False):
        if not isinstance(raw, str | bytes):
            raise TypeError(f"the event's body is a {type(raw).__name__}, not base64 text")
    elif isinstance(raw, str):
        if not raw.isascii():  # most bodies are ASCII: no copy to check them
            try:
                raw.encode()
            except UnicodeEncodeError:  # lone surrogates: not text a client can have sent
                raise ValueError("body is not valid text") from None
    elif not isinstance(raw, bytes):
        raise TypeError(f"the event's body is a {type(raw).__name__}, not text")
