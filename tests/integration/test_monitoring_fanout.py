"""Monitoring fanned out over the MonitoringMap state machine: the report of merged partial
states is the report of one run over the window, number for number.

The Distributed Map is driven from template.yaml's own definition (ItemReader, ItemBatcher,
the worker Task's Payload and OutputSelector, ResultWriter, the merge Task), with the events
and ResultWriter files in the shapes Step Functions documents; every step is the monitoring
function's handler."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta
from typing import Any

import boto3
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
from treeserve.model.manifest import ModelManifest
from treeserve.model.reference import compute_reference
from treeserve.monitoring import fanout
from treeserve.monitoring import pipeline as monitoring
from treeserve.monitoring.partial import PartialState, PartialStateError
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
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


# --- the map, as template.yaml's definition describes it ----------------------------------------


def definition() -> dict[str, Any]:
    """MonitoringMap's definition with its DefinitionSubstitutions applied (local names)."""
    template = load_template(ROOT / "template.yaml")
    props = template.resources["MonitoringMap"]["Properties"]
    text = json.dumps(props["Definition"])
    for name, value in props["DefinitionSubstitutions"].items():
        resolved = BUCKET if name == "ModelBucket" else str(template.resolve(value))
        text = text.replace("${" + name + "}", resolved)
    return dict(json.loads(text))


def path(document: Any, reference: str) -> Any:
    """A JSONPath of the simple kind the definition uses ($, $.a.b)."""
    assert reference.startswith("$"), reference
    for part in [p for p in reference[1:].split(".") if p]:
        document = document[part]
    return document


def parameters(template: dict[str, Any], document: Any) -> dict[str, Any]:
    """Parameters with "key.$" paths resolved against ``document``."""
    out: dict[str, Any] = {}
    for key, value in template.items():
        if key.endswith(".$"):
            out[key[:-2]] = path(document, value)
        elif isinstance(value, dict):
            out[key] = parameters(value, document)
        else:
            out[key] = value
    return out


def invoke(app: Any, task: dict[str, Any]) -> dict[str, Any]:
    """lambda:invoke as a Task state calls it (``task``: its resolved Parameters): the
    function's answer under Payload."""
    assert task["FunctionName"].endswith(":function:treeserve-monitoring") or task["FunctionName"]
    answer = app.handler(json.loads(json.dumps(task["Payload"])), LambdaContext())
    assert "error" not in answer, answer
    return {"Payload": answer, "StatusCode": 200}


def run_map(
    s3: Any, app: Any, execution_input: dict[str, Any], *, fail_one: bool = False
) -> dict[str, Any]:
    """One MonitoringMap execution: the Distributed Map's workers, ResultWriter, the merge."""
    machine = definition()
    state = machine["States"][machine["StartAt"]]
    assert state["Type"] == "Map"
    assert state["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    reader = parameters(state["ItemReader"]["Parameters"], execution_input)
    items = orjson.loads(s3.get_object(Bucket=reader["Bucket"], Key=reader["Key"])["Body"].read())
    batcher = state["ItemBatcher"]
    size = path(execution_input, batcher["MaxItemsPerBatchPath"])
    batch_input = parameters(batcher["BatchInput"], execution_input)
    processor = state["ItemProcessor"]
    task = processor["States"][processor["StartAt"]]
    run_id = str(uuid.uuid4())
    map_run = f"arn:aws:states:us-east-1:123456789012:mapRun:monitoring-map/Partials:{run_id}"
    results = []
    for i in range(0, len(items), size):
        child_input = {"Items": items[i : i + size], "BatchInput": batch_input}
        answer = invoke(app, parameters(task["Parameters"], child_input))
        output = parameters(task["OutputSelector"], answer)
        results.append(
            {
                "ExecutionArn": f"{map_run}:{i}",
                "Input": json.dumps(child_input),
                "InputDetails": {"Included": True},
                "Name": str(i),
                "Output": json.dumps(output),
                "OutputDetails": {"Included": True},
                "RedriveCount": 0,
                "RedriveStatus": "NOT_REDRIVABLE",
                "StartDate": "2026-11-29T06:00:00.000Z",
                "StateMachineArn": "arn:aws:states:us-east-1:123456789012:stateMachine:x",
                "Status": "SUCCEEDED",
                "StopDate": "2026-11-29T06:00:01.000Z",
            }
        )
    writer = parameters(state["ResultWriter"]["Parameters"], execution_input)
    prefix = f"{writer['Prefix']}/{run_id}/"
    s3.put_object(
        Bucket=writer["Bucket"], Key=prefix + "SUCCEEDED_0.json", Body=json.dumps(results)
    )
    failed = []
    if fail_one:
        s3.put_object(Bucket=writer["Bucket"], Key=prefix + "FAILED_0.json", Body=b"[]")
        failed = [{"Key": prefix + "FAILED_0.json", "Size": 2}]
    manifest = {
        "DestinationBucket": writer["Bucket"],
        "MapRunArn": map_run,
        "ResultFiles": {
            "FAILED": failed,
            "PENDING": [],
            "SUCCEEDED": [{"Key": prefix + "SUCCEEDED_0.json", "Size": len(json.dumps(results))}],
        },
    }
    s3.put_object(Bucket=writer["Bucket"], Key=prefix + "manifest.json", Body=json.dumps(manifest))
    map_output = {
        "MapRunArn": map_run,
        "ResultWriterDetails": {"Bucket": writer["Bucket"], "Key": prefix + "manifest.json"},
    }
    document = {**execution_input, state["ResultPath"][2:]: map_output}
    merge = machine["States"][state["Next"]]
    answer = invoke(app, parameters(merge["Parameters"], document))
    return dict(path(answer, merge["OutputPath"]))


@pytest.fixture
def fanned(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The function's environment with fan-out on from the first byte, and the state machine
    created in moto from the template's definition."""
    sfn = boto3.client("stepfunctions", region_name="us-east-1")
    arn = sfn.create_state_machine(
        name="monitoring-map",
        definition=json.dumps(definition()),
        roleArn="arn:aws:iam::123456789012:role/monitoring-map",
    )["stateMachineArn"]
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("MONITORING_FANOUT_BYTES", "1")
    monkeypatch.setenv("MONITORING_STATE_MACHINE_ARN", arn)
    monkeypatch.delenv("NOTIFICATION_TOPIC_ARN", raising=False)
    return sfn


def statistics(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in VOLATILE}


@pytest.mark.parametrize("name", ["m", "c"])
@pytest.mark.parametrize("per_batch", [1, 3, 100])
def test_fanned_out_report_equals_the_single_run(
    s3: Any, fanned: Any, name: str, per_batch: int
) -> None:
    WINDOWS[name](s3)
    single = monitoring.run_monitoring(BUCKET, name, START, NOW, s3=s3, now=NOW, write=False)
    assert single["rows"] > 0

    app = load_app()
    planned = app.handler(
        {"model": name, "start": START.isoformat(), "end": NOW.isoformat()}, LambdaContext()
    )
    assert planned["status"] == "fanned out"
    execution = fanned.describe_execution(executionArn=planned["execution_arn"])
    execution_input = json.loads(execution["input"])
    assert execution_input["manifest_key"] == planned["manifest_key"]
    listed = monitoring.window_files(s3, BUCKET, name, START, NOW)
    manifest = orjson.loads(
        s3.get_object(Bucket=BUCKET, Key=planned["manifest_key"])["Body"].read()
    )
    assert [(i["key"], i["size"]) for i in manifest] == listed
    execution_input["files_per_batch"] = per_batch  # several workers (the planner sizes by bytes)

    summary = run_map(s3, app, execution_input)
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


def test_a_map_with_failed_items_is_not_merged(s3: Any, fanned: Any) -> None:
    numeric_window(s3)
    app = load_app()
    planned = app.handler(
        {"model": "m", "start": START.isoformat(), "end": NOW.isoformat()}, LambdaContext()
    )
    execution_input = json.loads(
        fanned.describe_execution(executionArn=planned["execution_arn"])["input"]
    )
    with pytest.raises(Exception, match="failed items"):
        run_map(s3, app, execution_input, fail_one=True)


def test_small_windows_run_in_one_invocation(
    s3: Any, fanned: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    numeric_window(s3)
    monkeypatch.setenv("MONITORING_FANOUT_BYTES", str(10**9))
    app = load_app()
    summary = app.handler(
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
def test_fanout_events_are_checked(s3: Any, fanned: Any, event: dict[str, Any]) -> None:
    answer = load_app().handler(event, LambdaContext())
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
