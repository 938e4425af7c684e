"""A loaded model version: XGBoost Booster + manifest, ready to predict and explain.

Bytes come from the registry, where they were validated in a sandbox and stored as UBJ with
their sha256 in the manifest. :meth:`Predictor.load` checks that hash again (the bytes may have
been swapped or damaged in storage) and runs a smoke prediction before anything serves.
The hot path is :meth:`Predictor.predict`: XGBoost's in-place prediction on a float matrix,
one thread, no DMatrix. :meth:`Predictor.explain` needs a DMatrix (TreeSHAP via
``pred_contribs``); that is fine for the slower, rarer explain route.

In-place prediction is one C function, ``XGBoosterPredictFromDense``. ``Booster.inplace_predict``
wraps it in Python work that is the same on every call (a dozen input-type probes, two
``json.dumps``, a class built per call to copy the output): about half of a 1-row prediction of a
300-tree model on the bench machine. :class:`DenseCall` makes the same C call with its constant
arguments prepared once. It is used only after it answered the load-time smoke rows bit for bit
as ``inplace_predict`` did; anything unusual (a non-contiguous or non-float32 matrix, an XGBoost
without the private names it needs) goes through ``inplace_predict``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

from treeserve.errors import ExplainUnavailable, ModelLoadError
from treeserve.model import decision
from treeserve.model.manifest import ModelManifest

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = decision.DEFAULT_THRESHOLD

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
    output_names: list[str] | None = None  # multi-output regression: one block per output


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# XGBoosterPredictFromDense(handle, array interface, config, proxy, &shape, &dim, &out) has had
# this signature since XGBoost 1.4; checked for the majors the tests run.
SUPPORTED_XGBOOST_MAJORS = ("2", "3")


def _predict_args(iteration_range: tuple[int, int]) -> bytes:
    """inplace_predict's arguments: values (not margins), the model's rounds, NaN is missing."""
    return json.dumps(
        {
            "type": 0,
            "training": False,
            "iteration_begin": iteration_range[0],
            "iteration_end": iteration_range[1],
            "missing": float("nan"),
            "strict_shape": False,
            "cache_id": 0,
        }
    ).encode()


_INTERFACE = (
    b'{"data": [%d, true], "shape": [%d, %d], "strides": null, "typestr": "<f4", "version": 3}'
)


class DenseCall:
    """``XGBoosterPredictFromDense`` for one booster, as ``inplace_predict`` calls it."""

    def __init__(self, booster: xgb.Booster, iteration_range: tuple[int, int] = (0, 0)) -> None:
        core = xgb.core
        self._args = _predict_args(iteration_range)
        self._booster = booster  # keeps the handle alive
        self._handle = booster.handle
        self._function = core._LIB.XGBoosterPredictFromDense
        self._check = core._check_call
        self._ulong = ctypes.c_uint64  # bst_ulong in XGBoost's C API
        self._ulong_p = ctypes.POINTER(ctypes.c_uint64)
        self._float_p = ctypes.POINTER(ctypes.c_float)

    @classmethod
    def checked(
        cls, booster: xgb.Booster, rows: np.ndarray, iteration_range: tuple[int, int] = (0, 0)
    ) -> DenseCall | None:
        """A DenseCall that answered ``rows`` exactly as ``inplace_predict``, else None.

        Only for the XGBoost majors whose C signature it was written against (2 and 3): a
        changed signature would not raise here, it could crash the process."""
        major = xgb.__version__.split(".", 1)[0]
        if major not in SUPPORTED_XGBOOST_MAJORS:
            logger.info("direct prediction call not used with XGBoost %s", xgb.__version__)
            return None
        try:
            call = cls(booster, iteration_range)
            same = np.array_equal(
                call(rows),
                booster.inplace_predict(
                    rows, validate_features=False, iteration_range=iteration_range
                ),
                equal_nan=True,
            )
        except Exception as exc:  # an XGBoost whose internals moved: the public path serves
            logger.warning("direct prediction call unavailable: %s", exc)
            return None
        if not same:
            logger.warning("direct prediction call disagrees with inplace_predict; not used")
            return None
        return call

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Predictions for a C-contiguous float32 (n, d) matrix (the caller checks)."""
        n, d = X.shape
        shape = self._ulong_p()
        dims = self._ulong()
        out = self._float_p()
        self._check(
            self._function(
                self._handle,
                _INTERFACE % (X.ctypes.data, n, d),
                self._args,
                None,
                ctypes.byref(shape),
                ctypes.byref(dims),
                ctypes.byref(out),
            )
        )
        # The output lives in XGBoost's per-thread buffer until this thread's next call: copy it.
        sizes = [int(shape[i]) for i in range(dims.value)]
        count = math.prod(sizes)
        result = np.empty(count, dtype=np.float32)
        if count:
            ctypes.memmove(result.ctypes.data, out, count * 4)
        return result.reshape(sizes)


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
        )  # on the probability scale; labels use self._cut, on the model's own scale
        self.class_names: list[Any] | None = (
            list(manifest.class_names) if manifest.class_names else None
        )
        self.is_classifier = self.task in ("binary", "multiclass")
        # The rounds the model's own predict uses ((0, 0): all of them).
        self.iteration_range: tuple[int, int] = (
            (int(manifest.iteration_range[0]), int(manifest.iteration_range[1]))
            if manifest.iteration_range
            else (0, 0)
        )
        self._cut = decision.value_cut(manifest.objective, manifest.threshold)
        self.output_names: list[str] | None = (
            list(manifest.output_names) if manifest.output_names else None
        )
        self._dense: DenseCall | None = None
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
        """Predict a row of zeros and a row of missing values; outputs must be finite.

        Also decides whether the direct C call serves (see :class:`DenseCall`)."""
        rows = np.zeros((2, self.num_features), dtype=np.float32)
        rows[1, :] = np.nan
        self._dense = DenseCall.checked(self.booster, rows, self.iteration_range)
        try:
            prediction = self.predict(rows)
        except Exception as exc:  # any failure here means: do not serve this model
            raise ModelLoadError(f"smoke prediction failed: {exc}") from None
        values = prediction.values
        if values.shape[0] != 2 or not np.all(np.isfinite(values)):
            raise ModelLoadError("smoke prediction gave non-finite or misshapen output")

    def raw_predict(self, X: np.ndarray) -> np.ndarray:
        """XGBoost's own output for the rows (float32)."""
        dense = self._dense
        if dense is not None and X.dtype == np.float32 and X.ndim == 2 and X.flags.c_contiguous:
            return dense(X)
        return self.booster.inplace_predict(
            X, validate_features=False, iteration_range=self.iteration_range
        )

    def predict(self, X: np.ndarray) -> Prediction:
        """Predict a float matrix in the model's feature order (NaN = missing)."""
        values = self.raw_predict(X)
        if self.task == "binary":
            table = self._label_table
            decided = (values > self._cut).tolist()  # see treeserve.model.decision
            return Prediction(values, [table[1] if d else table[0] for d in decided])
        if self.task == "multiclass":
            if values.ndim == 2:
                index = np.argmax(values, axis=1).tolist()
            else:  # multi:softmax answers the class index itself
                index = values.astype(np.int64).tolist()
            table = self._label_table
            return Prediction(values, [table[i] for i in index])
        return Prediction(values, None)

    def check_explainable(self) -> None:
        """Raise ExplainUnavailable (422) for a model XGBoost cannot explain."""
        if self.manifest.vector_leaf:
            raise ExplainUnavailable(
                "explain is not available for this model: XGBoost has no TreeSHAP for "
                "vector-leaf trees (multi_strategy='multi_output_tree'); use /predict, or "
                "train with multi_strategy='one_output_per_tree' to explain"
            )

    def explain(self, X: np.ndarray) -> Explanation:
        """Per-row, per-feature TreeSHAP contributions plus bias (in margin space).

        They add up to the margin of the same rounds that :meth:`predict` uses."""
        self.check_explainable()
        dmatrix = xgb.DMatrix(
            X,
            feature_names=self.feature_names,
            feature_types=self.booster.feature_types,
            nthread=1,
        )
        contribs = self.booster.predict(
            dmatrix,
            pred_contribs=True,
            validate_features=False,
            iteration_range=self.iteration_range,
        )
        if contribs.ndim == 3:  # multiclass or multi-output: (n, k, d + 1)
            multiclass = self.task == "multiclass"
            return Explanation(
                np.ascontiguousarray(contribs[:, :, :-1]),
                np.ascontiguousarray(contribs[:, :, -1]),
                self.feature_names,
                self._label_table if multiclass else None,
                None if multiclass else self._output_names(contribs.shape[1]),
            )
        return Explanation(
            np.ascontiguousarray(contribs[:, :-1]),
            np.ascontiguousarray(contribs[:, -1]),
            self.feature_names,
            None,
        )

    def _output_names(self, k: int) -> list[str]:
        names = self.output_names
        return names if names and len(names) == k else [f"output_{i}" for i in range(k)]
