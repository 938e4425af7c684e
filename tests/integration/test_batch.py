"""Batch scoring: template.yaml's state machine run by the local runner, driven by the CLI, on moto.

A real categorical XGBoost classifier (scikit-learn API, trained on a pandas DataFrame) is
promoted through the refresh function; a job over CSV and JSON Lines objects (category values
as strings, ids given and generated, a malformed object, an object of unknown format) is
submitted with ``treeserve batch submit --wait``, which starts the execution through boto3's
Step Functions client against :class:`treeserve_cli.stepfunctions.StepFunctionsEndpoint`. The
outputs must equal the model's own ``predict_proba`` / ``predict`` on the same DataFrame, row
for row; the malformed object is reported with its reason and the others scored.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from tests.conftest import EVENTS, ROOT, LambdaContext
from tests.corpus import file_member, tar_gz
from treeserve_cli.invoke import invoke
from treeserve_cli.template import Template, load_template

pytestmark = pytest.mark.integration

PLANS = ["gold", "silver", "bronze"]
REGIONS = ["north", "south"]
MODEL = "default"


def frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "usage": rng.normal(size=n).round(4),
            "plan": pd.Categorical(rng.choice(PLANS, n), categories=PLANS),
            "region": pd.Categorical(rng.choice(REGIONS, n), categories=REGIONS),
            "tenure": rng.integers(0, 60, n).astype(float),
        }
    )
    df.loc[rng.random(n) < 0.1, "usage"] = np.nan
    return df


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def model() -> xgb.XGBClassifier:
    df = frame(500, 0)
    y = (df["usage"].fillna(0) + 1.2 * (df["plan"] == "gold") - (df["region"] == "south")) > 0
    return xgb.XGBClassifier(n_estimators=12, max_depth=3, enable_categorical=True).fit(
        df, y.astype(int)
    )


def _promote(template: Template, s3: Any, model: xgb.XGBClassifier) -> None:
    bucket = template.bucket_name()
    key = f"incoming/{MODEL}/model.tar.gz"
    body = tar_gz([file_member("model.ubj", bytes(model.get_booster().save_raw("ubj")))])
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    head = s3.head_object(Bucket=bucket, Key=key)
    event = json.loads((EVENTS / "s3-put-incoming.json").read_text())
    event["Records"][0]["s3"]["object"].update(
        {"key": key, "eTag": head["ETag"].strip('"'), "size": head["ContentLength"]}
    )
    result = invoke(template, "RefreshFunction", event, fresh=True)
    assert result.ok, result.error
    assert result.payload["outcomes"][0]["status"] == "promoted", result.payload


@pytest.fixture
def world(template: Template, model: xgb.XGBClassifier) -> Iterator[Any]:
    from moto import mock_aws

    from treeserve.aws import reset_clients, s3_client

    reset_clients()
    with mock_aws():
        s3 = s3_client()
        s3.create_bucket(Bucket=template.bucket_name())
        _promote(template, s3, model)
        yield s3
    reset_clients()


def csv_text(df: pd.DataFrame, ids: list[str] | None = None) -> bytes:
    out = df.copy()
    if ids is not None:
        out.insert(0, "id", ids)
    return out.to_csv(index=False).encode()


def jsonl_text(df: pd.DataFrame, ids: list[Any]) -> bytes:
    lines = []
    for rid, row in zip(ids, df.to_dict(orient="records"), strict=True):
        record = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        if rid is not None:
            record["id"] = rid
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def read_csv_output(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def check_rows(
    model: xgb.XGBClassifier, df: pd.DataFrame, rows: list[dict[str, Any]], ids: list[str]
) -> None:
    assert [str(r["id"]) for r in rows] == ids
    got = np.array([float(r["prediction"]) for r in rows], dtype=np.float32)
    expected = model.predict_proba(df)[:, 1].astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [int(r["label"]) for r in rows] == model.predict(df).tolist()


def test_a_job_scores_every_object_as_the_model_predicts_and_reports_the_malformed_one(
    world: Any,
    template: Template,
    model: xgb.XGBClassifier,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from treeserve_cli.cli import main
    from treeserve_cli.local import context_for, load_handler
    from treeserve_cli.stepfunctions import (
        LocalRunner,
        LocalStepFunctions,
        StepFunctionsEndpoint,
        function_arns,
        state_machines,
    )

    bucket = template.bucket_name()
    job = "job-1"
    prefix = f"batch/{MODEL}/{job}/input/"
    a, b, c = frame(40, 1), frame(25, 2), frame(30, 3)
    a_ids = [f"cust-{i}" for i in range(len(a))]
    b_ids: list[Any] = [f"j{i}" if i % 2 else None for i in range(len(b))]
    bad = frame(5, 4)
    bad_text = csv_text(bad).replace(b"gold", b"platinum", 1)  # a category the model never saw
    objects = {
        "a.csv": csv_text(a, a_ids),
        "nested/b.jsonl": jsonl_text(b, b_ids),
        "c.csv": csv_text(c),
        "bad.csv": bad_text,
        "notes.txt": b"not a table\n",
    }
    for name, body in objects.items():
        world.put_object(Bucket=bucket, Key=prefix + name, Body=body)

    # The local runner on the template's definition, its Lambda tasks the template's handler.
    functions = template.functions()
    by_arn = function_arns(template)
    handlers: dict[str, Any] = {}

    def call(arn: str, payload: Any) -> Any:
        fn = functions[by_arn[arn]]
        handler = handlers.setdefault(fn.logical_id, load_handler(fn, fn.environment))
        return handler(payload, context_for(fn))

    machines = state_machines(template)
    service = LocalStepFunctions(machines, LocalRunner(call, world, retry_scale=0))
    endpoint = StepFunctionsEndpoint(service, "127.0.0.1", 0)
    endpoint.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SFN", endpoint.url)
        monkeypatch.setenv("MODEL_BUCKET", bucket)
        arn = machines["BatchStateMachine"].arn
        code = main(["batch", "submit", prefix, "--name", MODEL, "--wait", "--state-machine", arn])
        printed = capsys.readouterr().out
        assert code == 2, printed  # two objects failed: exit 2, the rest scored
        assert main(["batch", "status", job, "--json", "--state-machine", arn]) == 0
        status = json.loads(capsys.readouterr().out)
    finally:
        endpoint.stop()

    manifest = status["manifest"]
    assert status["execution"]["status"] == "SUCCEEDED"
    assert manifest["status"] == "completed_with_failures"
    assert manifest["version"] == 1
    assert manifest["requested"] == "champion"
    assert len(manifest["sha256"]) == 64
    assert manifest["objects"] == 5
    assert manifest["objects_scored"] == 3
    assert manifest["rows"] == len(a) + len(b) + len(c)
    reasons = {f["key"].removeprefix(prefix): f["reason"] for f in manifest["failures"]}
    assert set(reasons) == {"bad.csv", "notes.txt"}
    assert "platinum" in reasons["bad.csv"]
    assert "unknown format" in reasons["notes.txt"]
    assert manifest["timings"]["seconds"] is not None

    out = f"batch/{MODEL}/{job}/output/"

    def output(name: str) -> bytes:
        return bytes(world.get_object(Bucket=bucket, Key=out + name)["Body"].read())

    check_rows(model, a, read_csv_output(output("a.csv")), a_ids)
    check_rows(
        model, c, read_csv_output(output("c.csv")), [f"{prefix}c.csv:{i}" for i in range(len(c))]
    )
    b_rows = [json.loads(line) for line in output("nested/b.jsonl").splitlines()]
    generated = [
        rid if rid is not None else f"{prefix}nested/b.jsonl:{i}" for i, rid in enumerate(b_ids)
    ]
    check_rows(model, b, b_rows, generated)
    listed = world.list_objects_v2(Bucket=bucket, Prefix=out).get("Contents", [])
    assert sorted(o["Key"].removeprefix(out) for o in listed) == [
        "a.csv",
        "c.csv",
        "nested/b.jsonl",
    ]

    # The ResultWriter output, as Step Functions writes it, beside the job.
    results = manifest["results_key"]
    assert results.startswith(f"batch/{MODEL}/{job}/results/")
    assert results.endswith("/manifest.json")
    written = json.loads(world.get_object(Bucket=bucket, Key=results)["Body"].read())
    assert written["DestinationBucket"] == bucket
    assert ":mapRun:" in written["MapRunArn"]
    (succeeded,) = written["ResultFiles"]["SUCCEEDED"]
    children = json.loads(world.get_object(Bucket=bucket, Key=succeeded["Key"])["Body"].read())
    assert {c["Status"] for c in children} == {"SUCCEEDED"}
    batches = [json.loads(c["Input"]) for c in children]
    assert all(set(batch) == {"Items", "BatchInput"} for batch in batches)
    assert sum(len(batch["Items"]) for batch in batches) == 5
    assert all(len(batch["Items"]) <= 8 for batch in batches)  # the template's MaxItemsPerBatch


def job_spec(world: Any, template: Template) -> dict[str, Any]:
    from treeserve.batch.jobs import resolve_job
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    registry = ModelRegistry(S3RegistryStore(template.bucket_name(), world), MODEL)
    return resolve_job(registry, "unit").to_dict()


def test_the_worker_takes_the_documented_batch_shape_and_retries_storage_errors(
    world: Any, template: Template, model: xgb.XGBClassifier
) -> None:
    """The event Step Functions sends a Lambda task for a batch of listObjectsV2 items."""
    from treeserve.errors import StorageUnavailable
    from treeserve_cli.invoke import environment as env_block
    from treeserve_cli.invoke import import_handler, runtime_environment

    bucket = template.bucket_name()
    df = frame(12, 5)
    key = f"batch/{MODEL}/unit/input/x.csv"
    world.put_object(Bucket=bucket, Key=key, Body=csv_text(df))
    head = world.head_object(Bucket=bucket, Key=key)
    fn = template.function("BatchFunction")
    with env_block(runtime_environment(fn, {**fn.environment, "BATCH_CHUNK_ROWS": "5"})):
        handler = import_handler(fn.code_uri, fn.handler, fresh=True)
    item = {
        "Etag": head["ETag"],
        "Key": key,
        "LastModified": int(head["LastModified"].timestamp()),
        "Size": head["ContentLength"],
        "StorageClass": "STANDARD",
    }
    event = {"Items": [item], "BatchInput": {"job": job_spec(world, template)}}
    result = handler(copy.deepcopy(event), LambdaContext())
    (obj,) = result["objects"]
    assert obj["status"] == "scored", obj
    assert obj["rows"] == 12
    rows = read_csv_output(world.get_object(Bucket=bucket, Key=obj["output_key"])["Body"].read())
    check_rows(model, df, rows, [f"{key}:{i}" for i in range(12)])  # chunks of 5 rows: 5, 5, 2

    # The object replaced after the listing (its ETag no longer matches): reported, not mixed.
    world.put_object(Bucket=bucket, Key=key, Body=csv_text(frame(3, 6)))
    (changed,) = handler(copy.deepcopy(event), LambdaContext())["objects"]
    assert changed["status"] == "failed"
    assert "replaced" in changed["reason"]

    # A pinned sha256 that is not the version's: the batch fails (no silent other model).
    wrong = copy.deepcopy(event)
    wrong["BatchInput"]["job"]["sha256"] = "0" * 64
    with pytest.raises(Exception, match="pinned"):
        handler(wrong, LambdaContext())

    # S3 unreachable: the invocation raises StorageUnavailable, which the template retries.
    gone = copy.deepcopy(event)
    gone["Items"][0]["Etag"] = None
    from treeserve.batch import stream

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StorageUnavailable("S3 is unavailable; retry")

    original = stream.S3RangeReader.pieces
    stream.S3RangeReader.pieces = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(StorageUnavailable):
            handler(gone, LambdaContext())
    finally:
        stream.S3RangeReader.pieces = original  # type: ignore[method-assign]
    retry = template_definition(template)["States"]["ScoreObjects"]["ItemProcessor"]
    retriers = retry["States"]["ScoreBatch"]["Retry"]
    assert any("StorageUnavailable" in r["ErrorEquals"] for r in retriers)


def template_definition(template: Template) -> dict[str, Any]:
    from treeserve_cli.stepfunctions import state_machines

    return state_machines(template)["BatchStateMachine"].definition


def test_the_state_machine_is_a_bounded_distributed_map_with_least_privilege(
    template: Template,
) -> None:
    definition = template_definition(template)
    assert set(definition["States"]) == {"ScoreObjects", "WriteManifest"}
    score = definition["States"]["ScoreObjects"]
    assert score["Type"] == "Map"
    assert score["ItemProcessor"]["ProcessorConfig"] == {
        "Mode": "DISTRIBUTED",
        "ExecutionType": "STANDARD",
    }
    assert score["ItemReader"]["Resource"] == "arn:aws:states:::s3:listObjectsV2"
    assert score["ItemReader"]["Parameters"]["Bucket"] == template.bucket_name()
    assert score["ItemReader"]["Parameters"]["Prefix.$"] == "$.input_prefix"
    batcher = score["ItemBatcher"]
    assert 1 <= batcher["MaxItemsPerBatch"] <= 100
    assert batcher["MaxInputBytesPerBatch"] <= 256 * 1024
    assert batcher["BatchInput"] == {"job.$": "$.job"}
    assert isinstance(score["MaxConcurrency"], int)
    assert 1 <= score["MaxConcurrency"] <= 100
    assert 0 <= score["ToleratedFailurePercentage"] < 100
    assert score["ResultWriter"]["Resource"] == "arn:aws:states:::s3:putObject"
    assert score["ResultWriter"]["Parameters"]["Prefix.$"] == "$.results_prefix"
    assert score["Catch"][0]["Next"] == score["Next"] == "WriteManifest"
    task = score["ItemProcessor"]["States"]["ScoreBatch"]
    arn = template.get_att("BatchFunction", "Arn")
    assert task["Resource"] == "arn:aws:states:::lambda:invoke"
    assert task["Parameters"]["FunctionName"] == arn
    assert task["Retry"][0]["MaxAttempts"] <= 5
    assert definition["States"]["WriteManifest"]["Parameters"]["FunctionName"] == arn

    from treeserve.batch.jobs import input_prefix, results_prefix

    assert input_prefix("m", "j") == "batch/m/j/input/"
    assert results_prefix("m", "j") == "batch/m/j/results"

    machine = template.resources_of_type("AWS::Serverless::StateMachine")["BatchStateMachine"]
    statements = [s for policy in machine["Policies"] for s in policy["Statement"]]
    by_sid = {s["Sid"]: s for s in statements}
    bucket_arn = f"arn:aws:s3:::{template.bucket_name()}"
    for s in statements:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert all("*" not in a for a in actions), s
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        assert "*" not in resources, s
    assert by_sid["InvokeBatchWorker"]["Action"] == "lambda:InvokeFunction"
    assert by_sid["InvokeBatchWorker"]["Resource"] == [arn, f"{arn}:*"]
    assert by_sid["ListBatchInputs"]["Resource"] == bucket_arn
    assert by_sid["ListBatchInputs"]["Condition"] == {"StringLike": {"s3:prefix": ["batch/*"]}}
    assert by_sid["ReadWriteBatchResults"]["Resource"] == f"{bucket_arn}/batch/*"
    name = machine["Name"]
    assert by_sid["RunMapChildExecutions"]["Resource"].endswith(f":stateMachine:{name}")
    for resource in by_sid["WatchMapChildExecutions"]["Resource"]:
        assert f":execution:{name}" in resource
    # The worker reads the registry and writes only under batch/.
    fn = template.function("BatchFunction")
    assert fn.memory_size <= 1024
    assert fn.timeout <= 900
    worker = {s["Sid"]: s for p in fn.properties["Policies"] for s in p["Statement"]}
    assert worker["ReadWriteBatch"]["Resource"] == f"{bucket_arn}/batch/*"
    assert worker["ReadRegistry"]["Action"] == "s3:GetObject"


def test_a_batch_whose_retries_run_out_is_reported_and_past_the_tolerance_fails_the_job(
    world: Any,
    template: Template,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """9 objects: two batches (MaxItemsPerBatch 8). The batch holding boom.csv fails on every
    attempt (S3 unavailable): it is retried as the template says, then FAILED; 1 of 2 batches is
    past the 10 % tolerated, so the map fails, the manifest still lists every object (scored, or
    failed with the batch's error), and the execution fails."""
    from treeserve.errors import StorageUnavailable
    from treeserve_cli.cli import main
    from treeserve_cli.local import context_for, load_handler
    from treeserve_cli.stepfunctions import (
        LocalRunner,
        LocalStepFunctions,
        StepFunctionsEndpoint,
        function_arns,
        state_machines,
    )

    bucket = template.bucket_name()
    job = "flaky"
    prefix = f"batch/{MODEL}/{job}/input/"
    names = [f"part-{i}.csv" for i in range(8)] + ["z/boom.csv"]
    for name in names:
        world.put_object(Bucket=bucket, Key=prefix + name, Body=csv_text(frame(3, 9)))
    functions, by_arn = template.functions(), function_arns(template)
    attempts: list[list[str]] = []

    def call(arn: str, payload: Any) -> Any:
        fn = functions[by_arn[arn]]
        keys = [item["Key"] for item in payload.get("Items", [])]
        if any(k.endswith("boom.csv") for k in keys):
            attempts.append(keys)
            raise StorageUnavailable("S3 is unavailable; retry")
        return load_handler(fn, fn.environment)(payload, context_for(fn))

    machines = state_machines(template)
    service = LocalStepFunctions(machines, LocalRunner(call, world, retry_scale=0))
    endpoint = StepFunctionsEndpoint(service, "127.0.0.1", 0)
    endpoint.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SFN", endpoint.url)
        monkeypatch.setenv("MODEL_BUCKET", bucket)
        arn = machines["BatchStateMachine"].arn
        code = main(["batch", "submit", prefix, "--wait", "--state-machine", arn])
        printed = capsys.readouterr().out
        assert code == 2, printed
        assert main(["batch", "status", job, "--json", "--state-machine", arn]) == 0
        status = json.loads(capsys.readouterr().out)
    finally:
        endpoint.stop()

    retry = template_definition(template)["States"]["ScoreObjects"]["ItemProcessor"]
    max_attempts = retry["States"]["ScoreBatch"]["Retry"][0]["MaxAttempts"]
    assert len(attempts) == 1 + max_attempts  # the first try and every retry
    assert status["execution"]["status"] == "FAILED"
    assert status["execution"]["error"] == "JobFailed"
    manifest = status["manifest"]
    assert manifest["status"] == "failed"
    assert manifest["error"]["Error"] == "States.ExceedToleratedFailureThreshold"
    assert manifest["objects"] == len(names)  # none lost
    failed = {f["key"].removeprefix(prefix): f["reason"] for f in manifest["failures"]}
    # The failed batch's objects (the listing is in key order: boom.csv is the second batch).
    assert set(failed) == {k.removeprefix(prefix) for k in attempts[0]} == {"z/boom.csv"}
    for reason in failed.values():
        assert "StorageUnavailable" in reason
        assert "retries" in reason
    assert manifest["objects_scored"] == len(names) - len(failed)
