"""What capture costs at both ends: the request that captures, and the monitoring run that reads.

(a) The 1000-row request (200 trees of depth 6, 1000 rows x 30 features, JSON body) through the
whole inference handler with every row captured (``CAPTURE_SAMPLE_RATE=1``, the template's
``CAPTURE_MAX_ROWS``), against the same request through a second copy of the function with
capture off, in alternating blocks. S3 is a moto server in its own process, as S3 is remote
from a Lambda function (moto inside this process would charge S3's own work, hashing and
storing each object, to the function). The captured copy hands a Parquet object to its writer
thread every ``CAPTURE_MAX_ROWS`` rows; encoding and the PUT then compete with the following
requests for this process's CPU and GIL, so the mean over many requests spanning many writes is
the honest figure (their cost included); the median is shown beside it.

(b) One monitoring run (:func:`treeserve.monitoring.pipeline.run_monitoring`, in this process, on
moto in-process: list, GET, read, drift of 30 features and the prediction, report written) over
100,000 captured rows in 10 files written by the capture encoder, against numpy alone computing,
over the same rows already in memory as a float32 matrix, a histogram and a sort of each of the
30 features. Medians of alternating runs.

Goals: (a) <= 1.15x (mean), (b) <= 3x.
"""

# ruff: noqa: PLC0415 -- heavy modules are imported where used (`make bench` imports every module)

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson

from infra import bench_inference as bi

TREES, DEPTH = 200, 6
REQUESTS = 400  # per side: 400,000 rows captured, dozens of writes
BLOCK = 1  # one request each in turn: noise from other processes hits both
MONITOR_ROWS = 100_000
MONITOR_FILES = 10
GOALS = {"capture": 1.15, "monitoring": 3.0}


def _template_max_rows() -> str:
    text = (bi.ROOT / "template.yaml").read_text()
    for line in text.splitlines():
        if line.strip().startswith("CAPTURE_MAX_ROWS:"):
            return line.split(":", 1)[1].strip().strip("\"'")
    raise RuntimeError("template.yaml sets no CAPTURE_MAX_ROWS")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto server in a child process; yields its endpoint."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_request() -> dict[str, float]:
    from treeserve.aws import reset_clients, s3_client
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    booster, rows = bi.train_model(TREES, DEPTH)
    raw = bytes(booster.save_raw("ubj"))
    max_rows = _template_max_rows()
    with (
        moto_server() as endpoint,
        bi.environment({**bi._ENV, "MODEL_NAME": "bench", "AWS_ENDPOINT_URL": endpoint}),
    ):
        reset_clients()
        s3_client().create_bucket(Bucket=bi.BUCKET)
        registry = ModelRegistry(S3RegistryStore(bi.BUCKET), "bench")
        bi.publish(registry, raw)
        plain = bi.load_function()
        with bi.environment({"CAPTURE_SAMPLE_RATE": "1", "CAPTURE_MAX_ROWS": max_rows}):
            captured = bi.load_function()
        logging.getLogger("treeserve.serving.capture").setLevel(logging.WARNING)
        context = bi.Context()
        event = bi.http_event(orjson.dumps({"instances": rows.tolist()}))
        times: dict[str, list[float]] = {"plain": [], "captured": []}
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            for _ in range(20):  # warm-up
                plain.handler(event, context)
                captured.handler(event, context)
            captured.capture.flush()
            flushes = captured.capture.flushes
            before = s3_client().list_objects_v2(Bucket=bi.BUCKET, Prefix="captures/bench/")
            skip = {o["Key"] for o in before.get("Contents", [])}
            for _ in range(REQUESTS // BLOCK):
                for name, module in (("plain", plain), ("captured", captured)):
                    for _ in range(BLOCK):
                        t = time.perf_counter()
                        response = module.handler(event, context)
                        times[name].append(time.perf_counter() - t)
                        if response["statusCode"] != 200:
                            raise RuntimeError(response["body"][:300])
                sink.seek(0)
                sink.truncate()
        captured.capture.wait()
        writes = captured.capture.flushes - flushes
        listed = s3_client().list_objects_v2(Bucket=bi.BUCKET, Prefix="captures/bench/")
        new = [o for o in listed.get("Contents", []) if o["Key"] not in skip]
        size = sum(o["Size"] for o in new)
        reset_clients()
    mean, med = statistics.fmean, statistics.median
    return {
        "plain_mean": mean(times["plain"]),
        "captured_mean": mean(times["captured"]),
        "plain_median": med(times["plain"]),
        "captured_median": med(times["captured"]),
        "writes": writes,
        "max_rows": int(max_rows),
        "bytes_per_row": size / max(1, len(new) * int(max_rows)),
    }


def bench_monitoring_run(rounds: int = 5) -> dict[str, float]:
    from moto import mock_aws

    from infra.bench_monitoring import register_model
    from treeserve import captures
    from treeserve.aws import reset_clients, s3_client
    from treeserve.monitoring.pipeline import run_monitoring

    rng = np.random.default_rng(11)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    with bi.environment({k: v for k, v in bi._ENV.items() if k.startswith("AWS")}), mock_aws():
        reset_clients()
        s3 = s3_client()
        s3.create_bucket(Bucket=bi.BUCKET)
        booster, version = register_model(s3, bi.BUCKET, "mon", rng)
        X = np.round(rng.normal(size=(MONITOR_ROWS, bi.FEATURES)), 5).astype(np.float32)
        X[:, 3] += 0.5
        X[rng.random(X.shape) < 0.01] = np.nan
        P = booster.inplace_predict(X).astype(np.float32).reshape(-1, 1)
        now = datetime.now(UTC)
        ts = round((now - timedelta(minutes=5)).timestamp() * 1000)
        per = MONITOR_ROWS // MONITOR_FILES
        for f in range(MONITOR_FILES):
            part = slice(f * per, (f + 1) * per)
            body = captures.encode_capture(
                captures.CaptureRows(
                    model="mon",
                    ids=[f"r-{i}" for i in range(part.start, part.stop)],
                    ts_ms=np.full(per, ts, np.int64),
                    versions=np.full(per, version, np.int64),
                    inputs=X[part],
                    outputs=P[part],
                )
            )
            s3.put_object(
                Bucket=bi.BUCKET, Key=f"captures/mon/dt={now:%Y-%m-%d}/{f:05d}.parquet", Body=body
            )
        end = now + timedelta(minutes=1)

        def monitor() -> Any:
            return run_monitoring(bi.BUCKET, "mon", end - timedelta(hours=24), end, s3=s3)

        def numpy_alone() -> Any:
            out: list[Any] = []
            for j in range(X.shape[1]):
                column = X[:, j]
                out.append(np.histogram(column[~np.isnan(column)], bins=10))
                out.append(np.sort(column))
            return out

        report = monitor()
        if report["rows"] != MONITOR_ROWS:
            raise RuntimeError(f"the run read {report['rows']} rows, not {MONITOR_ROWS}")
        ours: list[float] = []
        base: list[float] = []
        for _ in range(rounds):
            for fn, out in ((monitor, ours), (numpy_alone, base)):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        reset_clients()
    return {"monitor": statistics.median(ours), "numpy": statistics.median(base)}


def main() -> dict[str, str]:
    """Run (a) and (b), print them; returns the goal lines for `make bench`'s summary."""
    r = bench_request()
    ratio_mean = r["captured_mean"] / r["plain_mean"]
    ratio_median = r["captured_median"] / r["plain_median"]
    print(
        f"(a) 1000-row request, {TREES} trees depth {DEPTH}, every row captured "
        f"(CAPTURE_MAX_ROWS={r['max_rows']}: {r['writes']} writes in {REQUESTS} requests, "
        f"{r['bytes_per_row']:.0f} bytes a row)"
    )
    print(f"{'':4}{'':<34}{'captured ms':>12}{'uncaptured ms':>15}{'ratio':>8}")
    print(
        f"{'':4}{'mean (the writes amortized)':<34}{r['captured_mean'] * 1e3:>12.2f}"
        f"{r['plain_mean'] * 1e3:>15.2f}{ratio_mean:>8.2f}"
    )
    print(
        f"{'':4}{'median (a request that writes nothing)':<34}"
        f"{r['captured_median'] * 1e3:>12.2f}{r['plain_median'] * 1e3:>15.2f}{ratio_median:>8.2f}"
    )
    m = bench_monitoring_run()
    ratio_mon = m["monitor"] / m["numpy"]
    print(
        f"(b) monitoring run over {MONITOR_ROWS:,} captured rows (one process, moto in-process): "
        f"{m['monitor'] * 1e3:.0f} ms; numpy alone, 30 histograms + sorts in memory: "
        f"{m['numpy'] * 1e3:.0f} ms; ratio {ratio_mon:.2f}"
    )
    ok_a, ok_b = ratio_mean <= GOALS["capture"], ratio_mon <= GOALS["monitoring"]
    return {
        "(a) captured / uncaptured 1000-row request (mean)": (
            f"{ratio_mean:.2f}x (goal <= {GOALS['capture']}x: {'met' if ok_a else 'NOT met'})"
        ),
        "(b) monitoring 100k rows / numpy histograms + sorts": (
            f"{ratio_mon:.2f}x (goal <= {GOALS['monitoring']}x: {'met' if ok_b else 'NOT met'})"
        ),
    }


if __name__ == "__main__":
    main()
