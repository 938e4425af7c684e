"""routing.json: its document, the canary's stable split, compare-and-swap, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_registry_contract import MODEL, distinct_models, manifest_for
from treeserve.errors import NotFound
from treeserve.registry.model_registry import ModelRegistry, PointerUnreadable
from treeserve.registry.routing import (
    Canary,
    Routing,
    RoutingInvalid,
    Shadow,
    canary_bucket,
    ids_key,
)
from treeserve.registry.store import InMemoryRegistryStore


def test_a_routing_round_trips_and_absent_parts_stay_absent() -> None:
    routing = Routing(Canary("challenger", 30.0), Shadow("staging", 0.5), "t")
    again = Routing.from_json(routing.to_json())
    assert again.canary == Canary("challenger", 30.0)
    assert again.shadow == Shadow("staging", 0.5)
    assert again.aliases() == {"challenger", "staging"}
    assert not Routing.from_dict({}).active


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"canary": {"alias": "champion", "percent": 5}}, "already answers"),
        ({"canary": {"alias": "c", "percent": 0}}, "percent must be in"),
        ({"canary": {"alias": "c", "percent": 101}}, "percent must be in"),
        ({"canary": {"alias": "c", "percent": "5"}}, "must be a number"),
        ({"canary": {"alias": "c", "percent": True}}, "must be a number"),
        ({"shadow": {"alias": "s", "sample": 1.5}}, "sample must be in"),
        ({"shadow": {"alias": "../x", "sample": 0.5}}, "alias must be"),
        ({"canary": {"alias": "c"}}, "canary must be"),
        ({"mirror": {}}, "unknown keys"),
        ([], "JSON object"),
    ],
)
def test_a_routing_that_cannot_be_honoured_says_why(doc: object, says: str) -> None:
    with pytest.raises(RoutingInvalid, match=says):
        Routing.from_dict(doc)


def test_the_canary_split_is_stable_and_uniform() -> None:
    keys = [f"customer-{i}".encode() for i in range(20_000)]
    points = np.array([canary_bucket(k) for k in keys])
    assert points.min() >= 0
    assert points.max() < 100
    assert points.tolist() == [canary_bucket(k) for k in keys]  # same key, same point
    share = float((points < 30).mean()) * 100
    assert abs(share - 30) < 1.5, share
    # uniform across the range, not just at 30
    counts, _ = np.histogram(points, bins=10, range=(0, 100))
    assert counts.min() > 1800, counts
    assert counts.max() < 2200, counts


def _registry_with_versions(n: int) -> ModelRegistry:
    """A registry holding ``n`` real versions (their routing is all that is exercised)."""
    registry = ModelRegistry(InMemoryRegistryStore(), MODEL)
    for model in distinct_models(n):
        registry.register(model, manifest_for(model))
    return registry


def test_set_routing_needs_the_alias_set_and_swaps() -> None:
    registry = _registry_with_versions(2)
    assert not registry.routing().active
    with pytest.raises(NotFound, match="alias set challenger"):
        registry.set_routing(lambda seen: Routing(Canary("challenger", 30.0)))
    registry.set_alias("challenger", 2)
    routed = registry.set_routing(lambda seen: Routing(Canary("challenger", 30.0), seen.shadow))
    assert routed.etag
    assert routed.set_at
    assert registry.routing().canary == Canary("challenger", 30.0)
    unchanged, changed = registry.routing_if_changed(routed.etag)
    assert not changed
    assert unchanged.etag == routed.etag
    registry.set_alias("staging", 1)
    registry.set_routing(lambda seen: Routing(seen.canary, Shadow("staging", 0.25)))
    both = registry.routing()
    assert both.canary == Canary("challenger", 30.0)
    assert both.shadow == Shadow("staging", 0.25)
    _, changed = registry.routing_if_changed(routed.etag)
    assert changed


def test_an_unreadable_routing_is_reported_and_can_be_replaced() -> None:
    registry = _registry_with_versions(1)
    registry.store.put(registry.routing_key, b'{"canary": 3}')
    with pytest.raises(PointerUnreadable, match="treeserve route"):
        registry.routing()
    registry.set_routing(lambda seen: Routing())
    assert not registry.routing().active


def test_rollback_clears_the_routing_that_pointed_at_the_rolled_back_version() -> None:
    registry = _registry_with_versions(3)
    registry.promote(1)
    registry.promote(2)
    registry.set_alias("challenger", 2)  # now the champion itself
    registry.set_alias("staging", 3)
    registry.set_routing(lambda seen: Routing(Canary("challenger", 10.0), Shadow("staging", 1.0)))
    pointer = registry.rollback()
    assert pointer.version == 1
    after = registry.routing()
    assert after.canary is None  # pointed at version 2, rolled back from
    assert after.shadow == Shadow("staging", 1.0)  # version 3 was not rolled back


def test_rollback_clearing_says_what_it_cleared() -> None:
    registry = _registry_with_versions(3)
    registry.promote(1)
    registry.promote(2)
    registry.set_alias("challenger", 2)
    registry.set_routing(lambda seen: Routing(Canary("challenger", 10.0)))
    pointer, cleared = registry.rollback_clearing()
    assert (pointer.version, pointer.previous, cleared) == (1, 2, ["canary challenger"])
    registry.promote(2)
    assert registry.rollback_clearing()[1] == []  # nothing left to clear


def test_the_ids_key_is_unambiguous_and_a_single_id_is_its_own_key() -> None:
    assert ids_key(["customer-42"]) == repr("customer-42").encode()
    assert ids_key([42]) == b"42"
    # distinct id lists never share a key: a separator inside an id, types, order
    keys = [
        ids_key(ids)
        for ids in (
            ["a", "b"],
            ["a,b"],
            ["a\x1fb"],
            ["a", "b", ""],
            ["b", "a"],
            [7],
            ["7"],
            [7, 8],
            ["7", 8],
        )
    ]
    assert len(set(keys)) == len(keys)
    assert ids_key(["a", "b"]) == ids_key(["a", "b"])  # stable
