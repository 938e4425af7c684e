"""Monitoring function: EventBridge schedule (or direct invoke) -> treeserve.monitoring.

The event names a window (:func:`treeserve.monitoring.events.window`: scheduled, or
``{"model", "start", "end"}`` / ``{"hours"}``) and maybe a model; without one, every model with
captures in the window and the default model (:func:`treeserve.monitoring.pipeline.monitored_models`).
:func:`treeserve.monitoring.pipeline.run_monitoring` reads each model's captures against each
version's reference and writes one report per model. A window with more than
``MONITORING_FANOUT_BYTES`` of captures is fanned out instead (:mod:`treeserve.monitoring.fanout`:
the MonitoringMap state machine), whose worker and merge steps invoke this function too
(:func:`treeserve.monitoring.events.fanout_event`).

Returns a summary (report key, status, rows, drifted features, prediction drift): the named
model's, or the default model's with ``models``, every model's summary; a fanned-out model's
summary has status ``fanned out`` and the execution's ARN. An event it cannot read returns
``{"error": {...}}`` instead of raising, since retrying it cannot help; a storage failure raises
so Lambda's retry (Step Functions' Retry for the fan-out's steps) and the on-failure destination
take over.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.aws import s3_client
from treeserve.errors import ConfigurationError
from treeserve.monitoring import (
    challenger,  # noqa: F401 - imported at init (below)
    fanout,
)
from treeserve.monitoring.events import BadEvent, MergeEvent, PartialEvent, fanout_event, window
from treeserve.monitoring.pipeline import (
    finish,
    monitored_models,
    notify_drift,
    run_monitoring,
    window_files,
)
from treeserve.settings import Settings

logger = Logger()
metrics = Metrics()
tracer = Tracer()
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})

# Once per execution environment, in Lambda's init phase, not in the first invocation's time:
# the S3 client (botocore reads its service model: about 0.2 s), and the challenger comparison
# imported above (a run's finish imports it, scipy.stats with it).
s3_client()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Run monitoring for the event's window (or a fan-out step); return the summary."""
    try:
        settings = Settings.from_env()
        step = fanout_event(event, settings)
        if step is None:
            model, start, end = window(event, settings, datetime.now(UTC))
    except (BadEvent, ConfigurationError) as exc:
        logger.warning("event refused", extra={"reason": str(exc)})
        return {"error": {"type": "bad_event", "message": str(exc)}}
    bucket = settings.model_bucket
    if isinstance(step, PartialEvent):
        return fanout.run_partial(
            bucket,
            step.model,
            step.start,
            step.end,
            step.items,
            run=step.run,
            rule=settings.drift_rule,
        )
    if isinstance(step, MergeEvent):
        keys = fanout.result_partial_keys(s3_client(), bucket, step.results_key)
        merged = fanout.run_merge(
            bucket, step.model, step.start, step.end, keys, rule=settings.drift_rule
        )
        return _summary(
            settings, finish(bucket, merged.monitor, metrics=metrics, settings=settings)
        )
    names = (
        [model] if model is not None else monitored_models(bucket, settings.model_name, start, end)
    )
    metrics.add_metadata(key="model", value=names[0] if len(names) == 1 else names)
    summaries = [_monitor(settings, name, start, end) for name in names]
    if model is None:
        return {**summaries[0], "models": summaries}
    return summaries[0]


def _monitor(settings: Settings, model: str, start: datetime, end: datetime) -> dict[str, Any]:
    bucket = settings.model_bucket
    files = window_files(s3_client(), bucket, model, start, end)
    size = sum(n for _, n in files)
    arn = settings.monitoring_state_machine_arn
    if arn and settings.monitoring_fanout_bytes and size > settings.monitoring_fanout_bytes:
        run = fanout.start_fanout(bucket, model, start, end, files, state_machine_arn=arn)
        logger.info("monitoring fanned out", extra={"model": model, "files": len(files)})
        return {"model": model, "status": "fanned out", **run}
    report = run_monitoring(
        bucket,
        model,
        start,
        end,
        metrics=metrics,
        rule=settings.drift_rule,
        settings=settings,
        files=files,
    )
    return _summary(settings, report)


def _summary(settings: Settings, report: dict[str, Any]) -> dict[str, Any]:
    summary = report["summary"]
    if summary["n_drifted"] or summary["prediction_drifted"]:
        notify_drift(report, settings.notification_topic_arn)
    logger.info(
        "monitoring report written",
        extra={
            "model": report["model"],
            "key": report.get("report_key"),
            "rows": report["rows"],
            "drifted": summary["n_drifted"],
        },
    )
    return {
        "model": report["model"],
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
