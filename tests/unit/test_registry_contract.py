"""One contract, two stores: the in-memory fake and S3 (moto, in-process) behave the same.

The first half checks the storage protocol (conditional create/match, the 304 path, pagination);
the second half checks :class:`ModelRegistry` on top of each store, with real XGBoost models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, train
from treeserve.errors import (
    ConfigurationError,
    ModelLoadError,
    NoModelInService,
    NotFound,
    PreconditionFailed,
    RegistryError,
)
from treeserve.model.manifest import ModelManifest
from treeserve.registry.model_registry import HISTORY_LIMIT, ModelRegistry, Pointer, upload_id
from treeserve.registry.store import (
    InMemoryRegistryStore,
    RegistryStore,
    S3RegistryStore,
)

MODEL = "churn"
SMALL_PAGE = 3


def manifest_for(model_ubj: bytes, name: str = MODEL, **extra: Any) -> ModelManifest:
    """The manifest the refresh function would write for these (real) model bytes."""
    return ModelManifest(
        name=name,
        sha256=hashlib.sha256(model_ubj).hexdigest(),
        model_size=len(model_ubj),
        xgboost_version=xgb.__version__,
        objective="binary:logistic",
        task="binary",
        num_features=6,
        feature_names=[f"f{i}" for i in range(6)],
        feature_types=["float"] * 6,
        **extra,
    )


def distinct_models(count: int) -> list[bytes]:
    """``count`` real, pairwise different XGBoost models (UBJ), small and quick to train."""
    models = [
        train("binary:logistic", n=80, rounds=2, seed=i, shift=0.1 * i).ubj() for i in range(count)
    ]
    assert len({hashlib.sha256(m).hexdigest() for m in models}) == count
    return models


@pytest.fixture(scope="module")
def models() -> list[bytes]:
    return distinct_models(5)


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> Iterator[RegistryStore]:
    """Each contract test runs against both stores. S3 pages are tiny so paging is exercised."""
    if request.param == "memory":
        yield InMemoryRegistryStore()
        return
    request.getfixturevalue("s3")
    yield S3RegistryStore(BUCKET, page_size=SMALL_PAGE)


@pytest.fixture
def registry(store: RegistryStore) -> ModelRegistry:
    return ModelRegistry(store, MODEL)


def quoted_md5(body: bytes) -> str:
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


# --- the storage protocol ------------------------------------------------------------------------


def test_put_get_head_round_trip_with_s3_etags(store: RegistryStore) -> None:
    etag = store.put("a/b.json", b'{"x": 1}')
    assert etag == quoted_md5(b'{"x": 1}')
    obj = store.get("a/b.json")
    assert (obj.body, obj.etag) == (b'{"x": 1}', etag)
    assert store.head("a/b.json") == etag
    assert store.head("a/missing.json") is None
    with pytest.raises(NotFound):
        store.get("a/missing.json")


def test_conditional_create_refuses_an_existing_key(store: RegistryStore) -> None:
    store.put("k", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"second", if_none_match=True)
    assert store.get("k").body == b"first"


def test_conditional_update_needs_the_current_etag(store: RegistryStore) -> None:
    first = store.put("k", b"one")
    second = store.put("k", b"two", if_match=first)
    assert store.get("k").body == b"two"
    with pytest.raises(PreconditionFailed):
        store.put("k", b"three", if_match=first)  # stale: somebody else wrote "two"
    with pytest.raises(PreconditionFailed):
        store.put("absent", b"x", if_match=second)  # If-Match on an absent key never holds
    assert store.get("k").body == b"two"
    assert store.head("absent") is None


def test_conditional_get_answers_unchanged_without_the_body(store: RegistryStore) -> None:
    etag = store.put("p", b"v1")
    assert store.get_if_changed("p", etag) is None
    assert store.get_if_changed("p", etag.strip('"')) is None  # quotes do not matter
    assert store.get_if_changed("p", None) is not None
    store.put("p", b"v2", if_match=etag)
    changed = store.get_if_changed("p", etag)
    assert changed is not None
    assert changed.body == b"v2"
    with pytest.raises(NotFound):
        store.get_if_changed("nothing", etag)


def test_list_keys_pages_through_everything_under_a_prefix(store: RegistryStore) -> None:
    keys = [f"pre/{i:03d}" for i in range(11)]
    for key in reversed(keys):
        store.put(key, b"x")
    store.put("prefix-but-not-under/x", b"x")
    store.put("other/1", b"x")
    if isinstance(store, S3RegistryStore):
        calls: list[str] = []
        store.s3.meta.events.register(
            "before-call.s3.ListObjectsV2", lambda **_: calls.append("list")
        )
    assert list(store.list_keys("pre/")) == keys
    if isinstance(store, S3RegistryStore):
        assert len(calls) == -(-len(keys) // SMALL_PAGE)  # 11 keys in pages of 3: 4 requests
    assert list(store.list_keys("nothing/")) == []


# --- the registry --------------------------------------------------------------------------------


def test_register_allocates_consecutive_immutable_versions(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    assert registry.versions() == []
    for expected, model in enumerate(models[:3], start=1):
        manifest = manifest_for(model)
        assert registry.register(model, manifest) == expected
        assert manifest.version == expected
        assert manifest.created_at
    assert registry.versions() == [1, 2, 3]
    stored = registry.manifest(2)
    assert stored.version == 2
    assert stored.sha256 == hashlib.sha256(models[1]).hexdigest()
    assert registry.model_bytes(2) == models[1]
    # The layout is DESIGN.md's, plus the by-sha256 index.
    keys = set(store.list_keys("registry/"))
    for n in (1, 2, 3):
        assert f"registry/{MODEL}/versions/{n}/model.ubj" in keys
        assert f"registry/{MODEL}/versions/{n}/manifest.json" in keys
    assert {k for k in keys if "/by-sha256/" not in k and "/versions/" not in k} == set()


def test_register_refuses_a_manifest_that_does_not_describe_the_bytes(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.register(models[0], manifest_for(models[1]))
    assert list(store.list_keys("registry/")) == []


def test_tampered_model_bytes_are_refused_on_read(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    registry.register(models[0], manifest_for(models[0]))
    store.put(registry.model_key(1), models[1])  # someone overwrote the immutable object
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.model_bytes(1)


def test_an_orphan_model_is_skipped_and_never_a_version(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    """A writer that died between model.ubj and manifest.json leaves an orphan number."""
    registry.register(models[0], manifest_for(models[0]))
    orphan_sha = hashlib.sha256(models[1]).hexdigest()
    store.put(registry.model_key(2), models[1], if_none_match=True)
    store.put(f"registry/{MODEL}/by-sha256/{orphan_sha}/2", b'{"version": 2}')
    assert registry.versions() == [1]
    with pytest.raises(NotFound):
        registry.manifest(2)
    assert registry.find_version_by_sha256(orphan_sha) is None
    with pytest.raises(NotFound):
        registry.promote(2)
    assert registry.register(models[2], manifest_for(models[2])) == 3
    assert registry.versions() == [1, 3]
    assert store.get(registry.model_key(2)).body == models[1]  # untouched


def test_find_version_by_sha256(registry: ModelRegistry, models: list[bytes]) -> None:
    first = registry.register(models[0], manifest_for(models[0]))
    registry.register(models[1], manifest_for(models[1]))
    assert registry.find_version_by_sha256(hashlib.sha256(models[0]).hexdigest()) == first
    assert registry.find_version_by_sha256(hashlib.sha256(models[1]).hexdigest()) == 2
    assert registry.find_version_by_sha256(hashlib.sha256(b"never").hexdigest()) is None
    with pytest.raises(ValueError, match="sha256"):
        registry.find_version_by_sha256("../../etc")


def test_promote_writes_a_pointer_read_cheaply_by_etag(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    for model in models[:2]:
        registry.register(model, manifest_for(model))
    assert registry.current() is None
    assert registry.current_if_changed(None) == (None, False)
    with pytest.raises(NotFound, match="no version 9"):
        registry.promote(9)
    first = registry.promote(1)
    assert (first.version, first.previous, first.history) == (1, None, ())
    assert first.sha256 == hashlib.sha256(models[0]).hexdigest()
    assert registry.current() == first
    raw = orjson.loads(store.get(registry.current_key).body)
    assert {"version", "sha256", "promoted_at", "previous"} <= raw.keys()
    assert raw["version"] == 1
    assert registry.current_if_changed(first.etag) == (None, False)
    second = registry.promote(2)
    assert (second.version, second.previous, second.history) == (2, 1, (1,))
    pointer, changed = registry.current_if_changed(first.etag)
    assert changed
    assert pointer == second
    # Promoting what is already in service writes nothing.
    assert registry.promote(2).etag == second.etag


def test_promote_with_an_expected_etag_is_one_compare_and_swap(
    registry: ModelRegistry, models: list[bytes]
) -> None:
    for model in models[:3]:
        registry.register(model, manifest_for(model))
    with_nothing = registry.promote(1, expected_etag=None)  # None: "no pointer yet"
    with pytest.raises(PreconditionFailed):
        registry.promote(2, expected_etag=None)  # a pointer exists now
    moved = registry.promote(2, expected_etag=with_nothing.etag)
    with pytest.raises(PreconditionFailed):
        registry.promote(3, expected_etag=with_nothing.etag)  # stale view of the pointer
    assert registry.current() == moved


def test_promote_only_if_newer_never_moves_the_pointer_back(
    registry: ModelRegistry, models: list[bytes]
) -> None:
    for model in models[:3]:
        registry.register(model, manifest_for(model))
    registry.promote(3)
    kept = registry.promote(2, only_if_newer=True)
    assert kept.version == 3
    assert registry.current() == kept


def test_rollback_walks_back_through_promotions(
    registry: ModelRegistry, models: list[bytes]
) -> None:
    with pytest.raises(NoModelInService):
        registry.rollback()
    for model in models[:3]:
        registry.register(model, manifest_for(model))
    registry.promote(1)
    with pytest.raises(RegistryError, match="rollback --to"):
        registry.rollback()
    registry.promote(2)
    registry.promote(3)
    back = registry.rollback()
    assert (back.version, back.previous, back.history) == (2, 3, (1,))
    assert back.sha256 == hashlib.sha256(models[1]).hexdigest()
    assert registry.rollback().version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()
    assert registry.current().version == 1  # type: ignore[union-attr]
    again = registry.rollback(to=3)
    assert (again.version, again.previous) == (3, 1)
    with pytest.raises(RegistryError, match="already in service"):
        registry.rollback(to=3)
    with pytest.raises(NotFound):
        registry.rollback(to=42)
    assert registry.current() == again


def test_history_is_bounded_and_deduplicated(models: list[bytes]) -> None:
    # Pure pointer arithmetic: the memory store is enough.
    registry = ModelRegistry(InMemoryRegistryStore(), MODEL)
    registry.register(models[0], manifest_for(models[0]))
    registry.register(models[1], manifest_for(models[1]))
    for _ in range(HISTORY_LIMIT + 5):
        registry.promote(1)
        registry.promote(2)
    pointer = registry.current()
    assert pointer is not None
    assert pointer.history == (1,)  # deduplicated
    # Legacy pointers without history still roll back once, to `previous`.
    legacy = Pointer.from_json(b'{"version": 2, "sha256": "x", "promoted_at": "", "previous": 1}')
    assert legacy.history == (1,)


def test_a_corrupt_pointer_is_a_clear_error_that_promote_repairs(
    registry: ModelRegistry, store: RegistryStore, models: list[bytes]
) -> None:
    registry.register(models[0], manifest_for(models[0]))
    store.put(registry.current_key, b"{not json")
    with pytest.raises(RegistryError, match="treeserve promote"):
        registry.current()
    with pytest.raises(RegistryError, match="treeserve promote"):
        registry.rollback()
    repaired = registry.promote(1)
    assert (repaired.version, repaired.previous) == (1, None)
    assert registry.current() == repaired


def test_rejections_are_recorded_once_and_listed_newest_first(
    registry: ModelRegistry, store: RegistryStore
) -> None:
    source = {"bucket": BUCKET, "key": "incoming/churn/a.pkl", "etag": '"e1"', "size": 10}
    registry.reject("u1", "pickle", "pickle content is never loaded", source)
    registry.reject("u1", "other", "a redelivery must not change the record", source)
    registry.reject("u2", "corrupt", "truncated archive", {**source, "key": "incoming/churn/b"})
    record = orjson.loads(store.get(f"registry/{MODEL}/rejected/u1.json").body)
    assert record["code"] == "pickle"
    assert record["reason"] == "pickle content is never loaded"
    assert record["source"] == source
    assert record["upload_id"] == "u1"
    assert record["rejected_at"]
    assert [r["upload_id"] for r in registry.rejections()] == ["u2", "u1"]
    assert len(registry.rejections(limit=1)) == 1
    assert registry.rejection("u2")["code"] == "corrupt"  # type: ignore[index]
    assert registry.rejection("nope") is None
    with pytest.raises(ValueError, match="upload id"):
        registry.reject("../x", "c", "m", {})


def test_outcomes_are_create_only(registry: ModelRegistry) -> None:
    uid = upload_id("incoming/churn/m.ubj", '"abc"')
    assert registry.outcome(uid) is None
    first = {"status": "promoted", "version": 1}
    assert registry.record_outcome(uid, first) == first
    assert registry.record_outcome(uid, {"status": "rejected"}) == first
    assert registry.outcome(uid) == first


def test_upload_id_is_stable_and_ignores_etag_quotes() -> None:
    uid = upload_id("incoming/m/a.ubj", '"0123abc"')
    assert uid == upload_id("incoming/m/a.ubj", "0123abc")
    assert len(uid) == 20
    assert int(uid, 16) >= 0
    assert uid != upload_id("incoming/m/a.ubj", '"0123abd"')
    assert uid != upload_id("incoming/m/b.ubj", '"0123abc"')


@pytest.mark.parametrize("name", ["a/b", "", "../x", ".hidden", "x" * 65, "a b"])
def test_model_names_are_single_safe_key_segments(name: str) -> None:
    with pytest.raises(ConfigurationError, match="model name"):
        ModelRegistry(InMemoryRegistryStore(), name)


# --- aliases --------------------------------------------------------------------------------------


def test_an_alias_is_set_moved_and_cleared_by_compare_and_swap(
    registry: ModelRegistry, models: list[bytes]
) -> None:
    v1 = registry.register(models[0], manifest_for(models[0]))
    v2 = registry.register(models[1], manifest_for(models[1]))
    assert registry.alias("challenger") is None
    assert registry.alias_if_changed("challenger", None) == (None, False)
    first = registry.set_alias("challenger", v1)
    read = registry.alias("challenger")
    assert read is not None
    assert (read.version, read.sha256, read.etag) == (
        v1,
        registry.manifest(v1).sha256,
        first.etag,
    )
    assert registry.alias_if_changed("challenger", first.etag) == (None, False)
    moved = registry.set_alias("challenger", v2)
    pointer, changed = registry.alias_if_changed("challenger", first.etag)
    assert changed
    assert pointer is not None
    assert pointer.version == v2 == moved.version
    assert set(registry.aliases()) == {"challenger"}
    assert registry.clear_alias("challenger") is True
    assert registry.alias("challenger") is None
    assert registry.alias_if_changed("challenger", moved.etag) == (None, True)
    assert registry.aliases() == {}
    assert registry.clear_alias("challenger") is False
    with pytest.raises(NotFound):
        registry.set_alias("challenger", 99)


def test_champion_is_the_pointer_not_an_alias(registry: ModelRegistry, models: list[bytes]) -> None:
    v1 = registry.register(models[0], manifest_for(models[0]))
    registry.promote(v1)
    champion = registry.alias("champion")
    assert champion is not None
    assert champion.version == v1
    with pytest.raises(ValueError, match="promote"):
        registry.set_alias("champion", v1)
    with pytest.raises(ValueError, match="not an alias"):
        registry.alias_key("../x")


def test_model_names_lists_every_model_of_the_registry(
    store: RegistryStore, models: list[bytes]
) -> None:
    from treeserve.registry.model_registry import model_names

    for name in ("b-model", "a.model"):
        ModelRegistry(store, name).register(models[0], manifest_for(models[0], name=name))
    assert model_names(store) == ["a.model", "b-model"]
    assert ModelRegistry(store, "a.model").exists()
    assert not ModelRegistry(store, "other").exists()


def test_list_folders_names_each_folder_once_across_pages(store: RegistryStore) -> None:
    """One entry per folder however many keys it holds (S3's Delimiter listing, paged by
    SMALL_PAGE), none for a key right under the prefix, nothing from a longer prefix."""
    for i in range(5):
        store.put(f"registry/m{i}/versions/1/model.ubj", b"x")
        store.put(f"registry/m{i}/current.json", b"{}")
    store.put("registry/m2/versions/2/model.ubj", b"y")
    store.put("registry/loose.json", b"{}")
    store.put("registry-other/z/current.json", b"{}")
    assert list(store.list_folders("registry/")) == [f"m{i}" for i in range(5)]
    assert list(store.list_folders("registry/m2/versions/")) == ["1", "2"]
    assert list(store.list_folders("registry/none/")) == []
