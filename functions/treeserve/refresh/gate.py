"""The quality gate: score a challenger and the champion on the same holdout, decide.

Metrics are plain numpy (no scikit-learn in a Lambda artifact):

- binary: ROC AUC (primary, higher is better) and log loss; when the holdout holds a single
  class AUC is undefined and log loss becomes the primary metric;
- multiclass: log loss (primary, lower is better) and accuracy;
- regression: RMSE (primary, lower is better) and MAE.

``PROMOTION_TOLERANCE`` is absolute, in the primary metric's own units: the challenger passes
when it is not worse than the champion by more than the tolerance (``auc >= champion - tol``,
``logloss <= champion + tol``, ``rmse <= champion + tol``).

Classification models are scored on probabilities derived from XGBoost's margin (sigmoid or
softmax), so ``binary:logitraw``, ``binary:hinge`` and ``multi:softmax`` are comparable with
their probabilistic siblings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from treeserve.errors import UploadRejected
from treeserve.model import decision

# The metric rule (which metric decides, which models have none) is the model package's: the
# live comparison in treeserve.monitoring.challenger decides by the same one.
from treeserve.model.metrics import (
    log_loss,
    primary_metric,
    rmse,
    roc_auc,
    sigmoid,
    softmax,
)

FloatArray = npt.NDArray[np.float64]
Decision = Literal["promote", "hold", "skip"]

# --- scoring a model ---------------------------------------------------------------------------


def check_labels(task: str, y: npt.ArrayLike, num_class: int) -> FloatArray:
    """The holdout labels as floats, refused (``holdout_labels``) when the task cannot use them."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    if y_arr.size == 0:
        raise UploadRejected("holdout_labels", "the holdout has no rows")
    if not np.all(np.isfinite(y_arr)):
        raise UploadRejected("holdout_labels", "the holdout label column has missing values")
    if task == "binary" and not np.all((y_arr == 0.0) | (y_arr == 1.0)):
        raise UploadRejected(
            "holdout_labels", "a binary model's holdout labels must be 0 or 1 (or its class names)"
        )
    if task == "multiclass":
        whole = np.all(y_arr == np.round(y_arr))
        if not whole or y_arr.min() < 0 or y_arr.max() >= max(num_class, 1):
            raise UploadRejected(
                "holdout_labels",
                f"a {num_class}-class model's holdout labels must be class indices 0..{num_class - 1} "
                "(or its class names)",
            )
    return y_arr


def model_outputs(
    model_ubj: bytes, X: FloatArray, task: str, iteration_range: Sequence[int] | None = None
) -> FloatArray:
    """What the gate scores: probabilities for classification, values for regression.

    ``iteration_range`` (the manifest's): the rounds the model's own predict uses, so the gate
    scores what is served (an early-stopped model without the rounds after its best).

    Loads the bytes in-process: the challenger's were already loaded once in the sandbox, and the
    champion's come from the registry, where only sandbox-validated bytes are ever written.
    """
    # Imported here: the package costs about half a second to import (scipy.sparse), paid
    # only by an upload that has a holdout to score.
    import xgboost as xgb  # noqa: PLC0415

    booster = xgb.Booster(params={"nthread": 1}, model_file=bytearray(model_ubj))
    rounds = (int(iteration_range[0]), int(iteration_range[1])) if iteration_range else (0, 0)
    if task in ("binary", "multiclass"):
        margin = np.asarray(
            booster.inplace_predict(X, predict_type="margin", iteration_range=rounds),
            dtype=np.float64,
        )
        if task == "binary":
            return sigmoid(margin.reshape(-1))
        return softmax(margin.reshape(X.shape[0], -1))
    return np.asarray(
        booster.inplace_predict(X, predict_type="value", iteration_range=rounds),
        dtype=np.float64,
    )


def score(
    task: str,
    y: FloatArray,
    outputs: FloatArray,
    objective: str = "binary:logistic",
    threshold: float | None = None,
) -> dict[str, float]:
    """Every metric the gate records for ``task`` (finite values only).

    Binary accuracy counts the labels the model serves (:mod:`treeserve.model.decision` on the
    probabilities :func:`model_outputs` gives: a margin above logit(threshold) is a probability
    above the threshold; ``binary:hinge`` is positive above probability 0.5, margin 0)."""
    metrics: dict[str, float] = {"n": float(y.size)}
    if task == "binary":
        metrics["auc"] = roc_auc(y, outputs)
        metrics["logloss"] = log_loss(y, outputs)
        cut = decision.value_cut("binary:logistic", threshold)
        if objective in decision.LABEL_OBJECTIVES:
            cut = decision.DEFAULT_THRESHOLD
        metrics["accuracy"] = float(np.mean((outputs.ravel() > cut) == (y == 1.0)))
    elif task == "multiclass":
        metrics["logloss"] = log_loss(y, outputs)
        metrics["accuracy"] = float(np.mean(outputs.argmax(axis=1) == y))
    elif task == "regression":
        metrics["rmse"] = rmse(y, outputs)
        metrics["mae"] = float(np.mean(np.abs(y - outputs.ravel())))
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


# --- the decision ------------------------------------------------------------------------------


@dataclass(slots=True)
class GateResult:
    """The gate's verdict and the figures behind it (recorded in the manifest and the outcome)."""

    decision: Decision
    reason: str
    metric: str | None = None
    higher_is_better: bool | None = None
    tolerance: float = 0.0
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: int | None = None

    @property
    def passed(self) -> bool:
        return self.decision != "hold"

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "tolerance": self.tolerance,
            "challenger": dict(self.challenger),
            "champion": dict(self.champion),
            "champion_version": self.champion_version,
        }


def compare(
    task: str,
    challenger: dict[str, float],
    champion: dict[str, float],
    tolerance: float,
    *,
    champion_version: int | None = None,
) -> GateResult:
    """Decide from two metric sets computed on the same holdout."""
    primary = primary_metric(task, challenger)
    if primary is None:
        return GateResult("skip", f"no quality metric for a {task} model", tolerance=tolerance)
    name, higher = primary
    if name not in challenger or name not in champion:
        # Happens only if a metric came out non-finite; refuse to guess.
        return GateResult(
            "hold",
            f"{name} could not be computed for both models on the holdout",
            name,
            higher,
            tolerance,
            challenger,
            champion,
            champion_version,
        )
    new, old = challenger[name], champion[name]
    ok = new >= old - tolerance if higher else new <= old + tolerance
    if ok:
        reason = (
            f"holdout {name} {new:.6g} is not worse than the champion's {old:.6g} "
            f"(v{champion_version}) by more than the tolerance {tolerance:g}"
        )
    else:
        reason = (
            f"holdout {name} {new:.6g} is worse than the champion's {old:.6g} "
            f"(v{champion_version}) by more than the tolerance {tolerance:g}"
        )
    return GateResult(
        "promote" if ok else "hold",
        reason,
        name,
        higher,
        tolerance,
        challenger,
        champion,
        champion_version,
    )


def champion_columns(
    challenger_features: Sequence[str], champion_features: Sequence[str]
) -> list[int] | None:
    """Column indices that lay the challenger's holdout out in the champion's feature order.

    None when the champion uses a feature the holdout does not have (it cannot be scored).
    """
    index = {name: i for i, name in enumerate(challenger_features)}
    try:
        return [index[name] for name in champion_features]
    except KeyError:
        return None
