"""Labels joined by id with numpy (treeserve.monitoring.labels) against one dict lookup per id:
the same rows, the same labels, whatever the ids' bytes and whatever the hash does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from treeserve import parquet
from treeserve.monitoring import labels as label_index
from treeserve.monitoring.labels import LabelIndex


def matrix(ids: list[bytes]) -> np.ndarray:
    width = len(ids[0])
    assert all(len(i) == width for i in ids)
    return np.frombuffer(b"".join(ids), np.uint8).reshape(len(ids), width)


def by_dict(ids: list[bytes], labels: dict[str, Any]) -> tuple[list[int], list[Any]]:
    table = {k.encode(): v for k, v in labels.items()}
    rows = [i for i, row_id in enumerate(ids) if row_id in table]
    return rows, [table[ids[i]] for i in rows]


def random_ids(rng: np.random.Generator, n: int, width: int) -> list[bytes]:
    """Ids of ``width`` UTF-8 bytes, NULs (trailing ones too) and multi-byte letters among
    them; every id decodes, as label ids are text."""
    letters = ["a", "b", "\x00", "é", "-", "7"]  # "é" is two bytes
    out: set[bytes] = set()
    while len(out) < n:
        text = ""
        while len(text.encode()) < width:
            pick = letters[int(rng.integers(len(letters)))]
            if len((text + pick).encode()) <= width:
                text += pick
        out.add(text.encode())
    return sorted(out)


@pytest.mark.parametrize("width", [1, 7, 8, 9, 16, 36])
def test_lookup_equals_one_dict_lookup_per_id(width: int) -> None:
    rng = np.random.default_rng(width)
    n = 60 if width == 1 else 3000
    pool = random_ids(rng, min(n, 5**width), width)
    ids = [pool[i] for i in rng.integers(len(pool), size=2 * len(pool))]  # repeated ids too
    labelled = rng.random(len(pool)) < 0.3
    labelled[0] = True
    labels = {k.decode(): f"y{i}" for i, k in enumerate(pool) if labelled[i]}
    labels.update({"other width": "z", "x" * (width + 1): "z"})  # other widths: not searched
    index = LabelIndex(labels)
    hit = index.lookup(matrix(ids))
    assert hit is not None
    rows, positions = hit
    expected_rows, expected = by_dict(ids, labels)
    assert rows.tolist() == expected_rows
    assert [index.values[p] for p in positions.tolist()] == expected
    assert expected_rows  # the test looks something up


def test_a_weak_hash_never_attaches_a_wrong_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a hash of the first byte alone, every id is a candidate: the byte check decides;
    labels whose hashes collide leave the width unindexed (the caller looks ids up itself)."""

    def first_byte(rows: np.ndarray) -> np.ndarray:
        return rows[:, 0].astype(np.uint64) << np.uint64(56)

    monkeypatch.setattr(label_index, "hash_rows", first_byte)
    ids = [b"a1", b"b1", b"a2", b"c1"]
    assert LabelIndex({"a1": 1, "a2": 2}).lookup(matrix(ids)) is None  # "a1", "a2" collide
    index = LabelIndex({"a1": 1, "b2": 2, "c1": 3})
    hit = index.lookup(matrix(ids))
    assert hit is not None
    rows, positions = hit
    assert rows.tolist() == [0, 3]  # "b1" shares "b2"'s hash but is not it; "a2" has none
    assert [index.values[p] for p in positions.tolist()] == [1, 3]


def test_empty_files_empty_labels_and_empty_ids() -> None:
    assert LabelIndex({}).lookup(matrix([b"abc"])) == (pytest.approx([]), pytest.approx([]))
    rows, positions = LabelIndex({"abc": 1}).lookup(np.zeros((0, 3), np.uint8)) or ((), ())
    assert len(rows) == len(positions) == 0
    assert LabelIndex({"": 1}).lookup(np.zeros((2, 0), np.uint8)) is None  # width 0: unindexed


def test_decided_labels_masks_the_unusable_and_takes_any_json() -> None:
    index = LabelIndex({"a": "1", "b": "nope", "c": "0", "d": [1], "e": "1"})
    calls: list[Any] = []

    def decide(label: Any) -> float | None:
        calls.append(label)
        try:
            return float(label)
        except (TypeError, ValueError):
            return None

    y, usable = index.decided(1, decide)
    assert usable.tolist() == [True, False, True, False, True]
    assert y[usable].tolist() == [1.0, 0.0, 1.0]
    assert index.decided(1, decide)[0] is y  # once per key
    assert len(calls) == 5  # unhashable among them: each decided on its own
    hashable = LabelIndex({"a": "1", "b": "1", "c": "2"})
    seen: list[Any] = []
    hashable.decided(1, lambda label: seen.append(label) or 0.0)
    assert seen == ["1", "2"]  # each distinct label once


def test_fixed_strings_cut_pages_of_one_width_only() -> None:
    def page(values: list[bytes]) -> bytes:
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)

    same = [b"ab\x00", b"\x00cd", b"efg"]
    fixed = parquet.fixed_strings(page(same), 0, 3)
    assert fixed is not None
    assert [bytes(r) for r in fixed] == same
    assert parquet.decode_strings(page(same), 0, 3) == same  # trailing NULs kept
    assert parquet.fixed_strings(page([b"ab", b"abc"]), 0, 2) is None
    assert parquet.decode_strings(page([b"ab", b"abc"]), 0, 2) == [b"ab", b"abc"]
    assert parquet.fixed_strings(page(same)[:-1], 0, 3) is None  # cut short: not one width
    with pytest.raises(parquet.ParquetError):
        parquet.decode_strings(page(same)[:-1], 0, 3)
    with pytest.raises(parquet.ParquetError):
        parquet.fixed_strings(b"\x01", 0, 1)
