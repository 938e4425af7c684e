"""Inference function: API Gateway (HTTP API 2.0, REST 1.0) or Function URL -> the HTTP API.

Built once per execution environment, at import: settings, the registry client, the model in
service (read from S3 and loaded now, so with SnapStart it is in the snapshot), the capture
buffer and the endpoints. ``POST /predict`` and ``/explain`` in payload 2.0 events (HTTP API,
Function URL) go straight to the endpoints (:func:`treeserve.serving.endpoints.answer_v2_event`: the
answer Mangum would give, without its event loop). An event that is not an HTTP request
Mangum can read (``{}``, an S3 or scheduled event, fields of the wrong type, a body that is not
base64) is refused with a JSON 400 (:func:`treeserve.serving.endpoints.refuse_event`), never raised.
Everything else (REST API events, docs, health, model) goes through Mangum to the FastAPI app,
which is built on the first such request (``app``/``asgi`` are lazy module attributes):
importing FastAPI costs about half a second of cold start that a function serving only
predictions never needs. Before a SnapStart snapshot, :func:`warm` builds it too. Mangum runs with ``lifespan="off"`` (``"auto"`` would run the app's
startup on every invocation).
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Mapping
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.aws import reset_clients
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve.serving.capture import CaptureBuffer
from treeserve.serving.endpoints import Endpoints, answer_v2_event, proxy_response, refuse_event
from treeserve.serving.service import ModelService
from treeserve.settings import Settings

# GET routes add no metrics; an empty flush is expected, not worth a warning per request.
warnings.filterwarnings("ignore", message="No application metrics to publish")

logger = Logger()
metrics = Metrics()


def _tracing_enabled(env: Mapping[str, str] = os.environ) -> bool:
    # Powertools' own rule (Tracer._is_tracer_disabled): on in Lambda unless disabled or under
    # SAM local. Tracer() imports the X-Ray SDK, which builds an X-Ray client (about 0.4 s of
    # cold start on the bench machine) even when it then disables itself; skip it when off.
    disabled = env.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower()
    in_lambda = bool(env.get("LAMBDA_TASK_ROOT")) and not env.get("AWS_SAM_LOCAL")
    return in_lambda and disabled not in ("1", "true", "yes", "on", "y", "t")


tracer = Tracer() if _tracing_enabled() else None
# The library logs through stdlib loggers; give them Powertools' JSON format and correlation id.
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})

settings = Settings.from_env()
service = ModelService(
    ModelRegistry(S3RegistryStore(settings.model_bucket), settings.model_name),
    settings,
    metrics=metrics,
)
capture = CaptureBuffer(
    settings.model_bucket,
    settings.model_name,
    settings.capture_sample_rate,
    settings.capture_max_rows,
    settings.capture_max_age_seconds,
    metrics=metrics,
    background=True,  # the request that fills the buffer does not wait for its write
)
if capture.enabled:
    capture.install_sigterm_flush()
endpoints = Endpoints(service, settings, capture, metrics)
base_path = os.environ.get("API_BASE_PATH", "/")
_web: dict[str, Any] = {}
# Everything built so far lives as long as the environment: keep it out of the cyclic GC's
# full collections, which would otherwise walk every imported module on the request path.
gc.freeze()


def _build_web() -> dict[str, Any]:
    """The FastAPI app and Mangum around it, built once, on first need."""
    if not _web:
        from mangum import Mangum  # noqa: PLC0415 -- lazy: see the module docstring

        from treeserve.serving.api import create_app  # noqa: PLC0415

        app = create_app(service, settings, capture, metrics=metrics, endpoints=endpoints)
        _web["asgi"] = Mangum(app, lifespan="off", api_gateway_base_path=base_path)
        _web["app"] = app
    return _web


def __getattr__(name: str) -> Any:
    # ``app`` and ``asgi`` as module attributes, built when first read (PEP 562).
    if name in ("app", "asgi"):
        return _build_web()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _request_id(event: dict[str, Any]) -> str | None:
    # requestContext.requestId in HTTP API, REST API and Function URL events alike
    # (correlation_paths.API_GATEWAY_HTTP); read directly, a JMESPath query per request costs
    # more than the rest of the logger decorator.
    context = event.get("requestContext")
    return context.get("requestId") if isinstance(context, dict) else None


def _serve(event: Any, context: LambdaContext) -> dict[str, Any]:
    if not isinstance(event, dict):
        return _refused(event)
    logger.set_correlation_id(_request_id(event))
    response = answer_v2_event(endpoints, event, base_path)
    if response is None:
        response = refuse_event(endpoints, event) or _through_mangum(event, context)
    loaded = service.loaded
    metrics.add_metadata("model_version", None if loaded is None else loaded.version)
    return response


def _refused(event: Any) -> dict[str, Any]:
    refused = refuse_event(endpoints, event)
    assert refused is not None  # noqa: S101 -- only events that are not dicts come here
    return refused


def _through_mangum(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        response: dict[str, Any] = _build_web()["asgi"](event, context)
    except Exception:  # refuse_event let through an event Mangum cannot read: a bug, logged
        logger.exception("the event could not be served")
        return proxy_response(
            *endpoints.error(500, "internal_error", "the event could not be served; see the logs")
        )
    return response


if tracer is not None:
    _serve = tracer.capture_lambda_handler(capture_response=False)(_serve)


@logger.inject_lambda_context
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point: the event to the endpoints directly, or through Mangum to FastAPI;
    an event that is not an HTTP request Mangum can read is refused with a 400."""
    return _serve(event, context)


def warm() -> None:
    """Before a snapshot: build the FastAPI app and exercise the hot path once (imports,
    caches) without capturing anything."""
    _build_web()
    loaded = service.loaded
    if loaded is None:
        return
    row = b"[" + b",".join([b"null"] * loaded.schema.width) + b"]"
    capture_state, endpoints.capture = endpoints.capture, None
    try:
        endpoints.handle("predict", b'{"instances": [' + row + b"]}", None, None, "warm")
    finally:
        endpoints.capture = capture_state


def after_restore() -> None:
    """A restored snapshot may run much later, elsewhere: new clients, a fresh pointer check."""
    reset_clients()
    service.registry = ModelRegistry(S3RegistryStore(settings.model_bucket), settings.model_name)
    capture.reseed()
    service.refresh()


try:  # only present in the Lambda Python runtime with SnapStart
    from snapshot_restore_py import (  # type: ignore[import-not-found]
        register_after_restore,
        register_before_snapshot,
    )
except ImportError:  # pragma: no cover - outside Lambda
    pass
else:  # pragma: no cover - inside Lambda
    register_before_snapshot(warm)
    register_after_restore(after_restore)
