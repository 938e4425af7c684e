"""The refresh service's edges: crashes between steps, racing deliveries, size caps, schema
changes. Against moto S3 with the real registry and package reader."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, TrainedModel, train
from tests.corpus import make_package
from tests.integration.refresh_stack import (
    RefreshStack,
    build_stack,
    emf_metrics,
    holdout_csv_bytes,
    holdout_rows,
)
from tests.reliability.faults import S3Faults, no_backoff
from treeserve.errors import StorageUnavailable
from treeserve.model.package import Limits
from treeserve.refresh.pipeline import RefreshService, S3UploadSource, UploadEvent, UploadObject
from treeserve.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RefreshStack:
    return build_stack(monkeypatch, s3)


def test_a_crash_after_promoting_but_before_the_outcome_is_completed_by_the_retry(
    stack: RefreshStack, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    from treeserve.aws import s3_client

    key = "incoming/default/model.ubj"
    messages = stack.put(key, binary_model.ubj())
    faults = S3Faults(s3_client())
    faults.add("internal", operations={"PutObject"}, key_contains="/uploads/")
    with pytest.raises(StorageUnavailable):
        stack.deliver_s3(messages)
    registry = stack.registry()
    assert registry.current().version == 1  # type: ignore[union-attr]
    assert stack.outcome(key) is None
    faults.detach()

    (outcome,) = stack.deliver_s3(messages)

    assert (outcome["status"], outcome["version"], outcome["redelivered"]) == ("promoted", 1, False)
    assert registry.versions() == [1]
    assert stack.outcome(key)["attempt"] == outcome["attempt"]  # type: ignore[index]


def test_racing_deliveries_of_one_event_agree_on_one_outcome_and_one_version_in_service(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    key = "incoming/default/model.ubj"
    (message,) = stack.put(key, binary_model.ubj())
    service = stack.module.service()
    record = stack.module.upload_events(json.loads(message["Body"]))[0]
    results: list[Any] = [None, None]
    barrier = threading.Barrier(2)

    def deliver(i: int) -> None:
        barrier.wait()
        results[i] = service.process(
            record.bucket, record.key, record.etag, record.size, event_time=record.event_time
        )

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    a, b = results
    assert a is not None
    assert b is not None
    assert a.attempt == b.attempt  # the first recorded outcome is everyone's answer
    assert a.status == "promoted"
    registry = stack.registry()
    # The registration claim let one delivery write the version; the other waited for it.
    assert registry.versions() == [1]
    assert registry.current().version == 1  # type: ignore[union-attr]


class CountingSource(S3UploadSource):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, event: UploadEvent, max_bytes: int) -> UploadObject:
        self.reads += 1
        return super().read(event, max_bytes)


def test_an_upload_above_the_cap_is_refused_without_being_read(
    s3: Any, binary_model: TrainedModel
) -> None:
    source = CountingSource()
    cap = len(binary_model.ubj()) - 1
    service = RefreshService(
        Settings(model_bucket=BUCKET), source=source, limits=Limits(max_upload_bytes=cap)
    )
    etag = s3.put_object(Bucket=BUCKET, Key="incoming/m/big.ubj", Body=binary_model.ubj())["ETag"]

    # The event states the size: refused before any read.
    said = service.process(BUCKET, "incoming/m/big.ubj", etag, len(binary_model.ubj()))
    assert (said.status, said.code, source.reads) == ("rejected", "too_large", 0)

    # An event without a size (a direct invocation): refused from Content-Length, body unread.
    s3.put_object(Bucket=BUCKET, Key="incoming/m/big2.ubj", Body=binary_model.ubj())
    head = s3.head_object(Bucket=BUCKET, Key="incoming/m/big2.ubj")
    unsaid = service.process(BUCKET, "incoming/m/big2.ubj", head["ETag"])
    assert (unsaid.status, unsaid.code, source.reads) == ("rejected", "too_large", 1)
    registry = service.registry("m")
    assert registry.versions() == []
    assert {r["code"] for r in registry.rejections()} == {"too_large"}


def test_a_champion_the_holdout_cannot_score_holds_the_newcomer(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    # The newcomer renames its features: the champion's columns are not in its holdout.
    X, y = holdout_rows()
    names = [f"g{i}" for i in range(X.shape[1])]
    renamed = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(binary_model.X, label=binary_model.y, feature_names=names),
        num_boost_round=10,
    )
    newcomer = TrainedModel(renamed, binary_model.X, binary_model.y, names, "binary:logistic")
    stack.deliver_s3(stack.put("incoming/default/champion.ubj", binary_model.ubj()))

    (outcome,) = stack.deliver_s3(
        stack.put(
            "incoming/default/renamed.tar.gz",
            make_package(newcomer, extra_members={"holdout.csv": holdout_csv_bytes(names, X, y)}),
        )
    )

    assert (outcome["status"], outcome["code"]) == ("registered", "gate")
    assert "cannot be scored" in outcome["message"]
    assert stack.registry().current().version == 1  # type: ignore[union-attr]


def test_a_multiclass_challenger_is_gated_on_log_loss(
    stack: RefreshStack, multiclass_model: TrainedModel
) -> None:
    champion = train("multi:softprob", rounds=2)
    noise = train("multi:softprob", rounds=10)
    rng = np.random.default_rng(1)
    noise.booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1},
        xgb.DMatrix(noise.X, label=rng.permutation(noise.y), feature_names=noise.feature_names),
        num_boost_round=10,
    )
    first = stack.deliver_s3(stack.put("incoming/mc/a.tar.gz", make_package(champion)))[0]
    second = stack.deliver_s3(stack.put("incoming/mc/b.tar.gz", make_package(noise)))[0]
    better = stack.deliver_s3(stack.put("incoming/mc/c.tar.gz", make_package(multiclass_model)))[0]
    assert first["status"] == "promoted"
    assert (second["status"], second["gate"]["metric"]) == ("registered", "logloss")
    assert better["status"] == "promoted"
    assert stack.registry("mc").current().version == 3  # type: ignore[union-attr]


def test_a_failed_notification_is_counted_and_does_not_fail_the_refresh(
    s3: Any,
    binary_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    stack = build_stack(monkeypatch, s3, NOTIFICATION_TOPIC_ARN=missing)
    (outcome,) = stack.deliver_s3(stack.put("incoming/default/m.ubj", binary_model.ubj()))
    assert outcome["status"] == "promoted"
    assert "NotificationsFailed" in emf_metrics(capsys.readouterr().out)
    assert stack.registry().current().version == 1  # type: ignore[union-attr]


def test_an_upload_deleted_before_its_event_is_handled_is_ignored_and_recorded(
    stack: RefreshStack, binary_model: TrainedModel
) -> None:
    key = "incoming/default/m.ubj"
    messages = stack.put(key, binary_model.ubj())
    stack.s3.delete_object(Bucket=BUCKET, Key=key)
    (outcome,) = stack.deliver_s3(messages)
    assert (outcome["status"], outcome["code"]) == ("ignored", "gone")
    assert stack.outcome(key)["code"] == "gone"  # type: ignore[index]
    assert stack.registry().versions() == []


def test_a_retry_after_a_crash_does_not_undo_a_rollback_made_meanwhile(
    stack: RefreshStack, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    from treeserve.aws import s3_client

    stack.deliver_s3(stack.put("incoming/default/v1.ubj", binary_model.ubj()))
    key = "incoming/default/v2.ubj"
    messages = stack.put(key, train("binary:logistic", seed=11).ubj())
    faults = S3Faults(s3_client())
    faults.add("internal", operations={"PutObject"}, key_contains="/uploads/")
    with pytest.raises(StorageUnavailable):
        stack.deliver_s3(messages)  # promoted v2, then failed to record the outcome
    faults.detach()
    registry = stack.registry()
    assert registry.current().version == 2  # type: ignore[union-attr]
    registry.rollback()  # the operator puts v1 back before Lambda retries

    (outcome,) = stack.deliver_s3(messages)

    assert (outcome["status"], outcome["code"], outcome["version"]) == ("registered", "stale", 2)
    assert registry.current().version == 1  # type: ignore[union-attr]


def test_a_lower_copy_committed_by_a_racing_delivery_ends_up_in_service(
    s3: Any, binary_model: TrainedModel
) -> None:
    """The interleaving a race can produce: a racing writer allocated version 1 first but
    commits it only after this delivery registered version 2 and is about to promote it."""
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    store = S3RegistryStore(BUCKET, s3)
    racing: dict[str, Any] = {}

    class RacingRegistry(ModelRegistry):
        def register(self, model_ubj: bytes, manifest: Any) -> int:
            self.store.put(self.model_key(1), model_ubj, if_none_match=True)  # allocated
            racing["bytes"], racing["manifest"] = model_ubj, manifest
            return super().register(model_ubj, manifest)

        def promote(self, version: int, **kwargs: Any) -> Any:
            if "done" not in racing:  # ... and the racing writer commits now
                racing["done"] = True
                twin = type(racing["manifest"]).from_dict(racing["manifest"].to_dict())
                twin.version = 1
                self.store.put(f"{self.prefix}by-sha256/{twin.sha256}/1", b"{}")
                self.store.put(self.manifest_key(1), twin.to_json(), if_none_match=True)
            return super().promote(version, **kwargs)

    service = RefreshService(
        Settings(model_bucket=BUCKET), lambda name: RacingRegistry(store, name)
    )
    key = "incoming/default/model.ubj"
    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=binary_model.ubj())["ETag"]

    outcome = service.process(BUCKET, key, etag)

    registry = ModelRegistry(store, "default")
    assert registry.versions() == [1, 2]  # the extra copy exists ...
    assert (outcome.status, outcome.version) == ("promoted", 1)  # ... but is not reported
    assert registry.current().version == 1  # type: ignore[union-attr]  # ... nor in service


def test_a_registration_claim_is_waited_for_then_taken_over_once_expired(
    s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from treeserve.model.package import read_upload
    from treeserve.refresh import pipeline as refresh
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    monkeypatch.setattr(refresh, "CLAIM_WAIT_SECONDS", 0.3)
    sha = read_upload(binary_model.ubj(), "model.ubj").sha256
    store = S3RegistryStore(BUCKET, s3)
    claim_key = f"registry/default/claims/{sha}.json"
    other = {"upload_id": "someone-else", "nonce": "n1", "claimed_at": time.time()}
    store.put(claim_key, orjson.dumps(other), if_none_match=True)
    service = RefreshService(Settings(model_bucket=BUCKET))
    key = "incoming/default/model.ubj"
    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=binary_model.ubj())["ETag"]

    # A live holder: wait, then fail the invocation for a retry (nothing written).
    with pytest.raises(StorageUnavailable, match="same model bytes"):
        service.process(BUCKET, key, etag)
    registry = ModelRegistry(store, "default")
    assert registry.versions() == []

    # The holder died: once its lease is over, the retry takes the claim and registers.
    other["claimed_at"] = time.time() - refresh.CLAIM_LEASE_SECONDS - 1
    store.put(claim_key, orjson.dumps(other))
    outcome = service.process(BUCKET, key, etag)
    assert (outcome.status, outcome.version) == ("promoted", 1)
    assert registry.versions() == [1]
