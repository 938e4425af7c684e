"""Prediction capture for monitoring: a sample of what the models in service saw and answered.

Each execution environment keeps one :class:`CaptureBuffer`. A request hands it its rows; a
``CAPTURE_SAMPLE_RATE`` share of them (per row, at random) is kept in memory: references to the
request's own arrays (no copy, no encoding: about a microsecond a request). The buffer is
encoded in bulk (about 0.4 ms per 1,000 rows of 30 features) and written to S3 as ONE Parquet
object per model, ``captures/<model>/dt=YYYY-MM-DD/<time>-<random>.parquet``, when it holds
``CAPTURE_MAX_ROWS`` rows or its oldest row is ``CAPTURE_MAX_AGE_SECONDS`` old. Both bounds are
checked on each request, so there is never one S3 call per request. The format and the key are
:mod:`treeserve.captures`'.

Off the request's path as far as Lambda allows: with ``background=True`` (the inference
function) the request that crosses a bound hands the batch to a writer thread and answers
without waiting; the encoding and the PUT run while the environment serves its next requests.
Lambda freezes the environment between invocations, so a write may pause there and resume on
the next invocation (the capture client's short timeouts and retries cover a connection that
went stale meanwhile). One write at a time: a bound crossed while the previous write still runs
waits for it.

Memory: the buffer holds at most ``CAPTURE_MAX_ROWS`` rows plus the last request's, and one
write in flight at most as many again (float32 inputs and outputs, ids); each encoded object
exists only while it is written.

What can be lost, and the bound: sampled rows live only in the environment's memory until
their write completes. Lambda can reclaim an idle (frozen) environment without running any
more code, so per environment at most the rows of the write in flight and the buffer are lost:
fewer than ``2 x CAPTURE_MAX_ROWS`` rows (plus two requests' rows), covering at most
``CAPTURE_MAX_AGE_SECONDS`` of sampled traffic (twice that with a write in flight), but only if
a request arrived after that age passed (the age is checked when a request arrives). When the
runtime sends SIGTERM (it does when an extension is registered),
:meth:`CaptureBuffer.install_sigterm_flush` finishes the write in flight and writes the buffer.
A failed write is logged and counted (``CaptureFlushFailures``) and its batch dropped, so memory
stays bounded and the request is never failed by capture.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from treeserve.aws import capture_s3_client
from treeserve.captures import CaptureRows, categories_of, encode_capture, object_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from treeserve.model.manifest import ModelManifest
    from treeserve.serving.service import MetricsSink

logger = logging.getLogger(__name__)

FLUSH_FAILURES_METRIC = "CaptureFlushFailures"
CAPTURED_ROWS_METRIC = "CapturedRows"
# Background writes still running, of every buffer (wait_for_writes joins them).
_WRITERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def wait_for_writes() -> None:
    """Return once every buffer's background write has finished (tests and tools that read
    the captures right after a request use it)."""
    for writer in list(_WRITERS):
        writer.join()


@dataclass(slots=True)
class _Batch:
    ts: float
    version: int | None
    ids: list[Any]
    X: np.ndarray
    values: np.ndarray
    labels: list[Any] | None
    model: str
    manifest: ModelManifest | None = None
    alias: str | None = None  # who answered: champion, a canary's alias, a pinned alias
    latency_ms: float = float("nan")  # the request's (NaN: not measured)


class CaptureBuffer:
    """Sampled prediction rows, buffered per execution environment and written in batches."""

    def __init__(
        self,
        bucket: str,
        model_name: str,
        sample_rate: float,
        max_rows: int = 1_000,
        max_age_seconds: float = 60.0,
        *,
        s3: S3Client | None = None,
        clock: Callable[[], float] = time.time,
        metrics: MetricsSink | None = None,
        seed: int | None = None,
        background: bool = False,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.bucket = bucket
        self.model_name = model_name
        self.sample_rate = sample_rate
        self.max_rows = max(1, max_rows)
        self.max_age_seconds = max_age_seconds
        self.metrics = metrics
        self._s3 = s3
        self._clock = clock
        self._random = random.Random(seed)  # noqa: S311 -- sampling, not security
        self._rng = np.random.default_rng(seed)
        self._batches: list[_Batch] = []
        self._rows = 0
        self._oldest: float | None = None
        self.background = background
        self._writer: threading.Thread | None = None
        # The local stack's timer thread flushes beside its request threads; SIGTERM's handler
        # may run while this thread holds it: reentrant.
        self._lock = threading.RLock()
        self._in_flight = 0
        self.flushes = 0
        self.flush_failures = 0
        self.dropped_rows = 0

    def reseed(self) -> None:
        """Fresh random state (SnapStart copies of one snapshot would otherwise sample alike)."""
        self._random = random.Random()  # noqa: S311 -- sampling, not security
        self._rng = np.random.default_rng()

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0.0

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def s3(self) -> S3Client:
        return self._s3 if self._s3 is not None else capture_s3_client()

    def record(
        self,
        ids: Sequence[Any],
        X: np.ndarray,
        values: np.ndarray,
        labels: Sequence[Any] | None,
        version: int | None,
        *,
        manifest: ModelManifest | None = None,
        alias: str | None = None,
        latency_ms: float = float("nan"),
    ) -> None:
        """Offer one request's rows; keeps a sample, writes the buffer if a bound is reached.

        ``manifest``: the answering model's (its name, and the categories that name the codes
        of categorical features); without one the rows are the buffer's ``model_name``'s.
        ``alias``: who answered (``champion``, a canary's alias); ``latency_ms``: the
        request's latency, recorded on each of its rows."""
        if self.sample_rate <= 0.0:
            return
        now = self._clock()
        n = len(ids)
        model = manifest.name if manifest is not None and manifest.name else self.model_name
        if self.sample_rate >= 1.0:
            keep = None
        elif n == 1:
            keep = None if self._random.random() < self.sample_rate else np.zeros(0, np.intp)
        else:
            keep = np.flatnonzero(self._rng.random(n) < self.sample_rate)
        if keep is None:
            batch = _Batch(
                now,
                version,
                list(ids),
                X,
                values,
                list(labels) if labels else None,
                model,
                manifest,
                alias,
                latency_ms,
            )
        elif keep.size:
            index = keep.tolist()
            batch = _Batch(
                now,
                version,
                [ids[i] for i in index],
                X[keep],
                values[keep],
                [labels[i] for i in index] if labels else None,
                model,
                manifest,
                alias,
                latency_ms,
            )
        else:
            self.maybe_flush(now)
            return
        self._add(batch)
        self.maybe_flush(now)

    def _add(self, batch: _Batch) -> None:
        with self._lock:
            if self._oldest is None:
                self._oldest = batch.ts
            self._batches.append(batch)
            self._rows += len(batch.ids)

    @property
    def in_flight_rows(self) -> int:
        """Rows of a background write not yet finished."""
        writer = self._writer
        return self._in_flight if writer is not None and writer.is_alive() else 0

    def maybe_flush(self, now: float | None = None) -> bool:
        """Write the buffer if it holds max_rows rows or its oldest row is max_age old (in
        the background when the buffer was built with ``background=True``)."""
        if self._oldest is None:
            return False
        now = self._clock() if now is None else now
        if self._rows >= self.max_rows or now - self._oldest >= self.max_age_seconds:
            return self.flush(wait=not self.background)
        return False

    def wait(self) -> None:
        """Return once no background write is running."""
        writer = self._writer
        if writer is not None:
            writer.join()
            self._writer = None
            self._in_flight = 0

    def flush(self, *, wait: bool = True) -> bool:
        """Write every buffered row, one object per model. Never raises. ``wait``: return once
        written (False if nothing was, or a write failed); else start the write on a thread
        and return True. Either way a previous background write is finished first, so at most
        one is ever in flight (the memory bound)."""
        with self._lock:
            return self._flush(wait=wait)

    def _flush(self, *, wait: bool) -> bool:
        batches, self._batches, rows, self._rows, self._oldest = (
            self._batches,
            [],
            self._rows,
            0,
            None,
        )
        self.wait()
        if not batches:
            return False
        if wait:
            return self._write_all(batches)
        self._in_flight = rows
        writer = threading.Thread(
            target=self._write_all, args=(batches,), name="capture-write", daemon=True
        )
        self._writer = writer
        _WRITERS.add(writer)
        writer.start()
        return True

    def _write_all(self, batches: list[_Batch]) -> bool:
        # One object per model (and per shape: a version with other features gets its own).
        groups: dict[tuple[str, int, int], list[_Batch]] = {}
        for batch in batches:
            width = batch.values.size // max(1, len(batch.ids))
            groups.setdefault((batch.model, batch.X.shape[1], width), []).append(batch)
        ok = True
        for (model, _, _), group in groups.items():
            ok = self._write(model, group) and ok
        _WRITERS.discard(threading.current_thread())
        return ok

    def _write(self, model: str, batches: list[_Batch]) -> bool:
        rows = sum(len(b.ids) for b in batches)
        key = object_key(model, batches[0].ts)
        try:
            body = self.encode(batches)
            self.s3().put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/vnd.apache.parquet",
            )
        except Exception as exc:  # capture must never fail or block serving
            self.flush_failures += 1
            self.dropped_rows += rows
            logger.error(
                "capture write failed; batch dropped",
                extra={"key": key, "rows": rows, "error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            if self.metrics is not None:
                self.metrics.add_metric(name=FLUSH_FAILURES_METRIC, unit="Count", value=1)
            return False
        self.flushes += 1
        logger.info("capture written", extra={"key": key, "rows": rows})
        if self.metrics is not None:
            self.metrics.add_metric(name=CAPTURED_ROWS_METRIC, unit="Count", value=rows)
        return True

    @staticmethod
    def rows(batches: Sequence[_Batch]) -> CaptureRows:
        """The columns of some batches of one model and shape
        (:class:`treeserve.captures.CaptureRows`)."""
        kept = list(batches)
        outputs = [b.values.reshape(len(b.ids), -1) for b in kept]
        X = np.concatenate([b.X for b in kept]).astype(np.float32, copy=False)
        counts = [len(b.ids) for b in kept]
        labelled = any(b.labels for b in kept)
        categories: dict[str, list[str | None]] = {}
        manifest = kept[-1].manifest
        if manifest is not None and manifest.categories:
            categories = categories_of(X, manifest.feature_names, manifest.categories)
        return CaptureRows(
            model=kept[0].model,
            ids=[i for b in kept for i in b.ids],
            ts_ms=np.repeat(np.array([round(b.ts * 1000) for b in kept], np.int64), counts),
            versions=np.repeat(
                np.array([-1 if b.version is None else b.version for b in kept], np.int64), counts
            ),
            inputs=X,
            outputs=np.concatenate(outputs).astype(np.float32, copy=False),
            labels=[
                None if label is None else str(label)
                for b in kept
                for label in (b.labels or [None] * len(b.ids))
            ]
            if labelled
            else None,
            aliases=[b.alias for b in kept for _ in range(len(b.ids))],
            latency_ms=np.repeat(np.array([b.latency_ms for b in kept], np.float32), counts),
            categories=categories,
        )

    @classmethod
    def encode(cls, batches: Sequence[_Batch]) -> bytes:
        """The Parquet object of some batches of one model (:func:`treeserve.captures.encode_capture`)."""
        return encode_capture(cls.rows(batches))

    def install_sigterm_flush(self) -> bool:
        """Write the buffer when the runtime sends SIGTERM (sent when an extension is present).

        Chains to any previous handler. Returns False where signals cannot be installed
        (not the main thread)."""
        try:
            previous = signal.getsignal(signal.SIGTERM)

            def on_sigterm(signum: int, frame: Any) -> None:
                self.flush()
                if callable(previous):
                    previous(signum, frame)
                else:  # default action: terminate, as if we had never been here
                    signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
                    os.kill(os.getpid(), signal.SIGTERM)

            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            return False
        return True
