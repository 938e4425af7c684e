"""The batch function's events, as Step Functions sends them.

- A batch of the Distributed Map (``ItemReader`` ``arn:aws:states:::s3:listObjectsV2`` with an
  ``ItemBatcher``; the task passes its input as the payload)::

      {"Items": [{"Key": "...", "Size": 123, "Etag": "\\"...\\"", "LastModified": ...,
                  "StorageClass": "STANDARD"}, ...],
       "BatchInput": {"job": {model, job, version, sha256, requested, submitted_at}}}

  (Step Functions spells the listing's field ``Etag``; ``ETag`` is read too.)
- The final step, after the map (template.yaml's ``WriteManifest``)::

      {"finalize": {"job": {...}, "map": {"MapRunArn": "...", "ResultWriterDetails":
                    {"Bucket": "...", "Key": ".../manifest.json"}}} | "map_error": {"Error",
                    "Cause"}},
       "started": "<the execution's StartTime>"}

Anything else raises :class:`BadEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treeserve.batch.jobs import BadJob, JobSpec
from treeserve.errors import TreeserveError


class BadEvent(TreeserveError):
    """An invocation event the batch function cannot act on."""


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One object of a listObjectsV2 item reader."""

    key: str
    size: int
    etag: str | None


@dataclass(frozen=True, slots=True)
class ScoreBatch:
    job: JobSpec
    items: list[BatchItem]


@dataclass(frozen=True, slots=True)
class Finalize:
    job: JobSpec
    results_bucket: str | None
    results_key: str | None
    map_run_arn: str | None
    map_error: dict[str, Any] | None
    started: str | None


def _job(raw: Any) -> JobSpec:
    try:
        return JobSpec.from_dict(raw)
    except BadJob as exc:
        raise BadEvent(str(exc)) from None


def _item(raw: Any, i: int) -> BatchItem:
    if not isinstance(raw, dict) or not isinstance(raw.get("Key"), str) or not raw["Key"]:
        raise BadEvent(f"Items[{i}] must be an object with a Key (an S3 listing item)")
    size = raw.get("Size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadEvent(f"Items[{i}].Size must be a byte count")
    etag = raw.get("Etag", raw.get("ETag"))
    return BatchItem(raw["Key"], size, str(etag) if etag else None)


def parse_event(event: Any) -> ScoreBatch | Finalize:
    """A batch to score or the final step; BadEvent for anything else."""
    if not isinstance(event, dict):
        raise BadEvent("the event must be a JSON object")
    if "Items" in event:
        items = event["Items"]
        if not isinstance(items, list):
            raise BadEvent("Items must be a list of S3 listing items")
        batch_input = event.get("BatchInput")
        if not isinstance(batch_input, dict):
            raise BadEvent('BatchInput must carry the job: {"job": {...}}')
        return ScoreBatch(_job(batch_input.get("job")), [_item(x, i) for i, x in enumerate(items)])
    if "finalize" in event:
        state = event["finalize"]
        if not isinstance(state, dict):
            raise BadEvent("finalize must be the state after the map")
        details = ((state.get("map") or {}).get("ResultWriterDetails")) or {}
        error = state.get("map_error")
        if not details and not isinstance(error, dict):
            raise BadEvent("finalize needs map.ResultWriterDetails or map_error")
        started = event.get("started")
        return Finalize(
            _job(state.get("job")),
            details.get("Bucket"),
            details.get("Key"),
            (state.get("map") or {}).get("MapRunArn"),
            error if isinstance(error, dict) else None,
            str(started) if started else None,
        )
    raise BadEvent(
        'expected a Distributed Map batch ({"Items": [...], "BatchInput": {...}}) or the '
        'final step ({"finalize": {...}})'
    )
