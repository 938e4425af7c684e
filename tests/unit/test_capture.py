"""CaptureBuffer: sampling, batching by rows and age, the line schema, failure handling."""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import orjson
import pytest

from treeserve.serving.capture import CaptureBuffer

pytestmark = pytest.mark.unit

T0 = 1_795_927_250.123  # 2026-11-29T04:40:50.123Z


class FakeS3:
    """Records put_object calls (a fake, not a mock: it keeps the objects)."""

    def __init__(self, fail: bool = False) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.fail = fail

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **_: Any) -> dict[str, Any]:
        self.puts += 1
        if self.fail:
            raise ConnectionError("S3 unavailable")
        self.objects[Key] = Body
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def lines(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in gzip.decompress(body).splitlines()]


def request(n: int, start: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    X[0, 1] = np.nan
    return [f"r{start + i}" for i in range(n)], X, np.full(n, 0.75, np.float32), ["yes"] * n


def test_batches_by_rows_one_put_per_batch_and_schema() -> None:
    s3, clock = FakeS3(), Clock()
    buffer = CaptureBuffer("b", "churn", 1.0, max_rows=10, max_age_seconds=60, s3=s3, clock=clock)  # type: ignore[arg-type]
    for k in range(4):
        buffer.record(*request(3, 3 * k), version=7)
    assert s3.puts == 1  # 12 rows crossed 10 once: one object, not one per request
    assert buffer.buffered_rows == 0
    ((key, body),) = s3.objects.items()
    assert key.startswith("captures/churn/dt=2026-11-29/20261129T044050123Z-")
    assert key.endswith(".jsonl.gz")
    rows = lines(body)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    assert rows[0] == {
        "id": "r0",
        "ts": "2026-11-29T04:40:50.123Z",
        "version": 7,
        "features": [0.0, None, 2.0],
        "prediction": 0.75,
        "label": "yes",
    }


def test_batches_by_age_checked_on_each_request() -> None:
    s3, clock = FakeS3(), Clock()
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=1000, max_age_seconds=30, s3=s3, clock=clock)  # type: ignore[arg-type]
    buffer.record(*request(1), version=1)
    clock.now += 29
    buffer.record(*request(1, 1), version=1)
    assert s3.puts == 0
    clock.now += 2
    assert buffer.maybe_flush()
    assert s3.puts == 1
    assert len(lines(next(iter(s3.objects.values())))) == 2


def test_multiclass_and_regression_lines() -> None:
    s3 = FakeS3()
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=1, s3=s3)  # type: ignore[arg-type]
    probs = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    buffer.record(["a"], np.zeros((1, 2), np.float32), probs, ["c"], version=2)
    buffer.record([5], np.zeros((1, 2), np.float32), np.array([3.5], np.float32), None, version=2)
    first, second = (lines(b)[0] for b in s3.objects.values())
    assert first["prediction"] == pytest.approx([0.1, 0.2, 0.7])
    assert first["label"] == "c"
    assert second == {**second, "id": 5, "prediction": 3.5, "label": None}


def test_sampling_rate_is_respected() -> None:
    s3 = FakeS3()
    buffer = CaptureBuffer("b", "m", 0.2, max_rows=100_000, s3=s3, seed=1)  # type: ignore[arg-type]
    for k in range(20):
        buffer.record(*request(100, 100 * k), version=1)
    assert 300 <= buffer.buffered_rows <= 500  # 2000 rows at 20%
    single = CaptureBuffer("b", "m", 0.2, max_rows=100_000, s3=s3, seed=1)  # type: ignore[arg-type]
    for k in range(1000):
        single.record(*request(1, k), version=1)
    assert 130 <= single.buffered_rows <= 270
    off = CaptureBuffer("b", "m", 0.0, s3=s3)  # type: ignore[arg-type]
    off.record(*request(5), version=1)
    assert off.buffered_rows == 0
    assert not off.enabled
    assert s3.puts == 0


def test_flush_failure_drops_batch_counts_and_never_raises() -> None:
    s3 = FakeS3(fail=True)
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=5, s3=s3)  # type: ignore[arg-type]
    for k in range(4):
        buffer.record(*request(3, 3 * k), version=1)  # must not raise
    assert buffer.flush_failures == 2
    assert buffer.dropped_rows == 12
    assert buffer.buffered_rows == 0  # memory stays bounded
    s3.fail = False
    buffer.record(*request(5), version=1)
    assert buffer.flushes == 1


def test_invalid_rate() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        CaptureBuffer("b", "m", 1.5)


def test_sigterm_flushes_then_chains_to_previous_handler() -> None:
    import os
    import signal

    s3 = FakeS3()
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=1000, s3=s3)  # type: ignore[arg-type]
    buffer.record(*request(3), version=1)
    called: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: called.append(signum))
    try:
        assert buffer.install_sigterm_flush()
        os.kill(os.getpid(), signal.SIGTERM)
        assert s3.puts == 1  # written before the process would go away
        assert called == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)
