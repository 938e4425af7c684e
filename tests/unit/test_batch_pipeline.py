"""The batch worker's parsing thread (treeserve.batch.worker._prefetched): order, errors, bound."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from treeserve.batch.worker import _prefetched
from treeserve.errors import MalformedBody


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name == "batch-parse"}


def test_items_come_in_order_and_the_thread_ends() -> None:
    assert list(_prefetched(iter(range(1000)), 2)) == list(range(1000))
    assert not _threads()


def test_an_error_is_raised_after_the_items_before_it() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise MalformedBody("line 2 is not valid")

    pipeline = _prefetched(items(), 2)
    assert [next(pipeline), next(pipeline)] == [1, 2]
    with pytest.raises(MalformedBody, match="line 2"):
        next(pipeline)
    assert not _threads()


def test_the_producer_stays_at_most_depth_plus_one_ahead_and_stops_with_the_consumer() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10_000):
            made.append(i)
            yield i

    pipeline = _prefetched(items(), 3)
    assert next(pipeline) == 0
    time.sleep(0.3)  # time for the producer to run ahead as far as it may
    # 1 taken, 3 queued, 1 made and waiting to be queued
    assert len(made) == 5
    pipeline.close()
    assert not _threads()
    assert len(made) == 5


def test_line_blocks_are_full_but_the_last_and_keep_every_line_in_order() -> None:
    import random

    from treeserve.batch.stream import line_blocks

    rng = random.Random(5)
    lines = [
        rng.choice([b"", b" ", b"\t", b"\r", f"{i},{i}".encode()]) + rng.choice([b"", b"\r"])
        for i in range(2_000)
    ]
    text = b"\n".join(lines)
    expected = [line.removesuffix(b"\r") for line in lines if line.strip()]
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        size = rng.randint(1, 300)
        blocks = list(line_blocks(pieces, size))
        assert [line for block in blocks for line in block] == expected
        assert all(len(block) == size for block in blocks[:-1])
        assert 1 <= len(blocks[-1]) <= size


def test_write_behind_writes_in_order_and_raises_what_writing_raised() -> None:
    from treeserve.batch.worker import _WriteBehind
    from treeserve.errors import StorageUnavailable

    written: list[int] = []
    writer = _WriteBehind(written.append, 2)
    for i in range(500):
        writer.put(i)
    writer.finish()
    assert written == list(range(500))
    assert not {t.name for t in threading.enumerate()} & {"batch-write"}

    def write(item: int) -> None:
        if item == 3:
            raise StorageUnavailable("S3 is unavailable; retry")
        written.append(item)

    written.clear()
    writer = _WriteBehind(write, 2)
    for i in range(5):
        writer.put(i)
    with pytest.raises(StorageUnavailable):
        writer.finish()  # (or the next put, had there been one after the error)
    assert written == [0, 1, 2]  # nothing after the error
    assert not {t.name for t in threading.enumerate()} & {"batch-write"}


def test_a_failing_sink_is_aborted_and_its_error_raised() -> None:
    from treeserve.batch.stream import FileReader
    from treeserve.batch.worker import score_object
    from treeserve.errors import StorageUnavailable

    class FailingSink:
        def __init__(self) -> None:
            self.writes, self.aborted, self.closed = 0, False, False

        def write(self, data: bytes) -> None:
            self.writes += 1
            if self.writes == 2:
                raise StorageUnavailable("S3 is unavailable; retry")

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.aborted = True

    from tests.conftest import train
    from tests.unit.test_batch_worker import batch_model

    model = batch_model(train("binary:logistic"))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.csv"
        names = model.predictor.feature_names
        source.write_text(",".join(names) + "\n" + (",".join(["1"] * len(names)) + "\n") * 50)
        sink = FailingSink()
        with pytest.raises(StorageUnavailable):
            score_object(model, "in.csv", FileReader(source), sink, chunk_rows=10)
        assert sink.aborted
        assert not sink.closed
        assert not {t.name for t in threading.enumerate()} & {"batch-write", "batch-parse"}
