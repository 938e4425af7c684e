"""The version manifest: what the registry knows about one immutable model version.

Written once next to ``model.ubj`` as ``registry/<model>/versions/<n>/manifest.json`` and never
changed. Every part reads it: the predictor (features, classes, threshold), the refresh gate
(metrics), monitoring (reference statistics), the API (``GET /model`` shows :meth:`public`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import orjson

Task = Literal["binary", "multiclass", "regression", "ranking", "other"]

MANIFEST_SCHEMA_VERSION = 1

CATEGORICAL_INPUT = (
    "send a categorical feature's value as a string (JSON records and rows, CSV fields) from "
    "its categories; a JSON number is the model's own code (the position in that list, as in "
    "a numpy array); null or an empty CSV field is missing; an unknown value is a 422"
)


def category_codes(categories: list[Any]) -> dict[str, float]:
    """Each category's text (as JSON strings and CSV fields carry it) -> its code."""
    return {str(value): float(code) for code, value in enumerate(categories)}


SMOKE_CHECK_ROWS = 8
SMOKE_CHECK_VALUES = 4096  # rows x features at most: wide models record fewer rows


def smoke_check_record(rows: Any, predictions: Any) -> dict[str, Any]:
    """``manifest.smoke_check`` from rows and what ``inplace_predict`` answered for them: the
    first few, as the float32 values XGBoost reads and writes."""
    X = np.asarray(rows, dtype=np.float32)
    n = max(1, min(SMOKE_CHECK_ROWS, SMOKE_CHECK_VALUES // max(1, X.shape[1])))
    values = np.asarray(predictions, dtype=np.float32)[:n]
    return {
        "rows": [[None if math.isnan(v) else v for v in row] for row in X[:n].tolist()],
        "predictions": values.tolist(),
    }


def task_of(objective: str, num_class: int) -> Task:
    """The kind of answer an XGBoost objective gives."""
    if objective.startswith("binary:"):
        return "binary"
    if objective.startswith("multi:") or num_class > 2:
        return "multiclass"
    if objective.startswith(("reg:", "count:", "survival:")):
        return "regression"
    if objective.startswith("rank:"):
        return "ranking"
    return "other"


@dataclass(slots=True)
class ModelManifest:
    """Everything recorded about a model version. JSON-serialisable through :meth:`to_json`."""

    name: str
    sha256: str  # of the model file (model.ubj) as stored in the registry
    model_size: int
    xgboost_version: str
    objective: str
    task: Task
    num_features: int
    feature_names: list[str]
    feature_types: list[str]  # XGBoost's: "float", "int", "i" (indicator), "q", "c" (categorical)
    num_class: int = 0  # 0 or 1 for binary/regression, k for multi:* objectives
    num_trees: int = 0
    # [begin, end) in boosting rounds that every prediction uses: early stopping's
    # [0, best_iteration + 1), as the scikit-learn wrapper predicts; None for every round.
    iteration_range: list[int] | None = None
    num_outputs: int = 1  # values per row: k for multi:softprob, quantiles or targets
    # What each of several outputs is (regression with several quantiles or targets), else None.
    output_names: list[str] | None = None
    vector_leaf: bool = False  # multi_output_tree trees: no TreeSHAP, /explain answers 422
    class_names: list[str] | None = None
    # categorical feature -> its training categories in code order (code i names categories[i])
    categories: dict[str, list[Any]] | None = None
    threshold: float | None = None  # binary decision threshold (default 0.5)
    label: str | None = None
    description: str | None = None
    version: int | None = None  # set by the registry when the version is allocated
    metrics: dict[str, float] = field(default_factory=dict)  # as declared by the uploader
    holdout_metrics: dict[str, float] = field(default_factory=dict)  # as measured by the gate
    validation: dict[str, Any] = field(default_factory=dict)  # the validation report
    # What the version costs the inference function, measured at refresh (treeserve.model.package
    # footprint): loaded_mb, load_peak_mb, explain_peak_mb, peak_mb, load_seconds, budget_mb...
    footprint: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None  # reference statistics (treeserve.model.reference)
    reference_source: str | None = None  # "reference.csv" or "model"
    # manifest.json's drift rules: {"default": {"method", "threshold"}, "features": {name: {...}}}
    # (validated at refresh; treeserve.monitoring.drift.resolve_rules applies them), or None.
    drift: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # bucket, key, etag, upload sha256, size
    # A few rows the refresh sandbox predicted (inplace_predict) and its answers, as float32
    # values (NaN as null): serving loads the model through the C API alone only when it gives
    # these bit for bit (treeserve.model.predictor). None for manifests written before.
    smoke_check: dict[str, Any] | None = None
    created_at: str | None = None  # ISO 8601 UTC
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelManifest:
        return cls.from_dict(orjson.loads(raw))

    def public(self) -> dict[str, Any]:
        """What ``GET /model`` shows: no reference statistics, no storage locations."""
        data = self.to_dict()
        data.pop("reference", None)
        data.pop("source", None)
        data.pop("smoke_check", None)
        if self.categories:
            data["categorical_input"] = CATEGORICAL_INPUT
        return data
