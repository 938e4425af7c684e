"""Model-quality metrics in plain numpy (no scikit-learn in a Lambda artifact).

Used by the refresh gate (challenger against champion on the holdout) and by monitoring
(performance once labels arrive, and challengers on live traffic). :func:`primary_metric` and
:func:`ungated_reason` are the one rule of which metric decides between two models.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

GATED_TASKS = ("binary", "multiclass", "regression")
# Regression-like objectives whose predictions are not the label's expected value.
UNGATED_OBJECTIVES = ("survival:", "reg:quantileerror")

# Probabilities are clipped away from 0 and 1 so one confident mistake gives a large, finite loss.
LOGLOSS_EPS = 1e-15


def roc_auc(y: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties). NaN with a single class."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y_arr.shape != s.shape:
        raise ValueError(f"labels ({y_arr.size}) and scores ({s.size}) differ in length")
    positive = y_arr == 1.0
    n_pos = int(positive.sum())
    n_neg = int(y_arr.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based average rank of every distinct score: ties share the mean of their ranks.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(y: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Mean negative log likelihood. ``probabilities``: P(y=1) of shape (n,) or (n, k)."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1:
        p = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        if p.shape[0] != y_arr.size:
            raise ValueError(f"labels ({y_arr.size}) and predictions ({p.shape[0]}) differ")
        return float(-np.mean(y_arr * np.log(p) + (1.0 - y_arr) * np.log1p(-p)))
    if p.shape[0] != y_arr.size:
        raise ValueError(f"labels ({y_arr.size}) and predictions ({p.shape[0]}) differ")
    p = np.clip(p, LOGLOSS_EPS, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    picked = p[np.arange(y_arr.size), y_arr.astype(np.int64)]
    return float(-np.mean(np.log(picked)))


def rmse(y: npt.ArrayLike, predictions: npt.ArrayLike) -> float:
    """Root mean squared error."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    if p.shape != y_arr.shape:
        raise ValueError(f"labels ({y_arr.size}) and predictions ({p.size}) differ in length")
    return float(np.sqrt(np.mean((y_arr - p) ** 2)))


def sigmoid(margin: FloatArray) -> FloatArray:
    """Numerically stable logistic function."""
    out = np.empty_like(margin, dtype=np.float64)
    pos = margin >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-margin[pos]))
    e = np.exp(margin[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def softmax(margin: FloatArray) -> FloatArray:
    """Row-wise softmax."""
    shifted = margin - margin.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def ungated_reason(objective: str, task: str, num_target: int = 1) -> str | None:
    """Why a model cannot be gated (no metric compares it fairly), or None when it can."""
    if task not in GATED_TASKS:
        return f"no quality metric for a {task} model"
    if objective.startswith(UNGATED_OBJECTIVES):
        return f"no quality metric for {objective} (RMSE would not measure what it predicts)"
    if num_target > 1:
        return f"no quality metric for a model with {num_target} outputs"
    return None


def primary_metric(task: str, metrics: dict[str, float]) -> tuple[str, bool] | None:
    """(name, higher_is_better) of the metric that decides, or None for an ungated task."""
    if task == "binary":
        return ("auc", True) if "auc" in metrics else ("logloss", False)
    if task == "multiclass":
        return ("logloss", False)
    if task == "regression":
        return ("rmse", False)
    return None
