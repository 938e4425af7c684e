"""Races on one model name: 16 publishers at once, and promotions racing rollbacks.

Runs against moto in-process (one shared client, as a Lambda environment has) and against a
``ThreadedMotoServer`` on 127.0.0.1 reached through ``AWS_ENDPOINT_URL`` (server mode: real
HTTP, one werkzeug thread per request). The bucket is versioned, so S3 itself keeps every write:
an overwritten version object or a lost pointer update would show in its object versions.

moto checks ``If-Match``/``If-None-Match`` and then writes, without a lock
(``moto/s3/responses.py``, ``S3Response.put_object``); S3 does both atomically. Measured here with
16 threads doing compare-and-swap increments on one key through moto alone: 368 writes
succeeded, the counter said 353 (15 lost updates, moto's, not the client's). So these tests make
moto keep S3's promise with :func:`atomic_moto_s3`: each S3 object request is handled under one
lock. ``test_moto_keeps_s3s_atomicity_under_the_lock`` checks that the fixture does so.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from tests.conftest import BUCKET
from tests.unit.test_registry_contract import distinct_models, manifest_for
from treeserve.errors import PreconditionFailed, RegistryError
from treeserve.registry.model_registry import ModelRegistry, Pointer
from treeserve.registry.store import InMemoryRegistryStore, S3RegistryStore

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

MODEL = "churn"
THREADS = 16


@pytest.fixture(autouse=True)
def _atomic_s3(atomic_moto_s3: None) -> None:
    """Every test here runs against moto with S3's per-request atomicity."""


@pytest.fixture(scope="module")
def models() -> list[bytes]:
    return distinct_models(THREADS)


def _versioned_bucket(client: Any) -> Any:
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


@pytest.fixture
def inprocess_s3(aws: None) -> Any:
    from treeserve.aws import s3_client

    return _versioned_bucket(s3_client())


@pytest.fixture
def server_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A moto server on loopback; the shared client reaches it through AWS_ENDPOINT_URL."""
    import urllib.request

    from moto.server import ThreadedMotoServer

    from treeserve.aws import reset_clients, s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    reset_clients()
    try:
        yield _versioned_bucket(s3_client())
    finally:
        reset_clients()
        # The server shares moto's global backends with in-process mocks: leave them empty.
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(reset).close()  # noqa: S310 - the loopback URL built above
        server.stop()


@pytest.fixture(params=["inprocess", "server"])
def s3_client(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_s3")


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``count`` threads released at once; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def object_versions(client: Any, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Every stored version of every key under ``prefix`` (S3's own record of each write)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    paginator = client.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        for v in page.get("Versions", []):
            by_key.setdefault(v["Key"], []).append(v)
        assert not page.get("DeleteMarkers")
    return by_key


def pointer_writes(client: Any, registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every pointer ever written (in no particular order)."""
    versions = object_versions(client, registry.current_key).get(registry.current_key, [])
    return [
        orjson.loads(
            client.get_object(Bucket=BUCKET, Key=registry.current_key, VersionId=v["VersionId"])[
                "Body"
            ].read()
        )
        for v in versions
    ]


def assert_linear_history(writes: list[dict[str, Any]], latest: Pointer) -> None:
    """No lost update: each pointer written replaced the one written just before it.

    S3 keeps every write of current.json. ``promoted_at`` is taken after reading the pointer a
    write replaces, so it orders successful writes; in that order each write must name the one
    before it as ``previous``. A write based on a stale read (a lost update) breaks the chain.
    """
    assert len({w["promoted_at"] for w in writes}) == len(writes)
    ordered = sorted(writes, key=lambda w: w["promoted_at"])
    assert ordered[0]["previous"] is None
    for before, after in itertools.pairwise(ordered):
        assert after["previous"] == before["version"], (before, after)
    assert ordered[-1]["version"] == latest.version
    assert ordered[-1]["promoted_at"] == latest.promoted_at


def test_sixteen_concurrent_publishers_each_get_their_own_version(
    s3_client: Any, models: list[bytes]
) -> None:
    registry = ModelRegistry(S3RegistryStore(BUCKET, s3_client), MODEL)

    def publish(i: int) -> tuple[int, Pointer]:
        version = registry.register(models[i], manifest_for(models[i]))
        return version, registry.promote(version)

    results = run_together(THREADS, publish)
    versions = [v for v, _ in results]
    assert sorted(versions) == list(range(1, THREADS + 1))  # distinct, none lost or skipped
    assert registry.versions() == list(range(1, THREADS + 1))
    for i, (version, pointer) in enumerate(results):
        assert pointer.version == version
        assert registry.manifest(version).sha256 == hashlib.sha256(models[i]).hexdigest()
        assert registry.model_bytes(version) == models[i]

    # Never overwritten: S3 holds exactly one object version of every version object.
    stored = object_versions(s3_client, f"registry/{MODEL}/versions/")
    assert len(stored) == 2 * THREADS
    assert {key: len(v) for key, v in stored.items() if len(v) != 1} == {}

    # The pointer ends at a version that exists, with its bytes' sha256.
    current = registry.current()
    assert current is not None
    assert current.version in versions
    assert current.sha256 == registry.manifest(current.version).sha256
    # Every promotion wrote once, each on top of the one before (no lost update).
    writes = pointer_writes(s3_client, registry)
    assert len(writes) == THREADS
    assert_linear_history(writes, current)


def test_promotions_racing_rollbacks_leave_one_consistent_state(
    s3_client: Any, models: list[bytes]
) -> None:
    registry = ModelRegistry(S3RegistryStore(BUCKET, s3_client), MODEL)
    count = 4
    for model in models[:count]:
        registry.register(model, manifest_for(model))
    for version in range(1, count + 1):
        registry.promote(version)
    writes_before = len(pointer_writes(s3_client, registry))
    rng = random.Random(7)
    plan = [
        ("promote", rng.randint(1, count)) if i % 2 else ("rollback", 0) for i in range(THREADS)
    ]

    def act(i: int) -> Pointer | None:
        op, version = plan[i]
        try:
            return registry.promote(version) if op == "promote" else registry.rollback()
        except RegistryError:
            return None  # "nothing to roll back to" / "already in service": a valid answer

    results = run_together(THREADS, act)
    current = registry.current()
    assert current is not None
    assert 1 <= current.version <= count
    assert current.sha256 == registry.manifest(current.version).sha256
    assert current.version not in current.history
    assert all(1 <= v <= count for v in current.history)
    writes = pointer_writes(s3_client, registry)
    # Each successful call wrote at most once (a no-op promotion writes nothing).
    assert len(writes) - writes_before <= sum(r is not None for r in results)
    assert_linear_history(writes, current)


def test_moto_keeps_s3s_atomicity_under_the_lock(s3_client: Any) -> None:
    """Compare-and-swap increments: every successful conditional write counts exactly once."""
    store = S3RegistryStore(BUCKET, s3_client)
    store.put("counter", b"0")
    succeeded = [0] * THREADS

    def increment(i: int) -> None:
        for _ in range(10):
            seen = store.get("counter")
            try:
                store.put("counter", str(int(seen.body) + 1).encode(), if_match=seen.etag)
            except PreconditionFailed:
                continue
            succeeded[i] += 1

    run_together(THREADS, increment)
    assert int(store.get("counter").body) == sum(succeeded) > 0


def test_the_in_memory_fake_keeps_the_same_promises(models: list[bytes]) -> None:
    """The fake other tests use for the registry is just as safe under threads."""
    store = InMemoryRegistryStore()
    registry = ModelRegistry(store, MODEL)

    def publish(i: int) -> int:
        version = registry.register(models[i], manifest_for(models[i]))
        registry.promote(version)
        return version

    versions = run_together(THREADS, publish)
    assert sorted(versions) == list(range(1, THREADS + 1))
    version_keys = {k: n for k, n in store.writes.items() if "/versions/" in k}
    assert len(version_keys) == 2 * THREADS
    assert set(version_keys.values()) == {1}  # each written exactly once
    assert store.writes[registry.current_key] == THREADS  # every promotion wrote once
    current = registry.current()
    assert current is not None
    assert current.version in versions
