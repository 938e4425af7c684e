"""The model registry on S3: immutable versions, a compare-and-swap pointer, rejections, outcomes.

Keys under ``registry/<model>/`` (DESIGN.md "S3 layout", plus two additions marked *)::

    versions/<n>/model.ubj          immutable; created with If-None-Match: * -- this allocates n
    versions/<n>/manifest.json      immutable; written last: the commit marker of version n
    current.json                    {"version", "sha256", "promoted_at", "previous", "history"}
                                    changed only by compare-and-swap (If-Match: <etag>)
    rejected/<upload-id>.json       {"upload_id", "code", "reason", "source", "rejected_at"}
  * uploads/<upload-id>.json        the outcome of one upload (create-only), read by
                                    ``treeserve publish --wait`` and by redelivered events
  * by-sha256/<sha256>/<n>          index: version n holds model bytes with this sha256

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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

import orjson
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from treeserve.aws import s3_client
from treeserve.errors import (
    ConfigurationError,
    ModelLoadError,
    NoModelInService,
    NotFound,
    PreconditionFailed,
    RegistryError,
    StorageUnavailable,
)
from treeserve.manifest import ModelManifest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "ANY",
    "MODEL_NAME_RE",
    "BucketNotFound",
    "InMemoryRegistryStore",
    "ModelRegistry",
    "Pointer",
    "PointerUnreadable",
    "RegistryStore",
    "S3RegistryStore",
    "StorageAccessDenied",
    "StoredObject",
    "upload_id",
]

HISTORY_LIMIT: Final = 20
# Compare-and-swap attempts of promote/rollback before giving up (StorageUnavailable: retry).
CAS_ATTEMPTS: Final = 16
# Upward probes per allocation pass; after that the registry lists versions/ again.
PROBES_PER_PASS: Final = 64
ALLOCATION_PASSES: Final = 8
# Model names are S3 key segments and metric dimensions: keep them boring (as refresh does).
MODEL_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_KEY_RE = re.compile(r"versions/(\d+)/(model\.ubj|manifest\.json)$")


class BucketNotFound(RegistryError):
    """The model bucket does not exist."""


class StorageAccessDenied(RegistryError):
    """The credentials in use may not read or write the model bucket."""


class PointerUnreadable(RegistryError):
    """``current.json`` exists but is not a valid pointer. ``etag`` is the broken object's: a
    promotion replaces it by compare-and-swap against that ETag (``treeserve promote``)."""

    def __init__(self, message: str, etag: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.etag = etag
        self.reason = reason or message


# --- the storage protocol ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object's bytes and its ETag (quoted, as S3 returns it)."""

    body: bytes
    etag: str


class RegistryStore(Protocol):
    """Key-value storage with S3's conditional-request semantics."""

    def get(self, key: str) -> StoredObject:
        """The object; NotFound if absent."""
        ...

    def get_if_changed(self, key: str, etag: str | None) -> StoredObject | None:
        """The object unless its ETag is still ``etag`` (then None); NotFound if absent."""
        ...

    def put(
        self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write; returns the new ETag. PreconditionFailed when a condition does not hold
        (``if_none_match``: the key exists; ``if_match``: the key is absent or has another ETag)."""
        ...

    def head(self, key: str) -> str | None:
        """The ETag, or None if absent."""
        ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in lexicographic order, page by page."""
        ...


def _same_etag(a: str, b: str) -> bool:
    return a.strip('"') == b.strip('"')


def _moved(seen: str | None, expected: str | None) -> bool:
    """Whether the object's ETag (None: absent) is not the one expected (None: absent)."""
    if seen is None or expected is None:
        return (seen is None) != (expected is None)
    return not _same_etag(seen, expected)


class InMemoryRegistryStore:
    """A thread-safe in-memory :class:`RegistryStore` (ETags are quoted md5, like S3's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, StoredObject] = {}
        # How many successful writes each key saw; tests use it to prove immutability.
        self.writes: dict[str, int] = {}

    def get(self, key: str) -> StoredObject:
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise NotFound(key)
        return obj

    def get_if_changed(self, key: str, etag: str | None) -> StoredObject | None:
        obj = self.get(key)
        if etag is not None and _same_etag(obj.etag, etag):
            return None
        return obj

    def put(
        self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        etag = f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
        with self._lock:
            existing = self._objects.get(key)
            if if_none_match and existing is not None:
                raise PreconditionFailed(f"{key} exists")
            if if_match is not None and (
                existing is None or not _same_etag(existing.etag, if_match)
            ):
                raise PreconditionFailed(f"{key} changed")
            self._objects[key] = StoredObject(bytes(body), etag)
            self.writes[key] = self.writes.get(key, 0) + 1
        return etag

    def head(self, key: str) -> str | None:
        with self._lock:
            obj = self._objects.get(key)
        return None if obj is None else obj.etag

    def list_keys(self, prefix: str) -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
        yield from keys


# --- the S3 adapter ------------------------------------------------------------------------------

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_RETRYABLE = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "OperationAborted",
}


@contextmanager
def _translate(
    bucket: str, key: str, *, absent_is: type[RegistryError] = NotFound
) -> Iterator[None]:
    """Turn botocore's errors into treeserve's (the one place that knows botocore)."""
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        where = f"s3://{bucket}/{key}"
        if code == "NoSuchBucket":
            raise BucketNotFound(
                f"bucket {bucket!r} does not exist: create it, or point --bucket/MODEL_BUCKET "
                "at the model bucket (and AWS_ENDPOINT_URL at its endpoint)"
            ) from None
        if code in _PRECONDITION or status in (409, 412):
            raise PreconditionFailed(f"{where}: condition did not hold ({code})") from None
        if code in _NOT_FOUND or status == 404:
            raise absent_is(f"{where} does not exist") from None
        if code in _DENIED or status == 403:
            raise StorageAccessDenied(
                f"access denied to {where} ({code}): use credentials allowed to read and write "
                f"s3://{bucket}/registry/ and incoming/ (check AWS_PROFILE and the bucket policy)"
            ) from None
        if code in _RETRYABLE or status >= 500 or status == 429:
            raise StorageUnavailable(f"S3 is unavailable for {where} ({code}); retry") from exc
        raise RegistryError(
            f"S3 refused an operation on {where}: {code} {err.get('Message', '')}"
        ) from exc
    except (NoCredentialsError, PartialCredentialsError):
        raise ConfigurationError(
            "no AWS credentials found: configure them (aws configure, AWS_PROFILE, or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ) from None
    except NoRegionError:
        raise ConfigurationError(
            "no AWS region configured: set AWS_REGION or AWS_DEFAULT_REGION (e.g. us-east-1)"
        ) from None
    except ParamValidationError as exc:
        raise ConfigurationError(f"S3 refused the request for s3://{bucket}/{key}: {exc}") from None
    except BotoCoreError as exc:
        # Connection refused or reset, timeouts, truncated bodies: all worth a retry.
        raise StorageUnavailable(
            f"cannot reach S3 for s3://{bucket}/{key}: {exc} (check the network, or "
            "AWS_ENDPOINT_URL if you use a local endpoint)"
        ) from exc


class S3RegistryStore:
    """:class:`RegistryStore` on an S3 bucket. ``page_size`` bounds each LIST request."""

    def __init__(self, bucket: str, s3: S3Client | None = None, *, page_size: int = 1000) -> None:
        self.bucket = bucket
        self._s3 = s3
        self.page_size = page_size

    @property
    def s3(self) -> S3Client:
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def get(self, key: str) -> StoredObject:
        with _translate(self.bucket, key):
            resp = self.s3.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"].read()
        return StoredObject(body, resp["ETag"])

    def get_if_changed(self, key: str, etag: str | None) -> StoredObject | None:
        if etag is None:
            return self.get(key)
        with _translate(self.bucket, key):
            try:
                resp = self.s3.get_object(Bucket=self.bucket, Key=key, IfNoneMatch=etag)
            except ClientError as exc:
                if _not_modified(exc):
                    return None
                raise
            body = resp["Body"].read()
        return StoredObject(body, resp["ETag"])

    def put(
        self, key: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        kwargs: dict[str, Any] = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        # With If-Match, an absent key means the condition did not hold (S3 answers 404).
        absent_is = PreconditionFailed if if_match is not None else NotFound
        with _translate(self.bucket, key, absent_is=absent_is):
            resp = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **kwargs)
        return resp["ETag"]

    def head(self, key: str) -> str | None:
        try:
            with _translate(self.bucket, key):
                resp = self.s3.head_object(Bucket=self.bucket, Key=key)
        except NotFound:
            return None
        return resp["ETag"]

    def list_keys(self, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": self.page_size,
            }
            if token:
                kwargs["ContinuationToken"] = token
            with _translate(self.bucket, prefix):
                page = self.s3.list_objects_v2(**kwargs)
            for item in page.get("Contents", []):
                yield item["Key"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # -- used by the CLI, kept here so botocore errors are translated in one place

    def check_bucket(self) -> None:
        """Raise BucketNotFound / StorageAccessDenied / StorageUnavailable unless usable."""
        try:
            with _translate(self.bucket, "", absent_is=BucketNotFound):
                self.s3.head_bucket(Bucket=self.bucket)
        except BucketNotFound:
            raise BucketNotFound(
                f"bucket {self.bucket!r} does not exist: create it, or point --bucket/"
                "MODEL_BUCKET at the model bucket (and AWS_ENDPOINT_URL at its endpoint)"
            ) from None

    def upload(
        self, key: str, fileobj: IO[bytes], *, callback: Callable[[int], None] | None = None
    ) -> str:
        """Upload a file object (multipart above the transfer threshold); returns its ETag."""
        try:
            with _translate(self.bucket, key):
                self.s3.upload_fileobj(fileobj, self.bucket, key, Callback=callback)
        except S3UploadFailedError as exc:
            raise StorageUnavailable(f"upload to s3://{self.bucket}/{key} failed: {exc}") from exc
        etag = self.head(key)
        if etag is None:
            raise StorageUnavailable(f"s3://{self.bucket}/{key} is missing right after its upload")
        return etag


def _not_modified(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("304", "NotModified") or status == 304


# --- the registry --------------------------------------------------------------------------------


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
        if not MODEL_NAME_RE.match(name):
            raise ConfigurationError(
                f"model name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
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
            if expected_etag is not ANY and _moved(seen, expected_etag):
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

        NoModelInService without a pointer; RegistryError when there is nothing to go back to."""
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

        return self._swap(compute, ANY)

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
