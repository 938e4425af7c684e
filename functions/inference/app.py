"""Inference function: API Gateway (HTTP API 2.0, REST 1.0) and Function URL events -> the app.

Built once per execution environment, at import (:class:`treeserve.serving.api.InferenceFunction`): the
model in service (loaded now, so with SnapStart it is in the snapshot), the capture buffer, the
FastAPI app ``app`` and Mangum around it. Every event goes through Mangum to ``app``: a
middleware, dependency or route added to ``app`` here applies to every event type, and to the
local stack, which calls this ``handler``. An event that is not an HTTP request is a JSON 400.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Mapping
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.serving.api import InferenceFunction
from treeserve.settings import Settings

# GET routes add no metrics; an empty flush is expected, not worth a warning per request.
warnings.filterwarnings("ignore", message="No application metrics to publish")

logger = Logger()
metrics = Metrics()


def _tracing_enabled(env: Mapping[str, str] = os.environ) -> bool:
    # Powertools' own rule (Tracer._is_tracer_disabled): on in Lambda unless disabled or under
    # SAM local. Importing the Tracer loads the X-Ray SDK, which builds an X-Ray client (about
    # 0.4 s of cold start) even when it then disables itself: only import it when on.
    disabled = env.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower()
    in_lambda = bool(env.get("LAMBDA_TASK_ROOT")) and not env.get("AWS_SAM_LOCAL")
    return in_lambda and disabled not in ("1", "true", "yes", "on", "y", "t")


if _tracing_enabled():
    from aws_lambda_powertools import Tracer

    tracer: Any = Tracer()
else:
    tracer = None
# The library logs through stdlib loggers; give them Powertools' JSON format and correlation id.
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})

settings = Settings.from_env()
function = InferenceFunction(settings, metrics=metrics)
service, capture, endpoints, app = (
    function.service,
    function.capture,
    function.endpoints,
    function.app,
)
# All of that lives as long as the environment: keep it out of the cyclic GC's full collections.
gc.freeze()


def _serve(event: Any, context: LambdaContext) -> dict[str, Any]:
    request = event.get("requestContext") if isinstance(event, dict) else None
    # requestContext.requestId in HTTP API, REST API and Function URL events alike.
    logger.set_correlation_id(request.get("requestId") if isinstance(request, dict) else None)
    response = function(event, context)
    loaded = service.loaded
    metrics.add_metadata("model_version", None if loaded is None else loaded.version)
    return response


if tracer is not None:
    _serve = tracer.capture_lambda_handler(capture_response=False)(_serve)


@logger.inject_lambda_context
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point: the event through Mangum to ``app``."""
    return _serve(event, context)


def warm() -> None:
    """Before a SnapStart snapshot: one uncaptured prediction through the whole path."""
    function.warm(None)


after_restore = function.after_restore

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
