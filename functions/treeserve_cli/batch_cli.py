"""``treeserve batch submit|status``: batch scoring jobs on the batch state machine.

``submit PREFIX`` scores every object under ``batch/<model>/<job>/input/`` (PREFIX names it, or is
a local folder or file uploaded there first, under a new job id). The model is pinned once, here
(``--version``, ``--alias``, default the champion), and the job's execution is started with the
version and its sha256 (:func:`treeserve.batch.jobs.execution_input`). ``status JOB`` shows the
execution, progress (outputs written of inputs listed) and the job manifest once written.

The state machine comes from ``--state-machine`` or ``BATCH_STATE_MACHINE_ARN`` (the stack's
output ``BatchStateMachineArn``); Step Functions is reached through boto3, which the local stack
points at its own endpoint with ``AWS_ENDPOINT_URL_SFN``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from treeserve.aws import s3_client, s3_errors, sfn_client, sfn_errors
from treeserve.batch import jobs
from treeserve.errors import ConfigurationError, NotFound, PreconditionFailed, TreeserveError
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve.settings import Settings

POLL_SECONDS = 1.0
EXIT_FAILURES = 2
EXIT_TIMEOUT = 3


def _machine(args: argparse.Namespace, settings: Settings) -> str:
    arn = getattr(args, "state_machine", None) or settings.batch_state_machine_arn
    if not arn:
        raise ConfigurationError(
            "no batch state machine: pass --state-machine ARN or set BATCH_STATE_MACHINE_ARN "
            "(the stack's output BatchStateMachineArn; `treeserve local` prints it)"
        )
    return str(arn)


def execution_arn(machine_arn: str, model: str, job: str) -> str:
    return (
        machine_arn.replace(":stateMachine:", ":execution:") + ":" + jobs.execution_name(model, job)
    )


def _count(s3: Any, bucket: str, prefix: str) -> int:
    with s3_errors(bucket, prefix):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(
            1 for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")
        )


def _upload(s3: Any, bucket: str, source: Path, prefix: str) -> int:
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise TreeserveError(f"{source} holds no files to score")
    tty = sys.stderr.isatty()
    for i, path in enumerate(files, 1):
        relative = path.name if source.is_file() else path.relative_to(source).as_posix()
        key = prefix + relative
        with s3_errors(bucket, key):
            s3.upload_file(str(path), bucket, key)
        if tty:
            sys.stderr.write(f"\ruploading inputs: {i}/{len(files)}")
    if tty:
        sys.stderr.write("\n")
    return len(files)


def submit(args: argparse.Namespace) -> int:
    """Start a job; with --wait, follow it and exit 0 (all scored), 2 (failures), 3 (timeout)."""
    settings = Settings.from_env(bucket=args.bucket)
    bucket = settings.model_bucket
    name = args.name or settings.model_name
    machine = _machine(args, settings)
    s3 = s3_client()
    local = Path(args.prefix)
    if local.exists():
        job = args.job or jobs.new_job_id()
    else:
        raw = args.prefix.removeprefix(f"s3://{bucket}/")
        model, job = jobs.parse_input_prefix(raw)
        if args.name and model != args.name:
            raise jobs.BadJob(f"{raw!r} is a job of model {model!r}, not of --name {args.name!r}")
        if args.job and args.job != job:
            raise jobs.BadJob(f"{raw!r} is job {job!r}; --job {args.job!r} disagrees")
        name = model
    # Pinned before anything is uploaded: a wrong --version or --alias costs nothing.
    registry = ModelRegistry(S3RegistryStore(bucket, s3), name)
    spec = jobs.resolve_job(registry, job, version=args.version, alias=args.alias)
    prefix = jobs.input_prefix(name, job)
    arn = execution_arn(machine, name, job)
    try:
        _describe(arn)
    except NotFound:
        pass  # a new job, as it should be
    else:
        raise PreconditionFailed(
            f"job {job} of model {name!r} was submitted before: `treeserve batch status {job} "
            f"--name {name}` shows it; pick another --job"
        )
    if local.exists():
        uploaded = _upload(s3, bucket, local, prefix)
        sys.stdout.write(f"uploaded {uploaded} file(s) to s3://{bucket}/{prefix}\n")
    inputs = _count(s3, bucket, prefix)
    if inputs == 0:
        raise TreeserveError(f"nothing to score under s3://{bucket}/{prefix}")
    with sfn_errors(f"job {job} of model {name!r} (submitted before?)"):
        sfn_client().start_execution(
            stateMachineArn=machine,
            name=jobs.execution_name(name, job),
            input=json.dumps(jobs.execution_input(spec, bucket)),
        )
    sys.stdout.write(
        f"job {job}: {inputs} object(s) of s3://{bucket}/{prefix} scored by model {name} "
        f"version {spec.version} ({spec.requested}, sha256 {spec.sha256[:12]}...)\n"
        f"execution {arn}\n"
        f"status: treeserve batch status {job} --name {name}\n"
    )
    if not args.wait:
        return 0
    return _follow(s3, bucket, name, job, arn=arn, inputs=inputs, timeout=float(args.timeout))


def _describe(arn: str) -> dict[str, Any]:
    with sfn_errors(f"execution {arn}"):
        return sfn_client().describe_execution(executionArn=arn)  # type: ignore[no-any-return]


def _follow(
    s3: Any, bucket: str, model: str, job: str, *, arn: str, inputs: int, timeout: float
) -> int:
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + timeout
    out_prefix = jobs.output_prefix(model, job)
    while True:
        status = _describe(arn)["status"]
        if tty:
            done = _count(s3, bucket, out_prefix)
            width = 30
            filled = width * min(done, inputs) // max(inputs, 1)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{inputs} outputs  {status}"
            )
        if status != "RUNNING":
            break
        if time.monotonic() > deadline:
            if tty:
                sys.stderr.write("\n")
            sys.stdout.write(f"job {job} still running after {timeout:g} s\n")
            return EXIT_TIMEOUT
        time.sleep(POLL_SECONDS)
    if tty:
        sys.stderr.write("\n")
    manifest = jobs.read_manifest(s3, bucket, model, job)
    _print_status(job, _describe(arn), manifest, inputs, _count(s3, bucket, out_prefix))
    if manifest is None or manifest["status"] != "succeeded":
        return EXIT_FAILURES
    return 0


def _print_status(
    job: str,
    execution: dict[str, Any],
    manifest: dict[str, Any] | None,
    inputs: int,
    outputs: int,
) -> None:
    out = sys.stdout
    out.write(f"job {job}: execution {execution['status']}; {outputs}/{inputs} outputs written\n")
    if execution.get("error"):
        out.write(f"  error {execution['error']}: {str(execution.get('cause', ''))[:500]}\n")
    if manifest is None:
        out.write("  no manifest yet (written when the job ends)\n")
        return
    t = manifest["timings"]
    out.write(
        f"  model {manifest['model']} version {manifest['version']} ({manifest['requested']}); "
        f"status {manifest['status']}; {manifest['rows']:,} rows in "
        f"{manifest['objects_scored']} object(s); {manifest['objects_failed']} failed; "
        f"{t.get('seconds')} s\n"
    )
    for failure in manifest["failures"]:
        out.write(f"  failed {failure['key']}: {failure.get('reason')}\n")


def status(args: argparse.Namespace) -> int:
    """Show a job: its execution, outputs written, and its manifest once written."""
    settings = Settings.from_env(bucket=args.bucket)
    bucket = settings.model_bucket
    name = args.name or settings.model_name
    job = args.job
    jobs.job_prefix(name, job)
    s3 = s3_client()
    arn = execution_arn(_machine(args, settings), name, job)
    manifest = jobs.read_manifest(s3, bucket, name, job)
    try:
        execution = _describe(arn)
    except NotFound:
        if manifest is None:
            raise NotFound(f"no job {job!r} of model {name!r}") from None
        execution = {"status": "UNKNOWN (not in this Step Functions)"}
    inputs = _count(s3, bucket, jobs.input_prefix(name, job))
    outputs = _count(s3, bucket, jobs.output_prefix(name, job))
    if args.json:
        document = {
            "job": job,
            "model": name,
            "execution": {k: execution.get(k) for k in ("status", "error", "cause")},
            "inputs": inputs,
            "outputs": outputs,
            "manifest": manifest,
        }
        sys.stdout.write(json.dumps(document, indent=1, default=str) + "\n")
    else:
        _print_status(job, execution, manifest, inputs, outputs)
    return 0


def batch_command(args: argparse.Namespace) -> int:
    """``treeserve batch submit|status``."""
    return submit(args) if args.action == "submit" else status(args)
