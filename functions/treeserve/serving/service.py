"""The model in service for one execution environment, and its refresh.

:class:`ModelService` loads the version ``current.json`` names once (at init: before the
SnapStart snapshot where enabled), then :meth:`ModelService.maybe_refresh` re-reads the pointer
with a conditional GET at most every ``MODEL_REFRESH_SECONDS``. A new pointer is served only
after its manifest and bytes were read, the bytes matched both the manifest's and the pointer's
sha256, XGBoost loaded them and a smoke prediction passed; any failure keeps the old model
serving, is logged and counted (``ModelReloadFailures``), and is retried at the next interval.

A champion's service also reads the model's ``routing.json`` (:mod:`treeserve.registry.routing`)
in the same check, with the same conditional GET and cadence: :attr:`ModelService.canary` is the
canary its unpinned requests may be answered by (:meth:`ModelCache.canary` finds the alias's
entry). An unreadable routing, or a canary alias that is cleared or cannot be loaded, leaves
the champion answering every request, logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from treeserve.errors import ModelLoadError, NoModelInService, NotFound
from treeserve.model.manifest import ModelManifest
from treeserve.model.predictor import Predictor
from treeserve.registry.model_registry import (
    CHAMPION,
    ModelRegistry,
    Pointer,
    PointerUnreadable,
    valid_alias,
)
from treeserve.registry.routing import Canary, Routing
from treeserve.serving.inputs import FeatureSchema
from treeserve.settings import Settings, valid_model_name

logger = logging.getLogger(__name__)

RELOAD_FAILURES_METRIC = "ModelReloadFailures"
CACHE_EVICTIONS_METRIC = "ModelCacheEvictions"
MODEL_SWAPS_METRIC = "ModelSwaps"
# With no model loaded, the pointer is re-checked at most this often (instead of every
# MODEL_REFRESH_SECONDS): one conditional GET a second per environment at most.
NO_MODEL_RETRY_SECONDS = 1.0


class MetricsSink(Protocol):
    """What the library needs from a metrics emitter (Powertools ``Metrics`` fits)."""

    def add_metric(self, name: str, unit: Any, value: float) -> None: ...

    def add_dimensions(self, **dimensions: str) -> None:
        """Publish this flush's metrics under one more dimension set."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a route names: a model, and the pointer it follows (the champion, an alias) or a
    registered version it is pinned to."""

    name: str
    alias: str | None = None  # None: the champion (current.json)
    version: int | None = None

    @classmethod
    def parse(cls, segment: str, version: str | None = None) -> ModelRef | None:
        """``name``, ``name@alias`` (and a ``/versions/{n}`` segment); None when not valid."""
        name, at, alias = segment.partition("@")
        if not valid_model_name(name) or (at and not valid_alias(alias)):
            return None
        number: int | None = None
        if version is not None:
            if at or not (version.isascii() and version.isdigit()) or len(version) > 9:
                return None
            number = int(version)
            if number < 1:
                return None
        return cls(name, None if not at or alias == CHAMPION else alias, number)

    @property
    def answering_alias(self) -> str | None:
        """The alias answers of this ref carry: ``champion``, the alias, or None for a version."""
        if self.version is not None:
            return None
        return CHAMPION if self.alias is None else self.alias

    def describe(self) -> str:
        if self.version is not None:
            return f"version {self.version} of model {self.name!r}"
        if self.alias is not None:
            return f"alias {self.alias!r} of model {self.name!r}"
        return f"model {self.name!r}"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve, with what the API precomputes for it once."""

    predictor: Predictor
    schema: FeatureSchema
    pointer: Pointer | None
    version_header: bytes
    # What it holds in memory (MB): the manifest's footprint (loaded_mb, measured at refresh),
    # else an estimate from the model's size (see :func:`resident_mb`).
    size_mb: float = 0.0

    @property
    def manifest(self) -> ModelManifest:
        return self.predictor.manifest

    @property
    def version(self) -> int | None:
        return self.predictor.version


def _version_header(version: int | None) -> bytes:
    return b"none" if version is None else str(version).encode()


# Without a measured footprint (manifests written before it): a loaded booster holds about this
# many times its UBJ size (trees unpacked, plus the bytes kept for the C API path), plus the
# schema and the predictor's buffers.
RESIDENT_PER_MODEL_BYTE = 3.0
RESIDENT_BASE_MB = 1.0


def resident_mb(manifest: ModelManifest, model_bytes: int) -> float:
    """What one loaded model holds (MB): ``footprint.loaded_mb`` when refresh measured it."""
    measured = (manifest.footprint or {}).get("loaded_mb")
    if isinstance(measured, int | float) and measured > 0:
        return float(measured)
    return RESIDENT_BASE_MB + RESIDENT_PER_MODEL_BYTE * model_bytes / (1024 * 1024)


class ModelService:
    """Holds the model in service; swaps in a new one only after it proved loadable.

    ``ref`` says which pointer it follows: the champion (``current.json``, the default), an alias
    (``aliases/<alias>.json``; a cleared alias stops serving) or one registered version
    (immutable: read once). ``missing`` is True while that pointer (or version) does not exist."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: MetricsSink | None = None,
        load: bool = True,
        ref: ModelRef | None = None,
    ) -> None:
        self.registry = registry
        self.name = registry.name
        self.ref = ModelRef(registry.name) if ref is None else ref
        self.name_header = registry.name.encode()
        # Who answers through this service: "champion", the alias, or None (a pinned version).
        self.alias = self.ref.answering_alias
        self.alias_header = b"none" if self.alias is None else self.alias.encode()
        self.missing = False
        self._checked = False
        self.refresh_seconds = settings.model_refresh_seconds
        self.metrics = metrics
        self.clock = clock
        self._loaded: LoadedModel | None = None
        self._etag: str | None = None
        self._next_check = float("-inf")
        self._lock = threading.Lock()
        self.reload_failures = 0
        self.last_error: str | None = None
        # Why current.json cannot be served (unreadable, or naming a version that does not
        # exist) and how to repair it; /health reports it. None once a pointer loads again.
        self.pointer_problem: str | None = None
        # Live traffic (the champion's services only): the routing read with the pointer, and
        # the canary this service's requests may go to (None: the champion answers them all).
        self.follows_routing = self.ref.alias is None and self.ref.version is None
        self.routing = Routing()
        self.canary: Canary | None = None
        self._routing_etag: str | None = None
        # Until when the canary is skipped after its alias could not answer (retried once per
        # refresh interval), and the last problem logged (each one is logged once).
        self.canary_down_until = float("-inf")
        self.routing_problem: str | None = None
        if load:
            self.refresh()

    # -- what the API reads on every request

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def current(self) -> LoadedModel:
        """The model in service; NoModelInService (503) when none was ever loaded."""
        loaded = self._loaded
        if loaded is None:
            if self.missing and (self.ref.alias is not None or self.ref.version is not None):
                raise NotFound(f"{self.ref.describe()} does not exist")
            if self.last_error is not None:
                # Storage or the model failed us, not the operator: don't send them publishing.
                # (The details stay in the logs; they name buckets and keys.)
                raise NoModelInService(
                    f"the model {self.name!r} could not be loaded yet (storage or model "
                    "error, retried every second); retry shortly, and see the function's logs"
                )
            raise NoModelInService(
                f"no version of model {self.name!r} is in service yet: publish one with "
                "`treeserve publish` (or promote one with `treeserve promote VERSION`)"
            )
        return loaded

    def version_header(self) -> bytes:
        loaded = self._loaded
        return b"none" if loaded is None else loaded.version_header

    def maybe_refresh(self) -> None:
        """Check the pointer if the refresh interval has passed (cheap otherwise)."""
        if self.clock() >= self._next_check:
            self.refresh()

    def ensure_checked(self) -> None:
        """The first check, once: concurrent callers wait for it rather than start their own
        (the model cache's first use of a model loads it once)."""
        if not self._checked:
            self.refresh(wait=True)

    def _check_pointer(self) -> tuple[Pointer | None, bool]:
        ref = self.ref
        if ref.version is not None:  # a registered version is immutable: read it once
            tag = f"version-{ref.version}"
            if self._etag == tag:
                return None, False
            try:
                manifest = self.registry.manifest(ref.version)
            except NotFound:
                return None, self._etag is not None or not self._checked
            return Pointer(ref.version, manifest.sha256, "", None, tag), True
        if ref.alias is not None:
            return self.registry.alias_if_changed(ref.alias, self._etag)
        return self.registry.current_if_changed(self._etag)

    # -- refresh

    def refresh(self, *, wait: bool = False) -> bool:
        """Check the pointer now (conditional GET); swap if it names a new, good model.

        Returns True when a new model was swapped in. Never raises for storage or model
        failures: the model in service keeps serving. ``wait``: for the first check only,
        wait for one already under way instead of returning.
        """
        if not self._lock.acquire(blocking=wait):
            return False  # another thread is refreshing; serve what is loaded
        if wait and self._checked:
            self._lock.release()
            return False
        try:
            self._next_check = self.clock() + self.refresh_seconds
            swapped = self._refresh_pointer()
            if self.follows_routing and self._loaded is not None:
                self._refresh_routing()
            return swapped
        finally:
            self._checked = True
            if self._loaded is None:
                # Nothing to serve (S3 failed at cold start, or nothing promoted yet): look again
                # soon rather than answering 503 for a whole refresh interval.
                self._next_check = min(self._next_check, self.clock() + NO_MODEL_RETRY_SECONDS)
            self._lock.release()

    def _refresh_pointer(self) -> bool:
        try:
            pointer, changed = self._check_pointer()
        except PointerUnreadable as exc:  # keep serving; look again next interval
            self.pointer_problem = str(exc)
            self._failed("current.json is not a valid pointer", exc, None)
            return False
        except Exception as exc:  # storage trouble: keep serving, retry next interval
            self._failed("pointer check failed", exc, None)
            return False
        if not changed:
            if self._loaded is None and self._etag is None:
                self.missing = True  # still no pointer
            return False
        if pointer is None:
            self._etag = None
            if self.ref.alias is not None or self.ref.version is not None:
                # A cleared alias (or a version that does not exist) answers 404.
                self.missing = True
                self._loaded = None
                return False
            # Nobody should delete current.json; keep serving what we have.
            self.missing = self._loaded is None
            logger.warning("current.json disappeared; keeping the model in service")
            return False
        self.missing = False
        loaded = self._loaded
        if (
            loaded is not None
            and loaded.version == pointer.version
            and loaded.manifest.sha256 == pointer.sha256
        ):
            self._etag = pointer.etag  # rewritten pointer, same model
            self.pointer_problem = None
            return False
        try:
            new = self._load(pointer)
        except NotFound as exc:  # the pointer names a version that does not exist
            self.pointer_problem = self._missing_version(pointer)
            self._failed("current.json names a version that does not exist", exc, None)
            return False
        except Exception as exc:  # never let a bad version disturb the one in service
            self._failed("new model not loaded", exc, pointer.version)
            return False
        self._loaded = new
        self._etag = pointer.etag
        self.last_error = None
        self.pointer_problem = None
        logger.info(
            "model swapped in",
            extra={
                "model": self.name,
                "version": pointer.version,
                "previous_version": None if loaded is None else loaded.version,
            },
        )
        if self.metrics is not None:
            self.metrics.add_metric(name=MODEL_SWAPS_METRIC, unit="Count", value=1)
        return True

    def _refresh_routing(self) -> None:
        """Re-read ``routing.json`` if it changed (conditional GET); never raises."""
        try:
            routing, changed = self.registry.routing_if_changed(self._routing_etag)
        except PointerUnreadable as exc:  # the champion answers everything until it is fixed
            self._routing_etag = exc.etag  # read (and logged) once per version of the object
            self.routing, self.canary = Routing(etag=exc.etag), None
            self._routing_problem(str(exc))
            return
        except Exception as exc:  # storage trouble: keep the routing as read, retry next time
            logger.warning(
                "routing check failed; keeping the routing in effect",
                extra={"model": self.name, "error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            return
        if not changed:
            return
        self._routing_etag = routing.etag
        self.routing, self.canary = routing, routing.canary
        self.canary_down_until = float("-inf")
        self.routing_problem = None
        logger.info("routing in effect", extra={"model": self.name, "routing": routing.to_dict()})

    def _routing_problem(self, problem: str) -> None:
        if problem != self.routing_problem:
            logger.warning(
                "canary not in effect; the champion answers",
                extra={"model": self.name, "problem": problem[:500]},
            )
        self.routing_problem = problem

    def canary_failed(self, problem: str) -> None:
        """The canary's alias could not answer: the champion answers until the next refresh
        interval, when the alias is tried again (the problem is logged once)."""
        self.canary_down_until = self.clock() + self.refresh_seconds
        self._routing_problem(problem)

    def canary_recovered(self) -> None:
        if self.routing_problem is not None:
            logger.info("canary in effect again", extra={"model": self.name})
            self.routing_problem = None

    def _missing_version(self, pointer: Pointer) -> str:
        try:
            problem = self.registry.pointer_problem(pointer)
        except Exception:
            problem = None
        return problem or (
            f"current.json names version {pointer.version}, which is incomplete or does not "
            f"exist: repair it with `treeserve promote VERSION --name {self.name}`"
        )

    def _load(self, pointer: Pointer) -> LoadedModel:
        manifest = self.registry.manifest(pointer.version)
        if manifest.sha256 != pointer.sha256:
            raise ModelLoadError(
                f"current.json names version {pointer.version} with sha256 "
                f"{pointer.sha256[:12]}..., its manifest says {manifest.sha256[:12]}..."
            )
        data = self.registry.model_bytes(pointer.version, manifest)
        predictor = Predictor.load(data, manifest)
        predictor.version = pointer.version
        return LoadedModel(
            predictor,
            FeatureSchema(predictor.feature_names, manifest.categories),
            pointer,
            _version_header(pointer.version),
            resident_mb(manifest, len(data)),
        )

    def _failed(self, what: str, exc: BaseException, version: int | None) -> None:
        self.reload_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.error(
            what,
            extra={
                "model": self.name,
                "version": version,
                "serving_version": None if self._loaded is None else self._loaded.version,
                "error": self.last_error[:500],
            },
        )
        if self.metrics is not None:
            self.metrics.add_metric(name=RELOAD_FAILURES_METRIC, unit="Count", value=1)


# --- many models: the cache ----------------------------------------------------------------------


@dataclass(slots=True)
class Served:
    """One cache entry: the service following one :class:`ModelRef`, and what it captures to."""

    service: ModelService
    capture: Any  # the CaptureBuffer of its model name (None: capture off)
    known: bool | None = None  # whether the registry has the model (asked once, when missing)


class UnknownModel(NotFound):
    """No model, alias or version by that name in the registry (404)."""


class ModelCache:
    """Every model of the registry, loaded on first use and kept while memory allows.

    Entries are keyed by :class:`ModelRef`; each one is a :class:`ModelService` that re-checks
    its own pointer (or alias) at most every ``MODEL_REFRESH_SECONDS``. Their sizes
    (:attr:`LoadedModel.size_mb`) add up to at most ``limit_mb`` (``MODEL_CACHE_MB``): after a
    load (a first use, or a cached model's swap to a new version) the least recently used others
    are evicted until they fit. The default model's champion entry is loaded at init and never
    evicted (its size counts). Concurrent first requests for one ref share one entry, whose
    first check runs once while the others wait (:meth:`ModelService.ensure_checked`). A name
    the registry has never seen, an alias not set or a version not registered is not kept
    (NotFound); a known model with nothing in service is kept
    at size 0 and answers 503.
    """

    def __init__(
        self,
        default: Served,
        registry_for: Callable[[str], ModelRegistry],
        settings: Settings,
        *,
        limit_mb: float,
        capture_for: Callable[[str], Any] | None = None,
        metrics: MetricsSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.registry_for = registry_for
        self.settings = settings
        self.limit_mb = limit_mb
        self.capture_for = capture_for
        self.metrics = metrics
        self.clock = clock
        self._entries: OrderedDict[ModelRef, Served] = OrderedDict()
        self._captures: dict[str, Any] = {default.service.name: default.capture}
        self._lock = threading.Lock()
        self.default_ref = ModelRef(default.service.name)
        self.evictions = 0

    def get(self, ref: ModelRef) -> Served:
        """The entry serving ``ref``, loaded on first use. NotFound (404) for a model the
        registry has never seen (:class:`UnknownModel`), or a pinned version or alias that does
        not exist; such refs are not kept."""
        if ref == self.default_ref:
            self.default.service.maybe_refresh()
            return self.default
        created = False
        with self._lock:
            served = self._entries.get(ref)
            if served is not None:
                self._entries.move_to_end(ref)
            else:
                service = ModelService(
                    self.registry_for(ref.name),
                    self.settings,
                    clock=self.clock,
                    metrics=self.metrics,
                    load=False,
                    ref=ref,
                )
                served = Served(service, self._capture(ref.name))
                self._entries[ref] = served
                created = True
        service = served.service
        if created:
            started = time.perf_counter()
            service.ensure_checked()
            self._loaded(ref, service, started)
        else:
            service.ensure_checked()  # a first check under way in another thread: wait for it
            before = service.loaded
            service.maybe_refresh()
            if service.loaded is not before and service.loaded is not None:
                self._evict(keep=ref)  # a new version may be larger than the one it replaced
        if service.loaded is None and service.missing:
            self._missing(ref, served)
        return served

    def canary(self, service: ModelService) -> Served | None:
        """The entry of ``service``'s canary alias, loaded, to answer a request the routing
        sent to it; None when the champion answers: no canary, or its alias is cleared or
        cannot be loaded (logged once, tried again after ``MODEL_REFRESH_SECONDS``)."""
        canary = service.canary
        if canary is None or service.canary_down_until > self.clock():
            return None
        try:
            served = self.get(ModelRef(service.name, canary.alias))
            served.service.current()
        except Exception as exc:  # cleared, unreadable or storage trouble: never a 5xx
            service.canary_failed(
                f"the canary alias {canary.alias!r} cannot answer ({exc}); the champion answers "
                f"its {canary.percent:g}% until it can: `treeserve alias set {canary.alias} "
                f"VERSION --name {service.name}` or `treeserve route --name {service.name} --off`"
            )
            return None
        if service.routing_problem is not None:
            service.canary_recovered()
        return served

    def _missing(self, ref: ModelRef, served: Served) -> None:
        """Raise NotFound for a ref that names nothing (and forget it), unless it is a known
        model with nothing in service (kept: 503)."""
        if ref.alias is None and ref.version is None:
            if served.known is None:
                try:
                    served.known = served.service.registry.exists()
                except Exception:  # storage trouble: keep the entry, answer 503, retry
                    return
            if served.known:
                return
        with self._lock:
            if self._entries.get(ref) is served:
                del self._entries[ref]
        if ref.alias is None and ref.version is None:
            raise UnknownModel(f"there is no model {ref.name!r} in the registry")
        if not served.service.registry.exists():
            raise UnknownModel(f"there is no model {ref.name!r} in the registry")
        raise NotFound(f"{ref.describe()} does not exist")

    def _loaded(self, ref: ModelRef, service: ModelService, started: float) -> None:
        loaded = service.loaded
        if loaded is None:
            return
        logger.info(
            "model cached",
            extra={
                "model": ref.name,
                "ref": ref.describe(),
                "version": loaded.version,
                "size_mb": round(loaded.size_mb, 1),
                "load_ms": round((time.perf_counter() - started) * 1000.0, 1),
            },
        )
        self._evict(keep=ref)

    def _capture(self, name: str) -> Any:
        if name not in self._captures:
            self._captures[name] = None if self.capture_for is None else self.capture_for(name)
        return self._captures[name]

    def used_mb(self) -> float:
        """What the cached models hold (MB), the default model's included."""
        with self._lock:
            return self._used_mb()

    def _used_mb(self) -> float:
        total = _size(self.default)
        for served in self._entries.values():
            total += _size(served)
        return total

    def _evict(self, keep: ModelRef) -> None:
        evicted: list[tuple[ModelRef, float]] = []
        with self._lock:
            used = self._used_mb()
            for ref in list(self._entries):
                if used <= self.limit_mb:
                    break
                if ref == keep:
                    continue
                size = _size(self._entries.pop(ref))
                used -= size
                evicted.append((ref, size))
        for ref, size in evicted:
            self.evictions += 1
            logger.info("model evicted", extra={"ref": ref.describe(), "size_mb": round(size, 1)})
            if self.metrics is not None:
                self.metrics.add_metric(name=CACHE_EVICTIONS_METRIC, unit="Count", value=1)

    def peek(self, ref: ModelRef) -> Served | None:
        """The entry for ``ref`` if cached (no load, no refresh, no recency change)."""
        if ref == self.default_ref:
            return self.default
        with self._lock:
            return self._entries.get(ref)

    def clear(self) -> None:
        """Forget every entry but the default model's (after a SnapStart restore)."""
        with self._lock:
            self._entries.clear()

    def cached(self) -> list[ModelRef]:
        """The refs in the cache, least recently used first (the default model's not included)."""
        with self._lock:
            return list(self._entries)

    def captures(self) -> list[Any]:
        """Every capture buffer in use (one per model name)."""
        return [c for c in self._captures.values() if c is not None]


def _size(served: Served) -> float:
    loaded = served.service.loaded
    return 0.0 if loaded is None else loaded.size_mb
