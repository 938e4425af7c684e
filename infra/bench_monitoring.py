"""Monitoring throughput: a full report over 1,000,000 captured rows x 30 features.

Setup (not timed): a moto server on loopback (the same S3 API the function talks to, over
HTTP), a real XGBoost model with 30 features registered with its reference statistics, and
1,000,000 capture rows written by the inference function's encoder
(:func:`treeserve.captures.encode_capture`) as Parquet files of ``ROWS_PER_FILE`` rows under
``captures/<model>/dt=<today>/``, plus labels for a tenth of the rows. To keep setup short,
100,000 distinct rows are each captured 10 times under their own ids (generated as the inference
function generates them when a request sends none: :func:`row_id`); the run reads, counts and
joins all 1,000,000 rows all the same. Feature values carry 6 significant digits, as tabular
data sent by clients usually does (captures keep the client's digits). ``TREESERVE_BENCH_ROWS``
sets a smaller size for a quick look.

Timed, each in a fresh child process (wall, CPU, peak RSS from ``VmHWM``), twice: with S3 served
by the moto server over HTTP, and by moto inside the child (no HTTP; the bucket's objects then
live in the child, so its peak includes them):

- ``treeserve``: :func:`treeserve.monitoring.pipeline.run_monitoring` over the window, from listing the
  captures to writing the report (the function's code path, one process, no workers), after
  what the function's init does once per execution environment (the imports and the S3 client,
  shown apart);
- the same listing and downloads alone (what S3 costs by itself);
- ``numpy``: numpy alone reading the same numbers: the same features and predictions as
  gzipped CSV text of the same digits, fetched from the same S3, gunzipped and parsed with
  ``np.loadtxt`` (the baseline a hand-written job would start from), and, as the floor, the
  same matrix as raw float32 bytes through ``np.frombuffer``.

Goal: the treeserve run within 1.5 s and 400 MB, without worker processes (judged in-process and
over HTTP; the peak over HTTP, since in-process it also holds moto's copies of the objects).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import numpy as np
import orjson
import xgboost as xgb
from moto.server import ThreadedMotoServer

from treeserve import captures
from treeserve.model.manifest import ModelManifest
from treeserve.model.reference import compute_reference
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore

ROWS = int(os.environ.get("TREESERVE_BENCH_ROWS", "1000000"))
FEATURES = 30
ROWS_PER_FILE = 10_000
REQUEST_ROWS = 1000  # rows per request: ten requests a capture file
DISTINCT = min(100_000, ROWS)
COPIES = ROWS // DISTINCT
MODEL = "bench"
BUCKET = "treeserve-bench"
SEED = 7


# ru_maxrss survives fork+exec on Linux (a child would report the parent's peak); VmHWM is per
# address space, so it is the child's own peak resident set.
PRELUDE = """
import os as _os
def cpu_s():
    t = _os.times()
    return t.user + t.system + t.children_user + t.children_system
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
rss_before = status_mb("VmRSS")
"""

# In-process moto: copy the bucket out of the server, then serve it from moto inside this
# process (no HTTP). The objects then live in this process: the run's own memory is its peak
# minus the resident set before it started.
IN_PROCESS = f"""
import boto3, gc
src = boto3.client("s3", endpoint_url=_os.environ.pop("AWS_ENDPOINT_URL"))
objects = {{}}
for page in src.get_paginator("list_objects_v2").paginate(Bucket={BUCKET!r}):
    for o in page.get("Contents", []):
        objects[o["Key"]] = src.get_object(Bucket={BUCKET!r}, Key=o["Key"])["Body"].read()
from moto import mock_aws
mock = mock_aws()
mock.start()
from treeserve.aws import reset_clients, s3_client
reset_clients()
s3_client().create_bucket(Bucket={BUCKET!r})
for key in list(objects):
    s3_client().put_object(Bucket={BUCKET!r}, Key=key, Body=objects.pop(key))
del src, objects
gc.collect()
rss_before = status_mb("VmRSS")
"""

TREESERVE_RUN = f"""
import json, time
from datetime import datetime, timedelta, UTC
t = time.perf_counter()
# What the function's init does once per execution environment (functions/monitoring/app.py),
# shown apart: the imports and the S3 client.
from treeserve.aws import s3_client
from treeserve.monitoring import challenger
from treeserve.monitoring.pipeline import run_monitoring
s3_client()
init = time.perf_counter() - t
end = datetime.now(UTC) + timedelta(minutes=1)
t, c = time.perf_counter(), cpu_s()
report = run_monitoring({BUCKET!r}, {MODEL!r}, end - timedelta(hours=24), end)
wall, cpu = time.perf_counter() - t, cpu_s() - c
print(json.dumps({{"wall": wall, "cpu": cpu, "init": init, "rows": report["rows"],
    "files": report["files"], "drifted": report["summary"]["drifted_features"],
    "performance": report["summary"]["performance"], "key": report.get("report_key"),
    "peak_mb": status_mb("VmHWM"), "before_mb": rss_before}}))
"""

# The same listing, downloads and inflation as run_monitoring, without parsing: what S3 (here
# moto) and gzip cost on their own.
FETCH_RUN = f"""
import json, time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, UTC
from treeserve.monitoring import pipeline as monitoring
from treeserve.aws import s3_client
s3 = s3_client()
end = datetime.now(UTC) + timedelta(minutes=1)
t, c = time.perf_counter(), cpu_s()
files = monitoring._files(s3, {BUCKET!r}, {MODEL!r}, end - timedelta(hours=24), end)
with ThreadPoolExecutor(monitoring.FETCH_THREADS) as pool:
    size = sum(len(b) for b in pool.map(
        lambda f: monitoring._fetch(s3, {BUCKET!r}, f[0], monitoring.MAX_CAPTURE_FILE_BYTES),
        files))
wall, cpu = time.perf_counter() - t, cpu_s() - c
print(json.dumps({{"wall": wall, "cpu": cpu, "bytes": size,
    "peak_mb": status_mb("VmHWM"), "before_mb": rss_before}}))
"""

# The fan-out's pieces (treeserve.monitoring.fanout): one worker's partial state over every file
# of the window (its time and the partial's bytes), then the merge of MERGE_PARTIALS such
# partials (read, merged, report built): what a 50M-row window costs spread over workers.
MERGE_PARTIALS = 20
FANOUT_RUN = f"""
import json, time
from datetime import datetime, timedelta, UTC
from treeserve.aws import s3_client
from treeserve.monitoring import fanout, pipeline
from treeserve.monitoring.partial import PartialState
s3 = s3_client()
end = datetime.now(UTC) + timedelta(minutes=1)
start = end - timedelta(hours=24)
files = pipeline.window_files(s3, {BUCKET!r}, {MODEL!r}, start, end)
t, c = time.perf_counter(), cpu_s()
out = fanout.run_partial({BUCKET!r}, {MODEL!r}, start, end, files, run="bench")
worker, worker_cpu = time.perf_counter() - t, cpu_s() - c
worker_peak = status_mb("VmHWM")
keys = [out["partial_key"]] * {MERGE_PARTIALS}
t = time.perf_counter()
merged = fanout.run_merge({BUCKET!r}, {MODEL!r}, start, end, keys)
report = pipeline.finish({BUCKET!r}, merged.monitor, write=False)
merge = time.perf_counter() - t
print(json.dumps({{"worker": worker, "worker_cpu": worker_cpu, "rows": out["rows"],
    "files": out["files"], "partial_bytes": out["bytes"], "merge": merge,
    "merged_rows": report["rows"], "worker_peak_mb": worker_peak,
    "peak_mb": status_mb("VmHWM"), "before_mb": rss_before}}))
"""

NUMPY_RUN = f"""
import io, json, time, zlib
import numpy as np
from treeserve.aws import s3_client
s3 = s3_client()
t, c = time.perf_counter(), cpu_s()
body = s3.get_object(Bucket={BUCKET!r}, Key="baseline/data.csv.gz")["Body"].read()
text = zlib.decompress(body, 47)
M = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float32)
wall, cpu = time.perf_counter() - t, cpu_s() - c
t = time.perf_counter()
raw = s3.get_object(Bucket={BUCKET!r}, Key="baseline/data.f32")["Body"].read()
B = np.frombuffer(raw, dtype=np.float32).reshape(M.shape)
frombuffer = time.perf_counter() - t
print(json.dumps({{"wall": wall, "cpu": cpu, "frombuffer": frombuffer, "shape": list(M.shape),
    "same": bool(np.array_equal(M, B, equal_nan=True)),
    "peak_mb": status_mb("VmHWM"), "before_mb": rss_before}}))
"""


def _child(code: str, endpoint: str, *, in_process: bool) -> dict[str, Any]:
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint)
    program = PRELUDE + (IN_PROCESS if in_process else "") + code
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def register_model(s3: Any, bucket: str, model: str, rng: np.random.Generator) -> tuple[Any, int]:
    """A real 30-feature binary model registered with its reference statistics."""
    names = [f"f{i}" for i in range(FEATURES)]
    Xtr = rng.normal(size=(5000, FEATURES))
    ytr = (Xtr[:, 0] + Xtr[:, 1] > 0).astype(float)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(Xtr, label=ytr, feature_names=names),
        num_boost_round=20,
    )
    ubj = bytes(booster.save_raw("ubj"))
    manifest = ModelManifest(
        name=model,
        sha256=hashlib.sha256(ubj).hexdigest(),
        model_size=len(ubj),
        xgboost_version=xgb.__version__,
        objective="binary:logistic",
        task="binary",
        num_features=FEATURES,
        feature_names=names,
        feature_types=["float"] * FEATURES,
        reference=compute_reference(Xtr, names, ["float"] * FEATURES, booster.inplace_predict(Xtr)),
        reference_source="reference.csv",
    )
    return booster, ModelRegistry(S3RegistryStore(bucket, s3=s3), model).register(ubj, manifest)


def row_id(copy: int, i: int) -> str:
    """Row ``i``'s id in copy ``copy``, as the inference function generates ids when a request
    sends none: ``<request id>-<row>``, here for requests of ``REQUEST_ROWS`` rows (so a file's
    ids are 34 to 36 characters long)."""
    request, row = divmod(i, REQUEST_ROWS)
    return f"{copy:016x}{request:016x}-{row}"


def _setup(s3: Any) -> tuple[int, int]:
    """Register a model and write the captures; returns (capture bytes, csv bytes)."""
    rng = np.random.default_rng(SEED)
    booster, version = register_model(s3, BUCKET, MODEL, rng)

    # DISTINCT rows, each captured COPIES times under its own ids (so setup stays quick; the
    # monitoring run reads and counts every one of the ROWS rows all the same).
    X = rng.normal(size=(DISTINCT, FEATURES)).astype(np.float64)
    X[:, 3] += 0.5  # one drifted feature, so the report has something to say
    X[rng.random((DISTINCT, FEATURES)) < 0.01] = np.nan
    X = np.round(X, 5)  # ~6 significant digits, as clients send
    X32 = X.astype(np.float32)
    P = booster.inplace_predict(X32).astype(np.float32)
    y = (X[:, 0] + X[:, 1] + rng.normal(scale=0.5, size=DISTINCT) > 0).astype(int)
    now = datetime.now(UTC)
    day = now.strftime("%Y-%m-%d")
    ts = round((now - timedelta(minutes=5)).timestamp() * 1000)
    capture_bytes = 0
    n = 0
    for copy in range(COPIES):
        for start in range(0, DISTINCT, ROWS_PER_FILE):
            part = slice(start, min(start + ROWS_PER_FILE, DISTINCT))
            count = part.stop - part.start
            body = captures.encode_capture(
                captures.CaptureRows(
                    model=MODEL,
                    ids=[row_id(copy, i) for i in range(part.start, part.stop)],
                    ts_ms=np.full(count, ts, np.int64),
                    versions=np.full(count, version, np.int64),
                    inputs=X32[part],
                    outputs=P[part].reshape(-1, 1),
                    labels=["1" if p >= 0.5 else "0" for p in P[part].tolist()],
                )
            )
            capture_bytes += len(body)
            key = f"captures/{MODEL}/dt={day}/{n:05d}.parquet"
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
            n += 1
    labels = "id,label\n" + "".join(
        f"{row_id(c, i)},{y[i]}\n" for c in range(COPIES) for i in range(0, DISTINCT, 10)
    )
    s3.put_object(Bucket=BUCKET, Key=f"labels/{MODEL}/labels.csv", Body=labels.encode())
    # The baseline's data: the same numbers (same digits) as CSV text, and as raw float32.
    M = np.tile(np.column_stack([X32, P]).astype(np.float32), (COPIES, 1))
    # orjson writes the same digits; rows become CSV lines.
    text = orjson.dumps(np.column_stack([X, P.astype(np.float64)]).tolist())[2:-2]
    text = text.replace(b"],[", b"\n").replace(b"null", b"nan") + b"\n"
    csv_gz = gzip.compress(text * COPIES, 5)
    s3.put_object(Bucket=BUCKET, Key="baseline/data.csv.gz", Body=csv_gz)
    s3.put_object(Bucket=BUCKET, Key="baseline/data.f32", Body=M.tobytes())
    return capture_bytes, len(csv_gz)


def _fanout_figures(fan: dict[str, Any], capture_bytes: int) -> None:
    """One worker's measured cost, scaled to a 50M-row window over the MonitoringMap."""
    from treeserve.monitoring.fanout import WORKER_BYTES  # noqa: PLC0415

    rows = fan["rows"]
    bytes_per_row = capture_bytes / max(rows, 1)
    worker_rows = WORKER_BYTES / bytes_per_row
    per_row_s = fan["worker"] / max(rows, 1)
    window = 50_000_000
    workers = -(-window // int(worker_rows))
    worker_s = worker_rows * per_row_s
    merge_per_partial = fan["merge"] / MERGE_PARTIALS
    print(
        f"fan-out worker (over HTTP): {rows:,} rows in {fan['files']} files, {fan['worker']:.2f} s "
        f"wall ({fan['worker_cpu']:.2f} s CPU), peak {fan['worker_peak_mb']:.0f} MB; partial "
        f"state {fan['partial_bytes'] / 1e3:.0f} KB; merge of {MERGE_PARTIALS} partials + report "
        f"{fan['merge']:.2f} s ({fan['merged_rows']:,} rows)"
    )
    print(
        f"fan-out, 50M rows: {bytes_per_row:.0f} B/row -> {worker_rows / 1e6:.1f}M rows per worker "
        f"({WORKER_BYTES >> 20} MiB), {workers} workers (MaxConcurrency 40: one wave), "
        f"{worker_s:.0f} s per worker (timeout 600 s), merge {workers * merge_per_partial:.1f} s; "
        f"worker results ~0.2 KB (limit 256 KB), partials {fan['partial_bytes'] / 1e3:.0f} KB "
        "each in S3"
    )


def main() -> dict[str, str]:
    """Run the benchmark and print its figures; returns the goal line for `make bench`."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "treeserve-monitoring")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        t = time.perf_counter()
        capture_bytes, _ = _setup(s3)
        print(
            f"setup: {ROWS:,} rows x {FEATURES} features in {ROWS // ROWS_PER_FILE} files, "
            f"{capture_bytes / 1e6:.0f} MB of Parquet captures ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        fan = _child(FANOUT_RUN, endpoint, in_process=False)
        runs = {
            where: (
                _child(TREESERVE_RUN, endpoint, in_process=inproc),
                _child(FETCH_RUN, endpoint, in_process=inproc),
                _child(NUMPY_RUN, endpoint, in_process=inproc),
            )
            for where, inproc in (("server", False), ("in-process", True))
        }
    finally:
        server.stop()
    print(f"{'run (S3 = moto)':<46}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}{'own MB':>8}")
    for where, (ts, fetch, base) in runs.items():
        for label, r in (
            ("treeserve run_monitoring", ts),
            ("  same list + GETs only", fetch),
            ("numpy gunzip CSV + np.loadtxt", base),
        ):
            own = r["peak_mb"] - r["before_mb"]
            print(
                f"{label + ' (' + where + ')':<46}{r['wall']:>8.2f}{r['cpu']:>8.2f}"
                f"{r['peak_mb']:>9.0f}{own:>8.0f}"
            )
    print(
        "treeserve's init (imports, S3 client; Lambda's init phase, once per environment, "
        f"not in the run's time): {runs['server'][0]['init']:.2f} s"
    )
    ts, fetch, base = runs["in-process"]
    print(f"{'numpy np.frombuffer raw float32 (in-process)':<46}{base['frombuffer']:>8.2f}")
    served = runs["server"][0]
    print(
        f"rows {ts['rows']:,} in {ts['files']} files, {ts['rows'] / ts['wall']:,.0f} rows/s "
        f"in-process; treeserve / np.loadtxt wall {ts['wall'] / base['wall']:.2f}, CPU "
        f"{ts['cpu'] / base['cpu']:.2f}; drifted {ts['drifted']}; performance "
        f"{ts['performance']}"
    )
    # CPU counts the fetch threads too. "server" pays moto's HTTP server (in the parent
    # process) on every byte; "own MB" is the peak minus the resident set before the run
    # (in-process, the bucket's objects live in the child).
    _fanout_figures(fan, capture_bytes)
    print(f"load average after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    # S3 itself is remote; here it is moto, served from this machine's 2 cores either way: by
    # a server in the parent process (HTTP) or inside the run's own process. Both are shown.
    met = {True: "met", False: "NOT met"}
    line = (
        f"in-process {ts['wall']:.2f} s ({met[ts['wall'] <= 1.5]}), over HTTP "
        f"{served['wall']:.2f} s ({met[served['wall'] <= 1.5]}); peak {served['peak_mb']:.0f} MB "
        f"over HTTP ({met[served['peak_mb'] <= 400]}); one process (goal <= 1.5 s, <= 400 MB)"
    )
    print(f"goal: {line}")
    return {f"(c) monitoring {ROWS:,} rows x {FEATURES}": line}


if __name__ == "__main__":
    main()
