"""Refresh function: S3 ``ObjectCreated`` on ``incoming/`` -> treeserve.refresh.

Every envelope an upload notice arrives in (S3, SQS, SNS, EventBridge) is read by
:func:`treeserve.refresh.events.upload_events`; each upload goes to
:class:`treeserve.refresh.pipeline.RefreshService`. SQS batches report failed messages in
``batchItemFailures`` so only they return to the queue. A storage failure raises (direct and EventBridge invocations: after every record was tried), so
Lambda's retries and the on-failure destination take over; redelivered records are idempotent.
"""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from treeserve.refresh.events import ignored, upload_events
from treeserve.refresh.pipeline import Outcome, RefreshService, UploadEvent
from treeserve.settings import Settings

logger = Logger()
metrics = Metrics()
tracer = Tracer()
# The library logs through stdlib loggers; give them Powertools' JSON format and correlation id.
copy_config_to_registered_loggers(source_logger=logger, include={"treeserve"})
# Entirely failed batches are reported like partial ones (no exception), so Lambda returns just
# those messages to the queue and the redrive policy counts them.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

_service: RefreshService | None = None


def service() -> RefreshService:
    """The service, built once per execution environment (after moto or SnapStart restore)."""
    global _service  # noqa: PLW0603 - one service per execution environment, built lazily
    if _service is None:
        _service = RefreshService(Settings.from_env(), metrics_sink=metrics)
    return _service


def reset() -> None:
    """Forget the service (tests, a changed environment)."""
    global _service  # noqa: PLW0603
    _service = None


def _process(event: UploadEvent) -> Outcome:
    outcome = service().process(
        event.bucket,
        event.key,
        event.etag,
        event.size,
        event.sequencer,
        event_time=event.event_time,
        version_id=event.version_id,
    )
    metrics.add_metric(name="UploadEvents", unit=MetricUnit.Count, value=1)
    if outcome.redelivered:
        metrics.add_metric(name="UploadEventsRedelivered", unit=MetricUnit.Count, value=1)
    logger.info(
        "refresh outcome",
        extra={
            "key": outcome.key,
            "status": outcome.status,
            "code": outcome.code,
            "version": outcome.version,
            "redelivered": outcome.redelivered,
        },
    )
    return outcome


def _answer(outcome: Outcome) -> dict[str, Any]:
    return {**outcome.to_dict(), "redelivered": outcome.redelivered}


def record_handler(record: SQSRecord) -> list[dict[str, Any]]:
    """One SQS message: every upload it notifies about. Raising marks the message failed."""
    try:
        body = json.loads(record.body)
    except ValueError:
        ignored("the SQS message body is not JSON", record.body)
        return []
    try:
        return [_answer(_process(e)) for e in upload_events(body)]
    except Exception:
        logger.exception(
            "refresh failed; the message returns to the queue",
            extra={"message_id": record.message_id},
        )
        raise


# --- the handler -------------------------------------------------------------------------------


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point (template.yaml: ``app.handler``)."""
    records = event.get("Records") if isinstance(event, dict) else None
    if (
        isinstance(records, list)
        and records
        and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
    ):
        return dict(process_partial_response(event, record_handler, processor, context))
    outcomes: list[dict[str, Any]] = []
    failure: Exception | None = None
    for upload in upload_events(event):
        try:
            outcomes.append(_answer(_process(upload)))
        except Exception as exc:  # try the other records first; they are independent
            logger.exception("refresh failed; Lambda will retry", extra={"key": upload.key})
            failure = failure or exc
    if failure is not None:
        raise failure
    return {"outcomes": outcomes}
