"""The model registry on S3: immutable versions, a compare-and-swap pointer, rejections, outcomes.

Keys under ``registry/<model>/`` (DESIGN.md "S3 layout", plus three additions marked *)::

    versions/<n>/model.ubj          immutable; created with If-None-Match: * -- this allocates n
    versions/<n>/manifest.json      immutable; written last: the commit marker of version n
    current.json                    {"version", "sha256", "promoted_at", "previous", "history"}
                                    changed only by compare-and-swap (If-Match: <etag>)
    rejected/<upload-id>.json       {"upload_id", "code", "reason", "source", "rejected_at"}
  * uploads/<upload-id>.json        the outcome of one upload (create-only), read by
                                    ``treeserve publish --wait`` and by redelivered events
  * by-sha256/<sha256>/<n>          index: version n holds model bytes with this sha256
    aliases/<alias>.json            {"version", "sha256", "set_at"}: a named pointer, changed
                                    only by compare-and-swap like current.json; a cleared alias
                                    is {"version": null, "cleared_at"} (the store never deletes)
    routing.json                    {"canary": {"alias", "percent"}, "shadow": {"alias",
                                    "sample"}, "set_at"}: live traffic to challengers
                                    (treeserve.registry.routing), compare-and-swap
  * decisions/<time>-v<n>.json      a live promotion decided by monitoring and its evidence
                                    (treeserve.monitoring.challenger), create-only

**Aliases.** :meth:`ModelRegistry.set_alias` and :meth:`ModelRegistry.clear_alias` swap
``aliases/<alias>.json`` as promote swaps ``current.json`` (create with If-None-Match, replace
with If-Match, re-read and re-apply on a lost race). ``champion`` is ``current.json`` itself:
it cannot be set or cleared as an alias (promote and rollback move it), and reading it reads the
pointer. :func:`model_names` lists the models of a bucket's registry.

**Versions.** :meth:`ModelRegistry.register` lists ``versions/`` once to find the highest number
in use, then probes upward: the first ``model.ubj`` it creates with ``If-None-Match: *`` is its
version, so two writers never share a number and nothing is ever overwritten. It then writes the
sha256 index entry and finally ``manifest.json``. A version exists only once its manifest exists:
a writer that dies before the manifest leaves an orphan ``model.ubj`` (and maybe an index entry)
that readers ignore and later allocators skip (its number is taken); so does an allocating
write whose answer was lost (botocore's retry then fails If-None-Match and the writer moves on).
Version objects are never deleted or rewritten by treeserve.

**Pointer.** ``current.json`` names the version in service. ``previous`` is the version it
replaced; ``history`` (most recent first, at most :data:`HISTORY_LIMIT`) is the rollback stack,
so repeated rollbacks walk back through earlier promotions. :meth:`ModelRegistry.promote` and
:meth:`ModelRegistry.rollback` re-read and re-apply on a lost race (bounded); with an explicit
``expected_etag`` a promotion is one compare-and-swap that raises PreconditionFailed if the
pointer moved (the refresh function then re-gates against the new champion).

**Idempotency.** :func:`upload_id` is a stable id of an uploaded object (key + ETag);
:meth:`ModelRegistry.record_outcome` stores the first outcome per id and returns it to later
callers. :meth:`ModelRegistry.find_version_by_sha256` answers from the ``by-sha256/`` index
(one LIST, then a HEAD per candidate to keep committed versions only). The index entry is written
before the manifest, so every committed version is indexed even if its writer died right after.
Two *concurrent* registrations of identical bytes can still become two versions; callers that
care check :meth:`find_version_by_sha256` first (the refresh function does).

**Stores.** :class:`RegistryStore` is the storage protocol; :class:`S3RegistryStore` is the one
adapter that turns botocore errors into domain errors (NotFound, PreconditionFailed,
StorageUnavailable, BucketNotFound, StorageAccessDenied, ConfigurationError);
:class:`InMemoryRegistryStore` is a thread-safe fake with the same semantics. Both pass
``tests/unit/test_registry_contract.py``.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

import orjson

from treeserve.errors import (
    ConfigurationError,
    ModelLoadError,
    NoModelInService,
    NotFound,
    PreconditionFailed,
    RegistryError,
    StorageUnavailable,
)
from treeserve.model.manifest import ModelManifest
from treeserve.registry.routing import Routing, RoutingInvalid
from treeserve.registry.store import RegistryStore, StoredObject, etag_moved
from treeserve.settings import MODEL_NAME_RULE, valid_model_name

__all__ = [
    "ANY",
    "CHAMPION",
    "ModelRegistry",
    "Pointer",
    "PointerUnreadable",
    "model_names",
    "upload_id",
    "valid_alias",
]

HISTORY_LIMIT: Final = 20
# Compare-and-swap attempts of promote/rollback before giving up (StorageUnavailable: retry).
CAS_ATTEMPTS: Final = 16
# Upward probes per allocation pass; after that the registry lists versions/ again.
PROBES_PER_PASS: Final = 64
ALLOCATION_PASSES: Final = 8
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_KEY_RE = re.compile(r"versions/(\d+)/(model\.ubj|manifest\.json)$")
# The alias current.json answers to; not stored under aliases/.
CHAMPION: Final = "champion"
ALIAS_RULE: Final = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def valid_alias(alias: object) -> bool:
    """An alias name treeserve accepts (see :data:`ALIAS_RULE`)."""
    return isinstance(alias, str) and _ALIAS_RE.fullmatch(alias) is not None


def model_names(store: RegistryStore) -> list[str]:
    """Every model name with anything under ``registry/<name>/``: one folder listing of
    ``registry/`` (one entry per model, whatever its number of versions)."""
    return [name for name in store.list_folders("registry/") if valid_model_name(name)]


class PointerUnreadable(RegistryError):
    """``current.json`` exists but is not a valid pointer. ``etag`` is the broken object's: a
    promotion replaces it by compare-and-swap against that ETag (``treeserve promote``)."""

    def __init__(self, message: str, etag: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.etag = etag
        self.reason = reason or message


class _Unset(Enum):
    ANY = "any"


ANY: Final = _Unset.ANY
"""``promote(expected_etag=ANY)`` (the default): re-read and re-apply on a lost race."""


@dataclass(frozen=True, slots=True)
class Pointer:
    """``current.json``: the version in service. ``etag`` is the object's, not in the JSON."""

    version: int
    sha256: str
    promoted_at: str
    previous: int | None
    etag: str | None = None
    history: tuple[int, ...] = field(default=())

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "sha256": self.sha256,
                "promoted_at": self.promoted_at,
                "previous": self.previous,
                "history": list(self.history),
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, raw: bytes, etag: str | None = None) -> Pointer:
        try:
            data = orjson.loads(raw)
            version = int(data["version"])
            previous = data.get("previous")
            # A pointer written without history (by hand, older tools) still rolls back once.
            history = data.get("history")
            if history is None:
                history = [] if previous is None else [previous]
            return cls(
                version=version,
                sha256=str(data["sha256"]),
                promoted_at=str(data.get("promoted_at", "")),
                previous=None if previous is None else int(previous),
                etag=etag,
                history=tuple(int(v) for v in history),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
            raise PointerUnreadable(
                f"current.json is not a valid pointer ({reason}): repair it with "
                "`treeserve promote VERSION` (`treeserve status` lists the versions)",
                etag,
                reason,
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "promoted_at": self.promoted_at,
            "previous": self.previous,
            "history": list(self.history),
        }


def upload_id(key: str, etag: str) -> str:
    """A stable id of one uploaded object: 20 hex chars of sha256(key, ETag without quotes)."""
    return hashlib.sha256(f"{key}\n{etag.strip().strip(chr(34))}".encode()).hexdigest()[:20]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _backoff(attempt: int) -> None:
    # Full jitter, a few ms: enough to let a racing writer finish without slowing the winner.
    time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))  # noqa: S311 - not crypto


_UPLOAD_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")


class ModelRegistry:
    """The registry of one model name on a :class:`RegistryStore` (see the module docstring)."""

    def __init__(self, store: RegistryStore, name: str) -> None:
        if not valid_model_name(name):
            raise ConfigurationError(f"model name {name!r} is not valid: use {MODEL_NAME_RULE}")
        self.store = store
        self.name = name
        self.prefix = f"registry/{name}/"

    # -- keys

    def model_key(self, version: int) -> str:
        return f"{self.prefix}versions/{version}/model.ubj"

    def manifest_key(self, version: int) -> str:
        return f"{self.prefix}versions/{version}/manifest.json"

    @property
    def current_key(self) -> str:
        return f"{self.prefix}current.json"

    def rejected_key(self, uid: str) -> str:
        return f"{self.prefix}rejected/{_check_upload_id(uid)}.json"

    def outcome_key(self, uid: str) -> str:
        return f"{self.prefix}uploads/{_check_upload_id(uid)}.json"

    @property
    def routing_key(self) -> str:
        return f"{self.prefix}routing.json"

    def alias_key(self, alias: str) -> str:
        if not valid_alias(alias) or alias == CHAMPION:
            raise ValueError(f"not an alias: {alias!r} (use {ALIAS_RULE}, not {CHAMPION!r})")
        return f"{self.prefix}aliases/{alias}.json"

    def exists(self) -> bool:
        """Whether anything was ever stored for this model (a version, a rejection, a pointer)."""
        return next(iter(self.store.list_keys(self.prefix)), None) is not None

    def _sha_prefix(self, sha: str) -> str:
        return f"{self.prefix}by-sha256/{sha}/"

    # -- versions

    def _highest_allocated(self) -> int:
        highest = 0
        for key in self.store.list_keys(f"{self.prefix}versions/"):
            m = _VERSION_KEY_RE.search(key)
            if m:
                highest = max(highest, int(m.group(1)))
        return highest

    def register(self, model_ubj: bytes, manifest: ModelManifest) -> int:
        """Store a new immutable version; returns its number. Sets ``manifest.version`` (and
        ``created_at`` if unset). Raises ModelLoadError if ``manifest.sha256`` is not the bytes'."""
        digest = _sha256(model_ubj)
        if manifest.sha256 != digest:
            raise ModelLoadError(
                f"manifest sha256 {manifest.sha256[:12]}... does not match the model bytes "
                f"({digest[:12]}...)"
            )
        if manifest.model_size != len(model_ubj):
            manifest.model_size = len(model_ubj)
        version = self._allocate(model_ubj)
        manifest.version = version
        manifest.created_at = manifest.created_at or _now()
        # The index entry goes before the commit marker: every committed version is indexed.
        self.store.put(f"{self._sha_prefix(digest)}{version}", orjson.dumps({"version": version}))
        body = manifest.to_json()
        try:
            self.store.put(self.manifest_key(version), body, if_none_match=True)
        except PreconditionFailed:
            # Our own write, whose answer was lost and whose retry then found it (S3 retries
            # a timed-out PUT); anything else breaks the invariant that n is ours alone.
            if self.store.get(self.manifest_key(version)).body != body:
                raise RegistryError(
                    f"{self.manifest_key(version)} already existed although this writer "
                    f"allocated version {version}"
                ) from None
        return version

    def _allocate(self, model_ubj: bytes) -> int:
        for _ in range(ALLOCATION_PASSES):
            candidate = self._highest_allocated() + 1
            for _ in range(PROBES_PER_PASS):
                try:
                    self.store.put(self.model_key(candidate), model_ubj, if_none_match=True)
                except PreconditionFailed:
                    candidate += 1  # taken (committed, in progress, or an orphan): next
                    continue
                return candidate
        raise StorageUnavailable(
            f"could not allocate a version of {self.name} after "
            f"{ALLOCATION_PASSES * PROBES_PER_PASS} attempts; retry"
        )

    def versions(self) -> list[int]:
        """Committed versions (those with a manifest), ascending."""
        found = set()
        for key in self.store.list_keys(f"{self.prefix}versions/"):
            m = _VERSION_KEY_RE.search(key)
            if m and m.group(2) == "manifest.json":
                found.add(int(m.group(1)))
        return sorted(found)

    def manifest(self, version: int) -> ModelManifest:
        """The manifest of a committed version; NotFound if there is none."""
        try:
            obj = self.store.get(self.manifest_key(version))
        except NotFound:
            raise NotFound(
                f"model {self.name!r} has no version {version}: `treeserve status` lists them"
            ) from None
        try:
            manifest = ModelManifest.from_json(obj.body)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise RegistryError(
                f"{self.manifest_key(version)} is not a valid manifest: {exc}"
            ) from None
        if manifest.version is None:
            manifest.version = version
        return manifest

    def model_bytes(self, version: int, manifest: ModelManifest | None = None) -> bytes:
        """The stored model.ubj, verified against the manifest's sha256 (ModelLoadError if not)."""
        manifest = manifest or self.manifest(version)
        data = self.store.get(self.model_key(version)).body
        digest = _sha256(data)
        if digest != manifest.sha256:
            raise ModelLoadError(
                f"{self.model_key(version)} has sha256 {digest[:12]}..., its manifest says "
                f"{manifest.sha256[:12]}...: refusing to load it"
            )
        return data

    def find_version_by_sha256(self, sha: str) -> int | None:
        """The lowest committed version whose model.ubj has this sha256, or None."""
        if not _SHA256_RE.match(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        candidates = sorted(
            int(key.rsplit("/", 1)[1])
            for key in self.store.list_keys(self._sha_prefix(sha))
            if key.rsplit("/", 1)[1].isdigit()
        )
        for version in candidates:
            if self.store.head(self.manifest_key(version)) is not None:
                return version
        return None

    # -- the pointer

    def current(self) -> Pointer | None:
        """The pointer, or None when nothing was ever promoted.

        Raises :class:`PointerUnreadable` (with the object's ETag) when current.json is not a
        valid pointer; :meth:`pointer_problem` tells whether a valid one names a real version."""
        try:
            obj = self.store.get(self.current_key)
        except NotFound:
            return None
        return self._parse_pointer(obj)

    def _parse_pointer(self, obj: StoredObject) -> Pointer:
        try:
            return Pointer.from_json(obj.body, obj.etag)
        except PointerUnreadable as broken:
            raise PointerUnreadable(
                f"{self.current_key} is not a valid pointer ({broken.reason}): repair it with "
                f"`treeserve promote VERSION --name {self.name}` (`treeserve status` lists the "
                "versions)",
                obj.etag,
                broken.reason,
            ) from None

    def current_if_changed(self, etag: str | None) -> tuple[Pointer | None, bool]:
        """A cheap conditional read. ``(None, False)``: still what ``etag`` names (or still no
        pointer when ``etag`` is None); ``(pointer, True)``: it changed (None: it was removed)."""
        try:
            obj = self.store.get_if_changed(self.current_key, etag)
        except NotFound:
            return None, etag is not None
        if obj is None:
            return None, False
        return self._parse_pointer(obj), True

    def pointer_problem(self, pointer: Pointer) -> str | None:
        """Why a valid pointer cannot be served (it names a version that does not exist), with
        how to repair it; None when its version exists."""
        if self.store.head(self.manifest_key(pointer.version)) is not None:
            return None
        return (
            f"current.json names version {pointer.version}, which does not exist: repair it "
            f"with `treeserve promote VERSION --name {self.name}` (`treeserve status` lists "
            "the versions)"
        )

    def _read_pointer(self) -> tuple[Pointer | None, str | None]:
        """The pointer and the ETag to swap against. An unreadable current.json counts as no
        pointer with that ETag, so a promotion can replace it (still compare-and-swap)."""
        try:
            pointer = self.current()
        except PointerUnreadable as broken:
            return None, broken.etag
        return pointer, None if pointer is None else pointer.etag

    def _swap(
        self,
        compute: Callable[[Pointer | None], Pointer | None],
        expected_etag: str | _Unset | None,
    ) -> Pointer:
        """Compare-and-swap ``current.json``; ``compute`` returns the new pointer, or None to keep
        the current one (no write)."""
        attempts = 1 if expected_etag is not ANY else CAS_ATTEMPTS
        for attempt in range(attempts):
            current, seen = self._read_pointer()
            if expected_etag is not ANY and etag_moved(seen, expected_etag):
                raise PreconditionFailed(f"{self.current_key} moved since it was read")
            new = compute(current)
            if new is None:
                assert current is not None  # noqa: S101 - compute keeps only an existing pointer
                return current
            try:
                if seen is None:
                    etag = self.store.put(self.current_key, new.to_json(), if_none_match=True)
                else:
                    etag = self.store.put(self.current_key, new.to_json(), if_match=seen)
            except PreconditionFailed:
                # A write whose answer was lost, retried by botocore, fails its own condition:
                # if the pointer now is exactly ours, the swap happened (do not apply it twice).
                mine = self.current()
                if mine is not None and mine.to_dict() == new.to_dict():
                    return mine
                if attempts == 1:
                    raise
                _backoff(attempt)
                continue
            return Pointer(
                new.version, new.sha256, new.promoted_at, new.previous, etag, new.history
            )
        raise StorageUnavailable(
            f"{self.current_key} kept changing during {attempts} compare-and-swap attempts; retry"
        )

    def promote(
        self,
        version: int,
        *,
        expected_etag: str | _Unset | None = ANY,
        only_if_newer: bool = False,
    ) -> Pointer:
        """Put ``version`` in service; returns the new pointer.

        ``expected_etag``: :data:`ANY` (default) re-reads and re-applies on a lost race; a string
        (the pointer's ETag as read) or None (no pointer existed) makes it a single
        compare-and-swap that raises PreconditionFailed if the pointer moved since.
        ``only_if_newer``: leave the pointer alone if it already names ``version`` or newer.
        Promoting the version already in service is a no-op. NotFound if the version does not exist.
        """
        sha = self.manifest(version).sha256  # NotFound for a version that does not exist

        def compute(current: Pointer | None) -> Pointer | None:
            if current is not None and (
                current.version == version or (only_if_newer and current.version > version)
            ):
                return None
            history: tuple[int, ...] = ()
            if current is not None:
                stack = (current.version, *current.history)
                history = tuple(dict.fromkeys(v for v in stack if v != version))[:HISTORY_LIMIT]
            return Pointer(
                version, sha, _now(), current.version if current else None, None, history
            )

        return self._swap(compute, expected_etag)

    def rollback(self, to: int | None = None) -> Pointer:
        """Move the pointer back: to the version in service before this one, or to ``to``.

        The routing parts that sent traffic to the version rolled back from are cleared
        (:meth:`clear_routing_to`). NoModelInService without a pointer; RegistryError when
        there is nothing to go back to."""
        return self.rollback_clearing(to)[0]

    def rollback_clearing(self, to: int | None = None) -> tuple[Pointer, list[str]]:
        """:meth:`rollback`, and the routing parts it cleared (e.g. ``["canary challenger"]``)."""
        target_sha: dict[int, str] = {}

        def sha_of(version: int) -> str:
            if version not in target_sha:
                target_sha[version] = self.manifest(version).sha256
            return target_sha[version]

        self.current()  # an unreadable pointer: say so (promote replaces it), do not guess

        def compute(current: Pointer | None) -> Pointer | None:
            if current is None:
                raise NoModelInService(
                    f"no version of model {self.name!r} is in service, so there is nothing to "
                    "roll back: put one in service with `treeserve promote VERSION`"
                )
            if to is None:
                stack = [v for v in current.history if v != current.version]
                if not stack:
                    raise RegistryError(
                        f"version {current.version} of {self.name!r} has no earlier version "
                        "in its history to roll back to: use `treeserve rollback --to VERSION` "
                        "or `treeserve promote VERSION` (`treeserve status` lists versions)"
                    )
                target, rest = stack[0], tuple(stack[1:])
            else:
                if to == current.version:
                    raise RegistryError(
                        f"version {to} of {self.name!r} is already in service; nothing to do"
                    )
                target = to
                stack = list(current.history)
                rest = tuple(stack[stack.index(to) + 1 :]) if to in stack else tuple(stack)
            return Pointer(
                target, sha_of(target), _now(), current.version, None, rest[:HISTORY_LIMIT]
            )

        pointer = self._swap(compute, ANY)
        cleared = [] if pointer.previous is None else self.clear_routing_to(pointer.previous)
        return pointer, cleared

    # -- aliases

    def _parse_alias(self, alias: str, obj: StoredObject) -> Pointer | None:
        try:
            data = orjson.loads(obj.body)
            if data.get("version") is None:
                return None  # cleared
            return Pointer(
                int(data["version"]),
                str(data["sha256"]),
                str(data.get("set_at", "")),
                None,
                obj.etag,
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
            raise PointerUnreadable(
                f"{self.alias_key(alias)} is not a valid alias ({reason}): set it again with "
                f"`treeserve alias set {alias} VERSION --name {self.name}`",
                obj.etag,
                reason,
            ) from None

    def alias(self, alias: str) -> Pointer | None:
        """The version an alias names (``champion``: the pointer), or None when it is not set."""
        if alias == CHAMPION:
            return self.current()
        try:
            obj = self.store.get(self.alias_key(alias))
        except NotFound:
            return None
        return self._parse_alias(alias, obj)

    def alias_if_changed(self, alias: str, etag: str | None) -> tuple[Pointer | None, bool]:
        """As :meth:`current_if_changed`, for an alias (a cleared alias reads as removed)."""
        if alias == CHAMPION:
            return self.current_if_changed(etag)
        try:
            obj = self.store.get_if_changed(self.alias_key(alias), etag)
        except NotFound:
            return None, etag is not None
        if obj is None:
            return None, False
        return self._parse_alias(alias, obj), True

    def aliases(self) -> dict[str, Pointer]:
        """Every alias that is set (``champion`` not included: it is the pointer)."""
        found: dict[str, Pointer] = {}
        for key in self.store.list_keys(f"{self.prefix}aliases/"):
            alias = key.rsplit("/", 1)[-1].removesuffix(".json")
            if not valid_alias(alias) or alias == CHAMPION:
                continue
            with suppress(NotFound, PointerUnreadable):
                pointer = self.alias(alias)
                if pointer is not None:
                    found[alias] = pointer
        return found

    def _swap_alias(self, alias: str, body: Callable[[], bytes]) -> str:
        key = self.alias_key(alias)
        for attempt in range(CAS_ATTEMPTS):
            try:
                seen: str | None = self.store.get(key).etag
            except NotFound:
                seen = None
            try:
                if seen is None:
                    return self.store.put(key, body(), if_none_match=True)
                return self.store.put(key, body(), if_match=seen)
            except PreconditionFailed:
                _backoff(attempt)
        raise StorageUnavailable(
            f"{key} kept changing during {CAS_ATTEMPTS} compare-and-swap attempts; retry"
        )

    def set_alias(self, alias: str, version: int) -> Pointer:
        """Point ``alias`` at ``version`` (compare-and-swap); NotFound if the version does not
        exist. ``champion`` is moved by promote, not here."""
        if alias == CHAMPION:
            raise ValueError(
                f"{CHAMPION!r} is the version in service: use `treeserve promote VERSION`"
            )
        sha = self.manifest(version).sha256  # NotFound for a version that does not exist
        set_at = _now()
        body = orjson.dumps({"version": version, "sha256": sha, "set_at": set_at})
        etag = self._swap_alias(alias, lambda: body)
        return Pointer(version, sha, set_at, None, etag)

    def clear_alias(self, alias: str) -> bool:
        """Clear ``alias`` (compare-and-swap to a tombstone); False when it was not set."""
        if alias == CHAMPION:
            raise ValueError(f"{CHAMPION!r} is the version in service: it cannot be cleared")
        if self.alias(alias) is None:
            return False
        body = orjson.dumps({"version": None, "cleared_at": _now()})
        self._swap_alias(alias, lambda: body)
        return True

    # -- routing (live traffic to challengers)

    def _parse_routing(self, obj: StoredObject) -> Routing:
        try:
            return Routing.from_json(obj.body, obj.etag)
        except RoutingInvalid as exc:
            raise PointerUnreadable(
                f"{self.routing_key} is not a valid routing ({exc}): set it again with "
                f"`treeserve route --name {self.name} ...` or `--off`",
                obj.etag,
                str(exc),
            ) from None

    def routing(self) -> Routing:
        """The model's live traffic split; an empty Routing when none is set."""
        try:
            obj = self.store.get(self.routing_key)
        except NotFound:
            return Routing()
        return self._parse_routing(obj)

    def routing_if_changed(self, etag: str | None) -> tuple[Routing, bool]:
        """As :meth:`current_if_changed`, for ``routing.json`` (absent reads as empty)."""
        try:
            obj = self.store.get_if_changed(self.routing_key, etag)
        except NotFound:
            return Routing(), etag is not None
        if obj is None:
            return Routing(etag=etag), False
        return self._parse_routing(obj), True

    def set_routing(self, compute: Callable[[Routing], Routing | None]) -> Routing:
        """Compare-and-swap ``routing.json``: ``compute`` gets the routing as read and returns
        the new one (None: leave it). Every alias the new routing names must be set: a canary
        to nothing would answer with nothing. Re-read and re-applied on a lost race."""
        for attempt in range(CAS_ATTEMPTS):
            try:
                obj: StoredObject | None = self.store.get(self.routing_key)
            except NotFound:
                obj = None
            try:
                seen = Routing() if obj is None else self._parse_routing(obj)
            except PointerUnreadable:
                seen = Routing()
            new = compute(seen)
            if new is None:
                return seen
            for alias in sorted(new.aliases()):
                if self.alias(alias) is None:
                    raise NotFound(
                        f"alias {alias!r} of model {self.name!r} is not set: set it first with "
                        f"`treeserve alias set {alias} VERSION --name {self.name}`"
                    )
            new = Routing(new.canary, new.shadow, _now())
            body = new.to_json()
            try:
                if obj is None:
                    etag = self.store.put(self.routing_key, body, if_none_match=True)
                else:
                    etag = self.store.put(self.routing_key, body, if_match=obj.etag)
            except PreconditionFailed:
                _backoff(attempt)
                continue
            return Routing(new.canary, new.shadow, new.set_at, etag)
        raise StorageUnavailable(
            f"{self.routing_key} kept changing during {CAS_ATTEMPTS} compare-and-swap "
            "attempts; retry"
        )

    def clear_routing_to(self, version: int) -> list[str]:
        """Remove the routing parts whose alias names ``version`` (a rolled-back version must
        not keep answering as a canary or be compared as a shadow); the parts removed."""
        removed: list[str] = []

        def compute(seen: Routing) -> Routing | None:
            removed.clear()
            keep: dict[str, Any] = {"canary": seen.canary, "shadow": seen.shadow}
            for part, route in list(keep.items()):
                if route is not None:
                    pointer = self.alias(route.alias)
                    if pointer is None or pointer.version == version:
                        keep[part] = None
                        removed.append(f"{part} {route.alias}")
            if not removed:
                return None
            return Routing(keep["canary"], keep["shadow"])

        self.set_routing(compute)
        return removed

    # -- live decisions (treeserve.monitoring.challenger)

    def record_decision(self, record: dict[str, Any]) -> str:
        """Store a live promotion decision (create-only) under ``decisions/``; its key.

        ``record`` holds ``version`` and ``decided_at`` (ISO time); the key sorts by time."""
        stamp = re.sub(r"[^0-9A-Za-z]", "", str(record.get("decided_at") or _now()))[:24]
        key = f"{self.prefix}decisions/{stamp}-v{int(record['version'])}.json"
        with suppress(PreconditionFailed):  # the same decision recorded twice stays the first
            self.store.put(
                key, orjson.dumps(record, option=orjson.OPT_INDENT_2), if_none_match=True
            )
        return key

    def decisions(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Recorded live decisions, most recent first."""
        keys = sorted(self.store.list_keys(f"{self.prefix}decisions/"), reverse=True)
        found = []
        for key in keys if limit is None else keys[:limit]:
            with suppress(NotFound, RegistryError):
                found.append(_load_dict(self.store.get(key).body))
        return found

    # -- rejections and outcomes

    def reject(self, uid: str, code: str, message: str, source: dict[str, Any]) -> None:
        """Record why an upload was refused (create-only: the first reason recorded stays)."""
        record = {
            "upload_id": uid,
            "code": code,
            "reason": message,
            "source": source,
            "rejected_at": _now(),
        }
        # Create-only: on a redelivery of the same upload the first record stands.
        with suppress(PreconditionFailed):
            self.store.put(self.rejected_key(uid), orjson.dumps(record), if_none_match=True)

    def rejection(self, uid: str) -> dict[str, Any] | None:
        """The rejection record of one upload, or None."""
        try:
            return _load_dict(self.store.get(self.rejected_key(uid)).body)
        except NotFound:
            return None

    def rejections(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rejection records, most recent first (reads every record; ``limit`` trims the list)."""
        records = []
        for key in self.store.list_keys(f"{self.prefix}rejected/"):
            try:
                records.append(_load_dict(self.store.get(key).body))
            except (NotFound, RegistryError):
                continue  # vanished or unreadable: status must still show the rest
        records.sort(key=lambda r: str(r.get("rejected_at", "")), reverse=True)
        return records if limit is None else records[:limit]

    def record_outcome(self, uid: str, outcome: dict[str, Any]) -> dict[str, Any]:
        """Store the outcome of one upload unless one exists; returns the one that is stored."""
        try:
            self.store.put(self.outcome_key(uid), orjson.dumps(outcome), if_none_match=True)
        except PreconditionFailed:
            stored = self.outcome(uid)
            if stored is None:  # pragma: no cover - outcome records are never deleted
                raise
            return stored
        return outcome

    def outcome(self, uid: str) -> dict[str, Any] | None:
        """The recorded outcome of one upload, or None while it is undecided."""
        try:
            return _load_dict(self.store.get(self.outcome_key(uid)).body)
        except NotFound:
            return None


def _check_upload_id(uid: str) -> str:
    if not _UPLOAD_ID_RE.match(uid):
        raise ValueError(f"not an upload id: {uid!r}")
    return uid


def _load_dict(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError("not a JSON object")
    return data
