"""The refresh function end to end: uploads through moto S3, the notifications S3 really emits
(via an SQS queue) delivered to the handler as SQS events and as raw S3 events."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from tests.conftest import BUCKET, LambdaContext, TrainedModel, train
from tests.corpus import bad_uploads, make_package
from tests.inference_support import http_api_event, manifest_for, response_body, response_headers
from tests.integration.refresh_stack import (
    INFERENCE_DIR,
    RefreshStack,
    binary_booster,
    build_stack,
    emf_metrics,
    holdout_csv_bytes,
    holdout_rows,
)
from tests.reliability.faults import S3Faults, no_backoff
from treeserve.errors import StorageUnavailable
from treeserve.registry.model_registry import upload_id

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RefreshStack:
    return build_stack(monkeypatch, s3)


def serve(monkeypatch: pytest.MonkeyPatch, name: str, rows: list[list[float]]) -> dict[str, Any]:
    """POST /predict through a cold inference handler for model ``name``."""
    from treeserve_cli.invoke import import_handler

    monkeypatch.setenv("MODEL_NAME", name)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "treeserve-inference")
    handler = import_handler(INFERENCE_DIR, "app.handler", fresh=True)
    response = handler(
        http_api_event(
            "POST",
            "/predict",
            json.dumps({"instances": rows}),
            {"content-type": "application/json"},
        ),
        LambdaContext(),
    )
    assert response["statusCode"] == 200, response_body(response)
    return {
        "body": json.loads(response_body(response)),
        "version": response_headers(response)["x-model-version"],
    }


def seed_champion(stack: RefreshStack, model: TrainedModel, name: str = "default") -> int:
    """A champion put in service directly through the registry (as an earlier refresh would)."""
    registry = stack.registry(name)
    version = registry.register(model.ubj(), manifest_for(model, name=name))
    registry.promote(version)
    return version


# --- the happy path ------------------------------------------------------------------------------


def test_a_good_package_is_promoted_and_served(
    stack: RefreshStack,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = "incoming/churn/model.tar.gz"
    messages = stack.put(key, make_package(binary_model))
    assert len(messages) == 1

    result = stack.deliver_sqs(messages)

    assert result == {"batchItemFailures": []}
    registry = stack.registry("churn")
    pointer = registry.current()
    assert pointer is not None
    assert pointer.version == 1
    assert registry.versions() == [1]
    manifest = registry.manifest(1)
    assert manifest.source["key"] == key
    assert manifest.source["etag"] == stack.etags[key]
    assert manifest.source["event_time"]  # upload time, for "newer" decisions
    assert manifest.reference_source == "reference.csv"
    assert manifest.reference is not None
    assert manifest.reference["source"] == "sample"
    assert manifest.holdout_metrics["auc"] > 0.8  # its own training rows: it fits them
    assert manifest.validation["gate"]["decision"] == "skip"  # no champion yet
    outcome = stack.outcome(key, "churn")
    assert outcome is not None
    assert outcome["status"] == "promoted"
    assert outcome["version"] == 1
    assert [n["status"] for n in stack.notifications()] == ["promoted"]
    metrics = emf_metrics(capsys.readouterr().out)
    assert metrics.count("ModelsRegistered") == 1
    assert metrics.count("ModelsPromoted") == 1
    assert "ModelsRejected" not in metrics

    served = serve(monkeypatch, "churn", binary_model.X[:5].tolist())
    assert served["version"] == "1"
    assert served["body"]["model"] == {"name": "churn", "version": 1, "alias": "champion"}
    np.testing.assert_allclose(
        served["body"]["predictions"],
        binary_model.booster.inplace_predict(binary_model.X[:5].astype(np.float32)),
        rtol=1e-5,
    )


def test_a_bare_model_from_a_raw_s3_event_is_promoted_with_the_models_own_reference(
    stack: RefreshStack, regression_model: TrainedModel
) -> None:
    key = "incoming/price-model/v 2+final.ubj"  # S3 URL-encodes it in the notification
    messages = stack.put(key, regression_model.ubj())
    assert "v+2%2Bfinal.ubj" in messages[0]["Body"]

    outcomes = stack.deliver_s3(messages)

    assert [o["status"] for o in outcomes] == ["promoted"]
    manifest = stack.registry("price-model").manifest(1)
    assert manifest.source["key"] == key
    assert manifest.reference_source == "model"
    assert manifest.reference is not None
    assert manifest.reference["source"] == "model"
    assert manifest.holdout_metrics == {}
    assert manifest.task == "regression"


# --- rejections ----------------------------------------------------------------------------------


def test_every_bad_upload_of_the_corpus_is_rejected_with_its_reason_and_the_champion_stays(
    stack: RefreshStack, binary_model: TrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    champion = seed_champion(stack, binary_model)
    registry = stack.registry()
    pointer_before = registry.current()
    assert pointer_before is not None
    cases = bad_uploads(binary_model)
    messages = []
    for case in cases:
        messages += stack.put(f"incoming/default/{case.name}/{case.filename}", case.data)
    assert len(messages) == len(cases)
    capsys.readouterr()

    for start in range(0, len(messages), 10):  # SQS batches of up to 10, as Lambda polls them
        assert stack.deliver_sqs(messages[start : start + 10]) == {"batchItemFailures": []}

    wrong = []
    for case in cases:
        key = f"incoming/default/{case.name}/{case.filename}"
        outcome = stack.outcome(key)
        rejection = registry.rejection(upload_id(key, stack.etags[key]))
        got = (outcome or {}).get("status"), (outcome or {}).get("code")
        if got != ("rejected", case.code) or rejection is None or rejection["code"] != case.code:
            wrong.append(f"{case.name}: expected rejected/{case.code}, got {got}")
        else:
            assert rejection["source"]["key"] == key  # where the upload is kept
            stack.s3.head_object(Bucket=BUCKET, Key=key)  # ... and it is still there
    assert not wrong, "\n".join(wrong)
    pointer_after = registry.current()
    assert pointer_after == pointer_before  # same version, same ETag: never written
    assert registry.versions() == [champion]
    assert emf_metrics(capsys.readouterr().out).count("ModelsRejected") == len(cases)
    notes = stack.notifications()
    assert len(notes) == len(cases)
    assert {n["status"] for n in notes} == {"rejected"}


def test_a_single_class_holdout_is_gated_on_log_loss(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    # A holdout with a single class: AUC is undefined, log loss decides; still a valid upload.
    X, _ = holdout_rows(50)
    one_class = holdout_csv_bytes(binary_model.feature_names, X, np.ones(50))
    seed_champion(stack, binary_model)
    key = "incoming/default/one-class.tar.gz"
    outcomes = stack.deliver_s3(
        stack.put(
            key,
            make_package(
                train("binary:logistic", seed=5), extra_members={"holdout.csv": one_class}
            ),
        )
    )
    assert outcomes[0]["status"] in ("promoted", "registered")
    assert outcomes[0]["gate"]["metric"] == "logloss"


# --- the quality gate ----------------------------------------------------------------------------


def test_a_worse_challenger_is_registered_but_not_promoted_and_a_better_one_is(
    stack: RefreshStack, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y = holdout_rows()
    holdout = holdout_csv_bytes(binary_model.feature_names, X, y)
    champion = binary_booster(binary_model, rounds=2)
    noise = binary_booster(binary_model, rounds=10, shuffle_labels=True)
    better = binary_booster(binary_model, rounds=40)

    def publish(key: str, model: TrainedModel) -> dict[str, Any]:
        package = make_package(model, extra_members={"holdout.csv": holdout})
        (outcome,) = stack.deliver_s3(stack.put(key, package))
        return outcome

    assert publish("incoming/default/champion.tar.gz", champion)["status"] == "promoted"
    worse = publish("incoming/default/shuffled.tar.gz", noise)
    assert worse["status"] == "registered"
    assert worse["code"] == "gate"
    assert worse["version"] == 2
    gate = worse["gate"]
    assert gate["decision"] == "hold"
    assert gate["metric"] == "auc"
    assert gate["champion_version"] == 1
    assert gate["challenger"]["auc"] < gate["champion"]["auc"]
    assert stack.registry().current().version == 1  # type: ignore[union-attr]
    # The manifest records the newcomer's own holdout metrics, as scored by the gate.
    assert stack.registry().manifest(2).holdout_metrics["auc"] == pytest.approx(
        gate["challenger"]["auc"]
    )

    good = publish("incoming/default/better.tar.gz", better)
    assert good["status"] == "promoted"
    assert good["version"] == 3
    assert good["gate"]["challenger"]["auc"] >= good["gate"]["champion"]["auc"]
    assert stack.registry().current().version == 3  # type: ignore[union-attr]
    assert serve(monkeypatch, "default", X[:2].tolist())["version"] == "3"


def test_a_small_loss_within_the_tolerance_is_promoted(
    s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = build_stack(monkeypatch, s3, PROMOTION_TOLERANCE="0.1")
    X, y = holdout_rows()
    holdout = holdout_csv_bytes(binary_model.feature_names, X, y)
    strong, weak = binary_booster(binary_model, rounds=40), binary_booster(binary_model, rounds=1)
    outcomes = [
        stack.deliver_s3(
            stack.put(
                f"incoming/default/m{i}.tar.gz",
                make_package(m, extra_members={"holdout.csv": holdout}),
            )
        )[0]
        for i, m in enumerate([strong, weak])
    ]
    gate = outcomes[1]["gate"]
    assert 0 < gate["champion"]["auc"] - gate["challenger"]["auc"] < 0.1  # worse, but within it
    assert [o["status"] for o in outcomes] == ["promoted", "promoted"], outcomes[1]["message"]
    assert stack.registry().current().version == 2  # type: ignore[union-attr]


def test_manual_mode_registers_and_waits(
    s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = build_stack(monkeypatch, s3, PROMOTION_MODE="manual")
    (outcome,) = stack.deliver_s3(stack.put("incoming/default/m.ubj", binary_model.ubj()))
    assert (outcome["status"], outcome["code"], outcome["version"]) == ("registered", "manual", 1)
    registry = stack.registry()
    assert registry.current() is None
    assert registry.versions() == [1]
    assert [n["status"] for n in stack.notifications()] == ["registered"]
    registry.promote(1)  # what `treeserve promote 1` does
    assert registry.current().version == 1  # type: ignore[union-attr]


def test_live_mode_puts_a_first_model_in_service_and_lets_later_ones_earn_it(
    s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = build_stack(monkeypatch, s3, PROMOTION_MODE="live")
    (first,) = stack.deliver_s3(stack.put("incoming/default/m1.ubj", binary_model.ubj()))
    assert (first["status"], first["version"]) == ("promoted", 1)
    newer = binary_booster(binary_model, rounds=5)
    (second,) = stack.deliver_s3(stack.put("incoming/default/m2.ubj", newer.ubj()))
    assert (second["status"], second["code"], second["version"]) == ("registered", "live", 2)
    assert "treeserve alias set challenger 2" in second["message"]
    assert stack.registry().current().version == 1  # type: ignore[union-attr]


# --- idempotency and ordering --------------------------------------------------------------------


def test_the_same_event_three_times_makes_one_version(
    stack: RefreshStack, binary_model: TrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = stack.put("incoming/default/model.ubj", binary_model.ubj())
    first = stack.deliver_s3(messages)
    second = stack.deliver_sqs(messages)  # the same notification, now through SQS
    third = stack.deliver_s3(messages)

    assert second == {"batchItemFailures": []}
    assert first[0]["status"] == third[0]["status"] == "promoted"
    assert first[0]["redelivered"] is False
    assert third[0]["redelivered"] is True
    assert third[0]["attempt"] == first[0]["attempt"]  # the recorded outcome, not a new one
    assert stack.registry().versions() == [1]
    metrics = emf_metrics(capsys.readouterr().out)
    assert metrics.count("ModelsRegistered") == 1
    assert metrics.count("ModelsPromoted") == 1
    assert metrics.count("UploadEvents") == 3
    assert metrics.count("UploadEventsRedelivered") == 2
    assert len(stack.notifications()) == 1


def test_the_same_bytes_under_another_key_are_a_duplicate_not_a_version(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    stack.deliver_s3(stack.put("incoming/default/a.ubj", binary_model.ubj()))
    # The same model as JSON: different upload bytes, the same canonical model.ubj.
    (outcome,) = stack.deliver_s3(stack.put("incoming/default/b.json", binary_model.json()))
    assert (outcome["status"], outcome["version"]) == ("duplicate", 1)
    assert stack.registry().versions() == [1]


def test_two_uploads_delivered_in_reverse_order_leave_the_newer_in_service(
    stack: RefreshStack, binary_model: TrainedModel, regression_model: TrainedModel
) -> None:
    older = stack.put("incoming/default/older.ubj", binary_model.ubj())
    time.sleep(0.01)  # S3 event times have millisecond resolution
    newer = stack.put("incoming/default/newer.ubj", train("binary:logistic", seed=7).ubj())

    (first,) = stack.deliver_s3(newer)
    (late,) = stack.deliver_s3(older)

    assert (first["status"], first["version"]) == ("promoted", 1)
    assert (late["status"], late["code"], late["version"]) == ("registered", "stale", 2)
    registry = stack.registry()
    assert registry.current().version == 1  # type: ignore[union-attr]
    assert registry.manifest(1).source["key"] == "incoming/default/newer.ubj"
    # A redelivery of either changes nothing.
    assert stack.deliver_s3(older)[0]["redelivered"] is True
    assert registry.current().version == 1  # type: ignore[union-attr]
    assert registry.versions() == [1, 2]


def test_an_overwritten_key_delivered_in_reverse_order_serves_the_last_write(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    key = "incoming/default/model.ubj"
    older = stack.put(key, binary_model.ubj())
    newer = stack.put(key, train("binary:logistic", seed=7).ubj())

    (first,) = stack.deliver_s3(newer)
    (late,) = stack.deliver_s3(older)

    assert first["status"] == "promoted"
    # The older event names an ETag the key no longer has: not this event's object any more.
    assert (late["status"], late["code"]) == ("ignored", "superseded")
    assert stack.registry().versions() == [1]


def test_on_a_versioned_bucket_the_sequencer_orders_events_for_one_key(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    stack.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    key = "incoming/default/model.ubj"
    records = []
    for sequencer, model in (("0A1B", binary_model), ("00F2C3", train("binary:logistic", seed=7))):
        # moto's records carry neither versionId nor sequencer; S3's do on a versioned bucket.
        (message,) = stack.put(key, model.ubj())
        head = stack.s3.head_object(Bucket=BUCKET, Key=key)
        record = json.loads(message["Body"])["Records"][0]
        record["s3"]["object"].update(versionId=head["VersionId"], sequencer=sequencer)
        record.pop("eventTime")  # only the sequencer can tell the order now
        records.append(record)
    older, newer = records  # "0A1B" < "00F2C3" once padded: F2C3 > A1B

    (first,) = stack.invoke({"Records": [newer]})["outcomes"]
    (late,) = stack.invoke({"Records": [older]})["outcomes"]

    assert first["status"] == "promoted"
    assert (late["status"], late["code"], late["version"]) == ("registered", "stale", 2)
    assert stack.registry().current().version == 1  # type: ignore[union-attr]


# --- failures ------------------------------------------------------------------------------------


def test_an_s3_failure_raises_and_a_retry_completes_without_duplicates(
    stack: RefreshStack, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    from treeserve.aws import s3_client

    faults = S3Faults(s3_client())
    messages = stack.put("incoming/default/model.ubj", binary_model.ubj())
    registry = stack.registry()

    # S3 fails while reading the upload: nothing is written at all.
    faults.add("internal", operations={"GetObject"}, key_contains="incoming/")
    with pytest.raises(StorageUnavailable):
        stack.deliver_s3(messages)
    assert registry.versions() == []
    assert stack.outcome("incoming/default/model.ubj") is None

    # S3 fails at the pointer, after the version was written: registered, not in service.
    faults.clear()
    faults.add("slowdown", operations={"PutObject"}, key_contains="current.json")
    with pytest.raises(StorageUnavailable):
        stack.deliver_s3(messages)
    assert registry.versions() == [1]
    assert registry.current() is None
    assert stack.outcome("incoming/default/model.ubj") is None

    # Lambda's retry: the version is found by sha256 and promoted; no second version.
    faults.clear()
    (outcome,) = stack.deliver_s3(messages)
    assert (outcome["status"], outcome["version"]) == ("promoted", 1)
    assert registry.versions() == [1]
    assert registry.current().version == 1  # type: ignore[union-attr]
    faults.detach()


def test_a_failed_message_is_reported_alone_in_the_sqs_batch(
    stack: RefreshStack,
    binary_model: TrainedModel,
    regression_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_backoff(monkeypatch)
    from treeserve.aws import s3_client

    good = stack.put("incoming/good/model.ubj", binary_model.ubj())
    failing = stack.put("incoming/flaky/model.ubj", regression_model.ubj())
    faults = S3Faults(s3_client())
    faults.add("internal", operations={"GetObject"}, key_contains="incoming/flaky/")

    result = stack.deliver_sqs(good + failing)

    assert result == {"batchItemFailures": [{"itemIdentifier": failing[0]["MessageId"]}]}
    assert stack.registry("good").current() is not None
    assert stack.registry("flaky").versions() == []
    faults.detach()
    assert stack.deliver_sqs(failing) == {"batchItemFailures": []}  # the redrive succeeds
    assert stack.registry("flaky").current().version == 1  # type: ignore[union-attr]


# --- envelopes -----------------------------------------------------------------------------------


def test_eventbridge_object_created_events_are_handled(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    key = "incoming/eb-model/model.ubj"
    stack.put(key, binary_model.ubj())
    event = {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-11-29T05:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{BUCKET}"],
        "detail": {
            "version": "0",
            "bucket": {"name": BUCKET},
            "object": {
                "key": key,
                "size": len(binary_model.ubj()),
                "etag": stack.etags[key],
                "sequencer": "00617F08299329D189",
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    }
    (outcome,) = stack.invoke(event)["outcomes"]
    assert (outcome["status"], outcome["version"]) == ("promoted", 1)
    assert stack.registry("eb-model").manifest(1).source["sequencer"] == "00617F08299329D189"


def test_sns_wrapped_notifications_in_sqs_are_handled(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    (message,) = stack.put("incoming/fanout/model.ubj", binary_model.ubj())
    wrapped = dict(message, Body=json.dumps({"Type": "Notification", "Message": message["Body"]}))
    assert stack.deliver_sqs([wrapped]) == {"batchItemFailures": []}
    assert stack.registry("fanout").current() is not None


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_test_events_and_keys_that_are_not_uploads_are_ignored(
    s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = build_stack(monkeypatch, s3)
    # Configuring the notification made S3 send its s3:TestEvent to the queue.
    test_events = stack.test_events
    assert [json.loads(m["Body"]).get("Event") for m in test_events] == ["s3:TestEvent"]
    assert stack.deliver_sqs(test_events) == {"batchItemFailures": []}
    assert stack.invoke(json.loads(test_events[0]["Body"])) == {"outcomes": []}

    (message,) = stack.put("incoming/ok/model.ubj", binary_model.ubj())
    record = json.loads(message["Body"])["Records"][0]
    for key, code in [
        ("captures/ok/x.ubj", "not_incoming"),
        ("incoming/model.ubj", "not_incoming"),
        ("incoming/ok/", "not_incoming"),
        ("incoming/bad%20name%21/model.ubj", "bad_name"),
    ]:
        record["s3"]["object"]["key"] = key
        (outcome,) = stack.invoke({"Records": [record]})["outcomes"]
        assert (outcome["status"], outcome["code"]) == ("ignored", code)
    listed = stack.s3.list_objects_v2(Bucket=BUCKET, Prefix="registry/")
    assert listed.get("KeyCount", 0) == 0  # nothing registered, nothing recorded


MALFORMED_EVENTS: list[Any] = [
    {"Records": "x"},
    {"Records": {"s3": {}}},
    {"Records": 7},
    {"Records": ["x", 1, None, []]},
    {"Records": [{"s3": "x"}, {"s3": None}, {"s3": []}]},
    {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": "x", "object": "y"}}]},
    {"Records": [{"s3": {"bucket": {"name": BUCKET}, "object": {}}}]},  # no key
    {"Records": [{"s3": {"bucket": {}, "object": {"key": "incoming/default/m.ubj"}}}]},
    {"Records": [{"s3": {"bucket": {"name": 3}, "object": {"key": ["incoming/a/b"]}}}]},
    {"Records": [{"eventSource": "aws:sqs"}, "x"]},
    {"Type": "Notification", "Message": "{not json"},
    {"Type": "Notification", "Message": '"a string"'},
    {"detail-type": "Object Created", "detail": "x"},
    {"detail-type": "Object Created", "detail": {"bucket": [], "object": {"key": 5}}},
    {},
    {"unexpected": True},
    [],
    "x",
    None,
]


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
@pytest.mark.parametrize("event", MALFORMED_EVENTS, ids=repr)
def test_malformed_events_are_ignored_with_a_log_line(
    stack: RefreshStack, event: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.invoke(event) == {"outcomes": []}
    assert any(r.getMessage().startswith("ignored: ") for r in caplog.records), caplog.records
    listed = stack.s3.list_objects_v2(Bucket=BUCKET, Prefix="registry/")
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_malformed_sqs_messages_are_ignored_and_the_good_one_served(
    stack: RefreshStack, binary_model: TrainedModel, caplog: pytest.LogCaptureFixture
) -> None:
    (good,) = stack.put("incoming/default/model.ubj", binary_model.ubj())
    bad = [
        dict(good, MessageId=f"bad-{i}", Body=body)
        for i, body in enumerate(["not json", '{"Records": "x"}', "[1]", '{"Records": [3]}'])
    ]
    assert stack.deliver_sqs([*bad, good]) == {"batchItemFailures": []}
    current = stack.registry().current()
    assert current is not None
    assert current.version == 1
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignored: ")]
    assert len(ignored) == 4, ignored


@pytest.mark.filterwarnings("ignore:No application metrics to publish")
def test_handler_module_builds_its_service_once(stack: RefreshStack) -> None:
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": BUCKET}, "object": {"key": "other/x", "eTag": "e", "size": 1}},
    }
    stack.invoke({"Records": [record]})
    service = stack.module.service()
    stack.invoke({"Records": [record]})
    assert stack.module.service() is service


def test_every_record_of_a_direct_event_is_tried_before_a_failure_raises(
    stack: RefreshStack,
    binary_model: TrainedModel,
    regression_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_backoff(monkeypatch)
    from treeserve.aws import s3_client

    (flaky,) = stack.put("incoming/flaky/model.ubj", regression_model.ubj())
    (good,) = stack.put("incoming/good/model.ubj", binary_model.ubj())
    records = [json.loads(m["Body"])["Records"][0] for m in (flaky, good)]
    faults = S3Faults(s3_client())
    faults.add("internal", operations={"GetObject"}, key_contains="incoming/flaky/")

    with pytest.raises(StorageUnavailable):
        stack.invoke({"Records": records})

    assert stack.registry("good").current().version == 1  # type: ignore[union-attr]
    assert stack.registry("flaky").versions() == []
    faults.detach()
    outcomes = stack.invoke({"Records": records})["outcomes"]  # Lambda's retry
    assert [(o["model"], o["status"], o["redelivered"]) for o in outcomes] == [
        ("flaky", "promoted", False),
        ("good", "promoted", True),
    ]
