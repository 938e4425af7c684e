"""The S3 adapter against moto: AWS errors become domain errors, in one place.

Faults are injected inside botocore (``tests.reliability.faults``: a real HTTP error response or
connection failure on the wire, seen through botocore's retries), or with botocore's Stubber for
error codes moto never answers with (AccessDenied, ConditionalRequestConflict).
"""

from __future__ import annotations

import hashlib
import io
import socket
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from tests.conftest import BUCKET
from tests.reliability.faults import S3Faults, no_backoff
from tests.unit.test_registry_contract import distinct_models, manifest_for
from treeserve.errors import (
    BucketNotFound,
    ConfigurationError,
    NotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
)
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore

pytestmark = pytest.mark.integration

MODEL = "churn"


@pytest.fixture(scope="module")
def models() -> list[bytes]:
    return distinct_models(3)


@pytest.fixture
def store(s3: Any) -> S3RegistryStore:
    return S3RegistryStore(BUCKET, s3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", ["slowdown", "internal", "timeout", "connect"])
def test_transient_failures_are_storage_unavailable_after_retries(
    store: S3RegistryStore, s3: Any, kind: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    store.put("registry/x/current.json", b"{}")
    faults = S3Faults(s3)
    faults.add(kind)
    calls = [
        lambda: store.get("registry/x/current.json"),
        lambda: store.get_if_changed("registry/x/current.json", '"abc"'),
        lambda: store.put("registry/x/y", b"1", if_none_match=True),
        lambda: store.head("registry/x/current.json"),
        lambda: list(store.list_keys("registry/")),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable):
            call()
    assert faults.total_injected >= len(calls) * 2  # botocore retried each before giving up
    faults.detach()
    assert store.head("registry/x/y") is None  # the refused write was never applied


@pytest.mark.parametrize(
    ("operation", "code", "status", "error"),
    [
        ("put_object", "ConditionalRequestConflict", 409, PreconditionFailed),
        ("put_object", "PreconditionFailed", 412, PreconditionFailed),
        ("get_object", "AccessDenied", 403, StorageAccessDenied),
        ("get_object", "InvalidAccessKeyId", 403, StorageAccessDenied),
        ("get_object", "NoSuchKey", 404, NotFound),
        ("get_object", "NoSuchBucket", 404, BucketNotFound),
        ("get_object", "SlowDown", 503, StorageUnavailable),
        ("get_object", "InvalidRequest", 400, StorageError),
    ],
)
def test_error_codes_map_to_domain_errors(
    operation: str, code: str, status: int, error: type[Exception]
) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    store = S3RegistryStore(BUCKET, client)
    with Stubber(client) as stub:
        stub.add_client_error(operation, service_error_code=code, http_status_code=status)
        call = (
            (lambda: store.put("k", b"x", if_none_match=True))
            if operation == "put_object"
            else (lambda: store.get("k"))
        )
        with pytest.raises(error) as caught:
            call()
    assert type(caught.value) is error  # exactly, not a broader or narrower class
    if error is StorageAccessDenied:
        assert "credentials" in str(caught.value)


def test_a_missing_bucket_is_named_with_the_fix(aws: None) -> None:
    store = S3RegistryStore("no-such-treeserve-bucket")
    for call in (
        store.check_bucket,
        lambda: store.get("k"),
        lambda: store.put("k", b"x"),
        lambda: list(store.list_keys("registry/")),
    ):
        with pytest.raises(BucketNotFound, match=r"no-such-treeserve-bucket.*MODEL_BUCKET"):
            call()


def test_an_unreachable_endpoint_is_storage_unavailable() -> None:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{_free_port()}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = S3RegistryStore(BUCKET, client)
    with pytest.raises(StorageUnavailable, match="AWS_ENDPOINT_URL"):
        store.get("registry/x/current.json")
    with pytest.raises(StorageUnavailable):
        store.check_bucket()


def test_missing_credentials_are_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{_free_port()}"
    )
    with pytest.raises(ConfigurationError, match="credentials"):
        S3RegistryStore(BUCKET, client).get("k")


@pytest.mark.slow
def test_listing_more_than_a_thousand_keys_pages(store: S3RegistryStore, s3: Any) -> None:
    keys = [f"registry/{MODEL}/rejected/{i:05d}.json" for i in range(1001)]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    pages: list[int] = []
    s3.meta.events.register("after-call.s3.ListObjectsV2", lambda **_: pages.append(1))
    assert list(store.list_keys(f"registry/{MODEL}/rejected/")) == keys
    assert len(pages) == 2


def test_a_lost_answer_to_the_manifest_write_still_registers_once(
    store: S3RegistryStore, s3: Any, models: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 applied the write, the answer timed out, botocore's retry then fails If-None-Match."""
    no_backoff(monkeypatch)
    registry = ModelRegistry(store, MODEL)
    faults = S3Faults(s3)
    faults.add("lost_response", operations={"PutObject"}, key_contains="manifest.json", times=1)
    assert registry.register(models[0], manifest_for(models[0])) == 1
    assert faults.total_injected == 1
    assert registry.versions() == [1]
    assert registry.manifest(1).sha256 == hashlib.sha256(models[0]).hexdigest()


def test_a_lost_answer_to_a_rollback_does_not_roll_back_twice(
    store: S3RegistryStore, s3: Any, models: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    no_backoff(monkeypatch)
    registry = ModelRegistry(store, MODEL)
    for model in models:
        registry.promote(registry.register(model, manifest_for(model)))
    faults = S3Faults(s3)
    faults.add("lost_response", operations={"PutObject"}, key_contains="current.json", times=1)
    pointer = registry.rollback()
    assert faults.total_injected == 1
    assert (pointer.version, pointer.history) == (2, (1,))
    assert registry.current() == pointer


def test_upload_reports_progress_and_returns_the_etag(store: S3RegistryStore, s3: Any) -> None:
    # Above boto3's 8 MB multipart threshold: the ETag is a multipart one ("...-2").
    body = hashlib.sha256(b"seed").digest() * (9 * 1024 * 1024 // 32)
    seen: list[int] = []
    etag = store.upload("incoming/churn/big.tar.gz", io.BytesIO(body), callback=seen.append)
    assert sum(seen) == len(body)
    assert len(seen) > 1
    assert etag == s3.head_object(Bucket=BUCKET, Key="incoming/churn/big.tar.gz")["ETag"]
    assert etag.strip('"').endswith("-2")
    assert store.get("incoming/churn/big.tar.gz").body == body
