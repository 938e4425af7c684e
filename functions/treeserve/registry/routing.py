"""``registry/<model>/routing.json``: how live traffic reaches challengers.

::

    {"canary": {"alias": "challenger", "percent": 30.0},
     "shadow": {"alias": "staging", "sample": 0.5},
     "set_at": "2026-12-02T05:00:00Z"}

- **canary**: ``percent`` of the model's unpinned requests are answered by ``alias`` instead of
  the champion. The choice is a deterministic function of the request's row ids (or its request
  id when the client sends none): :func:`canary_bucket` hashes that key to a point in
  ``[0, 100)``, and the request goes to the canary when the point is below ``percent``, so a
  retried request lands on the same version.
- **shadow**: ``sample`` (0..1) of the champion's captured rows are also scored by ``alias``,
  off the request path (the monitoring function scores them); a shadow never answers.

Either part may be absent; ``{}`` (or no object) means all traffic goes to the champion. A
cleared routing is stored as ``{"canary": null, "shadow": null, "cleared_at"}`` (the store never
deletes). The object is changed only by compare-and-swap, like ``current.json``
(:meth:`treeserve.registry.model_registry.ModelRegistry.set_routing`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Canary", "Routing", "RoutingInvalid", "Shadow", "canary_bucket", "ids_key"]


class RoutingInvalid(ValueError):
    """A routing document or request that cannot be honoured (the message says why)."""


def _alias(value: object, where: str) -> str:
    # Late import: model_registry imports this module.
    from treeserve.registry.model_registry import ALIAS_RULE, CHAMPION, valid_alias  # noqa: PLC0415

    if not isinstance(value, str) or not valid_alias(value):
        raise RoutingInvalid(f"{where}: the alias must be {ALIAS_RULE}, got {value!r}")
    if value == CHAMPION:
        raise RoutingInvalid(
            f"{where}: {CHAMPION!r} already answers every request that is not routed; "
            "name the challenger's alias (`treeserve alias set challenger VERSION`)"
        )
    return value


def _number(value: object, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoutingInvalid(f"{where} must be a number in ({low:g}, {high:g}], got {value!r}")
    number = float(value)
    if not low < number <= high:
        raise RoutingInvalid(f"{where} must be in ({low:g}, {high:g}], got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Canary:
    """``percent`` of requests (0 < percent <= 100) answered by ``alias``."""

    alias: str
    percent: float

    def __post_init__(self) -> None:
        _alias(self.alias, "canary")
        _number(self.percent, "canary percent", 0.0, 100.0)

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "percent": self.percent}


@dataclass(frozen=True, slots=True)
class Shadow:
    """``sample`` (0 < sample <= 1) of the champion's captured rows also scored by ``alias``."""

    alias: str
    sample: float

    def __post_init__(self) -> None:
        _alias(self.alias, "shadow")
        _number(self.sample, "shadow sample", 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "sample": self.sample}


@dataclass(frozen=True, slots=True)
class Routing:
    """The live traffic split of one model; ``etag`` is the object's, not in the JSON."""

    canary: Canary | None = None
    shadow: Shadow | None = None
    set_at: str = ""
    etag: str | None = None

    @property
    def active(self) -> bool:
        return self.canary is not None or self.shadow is not None

    def aliases(self) -> set[str]:
        """The aliases this routing sends traffic to."""
        return {part.alias for part in (self.canary, self.shadow) if part is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "canary": self.canary.to_dict() if self.canary else None,
            "shadow": self.shadow.to_dict() if self.shadow else None,
            "set_at": self.set_at,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_dict(cls, data: object, etag: str | None = None) -> Routing:
        """Parse a routing document; RoutingInvalid says what is wrong with it."""
        if not isinstance(data, dict):
            raise RoutingInvalid(f"routing must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"canary", "shadow", "set_at", "cleared_at"}
        if unknown:
            raise RoutingInvalid(f"routing has unknown keys {sorted(unknown)}")
        canary = shadow = None
        raw_canary, raw_shadow = data.get("canary"), data.get("shadow")
        if raw_canary is not None:
            if not isinstance(raw_canary, dict) or set(raw_canary) != {"alias", "percent"}:
                raise RoutingInvalid('canary must be {"alias": ..., "percent": ...}')
            percent = _number(raw_canary["percent"], "canary percent", 0.0, 100.0)
            canary = Canary(_alias(raw_canary["alias"], "canary"), percent)
        if raw_shadow is not None:
            if not isinstance(raw_shadow, dict) or set(raw_shadow) != {"alias", "sample"}:
                raise RoutingInvalid('shadow must be {"alias": ..., "sample": ...}')
            sample = _number(raw_shadow["sample"], "shadow sample", 0.0, 1.0)
            shadow = Shadow(_alias(raw_shadow["alias"], "shadow"), sample)
        return cls(canary, shadow, str(data.get("set_at", "")), etag)

    @classmethod
    def from_json(cls, raw: bytes, etag: str | None = None) -> Routing:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RoutingInvalid(f"routing.json is not JSON ({str(exc)[:120]})") from None
        return cls.from_dict(data, etag)


# Points per percent: the canary's resolution is 1/10,000 of the traffic.
_SCALE = 10_000


def canary_bucket(key: bytes) -> float:
    """A stable point in ``[0, 100)`` for a routing key (the request's ids or request id).

    blake2b of the key: the same key always gives the same point, on every environment and
    Python process (unlike ``hash``), and distinct keys spread uniformly."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return (int.from_bytes(digest, "big") % (100 * _SCALE)) / _SCALE


# Between two ids' reprs: a repr never holds a raw control character, so no two id lists join
# to the same key.
_ID_SEPARATOR = "\x1f"


def ids_key(ids: Sequence[Any]) -> bytes:
    """The routing key of a request's row ids: each id's ``repr`` joined by a separator, so the
    same ids (of the same type: ``7`` is not ``"7"``) give the same key, and a one-row request
    is keyed by its id alone."""
    if len(ids) == 1:
        return repr(ids[0]).encode()
    return _ID_SEPARATOR.join(map(repr, ids)).encode()
