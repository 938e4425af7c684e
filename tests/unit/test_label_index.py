"""Labels joined by id with numpy (treeserve.monitoring.labels) against one dict lookup per id:
the same rows, the same labels, whatever the ids' bytes and whatever the hash does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from treeserve import parquet
from treeserve.monitoring import labels as label_index
from treeserve.monitoring.labels import LabelIndex


def page(values: list[bytes]) -> bytes:
    """PLAIN BYTE_ARRAY values as a page holds them."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def matrix(ids: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(ids), np.uint8).reshape(len(ids), -1)


def runs(ids: list[bytes]) -> parquet.StringRuns:
    out = parquet.string_runs(page(ids), 0, len(ids))
    assert out is not None
    return out


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


@pytest.mark.parametrize("widths", [[1], [7], [8], [9], [16], [36], [3, 4, 5, 9, 40]])
def test_find_equals_one_dict_lookup_per_id(widths: list[int]) -> None:
    rng = np.random.default_rng(sum(widths))
    pool = [i for w in widths for i in random_ids(rng, min(3000 // len(widths), 5**w - 1), w)]
    picks = rng.integers(len(pool), size=2 * len(pool))
    ids = sorted((pool[i] for i in picks), key=len)  # runs of one width, as requests write
    ids += [pool[i] for i in np.sort(picks)[:500]]  # and the widths again; ids repeat
    labelled = rng.random(len(pool)) < 0.3
    labelled[0] = True
    labels = {k.decode(): f"y{i}" for i, k in enumerate(pool) if labelled[i]}
    labels["other width" * 9] = "z"  # a width no id has
    index = LabelIndex(labels)
    rows, positions = index.find(runs(ids))
    expected_rows, expected = by_dict(ids, labels)
    assert rows.tolist() == expected_rows
    assert [index.values[p] for p in positions.tolist()] == expected
    assert expected_rows  # the test looks something up
    assert all(index._widths[w] is not None for w in widths)  # searched, not one by one
    # The same ids one by one (lists: bytes, or text) find the same rows.
    for found, where in (index.find(ids, as_bytes=True), index.find([i.decode() for i in ids])):
        assert found.tolist() == expected_rows
        assert where.tolist() == positions.tolist()


def test_generated_ids_hash_apart() -> None:
    """A million ids as the inference function generates them (``<request id>-<row>``, hex
    request ids that differ in a few characters) and 100,000 labels among them: no two label
    ids of one width share a hash, so every width is searched (none left to one by one)."""
    ids = [f"{c:016x}{r:016x}-{i}" for c in range(10) for r in range(100) for i in range(1000)]
    index = LabelIndex(dict.fromkeys(ids[::10], 1))
    found = [index._width(w) for w in sorted({len(i) for i in ids})]  # 34, 35 and 36 bytes
    assert len(found) == 3
    assert all(entry is not None for entry in found)
    distinct = label_index.hash_rows(matrix([i.encode() for i in ids if len(i) == 36]))
    assert np.unique(distinct).size == distinct.size


def test_a_weak_hash_never_attaches_a_wrong_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a hash of the first byte alone, every id is a candidate: the byte check decides;
    labels whose hashes collide leave their width to one dict lookup per id."""

    def first_byte(rows: np.ndarray) -> np.ndarray:
        return rows[:, 0].astype(np.uint64) << np.uint64(56)

    monkeypatch.setattr(label_index, "hash_rows", first_byte)
    ids = [b"a1", b"b1", b"a2", b"c1", b"zzz", b"a22"]
    index = LabelIndex({"a1": 1, "b2": 2, "c1": 3, "a22": 4, "a23": 5})
    cut = parquet.string_runs(page(ids), 0, len(ids))
    assert cut is None or cut.tolist() == ids
    cut = parquet.StringRuns(
        6,
        {
            2: (np.array([0, 1, 2, 3]), np.frombuffer(b"a1b1a2c1", np.uint8).reshape(4, 2)),
            3: (np.array([4, 5]), np.frombuffer(b"zzza22", np.uint8).reshape(2, 3)),
        },
    )
    rows, positions = index.find(cut)
    assert rows.tolist() == [0, 3, 5]  # "b1" shares "b2"'s hash but is not it; "a2" has none
    assert [index.values[p] for p in positions.tolist()] == [1, 3, 4]
    assert index._widths[3] is None  # "a22" and "a23" collide: looked up one by one
    assert index._widths[2] is not None


def test_empty_files_empty_labels_and_empty_ids() -> None:
    for index, ids in (
        (LabelIndex({}), runs([b"abc"])),
        (LabelIndex({"abc": 1}), parquet.StringRuns(0, {})),
        (LabelIndex({"abc": 1}), []),
    ):
        rows, positions = index.find(ids)
        assert rows.size == positions.size == 0
    rows, _ = LabelIndex({"": 1, "a": 2}).find(runs([b"", b"", b"a"]))  # width 0: one by one
    assert rows.tolist() == [0, 1, 2]


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


def test_string_runs_cut_pages_exactly() -> None:
    same = [b"ab\x00", b"\x00cd", b"efg"]
    cut = parquet.string_runs(page(same), 0, 3)
    assert cut is not None
    assert list(cut.widths) == [3]
    assert cut.tolist() == same  # trailing NULs kept
    mixed = [b"ab", b"abc", b"abc", b"", b"abcd", b"ab"]
    assert parquet.decode_strings(page(mixed), 0, 6) == mixed
    # A value that looks like a length prefix: only where a length lies is one read.
    tricky = [b"\x03\x00\x00\x00", b"\x03\x00\x00\x00abc"] * 40
    assert parquet.decode_strings(page(tricky), 0, 80) == tricky
    assert parquet.string_runs(page(tricky), 0, 80) is None  # 80 runs of one: one by one
    chosen = parquet.StringRuns(
        6,
        {
            w: (
                np.array(r),
                np.frombuffer(b"".join(mixed[i] for i in r), np.uint8).reshape(len(r), w),
            )
            for w, r in ((2, [0, 5]), (3, [1, 2]), (0, [3]), (4, [4]))
        },
    ).take(np.array([1, 3, 5]))
    assert chosen.tolist() == [b"abc", b"", b"ab"]
    for broken, n in ((page(same)[:-1], 3), (b"\x01", 1), (page([b"x" * 10])[:8], 1)):
        with pytest.raises(parquet.ParquetError):
            parquet.decode_strings(broken, 0, n)
    rng = np.random.default_rng(5)
    for _ in range(300):  # seeded: random pages, cut by runs and one by one, agree
        values = [bytes(rng.integers(0, 256, int(rng.integers(0, 6)), dtype=np.uint8))]
        for _ in range(int(rng.integers(0, 400))):
            fresh = bytes(rng.integers(0, 256, int(rng.integers(0, 6)), dtype=np.uint8))
            values.append(values[-1] if rng.random() < 0.95 else fresh)
        data = page(values)
        assert parquet.decode_strings(data, 0, len(values)) == values
        got = parquet.string_runs(data, 0, len(values))
        if got is not None:
            assert got.tolist() == values
            keep = np.flatnonzero(rng.random(len(values)) < 0.5)
            assert got.take(keep).tolist() == [values[i] for i in keep.tolist()]
