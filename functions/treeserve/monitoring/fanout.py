"""Monitoring of a window too large for one invocation, fanned out over Step Functions.

Three steps, each a monitoring-function invocation; the MonitoringMap state machine
(template.yaml) joins them:

1. **plan** (:func:`start_fanout`, from a scheduled or direct run whose window holds more than
   ``MONITORING_FANOUT_BYTES`` of captures): write the window's capture files as a JSON
   manifest ``monitoring/<model>/<run>/files.json`` (``[{"key", "size"}, ...]``, key order),
   start an execution with ``files_per_batch`` chosen so one worker reads about
   :data:`WORKER_BYTES`.
2. **partial** (:func:`run_partial`): the Distributed Map reads the manifest (``ItemReader``),
   groups files (``ItemBatcher``: ``{"Items": [...], "BatchInput": {...}}`` per worker), and each
   worker counts its files (:func:`treeserve.monitoring.pipeline.monitor_files`), writes the
   partial state (:mod:`treeserve.monitoring.partial`) to
   ``monitoring/<model>/<run>/partials/<digest of its keys>.npz`` (a retried worker overwrites
   its own) and returns the key: results stay far below Step Functions' 256 KB.
3. **merge** (:func:`run_merge`): ``ResultWriter`` wrote the workers' results under
   ``monitoring/<model>/<run>/results/``; the merge reads its ``manifest.json``, every
   ``SUCCEEDED`` results file, loads the partials they name, merges them and writes the report
   exactly as one run over the window would have (:func:`treeserve.monitoring.pipeline.finish`).

A crash between steps leaves only the run's ``monitoring/<model>/<run>/`` objects (expired by a
lifecycle rule); the report exists once the merge succeeded. Nothing in here knows Lambda event
shapes (:mod:`treeserve.monitoring.events` reads them).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from treeserve.aws import s3_client, s3_errors, sfn_client
from treeserve.errors import StorageUnavailable, TreeserveError
from treeserve.monitoring.partial import PartialState
from treeserve.monitoring.pipeline import (
    DEFAULT_RULE,
    ManifestSource,
    _default_registry,
    _utc,
    monitor_files,
)
from treeserve.settings import DriftRule

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# What one worker reads: at ~10 MB of Parquet captures per 100,000 rows of 30 features this is
# about 3M rows, ~10 s of counting on one vCPU (make bench monitoring): far inside the
# function's timeout and memory, while a 50M-row window still spreads over ~17 workers.
WORKER_BYTES = 256 * 1024 * 1024
MAX_FILES_PER_BATCH = 1000  # ~100 KB of items: inside ItemBatcher's 256 KB batch input
RUN_ROOT = "monitoring"


def run_prefix(model: str, run: str) -> str:
    return f"{RUN_ROOT}/{model}/{run}/"


def files_per_batch(files: list[tuple[str, int]], worker_bytes: int = WORKER_BYTES) -> int:
    """Files per worker so that one worker reads about ``worker_bytes``."""
    if not files:
        return 1
    mean = max(sum(size for _, size in files) / len(files), 1.0)
    return int(min(max(worker_bytes // mean, 1), MAX_FILES_PER_BATCH))


def start_fanout(
    bucket: str,
    model: str,
    start: datetime,
    end: datetime,
    files: list[tuple[str, int]],
    *,
    state_machine_arn: str,
    s3: S3Client | None = None,
    sfn: Any = None,
    worker_bytes: int = WORKER_BYTES,
) -> dict[str, Any]:
    """Write the window's manifest and start the MonitoringMap execution; returns its input
    (with ``execution_arn``)."""
    s3 = s3 or s3_client()
    start, end = _utc(start), _utc(end)
    run = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"
    prefix = run_prefix(model, run)
    manifest_key = prefix + "files.json"
    body = orjson.dumps([{"key": key, "size": size} for key, size in files])
    with s3_errors(bucket, manifest_key):
        s3.put_object(Bucket=bucket, Key=manifest_key, Body=body, ContentType="application/json")
    execution_input = {
        "bucket": bucket,
        "model": model,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "run": run,
        "manifest_key": manifest_key,
        "results_prefix": prefix + "results",
        "files_per_batch": files_per_batch(files, worker_bytes),
        "files": len(files),
        "bytes": sum(size for _, size in files),
    }
    try:
        started = (sfn or sfn_client()).start_execution(
            stateMachineArn=state_machine_arn,
            name=run,
            input=orjson.dumps(execution_input).decode(),
        )
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"cannot start the monitoring map execution: {exc}") from exc
    return {**execution_input, "execution_arn": started["executionArn"]}


def partial_key(model: str, run: str, keys: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
    return f"{run_prefix(model, run)}partials/{digest}.npz"


def run_partial(
    bucket: str,
    model: str,
    start: datetime,
    end: datetime,
    items: list[tuple[str, int]],
    *,
    run: str,
    s3: S3Client | None = None,
    registry: ManifestSource | None = None,
    rule: DriftRule = DEFAULT_RULE,
) -> dict[str, Any]:
    """Count one batch of the window's files; write its partial state; return where."""
    s3 = s3 or s3_client()
    files = sorted(items)
    mon = monitor_files(bucket, model, start, end, files, s3=s3, registry=registry, rule=rule)
    data = PartialState(mon).to_bytes()
    key = partial_key(model, run, (k for k, _ in files))
    with s3_errors(bucket, key):
        s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/octet-stream")
    return {
        "partial_key": key,
        "files": mon.files,
        "skipped_files": mon.skipped_files,
        "rows": sum(st.rows for st in mon.versions.values()),
        "bytes": len(data),
    }


def _read_json(s3: S3Client, bucket: str, key: str) -> Any:
    with s3_errors(bucket, key):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TreeserveError(f"s3://{bucket}/{key} is not JSON") from None


def result_partial_keys(s3: S3Client, bucket: str, manifest_key: str) -> list[str]:
    """The partial keys the map's workers returned, from ResultWriter's ``manifest.json``:
    every result of every ``SUCCEEDED`` file (``Output``: the worker's answer as JSON text).
    A map with failed or pending items is not merged: its report would miss their rows."""
    manifest = _read_json(s3, bucket, manifest_key)
    files = manifest.get("ResultFiles") or {}
    for state in ("FAILED", "PENDING"):
        if files.get(state):
            raise TreeserveError(f"the monitoring map has {state.lower()} items; not merged")
    keys: list[str] = []
    for entry in files.get("SUCCEEDED") or []:
        for result in _read_json(s3, bucket, str(entry["Key"])):
            output = result.get("Output")
            answer = orjson.loads(output) if isinstance(output, str) else output
            if not isinstance(answer, dict) or "partial_key" not in answer:
                raise TreeserveError("a monitoring map result holds no partial_key")
            keys.append(str(answer["partial_key"]))
    return sorted(set(keys))


class _Manifests:
    """A version's manifest read once for all the partials of a merge."""

    def __init__(self, source: ManifestSource) -> None:
        self.source = source
        self.cache: dict[int, Any] = {}

    def manifest(self, version: int) -> Any:
        if version not in self.cache:
            self.cache[version] = self.source.manifest(version)
        return self.cache[version]


def run_merge(
    bucket: str,
    model: str,
    start: datetime,
    end: datetime,
    partial_keys: list[str],
    *,
    s3: S3Client | None = None,
    registry: ManifestSource | None = None,
    rule: DriftRule = DEFAULT_RULE,
) -> PartialState:
    """The partials of ``partial_keys`` read and merged into one (none: an empty run)."""
    from treeserve.monitoring.pipeline import Monitor  # noqa: PLC0415 - beside its partials

    s3 = s3 or s3_client()
    source = _Manifests(registry or _default_registry(bucket, model, s3))
    merged = PartialState(Monitor(model, _utc(start), _utc(end), source, {}, rule=rule))
    for key in partial_keys:
        with s3_errors(bucket, key):
            data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        merged.merge(
            PartialState.from_bytes(
                data, model=model, start=start, end=end, source=source, rule=rule
            )
        )
    return merged
