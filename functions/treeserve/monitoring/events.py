"""The monitoring function's events, read as the window to monitor.

- A scheduled event (``"detail-type": "Scheduled Event"``): every model (model None: the
  default model ``MODEL_NAME`` and every model with captures in the window,
  :func:`treeserve.monitoring.pipeline.monitored_models`) over the last
  ``MONITORING_WINDOW_HOURS`` hours (default 24), ending now.
- A direct invoke: ``{"model": "name", "start": iso, "end": iso}`` or ``{"hours": n}`` (either
  form may name the model, else every model as above; ``end`` defaults to now).

Either way the window is at most :data:`~treeserve.settings.MAX_WINDOW_HOURS` (31 days). A window
with more than ``MONITORING_FANOUT_BYTES`` of captures is fanned out
(:mod:`treeserve.monitoring.fanout`), whose worker and merge steps invoke the function with the
events :func:`fanout_event` reads. Anything else raises :class:`BadEvent`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from treeserve.errors import TreeserveError
from treeserve.monitoring.pipeline import parse_time
from treeserve.settings import MAX_WINDOW_HOURS, MODEL_NAME_RULE, Settings, valid_model_name


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


def window(event: Any, settings: Settings, now: datetime) -> tuple[str | None, datetime, datetime]:
    """(model, start, end) of an invocation event; model None: every model (see above)."""
    if not isinstance(event, dict):
        raise BadEvent("the event must be a JSON object")
    default_hours = settings.monitoring_window_hours
    if event.get("detail-type") == "Scheduled Event":
        return None, now - timedelta(hours=default_hours), now
    model = None if event.get("model") in (None, "") else str(event["model"])
    if model is not None and not valid_model_name(model):
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


# --- the fan-out's events (treeserve.monitoring.fanout; the MonitoringMap state machine) -------

PARTIAL = "monitoring-partial"
MERGE = "monitoring-merge"
_RUN = re.compile(r"[0-9A-Za-z-]{1,80}")


@dataclass(frozen=True)
class PartialEvent:
    """A Distributed Map worker's batch: ``{"Items": [{"key", "size"}, ...], "BatchInput":
    {"action": "monitoring-partial", "model", "start", "end", "run"}}`` (ItemBatcher's shape)."""

    model: str
    start: datetime
    end: datetime
    run: str
    items: list[tuple[str, int]]


@dataclass(frozen=True)
class MergeEvent:
    """The merge step: ``{"action": "monitoring-merge", "model", "start", "end", "run",
    "results": {"Bucket", "Key"}}`` (``results``: the map's ResultWriterDetails)."""

    model: str
    start: datetime
    end: datetime
    run: str
    results_key: str


def _run_fields(fields: dict[str, Any], bucket: str) -> tuple[str, datetime, datetime, str]:
    model, run = fields.get("model"), fields.get("run")
    if not isinstance(model, str) or not valid_model_name(model):
        raise BadEvent(
            f"model {str(model)[:40]!r} is not a valid model name: use {MODEL_NAME_RULE}"
        )
    if not isinstance(run, str) or not _RUN.fullmatch(run):
        raise BadEvent("run must be the fan-out's run id")
    if fields.get("bucket", bucket) != bucket:
        raise BadEvent("the fan-out names another bucket than MODEL_BUCKET")
    try:
        start, end = parse_time(str(fields["start"])), parse_time(str(fields["end"]))
    except (KeyError, TreeserveError) as exc:
        raise BadEvent(f"start and end must be ISO-8601 times: {exc}") from None
    if end <= start:
        raise BadEvent("end must be after start")
    return model, start, end, run


def fanout_event(event: Any, settings: Settings) -> PartialEvent | MergeEvent | None:
    """The fan-out event this is, or None (a scheduled or direct run: :func:`window`)."""
    if not isinstance(event, dict):
        return None
    batch = event.get("BatchInput")
    if isinstance(batch, dict) and batch.get("action") == PARTIAL:
        model, start, end, run = _run_fields(batch, settings.model_bucket)
        items = event.get("Items")
        if not isinstance(items, list) or not items:
            raise BadEvent("Items must list the batch's capture files")
        root = f"captures/{model}/"
        out: list[tuple[str, int]] = []
        for item in items:
            key = item.get("key") if isinstance(item, dict) else None
            size = item.get("size", 0) if isinstance(item, dict) else None
            if not isinstance(key, str) or not key.startswith(root) or ".." in key:
                raise BadEvent(f"an item is not a capture file of {model!r}: {str(item)[:80]}")
            if not isinstance(size, int) or size < 0:
                raise BadEvent(f"an item's size is not a byte count: {str(item)[:80]}")
            out.append((key, size))
        return PartialEvent(model, start, end, run, out)
    if event.get("action") == MERGE:
        model, start, end, run = _run_fields(event, settings.model_bucket)
        results = event.get("results")
        key = results.get("Key") if isinstance(results, dict) else None
        if not isinstance(results, dict) or results.get("Bucket") != settings.model_bucket:
            raise BadEvent("results must be the map's ResultWriterDetails in MODEL_BUCKET")
        if not isinstance(key, str) or not key.startswith(f"monitoring/{model}/{run}/"):
            raise BadEvent("results.Key must be the run's ResultWriter manifest")
        return MergeEvent(model, start, end, run, key)
    return None
