"""Batch jobs: the S3 layout, the model a job is pinned to, and the job manifest.

Layout (DESIGN.md), under the model bucket::

    batch/<model>/<job>/input/...          the objects to score (CSV with a header, JSON Lines)
    batch/<model>/<job>/output/...         one output per input object, at the same relative key
    batch/<model>/<job>/results/...        the Distributed Map's ResultWriter output
    batch/<model>/<job>/manifest.json      the job manifest, written last

A job is pinned to one registered version, resolved once when it is submitted (``--version``,
``--alias``, default the champion) and carried with its sha256 to every worker, so a promotion
during the job changes nothing: every object is scored by the same bytes.

The manifest is built from what Step Functions' ResultWriter wrote (``manifest.json`` naming
``SUCCEEDED_<n>.json`` / ``FAILED_<n>.json`` / ``PENDING_<n>.json``, each a JSON array of child
executions with their ``Input`` and ``Output`` or ``Error`` and ``Cause`` as strings): every
listed object is either scored, or failed with a reason (a malformed object, a batch whose
retries ran out, a batch the map never ran).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from treeserve.aws import s3_errors
from treeserve.errors import NoModelInService, NotFound, TreeserveError
from treeserve.registry.model_registry import CHAMPION, ModelRegistry, valid_alias
from treeserve.settings import MODEL_NAME_RULE, valid_model_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BATCH_PREFIX = "batch/"
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
JOB_ID_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
MANIFEST_FORMAT = "treeserve.batch/1"


class BadJob(TreeserveError):
    """A job that cannot be run as asked (a bad name, prefix or model reference)."""


def valid_job_id(job: object) -> bool:
    return isinstance(job, str) and JOB_ID_RE.fullmatch(job) is not None


def new_job_id(now: datetime | None = None) -> str:
    """``20261202T051500Z-1a2b3c``: sortable by submission time, unique enough to not clash."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def job_prefix(model: str, job: str) -> str:
    if not valid_model_name(model):
        raise BadJob(f"model name {model[:80]!r}: use {MODEL_NAME_RULE}")
    if not valid_job_id(job):
        raise BadJob(f"job {job[:80]!r}: use {JOB_ID_RULE}")
    return f"{BATCH_PREFIX}{model}/{job}/"


def input_prefix(model: str, job: str) -> str:
    return job_prefix(model, job) + "input/"


def output_prefix(model: str, job: str) -> str:
    return job_prefix(model, job) + "output/"


def results_prefix(model: str, job: str) -> str:
    return job_prefix(model, job) + "results"


def manifest_key(model: str, job: str) -> str:
    return job_prefix(model, job) + "manifest.json"


def output_key(model: str, job: str, key: str) -> str:
    """Where the output of input object ``key`` goes: the same relative key under output/."""
    prefix = input_prefix(model, job)
    if not key.startswith(prefix) or key == prefix:
        raise BadJob(f"{key[:200]!r} is not an object under {prefix}")
    return output_prefix(model, job) + key[len(prefix) :]


def parse_input_prefix(prefix: str) -> tuple[str, str]:
    """``batch/<model>/<job>/input/...`` -> (model, job); BadJob otherwise."""
    parts = prefix.split("/")
    if len(parts) < 4 or parts[0] != "batch" or parts[3] != "input":
        raise BadJob(
            f"{prefix[:200]!r} is not a job's input prefix: put the objects under "
            "batch/<model>/<job>/input/ (or give a local folder to upload there)"
        )
    job_prefix(parts[1], parts[2])  # checks both names
    return parts[1], parts[2]


def execution_name(model: str, job: str) -> str:
    """The state machine execution of a job (names are unique per state machine)."""
    return f"{model}-{job}"[:80]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What every worker of a job is told: the model, pinned to one version and its sha256."""

    model: str
    job: str
    version: int
    sha256: str
    requested: str  # what the user asked for: "champion", "alias <a>", "version <n>"
    submitted_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> JobSpec:
        if not isinstance(raw, dict):
            raise BadJob("the job must be an object {model, job, version, sha256, ...}")
        try:
            spec = cls(
                model=str(raw["model"]),
                job=str(raw["job"]),
                version=int(raw["version"]),
                sha256=str(raw["sha256"]),
                requested=str(raw.get("requested", "")),
                submitted_at=str(raw.get("submitted_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadJob(f"the job is missing or has a bad field: {exc}") from None
        job_prefix(spec.model, spec.job)
        if spec.version < 1 or not re.fullmatch(r"[0-9a-f]{64}", spec.sha256):
            raise BadJob("the job's version must be >= 1 and its sha256 64 hex digits")
        return spec


def resolve_job(
    registry: ModelRegistry,
    job: str,
    *,
    version: int | None = None,
    alias: str | None = None,
    now: datetime | None = None,
) -> JobSpec:
    """Pin a job to a registered version: ``version``, else ``alias``, else the champion."""
    name = registry.name
    job_prefix(name, job)
    if version is not None and alias is not None:
        raise BadJob("give --version or --alias, not both")
    if version is not None:
        if version < 1:
            raise BadJob(f"version {version}: versions are positive integers")
        try:
            manifest = registry.manifest(version)
        except NotFound:
            raise NotFound(f"model {name!r} has no version {version}") from None
        sha, requested = manifest.sha256, f"version {version}"
    elif alias is not None and alias != CHAMPION:
        if not valid_alias(alias):
            raise BadJob(f"alias {alias[:40]!r} is not a valid alias name")
        pointer = registry.alias(alias)
        if pointer is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        version, sha, requested = pointer.version, pointer.sha256, f"alias {alias}"
    else:
        pointer = registry.current()
        if pointer is None:
            if not registry.exists():
                raise NotFound(f"model {name!r} is not in the registry")
            raise NoModelInService(f"model {name!r} has no version in service")
        version, sha, requested = pointer.version, pointer.sha256, CHAMPION
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return JobSpec(name, job, int(version), sha, requested, stamp)


def execution_input(spec: JobSpec, bucket: str) -> dict[str, Any]:
    """The state machine's input for a job (template.yaml's definition reads these paths)."""
    return {
        "job": spec.to_dict(),
        "bucket": bucket,
        "input_prefix": input_prefix(spec.model, spec.job),
        "results_prefix": results_prefix(spec.model, spec.job),
    }


# --- the job manifest, from the map's ResultWriter output ------------------------------------


def _read_json(s3: S3Client, bucket: str, key: str) -> Any:
    with s3_errors(bucket, key):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return json.loads(body)


def _loads(text: Any) -> Any:
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _items_of(execution: dict[str, Any]) -> list[str]:
    batch = _loads(execution.get("Input"))
    items = batch.get("Items") if isinstance(batch, dict) else None
    return [str(i.get("Key")) for i in items or [] if isinstance(i, dict)]


def map_results(s3: S3Client, bucket: str, key: str) -> dict[str, list[dict[str, Any]]]:
    """The child executions a ResultWriter manifest names, by status (SUCCEEDED, FAILED,
    PENDING), each as Step Functions wrote it."""
    manifest = _read_json(s3, bucket, key)
    out: dict[str, list[dict[str, Any]]] = {}
    for status, files in (manifest.get("ResultFiles") or {}).items():
        for file in files or []:
            out.setdefault(status, []).extend(_read_json(s3, bucket, str(file["Key"])))
    return out


def build_manifest(
    spec: JobSpec,
    executions: dict[str, list[dict[str, Any]]],
    *,
    started: str | None,
    finished: datetime,
    map_run_arn: str | None = None,
    map_error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job manifest: every object scored or failed with a reason, rows, version, timings."""
    outputs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for execution in executions.get("SUCCEEDED", []):
        result = _loads(execution.get("Output"))
        for obj in (result or {}).get("objects", []) if isinstance(result, dict) else []:
            (outputs if obj.get("status") == "scored" else failures).append(obj)
    for status, reason in (("FAILED", None), ("PENDING", "not scored: the map stopped first")):
        for execution in executions.get(status, []):
            why = reason or (
                f"{execution.get('Error') or 'failed'}: {execution.get('Cause') or ''}".strip()
                + " (after the state machine's retries)"
            )
            failures.extend(
                {"key": k, "status": "failed", "reason": why} for k in _items_of(execution)
            )
    outputs.sort(key=lambda o: str(o.get("key")))
    failures.sort(key=lambda o: str(o.get("key")))
    if map_error is not None:
        status = "failed"
    elif failures:
        status = "completed_with_failures"
    else:
        status = "succeeded"
    seconds = None
    if started:
        try:
            begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
            seconds = round((finished - begun).total_seconds(), 3)
        except ValueError:
            seconds = None
    return {
        "format": MANIFEST_FORMAT,
        "model": spec.model,
        "job": spec.job,
        "version": spec.version,
        "sha256": spec.sha256,
        "requested": spec.requested,
        "status": status,
        "objects": len(outputs) + len(failures),
        "objects_scored": len(outputs),
        "objects_failed": len(failures),
        "rows": sum(int(o.get("rows") or 0) for o in outputs),
        "failures": failures,
        "outputs": outputs,
        "error": map_error,
        "map_run_arn": map_run_arn,
        "timings": {
            "submitted_at": spec.submitted_at,
            "started_at": started,
            "finished_at": finished.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "seconds": seconds,
            "scoring_seconds": round(sum(float(o.get("seconds") or 0) for o in outputs), 3),
        },
    }


def write_manifest(s3: S3Client, bucket: str, manifest: dict[str, Any]) -> str:
    key = manifest_key(manifest["model"], manifest["job"])
    with s3_errors(bucket, key):
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(manifest, indent=1).encode(),
            ContentType="application/json",
        )
    return key


def read_manifest(s3: S3Client, bucket: str, model: str, job: str) -> dict[str, Any] | None:
    """The job manifest, or None while the job runs (or when it never ran)."""
    try:
        return _read_json(s3, bucket, manifest_key(model, job))  # type: ignore[no-any-return]
    except NotFound:
        return None


class JobFailed(TreeserveError):
    """The map stopped (too many failed batches): the manifest says what was scored."""


def finalize_job(
    s3: S3Client,
    bucket: str,
    spec: JobSpec,
    *,
    results_key: str | None,
    map_run_arn: str | None,
    map_error: dict[str, Any] | None,
    started: str | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write the job manifest from the map's results; returns it. When the map failed, the
    results it wrote (if any) are found under the job's results prefix."""
    if results_key is None:
        prefix = results_prefix(spec.model, spec.job) + "/"
        with s3_errors(bucket, prefix):
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            found = [
                (o["LastModified"], o["Key"])
                for page in pages
                for o in page.get("Contents", [])
                if o["Key"].endswith("/manifest.json")
            ]
        results_key = max(found)[1] if found else None
    executions = map_results(s3, bucket, results_key) if results_key else {}
    manifest = build_manifest(
        spec,
        executions,
        started=started,
        finished=now or datetime.now(UTC),
        map_run_arn=map_run_arn,
        map_error=map_error,
    )
    manifest["results_key"] = results_key
    write_manifest(s3, bucket, manifest)
    return manifest
