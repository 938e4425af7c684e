"""Labels looked up by the ids of captured rows, a capture file at a time.

Most ids of a capture file share one byte length (UUIDs, request ids of a fixed format), and
the file then holds them as a ``(rows, width)`` byte matrix (:func:`treeserve.parquet.fixed_strings`).
:class:`LabelIndex` keeps the labels' ids of each width sorted by a 64-bit hash of their bytes:
a file's ids are hashed, searched among them, and every candidate is confirmed byte for byte,
so a hash collision can cost a search but never attach a wrong label. One dict lookup per row
costs about 4x more at a million rows against 100,000 labels: the lookups miss the CPU's caches.

A width whose labels' ids share a hash (about one chance in 10**9 at 100,000 labels) is not
indexed: :meth:`LabelIndex.lookup` returns None and the caller looks each id up by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Bytes = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

_SEED = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_SHIFT = np.uint64(31)


def hash_rows(rows: Bytes) -> U64:
    """A 64-bit hash of each row of a ``(n, width)`` byte matrix (the same bytes, the same
    hash: eight bytes at a time, multiplied and folded)."""
    n, width = rows.shape
    words = -(-width // 8)
    padded = np.zeros((n, words * 8), np.uint8)
    padded[:, :width] = rows
    lanes = padded.view(np.uint64)
    h = np.full(n, _SEED ^ np.uint64(width), np.uint64)
    for j in range(words):
        h ^= lanes[:, j]
        h *= _MIX
        h ^= h >> _SHIFT
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
        # Which top-bit prefixes of the hashes occur (16 slots per label, at most 16M): most
        # ids have no label yet, and one look here turns nearly all of those away.
        bits = min(24, max(8, int(hashes.size * 16).bit_length()))
        self.shift = np.uint64(64 - bits)
        self.present = np.zeros(1 << bits, bool)
        self.present[hashes >> self.shift] = True


class LabelIndex:
    """``labels`` (by id, as :func:`treeserve.monitoring.pipeline.read_labels` reads them)
    indexed for :meth:`lookup`; each width is indexed the first time a file asks for it."""

    def __init__(self, labels: dict[str, Any]) -> None:
        self.labels = labels
        self.values: list[Any] = list(labels.values())
        self._encoded: list[bytes] | None = None
        self._lengths: I64 | None = None
        self._widths: dict[int, _Width | None] = {}
        self._decided: dict[Any, tuple[F64, Mask]] = {}

    def _width(self, width: int) -> _Width | None:
        if width in self._widths:
            return self._widths[width]
        if self._encoded is None:
            self._encoded = [key.encode() for key in self.labels]
            self._lengths = np.fromiter(map(len, self._encoded), np.int64, len(self._encoded))
        assert self._lengths is not None  # noqa: S101 - set with _encoded
        entry: _Width | None = None
        if width > 0:
            at = np.flatnonzero(self._lengths == width)
            encoded = self._encoded
            joined = b"".join([encoded[i] for i in at.tolist()])
            keys = np.frombuffer(joined, np.uint8).reshape(-1, width)
            hashes = hash_rows(keys)
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]
            if not (hashes[1:] == hashes[:-1]).any():
                entry = _Width(hashes, keys[order], at[order])
        self._widths[width] = entry
        return entry

    def lookup(self, ids: Bytes) -> tuple[I64, I64] | None:
        """The rows of ``ids`` (a ``(rows, width)`` byte matrix) that have a label, in row
        order, and their labels' positions in :attr:`values`; None when this width is not
        indexed (see the module)."""
        entry = self._width(ids.shape[1])
        if entry is None:
            return None
        if entry.hashes.size == 0 or ids.shape[0] == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h = hash_rows(ids)
        maybe = np.flatnonzero(entry.present[h >> entry.shift])
        order = maybe[np.argsort(h[maybe])]  # searching sorted keys is ~3x faster
        wanted = h[order]
        at = np.minimum(np.searchsorted(entry.hashes, wanted), entry.hashes.size - 1)
        candidate = entry.hashes[at] == wanted
        rows, at = order[candidate], at[candidate]
        same = (entry.keys[at] == ids[rows]).all(axis=1)
        rows, at = rows[same], at[same]
        back = np.argsort(rows)
        return rows[back].astype(np.int64, copy=False), entry.positions[at[back]]

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
