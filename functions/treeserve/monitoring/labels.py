"""Labels looked up by the ids of captured rows, a capture file at a time.

A capture file's ids come grouped by their byte length (:class:`treeserve.parquet.StringRuns`:
UUIDs and fixed-format ids make one group; generated ``<request id>-<row>`` ids a few).
:class:`LabelIndex` keeps the labels' ids of each length sorted by a 64-bit hash of their bytes,
behind a filter of the hashes' top bits: a file's ids are hashed, most are turned away by the
filter (most rows have no label yet), the rest are searched, and every candidate is confirmed
byte for byte, so a hash collision can cost a search but never attach a wrong label. At a
million generated ids against 100,000 labels this takes about 0.1 s, index included, against
0.25 s for one dict lookup per id (the bytes objects it needs, then lookups that miss the
CPU's caches). A length whose labels' ids share a hash (fewer than one chance
in 10**9 at 100,000 labels), ids of files whose lengths vary row by row, and ids of the previous
release's JSON Lines captures take one dict lookup per id.

Each label is turned into the number the metrics use once per model version
(:meth:`LabelIndex.decided`): classes decide it, so versions may differ.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress, count, repeat
from operator import is_not
from typing import Any

import numpy as np
import numpy.typing as npt

from treeserve.parquet import StringRuns

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]

_SEED = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
MAX_WIDTH = 512  # bytes: longer ids are looked up one by one
# One odd 64-bit multiplier per eight bytes of an id, fixed (the same in every run).
_LANES = np.random.default_rng(20261202).integers(0, 2**63, MAX_WIDTH // 8, dtype=np.int64)
_MULTIPLIERS = _LANES.astype(np.uint64) * np.uint64(2) + np.uint64(1)
_NONE = np.zeros(0, np.int64)


def hash_rows(rows: Bytes) -> U64:
    """A 64-bit hash of each row of a ``(n, width <= MAX_WIDTH)`` byte matrix: each eight-byte
    lane mixed on its own (a shift folds its high bits down, its own odd multiplier spreads
    them up, another shift), the lanes summed, the sum mixed again. The same bytes give the
    same hash; ids that differ in one lane always hash apart."""
    n, width = rows.shape
    words = -(-width // 8)
    padded = np.zeros((n, words * 8), np.uint8)
    padded[:, :width] = rows
    lanes = padded.view(np.uint64)
    lanes ^= lanes >> np.uint64(29)
    lanes *= _MULTIPLIERS[:words]
    lanes ^= lanes >> np.uint64(32)
    h = np.full(n, _SEED ^ np.uint64(width), np.uint64)
    for j in range(words):
        h += lanes[:, j]
    h ^= h >> np.uint64(31)
    h *= _MIX
    h ^= h >> np.uint64(29)
    return h


def decide_each(labels: list[Any], decide: Callable[[Any], float | None]) -> list[float | None]:
    """``decide`` of each label, called once per distinct label (labels repeat: classes)."""
    try:
        distinct = dict.fromkeys(labels)
    except TypeError:  # an unhashable label (a JSON list): each decided on its own
        return list(map(decide, labels))
    for label in distinct:
        distinct[label] = decide(label)
    return list(map(distinct.__getitem__, labels))


class _Width:
    """The labels whose ids are ``width`` bytes long, in the order of their hashes: each one's
    hash, id bytes and position in :attr:`LabelIndex.values`."""

    __slots__ = ("hashes", "keys", "positions", "present", "shift")

    def __init__(self, hashes: U64, keys: Bytes, positions: I64) -> None:
        self.hashes, self.keys, self.positions = hashes, keys, positions
        # Which top-bit prefixes of the hashes occur (16 slots per label, at most 16M): one
        # look here turns nearly every id without a label away.
        bits = min(24, max(8, int(hashes.size * 16).bit_length()))
        self.shift = np.uint64(64 - bits)
        self.present = np.zeros(1 << bits, bool)
        self.present[hashes >> self.shift] = True

    def lookup(self, ids: Bytes) -> tuple[I64, I64]:
        """(rows of ``ids`` with a label, the labels' positions), in row order."""
        if self.hashes.size == 0 or ids.shape[0] == 0:
            return _NONE, _NONE
        h = hash_rows(ids)
        maybe = np.flatnonzero(self.present[h >> self.shift])
        order = maybe[np.argsort(h[maybe])]  # searching sorted keys is ~3x faster
        wanted = h[order]
        at = np.minimum(np.searchsorted(self.hashes, wanted), self.hashes.size - 1)
        candidate = self.hashes[at] == wanted
        rows, at = order[candidate], at[candidate]
        same = (self.keys[at] == ids[rows]).all(axis=1)
        rows, at = rows[same], at[same]
        back = np.argsort(rows)
        return rows[back].astype(np.int64, copy=False), self.positions[at[back]]


class LabelIndex:
    """``labels`` (by id, as :func:`treeserve.monitoring.pipeline.read_labels` reads them)
    indexed for :meth:`find`; each id length is indexed the first time a file asks for it,
    the dicts of one lookup per id are built the first time one is needed."""

    def __init__(self, labels: dict[str, Any]) -> None:
        self.labels = labels
        self.values: list[Any] = list(labels.values())
        self._encoded: list[bytes] | None = None
        self._lengths: I64 | None = None
        self._widths: dict[int, _Width | None] = {}
        self._by_bytes: dict[bytes, int] | None = None
        self._by_text: dict[str, int] | None = None
        self._decided: dict[Any, tuple[F64, Mask]] = {}

    def _encode(self) -> list[bytes]:
        if self._encoded is None:
            self._encoded = [key.encode() for key in self.labels]
            self._lengths = np.fromiter(map(len, self._encoded), np.int64, len(self._encoded))
        return self._encoded

    def _width(self, width: int) -> _Width | None:
        if width in self._widths:
            return self._widths[width]
        encoded = self._encode()
        assert self._lengths is not None  # noqa: S101 - set with _encoded
        entry: _Width | None = None
        if 0 < width <= MAX_WIDTH:
            at = np.flatnonzero(self._lengths == width)
            joined = b"".join([encoded[i] for i in at.tolist()])
            keys = np.frombuffer(joined, np.uint8).reshape(-1, width)
            hashes = hash_rows(keys)
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]
            if not (hashes[1:] == hashes[:-1]).any():
                entry = _Width(hashes, keys[order], at[order])
        self._widths[width] = entry
        return entry

    def find(self, ids: StringRuns | list[Any], *, as_bytes: bool = False) -> tuple[I64, I64]:
        """The rows of ``ids`` that have a label, ascending, and their labels' positions in
        :attr:`values`. ``ids``: a capture file's (by width), else a list: of UTF-8 bytes
        (``as_bytes``) or of JSON values (labels are keyed by their text)."""
        if not isinstance(ids, StringRuns):
            return self._one_by_one(ids, as_bytes=as_bytes)
        rows: list[I64] = []
        positions: list[I64] = []
        for width, (at, values) in ids.widths.items():
            entry = self._width(width)
            if entry is None:
                found, where = self._one_by_one(
                    StringRuns(at.size, {width: (np.arange(at.size), values)}).tolist(),
                    as_bytes=True,
                )
            else:
                found, where = entry.lookup(values)
            rows.append(at[found])
            positions.append(where)
        if len(rows) == 1:
            return rows[0], positions[0]
        if not rows:
            return _NONE, _NONE
        all_rows = np.concatenate(rows)
        order = np.argsort(all_rows, kind="stable")
        return all_rows[order], np.concatenate(positions)[order]

    def _one_by_one(self, ids: list[Any], *, as_bytes: bool) -> tuple[I64, I64]:
        if as_bytes:
            if self._by_bytes is None:
                self._by_bytes = {key: i for i, key in enumerate(self._encode())}
            found = list(map(self._by_bytes.get, ids))
        else:
            if self._by_text is None:
                self._by_text = {key: i for i, key in enumerate(self.labels)}
            text = [i if isinstance(i, str) else str(i) for i in ids]
            found = list(map(self._by_text.get, text))
        rows = list(compress(count(), map(is_not, found, repeat(None))))  # C-level passes
        return np.array(rows, np.int64), np.array([found[i] for i in rows], np.int64)

    def decided(self, key: Any, decide: Callable[[Any], float | None]) -> tuple[F64, Mask]:
        """Every label as a number by ``decide`` (None: not usable), as an array aligned with
        :attr:`values` and the mask of the usable ones; computed once per ``key`` (a model
        version: its classes decide), each distinct label once."""
        done = self._decided.get(key)
        if done is None:
            numbers = decide_each(self.values, decide)
            usable = np.fromiter((y is not None for y in numbers), bool, len(numbers))
            y = np.array([0.0 if v is None else v for v in numbers], dtype=np.float64)
            done = self._decided[key] = (y, usable)
        return done
