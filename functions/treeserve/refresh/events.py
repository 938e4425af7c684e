"""The refresh function's events: every envelope an S3 upload notice can arrive in, read as
:class:`~treeserve.refresh.pipeline.UploadEvent`.

- direct S3 notifications (``Records[].s3``), several records per event;
- SQS message bodies holding S3 notifications, SNS notifications wrapping them, or EventBridge
  events (the handler unwraps SQS itself, to report failed messages one by one);
- EventBridge ``Object Created`` events (``detail.bucket.name``, ``detail.object.key``...).

``s3:TestEvent`` (sent when a notification is configured) yields nothing. S3 keys are
URL-decoded. Anything malformed yields nothing and a warning: no retry can fix it.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import unquote_plus

from treeserve.refresh.pipeline import UploadEvent

logger = logging.getLogger(__name__)


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


def ignored(reason: str, value: Any) -> list[UploadEvent]:
    logger.warning(f"ignored: {reason}", extra={"value": repr(value)[:200]})
    return []


def upload_events(message: Any) -> list[UploadEvent]:
    """Every ObjectCreated in one S3 notification, SNS envelope or EventBridge event; anything
    else (a malformed envelope or record) is ignored with a warning: no retry can fix it."""
    if not isinstance(message, dict):
        return ignored("the notification is not a JSON object", message)
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        try:  # SNS -> SQS
            inner = json.loads(message["Message"])
        except ValueError:
            return ignored("the SNS message is not JSON", message["Message"])
        return upload_events(inner)
    if message.get("Event") == "s3:TestEvent":
        return []
    if "detail-type" in message:
        found = _from_eventbridge(message)
        return [found] if found else []
    records = message.get("Records")
    if records is None:
        return ignored("not an S3 notification (no Records)", sorted(message)[:10])
    if not isinstance(records, list):
        return ignored("Records is not a list", records)
    events = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            ignored("a record that is not an S3 record", record)
            continue
        found = _from_s3_record(record)
        if found is not None:
            events.append(found)
    return events
