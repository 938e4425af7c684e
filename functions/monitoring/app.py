"""Monitoring function: EventBridge schedule (or direct invoke) -> treeserve.monitoring.

The event names a window (:func:`treeserve.monitoring.events.window`: scheduled, or
``{"model", "start", "end"}`` / ``{"hours"}``) and maybe a model; without one, every model with
captures in the window and the default model (:func:`treeserve.monitoring.pipeline.monitored_models`).
:func:`treeserve.monitoring.pipeline.run_monitoring` reads each model's captures against each
version's reference and writes one report per model.

Returns a summary (report key, status, rows, drifted features, prediction drift): the named
model's, or the default model's with ``models``, every model's summary. An event it
cannot read returns ``{"error": {...}}`` instead of raising, since retrying it cannot help; a
storage failure raises so Lambda's retry and the on-failure destination take over.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.errors import ConfigurationError
from treeserve.monitoring.events import BadEvent, window
from treeserve.monitoring.pipeline import monitored_models, notify_drift, run_monitoring
from treeserve.settings import Settings

logger = Logger()
metrics = Metrics()
tracer = Tracer()
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Run monitoring for the event's window; return the report's summary."""
    try:
        settings = Settings.from_env()
        model, start, end = window(event, settings, datetime.now(UTC))
    except (BadEvent, ConfigurationError) as exc:
        logger.warning("event refused", extra={"reason": str(exc)})
        return {"error": {"type": "bad_event", "message": str(exc)}}
    names = (
        [model]
        if model is not None
        else monitored_models(settings.model_bucket, settings.model_name, start, end)
    )
    metrics.add_metadata(key="model", value=names[0] if len(names) == 1 else names)
    summaries = [_monitor(settings, name, start, end) for name in names]
    if model is None:
        return {**summaries[0], "models": summaries}
    return summaries[0]


def _monitor(settings: Settings, model: str, start: datetime, end: datetime) -> dict[str, Any]:
    report = run_monitoring(
        settings.model_bucket,
        model,
        start,
        end,
        metrics=metrics,
        rule=settings.drift_rule,
        settings=settings,
    )
    summary = report["summary"]
    if summary["n_drifted"] or summary["prediction_drifted"]:
        notify_drift(report, settings.notification_topic_arn)
    logger.info(
        "monitoring report written",
        extra={
            "model": model,
            "key": report.get("report_key"),
            "rows": report["rows"],
            "drifted": summary["n_drifted"],
        },
    )
    return {
        "model": model,
        "status": report["status"],
        "report_key": report.get("report_key"),
        "window": report["window"],
        "rows": report["rows"],
        "drifted_features": summary["drifted_features"],
        "prediction_drift": summary["prediction_drift"],
        "prediction_drifted": summary["prediction_drifted"],
        "performance": summary["performance"],
        "challengers": [
            {k: c.get(k) for k in ("alias", "version", "verdict", "decision")}
            for c in (report.get("challenger") or {}).get("challengers", [])
        ],
    }
