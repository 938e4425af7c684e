"""The capture line: its format, written by the inference function, read by monitoring.

Every captured row is one JSON object on one line of a gzipped JSON Lines object
``captures/<model>/dt=YYYY-MM-DD/<YYYYmmddTHHMMSSfffZ>-<random>.jsonl.gz``, with these keys in
this order (docs/ARCHITECTURE.md "Capture line")::

    {"id": ..., "ts": "2026-11-29T04:40:50.123Z", "version": 3, "features": [0.1, null, 2.0],
     "prediction": 0.93 | [0.1, 0.2, 0.7], "label": "yes" | 1 | null}

:func:`encode_lines` is the one writer (the inference function's capture buffer, the tests and
the monitoring benchmark use it); :func:`object_key` the one key. The readers below rely on
that fixed key order: :func:`fast_split` cuts each field out of the whole file with one regular
expression and parses the numbers of all rows with one orjson call; a file written any other
way (another key order, ragged rows) takes the general per-line path, :func:`parse_lines`.
This module imports no AWS code: the inference artifact and the monitoring artifact both hold
it, and the monitoring parse workers (:mod:`treeserve.monitoring.parse_pool`) run it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

FIELDS = ("id", "ts", "version", "features", "prediction", "label")


def iso_millis(ts: float) -> str:
    """A capture line's ``ts``: UTC, milliseconds, ``Z`` (sorts as text in time order)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def object_key(model: str, ts: float) -> str:
    """The key of a capture object first written at ``ts`` (unique: a random suffix)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f"{moment.microsecond // 1000:03d}Z"
    return f"captures/{model}/dt={moment:%Y-%m-%d}/{stamp}-{uuid.uuid4().hex[:12]}.jsonl.gz"


def encode_lines(
    rows: Iterable[tuple[Any, str, int | None, list[Any], Any, Any]],
) -> bytes:
    """JSON Lines of ``(id, ts, version, features, prediction, label)`` rows, keys in
    :data:`FIELDS` order, each line ending in a newline. NaN features are written as null
    (orjson's rule): missing stays missing."""
    dumps = orjson.dumps
    lines = [
        dumps(
            {
                "id": row_id,
                "ts": ts,
                "version": version,
                "features": features,
                "prediction": prediction,
                "label": label,
            }
        )
        for row_id, ts, version, features, prediction, label in rows
    ]
    lines.append(b"")
    return b"\n".join(lines)


def parse_lines(raw: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loads = orjson.loads
    for line in raw.splitlines():
        if not line:
            continue
        try:
            rec = loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


# The inference function writes every line with the same keys in the same order (see
# treeserve.serving.capture), so each field can be cut out of the whole file with one regular expression
# and the numbers of all rows parsed by one orjson call: about twice as fast as one orjson.loads
# per line, whose cost is mostly building a dict per row. Any file where a field does not occur
# exactly once per line, or where rows differ in width, takes the general per-line path.
_FEATURES_PREDICTION = re.compile(
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]'
)
_TS_VERSION = re.compile(rb'"ts":"([^"\\]{0,64})","version":(\d{1,9})[,}]')
# The inference function's own key order (id, ts, version, features, prediction, label): one
# pass over the file instead of two.
_ROW = re.compile(
    rb'"ts":"([^"\\]{0,64})","version":(\d{1,9}),'
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]'
)
# With labels to join: the same, plus the id when it is a plain string (no escapes), as the
# inference function writes its generated ids.
_ROW_ID = re.compile(
    rb'^\{"id":"([^"\\\n]*)","ts":"([^"\\]{0,64})","version":(\d{1,9}),'
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]',
    re.MULTILINE,
)
_ID = re.compile(rb'"id":("(?:[^"\\]|\\.)*"|-?\d+)[,}]')
# orjson has no NaN literal: missing values (null) are parsed as a number no float32 can hold,
# which becomes inf in the float32 matrix and then NaN. Values beyond float32's range (which
# XGBoost could not read either) are thereby treated as missing too.
_MISSING_SENTINEL = b"1e300"


class FastBatch:
    """The columns of a capture file parsed by the fast path."""

    def __init__(
        self,
        raw: bytes,
        ts: list[bytes],
        versions: list[bytes],
        X: npt.NDArray[np.float32],
        P: npt.NDArray[np.float32] | None,
        *,
        id_bytes: list[bytes] | None = None,
    ) -> None:
        self.id_bytes = id_bytes
        self.raw = raw
        self.ts = ts
        self.versions = versions
        self.X = X
        self.P = P

    def ids(self) -> list[Any]:
        """Row ids (parsed only when labels need them)."""
        found = _ID.findall(self.raw)
        if len(found) == len(self.versions):
            ids: list[Any] = orjson.loads(b"[" + b",".join(found) + b"]")
            return ids
        return [rec.get("id") for rec in parse_lines(self.raw)]


def fast_parse(raw: bytes, *, with_ids: bool = False) -> FastBatch | None:
    """Parse a capture file by the fast path, or None when it must take the per-line one.

    Each pattern must match exactly once per line (a string value cannot fake a key: JSON
    escapes its quotes), every row must have the same width and every number must parse.
    """
    if not raw:
        return None
    # Lines, counting a last one without its newline; a blank line fails the match count below.
    n = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    id_bytes: list[bytes] | None = None
    rows_id = _ROW_ID.findall(raw) if with_ids else []
    rows = [] if len(rows_id) == n else _ROW.findall(raw)
    # zip(*rows) transposes the matches into columns at C speed.
    if len(rows_id) == n:
        ids_t, ts, versions, feats, preds = zip(*rows_id, strict=True)
        id_bytes = list(ids_t)
    elif len(rows) == n:
        ts, versions, feats, preds = zip(*rows, strict=True)
    else:  # other key order: one pattern per pair of adjacent keys
        fp = _FEATURES_PREDICTION.findall(raw)
        tv = _TS_VERSION.findall(raw)
        if not (len(fp) == len(tv) == n) or n == 0:
            return None
        feats, preds = zip(*fp, strict=True)
        ts, versions = zip(*tv, strict=True)
    width = feats[0].count(b",") + 1
    if not feats[0] or len(set(map(bytes.count, feats, repeat(b",", n)))) != 1:
        return None
    try:
        numbers = orjson.loads(b"[" + b",".join(feats).replace(b"null", _MISSING_SENTINEL) + b"]")
        with np.errstate(over="ignore"):
            X = np.fromiter(numbers, dtype=np.float32, count=n * width)
        P = rows_matrix(orjson.loads(b"[" + b",".join(preds) + b"]"))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    X[np.isinf(X)] = np.nan
    return FastBatch(
        raw,
        list(ts),
        list(versions),
        X.reshape(n, width),
        P if P is not None and P.shape[0] == n else None,
        id_bytes=id_bytes,
    )


def rows_matrix(values: list[Any], width: int | None = None) -> npt.NDArray[np.float32] | None:
    """Rows of numbers (None missing) as float32; None when ragged or not numeric."""
    try:
        arr = np.array(values, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        return None
    return arr


@dataclass(frozen=True, slots=True)
class Group:
    """One model version's rows of a capture file: features, predictions and (when labels
    are to be joined) ids, as bytes when they are plain strings (see ``FastBatch.id_bytes``)."""

    version: int
    X: npt.NDArray[np.float32]
    P: npt.NDArray[np.float32] | None
    ids: list[Any] | None
    ids_are_bytes: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    """A capture file's rows inside the window, by version, and how many fell outside."""

    out_of_window: int
    groups: list[Group]


def fast_split(raw: bytes, start_key: bytes, end_key: bytes, *, with_ids: bool) -> Split | None:
    """A capture file by the fast path, its rows of ``[start_key, end_key)`` grouped by model
    version (with their ids when ``with_ids``: labels are to be joined); None when the file
    must take the general path. Runs in the caller or in a parse worker."""
    batch = fast_parse(raw, with_ids=with_ids)
    return None if batch is None else split_batch(batch, start_key, end_key, with_ids=with_ids)


def split_batch(batch: FastBatch, start_key: bytes, end_key: bytes, *, with_ids: bool) -> Split:
    """Keep the rows of ``[start_key, end_key)`` and group them by model version."""
    n = len(batch.ts)
    out_of_window = 0
    # Most files lie wholly inside the window and hold one version: check that cheaply.
    if min(batch.ts) >= start_key and max(batch.ts) < end_key:
        inside = None
    else:
        ts = np.array(batch.ts, dtype="S23")
        inside = (ts >= start_key) & (ts < end_key)
        out_of_window = int(n - inside.sum())
    distinct = set(batch.versions)
    if inside is None and len(distinct) == 1:
        picks: list[tuple[int, slice | npt.NDArray[np.intp]]] = [(int(distinct.pop()), slice(None))]
    else:
        versions = np.array(batch.versions, dtype=np.int64)
        if inside is not None:
            versions[~inside] = -1
        picks = [
            (v, np.flatnonzero(versions == v)) for v in np.unique(versions[versions >= 0]).tolist()
        ]
    ids: list[Any] | None = None
    as_bytes = batch.id_bytes is not None
    if with_ids and batch.P is not None and picks:
        ids = batch.id_bytes if batch.id_bytes is not None else batch.ids()
    groups = []
    for version, idx in picks:
        chosen = None
        if ids is not None:
            chosen = ids if isinstance(idx, slice) else [ids[i] for i in idx.tolist()]
        P = batch.P[idx] if batch.P is not None else None
        groups.append(Group(version, batch.X[idx], P, chosen, as_bytes and chosen is not None))
    return Split(out_of_window, groups)
