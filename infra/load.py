"""Load test: N concurrent HTTP clients against treeserve's API on loopback, for a bounded time.

    python -m infra.load                      # start a server itself (uvicorn + moto), 8 clients, 10 s
    python -m infra.load --clients 32 --duration 60
    python -m infra.load --url http://127.0.0.1:3000 --pid 12345   # an already running local stack

Each client is a coroutine on one ``httpx.AsyncClient`` that POSTs ``/predict`` (JSON rows of the
model's width, learned from ``GET /model``) in a loop until the time or the request budget runs
out. Reported: requests, errors (any non-2xx, transport error or answer without
``x-model-version``), latency p50/p95/p99, requests/s, and the server's resident memory (RSS,
from /proc) before, after warm-up and at the end, sampled every second. Only loopback targets are
accepted: this tool never sends traffic anywhere else.

With no ``--url`` it starts its own server in a child process: a small real XGBoost model
(30 features, as the demo dataset) registered and promoted in an in-process moto S3, served by
the inference function's own handler behind the local stack's gateway
(``treeserve_cli.local.LambdaGateway``: each request an HTTP API event, as in production) under
uvicorn on 127.0.0.1 (a free port). Capture is on
(``--capture-rate``) so the S3 write path runs under load too.
"""

# The server side (serve) imports treeserve, moto and uvicorn inside the function, so the load
# client stays light and does not share the server's imports.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAX_REQUESTS = 2_000_000  # a hard bound on any run, whatever the duration


@dataclass
class LoadResult:
    """What one load run measured."""

    url: str
    clients: int
    duration_s: float
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    rows_per_request: int = 1
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    requests_per_s: float = 0.0
    rss_before_mb: float | None = None
    rss_after_warmup_mb: float | None = None
    rss_after_mb: float | None = None
    rss_max_mb: float | None = None
    rss_samples_mb: list[float] = field(default_factory=list)
    versions_seen: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"target        {self.url}",
            f"clients       {self.clients} for {self.duration_s:.1f} s, "
            f"{self.rows_per_request} row(s) per request",
            f"requests      {self.requests} ({self.requests_per_s:.1f}/s)",
            f"errors        {self.errors} {self.error_kinds or ''}".rstrip(),
            f"latency ms    p50 {self.p50_ms:.2f}  p95 {self.p95_ms:.2f}  "
            f"p99 {self.p99_ms:.2f}  max {self.max_ms:.2f}",
            f"model version {', '.join(self.versions_seen) or '-'}",
        ]
        if self.rss_before_mb is not None:
            lines.append(
                f"server RSS MB before {self.rss_before_mb:.1f}  after warm-up "
                f"{_fmt(self.rss_after_warmup_mb)}  after {_fmt(self.rss_after_mb)}  "
                f"max {_fmt(self.rss_max_mb)}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc), or None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def require_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing to load {url}: only loopback targets (127.0.0.0/8, ::1) allowed")


def make_bodies(num_features: int, rows: int, count: int = 64, seed: int = 0) -> list[bytes]:
    """Pre-serialised JSON request bodies, so the client spends its CPU on requests."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    bodies = []
    for _ in range(count):
        instances = [[rng.gauss(0.0, 1.0) for _ in range(num_features)] for _ in range(rows)]
        bodies.append(json.dumps({"instances": instances}).encode())
    return bodies


@dataclass
class _Tally:
    """What the clients of one phase share: the request budget and what they saw."""

    budget: int
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    versions: set[str] = field(default_factory=set)


async def _client_loop(
    client: httpx.AsyncClient, bodies: list[bytes], deadline: float, tally: _Tally, offset: int
) -> None:
    i = offset
    latencies, errors, versions = tally.latencies, tally.errors, tally.versions
    headers = {"content-type": "application/json"}
    while time.perf_counter() < deadline and tally.budget > 0:
        tally.budget -= 1
        body = bodies[i % len(bodies)]
        i += 1
        started = time.perf_counter()
        try:
            response = await client.post("/predict", content=body, headers=headers)
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        latencies.append(time.perf_counter() - started)
        version = response.headers.get("x-model-version")
        if response.status_code >= 300:
            key = f"http_{response.status_code}"
            errors[key] = errors.get(key, 0) + 1
        elif not version:
            errors["no_model_version"] = errors.get("no_model_version", 0) + 1
        else:
            versions.add(version)


async def _sample_rss(pid: int | None, samples: list[float], stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        value = rss_mb(pid)
        if value is not None:
            samples.append(value)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def run_load(
    url: str,
    *,
    clients: int = 8,
    duration: float = 10.0,
    rows: int = 1,
    warmup: float = 1.0,
    pid: int | None = None,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    timeout: float = 10.0,
) -> LoadResult:
    """Run the load and return what it measured (see the module docstring)."""
    require_loopback(url)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        info = await client.get("/model")
        info.raise_for_status()
        num_features = int(info.json()["num_features"])
        bodies = make_bodies(num_features, rows)
        result = LoadResult(url=url, clients=clients, duration_s=duration, rows_per_request=rows)
        result.rss_before_mb = rss_mb(pid) if pid else None

        # Warm-up: same traffic, not counted, so the figures describe a warm server.
        if warmup > 0:
            until = time.perf_counter() + warmup
            warm = _Tally(max_requests)
            await asyncio.gather(
                *(_client_loop(client, bodies, until, warm, n) for n in range(clients))
            )
        result.rss_after_warmup_mb = rss_mb(pid) if pid else None

        tally = _Tally(max_requests)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, result.rss_samples_mb, stop))
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(
            *(_client_loop(client, bodies, deadline, tally, n) for n in range(clients))
        )
        elapsed = time.perf_counter() - started
        stop.set()
        await sampler

    latencies, errors = sorted(tally.latencies), tally.errors
    result.duration_s = elapsed
    result.requests = len(latencies) + sum(
        v for k, v in errors.items() if not k.startswith(("http_", "no_model"))
    )
    result.errors = sum(errors.values())
    result.error_kinds = errors
    result.p50_ms = percentile(latencies, 50) * 1000
    result.p95_ms = percentile(latencies, 95) * 1000
    result.p99_ms = percentile(latencies, 99) * 1000
    result.max_ms = (latencies[-1] * 1000) if latencies else 0.0
    result.requests_per_s = result.requests / elapsed if elapsed > 0 else 0.0
    result.versions_seen = sorted(tally.versions)
    if pid:
        result.rss_after_mb = rss_mb(pid)
        samples = [*result.rss_samples_mb]
        if result.rss_after_mb is not None:
            samples.append(result.rss_after_mb)
        result.rss_max_mb = max(samples) if samples else None
    return result


# --- a self-started server -------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m infra.load --serve-only PORT`` in a child process: uvicorn on 127.0.0.1."""

    def __init__(self, port: int, *, capture_rate: float = 0.1) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("AWS_ENDPOINT_URL", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infra.load",
                "--serve-only",
                str(port),
                "--capture-rate",
                str(capture_rate),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"load server exited with {self.proc.returncode}:\n{err}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"load server not ready on {self.url} after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(port: int, capture_rate: float) -> None:
    """The server side: the demo model (30 features) promoted in an in-process moto S3, served
    by the inference handler behind the local stack's gateway on 127.0.0.1:port until
    SIGINT/SIGTERM."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "POWERTOOLS_SERVICE_NAME": "treeserve-load",
            "POWERTOOLS_METRICS_NAMESPACE": "TreeserveLoad",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
    )
    import tempfile

    from moto import mock_aws

    from treeserve.aws import reset_clients, s3_client
    from treeserve.model.package import read_upload
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore
    from treeserve_cli.demo import write_demo_package
    from treeserve_cli.invoke import LambdaContext, import_handler
    from treeserve_cli.local import LambdaGateway, make_server

    bucket, name = "treeserve-load", "default"
    os.environ.update(
        {"MODEL_BUCKET": bucket, "MODEL_NAME": name, "CAPTURE_SAMPLE_RATE": str(capture_rate)}
    )
    reset_clients()
    with mock_aws(), tempfile.TemporaryDirectory() as tmp:
        s3_client().create_bucket(Bucket=bucket)
        package = write_demo_package(Path(tmp)).package
        upload = read_upload(package.read_bytes(), package.name)
        registry = ModelRegistry(S3RegistryStore(bucket), name)
        registry.promote(registry.register(upload.model_ubj, upload.to_manifest(name)))
        handler = import_handler(ROOT / "functions" / "inference", "app.handler")
        gateway = LambdaGateway(
            handler,
            lambda: LambdaContext(
                function_name="treeserve-load", memory_limit_in_mb=1769, timeout_seconds=29
            ),
        )
        server = make_server(gateway, port, log_level="warning", access_log=False)
        server.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.load",
        description="Load treeserve's POST /predict with concurrent clients on loopback and "
        "report errors, latency percentiles, requests/s and the server's memory.",
    )
    parser.add_argument(
        "--url", help="an already running API on loopback (default: start one in a child process)"
    )
    parser.add_argument("--pid", type=int, help="server process id, for RSS (with --url)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds (default 2)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help=f"hard bound on requests (default {DEFAULT_MAX_REQUESTS})",
    )
    parser.add_argument(
        "--capture-rate",
        type=float,
        default=0.1,
        help="CAPTURE_SAMPLE_RATE of the self-started server (default 0.1)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--serve-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_only is not None:
        serve(args.serve_only, args.capture_rate)
        return 0
    if args.clients < 1 or args.duration <= 0 or args.rows < 1:
        parser.error("--clients and --rows must be >= 1 and --duration > 0")
    if args.duration > 3600:
        parser.error("--duration is bounded to one hour")

    server: ServerProcess | None = None
    url, pid = args.url, args.pid
    if url is None:
        server = ServerProcess(free_port(), capture_rate=args.capture_rate)
        server.wait_ready()
        url, pid = server.url, server.pid
    try:
        result = asyncio.run(
            run_load(
                url,
                clients=args.clients,
                duration=args.duration,
                rows=args.rows,
                warmup=args.warmup,
                pid=pid,
                max_requests=args.max_requests,
            )
        )
    finally:
        if server is not None:
            server.stop()
    if args.json:
        data: dict[str, Any] = asdict(result)
        print(json.dumps(data, indent=2))
    else:
        print(result.summary())
    return 0 if result.errors == 0 and result.requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
