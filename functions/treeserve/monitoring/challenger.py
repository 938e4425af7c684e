"""Challengers on live traffic: the champion and each routed alias on the same captured rows.

When ``registry/<model>/routing.json`` sends traffic to an alias (``treeserve route``;
:mod:`treeserve.registry.routing`), a monitoring run (:func:`evaluate`, called once from
:func:`treeserve.monitoring.pipeline.run_monitoring`) reads the window's captures again and
pairs every compared row's two scores:

- **canary** rows (``alias`` = the canary's alias, ``version`` = the version the alias names
  now): their captured outputs are the challenger's; the champion scores the same inputs.
- **shadow** rows: a ``sample`` of the champion's rows (``alias`` ``champion`` or null,
  ``version`` = the version in service), chosen deterministically by id
  (``canary_bucket(b"shadow:" + id) < sample * 100``; salted so that the shadow sample is not
  the complement of the canary's own choice, which hashes the same ids), are scored by the
  shadow's version; their captured outputs are the champion's and stay as they are. Shadow scores
  are never written as captures, so nothing a client saw, and no drift figure, changes.

Models are loaded as serving loads them: the manifest's sha256 is checked against the pointer's
and the bytes (:meth:`ModelRegistry.model_bytes`), then :meth:`Predictor.load` (the sandbox-
validated UBJ, never a pickle) with its smoke prediction. Work is bounded: at most
``CHALLENGER_MAX_ROWS`` rows are scored per run (split evenly between canary and shadow when
both run), files are read in key (time) order until the budgets are full, and the section says
whether it stopped early (``truncated``).

Per alias the section reports (docs/monitoring.md "Challengers"):

- ``agreement``: classifiers, the share of rows whose decided labels agree (each model's own
  rule: :mod:`treeserve.model.decision` at its manifest threshold, argmax for multiclass);
  regression, the mean ``|challenger - champion|`` and the share within ``tolerance`` (a tenth of
  the champion scores' standard deviation);
- ``shift``: PSI (over the deciles of the champion's scores, :func:`treeserve.monitoring.drift.psi`)
  and the two-sample KS statistic and p-value of the challenger's scores against the champion's,
  per output column, on the probability scale for binary models (the max over columns leads);
- ``latency``: p50/p95 of ``latency_ms`` for the champion's rows and the canary's, when the
  captures carry that column;
- ``quality``, once labels arrive (``labels/<model>/``, joined by id as the performance section
  is): the refresh gate's metric (:func:`treeserve.model.metrics.primary_metric`: AUC, else log
  loss, for binary; log loss for multiclass; RMSE for regression) of both models on the same
  labeled rows, and a 95% confidence interval of the **improvement** (challenger better: AUC
  challenger - champion; log loss and RMSE champion - challenger) from a **paired bootstrap**:
  ``BOOTSTRAP_RESAMPLES`` (1,000) resamples of the labeled rows with replacement, seeded
  (``BOOTSTRAP_SEED``), both models scored on each resample, percentile interval;
- ``verdict``, with ``T`` = ``PROMOTION_TOLERANCE`` and ``[lo, hi]`` the interval, ``d`` the
  point estimate:
  ``not enough evidence`` with fewer than ``LIVE_MIN_LABELED_ROWS`` labeled rows (or no metric);
  else ``better`` when ``lo > 0``; else ``not worse`` when ``lo >= -T``; else ``worse`` when
  ``hi < 0`` and ``d < -T`` (worse with 95% confidence, and by more than the tolerance: this
  includes every interval wholly below ``-T``); else ``not enough evidence`` (the interval
  straddles).

``PROMOTION_MODE=live`` acts on the verdict: a ``better`` or ``not worse`` challenger (at most
one per run: better before not worse, then the larger improvement) is promoted by
compare-and-swap against the champion it was compared with (:meth:`ModelRegistry.promote`),
the routing parts that pointed at it are cleared (:meth:`ModelRegistry.clear_routing_to`), and
the decision with its evidence is recorded (:meth:`ModelRegistry.record_decision`,
``registry/<model>/decisions/<time>-v<n>.json``; its key is in the section). With ``auto`` or
``manual`` the verdict is only reported. A crash between promoting and recording leaves the new
champion without its decision record; the report is the evidence then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from scipy import stats

from treeserve.captures import EXTENSION, decode_capture
from treeserve.errors import (
    BucketNotFound,
    ModelLoadError,
    NotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    TreeserveError,
)
from treeserve.model import decision, reference
from treeserve.model.manifest import ModelManifest
from treeserve.model.metrics import (
    LOGLOSS_EPS,
    log_loss,
    primary_metric,
    rmse,
    roc_auc,
    ungated_reason,
)
from treeserve.model.predictor import Predictor
from treeserve.monitoring import drift
from treeserve.monitoring.pipeline import (
    MAX_CAPTURE_FILE_BYTES,
    SKIPPABLE,
    _fetch,
    _label_value,
    _ms,
)
from treeserve.parquet import ParquetError
from treeserve.registry.model_registry import CHAMPION, ModelRegistry, Pointer, PointerUnreadable
from treeserve.registry.routing import Routing, canary_bucket
from treeserve.registry.store import RegistryStore, S3RegistryStore
from treeserve.settings import Settings

if TYPE_CHECKING:
    from aws_lambda_powertools import Metrics
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20_261_202
CONFIDENCE = 0.95
# Regression agreement: |challenger - champion| within this share of the champion's spread.
AGREEMENT_SPREAD = 0.1
# Resampled rows held at once by the bootstrap (weights matrix of resamples x rows).
BOOTSTRAP_CELLS = 2_000_000
SHADOW_SALT = b"shadow:"
PROMOTING = ("better", "not worse")
METRIC_AGREEMENT = "ChallengerAgreement"
METRIC_DELTA = "ChallengerMetricDelta"
METRIC_ROWS = "ChallengerRowsCompared"

FloatArray = npt.NDArray[np.float64]
UNREADABLE: tuple[type[Exception], ...] = (*SKIPPABLE, ParquetError)  # skipped and counted


# --- which rows --------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Rows gathered for one route: ids, inputs and captured outputs, in file order."""

    budget: int
    ids: list[str] = field(default_factory=list)
    X: list[npt.NDArray[np.float32]] = field(default_factory=list)
    P: list[npt.NDArray[np.float32]] = field(default_factory=list)
    seen: int = 0  # rows of this route in the files read (scored or not)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def full(self) -> bool:
        return self.n >= self.budget

    def take(self, ids: list[str], X: npt.NDArray[np.float32], P: npt.NDArray[np.float32]) -> None:
        self.seen += len(ids)
        room = self.budget - self.n
        if room <= 0 or not ids:
            return
        self.ids.extend(ids[:room])
        self.X.append(X[:room])
        self.P.append(P[:room])

    def matrices(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        if not self.X:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(self.X), np.concatenate(self.P)


@dataclass
class _Plan:
    """What to gather: the champion's rows (latency; the shadow's sample) and the canary's."""

    champion: int
    canary: tuple[str, int] | None  # (alias, version)
    shadow: tuple[str, int, float] | None  # (alias, version, sample)
    canary_rows: _Rows
    shadow_rows: _Rows
    latency: dict[str, list[npt.NDArray[np.float32]]] = field(default_factory=dict)
    files_read: int = 0
    skipped_files: int = 0

    @property
    def done(self) -> bool:
        return (self.canary is None or self.canary_rows.full) and (
            self.shadow is None or self.shadow_rows.full
        )


def shadow_sampled(ids: Sequence[str], sample: float) -> npt.NDArray[np.bool_]:
    """Which champion rows the shadow scores: a deterministic ``sample`` of them by id."""
    cut = sample * 100.0
    return np.fromiter(
        (canary_bucket(SHADOW_SALT + i.encode()) < cut for i in ids), dtype=bool, count=len(ids)
    )


def _latency_column(rows: Any) -> npt.NDArray[np.float32] | None:
    # The serving side records ``latency_ms`` per row; captures written before it have none.
    value = getattr(rows, "latency_ms", None)
    return None if value is None else np.asarray(value, dtype=np.float32)


def _gather(
    s3: S3Client, bucket: str, files: list[tuple[str, int]], plan: _Plan, *, window: tuple[int, int]
) -> None:
    start_ms, end_ms = window
    for key, size in files:
        if plan.done:
            return
        if not key.endswith(EXTENSION):  # the previous release's captures carry no alias
            continue
        if size > MAX_CAPTURE_FILE_BYTES:
            plan.skipped_files += 1
            continue
        try:
            rows = decode_capture(_fetch(s3, bucket, key, MAX_CAPTURE_FILE_BYTES))
        except UNREADABLE as exc:
            plan.skipped_files += 1
            logger.warning("capture file skipped", extra={"key": key, "error": type(exc).__name__})
            continue
        plan.files_read += 1
        n = len(rows)
        if n == 0:
            continue
        inside = (rows.ts_ms >= start_ms) & (rows.ts_ms < end_ms)
        aliases = np.asarray(
            ["" if a is None else a for a in (rows.aliases or [None] * n)], dtype=object
        )
        champion = (
            inside & (rows.versions == plan.champion) & ((aliases == CHAMPION) | (aliases == ""))
        )
        latency = _latency_column(rows)
        picks: list[tuple[str, npt.NDArray[np.bool_], _Rows | None]] = [(CHAMPION, champion, None)]
        if plan.canary is not None:
            alias, version = plan.canary
            mask = inside & (rows.versions == version) & (aliases == alias)
            picks.append((alias, mask, plan.canary_rows))
        for name, mask, target in picks:
            idx = np.flatnonzero(mask)
            if idx.size == 0:
                continue
            if latency is not None and latency.shape[0] == n:
                plan.latency.setdefault(name, []).append(latency[idx])
            if target is not None:
                target.take(
                    [rows.ids[i] for i in idx.tolist()], rows.inputs[idx], rows.outputs[idx]
                )
        if plan.shadow is not None and not plan.shadow_rows.full:
            idx = np.flatnonzero(champion)
            ids = [rows.ids[i] for i in idx.tolist()]
            chosen = idx[shadow_sampled(ids, plan.shadow[2])]
            plan.shadow_rows.take(
                [rows.ids[i] for i in chosen.tolist()], rows.inputs[chosen], rows.outputs[chosen]
            )


# --- loading and scoring -----------------------------------------------------------------------


def load_predictor(registry: ModelRegistry, pointer: Pointer) -> Predictor:
    """A version as serving loads it: the pointer's sha256 against the manifest's, the bytes
    against both (ModelLoadError otherwise), then the predictor's own load and smoke test."""
    manifest = registry.manifest(pointer.version)
    if manifest.sha256 != pointer.sha256:
        raise ModelLoadError(
            f"version {pointer.version}'s pointer names sha256 {pointer.sha256[:12]}..., its "
            f"manifest {manifest.sha256[:12]}...: refusing to load it"
        )
    predictor = Predictor.load(registry.model_bytes(pointer.version, manifest), manifest)
    predictor.version = pointer.version
    return predictor


def _columns(source: Sequence[str], target: Sequence[str]) -> list[int] | None:
    """Indices laying rows in ``source``'s feature order out in ``target``'s (None: a feature
    ``target`` needs is not in the rows)."""
    index = {name: i for i, name in enumerate(source)}
    try:
        return [index[name] for name in target]
    except KeyError:
        return None


def scores(predictor: Predictor, X: npt.NDArray[np.float32]) -> FloatArray:
    """The model's own values for the rows (what serving answers), as an (n, k) matrix."""
    values = np.asarray(predictor.predict(np.ascontiguousarray(X)).values, dtype=np.float64)
    return values.reshape(X.shape[0], -1)


def _comparable_scale(manifest: ModelManifest, values: FloatArray) -> FloatArray:
    """Binary values on the probability scale (a margin through the logistic function)."""
    if manifest.task == "binary":
        return decision.probabilities(manifest.objective, values)
    return values


# --- the figures -------------------------------------------------------------------------------


def agreement(
    champion: ModelManifest,
    challenger: ModelManifest,
    champion_values: FloatArray,
    challenger_values: FloatArray,
) -> dict[str, Any]:
    """How often the two models answer alike on the same rows (see the module docstring)."""
    n = champion_values.shape[0]
    if n == 0:
        return {"rows": 0, "agreement": None}
    task = champion.task
    if task == "binary":
        a = decision.positive(champion.objective, champion.threshold, champion_values[:, 0])
        b = decision.positive(challenger.objective, challenger.threshold, challenger_values[:, 0])
        return {"rows": n, "kind": "labels", "agreement": float(np.mean(a == b))}
    if task == "multiclass":
        a, b = _classes(champion_values), _classes(challenger_values)
        return {"rows": n, "kind": "labels", "agreement": float(np.mean(a == b))}
    diff = np.abs(challenger_values - champion_values)
    tolerance = AGREEMENT_SPREAD * float(np.std(champion_values))
    return {
        "rows": n,
        "kind": "values",
        "agreement": float(np.mean(np.all(diff <= tolerance, axis=1))),
        "mean_abs_diff": drift.finite(float(np.mean(diff))),
        "max_abs_diff": drift.finite(float(np.max(diff))),
        "tolerance": drift.finite(tolerance),
    }


def _classes(values: FloatArray) -> npt.NDArray[np.int64]:
    if values.shape[1] > 1:
        return np.asarray(np.argmax(values, axis=1), dtype=np.int64)
    return values[:, 0].astype(np.int64)  # multi:softmax answers the class itself


def shift(champion_scores: FloatArray, challenger_scores: FloatArray) -> dict[str, Any]:
    """PSI and KS of the challenger's score distribution against the champion's, per column."""
    columns = []
    for j in range(champion_scores.shape[1]):
        a = champion_scores[:, j].astype(np.float32)
        b = challenger_scores[:, j].astype(np.float32)
        edges = reference.numeric_edges(a)
        result = stats.ks_2samp(b, a)
        columns.append(
            {
                "column": j,
                "psi": drift.finite(
                    drift.psi(reference.bin_counts(a, edges), reference.bin_counts(b, edges))
                ),
                "ks_statistic": drift.finite(float(result.statistic)),
                "ks_pvalue": drift.finite(float(result.pvalue)),
            }
        )
    psis = [c["psi"] for c in columns if c["psi"] is not None]
    kss = [c["ks_statistic"] for c in columns if c["ks_statistic"] is not None]
    return {
        "psi": max(psis) if psis else None,
        "ks_statistic": max(kss) if kss else None,
        "columns": columns,
    }


def latency(samples: dict[str, list[npt.NDArray[np.float32]]]) -> dict[str, Any] | None:
    """p50/p95 (ms) of each alias's captured ``latency_ms``; None when no capture had it."""
    out: dict[str, Any] = {}
    for alias, parts in samples.items():
        values = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        p50, p95 = np.percentile(values, [50, 95])
        out[alias] = {"rows": int(values.size), "p50_ms": float(p50), "p95_ms": float(p95)}
    return out or None


# --- the metric and its paired bootstrap --------------------------------------------------------


def _labels(
    ids: list[str], labels: dict[str, Any], manifest: ModelManifest, width: int
) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """Positions of the rows with a usable label, and the labels as numbers."""
    keep: list[int] = []
    ys: list[float] = []
    for i, row_id in enumerate(ids):
        label = labels.get(row_id)
        if label is None:
            continue
        y = _label_value(label, manifest)
        if y is None:
            continue
        if manifest.task == "binary" and y not in (0.0, 1.0):
            continue
        if manifest.task == "multiclass" and (y < 0 or y >= max(width, 2) or y != round(y)):
            continue
        keep.append(i)
        ys.append(y)
    return np.asarray(keep, dtype=np.intp), np.asarray(ys, dtype=np.float64)


def metric_value(name: str, y: FloatArray, p: FloatArray) -> float:
    """The named metric on all rows (the functions of :mod:`treeserve.model.metrics`)."""
    if name == "auc":
        return roc_auc(y, p[:, 0])
    if name == "logloss":
        return log_loss(y, p[:, 0] if p.shape[1] == 1 else p)
    return rmse(y, p[:, 0])


def _row_losses(name: str, y: FloatArray, p: FloatArray) -> FloatArray:
    """Per-row terms whose weighted mean is log loss (or whose mean is the squared error)."""
    if name == "logloss" and p.shape[1] == 1:
        q = np.clip(p[:, 0], LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        losses: FloatArray = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
        return losses
    if name == "logloss":
        q = np.clip(p, LOGLOSS_EPS, 1.0)
        q = q / q.sum(axis=1, keepdims=True)
        picked: FloatArray = -np.log(q[np.arange(y.size), y.astype(np.int64)])
        return picked
    squared: FloatArray = (y - p[:, 0]) ** 2
    return squared


def weighted_metric(name: str, y: FloatArray, p: FloatArray, W: FloatArray) -> FloatArray:
    """The metric on each resample: row ``i`` counted ``W[r, i]`` times in resample ``r``.

    With every weight 1 this is :func:`metric_value` (AUC by average ranks for ties, as
    :func:`treeserve.model.metrics.roc_auc`)."""
    if name == "auc":
        s = p[:, 0]
        order = np.argsort(s, kind="stable")
        sorted_s = s[order]
        starts = np.flatnonzero(np.r_[True, np.diff(sorted_s) != 0])
        positive = (y[order] == 1.0).astype(np.float64)
        Ws = W[:, order]
        pos = np.add.reduceat(Ws * positive, starts, axis=1)
        neg = np.add.reduceat(Ws * (1.0 - positive), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        with np.errstate(divide="ignore", invalid="ignore"):
            auc: FloatArray = np.sum(pos * (below + 0.5 * neg), axis=1) / (
                pos.sum(axis=1) * neg.sum(axis=1)
            )
        return auc
    terms = _row_losses(name, y, p)
    mean: FloatArray = (W @ terms) / W.sum(axis=1)
    if name == "rmse":
        rooted: FloatArray = np.sqrt(mean)
        return rooted
    return mean


def paired_bootstrap(
    name: str,
    higher_is_better: bool,
    y: FloatArray,
    champion: FloatArray,
    challenger: FloatArray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, int]:
    """Percentile interval of the improvement (challenger better > 0) over ``resamples``
    resamples of the rows with replacement, both models on each; and how many resamples had a
    defined metric (AUC needs both classes)."""
    n = y.size
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    found: list[FloatArray] = []
    chunk = max(1, BOOTSTRAP_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        picks = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        W = np.bincount(picks.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        gain = sign * (
            weighted_metric(name, y, challenger, W) - weighted_metric(name, y, champion, W)
        )
        found.append(gain)
        done += b
    gains = np.concatenate(found)
    gains = gains[np.isfinite(gains)]
    if gains.size == 0:
        return float("nan"), float("nan"), 0
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(gains, [tail, 100.0 - tail])
    return float(lo), float(hi), int(gains.size)


def verdict(
    labeled: int,
    *,
    minimum: int,
    point: float | None,
    ci: Sequence[float | None],
    tolerance: float,
) -> tuple[str, str]:
    """The verdict and why (the rule is the module docstring's)."""
    if labeled < minimum:
        return (
            "not enough evidence",
            f"{labeled} labeled rows compared, fewer than LIVE_MIN_LABELED_ROWS={minimum}",
        )
    lo, hi = ci
    if point is None or lo is None or hi is None:
        return "not enough evidence", "the metric could not be computed on the labeled rows"
    interval = f"improvement {point:+.4g}, 95% CI [{lo:+.4g}, {hi:+.4g}]"
    if lo > 0:
        return "better", f"{interval} lies above 0"
    if lo >= -tolerance:
        return "not worse", f"{interval}: its lower bound is within the tolerance {tolerance:g}"
    if hi < 0 and point < -tolerance:
        return (
            "worse",
            f"{interval} lies below 0 and the estimate is beyond the tolerance {tolerance:g}",
        )
    return "not enough evidence", f"{interval} straddles the tolerance {tolerance:g}"


def quality(
    champion: ModelManifest,
    challenger: ModelManifest,
    *,
    ids: list[str],
    champion_values: FloatArray,
    challenger_values: FloatArray,
    labels: dict[str, Any],
) -> dict[str, Any]:
    """Both models' metric on the same labeled rows, and the bootstrap interval of the gain."""
    task = champion.task
    reason = ungated_reason(
        champion.objective, task, champion.num_outputs if task == "regression" else 1
    ) or ungated_reason(
        challenger.objective, task, challenger.num_outputs if task == "regression" else 1
    )
    if task == "multiclass" and 1 in (champion_values.shape[1], challenger_values.shape[1]):
        reason = reason or "no class probabilities (multi:softmax): log loss cannot be computed"
    keep, y = _labels(ids, labels, champion, champion_values.shape[1])
    out: dict[str, Any] = {"labeled_rows": int(y.size)}
    if reason is not None:
        out["error"] = reason
        return out
    if y.size == 0:
        return out
    a = _comparable_scale(champion, champion_values[keep])
    b = _comparable_scale(challenger, challenger_values[keep])
    candidate = {"auc": roc_auc(y, a[:, 0])} if task == "binary" else {}
    chosen = primary_metric(task, {k: v for k, v in candidate.items() if np.isfinite(v)})
    assert chosen is not None  # noqa: S101 - ungated tasks returned above
    name, higher = chosen
    old, new = metric_value(name, y, a), metric_value(name, y, b)
    lo, hi, valid = paired_bootstrap(name, higher, y, a, b)
    point = (new - old) if higher else (old - new)
    out.update(
        metric=name,
        higher_is_better=higher,
        champion=drift.finite(old),
        challenger=drift.finite(new),
        improvement=drift.finite(point),
        ci=[drift.finite(lo), drift.finite(hi)],
        bootstrap_valid=valid,
    )
    return out


# --- one run -----------------------------------------------------------------------------------


def _registry(bucket: str, model: str, s3: S3Client, source: object) -> ModelRegistry:
    if isinstance(source, ModelRegistry):
        return source
    return ModelRegistry(S3RegistryStore(bucket, s3=s3), model)


def _settings(bucket: str, settings: Settings | None) -> Settings:
    return settings if settings is not None else Settings(model_bucket=bucket)


def evaluate(
    s3: S3Client,
    bucket: str,
    model: str,
    start: datetime,
    end: datetime,
    *,
    files: list[tuple[str, int]],
    labels: Callable[[], dict[str, Any]],
    settings: Settings | None = None,
    source: object = None,
    act: bool = True,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """The ``challenger`` section of a report, or None when no routing sends live traffic to a
    challenger. ``files``: the window's capture files (key, size), as the run listed them;
    ``labels()``: the labels as :func:`treeserve.monitoring.pipeline.read_labels` reads them,
    called only when there is a challenger to compare (a window without routing reads none).
    ``act``: whether
    PROMOTION_MODE=live may promote (a run that writes no report changes nothing)."""
    config = _settings(bucket, settings)
    registry = _registry(bucket, model, s3, source)
    now = now or datetime.now(UTC)
    try:
        routing = registry.routing()
    except PointerUnreadable as broken:
        return {"status": "error", "error": str(broken)}
    if not routing.active:
        return None
    section: dict[str, Any] = {
        "status": "ok",
        "routing": routing.to_dict(),
        "mode": config.promotion_mode,
        "tolerance": config.promotion_tolerance,
        "min_labeled_rows": config.live_min_labeled_rows,
        "max_rows": config.challenger_max_rows,
        "bootstrap": {
            "method": "paired percentile bootstrap",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "confidence": CONFIDENCE,
        },
        "challengers": [],
    }
    try:
        champion = registry.current()
    except PointerUnreadable as broken:
        champion = None
        section.update(status="error", error=str(broken))
    if champion is None:
        section.setdefault("error", "no version in service to compare challengers with")
        section["status"] = "error"
        return section
    section["champion"] = {"version": champion.version}
    try:
        _compare(
            section,
            s3,
            bucket,
            registry,
            routing,
            champion,
            window=(start, end),
            files=files,
            labels=labels,
            config=config,
        )
    except (StorageUnavailable, StorageError, StorageAccessDenied, BucketNotFound):
        raise  # storage failures fail the run, as the drift part's do: Lambda retries it
    except TreeserveError as exc:
        # A champion that cannot be loaded or compared must not cost the drift report.
        logger.warning("challenger comparison failed", extra={"error": str(exc)})
        section.update(status="error", error=f"{type(exc).__name__}: {exc}")
        return section
    _decide(section, registry, champion, config, act=act, now=now)
    return section


def _compare(  # noqa: PLR0917 - one run's inputs, passed through once
    section: dict[str, Any],
    s3: S3Client,
    bucket: str,
    registry: ModelRegistry,
    routing: Routing,
    champion: Pointer,
    *,
    window: tuple[datetime, datetime],
    files: list[tuple[str, int]],
    labels: Callable[[], dict[str, Any]],
    config: Settings,
) -> None:
    start, end = window
    table = labels()
    aliases: dict[str, Pointer | None] = {a: registry.alias(a) for a in sorted(routing.aliases())}
    routes = sum(
        1
        for part in (routing.canary, routing.shadow)
        if part is not None and aliases.get(part.alias) is not None
    )
    budget = config.challenger_max_rows // max(routes, 1)
    canary = shadow = None
    if routing.canary is not None and (p := aliases[routing.canary.alias]) is not None:
        canary = (routing.canary.alias, p.version)
    if routing.shadow is not None and (p := aliases[routing.shadow.alias]) is not None:
        shadow = (routing.shadow.alias, p.version, routing.shadow.sample)
    plan = _Plan(champion.version, canary, shadow, _Rows(budget), _Rows(budget))
    _gather(s3, bucket, files, plan, window=(_ms(start), _ms(end)))
    section.update(
        files_read=plan.files_read,
        skipped_files=plan.skipped_files,
        truncated=plan.done
        and plan.files_read + plan.skipped_files
        < sum(1 for k, _ in files if k.endswith(EXTENSION)),
        latency=latency(plan.latency),
    )
    champion_predictor: Predictor | None = None
    scored = 0
    for alias, pointer in aliases.items():
        entry: dict[str, Any] = {
            "alias": alias,
            "version": None if pointer is None else pointer.version,
            "routes": [
                name
                for name, part in (("canary", routing.canary), ("shadow", routing.shadow))
                if part is not None and part.alias == alias
            ],
        }
        section["challengers"].append(entry)
        if pointer is None:
            entry.update(verdict="not enough evidence", reason=f"alias {alias!r} is not set")
            continue
        if pointer.version == champion.version:
            entry.update(
                verdict="not enough evidence",
                reason=f"alias {alias!r} names version {pointer.version}, the one in service",
            )
            continue
        try:
            challenger_predictor = load_predictor(registry, pointer)
        except (ModelLoadError, NotFound, PointerUnreadable) as exc:
            entry.update(
                verdict="not enough evidence",
                reason=f"version {pointer.version} cannot be loaded: {exc}",
            )
            continue
        champ_m = registry.manifest(champion.version)
        chal_m = challenger_predictor.manifest
        recoded = [
            name
            for name in set(champ_m.feature_names) & set(chal_m.feature_names)
            if (champ_m.categories or {}).get(name) != (chal_m.categories or {}).get(name)
        ]
        if recoded:
            # Captured inputs hold category codes: two models coding a feature differently
            # would be compared on different values.
            entry.update(
                verdict="not enough evidence",
                reason=f"the two versions code categories differently: {sorted(recoded)}",
            )
            continue
        if champ_m.task != chal_m.task:
            entry.update(
                verdict="not enough evidence",
                reason=f"the champion is {champ_m.task}, the challenger {chal_m.task}",
            )
            continue
        ids: list[str] = []
        old_parts: list[FloatArray] = []
        new_parts: list[FloatArray] = []
        counts = {"canary": 0, "shadow": 0}
        if canary is not None and canary[0] == alias and plan.canary_rows.n:
            X, P = plan.canary_rows.matrices()
            columns = _columns(chal_m.feature_names, champ_m.feature_names)
            if columns is None:
                entry.update(
                    verdict="not enough evidence",
                    reason="the champion needs features the canary's rows do not have",
                )
                continue
            if champion_predictor is None:
                champion_predictor = load_predictor(registry, champion)
            old_parts.append(scores(champion_predictor, X[:, columns]))
            new_parts.append(P.astype(np.float64))
            ids.extend(plan.canary_rows.ids)
            counts["canary"] = plan.canary_rows.n
        if shadow is not None and shadow[0] == alias and plan.shadow_rows.n:
            X, P = plan.shadow_rows.matrices()
            columns = _columns(champ_m.feature_names, chal_m.feature_names)
            if columns is None:
                entry.update(
                    verdict="not enough evidence",
                    reason="the shadow needs features the champion's rows do not have",
                )
                continue
            old_parts.append(P.astype(np.float64))
            new_parts.append(scores(challenger_predictor, X[:, columns]))
            ids.extend(plan.shadow_rows.ids)
            counts["shadow"] = plan.shadow_rows.n
        scored += counts["canary"] + counts["shadow"]
        widths = {p.shape[1] for p in (*old_parts, *new_parts)}
        entry["rows"] = {
            **counts,
            "compared": len(ids),
            "canary_seen": plan.canary_rows.seen if canary and canary[0] == alias else 0,
            "shadow_seen": plan.shadow_rows.seen if shadow and shadow[0] == alias else 0,
        }
        if not ids or len(widths) != 1:
            entry.update(
                quality={"labeled_rows": 0},
                verdict="not enough evidence",
                reason="no rows compared in the window"
                if not ids
                else "the two models answer different numbers of outputs",
            )
            continue
        old, new = np.concatenate(old_parts), np.concatenate(new_parts)
        entry["agreement"] = agreement(champ_m, chal_m, old, new)
        entry["shift"] = shift(_comparable_scale(champ_m, old), _comparable_scale(chal_m, new))
        q = quality(
            champ_m, chal_m, ids=ids, champion_values=old, challenger_values=new, labels=table
        )
        entry["quality"] = q
        entry["rows"]["labeled"] = q["labeled_rows"]
        entry["verdict"], entry["reason"] = verdict(
            q["labeled_rows"],
            minimum=config.live_min_labeled_rows,
            point=q.get("improvement"),
            ci=q.get("ci") or (None, None),
            tolerance=config.promotion_tolerance,
        )
        if "error" in q:
            entry["reason"] = q["error"]
    section["scored_rows"] = scored


# --- live promotion ----------------------------------------------------------------------------


def _decide(
    section: dict[str, Any],
    registry: ModelRegistry,
    champion: Pointer,
    config: Settings,
    *,
    act: bool,
    now: datetime,
) -> None:
    entries = section["challengers"]
    if config.promotion_mode != "live" or not act:
        why = (
            f"PROMOTION_MODE={config.promotion_mode}: live verdicts are reported, not acted on"
            if config.promotion_mode != "live"
            else "this run writes no report, so it changes nothing"
        )
        for entry in entries:
            entry["decision"] = {"action": "reported", "reason": why}
        return
    ready = [e for e in entries if e.get("verdict") in PROMOTING]
    ready.sort(
        key=lambda e: (
            e["verdict"] != "better",
            -((e.get("quality") or {}).get("improvement") or 0),
        )
    )
    chosen = ready[0] if ready else None
    for entry in entries:
        if entry is chosen:
            continue
        if chosen is not None and entry.get("verdict") in PROMOTING:
            reason = f"alias {chosen['alias']!r} was promoted in this run; compare again next run"
        else:
            reason = f"verdict {entry.get('verdict')}: promotion needs better or not worse"
        entry["decision"] = {"action": "held", "reason": reason}
    if chosen is None:
        return
    version = int(chosen["version"])
    try:
        pointer = registry.promote(version, expected_etag=champion.etag)
    except PreconditionFailed:
        chosen["decision"] = {
            "action": "held",
            "reason": "current.json moved since the comparison; the next run compares again",
        }
        return
    cleared = registry.clear_routing_to(version)
    record = {
        "kind": "live",
        "model": registry.name,
        "action": "promoted",
        "version": version,
        "alias": chosen["alias"],
        "previous": champion.version,
        "verdict": chosen["verdict"],
        "reason": chosen["reason"],
        "rows": chosen.get("rows"),
        "quality": chosen.get("quality"),
        "agreement": chosen.get("agreement"),
        "tolerance": config.promotion_tolerance,
        "min_labeled_rows": config.live_min_labeled_rows,
        "bootstrap": section["bootstrap"],
        "routing_cleared": cleared,
        "promoted_at": pointer.promoted_at,
        "decided_at": now.astimezone(UTC).isoformat(timespec="milliseconds"),
    }
    key = registry.record_decision(record)
    logger.info(
        "challenger promoted on live traffic",
        extra={"model": registry.name, "version": version, "alias": chosen["alias"]},
    )
    chosen["decision"] = {
        "action": "promoted",
        "reason": f"PROMOTION_MODE=live: verdict {chosen['verdict']} over "
        f"{(chosen.get('quality') or {}).get('labeled_rows', 0)} labeled rows",
        "decision_key": key,
        "routing_cleared": cleared,
    }


# --- metrics -----------------------------------------------------------------------------------


def emit_metrics(report: dict[str, Any], metrics: Metrics) -> None:
    """EMF per challenger alias (dimensions service, model, alias): ChallengerAgreement,
    ChallengerMetricDelta (the improvement, > 0: the challenger is better),
    ChallengerRowsCompared."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric  # noqa: PLC0415

    section = report.get("challenger") or {}
    service = metrics.service or "treeserve-monitoring"
    for entry in section.get("challengers", []):
        figures: list[tuple[str, MetricUnit, Any]] = [
            (METRIC_ROWS, MetricUnit.Count, (entry.get("rows") or {}).get("compared")),
            (METRIC_AGREEMENT, MetricUnit.NoUnit, (entry.get("agreement") or {}).get("agreement")),
            (METRIC_DELTA, MetricUnit.NoUnit, (entry.get("quality") or {}).get("improvement")),
        ]
        for name, unit, value in figures:
            if value is None:
                continue
            with single_metric(
                name=name,
                unit=unit,
                value=value,
                namespace=metrics.namespace,
                default_dimensions={"service": service, "model": report["model"]},
            ) as metric:
                metric.add_dimension(name="alias", value=str(entry["alias"]))


def summary_lines(section: dict[str, Any] | None) -> list[str]:
    """One line per challenger for ``treeserve monitor`` (and ``treeserve promote``)."""
    if not section:
        return []
    if section.get("status") == "error" and not section.get("challengers"):
        return [f"challengers: {section.get('error')}"]
    lines = []
    for e in section.get("challengers", []):
        rows = e.get("rows") or {}
        head = f"challenger {e['alias']} (v{e.get('version')}, {'+'.join(e.get('routes', []))}):"
        parts = [
            f"{rows.get('compared', 0):,} rows compared ({rows.get('canary', 0):,} canary, "
            f"{rows.get('shadow', 0):,} shadow)",
        ]
        agree = (e.get("agreement") or {}).get("agreement")
        if agree is not None:
            parts.append(f"agreement {agree:.1%}")
        sh = e.get("shift") or {}
        if sh.get("psi") is not None:
            parts.append(f"PSI {sh['psi']:.3g} KS {sh.get('ks_statistic') or 0:.3g}")
        q = e.get("quality") or {}
        if q.get("metric"):
            lo, hi = q["ci"]
            parts.append(
                f"{q['metric']} {q['champion']:.4g} -> {q['challenger']:.4g}, improvement "
                f"{q['improvement']:+.4g} [{_f(lo)}, {_f(hi)}] "
                f"on {q['labeled_rows']:,} labeled rows"
            )
        else:
            parts.append(f"{q.get('labeled_rows', 0):,} labeled rows")
        parts.append(f"verdict: {e.get('verdict')}")
        action = (e.get("decision") or {}).get("action")
        if action:
            parts.append(action)
        lines.append(f"{head} {'; '.join(parts)}")
    return lines


def latest_evidence(
    store: RegistryStore, model: str, version: int
) -> tuple[str, dict[str, Any]] | None:
    """The newest report's challenger entry for ``version`` (report key, entry), or None:
    what ``treeserve promote`` shows before promoting. Reads the last day of ``reports/<model>/``
    (keys sort by time) and its newest report."""
    days = list(store.list_folders(f"reports/{model}/"))
    for day in reversed(days[-2:]):  # the newest day; the one before if it holds no report yet
        keys = [k for k in store.list_keys(f"reports/{model}/{day}/") if k.endswith(".json")]
        if not keys:
            continue
        key = keys[-1]
        try:
            report = orjson.loads(store.get(key).body)
        except (NotFound, orjson.JSONDecodeError):
            return None
        section = report.get("challenger") if isinstance(report, dict) else None
        for entry in (section or {}).get("challengers", []):
            if entry.get("version") == version:
                return key, entry
        return None
    return None


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"
