"""The batch worker: score one object, streaming, with the model a job is pinned to.

Each object is read in pieces (:mod:`treeserve.batch.stream`) and scored in chunks of at most
``chunk_rows`` rows, each chunk parsed by the inference API's own parser
(:func:`treeserve.serving.inputs.parse_body` for CSV, :func:`~treeserve.serving.inputs.parse_records`
for JSON Lines records) and predicted by :class:`treeserve.model.predictor.Predictor`: the answers
are the inference API's, which are the model's own ``predict``. Three threads share the work: one
reads and parses the next chunks, the caller's predicts (XGBoost, one thread, without the GIL),
one formats and writes the previous chunk's output, each at most ``PREFETCH_CHUNKS`` chunks apart;
so memory is bounded by a few pieces, chunks and one output part, whatever the object's size.
The output is the same bytes as with one thread (``prefetch=0``).

Formats, by the key's suffix:

- ``.csv``: a header of feature names (any order, a subset; a column ``id`` gives the row ids),
  then one row per line (a quoted field cannot span lines); output CSV with the header of
  ``Accept: text/csv`` (``id,prediction[,label]``, ``id,prob_<class>...,label``, or one column
  per output).
- ``.jsonl``, ``.ndjson``: one JSON object per line, by feature name (``null`` or absent:
  missing); a field ``id`` gives the row's id. Output JSON Lines with the same columns as keys.

Rows without an id get ``<object key>:<row>`` (row counted from 0 over the object's data rows),
the same on every retry. A malformed object (bad header, a line that does not parse, a value that
does not fit the model) is reported with its reason and writes nothing (the multipart upload is
aborted); the other objects of the batch are scored all the same. Storage trouble raises
(:class:`~treeserve.errors.StorageUnavailable`), so Step Functions retries the batch.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from queue import Full, Queue
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson

from treeserve.aws import s3_client
from treeserve.batch.events import BatchItem
from treeserve.batch.jobs import BadJob, JobSpec, output_key
from treeserve.batch.stream import (
    ObjectSink,
    ObjectSource,
    S3MultipartWriter,
    S3RangeReader,
    line_blocks,
)
from treeserve.errors import (
    InputMismatch,
    InvalidInput,
    MalformedBody,
    ModelLoadError,
    NotFound,
    PreconditionFailed,
)
from treeserve.model.predictor import Prediction, Predictor
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve.serving.endpoints import prediction_table
from treeserve.serving.inputs import (
    ID_COLUMN,
    MAX_ID_LENGTH,
    FeatureSchema,
    parse_body,
    parse_records,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# A chunk's body is checked by the API's parser against a byte limit: one chunk of lines is
# already bounded by the rows it holds, so the limit only has to be out of the way.
_NO_BYTE_LIMIT = 1 << 62
# Chunks that may wait between the threads (see _prefetched, _WriteBehind): at most this many
# parsed chunks wait for the predictor and this many predictions for the writer, besides the
# one being parsed, predicted and written (a 10,000-row chunk of 30 features: about 1.2 MB of
# float32, its text about 2 MB while parsed).
PREFETCH_CHUNKS = 2
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class BatchModel:
    """A job's model, loaded once per environment and version."""

    name: str
    version: int
    sha256: str
    predictor: Predictor
    schema: FeatureSchema


def load_model(registry: ModelRegistry, version: int, sha256: str) -> BatchModel:
    """Load ``version`` and check it is the bytes the job was pinned to."""
    manifest = registry.manifest(version)
    if manifest.sha256 != sha256:
        raise ModelLoadError(
            f"version {version} of model {registry.name!r} has sha256 {manifest.sha256[:12]}..., "
            f"the job was pinned to {sha256[:12]}..."
        )
    predictor = Predictor.load(registry.model_bytes(version, manifest), manifest)
    predictor.version = version
    schema = FeatureSchema(predictor.feature_names, manifest.categories)
    return BatchModel(registry.name, version, sha256, predictor, schema)


@dataclass(slots=True)
class ObjectResult:
    """What scoring one object gave: ``status`` "scored" or "failed" (with ``reason``)."""

    key: str
    status: str
    rows: int = 0
    output_key: str | None = None
    reason: str | None = None
    seconds: float = 0.0
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def object_format(key: str) -> str | None:
    lowered = key.lower()
    if lowered.endswith(CSV_SUFFIXES):
        return "csv"
    if lowered.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


class _Table:
    """Predictions -> output bytes in the object's format, header once.

    One value per row (binary, regression) with ids and labels that need no CSV quoting is
    formatted directly, as csv.writer would write it (``repr`` of each float, fields unquoted);
    everything else goes through csv.writer."""

    def __init__(self, fmt: str, model: BatchModel) -> None:
        self.fmt = fmt
        self.model = model
        self.header_written = False

    def encode(self, ids: list[Any], X: np.ndarray) -> bytes:
        return self.format(ids, self.model.predictor.predict(X))

    def format(self, ids: list[Any], prediction: Prediction) -> bytes:
        predictor = self.model.predictor
        if self.fmt == "csv" and prediction.values.ndim == 1:
            fast = self._plain_csv(ids, prediction.values, prediction.labels)
            if fast is not None:
                return fast
        header, rows = prediction_table(
            ids,
            prediction.values,
            prediction.labels,
            predictor.class_names,
            predictor.output_names,
        )
        if self.fmt == "jsonl":
            return b"".join(
                orjson.dumps(dict(zip(header, row, strict=True))) + b"\n" for row in rows
            )
        return self._csv(header, rows)

    def _csv(self, header: list[Any], rows: list[list[Any]]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if not self.header_written:
            writer.writerow(header)
            self.header_written = True
        writer.writerows(rows)
        return out.getvalue().encode()

    def _plain_csv(
        self, ids: list[Any], values: np.ndarray, labels: list[Any] | None
    ) -> bytes | None:
        texts = "".join(map(str, ids)) + ("".join(map(str, labels)) if labels is not None else "")
        if any(c in texts for c in _NEEDS_QUOTES):
            return None
        predictor = self.model.predictor
        head = ""
        if not self.header_written:
            header, _ = prediction_table(
                [], values[:0], None if labels is None else [], predictor.class_names, None
            )
            head = ",".join(map(str, header)) + "\n"  # fixed names: id,prediction[,label]
            self.header_written = True
        if labels is None:
            body = "".join(f"{i},{v!r}\n" for i, v in zip(ids, values.tolist(), strict=True))
        else:
            body = "".join(
                f"{i},{v!r},{lab}\n" for i, v, lab in zip(ids, values.tolist(), labels, strict=True)
            )
        return (head + body).encode()


_NEEDS_QUOTES = ('"', "\r", "\n", ",")


def _csv_chunks(
    blocks: Iterator[list[bytes]], schema: FeatureSchema, key: str, chunk_rows: int
) -> Generator[tuple[list[Any], np.ndarray], None, None]:
    first = next(blocks, None)
    if not first:
        raise MalformedBody("the object holds no rows")
    header_line, rest = first[0], first[1:]
    try:
        header = next(csv.reader([header_line.decode("utf-8-sig")]))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MalformedBody(f"the CSV header cannot be read: {exc}") from None
    names = [h.strip() for h in header]
    unknown = [h for h in names if h not in schema.index and h != ID_COLUMN]
    if unknown:
        raise InputMismatch(
            "a CSV object needs a header of feature names (and optionally id); column(s) "
            f"{', '.join(map(repr, unknown[:5]))} are not features of the model "
            f"({schema.describe()})"
        )
    header_bytes = header_line.removeprefix(b"\xef\xbb\xbf") + b"\n"
    row = 0

    def chunk(lines: list[bytes]) -> tuple[list[Any], np.ndarray]:
        nonlocal row
        try:
            parsed = parse_body(
                header_bytes + b"\n".join(lines),
                "text/csv",
                schema,
                max_rows=chunk_rows,
                max_bytes=_NO_BYTE_LIMIT,
            )
        except InvalidInput as exc:
            raise type(exc)(f"rows {row}..{row + len(lines) - 1} (from 0): {exc}") from None
        n = parsed.X.shape[0]
        ids = [f"{key}:{row + i}" for i in range(n)] if parsed.ids_generated else parsed.ids
        row += n
        return ids, parsed.X

    if rest:
        yield chunk(rest)
    for lines in blocks:
        yield chunk(lines)


def _jsonl_chunks(
    blocks: Iterator[list[bytes]], schema: FeatureSchema, key: str
) -> Generator[tuple[list[Any], np.ndarray], None, None]:
    row = 0
    id_is_feature = ID_COLUMN in schema.index
    for lines in blocks:
        records: list[Any] = []
        ids: list[Any] = []
        for i, line in enumerate(lines):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise MalformedBody(f"line {row + i} (from 0) is not valid JSON: {exc}") from None
            if type(record) is not dict:
                raise InputMismatch(
                    f"line {row + i} (from 0) must be a JSON object of feature: value"
                )
            rid = None if id_is_feature else record.pop(ID_COLUMN, None)
            if rid is None:
                rid = f"{key}:{row + i}"
            elif (
                isinstance(rid, bool)
                or not isinstance(rid, str | int)
                or len(str(rid)) > MAX_ID_LENGTH
            ):
                raise MalformedBody(
                    f"line {row + i} (from 0): id must be a string (at most {MAX_ID_LENGTH} "
                    "characters) or an integer"
                )
            records.append(record)
            ids.append(rid)
        try:
            X = parse_records(records, schema)
        except InvalidInput as exc:
            raise type(exc)(f"lines {row}..{row + len(lines) - 1} (from 0): {exc}") from None
        row += len(lines)
        yield ids, X


def score_object(
    model: BatchModel,
    key: str,
    source: ObjectSource,
    sink: ObjectSink,
    *,
    chunk_rows: int = 10_000,
    output_key: str | None = None,
    prefetch: int = PREFETCH_CHUNKS,
) -> ObjectResult:
    """Score ``key`` from ``source`` into ``sink``; a malformed object is a failed result, not
    an exception (storage errors do raise).

    With ``prefetch`` > 0 a thread reads and parses up to ``prefetch`` chunks ahead of the
    prediction (:func:`_prefetched`) and another formats and writes up to ``prefetch`` behind it
    (:class:`_WriteBehind`); 0 does everything in the calling thread. The output is the same
    bytes either way."""
    started = time.perf_counter()
    fmt = object_format(key)
    if fmt is None:
        sink.abort()
        return ObjectResult(
            key,
            "failed",
            reason="unknown format: name objects *.csv (with a header) or *.jsonl / *.ndjson",
        )
    blocks = line_blocks(source.pieces(), chunk_rows)
    chunks = (
        _csv_chunks(blocks, schema=model.schema, key=key, chunk_rows=chunk_rows)
        if fmt == "csv"
        else _jsonl_chunks(blocks, schema=model.schema, key=key)
    )
    table = _Table(fmt, model)
    rows = 0
    parsed = _prefetched(chunks, prefetch) if prefetch > 0 else chunks
    writer = _WriteBehind(lambda item: sink.write(table.format(*item)), prefetch)
    try:
        try:
            for ids, X in parsed:
                prediction = model.predictor.predict(X)
                if prefetch > 0:
                    writer.put((ids, prediction))
                else:
                    sink.write(table.format(ids, prediction))
                rows += X.shape[0]
            writer.finish()
        finally:
            parsed.close()  # stops the parsing thread whatever happened
            writer.stop()  # and the writing thread, before the sink is closed or aborted
        if rows == 0:
            raise MalformedBody("the object holds no rows")
    except InvalidInput as exc:
        sink.abort()
        return ObjectResult(
            key, "failed", rows=0, reason=f"{exc}", seconds=_since(started), format=fmt
        )
    except NotFound:
        sink.abort()
        return ObjectResult(key, "failed", reason="the object is gone (deleted after the listing)")
    except PreconditionFailed:
        sink.abort()
        return ObjectResult(
            key, "failed", reason="the object was replaced while it was read (its ETag changed)"
        )
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return ObjectResult(key, "scored", rows, output_key, seconds=_since(started), format=fmt)


_DONE = object()


def _prefetched(items: Iterator[_T], depth: int) -> Generator[_T, None, None]:
    """``items``, produced by a thread at most ``depth`` ahead of the consumer.

    The thread reads, splits and parses chunk i+1 while the caller predicts and writes chunk i
    (XGBoost's prediction releases the GIL); what the producer raises is raised here, in order,
    and a consumer that stops early (an exception, a closed generator) stops the producer. At
    most ``depth`` chunks wait in the queue, plus the one the producer is making and the one
    the caller holds."""
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
            except Full:
                continue
            return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, exc))
            return
        put((_DONE, None))

    producer = threading.Thread(target=produce, name="batch-parse", daemon=True)
    producer.start()
    try:
        while True:
            item, exc = queue.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        producer.join()


class _WriteBehind:
    """``write(item)`` for each item put, in order, in a thread at most ``depth`` items behind
    (formatting chunk i-1 and uploading its part while chunk i is predicted). What ``write``
    raises is raised by the next ``put`` or by ``finish``; after an error the rest is dropped.
    With ``depth`` 0 no thread starts (``put`` is not used then)."""

    def __init__(self, write: Callable[[Any], None], depth: int) -> None:
        self._write = write
        self._queue: Queue[Any] = Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="batch-write", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as exc:  # handed to the caller, raised there
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, item: Any) -> None:
        self._raise()
        self._queue.put(item)

    def finish(self) -> None:
        """Wait until everything put is written; raise what writing raised."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
            self._thread = None


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)


class BatchWorker:
    """Scores the objects of a batch for a job: the model loaded once per environment (and kept
    while the next batch is for the same version), each object read and written in pieces."""

    def __init__(
        self,
        bucket: str,
        s3: S3Client | None = None,
        *,
        chunk_rows: int = 10_000,
        part_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.bucket = bucket
        self._s3 = s3
        self.chunk_rows, self.part_bytes = chunk_rows, part_bytes
        self._model: BatchModel | None = None

    @property
    def s3(self) -> S3Client:
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def model(self, spec: JobSpec) -> BatchModel:
        cached = self._model
        if cached is None or (cached.name, cached.version, cached.sha256) != (
            spec.model,
            spec.version,
            spec.sha256,
        ):
            registry = ModelRegistry(S3RegistryStore(self.bucket, self.s3), spec.model)
            cached = self._model = load_model(registry, spec.version, spec.sha256)
        return cached

    def score_items(self, spec: JobSpec, items: list[BatchItem]) -> list[ObjectResult]:
        model = self.model(spec)
        results = []
        for item in items:
            started = time.perf_counter()
            try:
                target = output_key(spec.model, spec.job, item.key)
            except BadJob as exc:
                results.append(ObjectResult(item.key, "failed", reason=str(exc)))
                continue
            if item.key.endswith("/") and item.size == 0:  # a "folder" placeholder object
                continue
            source = S3RangeReader(
                self.s3,
                self.bucket,
                item.key,
                size=item.size,
                etag=item.etag,
                part_bytes=self.part_bytes,
            )
            fmt = object_format(item.key)
            sink = S3MultipartWriter(
                self.s3,
                self.bucket,
                target,
                part_bytes=self.part_bytes,
                content_type="application/x-ndjson" if fmt == "jsonl" else "text/csv",
            )
            result = score_object(
                model, item.key, source, sink, chunk_rows=self.chunk_rows, output_key=target
            )
            logger.info(
                "object %s",
                result.status,
                extra={
                    "key": item.key,
                    "rows": result.rows,
                    "reason": result.reason,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            results.append(result)
        return results
