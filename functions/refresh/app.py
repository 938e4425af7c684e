"""Refresh function: S3 ``ObjectCreated`` on ``incoming/`` -> treeserve.refresh.RefreshService.

Accepts the notification in every envelope it can arrive in:

- direct S3 notifications (``Records[].s3``), several records per event;
- SQS messages whose bodies are S3 notifications, SNS notifications wrapping them, or
  EventBridge events; failed messages are reported in ``batchItemFailures`` so only they return;
- EventBridge ``Object Created`` events (``detail.bucket.name``, ``detail.object.key``...).

``s3:TestEvent`` (sent when a notification is configured) is ignored. Keys are URL-decoded.
A storage failure raises (direct and EventBridge invocations: after every record was tried), so
Lambda's retries and the on-failure destination take over; redelivered records are idempotent.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

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


# --- envelopes -> UploadEvent ------------------------------------------------------------------


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _dict(value: Any) -> dict[str, Any]:
    # Envelopes are read defensively: a field of the wrong type reads as absent.
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _upload(**fields: Any) -> UploadEvent | None:
    if not fields["bucket"] or not fields["key"]:
        logger.warning("ignored: the record names no bucket or key", extra={"record": fields})
        return None
    return UploadEvent(**fields)


def _from_s3_record(record: dict[str, Any]) -> UploadEvent | None:
    if not str(record.get("eventName", "ObjectCreated")).startswith(("ObjectCreated", "s3:Obj")):
        return None
    s3 = _dict(record.get("s3"))
    obj = _dict(s3.get("object"))
    return _upload(
        bucket=_text(_dict(s3.get("bucket")).get("name")) or "",
        key=unquote_plus(_text(obj.get("key")) or ""),
        etag=str(obj.get("eTag") or obj.get("etag") or ""),
        size=_int(obj.get("size")),
        sequencer=_text(obj.get("sequencer")),
        event_time=_text(record.get("eventTime")),
        version_id=_text(obj.get("versionId")),
    )


def _from_eventbridge(event: dict[str, Any]) -> UploadEvent | None:
    if event.get("detail-type") != "Object Created":
        return None
    detail = _dict(event.get("detail"))
    obj = _dict(detail.get("object"))
    return _upload(
        bucket=_text(_dict(detail.get("bucket")).get("name")) or "",
        # EventBridge keys are not URL-encoded; unquote_plus would turn a literal '+' into ' '.
        key=_text(obj.get("key")) or "",
        etag=str(obj.get("etag") or obj.get("eTag") or ""),
        size=_int(obj.get("size")),
        sequencer=_text(obj.get("sequencer")) or _text(detail.get("sequencer")),
        event_time=_text(event.get("time")),
        version_id=_text(obj.get("version-id")),
    )


def _ignored(reason: str, value: Any) -> list[UploadEvent]:
    logger.warning(f"ignored: {reason}", extra={"value": repr(value)[:200]})
    return []


def upload_events(message: Any) -> list[UploadEvent]:
    """Every ObjectCreated in one S3 notification, SNS envelope or EventBridge event; anything
    else (a malformed envelope or record) is ignored with a warning: no retry can fix it."""
    if not isinstance(message, dict):
        return _ignored("the notification is not a JSON object", message)
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        try:  # SNS -> SQS
            inner = json.loads(message["Message"])
        except ValueError:
            return _ignored("the SNS message is not JSON", message["Message"])
        return upload_events(inner)
    if message.get("Event") == "s3:TestEvent":
        return []
    if "detail-type" in message:
        found = _from_eventbridge(message)
        return [found] if found else []
    records = message.get("Records")
    if records is None:
        return _ignored("not an S3 notification (no Records)", sorted(message)[:10])
    if not isinstance(records, list):
        return _ignored("Records is not a list", records)
    events = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            _ignored("a record that is not an S3 record", record)
            continue
        found = _from_s3_record(record)
        if found is not None:
            events.append(found)
    return events


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
        _ignored("the SQS message body is not JSON", record.body)
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
