"""Objects read and written in bounded pieces: ranged GETs in, multipart upload out.

A batch object can be far larger than a worker's memory. :class:`S3RangeReader` reads it with
ranged GETs of ``part_bytes`` (each pinned to the listed ETag with ``If-Match``, so an object
replaced while it is read fails instead of mixing two versions); :class:`FileReader` reads a
local file through the same interface (the benchmark, tests). :func:`line_blocks` turns the
pieces into blocks of at most ``max_lines`` complete lines, holding one piece and one block at
a time. :class:`S3MultipartWriter` writes the output as parts of ``part_bytes`` (one PUT when
it is smaller than one part) and aborts the upload when scoring fails, so an object is either
written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from treeserve.aws import s3_errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class ObjectSource(Protocol):
    """An object read in pieces."""

    def pieces(self) -> Iterator[bytes]: ...


class ObjectSink(Protocol):
    """An object written in pieces: ``write`` then ``close`` (done) or ``abort`` (nothing)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class S3RangeReader:
    """``s3://bucket/key`` in ranged GETs of ``part_bytes`` (``size`` from the listing)."""

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        key: str,
        *,
        size: int,
        etag: str | None = None,
        part_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.size, self.etag, self.part_bytes = size, etag, part_bytes

    def pieces(self) -> Iterator[bytes]:
        for start in range(0, self.size, self.part_bytes):
            end = min(self.size, start + self.part_bytes) - 1
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self.key,
                "Range": f"bytes={start}-{end}",
            }
            if self.etag:
                args["IfMatch"] = self.etag
            with s3_errors(self.bucket, self.key):
                body = self.s3.get_object(**args)["Body"]
                try:
                    data = body.read()
                finally:
                    body.close()
            yield data


class FileReader:
    """A local file through the same interface (what the benchmark reads a 1 GB input with)."""

    def __init__(self, path: str | Path, *, part_bytes: int = 8 * 1024 * 1024) -> None:
        self.path, self.part_bytes = Path(path), part_bytes

    def pieces(self) -> Iterator[bytes]:
        with self.path.open("rb") as fh:
            while data := fh.read(self.part_bytes):
                yield data


def line_blocks(pieces: Iterable[bytes], max_lines: int) -> Iterator[list[bytes]]:
    """Blocks of at most ``max_lines`` non-blank lines (without their line ends, ``\\r\\n`` or
    ``\\n``), in order; a last line without a newline counts."""
    block: list[bytes] = []
    tail = b""
    for piece in pieces:
        if not piece:
            continue
        data = tail + piece
        lines = data.split(b"\n")
        tail = lines.pop()
        kept = list(filter(bytes.strip, lines))  # the non-blank lines, without a Python loop
        if b"\r" in data:
            kept = [line[:-1] if line.endswith(b"\r") else line for line in kept]
        while kept:
            room = max_lines - len(block)
            block.extend(kept[:room])
            kept = kept[room:]
            if len(block) >= max_lines:
                yield block
                block = []
    if tail.strip():
        block.append(tail[:-1] if tail.endswith(b"\r") else tail)
    if block:
        yield block


class S3MultipartWriter:
    """``s3://bucket/key`` written in parts of ``part_bytes`` (S3's minimum part is 5 MiB)."""

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        key: str,
        *,
        part_bytes: int = 8 * 1024 * 1024,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.part_bytes, self.content_type = part_bytes, content_type
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.bytes_written += len(data)
        if len(self._buffer) >= self.part_bytes:
            self._flush_part()

    def _flush_part(self) -> None:
        with s3_errors(self.bucket, self.key):
            if self._upload_id is None:
                self._upload_id = self.s3.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, ContentType=self.content_type
                )["UploadId"]
            number = len(self._parts) + 1
            etag = self.s3.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(self._buffer),
            )["ETag"]
        self._parts.append({"ETag": etag, "PartNumber": number})
        self._buffer = bytearray()

    def close(self) -> None:
        with s3_errors(self.bucket, self.key):
            if self._upload_id is None:
                self.s3.put_object(
                    Bucket=self.bucket,
                    Key=self.key,
                    Body=bytes(self._buffer),
                    ContentType=self.content_type,
                )
                return
        if self._buffer:
            self._flush_part()
        with s3_errors(self.bucket, self.key):
            self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
            )

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            with s3_errors(self.bucket, self.key):
                self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self._upload_id
                )
            self._upload_id = None


class FileWriter:
    """A local file through the sink interface (written to ``<path>.part``, renamed on close)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._part = self.path.with_name(self.path.name + ".part")
        self._fh = self._part.open("wb")
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self.bytes_written += len(data)

    def close(self) -> None:
        self._fh.close()
        self._part.replace(self.path)

    def abort(self) -> None:
        self._fh.close()
        self._part.unlink(missing_ok=True)
