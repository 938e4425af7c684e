"""CaptureBuffer: sampling, batching by rows and age, the columns written, failure handling,
the memory bound."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from treeserve import captures
from treeserve.model.manifest import ModelManifest
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
    """The rows of a capture object, one dict each."""
    c = captures.decode_capture(body)
    return [
        {
            "id": c.ids[i],
            "ts": captures.iso_millis(int(c.ts_ms[i]) / 1000),
            "model": c.model,
            "version": None if c.versions[i] < 0 else int(c.versions[i]),
            "alias": (c.aliases or [None] * len(c))[i],
            "inputs": c.inputs[i].tolist(),
            "outputs": c.outputs[i].tolist(),
            "label": (c.labels or [None] * len(c))[i],
            "categories": {k: v[i] for k, v in c.categories.items()},
        }
        for i in range(len(c))
    ]


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
    assert key.endswith(".parquet")
    rows = lines(body)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    assert np.isnan(rows[0]["inputs"][1])
    rows[0]["inputs"][1] = None
    assert rows[0] == {
        "id": "r0",
        "ts": "2026-11-29T04:40:50.123Z",
        "model": "churn",
        "version": 7,
        "alias": None,
        "inputs": [0.0, None, 2.0],
        "outputs": [0.75],
        "label": "yes",
        "categories": {},
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
    assert first["outputs"] == pytest.approx([0.1, 0.2, 0.7])
    assert first["label"] == "c"
    assert second == {**second, "id": "5", "outputs": [3.5], "label": None}  # ids are text


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


def manifest(name: str, categories: dict[str, list[Any]] | None = None) -> ModelManifest:
    return ModelManifest(
        name=name,
        sha256="0" * 64,
        model_size=1,
        xgboost_version="2",
        objective="binary:logistic",
        task="binary",
        num_features=3,
        feature_names=["usage", "plan", "region"],
        feature_types=["float", "c", "c"],
        categories=categories,
    )


def test_categories_named_by_value_and_one_object_per_model() -> None:
    s3 = FakeS3()
    buffer = CaptureBuffer("b", "default", 1.0, max_rows=100, s3=s3)  # type: ignore[arg-type]
    cats = {"plan": ["gold", "silver", 7], "region": ["north", "south"]}
    # codes: in range, missing (NaN), beyond the list (unseen), a fraction
    X = np.array([[0.5, 0, 1], [1.5, np.nan, 0], [2.5, 3, 5], [3.5, 2, 0.5]], np.float32)
    out = np.full(4, 0.25, np.float32)
    buffer.record(["a", "b", "c", "d"], X, out, None, 3, manifest=manifest("churn", cats))
    buffer.record(["e"], X[:1], out[:1], None, 1, manifest=manifest("other"))
    buffer.record(["f"], X[:1], out[:1], None, 4)  # no manifest: the buffer's model
    assert buffer.flush()
    by_model = {key.split("/")[1]: lines(body) for key, body in s3.objects.items()}
    assert sorted(by_model) == ["churn", "default", "other"]
    churn = by_model["churn"]
    assert [r["categories"] for r in churn] == [
        {"plan": "gold", "region": "south"},
        {"plan": None, "region": "north"},
        {"plan": None, "region": None},
        {"plan": "7", "region": None},
    ]
    assert np.array_equal(
        np.array([r["inputs"] for r in churn], np.float32), X, equal_nan=True
    )  # the codes themselves stay in the inputs
    assert by_model["other"][0]["categories"] == {}
    assert by_model["default"][0]["version"] == 4


def test_memory_is_bounded_by_max_rows_plus_one_request() -> None:
    """Whatever the traffic, the buffer never holds more than CAPTURE_MAX_ROWS rows plus the
    rows of the request that crossed the bound, written or (on failure) dropped."""
    s3 = FakeS3()
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=50, s3=s3)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    peak = 0
    for k in range(200):
        n = int(rng.integers(1, 40))
        buffer.record(*request(n, 1000 * k), version=1)
        peak = max(peak, buffer.buffered_rows)
        assert buffer.buffered_rows < 50
    s3.fail = True
    for k in range(50):
        buffer.record(*request(30, 10**6 + 100 * k), version=1)
        assert buffer.buffered_rows < 50
    assert peak < 50
    assert buffer.dropped_rows > 0


class GatedS3(FakeS3):
    """A FakeS3 whose PUTs wait until the test opens the gate (a slow S3)."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.gate = threading.Event()
        self.started = threading.Event()

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        self.started.set()
        assert self.gate.wait(10)
        return super().put_object(**kwargs)


def test_background_write_leaves_the_request_and_one_write_runs_at_a_time() -> None:
    from treeserve.serving.capture import wait_for_writes

    s3 = GatedS3()
    buffer = CaptureBuffer("b", "m", 1.0, max_rows=10, s3=s3, background=True)  # type: ignore[arg-type]
    buffer.record(*request(10), version=1)  # crosses the bound: the write starts on a thread
    assert s3.started.wait(5)
    assert not s3.objects  # still in flight: the request did not wait for it
    assert buffer.buffered_rows == 0
    assert buffer.in_flight_rows == 10
    buffer.record(*request(4, 10), version=1)  # below the bound: buffered, no wait
    assert buffer.buffered_rows == 4
    s3.gate.set()
    wait_for_writes()
    assert len(s3.objects) == 1
    assert buffer.in_flight_rows == 0
    assert buffer.flush()  # a plain flush waits for its write
    assert len(s3.objects) == 2
    assert sorted(r["id"] for body in s3.objects.values() for r in lines(body)) == sorted(
        f"r{i}" for i in range(14)
    )
