"""Monitoring with parse workers (treeserve.monitoring.parse_pool): the same report as parsing in-process,
whatever the files hold and whatever happens to a worker."""

from __future__ import annotations

import multiprocessing
import os
from datetime import timedelta
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import BUCKET, train
from tests.integration.test_monitoring import (
    NOW,
    START,
    capture_lines,
    put_captures,
    register,
    traffic,
)
from treeserve import captures
from treeserve.captures import Group, Split
from treeserve.errors import ConfigurationError
from treeserve.monitoring import parse_pool
from treeserve.monitoring import pipeline as monitoring
from treeserve.settings import Settings

pytestmark = pytest.mark.integration


def _window_of_everything(s3: Any) -> None:
    """Two versions, NaNs, labels of three id shapes, rows outside the window, a line without
    a version, a file only the general parser takes, an empty file and a corrupt one."""
    model = train("binary:logistic")
    v1 = register(s3, model)
    v2 = register(s3, model, X_ref=model.X + 0.25)
    rng = np.random.default_rng(21)
    X = rng.normal(size=(900, 6))
    X[rng.random(X.shape) < 0.05] = np.nan
    ids1, _ = traffic(s3, model, v1, X[:500], prefix="a", files=4)
    traffic(s3, model, v2, X[500:800] + 0.5, prefix="b", files=3)
    ts = NOW - timedelta(hours=2)
    preds = model.booster.inplace_predict(X[800:])
    mixed = capture_lines(v1, X[800:840], preds[:40], [f"m-{i}" for i in range(40)], ts)
    mixed += capture_lines(v2, X[840:860], preds[40:60], [f"n-{i}" for i in range(20)], ts)
    mixed += capture_lines(
        v1, X[860:870], preds[60:70], [f"o-{i}" for i in range(10)], START - timedelta(hours=1)
    )
    mixed += capture_lines(None, X[870:872], preds[70:72], ["x-1", "x-2"], ts)
    put_captures(s3, "m", mixed, ts, "mixed")
    quoted = capture_lines(v1, X[872:880], preds[72:80], [f'q"{i}' for i in range(8)], ts)
    put_captures(s3, "m", quoted, ts, "quoted")
    numeric = [
        orjson.dumps({**orjson.loads(line), "id": 1000 + i})
        for i, line in enumerate(capture_lines(v1, X[880:890], preds[80:90], [""] * 10, ts))
    ]
    put_captures(s3, "m", numeric, ts, "numeric")
    order = ["prediction", "ts", "id", "features", "label", "version"]
    shuffled = [
        orjson.dumps({k: orjson.loads(line)[k] for k in order})
        for line in capture_lines(v2, X[890:], preds[90:], [f"s-{i}" for i in range(10)], ts)
    ]
    assert captures.fast_parse(b"\n".join(shuffled)) is None
    put_captures(s3, "m", shuffled, ts, "shuffled")
    put_captures(s3, "m", [], ts, "empty")
    day = ts.strftime("%Y-%m-%d")
    s3.put_object(Bucket=BUCKET, Key=f"captures/m/dt={day}/broken.jsonl.gz", Body=b"not gzip")
    labels = [(i, int(k % 3 == 0)) for k, i in enumerate(ids1[::2])]
    labels += [('q"1', 1), ('q"2', 0), (1003, 1), (1004, 0), ("m-5", 1), ("s-2", 0)]
    body = b"\n".join(orjson.dumps({"id": i, "label": y}) for i, y in labels)
    s3.put_object(Bucket=BUCKET, Key="labels/m/labels.jsonl", Body=body)


def _run(s3: Any, workers: int, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    fds = len(os.listdir("/proc/self/fd"))
    report = monitoring.run_monitoring(
        BUCKET, "m", START, NOW, s3=s3, now=NOW, write=False, workers=workers, stats=stats
    )
    assert multiprocessing.active_children() == []  # every worker joined: no zombies
    assert len(os.listdir("/proc/self/fd")) == fds  # and every pipe closed
    return report


@pytest.fixture(name="parsed_here")
def parsed_here_fixture(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the files parsed in the calling process (Monitor.add_file)."""
    calls: list[int] = []
    real_add_file = monitoring.Monitor.add_file

    def add_file(self: monitoring.Monitor, raw: bytes) -> None:
        calls.append(len(raw))
        real_add_file(self, raw)

    monkeypatch.setattr(monitoring.Monitor, "add_file", add_file)
    return calls


def test_workers_give_the_in_process_report(s3: Any, parsed_here: list[int]) -> None:
    _window_of_everything(s3)
    alone = _run(s3, workers=0)
    assert alone["files"] == 12
    assert alone["skipped_files"] == 1
    assert alone["rows_outside_window"] == 10
    assert alone["malformed_rows"] == 2
    assert alone["summary"]["performance"]["rows"] == 250 + 6
    assert len(parsed_here) == 12
    parsed_here.clear()
    stats: dict[str, Any] = {}
    assert _run(s3, workers=2, stats=stats) == alone
    assert parsed_here == []  # every file was parsed by a worker
    assert len(stats["worker_own_kb"]) == 2
    assert _run(s3, workers=3) == alone
    assert parsed_here == []


def test_a_worker_that_dies_or_fails_hands_its_files_back(
    s3: Any, monkeypatch: pytest.MonkeyPatch, parsed_here: list[int]
) -> None:
    _window_of_everything(s3)
    alone = _run(s3, workers=0)
    real = parse_pool.fast_split

    def dies_on_quoted(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        if b'q\\"' in raw:
            os._exit(3)  # as if killed (out of memory): no answer at all
        return real(raw, *args, **kwargs)

    parsed_here.clear()
    monkeypatch.setattr(parse_pool, "fast_split", dies_on_quoted)  # workers fork with it
    assert _run(s3, workers=2) == alone
    # that file and every one after it (the pool stops), never one before it
    assert 1 <= len(parsed_here) < 12

    def fails_on_numeric(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        if b'"id":1003' in raw:
            raise MemoryError("no room")
        return real(raw, *args, **kwargs)

    parsed_here.clear()
    monkeypatch.setattr(parse_pool, "fast_split", fails_on_numeric)
    assert _run(s3, workers=2) == alone
    assert len(parsed_here) == 1  # a failure on one file: only that file comes back


def test_no_fork_means_parsing_in_process(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _window_of_everything(s3)
    alone = _run(s3, workers=0)

    class NoFork:
        def Pipe(self, duplex: bool = True) -> Any:  # noqa: N802 -- multiprocessing's name
            raise OSError("no fork here")

    monkeypatch.setattr(parse_pool.multiprocessing, "get_context", lambda method: NoFork())
    assert _run(s3, workers=2) == alone


def test_wire_format_round_trip() -> None:
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    X[1, 2] = np.nan
    P = np.linspace(0, 1, 8, dtype=np.float32).reshape(4, 2)
    split = Split(
        3,
        [
            Group(1, X, P, [b"", b"a", b"b-2", b"c"], ids_are_bytes=True),
            Group(2, X[:2], None, None),
            Group(7, X[2:], P[2:], ['q"1', 5]),
        ],
    )
    header, *parts = parse_pool.encode_split(split)
    back = parse_pool.decode_split(orjson.loads(header), parts)
    assert back.out_of_window == 3
    for a, b in zip(split.groups, back.groups, strict=True):
        assert (a.version, a.ids, a.ids_are_bytes) == (b.version, b.ids, b.ids_are_bytes)
        np.testing.assert_array_equal(a.X, b.X)
        if a.P is None:
            assert b.P is None
        else:
            np.testing.assert_array_equal(a.P, b.P)
    with pytest.raises(ValueError, match="ids for"):
        parse_pool.decode_split(orjson.loads(header), [parts[0], parts[1], b"a\nb", *parts[3:]])


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def configured(raw: str) -> int | None:
        return Settings.from_env(
            {"MODEL_BUCKET": "b", "MONITORING_WORKERS": raw}
        ).monitoring_workers

    assert parse_pool.default_workers(configured("0"), {}) == 0
    assert parse_pool.default_workers(configured("1"), {}) == 0
    assert parse_pool.default_workers(configured(" 3 "), {}) == 3
    lambda_sizes = {"1769": 0, "3008": 2, "10240": 4}  # Lambda: one vCPU per 1769 MB
    for memory, workers in lambda_sizes.items():
        assert (
            parse_pool.default_workers(None, {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": memory}) == workers
        )
    assert parse_pool.default_workers(2, {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769"}) == 2
    cpus = len(os.sched_getaffinity(0))
    assert parse_pool.default_workers(None, {}) == (min(4, cpus) if cpus >= 2 else 0)
    monkeypatch.setattr(parse_pool.sys, "platform", "darwin")
    assert parse_pool.default_workers(None, {}) == 0
    assert parse_pool.default_workers(configured("2"), {}) == 2
    for bad in ("two", "-1", "9", "1.5"):
        with pytest.raises(ConfigurationError, match="MONITORING_WORKERS"):
            configured(bad)
