"""Races through the real refresh handler: concurrent uploads, duplicate and reordered events,
promotions and rollbacks racing the refresh function.

The bucket is versioned, so S3 keeps every write of ``current.json``: a lost update would show as
a pointer whose ``previous`` is not the version the pointer before it named. moto checks
conditions and writes without a lock, unlike S3 (see tests/integration/test_registry_concurrency.py,
which measured lost updates in moto alone), so S3 object requests are serialised here as S3
serialises them, with the same fixture as there.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import BUCKET, TrainedModel, train
from tests.corpus import make_package
from tests.inference_support import manifest_for
from tests.reliability import stack
from treeserve.errors import RegistryError
from treeserve.registry.model_registry import ModelRegistry, Pointer, upload_id
from treeserve.registry.store import S3RegistryStore

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _atomic_s3(atomic_moto_s3: None) -> None:
    """Every test here runs against moto with S3's per-request atomicity."""


@pytest.fixture
def refresh(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    stack.set_env(monkeypatch)
    return stack.load_handler("refresh")


@pytest.fixture(scope="module")
def models() -> list[TrainedModel]:
    return [train("binary:logistic", n=120, rounds=3, seed=seed) for seed in range(5)]


def _registry() -> ModelRegistry:
    return ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)


def _run_concurrently(calls: list[Callable[[], Any]], threads: int = 6) -> list[Any]:
    """Run the calls on a thread pool, all released at the same moment."""
    go = threading.Event()

    def start(call: Callable[[], Any]) -> Any:
        go.wait(timeout=30)
        try:
            return call()
        except Exception as exc:  # a raised invocation is an outcome too (Lambda retries it)
            return exc

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(start, call) for call in calls]
        go.set()
        return [f.result() for f in futures]


def _complete_versions(registry: ModelRegistry, s3: Any) -> dict[int, str]:
    """Every committed version, checked whole: version -> sha256 of its model."""
    shas = {}
    for version in registry.versions():
        manifest = registry.manifest(version)
        body = s3.get_object(Bucket=BUCKET, Key=registry.model_key(version))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == manifest.sha256, version
        shas[version] = manifest.sha256
    return shas


def _pointer_history(s3: Any, registry: ModelRegistry) -> list[Pointer]:
    """Every write of current.json, oldest first (S3 object versions)."""
    listing = s3.list_object_versions(Bucket=BUCKET, Prefix=registry.current_key)
    # S3 lists the versions of a key newest first (LastModified has only second resolution).
    entries = [v for v in listing.get("Versions", []) if v["Key"] == registry.current_key]
    entries.reverse()
    pointers = []
    for entry in entries:
        obj = s3.get_object(Bucket=BUCKET, Key=registry.current_key, VersionId=entry["VersionId"])
        pointers.append(Pointer.from_json(obj["Body"].read()))
    return pointers


def _canonical_versions(shas: dict[int, str]) -> tuple[dict[str, int], list[int]]:
    """sha256 -> its lowest version, and the other versions holding the same bytes.

    DESIGN.md says the same bytes never become two versions; the refresh function documents
    that two deliveries racing through registration can each commit one, and that only the
    lowest is ever promoted or reported. The tests hold it to that and report the extras.
    """
    canonical: dict[str, int] = {}
    for version, sha in sorted(shas.items()):
        canonical.setdefault(sha, version)
    return canonical, sorted(set(shas) - set(canonical.values()))


def _assert_extra_versions_harmless(
    registry: ModelRegistry, extra: list[int], chain: list[Pointer], keys: set[str]
) -> None:
    """Extra copies were never in service and trace back to one of the uploads."""
    assert not {p.version for p in chain} & set(extra), "a non-canonical copy was promoted"
    for version in extra:
        assert registry.manifest(version).source.get("key") in keys


def _assert_chain(pointers: list[Pointer]) -> None:
    """No lost update: each pointer was computed from the one before it."""
    assert pointers
    assert pointers[0].previous is None
    for before, after in itertools.pairwise(pointers):
        assert after.previous == before.version, (before, after)


def test_concurrent_uploads_and_redeliveries_end_in_one_consistent_state(
    refresh: Any, s3: Any, models: list[TrainedModel], reliability_report: Any
) -> None:
    """Four models uploaded at once, the first one's bytes uploaded again under another key, and
    one upload's event delivered three times, all handled at once on six threads."""
    records = [
        stack.upload(s3, f"incoming/default/m{i}.tar.gz", make_package(m, holdout=False))
        for i, m in enumerate(models[:4])
    ]
    same_bytes = stack.upload(
        s3, "incoming/default/copy-of-m0.tar.gz", make_package(models[0], holdout=False)
    )
    events = [*records, same_bytes, records[1], records[1]]
    random.Random(7).shuffle(events)
    results = _run_concurrently(
        [lambda r=r: stack.invoke(refresh, stack.s3_event(r)) for r in events]
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []

    registry = _registry()
    shas = _complete_versions(registry, s3)
    outcomes = {}
    for record in [*records, same_bytes]:
        obj = record["s3"]["object"]
        key = obj["key"]
        stored = registry.outcome(upload_id(key, obj["eTag"]))
        assert stored is not None, f"{key}: no outcome recorded"
        outcomes[key] = stored
    statuses = Counter(o["status"] for o in outcomes.values())
    canonical, extra = _canonical_versions(shas)
    chain = _pointer_history(s3, registry)
    pointer = registry.current()
    assert pointer is not None
    # Every upload accounted for: one version per distinct model, one duplicate, nothing else.
    assert len(canonical) == len(records)
    assert statuses["duplicate"] == 1
    assert statuses["promoted"] + statuses["registered"] == len(records)
    pair = [outcomes["incoming/default/m0.tar.gz"], outcomes["incoming/default/copy-of-m0.tar.gz"]]
    assert pair[0]["version"] == pair[1]["version"]
    assert {o["status"] for o in pair} & {"promoted", "registered"}
    # Outcomes only name the canonical (lowest) version of each model's bytes.
    assert all(o["version"] == canonical[shas[o["version"]]] for o in outcomes.values())
    _assert_extra_versions_harmless(
        registry, extra, chain, {r["s3"]["object"]["key"] for r in events}
    )
    # The three deliveries of m1 reported one outcome.
    m1 = [r["outcomes"][0] for r in results if r["outcomes"][0]["key"].endswith("/m1.tar.gz")]
    assert len({(o["upload_id"], o["version"], o["status"]) for o in m1}) == 1
    assert sum(not o["redelivered"] for o in m1) <= 1
    # Promotion only moves forward: the highest version is in service, and no update was lost.
    assert pointer.version == max(canonical.values())
    assert pointer.sha256 == shas[pointer.version]
    _assert_chain(chain)
    reliability_report(
        "race: concurrent uploads",
        [
            f"{len(events)} events on 6 threads ({len(records)} models, 1 same-bytes copy, "
            f"1 event x3): {dict(statuses)}; versions {sorted(shas)} (extra copies of the same "
            f"bytes: {extra}); pointer at v{pointer.version}; {len(chain)} pointer writes, "
            "chain intact",
        ],
    )


def test_overwritten_key_with_reordered_and_duplicated_events(
    refresh: Any, s3: Any, models: list[TrainedModel], reliability_report: Any
) -> None:
    """Two objects written to one key (A then B); their events arrive B, A, B, A at once."""
    key = "incoming/default/model.tar.gz"
    first = stack.upload(s3, key, make_package(models[2], holdout=False))
    second = stack.upload(s3, key, make_package(models[3], holdout=False))
    assert first["s3"]["object"]["sequencer"] < second["s3"]["object"]["sequencer"]
    results = _run_concurrently(
        [
            lambda r=r: stack.invoke(refresh, stack.s3_event(r))
            for r in (second, first, second, first)
        ],
        threads=4,
    )
    assert [r for r in results if isinstance(r, Exception)] == []
    registry = _registry()
    shas = _complete_versions(registry, s3)
    pointer = registry.current()
    assert pointer is not None
    by_object = {
        name: {
            o["outcomes"][0]["status"]
            for o in results
            if o["outcomes"][0]["etag"] == r["s3"]["object"]["eTag"]
        }
        for name, r in (("A", first), ("B", second))
    }
    reliability_report(
        "race: one key overwritten, events reordered and duplicated",
        [
            f"outcomes {by_object}; versions {sorted(shas)} (extra copies of the same bytes: "
            f"{sorted(set(shas) - {min(shas)})}); pointer at v{pointer.version}"
        ],
    )
    canonical, extra = _canonical_versions(shas)
    _assert_extra_versions_harmless(registry, extra, _pointer_history(s3, registry), {key})
    # A was overwritten before its events were handled: superseded, never a version.
    assert by_object["A"] == {"ignored"}
    assert by_object["B"] == {"promoted"}
    assert len(canonical) == 1
    assert pointer.version == next(iter(canonical.values()))
    # The version is B's model: it predicts as B does.
    version_source = registry.manifest(pointer.version).source
    assert (
        version_source.get("etag", second["s3"]["object"]["eTag"]) == second["s3"]["object"]["eTag"]
    )


def test_promote_and_rollback_race_the_refresh_function(
    refresh: Any, s3: Any, models: list[TrainedModel], reliability_report: Any
) -> None:
    """CLI-style promotions and rollbacks on two threads each while the refresh function
    promotes two new uploads: every pointer write follows from the one before it, and the
    pointer ends on a complete version."""
    registry = _registry()
    for m in models[:3]:
        registry.register(m.ubj(), manifest_for(m))  # directly: no sandbox run needed
    registry.promote(1)
    uploads = [
        stack.upload(s3, f"incoming/default/new{i}.tar.gz", make_package(m, holdout=False))
        for i, m in enumerate(models[3:5])
    ]
    done: Counter[str] = Counter()
    lock = threading.Lock()

    def operator(seed: int, action: str) -> None:
        rng = random.Random(seed)
        mine = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
        for _ in range(6):
            time.sleep(rng.uniform(0, 0.3))  # spread the calls over the refresh's run
            try:
                if action == "promote":
                    mine.promote(rng.choice(mine.versions()))
                else:
                    mine.rollback()
                result = action
            except RegistryError as exc:  # "nothing to roll back", "already in service"
                result = f"{action} refused ({type(exc).__name__})"
            with lock:
                done[result] += 1

    calls: list[Callable[[], Any]] = [
        lambda: operator(1, "promote"),
        lambda: operator(2, "promote"),
        lambda: operator(3, "rollback"),
        lambda: operator(4, "rollback"),
        *[lambda r=r: stack.invoke(refresh, stack.s3_event(r)) for r in uploads],
    ]
    results = _run_concurrently(calls)
    assert [r for r in results if isinstance(r, Exception)] == []
    shas = _complete_versions(registry, s3)
    assert len(shas) == 5
    pointer = registry.current()
    assert pointer is not None
    assert pointer.sha256 == shas[pointer.version]
    chain = _pointer_history(s3, registry)
    _assert_chain(chain)
    assert chain[-1].version == pointer.version
    for written in chain:
        assert written.sha256 == shas[written.version]
    statuses = [r["outcomes"][0]["status"] for r in results if isinstance(r, dict)]
    assert all(s in ("promoted", "registered") for s in statuses)
    reliability_report(
        "race: promote and rollback vs the refresh function",
        [
            f"operator calls {dict(done)}; refresh {statuses}; {len(chain)} pointer writes, "
            f"each computed from the one before; final v{pointer.version}",
        ],
    )
