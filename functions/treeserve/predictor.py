"""A loaded model version: XGBoost Booster + manifest, ready to predict and explain.

Bytes come from the registry, where they were validated in a sandbox and stored as UBJ with
their sha256 in the manifest. :meth:`Predictor.load` checks that hash again (the bytes may have
been swapped or damaged in storage) and runs a smoke prediction before anything serves.
The hot path is :meth:`Predictor.predict`: ``Booster.inplace_predict`` on a float matrix,
one thread, no DMatrix. :meth:`Predictor.explain` needs a DMatrix (TreeSHAP via
``pred_contribs``); that is fine for the slower, rarer explain route.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

from treeserve.errors import ModelLoadError
from treeserve.manifest import ModelManifest

DEFAULT_THRESHOLD = 0.5

# UBJ and JSON models both start with "{". XGBoost aborts the whole process on some malformed
# buffers (an empty one), so refuse what is obviously not a model before XGBoost sees it.
_MODEL_PREFIXES = (b"{",)


@dataclass(frozen=True, slots=True)
class Prediction:
    """Model outputs for a batch of rows.

    ``values``: probabilities of the positive class (binary, shape (n,)), class probabilities
    (multiclass, (n, k)) or predicted values (regression and others, (n,)).
    ``labels``: the decided label per row for classification, else None.
    """

    values: np.ndarray
    labels: list[Any] | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """TreeSHAP contributions: ``contributions`` is (n, d) or (n, k, d) for multiclass;
    ``bias`` is (n,) or (n, k). Contributions plus bias sum to the margin (raw score)."""

    contributions: np.ndarray
    bias: np.ndarray
    feature_names: list[str]
    class_names: list[Any] | None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Predictor:
    """A model version in memory. Build it with :meth:`load`; thread-safe for prediction."""

    def __init__(self, booster: xgb.Booster, manifest: ModelManifest) -> None:
        self.booster = booster
        self.manifest = manifest
        self.version: int | None = manifest.version
        self.feature_names: list[str] = list(manifest.feature_names)
        self.num_features = manifest.num_features
        self.task = manifest.task
        self.threshold = (
            DEFAULT_THRESHOLD if manifest.threshold is None else float(manifest.threshold)
        )
        self.class_names: list[Any] | None = (
            list(manifest.class_names) if manifest.class_names else None
        )
        self.is_classifier = self.task in ("binary", "multiclass")
        # Label lookup tables, built once: label of class i is _label_table[i].
        if self.task == "binary":
            names = self.class_names if self.class_names and len(self.class_names) == 2 else None
            self._label_table: list[Any] = names if names else [0, 1]
        elif self.task == "multiclass":
            k = max(manifest.num_class, len(self.class_names or []))
            self._label_table = (
                self.class_names
                if self.class_names and len(self.class_names) >= k
                else list(range(k))
            )
        else:
            self._label_table = []

    @classmethod
    def load(cls, model_ubj: bytes, manifest: ModelManifest, *, verify: bool = True) -> Predictor:
        """Load, check the sha256 against the manifest and run a smoke prediction.

        Raises ModelLoadError when the bytes do not match, do not load, or do not predict.
        """
        if verify:
            digest = sha256_hex(model_ubj)
            if digest != manifest.sha256:
                raise ModelLoadError(
                    f"model bytes sha256 {digest[:12]}... does not match the manifest's "
                    f"{manifest.sha256[:12]}... (version {manifest.version})"
                )
        if not model_ubj or not model_ubj.startswith(_MODEL_PREFIXES):
            raise ModelLoadError("model bytes are empty or not an XGBoost UBJ/JSON model")
        try:
            booster = xgb.Booster(params={"nthread": 1})
            booster.load_model(bytearray(model_ubj))
            # Loading may restore saved parameters; one thread per prediction on Lambda.
            booster.set_param({"nthread": 1})
        except (xgb.core.XGBoostError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"XGBoost cannot load the model: {exc}") from None
        if len(manifest.feature_names) != manifest.num_features:
            raise ModelLoadError(
                f"manifest lists {len(manifest.feature_names)} feature names for "
                f"{manifest.num_features} features"
            )
        if booster.num_features() != manifest.num_features:
            raise ModelLoadError(
                f"model has {booster.num_features()} features, manifest says "
                f"{manifest.num_features}"
            )
        predictor = cls(booster, manifest)
        predictor.smoke()
        return predictor

    def smoke(self) -> None:
        """Predict a row of zeros and a row of missing values; outputs must be finite."""
        rows = np.zeros((2, self.num_features), dtype=np.float32)
        rows[1, :] = np.nan
        try:
            prediction = self.predict(rows)
        except Exception as exc:  # any failure here means: do not serve this model
            raise ModelLoadError(f"smoke prediction failed: {exc}") from None
        values = prediction.values
        if values.shape[0] != 2 or not np.all(np.isfinite(values)):
            raise ModelLoadError("smoke prediction gave non-finite or misshapen output")

    def raw_predict(self, X: np.ndarray) -> np.ndarray:
        """XGBoost's own output for the rows (float32)."""
        return self.booster.inplace_predict(X, validate_features=False)

    def predict(self, X: np.ndarray) -> Prediction:
        """Predict a float matrix in the model's feature order (NaN = missing)."""
        values = self.raw_predict(X)
        if self.task == "binary":
            table = self._label_table
            decided = (values >= self.threshold).tolist()
            return Prediction(values, [table[1] if d else table[0] for d in decided])
        if self.task == "multiclass":
            if values.ndim == 2:
                index = np.argmax(values, axis=1).tolist()
            else:  # multi:softmax answers the class index itself
                index = values.astype(np.int64).tolist()
            table = self._label_table
            return Prediction(values, [table[i] for i in index])
        return Prediction(values, None)

    def explain(self, X: np.ndarray) -> Explanation:
        """Per-row, per-feature TreeSHAP contributions plus bias (in margin space)."""
        dmatrix = xgb.DMatrix(
            X,
            feature_names=self.feature_names,
            feature_types=self.booster.feature_types,
            nthread=1,
        )
        contribs = self.booster.predict(dmatrix, pred_contribs=True, validate_features=False)
        if contribs.ndim == 3:  # multiclass: (n, k, d + 1)
            return Explanation(
                np.ascontiguousarray(contribs[:, :, :-1]),
                np.ascontiguousarray(contribs[:, :, -1]),
                self.feature_names,
                self._label_table,
            )
        return Explanation(
            np.ascontiguousarray(contribs[:, :-1]),
            np.ascontiguousarray(contribs[:, -1]),
            self.feature_names,
            None,
        )
