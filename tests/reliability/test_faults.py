"""S3 faults (throttling, 5xx, timeouts, lost responses) injected with botocore event hooks
during cold start, model reload, capture flush, refresh and monitoring.

The contract under test (DESIGN.md, HELPER_RULES): the function keeps serving, or fails the
invocation cleanly so Lambda retries it; nothing half-written; no pointer lost; captures lost
only within the documented bound. Every test counts the faults it injected (``S3Faults``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from tests.conftest import BUCKET, ROOT, TrainedModel, train
from tests.corpus import make_package
from tests.inference_support import http_api_event, manifest_for
from tests.reliability import stack
from tests.reliability.faults import FaultKind, S3Faults, no_backoff
from treeserve import captures
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


# --- the harness itself ----------------------------------------------------------------------


def test_injected_faults_are_retried_like_real_ones(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer faults than botocore's attempts are absorbed by retries; more surface as errors."""
    no_backoff(monkeypatch)
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"v")
    faults = S3Faults(s3)
    faults.add("slowdown", operations={"GetObject"}, times=2)
    assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"v"
    assert faults.injected[("slowdown", "GetObject")] == 2
    assert faults.sent["GetObject"] == 3

    faults.add("internal", operations={"GetObject"}, times=10)
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket=BUCKET, Key="k")
    assert info.value.response["Error"]["Code"] == "InternalError"
    assert faults.injected[("internal", "GetObject")] == _attempts(s3)
    faults.clear()

    faults.add("timeout", operations={"HeadObject"}, times=10)
    with pytest.raises(ReadTimeoutError):
        s3.head_object(Bucket=BUCKET, Key="k")
    faults.detach()


def test_injected_5xx_is_not_applied_but_a_lost_response_is(
    s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    faults = S3Faults(s3)
    faults.add("slowdown", operations={"PutObject"}, times=10)
    with pytest.raises(ClientError):
        s3.put_object(Bucket=BUCKET, Key="never", Body=b"x")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)
    faults.clear()

    # Applied, then the answer lost: the retry of a conditional create finds its own write.
    faults.add("lost_response", operations={"PutObject"}, times=1)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=BUCKET, Key="once", Body=b"x", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=BUCKET, Key="once")["Body"].read() == b"x"
    faults.detach()


def test_a_fault_can_target_one_call_and_all_its_retries(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    for key in ("a", "b", "c"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    faults = S3Faults(s3)
    faults.add("internal", operations={"GetObject"}, call=1)
    assert s3.get_object(Bucket=BUCKET, Key="a")["Body"].read() == b"a"
    with pytest.raises(ClientError):
        s3.get_object(Bucket=BUCKET, Key="b")
    assert s3.get_object(Bucket=BUCKET, Key="c")["Body"].read() == b"c"
    assert faults.injected[("internal", "GetObject")] == _attempts(s3)
    faults.detach()


# --- refresh: a fault at every S3 call of a promotion ------------------------------------------

SWEEP_KINDS: tuple[FaultKind, ...] = ("slowdown", "internal", "timeout", "connect")
FULL_SWEEP = os.environ.get("TREESERVE_FAULT_SWEEP", "") == "full"


def _check_registry(registry: ModelRegistry, s3: Any) -> list[str]:
    """Invariants that must hold after any failure: returns what is broken."""
    broken = []
    for version in registry.versions():
        manifest = registry.manifest(version)
        try:
            body = s3.get_object(Bucket=BUCKET, Key=registry.model_key(version))["Body"].read()
        except ClientError:
            broken.append(f"version {version} has a manifest but no model.ubj")
            continue
        if hashlib.sha256(body).hexdigest() != manifest.sha256:
            broken.append(f"version {version}: model.ubj does not match its manifest")
    pointer = registry.current()
    if pointer is None:
        broken.append("current.json lost")
    elif pointer.version not in registry.versions():
        broken.append(f"current.json names version {pointer.version}, which is not committed")
    elif registry.manifest(pointer.version).sha256 != pointer.sha256:
        broken.append("current.json sha256 differs from its version's manifest")
    return broken


@dataclass
class SweepPoint:
    call: int
    operation: str
    key: str
    kind: FaultKind
    injected: int = 0
    first: str = ""  # what the faulted invocation did
    retry: str = ""  # what the retry did
    broken: list[str] = field(default_factory=list)


def _calls_of_one_promotion(
    refresh: Any, s3: Any, champion: TrainedModel, challenger: bytes
) -> list[tuple[str, str]]:
    """The S3 calls (operation, key) one refresh makes to promote a challenger."""
    name = "dryrun"
    registry = ModelRegistry(S3RegistryStore(BUCKET), name)
    registry.promote(registry.register(champion.ubj(), manifest_for(champion, name=name)))
    record = stack.upload(s3, f"incoming/{name}/challenger.tar.gz", challenger)
    faults = S3Faults(s3)
    outcome = stack.invoke(refresh, stack.s3_event(record))["outcomes"][0]
    faults.detach()
    assert outcome["status"] == "promoted", outcome
    return faults.log


def test_refresh_survives_a_fault_at_every_s3_call(
    s3: Any, monkeypatch: pytest.MonkeyPatch, reliability_report: Any
) -> None:
    """For each S3 call a promotion makes: fail that call (every retry of it) with a throttle,
    a 500, a timeout or a connection error (in turn). The invocation must raise (so Lambda
    retries it), leave no half-written version and no lost pointer; the retry, with S3 healthy,
    must promote the upload exactly once."""
    no_backoff(monkeypatch)
    stack.set_env(monkeypatch)
    refresh = stack.load_handler("refresh")
    champion = train("binary:logistic", rounds=1, seed=3)
    challenger = make_package(train("binary:logistic", rounds=10, seed=4))
    calls = _calls_of_one_promotion(refresh, s3, champion, challenger)
    points = [
        SweepPoint(k, calls[k][0], calls[k][1].replace("dryrun", "<model>"), kind)
        for k, kind in _sweep_plan(calls)
    ]
    for n, point in enumerate(points):
        k = point.call
        name = f"sweep{n}"
        registry = ModelRegistry(S3RegistryStore(BUCKET), name)
        registry.promote(registry.register(champion.ubj(), manifest_for(champion, name=name)))
        record = stack.upload(s3, f"incoming/{name}/challenger.tar.gz", challenger)
        faults = S3Faults(s3)
        faults.add(point.kind, call=k)
        if point.kind == "lost_response":
            # Applied, answer lost: the retry inside botocore meets its own conditional write.
            faults.faults[-1].times = 1
        try:
            result = stack.invoke(refresh, stack.s3_event(record))
            point.first = "returned " + result["outcomes"][0]["status"]
        except Exception as exc:  # the handler must raise for a Lambda retry
            point.first = f"raised {type(exc).__name__}"
        finally:
            faults.detach()
        point.injected = faults.total_injected
        point.broken += _check_registry(registry, s3)
        outcome = stack.invoke(refresh, stack.s3_event(record))["outcomes"][0]
        point.retry = outcome["status"]
        point.broken += _check_registry(registry, s3)
        upload_sha = hashlib.sha256(
            registry.model_bytes(outcome["version"]) if outcome.get("version") else b""
        ).hexdigest()
        holders = [v for v in registry.versions() if registry.manifest(v).sha256 == upload_sha]
        current = registry.current()
        if outcome["status"] != "promoted" or len(holders) != 1:
            point.broken.append(f"retry: {outcome['status']}, versions holding it: {holders}")
        elif current is None or current.version != holders[0]:
            point.broken.append("retry: the promoted version is not in service")
        if not point.first.startswith("raised") and point.first != "returned promoted":
            point.broken.append(f"faulted invocation {point.first}")

    reliability_report(
        "refresh fault sweep",
        [
            f"call {p.call:2d} {p.operation:13s} {p.key[:60]:60s} {p.kind:9s} x{p.injected}: "
            f"{p.first}; retry {p.retry}"
            for p in points
        ],
    )
    assert all(p.injected > 0 for p in points)
    assert {p.call: p.broken for p in points if p.broken} == {}


def _sweep_plan(calls: list[tuple[str, str]]) -> list[tuple[int, FaultKind]]:
    """Which call fails how. Full sweep (``make fuzz``): every call, the four kinds in turn,
    plus a lost response at every write. ``make test``: the read of the upload and the writes
    of the model, manifest and pointer (kinds in turn), plus a lost response at the manifest
    and pointer writes."""
    plan: list[tuple[int, FaultKind]] = []
    for k, (operation, key) in enumerate(calls):
        write = operation == "PutObject"
        main_write = write and key.endswith(("/model.ubj", "/manifest.json", "/current.json"))
        upload_read = operation == "GetObject" and "/incoming/" in key
        if FULL_SWEEP or main_write or upload_read:
            plan.append((k, SWEEP_KINDS[len(plan) % len(SWEEP_KINDS)]))
        if write and (FULL_SWEEP or key.endswith(("/manifest.json", "/current.json"))):
            plan.append((k, "lost_response"))
    return plan


# --- inference: cold start, reload, capture flush ----------------------------------------------


def _request(
    function: Any, method: str, path: str, rows: list[list[float]] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = None if rows is None else json.dumps({"instances": rows})
    headers = {} if rows is None else {"content-type": "application/json"}
    answer = stack.invoke(function, http_api_event(method, path, body, headers))
    got = {k.lower(): v for k, v in answer.get("headers", {}).items()}
    return answer["statusCode"], got, json.loads(answer["body"])


def _start_inference() -> Any:
    from aws_lambda_powertools.metrics.provider import cold_start

    cold_start.is_cold_start = True
    function = stack.load_handler("inference")
    function.metrics.clear_metrics()
    return function


RECOVERY_SECONDS = 2.0


@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_cold_start_with_s3_down_answers_503_then_recovers(
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    binary_model: TrainedModel,
    kind: FaultKind,
    reliability_report: Any,
) -> None:
    """S3 failing during init: the environment starts anyway (no crash loop), answers 503
    with the JSON error shape, and serves the model once S3 answers again."""
    no_backoff(monkeypatch)
    stack.set_env(monkeypatch, MODEL_REFRESH_SECONDS="60")
    registry = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
    version = registry.register(binary_model.ubj(), manifest_for(binary_model))
    registry.promote(version)
    faults = S3Faults(s3)
    faults.add(kind, operations={"GetObject", "HeadObject"})
    function = _start_inference()
    health, _, body = _request(function, "GET", "/health")
    predict, headers, error = _request(function, "POST", "/predict", binary_model.X[:2].tolist())
    faults.detach()
    assert (health, predict) == (503, 503)
    assert body["error"]["type"]
    assert error["error"]["message"]
    assert headers["x-model-version"] == "none"

    # S3 is back. An environment with no model must not wait MODEL_REFRESH_SECONDS (60 s) to
    # look again: allow a short retry backoff (RECOVERY_SECONDS), no more.
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        status, headers, answer = _request(
            function, "POST", "/predict", binary_model.X[:2].tolist()
        )
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    reliability_report(
        f"inference cold start, S3 GetObject {kind} x{faults.total_injected}",
        [f"during: /health {health}, /predict {predict}; after S3 recovers: /predict {status}"],
    )
    assert status == 200, answer
    assert headers["x-model-version"] == str(version)


RELOAD_POINTS = [
    ("pointer check", "GetObject", "/current.json"),
    ("new manifest", "GetObject", "/versions/2/manifest.json"),
    ("new model bytes", "GetObject", "/versions/2/model.ubj"),
]


@pytest.mark.parametrize("point", RELOAD_POINTS, ids=[p[0] for p in RELOAD_POINTS])
def test_reload_failure_keeps_the_old_model_serving(
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    binary_model: TrainedModel,
    point: tuple[str, str, str],
    reliability_report: Any,
) -> None:
    """A promotion while warm, with S3 failing during the reload: v1 keeps answering, the
    failure is counted, and v2 is served once S3 answers again."""
    _, operation, key = point
    no_backoff(monkeypatch)
    stack.set_env(monkeypatch, MODEL_REFRESH_SECONDS="0")
    registry = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
    registry.promote(registry.register(binary_model.ubj(), manifest_for(binary_model)))
    function = _start_inference()
    rows = binary_model.X[:3].tolist()
    assert _request(function, "POST", "/predict", rows)[1]["x-model-version"] == "1"

    newer = train("binary:logistic", seed=9)
    registry.promote(registry.register(newer.ubj(), manifest_for(newer)))
    outcomes = []
    for n, kind in enumerate(SWEEP_KINDS):
        faults = S3Faults(s3)
        faults.add(kind, operations={operation}, key_contains=key)
        status, headers, body = _request(function, "POST", "/predict", rows)
        faults.detach()
        outcomes.append(f"{kind} x{faults.total_injected}: {status} v{headers['x-model-version']}")
        assert status == 200, body
        assert headers["x-model-version"] == "1"
        assert faults.total_injected > 0
        assert function.service.reload_failures == n + 1
        np.testing.assert_allclose(
            body["predictions"],
            binary_model.booster.inplace_predict(np.asarray(rows, dtype=np.float32)),
            rtol=1e-6,
        )
    status, headers, _ = _request(function, "POST", "/predict", rows)
    reliability_report(
        f"inference reload, S3 {operation} {key} failing",
        [*outcomes, f"after S3 recovers: {status} v{headers['x-model-version']}"],
    )
    assert (status, headers["x-model-version"]) == (200, "2")


def _captured_rows(s3: Any) -> int:
    rows = 0
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"captures/{stack.MODEL}/")
    for item in listing.get("Contents", []):
        body = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        rows += len(captures.decode_capture(body))
    return rows


def test_capture_flush_failures_lose_at_most_the_documented_bound(
    s3: Any, monkeypatch: pytest.MonkeyPatch, binary_model: TrainedModel, reliability_report: Any
) -> None:
    """Capture every row, write every 20: fail two of the writes (all retries of each, a
    throttle and a timeout). Every request still answers 200; what is lost is exactly the two
    failed batches, each under CAPTURE_MAX_ROWS + one request's rows; the rest is in S3."""
    no_backoff(monkeypatch)
    max_rows, per_request, requests = 20, 5, 40
    stack.set_env(
        monkeypatch,
        CAPTURE_SAMPLE_RATE="1",
        CAPTURE_MAX_ROWS=str(max_rows),
        CAPTURE_MAX_AGE_SECONDS="3600",
        MODEL_REFRESH_SECONDS="3600",
    )
    registry = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
    registry.promote(registry.register(binary_model.ubj(), manifest_for(binary_model)))
    function = _start_inference()
    faults = S3Faults(function.capture.s3())  # capture writes through its own client
    faults.add("slowdown", operations={"PutObject"}, key_contains="/captures/", call=1)
    faults.add("timeout", operations={"PutObject"}, key_contains="/captures/", call=4)
    statuses = []
    for i in range(requests):
        rows = binary_model.X[i * per_request : (i + 1) * per_request].tolist()
        statuses.append(_request(function, "POST", "/predict", rows)[0])
    function.capture.wait()  # writes run off the request, on a thread
    faults.detach()
    capture = function.capture
    stored, buffered = _captured_rows(s3), capture.buffered_rows
    lost = requests * per_request - stored - buffered
    reliability_report(
        "capture flush under S3 faults",
        [
            f"{requests} requests x {per_request} rows, sample rate 1, write every {max_rows} rows",
            f"faults injected {faults.total_injected} (2 writes, every retry), "
            f"writes ok {capture.flushes}, failed {capture.flush_failures}",
            f"rows stored {stored}, buffered {buffered}, lost {lost} "
            f"(bound {2 * (max_rows + per_request - 1)})",
        ],
    )
    assert statuses == [200] * requests
    assert capture.flush_failures == 2
    assert lost == capture.dropped_rows
    assert 0 < lost <= 2 * (max_rows + per_request - 1)


# --- monitoring --------------------------------------------------------------------------------

MONITORING_FAULTS = [
    ("capture listing", "slowdown", {"ListObjectsV2"}, "prefix=captures/", None),
    ("one capture file", "internal", {"GetObject"}, "/captures/", None),
    ("the manifest", "timeout", {"GetObject"}, "/manifest.json", None),
    ("report write", "connect", {"PutObject"}, "/reports/", None),
    ("transient, absorbed by retries", "slowdown", {"GetObject"}, "/captures/", 2),
]


def _reports(s3: Any) -> list[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"reports/{stack.MODEL}/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_monitoring_fails_the_invocation_cleanly_or_reports_everything(
    s3: Any, monkeypatch: pytest.MonkeyPatch, binary_model: TrainedModel, reliability_report: Any
) -> None:
    """The monitoring function documents: a storage failure raises (Lambda retries, then the
    on-failure destination). So under a persistent fault the invocation raises and writes no
    report (no silently partial one); the retry reports every captured row; a transient fault
    is absorbed and the report is complete."""
    no_backoff(monkeypatch)
    stack.set_env(
        monkeypatch,
        CAPTURE_SAMPLE_RATE="1",
        CAPTURE_MAX_ROWS="25",
        CAPTURE_MAX_AGE_SECONDS="3600",
        MODEL_REFRESH_SECONDS="3600",
    )
    refresh = stack.load_handler("refresh")
    record = stack.upload(s3, "incoming/default/m.tar.gz", make_package(binary_model))
    assert stack.invoke(refresh, stack.s3_event(record))["outcomes"][0]["status"] == "promoted"
    inference = _start_inference()
    for i in range(20):
        rows = binary_model.X[i * 5 : (i + 1) * 5].tolist()
        assert _request(inference, "POST", "/predict", rows)[0] == 200
    inference.capture.wait()  # writes run off the request, on a thread
    captured = _captured_rows(s3)
    assert captured == 100
    monitoring = stack.load_handler("monitoring")
    event = {"model": stack.MODEL, "hours": 1}

    lines = []
    for what, kind, operations, key, times in MONITORING_FAULTS:
        before = _reports(s3)
        faults = S3Faults(s3)
        faults.add(kind, operations=operations, key_contains=key, times=times)
        try:
            summary = stack.invoke(monitoring, event)
            first = f"returned, {summary['rows']} rows"
        except Exception as exc:
            summary, first = None, f"raised {type(exc).__name__}"
        finally:
            faults.detach()
        assert faults.total_injected > 0, what
        written = sorted(set(_reports(s3)) - set(before))
        if summary is None:
            assert written == [], f"{what}: a report was written by a failed run"
            summary = stack.invoke(monitoring, event)
            retry = f"retry {summary['rows']} rows"
        else:
            assert times is not None, (
                f"{what}: a persistent fault did not fail the invocation: {summary}"
            )
            retry = "no retry needed"
        lines.append(f"{what}: {kind} x{faults.total_injected}: {first}; {retry}")
        assert summary["rows"] == captured, what
        assert summary["report_key"] in _reports(s3)
    reliability_report("monitoring under S3 faults", lines)


def _attempts(client: Any) -> int:
    """How many attempts one call gets (``Config(retries={"max_attempts": n})`` means n retries)."""
    retries = client.meta.config.retries
    return int(retries.get("total_max_attempts") or retries["max_attempts"] + 1)


def _worst_case_call_seconds(client: Any) -> float:
    """The longest one S3 call can take under botocore's standard retries: every attempt
    connecting slowly and then timing out on the read (backoff 50 ms base), or every attempt
    throttled (no waiting on the wire, backoff 1 s base doubling, capped at 20 s)."""
    config = client.meta.config
    attempts = _attempts(client)
    per_attempt = float(config.connect_timeout) + float(config.read_timeout)
    timeouts = attempts * per_attempt + sum(min(20.0, 0.05 * 2.0**i) for i in range(attempts - 1))
    throttled = sum(min(20.0, 2.0**i) for i in range(attempts - 1))
    return max(timeouts, throttled)


def test_a_capture_write_cannot_outlast_the_inference_timeout(
    s3: Any, monkeypatch: pytest.MonkeyPatch, binary_model: TrainedModel
) -> None:
    """A request waits for a capture write when it crosses a bound while the previous write
    still runs (one write in flight at most): however S3 misbehaves, that write must end well
    inside the inference function's timeout (template.yaml)."""
    from treeserve_cli.template import parse_template

    template = parse_template((ROOT / "template.yaml").read_text())
    props = template["Resources"]["InferenceFunction"]["Properties"]
    timeout = float(props.get("Timeout") or template["Globals"]["Function"]["Timeout"])
    stack.set_env(monkeypatch, CAPTURE_SAMPLE_RATE="1")
    registry = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
    registry.promote(registry.register(binary_model.ubj(), manifest_for(binary_model)))
    function = _start_inference()
    worst = _worst_case_call_seconds(function.capture.s3())
    assert worst < timeout / 2, (
        f"a capture write may take {worst:.0f} s; the timeout is {timeout:.0f} s"
    )
