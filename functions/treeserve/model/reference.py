"""Reference statistics: the drift baseline of a model version, stored in its manifest.

Built once at registration (:func:`compute_reference` from ``reference.csv`` and the model's
predictions on it, or :func:`reference_from_model` from the model alone) and read by
:mod:`treeserve.monitoring.drift` / :mod:`treeserve.monitoring.pipeline`. Plain JSON: lists, ints, floats, strings,
``null``; never NaN or infinity.

Every value is stored at float32 precision, the precision XGBoost itself reads features at and
the precision monitoring parses captures into, so bin membership and ties are decided the same
way at registration and in monitoring.

Schema (``REFERENCE_SCHEMA_VERSION`` = 1)::

    {
      "schema_version": 1,
      "source": "sample" | "model",
      "n_rows": int | null,            # reference rows (null: from the model, unknown)
      "counts_exact": bool,            # false: no counts, only what the model records
      "checks": [...],                 # drift checks this reference supports (below)
      "features": [FeatureStats, ...], # in the model's feature order
      "predictions": {"names": [...], "columns": [FeatureStats, ...]} | null
    }

    FeatureStats (numeric; every XGBoost type except "c"):
      {"name", "xgb_type", "kind": "numeric",
       "n": int | null, "n_missing": int | null, "missing_rate": float | null,
       "min", "max", "mean", "std": float | null,       # of the non-missing values
       "edges": [e0 < e1 < ... < e_{k-1}],              # interior bin edges
       "counts": [k + 1 ints] | null,                   # non-missing values per bin
       "quantiles": [q_1 <= ... <= q_k] | null}         # k <= QUANTILES (below)
    Bins are open at both ends: (-inf, e0], (e0, e1], ..., (e_{k-1}, +inf); a value v falls in
    bin ``searchsorted(edges, v, side="left")``. Missing values are counted separately
    (``n_missing``); drift statistics use them as one more bin.
    References written before the quantiles hold ``"sample"`` instead (at most 1000 seeded
    random non-missing values, sorted); monitoring still reads them, against that sample.

    FeatureStats (categorical, XGBoost type "c"):
      {"name", "xgb_type": "c", "kind": "categorical", "n", "n_missing", "missing_rate",
       "categories": [codes as floats], "category_counts": [ints] | null,
       "other_count": int | null,   # rows of categories beyond MAX_CATEGORIES (rarest first)
       "category_values": [the model's categories in code order] | null}
    ``category_values`` (from the model, or manifest.json's ``categories``) names code i by
    ``category_values[i]``: drift results and reports show categories by value.

Numeric edges are the reference deciles (duplicates merged; a constant column has the single
edge [c], so anything above it is a different bin).

``quantiles`` summarise the whole reference (not a sample of it) for the Kolmogorov-Smirnov and
Wasserstein statistics: with the n non-missing values sorted as x_(1) <= ... <= x_(n) and
k = min(QUANTILES, n), ``q_i = x_(ceil(n (2i - 1) / (2k)))``, the smallest value whose reference
ECDF reaches (i - 1/2) / k. Read as k values of weight 1/k, their ECDF is
``F_q(x) = floor(k F(x) + 1/2) / k`` (F the reference ECDF, ties included): F rounded to the
nearest multiple of 1/k, so ``|F_q(x) - F(x)| <= 1/(2k)`` at every x. Hence the KS statistic
against the quantiles is within 1/(2k) of ``scipy.stats.ks_2samp(reference, current)``'s on the
full reference (1/4000 with QUANTILES = 2000), and since F_q = F outside [min, max] the
Wasserstein distance is within ``(max - min) / (2k)`` of the full reference's. With n <= QUANTILES
the quantiles are every value (k = n, F_q = F): both statistics are exact. A model with more
than 100 numeric columns (features and prediction columns) shares ``QUANTILE_BUDGET`` (200,000)
quantiles among them, at least ``MIN_QUANTILES`` (100) each, so k = min(n, max(100,
min(2000, 200000 // columns))); monitoring reports each feature's bound (``ks_bound``).

Prediction columns: ``"prediction"`` (binary probability or regression value), or
``"prediction[i]"`` per class probability (multiclass); each is a numeric FeatureStats.

``checks``: from a sample, ``psi``, ``js``, ``ks``, ``wasserstein``, ``chi2``, ``missing_rate``,
``range``, ``new_categories``, ``prediction``. From the model alone (``source: "model"``): the
edges are the model's own split thresholds (at most ``MAX_MODEL_EDGES``; values between two
thresholds are treated identically by every tree) and the categories those it splits on, with
no counts, so only ``bin_shares`` (the current distribution over the model's bins),
``missing_rate`` (current, no baseline) and ``new_categories`` (categories no split has seen)
are available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

REFERENCE_SCHEMA_VERSION = 1
N_BINS = 10
QUANTILES = 2000  # reference quantiles per numeric feature: KS within 1/(2 * QUANTILES)
# Quantiles of all numeric columns together: past 100 columns each keeps fewer (never fewer than
# MIN_QUANTILES, KS within 1/200), so a wide model's manifest stays a few MB.
QUANTILE_BUDGET = 200_000
MIN_QUANTILES = 100
MAX_CATEGORIES = 1000
MAX_MODEL_EDGES = 64

SAMPLE_CHECKS = [
    "psi",
    "js",
    "ks",
    "wasserstein",
    "chi2",
    "missing_rate",
    "range",
    "new_categories",
    "prediction",
]
MODEL_CHECKS = ["bin_shares", "missing_rate", "new_categories"]


def _floats(values: npt.ArrayLike) -> list[float]:
    """float32 values as JSON floats with their shortest float32 representation."""
    arr = np.asarray(values, dtype=np.float32)
    arr = arr[np.isfinite(arr)]
    out: list[float] = orjson.loads(orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


def _scalar(value: float) -> float | None:
    v = float(np.float32(value))
    return v if np.isfinite(v) else None


def is_categorical(xgb_type: str | None) -> bool:
    """XGBoost marks categorical features with type ``"c"``."""
    return xgb_type == "c"


def numeric_edges(values: npt.NDArray[np.float32], n_bins: int = N_BINS) -> npt.NDArray[np.float32]:
    """Interior bin edges: the deciles of the non-missing ``values`` at float32, unique."""
    if values.size == 0:
        return np.empty(0, dtype=np.float32)
    qs = np.quantile(values.astype(np.float64), np.arange(1, n_bins) / n_bins)
    return np.unique(qs.astype(np.float32))


def bin_counts(
    values: npt.NDArray[np.float32], edges: npt.NDArray[np.float32]
) -> npt.NDArray[np.int64]:
    """Non-missing ``values`` per open-ended bin of ``edges`` (length ``len(edges) + 1``)."""
    idx = np.searchsorted(edges, values, side="left")
    return np.bincount(idx, minlength=edges.size + 1).astype(np.int64)


def reference_quantiles(
    sorted_values: npt.NDArray[np.float32], k: int = QUANTILES
) -> npt.NDArray[np.float32]:
    """The k = min(k, n) midpoint quantiles of n sorted values (module docstring: the bound)."""
    n = int(sorted_values.size)
    k = min(k, n)
    if k == 0:
        return np.empty(0, dtype=np.float32)
    i = np.arange(1, k + 1, dtype=np.int64)
    rank = (n * (2 * i - 1) + 2 * k - 1) // (2 * k)  # ceil(n (2i - 1) / (2k)), in integers
    return sorted_values[rank - 1]


def quantiles_per_column(numeric_columns: int) -> int:
    """Quantiles each numeric column keeps: QUANTILES, fewer past QUANTILE_BUDGET in all."""
    share = QUANTILE_BUDGET // max(numeric_columns, 1)
    return max(MIN_QUANTILES, min(QUANTILES, share))


def numeric_stats(
    name: str, xgb_type: str | None, column: npt.ArrayLike, *, quantiles: int = QUANTILES
) -> dict[str, Any]:
    """FeatureStats of one numeric column (NaN is missing)."""
    col = np.asarray(column, dtype=np.float32).ravel()
    finite = np.isfinite(col)
    values = np.sort(col[finite])
    n, n_missing = int(col.size), int(col.size - values.size)
    edges = numeric_edges(values)
    counts = bin_counts(values, edges)
    has = values.size > 0
    v64 = values.astype(np.float64)
    return {
        "name": name,
        "xgb_type": xgb_type,
        "kind": "numeric",
        "n": n,
        "n_missing": n_missing,
        "missing_rate": n_missing / n if n else 0.0,
        "min": _scalar(v64.min()) if has else None,
        "max": _scalar(v64.max()) if has else None,
        "mean": _scalar(v64.mean()) if has else None,
        "std": _scalar(v64.std()) if has else None,
        "edges": _floats(edges),
        "counts": [int(c) for c in counts],
        "quantiles": _floats(reference_quantiles(values, quantiles)),
    }


def categorical_stats(
    name: str, column: npt.ArrayLike, values: list[Any] | None = None
) -> dict[str, Any]:
    """FeatureStats of one categorical column (category codes; NaN is missing)."""
    col = np.asarray(column, dtype=np.float32).ravel()
    finite = np.isfinite(col)
    cats, counts = np.unique(col[finite], return_counts=True)
    other = 0
    if cats.size > MAX_CATEGORIES:
        keep = np.sort(np.argsort(-counts, kind="stable")[:MAX_CATEGORIES])
        other = int(counts.sum() - counts[keep].sum())
        cats, counts = cats[keep], counts[keep]
    n, n_missing = int(col.size), int((~finite).sum())
    return {
        "name": name,
        "xgb_type": "c",
        "kind": "categorical",
        "n": n,
        "n_missing": n_missing,
        "missing_rate": n_missing / n if n else 0.0,
        "categories": _floats(cats),
        "category_counts": [int(c) for c in counts],
        "other_count": other,
        "category_values": values,
    }


def prediction_names(predictions: npt.ArrayLike) -> list[str]:
    """Names of the prediction columns: ``prediction`` or ``prediction[i]`` per class."""
    p = np.asarray(predictions)
    if p.ndim <= 1 or p.shape[1] == 1:
        return ["prediction"]
    return [f"prediction[{i}]" for i in range(p.shape[1])]


def prediction_matrix(predictions: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Predictions as an (n, columns) float32 matrix."""
    p = np.asarray(predictions, dtype=np.float32)
    if p.ndim == 0:
        p = p.reshape(1, 1)
    elif p.ndim == 1:
        p = p.reshape(-1, 1)
    elif p.ndim > 2:
        p = p.reshape(p.shape[0], -1)
    return p


def compute_reference(
    X: np.ndarray,
    feature_names: Sequence[str],
    feature_types: Sequence[str] | None,
    predictions: np.ndarray | None,
    categories: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Reference statistics of a training sample ``X`` (rows x features, NaN missing)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != len(feature_names):
        raise ValueError(
            f"reference matrix of shape {X.shape} does not match {len(feature_names)} features"
        )
    types = list(feature_types) if feature_types else [None] * len(feature_names)
    given = np.asarray(predictions if predictions is not None else [])
    preds_given = given.size > 0
    P = prediction_matrix(given) if preds_given else np.empty((0, 0), np.float32)
    k = quantiles_per_column(sum(not is_categorical(t) for t in types) + P.shape[1])
    features = [
        categorical_stats(name, X[:, j], (categories or {}).get(name))
        if is_categorical(types[j])
        else numeric_stats(name, types[j], X[:, j], quantiles=k)
        for j, name in enumerate(feature_names)
    ]
    preds: dict[str, Any] | None = None
    if preds_given:
        names = prediction_names(given)
        preds = {
            "names": names,
            "columns": [
                numeric_stats(nm, "float", P[:, i], quantiles=k) for i, nm in enumerate(names)
            ],
        }
    return {
        "schema_version": REFERENCE_SCHEMA_VERSION,
        "source": "sample",
        "n_rows": int(X.shape[0]),
        "counts_exact": True,
        "checks": list(SAMPLE_CHECKS),
        "features": features,
        "predictions": preds,
    }


def _model_categories(doc: Any, num_features: int) -> list[npt.NDArray[np.float32]]:
    """Per feature, the category codes the model's categorical splits mention."""
    from treeserve.model.sandbox import model_trees  # noqa: PLC0415

    found: list[list[np.ndarray]] = [[] for _ in range(num_features)]
    for tree in model_trees(doc):
        nodes = np.asarray(tree.get("categories_nodes", []), dtype=np.int64)
        if nodes.size == 0:
            continue
        segments = np.asarray(tree.get("categories_segments", []), dtype=np.int64)
        sizes = np.asarray(tree.get("categories_sizes", []), dtype=np.int64)
        cats = np.asarray(tree.get("categories", []), dtype=np.float32)
        idx = np.asarray(tree.get("split_indices", []), dtype=np.int64)
        for node, start, size in zip(nodes, segments, sizes, strict=False):
            if 0 <= node < idx.size and 0 <= idx[node] < num_features:
                found[int(idx[node])].append(cats[start : start + size])
    return [
        np.unique(np.concatenate(parts)) if parts else np.empty(0, np.float32) for parts in found
    ]


def reference_from_model(
    booster_or_model_ubj: Any,
    feature_names: Sequence[str],
    feature_types: Sequence[str] | None,
    categories: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """What the model itself records: split thresholds as bin edges, split categories.

    Accepts the canonical UBJ bytes the registry stores (decoded with the pure-Python reader,
    no XGBoost load) or an ``xgboost.Booster``. Counts are unknown (see the module docstring).
    """
    from treeserve.model.sandbox import decode_ubj, split_thresholds  # noqa: PLC0415

    if isinstance(booster_or_model_ubj, bytes | bytearray | memoryview):
        raw = bytes(booster_or_model_ubj)
    else:  # an xgboost.Booster
        raw = bytes(booster_or_model_ubj.save_raw("ubj"))
    doc, _ = decode_ubj(raw)
    num_features = len(feature_names)
    thresholds = split_thresholds(doc, num_features)
    split_categories = _model_categories(doc, num_features)
    types = list(feature_types) if feature_types else [None] * num_features
    features: list[dict[str, Any]] = []
    for j, name in enumerate(feature_names):
        base: dict[str, Any] = {
            "name": name,
            "xgb_type": types[j],
            "n": None,
            "n_missing": None,
            "missing_rate": None,
        }
        if is_categorical(types[j]):
            base.update(
                kind="categorical",
                categories=_floats(split_categories[j]),
                category_counts=None,
                other_count=None,
                category_values=(categories or {}).get(name),
            )
        else:
            edges = np.unique(thresholds[j].astype(np.float32))
            if edges.size > MAX_MODEL_EDGES:
                pick = np.linspace(0, edges.size - 1, MAX_MODEL_EDGES).round().astype(np.int64)
                edges = np.unique(edges[pick])
            base.update(
                kind="numeric",
                min=None,
                max=None,
                mean=None,
                std=None,
                edges=_floats(edges),
                counts=None,
                quantiles=None,
            )
        features.append(base)
    return {
        "schema_version": REFERENCE_SCHEMA_VERSION,
        "source": "model",
        "n_rows": None,
        "counts_exact": False,
        "checks": list(MODEL_CHECKS),
        "features": features,
        "predictions": None,
    }
