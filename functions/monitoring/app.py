"""Monitoring function: EventBridge schedule (or direct invoke) -> treeserve.monitoring.

- Scheduled event (``"detail-type": "Scheduled Event"``): ``MODEL_NAME`` over the last
  ``MONITORING_WINDOW_HOURS`` hours (default 24), ending now.
- Direct invoke: ``{"model": "name", "start": iso, "end": iso}`` or ``{"hours": n}`` (either
  form may name the model; ``end`` defaults to now). Either way the window is at most
  ``MAX_WINDOW_HOURS`` (31 days).

Returns a summary (report key, status, rows, drifted features, prediction drift). An event it
cannot read returns ``{"error": {...}}`` instead of raising, since retrying it cannot help; a
storage failure raises so Lambda's retry and the on-failure destination take over.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.errors import ConfigurationError, TreeserveError
from treeserve.monitoring.parse_pool import default_workers
from treeserve.monitoring.pipeline import notify_drift, parse_time, run_monitoring
from treeserve.settings import MAX_WINDOW_HOURS, MODEL_NAME_RULE, Settings, valid_model_name

logger = Logger()
metrics = Metrics()
tracer = Tracer()
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})


class BadEvent(TreeserveError):
    """An invocation event this function cannot act on."""


def _hours(value: Any, what: str) -> float:
    try:
        hours = float(value)
    except (TypeError, ValueError):
        raise BadEvent(f"{what} must be a number of hours, not {str(value)[:40]!r}") from None
    if not 0 < hours <= MAX_WINDOW_HOURS:
        raise BadEvent(
            f"{what} must be more than 0 and at most {MAX_WINDOW_HOURS:g} hours (31 days)"
        )
    return hours


def window(event: Any, settings: Settings, now: datetime) -> tuple[str, datetime, datetime]:
    """(model, start, end) of an invocation event."""
    if not isinstance(event, dict):
        raise BadEvent("the event must be a JSON object")
    default_hours = settings.monitoring_window_hours
    if event.get("detail-type") == "Scheduled Event":
        return settings.model_name, now - timedelta(hours=default_hours), now
    model = str(event.get("model") or settings.model_name)
    if not valid_model_name(model):
        raise BadEvent(f"model {model[:40]!r} is not a valid model name: use {MODEL_NAME_RULE}")
    try:
        end = parse_time(str(event["end"])) if event.get("end") else now
        if event.get("start"):
            start = parse_time(str(event["start"]))
        else:
            start = end - timedelta(hours=_hours(event.get("hours", default_hours), "hours"))
    except TreeserveError as exc:
        raise BadEvent(str(exc)) from None
    if end <= start:
        raise BadEvent("end must be after start")
    span = (end - start).total_seconds() / 3600.0
    if span > MAX_WINDOW_HOURS:
        # A window is read in one invocation: past a month it cannot finish within the timeout.
        raise BadEvent(
            f"the window from start to end is {span:g} hours; at most {MAX_WINDOW_HOURS:g} "
            "hours (31 days): invoke once per month for a longer period"
        )
    return model, start, end


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
    metrics.add_metadata(key="model", value=model)
    report = run_monitoring(
        settings.model_bucket,
        model,
        start,
        end,
        metrics=metrics,
        workers=default_workers(settings.monitoring_workers),
    )
    summary = report["summary"]
    if summary["n_drifted"] or summary["prediction_drifted"]:
        notify_drift(report, settings.notification_topic_arn)
    logger.info(
        "monitoring report written",
        extra={
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
    }
