"""How a binary model's values become labels: one rule for serving, the gate and monitoring.

Each binary objective answers on its own scale: ``binary:logistic`` a probability,
``binary:logitraw`` a margin (a logit), ``binary:hinge`` the label itself (0 or 1). A row is
positive when its probability is above the threshold (0.5 unless the manifest sets one), strictly,
as the scikit-learn wrapper's ``predict`` decides ``binary:logistic``; on a margin that is the
margin above ``logit(threshold)`` (0 by default). ``binary:hinge`` has no probability: its 0/1
output is the label, whatever the threshold.

The wrapper's ``predict`` for ``binary:logitraw`` compares the margin itself with 0.5 (XGBoost
documents ``predict_proba`` as unsupported for it); treeserve decides on the margin's own scale.
Pure numpy: monitoring imports it without XGBoost.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

DEFAULT_THRESHOLD = 0.5
MARGIN_OBJECTIVES = ("binary:logitraw",)
LABEL_OBJECTIVES = ("binary:hinge",)


def value_cut(objective: str, threshold: float | None) -> float:
    """The cut on the scale of the model's own values: a row is positive when value > cut."""
    p = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if objective in LABEL_OBJECTIVES:
        return 0.5
    if objective in MARGIN_OBJECTIVES:
        return math.log(p / (1.0 - p))
    return p


def positive(objective: str, threshold: float | None, values: npt.ArrayLike) -> np.ndarray:
    """Boolean per row: the model's values decide the positive class."""
    return np.asarray(values) > value_cut(objective, threshold)


def probabilities(objective: str, values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """P(class 1) from a binary model's values (margins through the logistic function)."""
    v = np.asarray(values, dtype=np.float64)
    if objective in MARGIN_OBJECTIVES:
        out: npt.NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -v))
        return out
    return v
