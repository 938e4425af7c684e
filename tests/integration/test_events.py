"""Every event in events/ through the template's own wiring (`treeserve invoke`'s path), on moto.

The folder is enumerated: an event file without an expectation here fails the suite. The model
the events are written for is tests/conftest.py's ``train()`` default (6 features f0..f5), as
events/README.md says. The bucket is the one template.yaml names, resolved locally.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import EVENTS, ROOT, TrainedModel, train
from treeserve.serving.capture import wait_for_writes
from treeserve_cli.invoke import InvokeResult, invoke
from treeserve_cli.template import Template, load_template

pytestmark = pytest.mark.integration

N_ROWS = 2  # rows in the predict events


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(result: InvokeResult) -> Response:
    assert result.ok, result.error
    payload = result.payload
    body = payload.get("body") or ""
    raw = base64.b64decode(body) if payload.get("isBase64Encoded") else body.encode()
    headers = {k.lower(): v for k, v in (payload.get("headers") or {}).items()}
    for k, values in (payload.get("multiValueHeaders") or {}).items():
        headers.setdefault(k.lower(), values[0])
    return Response(int(payload["statusCode"]), headers, raw)


def predicted(n: int) -> Callable[[Response], None]:
    def check(r: Response) -> None:
        assert r.status == 200, r.body
        body = r.json()
        assert body["model"] == {"name": "default", "version": 1, "alias": "champion"}
        assert len(body["predictions"]) == n
        assert all(0.0 <= p <= 1.0 for p in body["predictions"])  # binary: probabilities
        assert len(body["labels"]) == n
        assert r.headers["x-model-version"] == "1"

    return check


def csv_predicted(r: Response) -> None:
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("text/csv")
    lines = [line for line in r.body.decode().splitlines() if line]
    assert len(lines) == N_ROWS + 1  # header + rows


def explained(r: Response) -> None:
    assert r.status == 200, r.body
    text = json.dumps(r.json())
    for name in ("f0", "f5"):
        assert name in text


def healthy(r: Response) -> None:
    assert r.status == 200, r.body
    assert r.headers["x-model-version"] == "1"


def model_card(r: Response) -> None:
    assert r.status == 200, r.body
    text = json.dumps(r.json())
    assert all(f"f{i}" in text for i in range(6))
    assert "sha256" in text


def docs(r: Response) -> None:
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    assert b"openapi.json" in r.body


def openapi(r: Response) -> None:
    assert r.status == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    assert {"/predict", "/explain", "/health", "/model"} <= set(spec["paths"])
    assert {
        "/models",
        "/models/{name}",
        "/models/{name}/predict",
        "/models/{name}/versions/{version}/explain",
    } <= set(spec["paths"])


def not_found(r: Response) -> None:
    assert r.status == 404, r.body
    assert r.status < 500


def error(status: int, kind: str | None = None) -> Callable[[Response], None]:
    def check(r: Response) -> None:
        assert r.status == status, r.body
        err = r.json()["error"]
        assert err["message"]
        if kind is not None:
            assert err["type"] == kind

    return check


API: dict[str, Callable[[Response], None]] = {
    "apigw-v2-predict-rows.json": predicted(N_ROWS),
    "apigw-v2-predict-records.json": predicted(N_ROWS),
    "apigw-v2-predict-csv.json": predicted(N_ROWS),
    "apigw-v2-predict-accept-csv.json": csv_predicted,
    "apigw-v2-predict-base64-no-content-type.json": predicted(N_ROWS),
    "apigw-v2-explain.json": explained,
    "apigw-v2-health.json": healthy,
    "apigw-v2-model.json": model_card,
    "apigw-v2-docs.json": docs,
    "apigw-v2-openapi.json": openapi,
    "apigw-v2-predict-malformed-body.json": error(400, "malformed_body"),
    "apigw-v2-predict-too-many-columns.json": error(422, "input_mismatch"),
    "apigw-v2-predict-unsupported-media.json": error(415, "unsupported_media_type"),
    "apigw-v2-unknown-route.json": not_found,
    "apigw-v2-predict-by-name.json": predicted(N_ROWS),
    "apigw-v2-predict-unknown-model.json": error(404, "not_found"),
    "apigw-v1-rest-predict.json": predicted(N_ROWS),
    "function-url-predict.json": predicted(N_ROWS),
}

# Refresh events: the key each one names (uploaded before invoking) and the expected answer.
REFRESH: dict[str, str | None] = {
    "s3-put-incoming.json": "incoming/default/model.ubj",
    "sqs-s3-put-incoming.json": "incoming/default/model-sqs.ubj",
    "eventbridge-object-created.json": "incoming/default/model-eventbridge.ubj",
    "s3-test-event.json": None,
    "s3-put-incoming-pickle.json": "incoming/default/model.pkl",
}
# Uploads that must be refused (the object uploaded is a pickle), by event file.
REFUSED = {"s3-put-incoming-pickle.json": "pickle"}

MONITORING = (
    "monitoring-scheduled.json",
    "monitoring-direct.json",
    "monitoring-direct-bad-window.json",
)
# MonitoringMap's steps (a long window's fan-out): the worker's batch, then the merge.
FANOUT = ("monitoring-map-partial.json", "monitoring-map-merge.json")

# Batch events: each object the event lists, uploaded before invoking (6 features f0..f5).
BATCH = {
    "batch-map-items.json": {
        "batch/default/events/input/rows.csv": b"id,f0,f1,f2,f3,f4,f5\na,0.1,0.2,0.3,0.4,0.5,0.6\n"
        b"b,-1,,2,0,1,-0.5\n",
        "batch/default/events/input/records.jsonl": b'{"id": 7, "f0": 1.5, "f3": -2}\n'
        b'{"f0": 0.0, "f1": 1, "f2": 2, "f3": 3, "f4": 4, "f5": null}\n',
    }
}


def test_every_event_file_has_an_expectation() -> None:
    files = {p.name for p in EVENTS.glob("*.json")}
    expected = set(API) | set(REFRESH) | set(MONITORING) | set(FANOUT) | set(BATCH)
    assert files == expected, (
        f"without expectation: {sorted(files - expected)}; missing: {sorted(expected - files)}"
    )


def test_events_readme_documents_the_model() -> None:
    readme = (EVENTS / "README.md").read_text()
    assert "f0" in readme
    assert "f5" in readme
    for name in API | REFRESH:
        assert name in readme, name
    for name in (*MONITORING, *FANOUT, *BATCH):
        assert name in readme, name


# --- the stack: moto with the template's bucket, a model promoted through refresh -------------


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    return train("binary:logistic")


def load_event(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


def upload(s3: Any, bucket: str, key: str, data: bytes) -> tuple[str, int]:
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    head = s3.head_object(Bucket=bucket, Key=key)
    return head["ETag"].strip('"'), int(head["ContentLength"])


def with_real_object(event: Any, key: str, etag: str, size: int) -> Any:
    """The event as S3 would send it for the object the test uploaded (real eTag and size)."""
    text = json.dumps(event)
    if "Records" in event and "body" in event["Records"][0]:
        body = json.loads(event["Records"][0]["body"])
        body["Records"][0]["s3"]["object"].update({"eTag": etag, "size": size})
        event["Records"][0]["body"] = json.dumps(body)
        return event
    if "detail" in event:
        event["detail"]["object"].update({"etag": etag, "size": size})
        return event
    event = json.loads(text)
    event["Records"][0]["s3"]["object"].update({"eTag": etag, "size": size})
    return event


@pytest.fixture
def stack(aws: None, template: Template) -> Any:
    from treeserve.aws import s3_client

    s3 = s3_client()
    s3.create_bucket(Bucket=template.bucket_name())
    return s3


def promote_through_refresh(template: Template, s3: Any, model: TrainedModel) -> dict[str, Any]:
    bucket = template.bucket_name()
    key = REFRESH["s3-put-incoming.json"]
    assert key is not None
    etag, size = upload(s3, bucket, key, model.ubj())
    event = with_real_object(load_event("s3-put-incoming.json"), key, etag, size)
    result = invoke(template, "RefreshFunction", event, fresh=True)
    assert result.ok, result.error
    return result.payload  # type: ignore[no-any-return]


@pytest.fixture(scope="class")
def promoted(template: Template, model: TrainedModel) -> Iterator[Any]:
    """One moto world for the API events: the template's bucket, a model promoted by refresh."""
    from moto import mock_aws

    from treeserve.aws import reset_clients, s3_client

    reset_clients()
    with mock_aws():
        s3 = s3_client()
        s3.create_bucket(Bucket=template.bucket_name())
        promote_through_refresh(template, s3, model)
        yield s3
    reset_clients()


class TestApiEvents:
    @pytest.mark.parametrize("name", sorted(API))
    def test_api_event(self, name: str, promoted: Any, template: Template) -> None:
        # A cold start (fresh import) after the promotion: the model loads at import, as in Lambda.
        result = invoke(template, "InferenceFunction", load_event(name), fresh=True)
        API[name](http(result))


def test_health_is_503_before_any_model(stack: Any, template: Template) -> None:
    result = invoke(template, "InferenceFunction", load_event("apigw-v2-health.json"), fresh=True)
    response = http(result)
    assert response.status == 503
    assert response.json()["error"]["message"]


@pytest.mark.parametrize("name", sorted(REFRESH))
def test_refresh_event(name: str, stack: Any, template: Template, model: TrainedModel) -> None:
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    bucket = template.bucket_name()
    key = REFRESH[name]
    event = load_event(name)
    if key is not None:
        # A pickle (protocol 4 header and opcodes) for the refused case: never unpickled.
        data = (
            b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."
            if name in REFUSED
            else model.ubj()
        )
        etag, size = upload(stack, bucket, key, data)
        event = with_real_object(event, key, etag, size)
    result = invoke(template, "RefreshFunction", event, fresh=True)
    assert result.ok, result.error
    registry = ModelRegistry(S3RegistryStore(bucket, stack), "default")
    if key is None:  # s3:TestEvent: nothing to do, nothing registered
        assert result.payload == {"outcomes": []}
        assert registry.current() is None
        return
    if name in REFUSED:
        (outcome,) = result.payload["outcomes"]
        assert outcome["status"] == "rejected"
        assert outcome["code"] == REFUSED[name]
        assert registry.current() is None
        assert registry.versions() == []
        assert stack.head_object(Bucket=bucket, Key=key)  # the upload is kept
        return
    if name.startswith("sqs-"):
        assert result.payload == {"batchItemFailures": []}
    else:
        (outcome,) = result.payload["outcomes"]
        assert outcome["status"] == "promoted"
        assert outcome["key"] == key
        assert outcome["version"] == 1
    pointer = registry.current()
    assert pointer is not None
    assert pointer.version == 1
    # Redelivery (S3 delivers at least once) gives the same outcome, no second version.
    again = invoke(template, "RefreshFunction", event)
    assert again.ok, again.error
    assert registry.versions() == [1]


def test_refresh_event_for_a_vanished_object_is_ignored(stack: Any, template: Template) -> None:
    """An event whose object is gone (deleted before delivery): recorded as ignored, no version."""
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    event = load_event("s3-put-incoming.json")  # names an object this moto world never had
    result = invoke(template, "RefreshFunction", event, fresh=True)
    assert result.ok, result.error
    (outcome,) = result.payload["outcomes"]
    assert outcome["status"] == "ignored"
    assert outcome["code"] == "gone"
    registry = ModelRegistry(S3RegistryStore(template.bucket_name(), stack), "default")
    assert registry.current() is None
    assert registry.versions() == []


MONITORING_APP = ROOT / "functions" / "monitoring" / "app.py"


@pytest.mark.parametrize("name", MONITORING)
def test_monitoring_event(name: str, stack: Any, template: Template, model: TrainedModel) -> None:
    if not MONITORING_APP.exists():
        pytest.skip("functions/monitoring/app.py is not written yet")
    promote_through_refresh(template, stack, model)
    # Some traffic first, so the run has captures to compare (capture every row).
    predict = invoke(
        template,
        "InferenceFunction",
        load_event("apigw-v2-predict-rows.json"),
        env_overrides={"Parameters": {"CAPTURE_SAMPLE_RATE": "1", "CAPTURE_MAX_ROWS": "1"}},
        fresh=True,
    )
    assert http(predict).status == 200
    wait_for_writes()  # the capture is written off the request, on a thread
    result = invoke(template, "MonitoringFunction", load_event(name), fresh=True)
    assert result.ok, result.error
    reports = stack.list_objects_v2(Bucket=template.bucket_name(), Prefix="reports/default/")
    if name.endswith("-bad-window.json"):  # refused without a retry: retrying cannot help
        assert result.payload["error"]["type"] == "bad_event"
        assert reports.get("KeyCount", 0) == 0
        return
    payload = result.payload
    assert "error" not in payload
    assert payload["model"] == "default"
    assert payload["rows"] == N_ROWS  # the rows the predict event captured
    assert payload["report_key"].startswith("reports/default/dt=")
    assert [o["Key"] for o in reports.get("Contents", [])] == [payload["report_key"]]


def test_monitoring_fanout_events(stack: Any, template: Template, model: TrainedModel) -> None:
    """The worker and merge events as MonitoringMap sends them. The worker's batch gets the
    captured files' real keys and sizes and a window around now (as the S3 events get real
    eTags); the merge's ``results`` names ResultWriter's manifest, written here in Step
    Functions' layout for that one worker, its ``Output`` the worker's answer through the
    template's ResultSelector."""
    from datetime import UTC, datetime, timedelta

    from treeserve_cli.stepfunctions import apply_template, state_machines

    promote_through_refresh(template, stack, model)
    predict = invoke(
        template,
        "InferenceFunction",
        load_event("apigw-v2-predict-rows.json"),
        env_overrides={"Parameters": {"CAPTURE_SAMPLE_RATE": "1", "CAPTURE_MAX_ROWS": "1"}},
        fresh=True,
    )
    assert http(predict).status == 200
    wait_for_writes()
    bucket = template.bucket_name()
    captured = stack.list_objects_v2(Bucket=bucket, Prefix="captures/default/")["Contents"]
    now = datetime.now(UTC)
    window = {"start": (now - timedelta(hours=24)).isoformat(), "end": now.isoformat()}

    worker = load_event(FANOUT[0])
    worker["Items"] = [{"key": o["Key"], "size": o["Size"]} for o in captured]
    worker["BatchInput"].update(window)
    result = invoke(template, "MonitoringFunction", worker, fresh=True)
    assert result.ok, result.error
    answer = result.payload
    assert "error" not in answer, answer
    run = worker["BatchInput"]["run"]
    assert answer["partial_key"].startswith(f"monitoring/default/{run}/partials/")
    assert (answer["files"], answer["rows"]) == (len(captured), N_ROWS)
    assert stack.head_object(Bucket=bucket, Key=answer["partial_key"])["ContentLength"] > 0

    merge = load_event(FANOUT[1])
    merge.update(window)
    machine = state_machines(template)["MonitoringMap"].definition
    task = machine["States"]["Partials"]["ItemProcessor"]["States"]["Partial"]
    output = apply_template(task["ResultSelector"], {"Payload": answer, "StatusCode": 200}, {})
    manifest_key = merge["results"]["Key"]
    base = manifest_key.rsplit("/", 1)[0]
    record = {"Status": "SUCCEEDED", "Input": json.dumps(worker), "Output": json.dumps(output)}
    stack.put_object(Bucket=bucket, Key=f"{base}/SUCCEEDED_0.json", Body=json.dumps([record]))
    files = {"FAILED": [], "PENDING": [], "SUCCEEDED": [{"Key": f"{base}/SUCCEEDED_0.json"}]}
    manifest = {"DestinationBucket": bucket, "ResultFiles": files}
    stack.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest))
    result = invoke(template, "MonitoringFunction", merge)
    assert result.ok, result.error
    summary = result.payload
    assert "error" not in summary, summary
    assert summary["rows"] == N_ROWS
    assert summary["report_key"].startswith("reports/default/dt=")
    reports = stack.list_objects_v2(Bucket=bucket, Prefix="reports/default/")["Contents"]
    assert [o["Key"] for o in reports] == [summary["report_key"]]


@pytest.mark.parametrize("name", sorted(BATCH))
def test_batch_event(name: str, stack: Any, template: Template, model: TrainedModel) -> None:
    import numpy as np

    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    promote_through_refresh(template, stack, model)
    bucket = template.bucket_name()
    pointer = ModelRegistry(S3RegistryStore(bucket, stack), "default").current()
    assert pointer is not None
    event = load_event(name)
    for item in event["Items"]:
        etag, size = upload(stack, bucket, item["Key"], BATCH[name][item["Key"]])
        item.update({"Etag": f'"{etag}"', "Size": size})
    event["BatchInput"]["job"].update({"version": pointer.version, "sha256": pointer.sha256})
    result = invoke(template, "BatchFunction", event, fresh=True)
    assert result.ok, result.error
    objects = result.payload["objects"]
    assert [o["status"] for o in objects] == ["scored", "scored"], objects
    csv_out = stack.get_object(Bucket=bucket, Key=objects[0]["output_key"])["Body"].read()
    lines = csv_out.decode().splitlines()
    assert lines[0] == "id,prediction,label"
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b"]
    X = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [-1, np.nan, 2, 0, 1, -0.5]], dtype=np.float32)
    expected = model.booster.inplace_predict(X)
    got = np.array([float(line.split(",")[1]) for line in lines[1:]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    jsonl = stack.get_object(Bucket=bucket, Key=objects[1]["output_key"])["Body"].read()
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["id"] for r in rows] == [7, "batch/default/events/input/records.jsonl:1"]
