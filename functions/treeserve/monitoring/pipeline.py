"""Monitoring: captured traffic of a time window against each serving version's reference.

:func:`run_monitoring` lists ``captures/<model>/dt=YYYY-MM-DD/`` for the days of the window,
downloads the files on a few threads (the GETs release the GIL) while the caller's thread reads
each one (:func:`treeserve.captures.capture_split`: its float32 columns straight from the
Parquet pages with ``np.frombuffer``, about 1 ms per 10,000 rows of 30 features), keeps rows
whose ``ts`` falls in ``[start, end)``, groups them by model version and streams each version's
columns into :class:`treeserve.monitoring.drift` accumulators. Captures of the previous release
(gzipped JSON Lines) are still read, by the slower text path, for one release. Only counts
stay in memory (plus, when labels exist, the predictions of labelled rows), so memory is bounded
by a few capture files and ``ACCUMULATE_VALUES`` gathered values per version, not by the
window.

Labels under ``labels/<model>/`` (CSV ``id,label`` or JSON Lines ``{"id", "label"}``) are read
first (at most ``MAX_LABEL_BYTES``); captured rows whose id has a label give performance over
the window: AUC, accuracy and log loss (classification), RMSE and MAE (regression). A file's ids
are looked up with numpy, width by width (:mod:`treeserve.monitoring.labels`).

The report is written to ``reports/<model>/dt=YYYY-MM-DD/<time>.json``; :func:`emit_metrics`
turns it into EMF metrics through Powertools: the totals by ``service`` (what the template's
alarms watch: the worst model) and again by ``service`` and ``model`` (one series per model, which
the dashboard finds with a SEARCH expression), FeatureDrift by model and feature.
:func:`monitored_models` names the models one run covers when the event names none: every model
with captures in the window, and the default model. Nothing in here knows Lambda event shapes.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import re
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from treeserve.aws import s3_client, s3_errors, sns_client
from treeserve.captures import (
    EXTENSION,
    Split,
    capture_split,
    fast_split,
    parse_lines,
    rows_matrix,
)
from treeserve.errors import (
    NotFound,
    RegistryError,
    TreeserveError,
)
from treeserve.model import decision
from treeserve.model.manifest import ModelManifest
from treeserve.model.metrics import log_loss, roc_auc
from treeserve.monitoring import drift
from treeserve.monitoring.labels import LabelIndex
from treeserve.parquet import ParquetError, StringRuns
from treeserve.settings import DriftRule, Settings, valid_model_name

if TYPE_CHECKING:
    from aws_lambda_powertools import Metrics
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient

# ISA-L inflates gzip about 3x faster than zlib (same format); zlib where no wheel exists.
_inflate: Any
try:
    _inflate = importlib.import_module("isal.isal_zlib")
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _inflate = zlib
INFLATE_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, zlib.error, _inflate.error)

logger = logging.getLogger(__name__)

MAX_CAPTURE_FILE_BYTES = 256 * 1024 * 1024  # decompressed; larger files are skipped, counted
MAX_LABEL_BYTES = 128 * 1024 * 1024
MAX_LABELS = 5_000_000
FETCH_THREADS = 8  # S3 GETs wait on the network (and release the GIL)
MAX_IN_FLIGHT_FILES = 16
MAX_IN_FLIGHT_BYTES = 48 * 1024 * 1024  # compressed; bounds memory to a few inflated files
DEFAULT_RULE = DriftRule()  # DRIFT_METHOD=psi, DRIFT_THRESHOLD=0.1
# Feature values per version gathered before they are counted (float32: 32 MiB, 270,000 rows of
# 30 features): the accumulators' searches of the reference points are paid per gathered batch.
ACCUMULATE_VALUES = 8 << 20
METRIC_DRIFTED_FEATURES = "DriftedFeatures"
METRIC_PREDICTION_DRIFT = "PredictionDrift"
METRIC_ROWS_SEEN = "RowsSeen"
METRIC_QUALITY_FLAGS = "QualityFlaggedFeatures"
METRIC_FEATURE_DRIFT = "FeatureDrift"


class ManifestSource(Protocol):
    """What monitoring needs of the registry (``treeserve.registry.model_registry.ModelRegistry``)."""

    def manifest(self, version: int) -> ModelManifest: ...


# --- time window and keys ----------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (``Z`` allowed); naive times are UTC."""
    try:
        return _utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        raise TreeserveError(f"not an ISO-8601 time: {text[:40]!r}") from None


_DAY_PREFIX = re.compile(r"dt=\d{4}-\d{2}-\d{2}/")


def _ts_key(moment: datetime) -> bytes:
    # Capture times are "YYYY-MM-DDTHH:MM:SS.mmmZ": comparing their first 23 bytes is
    # comparing times, without parsing a million strings.
    return (
        moment.strftime("%Y-%m-%dT%H:%M:%S.").encode()
        + f"{moment.microsecond // 1000:03d}".encode()
    )


def _ms(moment: datetime) -> int:
    """A time as capture files hold it: whole milliseconds since the epoch (UTC)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def report_key(model: str, now: datetime) -> str:
    return (
        f"reports/{model}/dt={now:%Y-%m-%d}/"
        f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}.json"
    )


# --- reading S3 --------------------------------------------------------------------------------


def _list(s3: S3Client, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        with s3_errors(bucket, prefix):
            page = s3.list_objects_v2(**kwargs)
        for obj in page.get("Contents", []):
            yield obj["Key"], int(obj.get("Size", 0))
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _gunzip(data: bytes, limit: int) -> bytes:
    d = _inflate.decompressobj(wbits=47)  # gzip or zlib header, auto-detected
    out: bytes = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(f"decompresses to more than {limit} bytes")
    return out


# A file that cannot be read this way is skipped and counted, never fatal; so is one deleted
# (a lifecycle rule, a user) between the listing and the read (NotFound).
SKIPPABLE: tuple[type[Exception], ...] = (*INFLATE_ERRORS, NotFound)


def _fetch(s3: S3Client, bucket: str, key: str, limit: int) -> bytes:
    with s3_errors(bucket, key):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return _gunzip(body, limit) if key.endswith(".gz") else body


# --- labels ------------------------------------------------------------------------------------


def read_labels(s3: S3Client, bucket: str, model: str) -> dict[str, Any]:
    """Every label under ``labels/<model>/`` by id (later files win), bounded in size."""
    labels: dict[str, Any] = {}
    budget = MAX_LABEL_BYTES
    for key, size in sorted(_list(s3, bucket, f"labels/{model}/")):
        if size > budget or len(labels) >= MAX_LABELS:
            logger.warning("label budget exhausted", extra={"key": key})
            break
        budget -= size
        try:
            raw = _fetch(s3, bucket, key, MAX_LABEL_BYTES)
        except SKIPPABLE as exc:
            logger.warning("label file skipped", extra={"key": key, "error": type(exc).__name__})
            continue
        if key.endswith((".jsonl", ".jsonl.gz", ".json")):
            for line in raw.splitlines():
                if line.strip():
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and "id" in rec and rec.get("label") is not None:
                        labels[str(rec["id"])] = rec["label"]
        elif key.endswith((".csv", ".csv.gz")):
            _read_csv_labels(raw.decode("utf-8", errors="replace"), labels)
    return labels


def _read_csv_labels(text: str, labels: dict[str, Any]) -> None:
    lines = text.splitlines()
    if lines and lines[0].strip() == "id,label" and '"' not in text:
        # The plain two-column file: split each line once (the csv module is ~10x slower).
        for line in lines[1:]:
            row_id, sep, label = line.partition(",")
            label = label.strip()
            if sep and row_id and label and "," not in label:
                labels[row_id] = label
        return
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("id") not in (None, "") and row.get("label") not in (None, ""):
            labels[str(row["id"])] = row["label"]


def _label_value(label: Any, manifest: ModelManifest) -> float | None:
    """A label as the number the metrics use (class index, 0/1, or the regression target)."""
    if manifest.class_names and str(label) in manifest.class_names:
        return float(manifest.class_names.index(str(label)))
    try:
        value = float(label)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def performance(
    task: str,
    y: npt.ArrayLike,
    predictions: npt.ArrayLike,
    threshold: float | None = 0.5,
    objective: str = "binary:logistic",
) -> dict[str, Any]:
    """Performance of predictions against labels (metrics from :mod:`treeserve.model.metrics`).

    Binary ``predictions`` are the values the model served (a margin for ``binary:logitraw``):
    accuracy decides labels as serving does (:mod:`treeserve.model.decision`), log loss on
    probabilities."""
    y_arr = np.asarray(y, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    out: dict[str, Any] = {"rows": int(y_arr.size)}
    if y_arr.size == 0:
        return out
    if task == "binary":
        p = p.reshape(-1)
        out["auc"] = drift.finite(roc_auc(y_arr, p))
        labels = decision.positive(objective, threshold, p)
        out["accuracy"] = float(np.mean(labels == (y_arr == 1.0)))
        out["log_loss"] = drift.finite(log_loss(y_arr, decision.probabilities(objective, p)))
    elif task == "multiclass":
        p = p.reshape(y_arr.size, -1)
        valid = (y_arr >= 0) & (y_arr < p.shape[1]) & (y_arr == np.round(y_arr))
        y_arr, p = y_arr[valid], p[valid]
        out["rows"] = int(y_arr.size)
        if y_arr.size:
            out["accuracy"] = float(np.mean(np.argmax(p, axis=1) == y_arr))
            out["log_loss"] = drift.finite(log_loss(y_arr, p))
    else:
        p = p.reshape(-1)
        err = p - y_arr
        out["rmse"] = drift.finite(float(np.sqrt(np.mean(err**2))))
        out["mae"] = drift.finite(float(np.mean(np.abs(err))))
    return out


def _threshold(manifest: ModelManifest | None) -> float:
    """The binary decision threshold (0.5 unless the manifest sets one, 0 included)."""
    if manifest is None or manifest.threshold is None:
        return 0.5
    return float(manifest.threshold)


# --- per-version state -------------------------------------------------------------------------


F32 = npt.NDArray[np.float32]


class _Gather:
    """Rows of one kind (the features, or the predictions) gathered as columns: each capture
    file's block transposed into place as it is read (no file is kept for it), then counted
    a gathered batch at a time."""

    __slots__ = ("accumulators", "capacity", "columns", "n")

    def __init__(self, accumulators: list[drift.FeatureAccumulator], capacity: int) -> None:
        self.accumulators = accumulators
        self.capacity = capacity
        self.columns: F32 | None = None
        self.n = 0

    def put(self, block: F32, at: int) -> int:
        """Gather rows of ``block`` from ``at`` on, as many as fit; returns how many."""
        if self.columns is None:
            self.columns = np.empty((len(self.accumulators), self.capacity), np.float32)
        take = min(int(block.shape[0]) - at, self.capacity - self.n)
        self.columns[:, self.n : self.n + take] = block[at : at + take].T
        self.n += take
        return take

    def count(self) -> None:
        """Hand the gathered rows to the accumulators: each column sorted in place (NaN
        last), then searched; the buffer gathers again."""
        if self.columns is None or self.n == 0:
            return
        columns = self.columns[:, : self.n]
        columns.sort(axis=1)
        for j, acc in enumerate(self.accumulators):
            acc.add_sorted(columns[j])
        self.n = 0


class VersionState:
    """Accumulators of one model version's rows in the window."""

    def __init__(
        self,
        version: int,
        manifest: ModelManifest | None,
        error: str | None = None,
        rule: DriftRule = DEFAULT_RULE,
    ) -> None:
        self.version = version
        self.rule = rule
        self.manifest = manifest
        self.error = error
        self.rows = 0
        self.malformed = 0
        ref = (manifest.reference if manifest else None) or None
        self.reference = ref
        self.features: list[drift.FeatureAccumulator] = []
        self.predictions: list[drift.FeatureAccumulator] = []
        self.width = manifest.num_features if manifest else 0
        if ref:
            self.features = [drift.FeatureAccumulator(f) for f in ref.get("features", [])]
            preds = ref.get("predictions") or {}
            self.predictions = [drift.FeatureAccumulator(c) for c in preds.get("columns", [])]
        # Labelled (y, prediction) chunks and the capture file each came from: reports
        # concatenate them in key order, however the files were split between runs.
        self.labelled_y: list[npt.NDArray[np.float64]] = []
        self.labelled_p: list[npt.NDArray[np.float32]] = []
        self.labelled_keys: list[str] = []
        rows = max(1024, ACCUMULATE_VALUES // max(len(self.features), 1))
        self._gathered = (_Gather(self.features, rows), _Gather(self.predictions, rows))

    def add(self, X: F32, P: F32 | None) -> None:
        """Count a batch of rows. Rows are gathered, column by column, up to
        ``ACCUMULATE_VALUES`` feature values before they are counted: the accumulators'
        per-call work (searches of the reference points) is paid once per gathered batch,
        not once per capture file."""
        self.rows += X.shape[0]
        features, predictions = self._gathered
        blocks: list[tuple[_Gather, F32]] = []
        if self.features and X.shape[1] == len(self.features):
            blocks.append((features, X))
        if P is not None and self.predictions and P.shape[1] == len(self.predictions):
            blocks.append((predictions, P))
        for gather, block in blocks:
            at = 0
            while at < block.shape[0]:
                at += gather.put(block, at)
                if gather.n == gather.capacity:
                    gather.count()

    def drain(self) -> None:
        """Count every gathered row now, and let the buffers go."""
        for gather in self._gathered:
            gather.count()
            gather.columns = None

    def merge(self, other: VersionState) -> None:
        """Add ``other``'s counts (the same version's rows from other capture files)."""
        self.drain()
        other.drain()
        self.rows += other.rows
        self.malformed += other.malformed
        for mine, theirs in (
            *zip(self.features, other.features, strict=True),
            *zip(self.predictions, other.predictions, strict=True),
        ):
            mine.merge(theirs)
        self.labelled_y.extend(other.labelled_y)
        self.labelled_p.extend(other.labelled_p)
        self.labelled_keys.extend(other.labelled_keys)

    def labelled(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]] | None:
        """The labelled rows' (y, predictions), in capture-key order; None without any."""
        if not self.labelled_y:
            return None
        order = sorted(range(len(self.labelled_keys)), key=self.labelled_keys.__getitem__)
        return (
            np.concatenate([self.labelled_y[i] for i in order]),
            np.concatenate([self.labelled_p[i] for i in order]),
        )

    def report(self) -> dict[str, Any]:
        self.drain()
        m = self.manifest
        out: dict[str, Any] = {
            "version": self.version,
            "rows": self.rows,
            "malformed_rows": self.malformed,
            "task": m.task if m else None,
            "reference_source": (self.reference or {}).get("source"),
            "checks": (self.reference or {}).get("checks", []),
        }
        if self.error:
            out["error"] = self.error
        if not self.reference:
            out.setdefault("error", "this version has no reference statistics")
            out.update(features=[], predictions=[], drifted_features=[], prediction_drift=None)
            return out
        section = m.drift if m else None
        feature_rules = drift.resolve_rules([a.ref for a in self.features], section, self.rule)
        prediction_rules = drift.resolve_rules(
            [a.ref for a in self.predictions], section, self.rule, overrides=False
        )
        features = drift.assess([drift.compare_feature(a) for a in self.features], feature_rules)
        predictions = drift.assess(
            [drift.compare_feature(a) for a in self.predictions], prediction_rules
        )
        out["features"] = features
        out["predictions"] = predictions
        out["drifted_features"] = [f["name"] for f in features if f["drifted"]]
        out["quality_flags"] = {f["name"]: f["flags"] for f in features if f["flags"]}
        psis = [p["psi"] for p in predictions if p["psi"] is not None]
        out["prediction_drift"] = {
            "psi": max(psis) if psis else None,
            "drifted": any(p["drifted"] for p in predictions),
        }
        labelled = self.labelled()
        if labelled is not None and m is not None:
            out["performance"] = performance(m.task, *labelled, _threshold(m), m.objective)
        return out


class Monitor:
    """One monitoring run: state shared by the files of the window."""

    def __init__(
        self,
        model: str,
        start: datetime,
        end: datetime,
        source: ManifestSource,
        labels: dict[str, Any],
        *,
        rule: DriftRule = DEFAULT_RULE,
    ) -> None:
        self.model = model
        self.rule = rule
        self.start, self.end = start, end
        self.start_key = _ts_key(start)
        self.end_key = _ts_key(end)
        self.start_ms = _ms(start)
        self.end_ms = _ms(end)
        self.source = source
        self.labels = labels
        self.labels_available = len(labels)
        self._key = ""  # the capture file being read (labelled rows remember it)
        self._label_index: LabelIndex | None = None
        self.versions: dict[int, VersionState] = {}
        self.files = 0
        self.skipped_files = 0
        self.malformed = 0
        self.out_of_window = 0

    def merge(self, other: Monitor) -> None:
        """Add ``other``'s counts: the same model and window, other capture files."""
        if (other.model, other.start_ms, other.end_ms) != (self.model, self.start_ms, self.end_ms):
            raise TreeserveError("partial states of different models or windows do not merge")
        self.files += other.files
        self.skipped_files += other.skipped_files
        self.malformed += other.malformed
        self.out_of_window += other.out_of_window
        self.labels_available = max(self.labels_available, other.labels_available)
        for version, theirs in other.versions.items():
            self.state(version).merge(theirs)

    def state(self, version: int) -> VersionState:
        st = self.versions.get(version)
        if st is None:
            try:
                st = VersionState(version, self.source.manifest(version), rule=self.rule)
            except RegistryError as exc:  # no manifest, or an unreadable one
                st = VersionState(version, None, str(exc), rule=self.rule)
            self.versions[version] = st
        return st

    def add_file(self, raw: bytes, key: str = "") -> None:
        """Read a capture file and account for its rows: a Parquet capture by its columns, a
        previous release's JSON Lines file by the text paths. A file that is neither is
        skipped and counted."""
        self._key = key
        if key.endswith(EXTENSION) or raw[:4] == b"PAR1":
            try:
                split = capture_split(raw, self.start_ms, self.end_ms, with_ids=bool(self.labels))
            except ParquetError as exc:
                self.skipped_files += 1
                logger.warning("capture file skipped", extra={"key": key, "error": str(exc)})
                return
            self.files += 1
            self.malformed += split.malformed
            self._add_split(split)
            return
        self.add_legacy(
            raw, fast_split(raw, self.start_key, self.end_key, with_ids=bool(self.labels))
        )

    def add_legacy(self, raw: bytes, split: Split | None) -> None:
        """Account for a JSON Lines file parsed by the fast path (``split``), or parse it by the
        general path here (``split`` None)."""
        self.files += 1
        if split is not None:
            self._add_split(split)
            return
        rows = parse_lines(raw)
        if not rows:
            return
        ts = np.array([str(r.get("ts", ""))[:23] for r in rows], dtype="S23")
        inside = (ts >= self.start_key) & (ts < self.end_key)
        self.out_of_window += int(inside.size - inside.sum())
        versions = np.array(
            [v if isinstance((v := r.get("version")), int) else -1 for r in rows], dtype=np.int64
        )
        versions[~inside] = -2
        self.malformed += int((versions == -1).sum())
        for version in np.unique(versions[versions >= 0]).tolist():
            idx = np.flatnonzero(versions == version)
            self._add_rows(self.state(version), [rows[i] for i in idx])

    def _add_split(self, split: Split) -> None:
        self.out_of_window += split.out_of_window
        for group in split.groups:
            st = self.state(group.version)
            X = group.X
            if st.width and X.shape[1] != st.width:
                st.malformed += X.shape[0]
                self.malformed += X.shape[0]
                continue
            st.add(X, group.P)
            if group.ids is not None and group.P is not None and st.manifest is not None:
                self._join_ids(st, group.ids, group.P, as_bytes=group.ids_are_bytes)

    def _add_rows(self, st: VersionState, rows: list[dict[str, Any]]) -> None:
        X = rows_matrix([r.get("features") for r in rows], st.width or None)
        if X is None:  # ragged or non-numeric: keep the rows that fit, count the rest
            good = [
                r for r in rows if rows_matrix([r.get("features")], st.width or None) is not None
            ]
            st.malformed += len(rows) - len(good)
            self.malformed += len(rows) - len(good)
            rows = good
            if not rows:
                return
            X = rows_matrix([r.get("features") for r in rows], st.width or None)
            assert X is not None  # noqa: S101 - every row fitted on its own
        P = rows_matrix([r.get("prediction") for r in rows])
        st.add(X, P)
        if self.labels and P is not None and st.manifest is not None:
            self._join(st, rows, P)

    def _join(
        self, st: VersionState, rows: list[dict[str, Any]], P: npt.NDArray[np.float32]
    ) -> None:
        self._join_ids(st, [r.get("id") for r in rows], P)

    def label_index(self) -> LabelIndex:
        if self._label_index is None:
            self._label_index = LabelIndex(self.labels)
        return self._label_index

    def _join_ids(
        self,
        st: VersionState,
        ids: list[Any] | StringRuns,
        P: npt.NDArray[np.float32],
        *,
        as_bytes: bool = False,
    ) -> None:
        """Keep the (label, prediction) of each row of ``ids`` that has a usable label (a
        number, or one of the version's classes)."""
        manifest = st.manifest
        assert manifest is not None  # noqa: S101
        index = self.label_index()
        rows, positions = index.find(ids, as_bytes=as_bytes)
        if rows.size == 0:
            return
        y, usable = index.decided(st.version, lambda label: _label_value(label, manifest))
        keep = usable[positions]
        if keep.any():
            st.labelled_y.append(y[positions[keep]])
            st.labelled_p.append(P[rows[keep]])
            st.labelled_keys.append(self._key)


# --- the run -----------------------------------------------------------------------------------


def _default_registry(bucket: str, model: str, s3: S3Client) -> ManifestSource:
    from treeserve.registry.model_registry import ModelRegistry  # noqa: PLC0415
    from treeserve.registry.store import S3RegistryStore  # noqa: PLC0415

    return ModelRegistry(S3RegistryStore(bucket, s3=s3), model)


def _day_prefixes(
    s3: S3Client, bucket: str, model: str, start: datetime, end: datetime
) -> Iterator[str]:
    """The ``captures/<model>/dt=YYYY-MM-DD/`` prefixes that exist, from ``start``'s day to
    ``end``'s: one listing by delimiter (a page per 1,000 days) from the first day on, so a long
    window over sparse data costs what the data costs, not one call per day."""
    root = f"captures/{model}/"
    first, last = f"{root}dt={start:%Y-%m-%d}/", f"{root}dt={end:%Y-%m-%d}/"
    token: str | None = None
    while True:
        # StartAfter "…dt=<first day>" (no slash) sorts just before that day's prefix.
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Prefix": root,
            "Delimiter": "/",
            "StartAfter": first[:-1],
        }
        if token:
            kwargs["ContinuationToken"] = token
        with s3_errors(bucket, root):
            page = s3.list_objects_v2(**kwargs)
        for entry in page.get("CommonPrefixes", []):
            prefix = entry.get("Prefix", "")
            if prefix > last:  # listed in key order: nothing later is in the window
                return
            if prefix >= first and _DAY_PREFIX.fullmatch(prefix, len(root)):
                yield prefix
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _files(
    s3: S3Client, bucket: str, model: str, start: datetime, end: datetime
) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for prefix in _day_prefixes(s3, bucket, model, start, end):
        keys.extend(_list(s3, bucket, prefix))
    return sorted(keys)


_FETCH_POOL: ThreadPoolExecutor | None = None
_FETCH_POOL_LOCK = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """The download threads: one pool per process, started once and kept by every later run
    (in a warm Lambda environment, every later invocation), as starting a thread costs a few
    milliseconds while others hold the GIL."""
    global _FETCH_POOL  # noqa: PLW0603 - created on first use, then shared
    with _FETCH_POOL_LOCK:
        if _FETCH_POOL is None:
            _FETCH_POOL = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="treeserve-fetch")
        return _FETCH_POOL


def _read_files(
    s3: S3Client,
    bucket: str,
    files: list[tuple[str, int]],
    mon: Monitor,
    *,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Download (and inflate legacy files) on threads; read each here, in key order."""
    pool = _fetch_pool()
    pending: list[tuple[str, int, Future[bytes]]] = []
    in_flight = 0  # compressed bytes fetched or being fetched, not yet parsed
    queue = iter(files)

    def fill() -> None:
        nonlocal in_flight
        while len(pending) < MAX_IN_FLIGHT_FILES and (
            not pending or in_flight < MAX_IN_FLIGHT_BYTES
        ):
            item = next(queue, None)
            if item is None:
                return
            key, size = item
            if size > MAX_CAPTURE_FILE_BYTES:
                mon.skipped_files += 1
                continue
            in_flight += size
            fut = pool.submit(_fetch, s3, bucket, key, MAX_CAPTURE_FILE_BYTES)
            pending.append((key, size, fut))

    fill()
    try:
        while pending:
            key, size, fut = pending.pop(0)
            raw: bytes | None
            try:
                raw = fut.result()
            except SKIPPABLE as exc:
                mon.skipped_files += 1
                logger.warning(
                    "capture file skipped", extra={"key": key, "error": type(exc).__name__}
                )
                raw = None
            in_flight -= size
            fill()
            if raw is not None:
                mon.add_file(raw, key)
            del raw
            if progress is not None:  # files read or skipped, of all
                progress(mon.files + mon.skipped_files, len(files))
    except BaseException:
        # Fail fast: downloads nobody will read are cancelled; those already under way are
        # waited for, so that nothing of this run outlives it.
        running = [fut for _, _, fut in pending if not fut.cancel()]
        wait(running)
        raise


def window_files(
    s3: S3Client, bucket: str, model: str, start: datetime, end: datetime
) -> list[tuple[str, int]]:
    """(key, size) of every capture file on the window's days, in key order."""
    start, end = _utc(start), _utc(end)
    if end <= start:
        raise TreeserveError(
            f"the window is empty: end {end.isoformat()} <= start {start.isoformat()}"
        )
    return _files(s3, bucket, model, start, end)


def monitor_files(
    bucket: str,
    model_name: str,
    start: datetime,
    end: datetime,
    files: list[tuple[str, int]],
    *,
    s3: S3Client | None = None,
    registry: ManifestSource | None = None,
    progress: Callable[[int, int], None] | None = None,
    rule: DriftRule = DEFAULT_RULE,
) -> Monitor:
    """The partial state of ``files`` (some or all of the window's): labels read, every file
    counted. :func:`run_monitoring` runs it over the whole window; a fan-out
    (:mod:`treeserve.monitoring.fanout`) over slices of it, then merges (:meth:`Monitor.merge`)."""
    s3 = s3 or s3_client()
    start, end = _utc(start), _utc(end)
    source = registry or _default_registry(bucket, model_name, s3)
    labels = read_labels(s3, bucket, model_name)
    mon = Monitor(model_name, start, end, source, labels, rule=rule)
    _read_files(s3, bucket, files, mon, progress=progress)
    for st in mon.versions.values():
        st.drain()
    mon._label_index = None  # joined; the labels stay for finish (a partial
    # state omits them)
    return mon


def finish(
    bucket: str,
    mon: Monitor,
    *,
    s3: S3Client | None = None,
    now: datetime | None = None,
    write: bool = True,
    metrics: Metrics | None = None,
    settings: Settings | None = None,
    files: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """The report of a (merged) partial state: built, with its challenger comparison, written
    to ``reports/``, measured. ``files``: the window's capture files (listed again when not
    given, as after a fan-out's merge, whose partials carry counts, not rows)."""
    now = _utc(now or datetime.now(UTC))
    s3 = s3 or s3_client()
    report = build_report(mon, mon.start, mon.end, now, labels_available=mon.labels_available)
    # --- hook: challengers on live traffic (treeserve.monitoring.challenger) -------------------
    # The comparison scores a bounded number of the window's rows (CHALLENGER_MAX_ROWS) with
    # both models, so it runs here once, after a single run or a fan-out's merge alike.
    from treeserve.monitoring import challenger  # noqa: PLC0415 - it imports this module

    if files is None:
        files = window_files(s3, bucket, mon.model, mon.start, mon.end)

    def labels() -> dict[str, Any]:  # a merged partial carries no labels: read them again
        return mon.labels or read_labels(s3, bucket, mon.model)

    report["challenger"] = challenger.evaluate(
        s3, bucket, mon.model, mon.start, mon.end, files=files, labels=labels,
        settings=settings, source=mon.source, act=write, now=now,
    )  # fmt: skip
    # --- end of hook ------------------------------------------------------------------------
    if write:
        key = report_key(mon.model, now)
        report["report_key"] = key
        with s3_errors(bucket, key):
            s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=orjson.dumps(report, option=orjson.OPT_INDENT_2),
                ContentType="application/json",
            )
    if metrics is not None:
        emit_metrics(report, metrics)
        challenger.emit_metrics(report, metrics)  # the hook's metrics (see above)
    return report


def run_monitoring(
    bucket: str,
    model_name: str,
    start: datetime,
    end: datetime,
    *,
    s3: S3Client | None = None,
    registry: ManifestSource | None = None,
    now: datetime | None = None,
    write: bool = True,
    metrics: Metrics | None = None,
    progress: Callable[[int, int], None] | None = None,
    rule: DriftRule = DEFAULT_RULE,
    settings: Settings | None = None,
    files: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """Monitor ``model_name`` over ``[start, end)``; write and return the report: one partial
    state over every file of the window (:func:`monitor_files`), then :func:`finish`.

    ``rule``: the drift rule of every column without an override in its version's manifest
    (the function passes ``DRIFT_METHOD``/``DRIFT_THRESHOLD``; :func:`drift.resolve_rules`).
    ``settings``: PROMOTION_MODE, PROMOTION_TOLERANCE, LIVE_MIN_LABELED_ROWS and
    CHALLENGER_MAX_ROWS for the challenger comparison (defaults without).

    ``progress(done, total)`` is called after each capture file (the CLI shows it).
    ``files``: the window's capture files when the caller listed them (:func:`window_files`).
    """
    s3 = s3 or s3_client()
    if files is None:
        files = window_files(s3, bucket, model_name, start, end)
    mon = monitor_files(
        bucket,
        model_name,
        start,
        end,
        files,
        s3=s3,
        registry=registry,
        progress=progress,
        rule=rule,
    )
    return finish(
        bucket, mon, s3=s3, now=now, write=write, metrics=metrics, settings=settings, files=files
    )


def build_report(
    mon: Monitor, start: datetime, end: datetime, now: datetime, *, labels_available: int
) -> dict[str, Any]:
    """The JSON report of a run (every number finite; ``status`` "no data" without rows)."""
    versions = [mon.versions[v].report() for v in sorted(mon.versions)]
    rows = sum(v["rows"] for v in versions)
    drifted = sorted({name for v in versions for name in v["drifted_features"]})
    # Data-quality flags (missing-rate rise, out of range, new categories) are not drift
    # verdicts, but a feature that suddenly goes missing needs someone's attention too.
    flagged = sorted({name for v in versions for name in v.get("quality_flags", {})})
    pred = [v["prediction_drift"] for v in versions if v.get("prediction_drift")]
    psis = [p["psi"] for p in pred if p["psi"] is not None]
    overall_perf: dict[str, Any] | None = None
    states = [mon.versions[v] for v in sorted(mon.versions)]
    tasks = {st.manifest.task for st in states if st.manifest and st.labelled_y}
    if len(tasks) == 1:
        task = tasks.pop()
        sts = [st for st in states if st.labelled_y and st.manifest]
        widths = {st.labelled_p[0].shape[1] for st in sts}
        if len(widths) == 1:
            first = sts[0].manifest
            assert first is not None  # noqa: S101 - sts holds states with a manifest
            objectives = {st.manifest.objective for st in sts if st.manifest}
            if len(objectives) == 1:  # one decision rule for every row
                pairs = [pair for st in sts if (pair := st.labelled()) is not None]
                overall_perf = performance(
                    task,
                    np.concatenate([y for y, _ in pairs]),
                    np.concatenate([p for _, p in pairs]),
                    _threshold(first),
                    first.objective,
                )
    return {
        "model": mon.model,
        "status": "ok" if rows else "no data",
        "message": None if rows else "no captured rows in the window",
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "generated_at": now.isoformat(),
        "files": mon.files,
        "skipped_files": mon.skipped_files,
        "rows": rows,
        "malformed_rows": mon.malformed,
        "rows_outside_window": mon.out_of_window,
        "labels_available": labels_available,
        "summary": {
            "drifted_features": drifted,
            "n_drifted": len(drifted),
            "quality_flagged_features": flagged,
            "prediction_drift": max(psis) if psis else None,
            "prediction_drifted": any(p["drifted"] for p in pred),
            "performance": overall_perf,
            "thresholds": {
                "method": mon.rule.method,
                "threshold": mon.rule.threshold,
                "alpha": drift.ALPHA,
                "correction": "benjamini-hochberg",
                "psi_moderate": drift.PSI_MODERATE,
                "psi_major": drift.PSI_MAJOR,
            },
        },
        "versions": versions,
    }


def emit_metrics(report: dict[str, Any], metrics: Metrics) -> None:
    """EMF metrics of a report: totals on ``metrics``, one FeatureDrift (PSI) per feature."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric  # noqa: PLC0415

    summary = report["summary"]
    metrics.add_metric(name=METRIC_ROWS_SEEN, unit=MetricUnit.Count, value=report["rows"])
    metrics.add_metric(
        name=METRIC_DRIFTED_FEATURES, unit=MetricUnit.Count, value=summary["n_drifted"]
    )
    metrics.add_metric(
        name=METRIC_QUALITY_FLAGS,
        unit=MetricUnit.Count,
        value=len(summary["quality_flagged_features"]),
    )
    if summary["prediction_drift"] is not None:
        metrics.add_metric(
            name=METRIC_PREDICTION_DRIFT, unit=MetricUnit.NoUnit, value=summary["prediction_drift"]
        )
    for name, value in (summary["performance"] or {}).items():
        if name != "rows" and value is not None:
            metrics.add_metric(name=f"Performance_{name}", unit=MetricUnit.NoUnit, value=value)
    service = metrics.service or "treeserve-monitoring"
    # The same totals again, per model: one series per model without a template change.
    per_model: list[tuple[str, MetricUnit, float]] = [
        (METRIC_ROWS_SEEN, MetricUnit.Count, report["rows"]),
        (METRIC_DRIFTED_FEATURES, MetricUnit.Count, summary["n_drifted"]),
        (METRIC_QUALITY_FLAGS, MetricUnit.Count, len(summary["quality_flagged_features"])),
    ]
    if summary["prediction_drift"] is not None:
        per_model.append((METRIC_PREDICTION_DRIFT, MetricUnit.NoUnit, summary["prediction_drift"]))
    for name, unit, value in per_model:
        with single_metric(
            name=name,
            unit=unit,
            value=value,
            namespace=metrics.namespace,
            default_dimensions={"service": service, "model": report["model"]},
        ):
            pass
    for version in report["versions"]:
        for feature in version.get("features", []):
            if feature.get("psi") is None:
                continue
            with single_metric(
                name=METRIC_FEATURE_DRIFT,
                unit=MetricUnit.NoUnit,
                value=feature["psi"],
                namespace=metrics.namespace,
                default_dimensions={"service": service, "model": report["model"]},
            ) as metric:
                metric.add_dimension(name="feature", value=str(feature["name"]))


def notify_drift(
    report: dict[str, Any], topic_arn: str | None, *, sns: SNSClient | None = None
) -> bool:
    """Publish a short drift notice (model, window, drifted features, report key) to SNS.

    Best effort: the report and the DriftedFeatures alarm are the record; a failed publish is
    logged and returns False.
    """
    if not topic_arn:
        return False
    summary = report["summary"]
    message = {
        "model": report["model"],
        "window": report["window"],
        "drifted_features": summary["drifted_features"],
        "prediction_drift": summary["prediction_drift"],
        "report_key": report.get("report_key"),
    }
    try:
        (sns or sns_client()).publish(
            TopicArn=topic_arn,
            Subject=f"treeserve: drift in {report['model']}"[:100],
            Message=orjson.dumps(message).decode(),
        )
    except (BotoCoreError, ClientError) as exc:
        logger.warning("drift notice not sent", extra={"error": type(exc).__name__})
        return False
    return True


def monitored_models(
    bucket: str, default: str, start: datetime, end: datetime, *, s3: S3Client | None = None
) -> list[str]:
    """The models one run covers when the event names none: the default model, then every other
    model with captures on a day of ``[start, end]`` (one listing of ``captures/`` by delimiter,
    then one of each model's days)."""
    s3 = s3 or s3_client()
    start, end = _utc(start), _utc(end)
    names = [default]
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": "captures/", "Delimiter": "/"}
        if token:
            kwargs["ContinuationToken"] = token
        with s3_errors(bucket, "captures/"):
            page = s3.list_objects_v2(**kwargs)
        for entry in page.get("CommonPrefixes", []):
            name = entry.get("Prefix", "")[len("captures/") :].rstrip("/")
            if name == default or not valid_model_name(name):
                continue
            if next(_day_prefixes(s3, bucket, name, start, end), None) is not None:
                names.append(name)
        if not page.get("IsTruncated"):
            return names
        token = page.get("NextContinuationToken")
