"""A short, bounded load run (infra/load.py) against the inference app under uvicorn on
127.0.0.1: concurrent clients, zero errors, memory steady. The long run's figures are in
docs/reliability.md (``python -m infra.load --clients 32 --duration 60``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from infra.load import ServerProcess, free_port, percentile, require_loopback, run_load

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_load_tool_only_targets_loopback() -> None:
    for url in (
        "http://127.0.0.1:3000",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.9.9.9",
    ):
        require_loopback(url)
    for url in (
        "http://10.0.0.1:3000",
        "http://example.com",
        "http://192.168.1.2",
        "http://0.0.0.0",
    ):
        with pytest.raises(SystemExit):
            require_loopback(url)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (
        50.0,
        95.0,
        99.0,
    )
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0


def test_short_load_run_has_no_errors_and_steady_memory(reliability_report: Any) -> None:
    with ServerProcess(free_port(), capture_rate=0.5) as server:
        result = asyncio.run(
            run_load(server.url, clients=8, duration=3.0, warmup=1.0, pid=server.pid, rows=4)
        )
    reliability_report("load (short run in make test)", result.summary().splitlines())
    assert result.requests > 50
    assert result.errors == 0, result.error_kinds
    assert result.versions_seen == ["1"]
    assert result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    assert result.rss_after_warmup_mb is not None
    assert result.rss_after_mb is not None
    # Memory steady: what the server holds after warm-up does not grow with the traffic.
    assert result.rss_after_mb - result.rss_after_warmup_mb < 32
