"""The monitoring function's events, read as the window to monitor.

- A scheduled event (``"detail-type": "Scheduled Event"``): every model (model None: the
  default model ``MODEL_NAME`` and every model with captures in the window,
  :func:`treeserve.monitoring.pipeline.monitored_models`) over the last
  ``MONITORING_WINDOW_HOURS`` hours (default 24), ending now.
- A direct invoke: ``{"model": "name", "start": iso, "end": iso}`` or ``{"hours": n}`` (either
  form may name the model, else every model as above; ``end`` defaults to now).

Either way the window is at most :data:`~treeserve.settings.MAX_WINDOW_HOURS` (31 days): it is
read in one invocation. Anything else raises :class:`BadEvent`.
"""

from __future__ import annotations

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
