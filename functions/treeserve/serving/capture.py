"""Prediction capture for monitoring: a sample of what the model in service saw and answered.

Each execution environment keeps one :class:`CaptureBuffer`. A request hands it its rows; a
``CAPTURE_SAMPLE_RATE`` share of them (per row, at random) is kept in memory as arrays. The
buffer is written to S3 as ONE gzipped JSON Lines object,
``captures/<model>/dt=YYYY-MM-DD/<time>-<random>.jsonl.gz``, when it holds
``CAPTURE_MAX_ROWS`` rows or its oldest row is ``CAPTURE_MAX_AGE_SECONDS`` old. Both bounds are
checked on each request, so there is never one S3 call per request; the request that crosses a
bound pays for the write. The line format and the key are :mod:`treeserve.captures`'.

What can be lost, and the bound: sampled rows live only in the environment's memory until the
next write. Lambda can reclaim an idle environment without running any more code, so at most
the rows sampled since the last write are lost per environment: fewer than
``CAPTURE_MAX_ROWS`` rows (plus the rows of the last request) and at most
``CAPTURE_MAX_AGE_SECONDS`` of sampled traffic, but only if no request arrived after that age
passed (the age is checked when a request arrives). When the runtime sends SIGTERM (it does when
an extension is registered), :meth:`CaptureBuffer.install_sigterm_flush` writes the buffer
first. A failed write is logged and counted (``CaptureFlushFailures``) and its batch dropped,
so memory stays bounded and the request is never failed by capture.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from treeserve.aws import capture_s3_client
from treeserve.captures import encode_lines, iso_millis, object_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from treeserve.serving.service import MetricsSink

logger = logging.getLogger(__name__)

FLUSH_FAILURES_METRIC = "CaptureFlushFailures"
CAPTURED_ROWS_METRIC = "CapturedRows"
GZIP_LEVEL = 5


@dataclass(slots=True)
class _Batch:
    ts: float
    version: int | None
    ids: list[Any]
    X: np.ndarray
    values: np.ndarray
    labels: list[Any] | None


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
    ) -> None:
        """Offer one request's rows; keeps a sample, writes the buffer if a bound is reached."""
        if self.sample_rate <= 0.0:
            return
        now = self._clock()
        n = len(ids)
        if self.sample_rate >= 1.0:
            self._add(_Batch(now, version, list(ids), X, values, list(labels) if labels else None))
        elif n == 1:
            if self._random.random() < self.sample_rate:
                self._add(
                    _Batch(now, version, list(ids), X, values, list(labels) if labels else None)
                )
        else:
            keep = np.flatnonzero(self._rng.random(n) < self.sample_rate)
            if keep.size:
                index = keep.tolist()
                self._add(
                    _Batch(
                        now,
                        version,
                        [ids[i] for i in index],
                        X[keep],
                        values[keep],
                        [labels[i] for i in index] if labels else None,
                    )
                )
        self.maybe_flush(now)

    def _add(self, batch: _Batch) -> None:
        if self._oldest is None:
            self._oldest = batch.ts
        self._batches.append(batch)
        self._rows += len(batch.ids)

    def maybe_flush(self, now: float | None = None) -> bool:
        """Write the buffer if it holds max_rows rows or its oldest row is max_age old."""
        if self._oldest is None:
            return False
        now = self._clock() if now is None else now
        if self._rows >= self.max_rows or now - self._oldest >= self.max_age_seconds:
            return self.flush()
        return False

    def flush(self) -> bool:
        """Write every buffered row as one object. Never raises; False if nothing was written."""
        batches, rows = self._batches, self._rows
        self._batches, self._rows, self._oldest = [], 0, None
        if not batches:
            return False
        key = object_key(self.model_name, batches[0].ts)
        try:
            body = gzip.compress(self.encode(batches), compresslevel=GZIP_LEVEL, mtime=0)
            self.s3().put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/x-ndjson",
                ContentEncoding="gzip",
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
    def encode(batches: Sequence[_Batch]) -> bytes:
        """The JSON Lines text of some batches (:func:`treeserve.captures.encode_lines`)."""
        return encode_lines(
            row
            for batch in batches
            for row in zip(
                batch.ids,
                [iso_millis(batch.ts)] * len(batch.ids),
                [batch.version] * len(batch.ids),
                batch.X.tolist(),  # orjson writes NaN as null: missing stays missing
                batch.values.tolist(),
                batch.labels or [None] * len(batch.ids),
                strict=True,
            )
        )

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
