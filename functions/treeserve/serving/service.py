"""The model in service for one execution environment, and its refresh.

:class:`ModelService` loads the version ``current.json`` names once (at init: before the
SnapStart snapshot where enabled), then :meth:`ModelService.maybe_refresh` re-reads the pointer
with a conditional GET at most every ``MODEL_REFRESH_SECONDS``. A new pointer is served only
after its manifest and bytes were read, the bytes matched both the manifest's and the pointer's
sha256, XGBoost loaded them and a smoke prediction passed; any failure keeps the old model
serving, is logged and counted (``ModelReloadFailures``), and is retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from treeserve.errors import ModelLoadError, NoModelInService, NotFound
from treeserve.model.manifest import ModelManifest
from treeserve.model.predictor import Predictor
from treeserve.registry.model_registry import ModelRegistry, Pointer, PointerUnreadable
from treeserve.serving.inputs import FeatureSchema
from treeserve.settings import Settings

logger = logging.getLogger(__name__)

RELOAD_FAILURES_METRIC = "ModelReloadFailures"
MODEL_SWAPS_METRIC = "ModelSwaps"
# With no model loaded, the pointer is re-checked at most this often (instead of every
# MODEL_REFRESH_SECONDS): one conditional GET a second per environment at most.
NO_MODEL_RETRY_SECONDS = 1.0


class MetricsSink(Protocol):
    """What the library needs from a metrics emitter (Powertools ``Metrics`` fits)."""

    def add_metric(self, name: str, unit: Any, value: float) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve, with what the API precomputes for it once."""

    predictor: Predictor
    schema: FeatureSchema
    pointer: Pointer | None
    version_header: bytes

    @property
    def manifest(self) -> ModelManifest:
        return self.predictor.manifest

    @property
    def version(self) -> int | None:
        return self.predictor.version


def _version_header(version: int | None) -> bytes:
    return b"none" if version is None else str(version).encode()


class ModelService:
    """Holds the model in service; swaps in a new one only after it proved loadable."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: MetricsSink | None = None,
        load: bool = True,
    ) -> None:
        self.registry = registry
        self.name = registry.name
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

    # -- refresh

    def refresh(self) -> bool:
        """Check the pointer now (conditional GET); swap if it names a new, good model.

        Returns True when a new model was swapped in. Never raises for storage or model
        failures: the model in service keeps serving.
        """
        if not self._lock.acquire(blocking=False):
            return False  # another thread is refreshing; serve what is loaded
        try:
            self._next_check = self.clock() + self.refresh_seconds
            try:
                pointer, changed = self.registry.current_if_changed(self._etag)
            except PointerUnreadable as exc:  # keep serving; look again next interval
                self.pointer_problem = str(exc)
                self._failed("current.json is not a valid pointer", exc, None)
                return False
            except Exception as exc:  # storage trouble: keep serving, retry next interval
                self._failed("pointer check failed", exc, None)
                return False
            if not changed:
                return False
            if pointer is None:
                # Nobody should delete current.json; keep serving what we have.
                logger.warning("current.json disappeared; keeping the model in service")
                self._etag = None
                return False
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
        finally:
            if self._loaded is None:
                # Nothing to serve (S3 failed at cold start, or nothing promoted yet): look again
                # soon rather than answering 503 for a whole refresh interval.
                self._next_check = min(self._next_check, self.clock() + NO_MODEL_RETRY_SECONDS)
            self._lock.release()

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
