"""Where the registry keeps its objects: the storage protocol, the S3 adapter, a fake.

:class:`RegistryStore` is the protocol :class:`~treeserve.registry.model_registry.ModelRegistry`
needs: get/put/head/list/delete with ETags, create-only writes (``If-None-Match: *``) and
compare-and-swap writes (``If-Match``). :class:`S3RegistryStore` is the S3 implementation;
:class:`InMemoryRegistryStore` is a thread-safe fake with the same semantics. Both pass
``tests/unit/test_registry_contract.py``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
)

from treeserve.aws import s3_client, s3_errors
from treeserve.errors import (
    BucketNotFound,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "InMemoryRegistryStore",
    "RegistryStore",
    "S3RegistryStore",
    "StoredObject",
]


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

    def list_folders(self, prefix: str) -> Iterator[str]:
        """The names of the "folders" right under ``prefix`` (which ends in ``/``): the first
        path segment after it of every key, once each, in lexicographic order (S3's
        ``Delimiter="/"`` listing: one entry per folder, however many keys it holds)."""
        ...


def _same_etag(a: str, b: str) -> bool:
    return a.strip('"') == b.strip('"')


def etag_moved(seen: str | None, expected: str | None) -> bool:
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

    def list_folders(self, prefix: str) -> Iterator[str]:
        with self._lock:
            rests = [k[len(prefix) :] for k in self._objects if k.startswith(prefix)]
        yield from sorted({rest.split("/", 1)[0] for rest in rests if "/" in rest})


# --- the S3 adapter ------------------------------------------------------------------------------


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
        with s3_errors(self.bucket, key):
            resp = self.s3.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"].read()
        return StoredObject(body, resp["ETag"])

    def get_if_changed(self, key: str, etag: str | None) -> StoredObject | None:
        if etag is None:
            return self.get(key)
        with s3_errors(self.bucket, key):
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
        with s3_errors(self.bucket, key, absent_is=absent_is):
            resp = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **kwargs)
        return resp["ETag"]

    def head(self, key: str) -> str | None:
        try:
            with s3_errors(self.bucket, key):
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
            with s3_errors(self.bucket, prefix):
                page = self.s3.list_objects_v2(**kwargs)
            for item in page.get("Contents", []):
                yield item["Key"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def list_folders(self, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "Delimiter": "/",
                "MaxKeys": self.page_size,
            }
            if token:
                kwargs["ContinuationToken"] = token
            with s3_errors(self.bucket, prefix):
                page = self.s3.list_objects_v2(**kwargs)
            for item in page.get("CommonPrefixes", []):
                yield item["Prefix"][len(prefix) :].rstrip("/")
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # -- used by the CLI, kept here so botocore errors are translated in one place

    def check_bucket(self) -> None:
        """Raise BucketNotFound / StorageAccessDenied / StorageUnavailable unless usable."""
        try:
            with s3_errors(self.bucket, "", absent_is=BucketNotFound):
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
            with s3_errors(self.bucket, key):
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
