"""Monitoring fanned out over the MonitoringMap state machine: the report of merged partial
states is the report of one run over the window, number for number.

The planner (a direct invocation) starts the execution through boto3's Step Functions client
against the local stack's endpoint (:mod:`treeserve_cli.stepfunctions`), which runs
template.yaml's own MonitoringMap definition (ItemReader getObject JSON, ItemBatcher, the worker
Task's Payload and ResultSelector, ResultWriter, the merge Task) with the events and ResultWriter
files in the shapes Step Functions documents; every step is the monitoring function's handler."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, ROOT, LambdaContext, train
from tests.integration.test_monitoring import (
    NOW,
    START,
    capture_file,
    capture_lines,
    put_capture,
    put_captures,
    register,
    traffic,
)
from tests.integration.test_monitoring_handler import load_app
from treeserve.errors import StorageUnavailable, TreeserveError
from treeserve.model.manifest import ModelManifest
from treeserve.model.reference import compute_reference
from treeserve.monitoring import fanout
from treeserve.monitoring import pipeline as monitoring
from treeserve.monitoring.partial import PartialState, PartialStateError
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve_cli.stepfunctions import (
    Execution,
    LocalRunner,
    LocalStepFunctions,
    StateMachineDef,
    StepFunctionsEndpoint,
    state_machines,
)
from treeserve_cli.template import load_template

pytestmark = pytest.mark.integration

PLANS = ["bronze", "gold", "silver", "tin"]
VOLATILE = ("generated_at", "report_key")


# --- a window with everything: versions, labels, legacy and corrupt files, a categorical model -


def numeric_window(s3: Any) -> None:
    first = train("binary:logistic", n=1500)  # reference <= 2000 rows: exact KS kept values
    second = train("binary:logistic", n=3000, seed=1, shift=0.3)  # quantiles: asymptotic KS
    v1, v2 = register(s3, first), register(s3, second)
    rng = np.random.default_rng(7)
    X1 = rng.normal(size=(15_000, 6))  # > EXACT_KS_MAX_N in all, fewer in any one worker
    X1[:, 2] += 0.8
    X1[::7, 4] = np.nan
    # Values over 2**-30..2**30: float64 sums of them round, and differently per batching.
    X1[:, 5] = rng.lognormal(0.0, 3.0, X1.shape[0]) * rng.choice([-1.0, 1.0], X1.shape[0])
    ids1, _ = traffic(s3, first, v1, X1, prefix="a", files=6)
    X2 = rng.normal(size=(4_000, 6)) * 1.5
    ids2, _ = traffic(s3, second, v2, X2, prefix="b", files=4, ts=NOW - timedelta(hours=3))
    early = NOW - timedelta(hours=30)  # the window's first day, before its start: not counted
    traffic(s3, first, v1, X1[:300], prefix="c", files=1, ts=early)
    X3 = rng.normal(size=(500, 6))
    preds3 = second.booster.inplace_predict(X3)
    lines = capture_lines(v2, X3, preds3, [f"l-{i}" for i in range(500)], NOW - timedelta(hours=2))
    put_captures(s3, "m", [*lines, b"{not json"], NOW - timedelta(hours=2), "legacy")
    put_capture(s3, "m", b"PAR1 not parquet", NOW - timedelta(hours=2), "corrupt")
    narrow, early2 = X3[:40, :5], NOW - timedelta(hours=2)  # the wrong width: malformed
    body = capture_file("m", v1, narrow, preds3[:40], [f"n-{i}" for i in range(40)], early2)
    put_capture(s3, "m", body, NOW - timedelta(hours=2), "narrow")
    labelled = [*ids1[::3], *ids2[1::2], *[f"l-{i}" for i in range(0, 500, 4)]]
    y = {i: int(hashlib.sha256(i.encode()).digest()[0] > 100) for i in labelled}
    body = "id,label\n" + "".join(f"{i},{v}\n" for i, v in y.items())
    s3.put_object(Bucket=BUCKET, Key="labels/m/day.csv", Body=body.encode())


def categorical_window(s3: Any) -> None:
    rng = np.random.default_rng(3)
    n = 1200
    df = pd.DataFrame(
        {
            "usage": rng.normal(size=n),
            "plan": pd.Categorical(rng.choice(PLANS[:3], n), categories=PLANS),
            "tenure": rng.integers(0, 60, n).astype(float),
        }
    )
    y = (df["usage"].to_numpy() + (df["plan"] == "gold").to_numpy() > 0.5).astype(int)
    model = xgb.XGBClassifier(n_estimators=8, max_depth=3, enable_categorical=True).fit(df, y)
    booster = model.get_booster()
    codes = df.assign(plan=df["plan"].cat.codes).to_numpy(dtype=np.float32)
    names = list(df.columns)
    types = ["float", "c", "float"]
    ubj = bytes(booster.save_raw("ubj"))
    manifest = ModelManifest(
        name="c",
        sha256=hashlib.sha256(ubj).hexdigest(),
        model_size=len(ubj),
        xgboost_version=xgb.__version__,
        objective="binary:logistic",
        task="binary",
        num_features=3,
        feature_names=names,
        feature_types=types,
        num_class=0,
        threshold=0.5,
        reference=compute_reference(
            codes, names, types, booster.inplace_predict(codes), categories={"plan": PLANS}
        ),
        reference_source="reference.csv",
    )
    version = ModelRegistry(S3RegistryStore(BUCKET, s3=s3), "c").register(ubj, manifest)
    live = codes.copy()
    live[:400, 1] = 3.0  # "tin": never in the reference
    live[400:460, 1] = 7.0  # a code the model never had
    live[::11, 1] = np.nan
    preds = booster.inplace_predict(live)
    ids = [f"c-{i}" for i in range(n)]
    for f, part in enumerate(np.array_split(np.arange(n), 5)):
        ts = NOW - timedelta(hours=1 + f)
        body = capture_file("c", version, live[part], preds[part], [ids[i] for i in part], ts)
        put_capture(s3, "c", body, ts, f"c{f}")
    body = "id,label\n" + "".join(f"{ids[i]},{y[i]}\n" for i in range(0, n, 2))
    s3.put_object(Bucket=BUCKET, Key="labels/c/day.csv", Body=body.encode())


WINDOWS = {"m": numeric_window, "c": categorical_window}


# --- the map: template.yaml's MonitoringMap, run by the local stack's runner --------------------


def machines() -> dict[str, StateMachineDef]:
    """The template's state machines as deployed (DefinitionSubstitutions applied), their
    bucket this test's."""
    template = load_template(ROOT / "template.yaml")
    bucket = template.bucket_name()
    return {
        logical_id: dataclasses.replace(
            machine, definition=json.loads(json.dumps(machine.definition).replace(bucket, BUCKET))
        )
        for logical_id, machine in state_machines(template).items()
    }


def definition() -> dict[str, Any]:
    """MonitoringMap's definition with its DefinitionSubstitutions applied (local names)."""
    return machines()["MonitoringMap"].definition


@dataclass
class Fanned:
    """The local Step Functions endpoint serving the template's machines, its Lambda tasks the
    monitoring function's handler; ``fail``: batches holding a key with this text raise."""

    app: Any
    service: LocalStepFunctions
    arn: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    fail: str | None = None

    def finished(self, execution_arn: str) -> Execution:
        execution = self.service.execution(execution_arn)
        assert execution.done.wait(600), "the execution did not finish"
        return execution


@pytest.fixture
def fanned(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fanned]:
    """The function's environment with fan-out on from the first byte; its
    MONITORING_STATE_MACHINE_ARN the local endpoint's MonitoringMap, reached as the local stack
    reaches it (AWS_ENDPOINT_URL_SFN)."""
    template = load_template(ROOT / "template.yaml")
    function_arn = str(template.get_att("MonitoringFunction", "Arn"))
    served = machines()
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("MONITORING_FANOUT_BYTES", "1")
    monkeypatch.setenv("MONITORING_STATE_MACHINE_ARN", served["MonitoringMap"].arn)
    monkeypatch.delenv("NOTIFICATION_TOPIC_ARN", raising=False)
    app = load_app()

    def invoke(arn: str, payload: Any) -> Any:
        assert arn == function_arn, arn
        state.calls.append(payload)
        keys = [str(item.get("key")) for item in payload.get("Items") or []]
        if state.fail is not None and any(state.fail in key for key in keys):
            raise StorageUnavailable("S3 is unavailable; retry")
        return app.handler(payload, LambdaContext())

    service = LocalStepFunctions(served, LocalRunner(invoke, s3, retry_scale=0))
    state = Fanned(app, service, served["MonitoringMap"].arn)
    endpoint = StepFunctionsEndpoint(service, "127.0.0.1", 0)
    endpoint.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SFN", endpoint.url)
    try:
        yield state
    finally:
        for execution in service.list_executions(state.arn):
            execution.done.wait(600)
        endpoint.stop()


def plan(fanned: Fanned, name: str, monkeypatch: pytest.MonkeyPatch, per_batch: int) -> Any:
    """The planner's invocation (a direct run over the window), sizing batches at ``per_batch``
    files so the map runs several workers (the planner sizes by bytes: one, for these files)."""
    monkeypatch.setattr(fanout, "files_per_batch", lambda files, worker_bytes=0: per_batch)
    return fanned.app.handler(
        {"model": name, "start": START.isoformat(), "end": NOW.isoformat()}, LambdaContext()
    )


def statistics(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in VOLATILE}


@pytest.mark.parametrize("name", ["m", "c"])
@pytest.mark.parametrize("per_batch", [1, 3, 100])
def test_fanned_out_report_equals_the_single_run(
    s3: Any, fanned: Fanned, monkeypatch: pytest.MonkeyPatch, name: str, per_batch: int
) -> None:
    WINDOWS[name](s3)
    single = monitoring.run_monitoring(BUCKET, name, START, NOW, s3=s3, now=NOW, write=False)
    assert single["rows"] > 0

    planned = plan(fanned, name, monkeypatch, per_batch)
    assert planned["status"] == "fanned out"
    execution = fanned.finished(planned["execution_arn"])
    assert execution.status == "SUCCEEDED", (execution.error, execution.cause)
    execution_input = json.loads(execution.input)
    assert execution_input["manifest_key"] == planned["manifest_key"]
    assert execution_input["files_per_batch"] == per_batch
    listed = monitoring.window_files(s3, BUCKET, name, START, NOW)
    manifest = orjson.loads(
        s3.get_object(Bucket=BUCKET, Key=planned["manifest_key"])["Body"].read()
    )
    assert [(i["key"], i["size"]) for i in manifest] == listed

    # The runner ran the map as the definition says: the workers' batches (ItemBatcher's shape,
    # at most per_batch files), every file once, then one merge.
    batches = [c for c in fanned.calls if "Items" in c]
    merges = [c for c in fanned.calls if c.get("action") == "monitoring-merge"]
    assert len(batches) == -(-len(listed) // per_batch)
    assert sorted(i["key"] for b in batches for i in b["Items"]) == [k for k, _ in listed]
    assert all(len(b["Items"]) <= per_batch for b in batches)
    assert all(b["BatchInput"]["run"] == execution_input["run"] for b in batches)
    (merge,) = merges
    results = merge["results"]
    assert results["Key"].startswith(execution_input["results_prefix"] + "/")
    assert results["Key"].endswith("/manifest.json")

    summary = json.loads(execution.output or "null")
    report = orjson.loads(s3.get_object(Bucket=BUCKET, Key=summary["report_key"])["Body"].read())
    assert statistics(report) == statistics(orjson.loads(orjson.dumps(single)))
    # The same bytes, not merely equal floats: the stored JSON of both reports.
    assert orjson.dumps(statistics(report)) == orjson.dumps(statistics(single))
    assert summary["rows"] == single["rows"]
    assert summary["drifted_features"] == single["summary"]["drifted_features"]


def test_the_window_exercises_what_merging_must_get_right(s3: Any) -> None:
    """The numeric window holds what a careless merge gets wrong: kept KS values past the
    exact limit only in total, several versions, labels, skipped and out-of-window rows."""
    numeric_window(s3)
    report = monitoring.run_monitoring(BUCKET, "m", START, NOW, s3=s3, now=NOW, write=False)
    v1, v2 = report["versions"]
    assert v1["features"][0]["ks_method"] == "asymp"  # 15,000 rows: over EXACT_KS_MAX_N
    assert v2["rows"] == 4_500
    assert v1["rows"] == 15_000
    assert report["rows_outside_window"] == 300
    assert report["skipped_files"] == 1
    assert report["malformed_rows"] == 40
    assert report["summary"]["performance"]["rows"] > 5_000
    assert v1["performance"]["rows"] == 5_000
    assert v1["features"][2]["drifted"]
    files = monitoring.window_files(s3, BUCKET, "m", START, NOW)
    share = [f for f in files if "-a" in f[0]][:2]  # 5,000 rows of version 1
    few = monitoring.monitor_files(BUCKET, "m", START, NOW, share, s3=s3)
    assert few.versions[1].features[0].kept is not None  # a worker's share: kept exactly


def test_partials_merge_in_any_order_and_round_trip(s3: Any) -> None:
    numeric_window(s3)
    files = monitoring.window_files(s3, BUCKET, "m", START, NOW)
    registry = ModelRegistry(S3RegistryStore(BUCKET, s3=s3), "m")
    parts = [
        PartialState(monitoring.monitor_files(BUCKET, "m", START, NOW, chunk, s3=s3))
        for chunk in (files[5:], files[:2], files[2:5])
    ]
    blobs = [p.to_bytes() for p in parts]
    merged = PartialState.from_bytes(blobs[0], model="m", start=START, end=NOW, source=registry)
    for blob in blobs[1:]:
        merged.merge(
            PartialState.from_bytes(blob, model="m", start=START, end=NOW, source=registry)
        )
    single = monitoring.run_monitoring(BUCKET, "m", START, NOW, s3=s3, now=NOW, write=False)
    report = monitoring.finish(BUCKET, merged.monitor, s3=s3, now=NOW, write=False)
    assert orjson.dumps(report) == orjson.dumps(single)
    with pytest.raises(PartialStateError):
        PartialState.from_bytes(
            blobs[0], model="m", start=START, end=NOW - timedelta(hours=1), source=registry
        )
    with pytest.raises(PartialStateError):
        PartialState.from_bytes(b"not a partial", model="m", start=START, end=NOW, source=registry)


def test_a_map_with_a_failed_batch_writes_no_report(
    s3: Any, fanned: Fanned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of version 2's files fail on every attempt: each is retried as the template
    says, the map fails (ToleratedFailurePercentage 0) after ResultWriter recorded every batch,
    the merge never runs, no report is written; a merge of those results is refused."""
    numeric_window(s3)
    fanned.fail = "-b"  # the traffic of version 2 (tag "b")
    planned = plan(fanned, "m", monkeypatch, 3)
    execution = fanned.finished(planned["execution_arn"])
    assert execution.status == "FAILED"
    assert execution.error == "States.ExceedToleratedFailureThreshold"
    assert not [c for c in fanned.calls if c.get("action") == "monitoring-merge"]
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="reports/m/").get("KeyCount", 0) == 0

    task = definition()["States"]["Partials"]["ItemProcessor"]["States"]["Partial"]
    failing = [c for c in fanned.calls if any("-b" in i["key"] for i in c.get("Items", []))]
    batches = {json.dumps(c["Items"]) for c in failing}
    assert len(failing) == len(batches) * (1 + task["Retry"][0]["MaxAttempts"])

    prefix = json.loads(execution.input)["results_prefix"] + "/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    (manifest_key,) = [k for k in keys if k.endswith("/manifest.json")]
    written = json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    (failed,) = written["ResultFiles"]["FAILED"]
    records = json.loads(s3.get_object(Bucket=BUCKET, Key=failed["Key"])["Body"].read())
    assert {r["Error"] for r in records} == {"StorageUnavailable"}
    assert len(records) == len(batches)
    merge = {
        "action": "monitoring-merge",
        **{k: planned[k] for k in ("model", "start", "end", "run")},
        "results": {"Bucket": BUCKET, "Key": manifest_key},
    }
    with pytest.raises(TreeserveError, match="failed items"):
        fanned.app.handler(merge, LambdaContext())


def test_small_windows_run_in_one_invocation(
    s3: Any, fanned: Fanned, monkeypatch: pytest.MonkeyPatch
) -> None:
    numeric_window(s3)
    monkeypatch.setenv("MONITORING_FANOUT_BYTES", str(10**9))
    summary = fanned.app.handler(
        {"model": "m", "start": START.isoformat(), "end": NOW.isoformat()}, LambdaContext()
    )
    assert summary["status"] == "ok"
    assert summary["rows"] == 19_500


@pytest.mark.parametrize(
    "event",
    [
        {
            "BatchInput": {
                "action": "monitoring-partial",
                "model": "m",
                "start": "2026-11-28T06:00:00Z",
                "end": "2026-11-29T06:00:00Z",
                "run": "r1",
            },
            "Items": [{"key": "registry/m/current.json", "size": 1}],
        },
        {
            "BatchInput": {
                "action": "monitoring-partial",
                "model": "m",
                "start": "2026-11-28T06:00:00Z",
                "end": "2026-11-29T06:00:00Z",
                "run": "r1",
            },
            "Items": [],
        },
        {
            "BatchInput": {
                "action": "monitoring-partial",
                "model": "m",
                "start": "x",
                "end": "2026-11-29T06:00:00Z",
                "run": "r1",
            },
            "Items": [{"key": "captures/m/a", "size": 1}],
        },
        {
            "BatchInput": {
                "action": "monitoring-partial",
                "model": "m",
                "start": "2026-11-28T06:00:00Z",
                "end": "2026-11-29T06:00:00Z",
                "run": "../x",
            },
            "Items": [{"key": "captures/m/a", "size": 1}],
        },
        {
            "action": "monitoring-merge",
            "model": "m",
            "start": "2026-11-28T06:00:00Z",
            "end": "2026-11-29T06:00:00Z",
            "run": "r1",
            "results": {"Bucket": "elsewhere", "Key": "monitoring/m/r1/x/manifest.json"},
        },
        {
            "action": "monitoring-merge",
            "model": "m",
            "start": "2026-11-28T06:00:00Z",
            "end": "2026-11-29T06:00:00Z",
            "run": "r1",
            "results": {"Bucket": BUCKET, "Key": "reports/m/manifest.json"},
        },
    ],
)
def test_fanout_events_are_checked(s3: Any, fanned: Fanned, event: dict[str, Any]) -> None:
    answer = fanned.app.handler(event, LambdaContext())
    assert answer["error"]["type"] == "bad_event"


def test_files_per_batch_targets_worker_bytes() -> None:
    files = [(f"k{i}", 10 * 1024 * 1024) for i in range(100)]
    assert fanout.files_per_batch(files) == fanout.WORKER_BYTES // (10 * 1024 * 1024)
    assert fanout.files_per_batch([("k", 10**12)]) == 1
    assert fanout.files_per_batch([(f"k{i}", 1) for i in range(5)]) == fanout.MAX_FILES_PER_BATCH


def test_the_definition_is_a_bounded_distributed_map() -> None:
    machine = definition()
    state = machine["States"][machine["StartAt"]]
    assert state["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"
    assert state["ItemReader"]["ReaderConfig"]["InputType"] == "JSON"
    assert state["ResultWriter"]["Resource"] == "arn:aws:states:::s3:putObject"
    assert 1 <= state["MaxConcurrency"] <= 1000
    assert state["ToleratedFailurePercentage"] == 0
    assert state["ItemBatcher"]["BatchInput"]["action"] == "monitoring-partial"
    task = state["ItemProcessor"]["States"][state["ItemProcessor"]["StartAt"]]
    assert task["ResultSelector"]["partial_key.$"] == "$.Payload.partial_key"
    merge = machine["States"][state["Next"]]
    for step in (task, merge):
        assert step["Resource"] == "arn:aws:states:::lambda:invoke"
        assert step["Retry"]
        assert all(r["MaxAttempts"] <= 3 for r in step["Retry"])
        assert step.get("End") is True
    assert merge["Parameters"]["Payload"]["action"] == "monitoring-merge"
    template = load_template(ROOT / "template.yaml")
    env = template.function("MonitoringFunction").environment
    name = template.resources["MonitoringMap"]["Properties"]["Name"]
    assert env["MONITORING_STATE_MACHINE_ARN"].endswith(
        ":stateMachine:" + str(template.resolve(name))
    )


def _run_locally(s3: Any, machine: dict[str, Any], execution_input: dict[str, Any]) -> Execution:
    """One execution of ``machine`` on the local runner, every Lambda task answering {}."""
    served = {"M": StateMachineDef("M", "m", "arn:aws:states:us-east-1:1:stateMachine:m", machine)}
    service = LocalStepFunctions(served, LocalRunner(lambda arn, payload: {}, s3, retry_scale=0))
    execution = service.start_execution(served["M"].arn, None, json.dumps(execution_input))
    assert execution.done.wait(60)
    return execution


@pytest.mark.parametrize(
    ("manifest", "per_batch", "error"),
    [
        (b'{"key": "captures/m/a"}', 1, "States.ItemReaderFailed"),  # not a JSON array
        (b"[{not json", 1, "States.ItemReaderFailed"),
        (None, 1, "States.ItemReaderFailed"),  # no such object
        (b"[]", 0, "States.Runtime"),  # MaxItemsPerBatchPath must name a positive integer
        (b"[]", "3", "States.Runtime"),
    ],
)
def test_the_runner_fails_the_map_as_step_functions_does(
    s3: Any, manifest: bytes | None, per_batch: Any, error: str
) -> None:
    key = "monitoring/m/r1/files.json"
    if manifest is not None:
        s3.put_object(Bucket=BUCKET, Key=key, Body=manifest)
    execution_input = {
        "model": "m",
        "start": START.isoformat(),
        "end": NOW.isoformat(),
        "run": "r1",
        "manifest_key": key,
        "results_prefix": "monitoring/m/r1/results",
        "files_per_batch": per_batch,
    }
    execution = _run_locally(s3, definition(), execution_input)
    assert execution.status == "FAILED"
    assert execution.error == error, execution.cause


def test_the_runner_refuses_fields_the_states_language_lacks(s3: Any) -> None:
    """Step Functions refuses a definition with an unknown field at CreateStateMachine; the
    local runner fails the execution naming it, so a misspelt field never passes locally."""
    machine = definition()
    task = machine["States"]["Partials"]["ItemProcessor"]["States"]["Partial"]
    task["OutputSelector"] = task.pop("ResultSelector")
    s3.put_object(Bucket=BUCKET, Key="monitoring/m/r1/files.json", Body=b'[{"key": "k"}]')
    execution = _run_locally(
        s3,
        machine,
        {
            "model": "m",
            "start": START.isoformat(),
            "end": NOW.isoformat(),
            "run": "r1",
            "manifest_key": "monitoring/m/r1/files.json",
            "results_prefix": "monitoring/m/r1/results",
            "files_per_batch": 1,
        },
    )
    assert execution.status == "FAILED"
    assert execution.error == "States.ExceedToleratedFailureThreshold"  # the one child failed
    prefix = "monitoring/m/r1/results/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    (failed_key,) = [k for k in keys if k.endswith("/FAILED_0.json")]
    (record,) = json.loads(s3.get_object(Bucket=BUCKET, Key=failed_key)["Body"].read())
    assert record["Error"] == "States.Runtime"
    assert "OutputSelector" in record["Cause"]
