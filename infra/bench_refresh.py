"""Refresh benchmark: time from S3 event to promoted, next to XGBoost loading the same bytes.

For a 200-tree and a 2000-tree model (real XGBoost models trained here), each repetition uploads
the model to ``incoming/<name>/model.ubj`` of an in-process moto bucket and invokes the refresh
handler (``functions/refresh/app.py``, loaded as Lambda would) with the S3 notification for it;
the clock runs from the call to its return with the version promoted. The baseline is
``xgboost.Booster(model_file=bytes)`` on the same model bytes, in this process. Medians and their
ratio are printed; the machine is shared, so only the ratio is meant to travel.

The event-to-promoted time includes everything the refresh does: the bounded S3 read, the
package checks, the sandboxed load (a child Python that imports XGBoost, loads, re-saves and
smoke-predicts), reference statistics, the registry writes and the pointer compare-and-swap.

Run: ``python -m infra.bench_refresh [--repeats N]`` (``make bench`` runs it as "refresh").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import numpy as np
import xgboost as xgb
from moto import mock_aws

from treeserve.aws import reset_clients, s3_client
from treeserve.model.package import read_upload
from treeserve_cli.invoke import import_handler

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "treeserve-bench-refresh"
TREES = (200, 2000)


@dataclass
class Row:
    trees: int
    model_bytes: int
    refresh_seconds: list[float]
    load_seconds: list[float]
    validate_seconds: list[float]

    @property
    def refresh_median(self) -> float:
        return statistics.median(self.refresh_seconds)

    @property
    def load_median(self) -> float:
        return statistics.median(self.load_seconds)

    @property
    def validate_median(self) -> float:
        return statistics.median(self.validate_seconds)


def _environment() -> None:
    for name, value in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "MODEL_BUCKET": BUCKET,
        "PROMOTION_MODE": "auto",
        "POWERTOOLS_SERVICE_NAME": "treeserve-refresh",
        "POWERTOOLS_METRICS_NAMESPACE": "TreeserveBench",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "LOG_LEVEL": "WARNING",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }.items():
        os.environ[name] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)  # in-process moto must intercept
    os.environ.pop("NOTIFICATION_TOPIC_ARN", None)


def train(trees: int) -> bytes:
    """A real binary model with ``trees`` trees on 20 features, as UBJ."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 20))
    y = X[:, 0] + 0.5 * X[:, 1] - X[:, 2] * X[:, 3] + rng.normal(scale=0.5, size=1000) > 0
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 6, "eta": 0.05, "nthread": 2, "seed": 0},
        xgb.DMatrix(X, label=y.astype(float), feature_names=[f"x{i}" for i in range(20)]),
        num_boost_round=trees,
    )
    return bytes(booster.save_raw("ubj"))


def time_xgboost_load(model: bytes, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        xgb.Booster(params={"nthread": 1}, model_file=bytearray(model))
        times.append(time.perf_counter() - started)
    return times


def time_validation(model: bytes, repeats: int) -> list[float]:
    """read_upload alone: every check plus the sandboxed load (a child process per upload)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read_upload(model, "model.ubj")
        times.append(time.perf_counter() - started)
    return times


def s3_event(key: str, etag: str, size: int) -> dict[str, Any]:
    """The notification S3 sends for one PutObject (key URL-encoded, as S3 does)."""
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": BUCKET, "arn": f"arn:aws:s3:::{BUCKET}"},
                    "object": {"key": quote_plus(key), "size": size, "eTag": etag},
                },
            }
        ]
    }


@dataclass
class _Context:
    function_name: str = "treeserve-refresh-bench"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    memory_limit_in_mb: int = 1024
    aws_request_id: str = "00000000-0000-4000-8000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def time_refresh(
    handler: Callable[[dict[str, Any], Any], Any], s3: Any, model: bytes, name: str
) -> float:
    """One upload of ``model`` under a new model name (a fresh promotion), event to promoted."""
    key = f"incoming/{name}/model.ubj"
    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=model)["ETag"].strip('"')
    event = s3_event(key, etag, len(model))
    # The handler prints its EMF metrics (as in Lambda); keep them out of the benchmark's table.
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        result = handler(event, _Context())
        elapsed = time.perf_counter() - started
    (outcome,) = result["outcomes"]
    if outcome["status"] != "promoted":
        raise RuntimeError(f"expected a promotion, got {outcome}")
    return elapsed


def run(repeats: int) -> list[Row]:
    _environment()

    models = {trees: train(trees) for trees in TREES}
    rows = {trees: Row(trees, len(model), [], [], []) for trees, model in models.items()}
    reset_clients()
    with mock_aws():
        s3 = s3_client()
        s3.create_bucket(Bucket=BUCKET)
        handler = import_handler(ROOT / "functions" / "refresh", "app.handler", fresh=True)
        # Warm-up: the first invocation pays imports and client creation (cold start), which
        # the inference benchmark measures; here we time the steady state.
        time_refresh(handler, s3, models[TREES[0]], "warm-up")
        # Interleaved, so a noisy neighbour slows every column alike rather than one of them.
        for i in range(repeats):
            for trees, model in models.items():
                row = rows[trees]
                row.refresh_seconds.append(time_refresh(handler, s3, model, f"bench-{trees}-{i}"))
                row.load_seconds.extend(time_xgboost_load(model, 3))
                row.validate_seconds.extend(time_validation(model, 1))
    reset_clients()
    return list(rows.values())


def report(rows: list[Row]) -> str:
    lines = [
        "refresh: S3 event -> promoted (handler, in-process moto) vs XGBoost loading the same bytes",
        f"{'trees':>6} {'model':>9} {'event->promoted':>16} {'xgboost load':>13} {'ratio':>6}"
        f" {'of which validation':>20}  runs",
    ]
    for r in rows:
        lines.append(
            f"{r.trees:>6} {r.model_bytes / 1e6:>7.2f}MB {r.refresh_median * 1e3:>14.0f}ms "
            f"{r.load_median * 1e3:>11.1f}ms {r.refresh_median / r.load_median:>5.0f}x"
            f" {r.validate_median * 1e3:>18.0f}ms  {len(r.refresh_seconds)}/{len(r.load_seconds)}"
        )
    lines.append(
        "validation = treeserve.model.package.read_upload alone (checks + the sandboxed load in a "
        "child Python that imports XGBoost); the rest is reference statistics and S3 I/O"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench_refresh", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="refreshes per model (default 5)")
    # `make bench` calls main() with its own argv in sys.argv: read ours only when given.
    args = parser.parse_args([] if argv is None else argv)
    print(report(run(args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
