"""RefreshService: an uploaded object -> validated, gated, registered, promoted or rejected.

One call of :meth:`RefreshService.process` handles one ``ObjectCreated`` notification for
``incoming/<model>/<file>``. The steps, and what a crash between any two of them leaves behind:

1. **Redelivery?** The outcome record ``upload_id(key, etag)`` exists -> return it, do nothing.
2. **Read** the object (refused unread above ``Limits.max_upload_bytes``), pinned to the event's
   version (``VersionId``) or ETag (``If-Match``): an object overwritten since its event is not
   this event's business (``ignored/superseded``; the newer object has its own event).
3. **Validate** through :func:`treeserve.model.package.read_upload` (sandboxed load + smoke test).
   A refusal is recorded with :meth:`ModelRegistry.reject`; the upload stays where it is.
4. **Same bytes already registered?** (sha256 of the canonical ``model.ubj``.) If that version
   came from this very upload, an earlier attempt crashed after registering it: carry on with
   promotion. Otherwise the upload is a ``duplicate`` of that version; nothing new is written.
5. **Reference statistics** (``reference.csv`` + smoke predictions, or what the model records)
   and **holdout metrics**, then **register**: the version exists whole or not at all.
6. **Promote** by compare-and-swap on ``current.json`` (auto mode), re-deciding on a lost race,
   or leave it registered: manual mode, gate held, or stale upload (below). A broken pointer
   (unreadable, or naming a version that does not exist) is replaced by compare-and-swap against
   its ETag, as ``treeserve promote`` does, when this upload is the newest registered version
   (no champion to gate against); an older upload waits as ``stale`` and says why.
7. **Record the outcome** (create-only), then emit EMF metrics and an SNS notification.

A retry after a crash in 1-7 reruns the pure steps and finds the durable ones done (the version
by sha256, the pointer already at it, the rejection record), so it completes without a duplicate.

**Racing deliveries.** Two deliveries processed at the same moment (S3 duplicates, or the same
bytes under two keys) would both pass step 4. So registering is claimed first: a create-only
``registry/<model>/claims/<sha256>.json``. The loser waits for the holder's version (then
continues with it, or reports a duplicate), or raises for a retry if the holder is slow; a claim
older than its lease (or released after a failed registration) is taken over by compare-and-swap.
Should a takeover still leave two copies, the lowest is canonical: every delivery re-checks after
registering and after promoting, re-points a pointer that names a later copy, and reports the
canonical version.

**What "newer" means.** Versions are numbered in registration order, and events may be processed
out of order, so a version number alone does not say which upload is newer. An upload U is newer
than the upload C whose version is in service when:

- same key, both with an S3 ``sequencer``: U's sequencer is greater (hex strings left-padded with
  zeros to equal length, then compared, as S3 documents; sequencers of different keys are not
  comparable);
- otherwise, both with an upload time (the event's ``eventTime``, else the object's
  ``Last-Modified``): U's time is not earlier than C's;
- and in every case U's version is greater than C's, and U's version was never in service
  before (``current.json`` history): automatic promotion never moves the pointer back to an
  older version, nor undoes a rollback (that is ``treeserve rollback``/``promote``'s job).

An upload that is not newer is registered but not promoted (``code="stale"``), so a late or
redelivered event never overrides a newer promotion.

**Outcome record** (``ModelRegistry.record_outcome``; what ``treeserve publish --wait`` reads)::

    {"upload_id", "status": "promoted"|"registered"|"duplicate"|"rejected"|"ignored",
     "model", "version", "code", "message", "bucket", "key", "etag", "sequencer",
     "event_time", "gate": {...} | null, "decided_at", "attempt"}

``code`` says why: the rejection reason for ``rejected``; ``manual``, ``live``
(PROMOTION_MODE=live with a champion in service: the version earns promotion on live traffic,
decided by monitoring), ``gate``, ``stale`` for a version ``registered`` but not promoted;
``superseded``, ``gone`` for ``ignored``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import orjson
from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from treeserve.aws import s3_client, s3_errors, sns_client
from treeserve.errors import (
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
    TreeserveError,
    UploadRejected,
)
from treeserve.model import reference
from treeserve.model.metrics import ungated_reason
from treeserve.model.package import InferenceBudget, Limits, ModelUpload, read_upload
from treeserve.refresh import gate
from treeserve.registry.model_registry import ModelRegistry, PointerUnreadable, upload_id
from treeserve.registry.store import S3RegistryStore
from treeserve.settings import valid_model_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient

    from treeserve.model.manifest import ModelManifest
    from treeserve.registry.model_registry import Pointer
    from treeserve.registry.store import RegistryStore
    from treeserve.settings import Settings

logger = logging.getLogger(__name__)
metrics = Metrics()

INCOMING_PREFIX = "incoming/"
# Model names become S3 key segments and metric/log values: keep them boring.
READ_CHUNK_BYTES = 1024 * 1024
# A promotion that keeps losing the compare-and-swap race gives up and lets Lambda retry.
PROMOTE_ATTEMPTS = 5
# Registering bytes is claimed first (registry/<model>/claims/<sha256>.json, create-only), so
# racing deliveries of the same bytes do not each write a version. Claiming comes right before
# the registry writes, so a live holder commits within seconds; a claim older than the lease
# belongs to a delivery that died (Lambda retries come 1 and 2 minutes later).
CLAIM_LEASE_SECONDS = 45.0
CLAIM_WAIT_SECONDS = 15.0
CLAIM_POLL_SECONDS = 0.1

Status = Literal["promoted", "registered", "duplicate", "rejected", "ignored"]


# --- events and outcomes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadEvent:
    """One ``ObjectCreated`` notification, whatever envelope it came in."""

    bucket: str
    key: str
    etag: str
    size: int | None = None
    sequencer: str | None = None
    event_time: str | None = None
    version_id: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Outcome:
    """What became of one upload. Recorded once per ``upload_id``; redeliveries return it."""

    status: Status
    key: str
    etag: str
    model: str | None = None
    upload_id: str | None = None
    version: int | None = None
    code: str | None = None
    message: str = ""
    bucket: str | None = None
    sequencer: str | None = None
    event_time: str | None = None
    gate: dict[str, Any] | None = None
    decided_at: str = field(default_factory=_now)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Not recorded: True when this call found the outcome already recorded.
    redelivered: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("redelivered")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        known = set(cls.__dataclass_fields__) - {"redelivered"}
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_incoming_key(key: str) -> tuple[str, str] | None:
    """``incoming/<model>/<...>/<file>`` -> (model, file name); None for any other key."""
    if not key.startswith(INCOMING_PREFIX) or key.endswith("/"):
        return None
    parts = key[len(INCOMING_PREFIX) :].split("/")
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        return None
    return parts[0], parts[-1]


def compare_sequencers(a: str, b: str) -> int:
    """-1, 0 or 1 as S3 sequencer ``a`` is before, equal to or after ``b`` (same key only)."""
    width = max(len(a), len(b))
    left, right = a.upper().rjust(width, "0"), b.upper().rjust(width, "0")
    return (left > right) - (left < right)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def is_newer(upload: dict[str, Any], champion: dict[str, Any]) -> bool:
    """Whether ``upload`` happened after ``champion`` (both ``manifest.source`` records).

    Unknown order (no sequencer or time to compare) counts as newer: the version-number rule
    in the caller still keeps the pointer from going backwards.
    """
    if upload.get("key") == champion.get("key"):
        mine, theirs = upload.get("sequencer"), champion.get("sequencer")
        if isinstance(mine, str) and isinstance(theirs, str) and mine and theirs:
            return compare_sequencers(mine, theirs) > 0
    mine_t, theirs_t = (
        _parse_time(upload.get("event_time")),
        _parse_time(champion.get("event_time")),
    )
    if mine_t is not None and theirs_t is not None:
        return mine_t >= theirs_t
    return True


# --- reading the uploaded object ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadObject:
    data: bytes
    last_modified: str | None


class UploadSource(Protocol):
    """Where uploads are read from (S3; tests may inject faults)."""

    def read(self, event: UploadEvent, max_bytes: int) -> UploadObject:
        """The object's bytes. Raises NotFound (gone), PreconditionFailed (overwritten since the
        event), UploadRejected ``too_large``, StorageUnavailable."""
        ...


class S3UploadSource:
    """Reads ``incoming/`` objects from S3, bounded, pinned to the event's version or ETag."""

    def __init__(self, s3: S3Client | None = None) -> None:
        self._s3 = s3

    @property
    def s3(self) -> S3Client:
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def read(self, event: UploadEvent, max_bytes: int) -> UploadObject:
        kwargs: dict[str, Any] = {"Bucket": event.bucket, "Key": event.key}
        if event.version_id:
            kwargs["VersionId"] = event.version_id
        elif event.etag:
            kwargs["IfMatch"] = f'"{event.etag}"'
        with s3_errors(event.bucket, event.key):
            response = self.s3.get_object(**kwargs)
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if length is not None and length > max_bytes:
                    raise _too_large(length, max_bytes)
                chunks: list[bytes] = []
                total = 0
                while True:
                    chunk = body.read(READ_CHUNK_BYTES)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:  # the header lied or was absent: stop reading anyway
                        raise _too_large(total, max_bytes)
                    chunks.append(chunk)
            finally:
                body.close()
        modified = response.get("LastModified")
        return UploadObject(
            b"".join(chunks),
            modified.astimezone(UTC).isoformat().replace("+00:00", "Z") if modified else None,
        )


def _too_large(size: int, max_bytes: int) -> UploadRejected:
    return UploadRejected(
        "too_large", f"the upload is {size} bytes or more; the limit is {max_bytes} bytes"
    )


# --- reference statistics (treeserve.model.reference) ------------------------------------------------


def reference_statistics(upload: ModelUpload) -> tuple[dict[str, Any] | None, str]:
    """The monitoring baseline and where it came from: ``reference.csv`` or the model itself."""
    if upload.reference is not None and upload.reference.size:
        predictions = np.asarray(upload.smoke_predictions)
        stats = reference.compute_reference(
            upload.reference,
            upload.feature_names,
            upload.feature_types,
            predictions,
            upload.categories,
        )
        return stats, "reference.csv"
    return reference.reference_from_model(
        upload.model_ubj, upload.feature_names, upload.feature_types, upload.categories
    ), "model"


# --- the service -------------------------------------------------------------------------------


class RefreshService:
    """Turns ``incoming/`` uploads into registry versions (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        registry_factory: Callable[[str], ModelRegistry] | None = None,
        *,
        store: RegistryStore | None = None,
        s3: S3Client | None = None,
        sns: SNSClient | None = None,
        source: UploadSource | None = None,
        limits: Limits | None = None,
        budget: InferenceBudget | None = None,
        metrics_sink: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits or Limits()
        self.budget = budget or InferenceBudget.from_settings(settings)
        self._s3 = s3
        self._sns = sns
        self._store = store
        self._registry_factory = registry_factory
        self.source: UploadSource = source or S3UploadSource(s3)
        self.metrics = metrics_sink or metrics

    # -- wiring

    def registry(self, model: str) -> ModelRegistry:
        if self._registry_factory is not None:
            return self._registry_factory(model)
        if self._store is None:
            self._store = S3RegistryStore(self.settings.model_bucket, self._s3)
        return ModelRegistry(self._store, model)

    @property
    def sns(self) -> SNSClient:
        if self._sns is None:
            self._sns = sns_client()
        return self._sns

    # -- entry point

    def process(
        self,
        bucket: str,
        key: str,
        etag: str,
        size: int | None = None,
        sequencer: str | None = None,
        *,
        event_time: str | None = None,
        version_id: str | None = None,
    ) -> Outcome:
        """Handle one ObjectCreated notification; idempotent. Raises StorageUnavailable."""
        event = UploadEvent(
            bucket, key, etag.strip('"'), size, sequencer or None, event_time, version_id
        )
        parsed = parse_incoming_key(key)
        if parsed is None:
            logger.info("ignored: not an incoming/<model>/<file> key", extra={"key": key})
            return self._ignored(event, None, "not_incoming", "not an incoming/<model>/<file> key")
        model, filename = parsed
        if not valid_model_name(model):
            logger.warning("ignored: invalid model name in key", extra={"key": key})
            return self._ignored(
                event,
                None,
                "bad_name",
                "model names are 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit",
            )
        if bucket != self.settings.model_bucket:
            logger.warning("ignored: not the model bucket", extra={"bucket": bucket, "key": key})
            return self._ignored(event, model, "other_bucket", f"not the model bucket {bucket}")

        registry = self.registry(model)
        uid = upload_id(key, event.etag)
        recorded = registry.outcome(uid)
        if recorded is not None:
            outcome = Outcome.from_dict(recorded)
            outcome.redelivered = True
            logger.info(
                "redelivered: outcome already recorded",
                extra={"upload_id": uid, "status": outcome.status, "version": outcome.version},
            )
            return outcome

        started = time.perf_counter()
        outcome = self._decide(registry, event, model, filename, uid)
        return self._finish(registry, outcome, time.perf_counter() - started)

    # -- the steps

    def _decide(
        self, registry: ModelRegistry, event: UploadEvent, model: str, filename: str, uid: str
    ) -> Outcome:
        base = {"model": model, "upload_id": uid}
        try:
            if event.size is not None and event.size > self.limits.max_upload_bytes:
                raise _too_large(event.size, self.limits.max_upload_bytes)
            try:
                obj = self.source.read(event, self.limits.max_upload_bytes)
            except NotFound:
                return self._ignored(event, model, "gone", "the upload no longer exists", uid)
            except PreconditionFailed:
                return self._ignored(
                    event,
                    model,
                    "superseded",
                    "the object was overwritten since this event; its own event handles it",
                    uid,
                )
            upload = read_upload(obj.data, filename, limits=self.limits, budget=self.budget)
            source = self._source(event, obj, upload)
            existing = registry.find_version_by_sha256(upload.sha256)
            registered: tuple[int, ModelManifest, _Gates] | None = None
            if existing is None:
                manifest = upload.to_manifest(model)
                gates = _Gates(self, registry, upload, manifest)
                verdict = gates.against(_champion(registry).pointer)
                manifest.holdout_metrics = dict(gates.challenger_metrics)
                manifest.validation = {**(manifest.validation or {}), "gate": verdict.to_dict()}
                manifest.reference, manifest.reference_source = reference_statistics(upload)
                manifest.source = source
                manifest.created_at = manifest.created_at or _now()
                existing, claim = _claim_sha256(registry, upload.sha256, uid)
                if claim is not None:  # the bytes are ours to register
                    try:
                        version = registry.register(upload.model_ubj, manifest)
                    except BaseException:
                        _release_claim(registry, upload.sha256, claim)
                        raise
                    logger.info("registered", extra={"model": model, "version": version})
                    self._count("ModelsRegistered")
                    registered = version, manifest, gates
                    # A delivery that took over an expired claim may have committed a copy too:
                    # the lowest one is canonical, and only it is ever promoted.
                    first = registry.find_version_by_sha256(upload.sha256)
                    if first is not None and first != version:
                        existing = first
            if existing is not None:
                existing_manifest = registry.manifest(existing)
                if not _same_upload(existing_manifest.source, source):
                    return self._duplicate(event, existing, existing_manifest, base)
                if registered is not None:
                    logger.warning(
                        "a concurrent delivery registered this upload first",
                        extra={"model": model, "version": existing, "orphan": registered[0]},
                    )
                # This upload's version, registered by an earlier attempt that then stopped (or
                # by a racing delivery of the same event): finish the job.
                version, manifest = existing, existing_manifest
                gates = _Gates(self, registry, upload, manifest)
            elif registered is not None:
                version, manifest, gates = registered
        except UploadRejected as rejected:
            return self._reject(registry, event, model, uid, rejected)
        return self._promote_or_hold(
            registry=registry,
            event=event,
            version=version,
            manifest=manifest,
            gates=gates,
            base=base,
        )

    def _promote_or_hold(
        self,
        *,
        registry: ModelRegistry,
        event: UploadEvent,
        version: int,
        manifest: ModelManifest,
        gates: _Gates,
        base: dict[str, Any],
    ) -> Outcome:
        fields = {**self._event_fields(event), **base, "version": version}

        def held(code: str, message: str, result: gate.GateResult | None = None) -> Outcome:
            return Outcome(
                "registered",
                event.key,
                event.etag,
                code=code,
                message=message,
                gate=result.to_dict() if result else None,
                **fields,
            )

        if self.settings.promotion_mode == "manual":
            return held("manual", f"registered as version {version}; PROMOTION_MODE=manual")
        if self.settings.promotion_mode == "live":
            # A challenger earns promotion on live traffic (treeserve.monitoring.challenger);
            # only a model with nothing valid in service is put in service by its upload.
            champion = _champion(registry)
            if champion.broken is None and champion.pointer is not None:
                return held(
                    "live",
                    f"registered as version {version}; PROMOTION_MODE=live: give it live "
                    f"traffic (`treeserve alias set challenger {version}`, `treeserve route "
                    f"--name {base['model']} --canary challenger 10`) and monitoring promotes it "
                    "once its verdict on labeled rows is better or not worse",
                )

        def promoted(
            in_service: int, message: str, result: gate.GateResult | None = None
        ) -> Outcome:
            return Outcome(
                "promoted",
                event.key,
                event.etag,
                message=message,
                gate=result.to_dict() if result else None,
                **{**fields, "version": in_service},
            )

        for _ in range(PROMOTE_ATTEMPTS):
            champion = _champion(registry)
            if champion.broken is not None:
                return self._promote_over_broken(
                    registry,
                    version=version,
                    champion=champion,
                    gates=gates,
                    held=held,
                    promoted=promoted,
                )
            current = champion.pointer
            if current is not None and current.sha256 == manifest.sha256:
                if current.version <= version:
                    # This version (a previous attempt promoted it, then stopped), or the lower,
                    # canonical copy a racing delivery of the same bytes registered.
                    return promoted(current.version, f"version {current.version} is in service")
                # The pointer names a later copy of these very bytes (racing deliveries): point it
                # at the canonical, lowest one. Same bytes, so nothing served changes.
                try:
                    registry.promote(version, expected_etag=current.etag)
                except PreconditionFailed:
                    continue
                return promoted(version, f"version {version} is in service")
            if current is not None:
                if version < current.version:
                    return held(
                        "stale",
                        f"registered as version {version}; version {current.version} is in "
                        "service and automatic promotion never goes back to an older version",
                    )
                if version == current.previous or version in current.history:
                    # It was in service and someone moved the pointer away (rollback, promote):
                    # a retried event must not undo that decision.
                    return held(
                        "stale",
                        f"version {version} was in service before and was replaced by version "
                        f"{current.version}; automatic promotion does not undo that",
                    )
                champion_source = registry.manifest(current.version).source
                if not is_newer(manifest.source, champion_source):
                    return held(
                        "stale",
                        f"registered as version {version}; the upload in service "
                        f"(version {current.version}) is newer than this one",
                    )
            try:
                result = gates.against(current)
            except UploadRejected as unusable:  # only a holdout gone bad after registering
                return held("gate", f"registered as version {version}; {unusable.message}")
            if not result.passed:
                return held("gate", f"registered as version {version}; {result.reason}", result)
            try:
                registry.promote(version, expected_etag=current.etag if current else None)
            except PreconditionFailed:
                logger.info("pointer moved while promoting; deciding again", extra=fields)
                continue
            canonical = registry.find_version_by_sha256(manifest.sha256)
            if canonical is not None and canonical < version:
                # A racing delivery committed a lower copy of these bytes after this one looked:
                # the loop above re-points the pointer at it.
                version = canonical
                continue
            logger.info("promoted", extra={"model": base["model"], "version": version})
            return promoted(version, f"version {version} promoted: {result.reason}", result)
        raise StorageUnavailable(
            f"current.json kept changing during {PROMOTE_ATTEMPTS} promotion attempts; retry"
        )

    def _promote_over_broken(
        self,
        registry: ModelRegistry,
        *,
        version: int,
        champion: _Champion,
        gates: _Gates,
        held: Callable[..., Outcome],
        promoted: Callable[..., Outcome],
    ) -> Outcome:
        """current.json is unreadable or names no version: nothing known is in service. The
        newest registered version replaces it by compare-and-swap, as ``treeserve promote`` does
        (the holdout gate has no champion to compare with); an older one waits."""
        newest = max(registry.versions(), default=version)
        if version < newest:
            return held(
                "stale",
                f"registered as version {version}; {champion.broken}; version {newest} was "
                "registered after this upload, so automatic promotion leaves the choice to you",
            )
        result = gates.against(None)
        if not result.passed:
            return held("gate", f"registered as version {version}; {result.reason}", result)
        try:
            registry.promote(version, expected_etag=champion.etag)
        except PreconditionFailed:
            # Someone repaired or replaced the pointer meanwhile: let the retry decide again.
            raise StorageUnavailable(
                "current.json changed while replacing a broken pointer; retry"
            ) from None
        logger.warning(
            "promoted over a broken pointer",
            extra={"model": registry.name, "version": version, "problem": champion.broken},
        )
        return promoted(
            version,
            f"version {version} promoted, replacing a broken pointer ({champion.broken}): "
            f"{result.reason}",
            result,
        )

    def _reject(
        self,
        registry: ModelRegistry,
        event: UploadEvent,
        model: str,
        uid: str,
        rejected: UploadRejected,
    ) -> Outcome:
        logger.info("rejected", extra={"model": model, "key": event.key, "code": rejected.code})
        source = {
            "bucket": event.bucket,
            "key": event.key,
            "etag": event.etag,
            "size": event.size,
            "version_id": event.version_id,
            "sequencer": event.sequencer,
            "event_time": event.event_time,
        }
        registry.reject(uid, rejected.code, rejected.message, source)
        return Outcome(
            "rejected",
            event.key,
            event.etag,
            model=model,
            upload_id=uid,
            code=rejected.code,
            message=rejected.message,
            **self._event_fields(event),
        )

    def _finish(self, registry: ModelRegistry, outcome: Outcome, seconds: float) -> Outcome:
        assert outcome.upload_id is not None  # noqa: S101 - only recorded outcomes get here
        recorded = registry.record_outcome(outcome.upload_id, outcome.to_dict())
        if recorded.get("attempt") != outcome.attempt:
            # A concurrent delivery of the same event recorded first; its word is final.
            winner = Outcome.from_dict(recorded)
            winner.redelivered = True
            return winner
        if outcome.status == "rejected":
            self._count("ModelsRejected")
        elif outcome.status == "promoted":
            self._count("ModelsPromoted")
        self.metrics.add_metric(name="RefreshSeconds", unit=MetricUnit.Seconds, value=seconds)
        if outcome.status in ("rejected", "promoted", "registered"):
            self._notify(outcome)
        return outcome

    # -- helpers

    def _duplicate(
        self, event: UploadEvent, version: int, original: ModelManifest, base: dict[str, Any]
    ) -> Outcome:
        return Outcome(
            "duplicate",
            event.key,
            event.etag,
            version=version,
            code="duplicate",
            message=f"nothing new was registered (version {version} came from "
            f"{original.source.get('key') or 'another upload'}); put it in service with "
            f"`treeserve promote {version}`",
            **self._event_fields(event),
            **base,
        )

    def _ignored(
        self,
        event: UploadEvent,
        model: str | None,
        code: str,
        message: str,
        uid: str | None = None,
    ) -> Outcome:
        return Outcome(
            "ignored",
            event.key,
            event.etag,
            model=model,
            upload_id=uid,
            code=code,
            message=message,
            **self._event_fields(event),
        )

    @staticmethod
    def _event_fields(event: UploadEvent) -> dict[str, Any]:
        return {
            "bucket": event.bucket,
            "sequencer": event.sequencer,
            "event_time": event.event_time,
        }

    @staticmethod
    def _source(event: UploadEvent, obj: UploadObject, upload: ModelUpload) -> dict[str, Any]:
        return {
            "bucket": event.bucket,
            "key": event.key,
            "etag": event.etag,
            "version_id": event.version_id,
            "sequencer": event.sequencer,
            # Upload time: the event's, else the object's Last-Modified (direct invocations).
            "event_time": event.event_time or obj.last_modified,
            "upload_sha256": upload.upload_sha256,
            "upload_size": upload.upload_size,
        }

    def _count(self, name: str) -> None:
        self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)

    def _notify(self, outcome: Outcome) -> None:
        """Tell the topic; best effort: the registry already holds the truth."""
        topic = self.settings.notification_topic_arn
        if not topic:
            return
        subject = f"treeserve {outcome.model}: {outcome.status}"
        if outcome.version is not None:
            subject += f" v{outcome.version}"
        try:
            self.sns.publish(
                TopicArn=topic,
                Subject=subject[:100],
                Message=orjson.dumps(outcome.to_dict()).decode(),
                MessageAttributes={
                    "status": {"DataType": "String", "StringValue": outcome.status},
                    "model": {"DataType": "String", "StringValue": outcome.model or "-"},
                },
            )
        except (ClientError, BotoCoreError) as exc:
            # The outcome is recorded and the metrics are out; a lost notification must not
            # fail the invocation and send a finished upload to the retry queue.
            logger.error("SNS notification failed", extra={"error": type(exc).__name__})
            self._count("NotificationsFailed")


@dataclass(frozen=True, slots=True)
class _Champion:
    """What current.json says: the pointer (None: nothing in service, or broken), the ETag to
    swap against, and why it is broken (unreadable, or naming a version that does not exist)."""

    pointer: Pointer | None
    etag: str | None
    broken: str | None = None


def _champion(registry: ModelRegistry) -> _Champion:
    try:
        pointer = registry.current()
    except PointerUnreadable as unreadable:
        return _Champion(None, unreadable.etag, str(unreadable))
    if pointer is None:
        return _Champion(None, None)
    problem = registry.pointer_problem(pointer)
    if problem is not None:
        return _Champion(None, pointer.etag, problem)
    return _Champion(pointer, pointer.etag)


def _claim_sha256(registry: ModelRegistry, sha: str, uid: str) -> tuple[int | None, str | None]:
    """Claim the right to register these bytes.

    ``(None, etag)``: the claim is ours (its ETag, to release it); register the bytes.
    ``(version, None)``: another delivery held the claim and committed ``version`` meanwhile.
    Raises StorageUnavailable if the holder is still at it after :data:`CLAIM_WAIT_SECONDS` (the
    retry looks again). A claim older than :data:`CLAIM_LEASE_SECONDS`, or released, belongs to a
    delivery that stopped between claiming and committing: it is taken over by compare-and-swap.
    """
    key = f"{registry.prefix}claims/{sha}.json"
    nonce = uuid.uuid4().hex
    mine = orjson.dumps({"upload_id": uid, "nonce": nonce, "claimed_at": time.time()})
    try:
        return None, registry.store.put(key, mine, if_none_match=True)
    except PreconditionFailed:
        pass
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    while True:
        version = registry.find_version_by_sha256(sha)
        if version is not None:
            return version, None
        held = registry.store.get(key)
        try:
            claim = orjson.loads(held.body)
            holder, claimed_at = claim.get("nonce"), float(claim["claimed_at"])
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            holder, claimed_at = None, 0.0  # unreadable: treat as expired
        if holder == nonce:
            return None, held.etag  # our own create, whose answer was lost and retried
        if time.time() - claimed_at > CLAIM_LEASE_SECONDS:
            try:
                return None, registry.store.put(key, mine, if_match=held.etag)
            except PreconditionFailed:
                continue  # someone else took it over: look again
        if time.monotonic() >= deadline:
            raise StorageUnavailable(
                "another delivery is registering the same model bytes; retry shortly"
            )
        time.sleep(CLAIM_POLL_SECONDS)


def _release_claim(registry: ModelRegistry, sha: str, etag: str) -> None:
    """Mark our claim expired after a failed registration, so an immediate retry may take it."""
    released = orjson.dumps({"released": True, "claimed_at": 0})
    # If S3 is failing this fails too, and the lease expires instead.
    with contextlib.suppress(TreeserveError):
        registry.store.put(f"{registry.prefix}claims/{sha}.json", released, if_match=etag)


def _same_upload(registered: dict[str, Any], upload: dict[str, Any]) -> bool:
    return bool(registered) and all(
        registered.get(k) == upload.get(k) for k in ("bucket", "key", "etag")
    )


class _Gates:
    """The quality gate for one upload, scored once per champion version."""

    def __init__(
        self,
        service: RefreshService,
        registry: ModelRegistry,
        upload: ModelUpload,
        manifest: ModelManifest,
    ) -> None:
        self.service = service
        self.registry = registry
        self.upload = upload
        self.manifest = manifest
        self.ungated = ungated_reason(manifest.objective, manifest.task, upload.info.num_target)
        self._results: dict[int | None, gate.GateResult] = {}
        self._challenger: dict[str, float] | None = None
        self._y: np.ndarray | None = None

    @property
    def has_holdout(self) -> bool:
        return self.upload.holdout_X is not None and self.upload.holdout_y is not None

    @property
    def challenger_metrics(self) -> dict[str, float]:
        """The challenger's own holdout metrics ({} without a holdout or an ungated task)."""
        if self._challenger is None:
            self._challenger = {}
            task = self.manifest.task
            if self.upload.holdout_y is not None and self.ungated is None:
                self._y = gate.check_labels(task, self.upload.holdout_y, self.manifest.num_class)
                outputs = gate.model_outputs(
                    self.upload.model_ubj, self._holdout, task, self.manifest.iteration_range
                )
                if not np.all(np.isfinite(outputs)):
                    raise UploadRejected(
                        "non_finite", "the model predicts non-finite values on the holdout"
                    )
                self._challenger = gate.score(
                    task, self._y, outputs, self.manifest.objective, self.manifest.threshold
                )
        return self._challenger

    @property
    def _holdout(self) -> np.ndarray:
        return np.asarray(self.upload.holdout_X, dtype=np.float64)

    def against(self, current: Pointer | None) -> gate.GateResult:
        champion_version = current.version if current is not None else None
        cached = self._results.get(champion_version)
        if cached is None:
            cached = self._score(champion_version)
            self._results[champion_version] = cached
        return cached

    def _score(self, champion_version: int | None) -> gate.GateResult:
        tolerance = self.service.settings.promotion_tolerance
        challenger = self.challenger_metrics
        task = self.manifest.task
        if not self.has_holdout:
            return gate.GateResult("skip", "no holdout to gate on", tolerance=tolerance)
        if self.ungated is not None:
            return gate.GateResult("skip", self.ungated, tolerance=tolerance)
        if champion_version is None:
            return gate.GateResult(
                "skip", "no champion in service", tolerance=tolerance, challenger=challenger
            )
        champion = self.registry.manifest(champion_version)
        columns = gate.champion_columns(self.manifest.feature_names, champion.feature_names)
        comparable = (
            champion.task == task
            and columns is not None
            and (task != "multiclass" or champion.num_class == self.manifest.num_class)
        )
        if not comparable or columns is None or self._y is None:
            # Fail closed: a gate that cannot compare must not wave a schema change through.
            return gate.GateResult(
                "hold",
                f"the champion (v{champion_version}, {champion.task}, "
                f"{len(champion.feature_names)} features) cannot be scored on this holdout; "
                "promote by hand if the change is intended",
                tolerance=tolerance,
                challenger=challenger,
                champion_version=champion_version,
            )
        champion_outputs = gate.model_outputs(
            self.registry.model_bytes(champion_version, champion),
            self._holdout[:, columns],
            task,
            champion.iteration_range,
        )
        champion_metrics = gate.score(
            task, self._y, champion_outputs, champion.objective, champion.threshold
        )
        return gate.compare(
            task, challenger, champion_metrics, tolerance, champion_version=champion_version
        )
