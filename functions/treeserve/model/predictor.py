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
arguments prepared once.

Importing the xgboost package costs more cold start than anything else the inference function
does (it imports scipy.sparse, about half a second on the bench machine), and serving needs only
libxgboost. So :meth:`Predictor.load` first loads the model through libxgboost's C API alone
(:class:`NativeBooster`: the library found where the package keeps it, the package not
imported), and serves through it only when it answered the rows the refresh sandbox predicted
(``manifest.smoke_check``, recorded with ``inplace_predict``) bit for bit. Anything else takes the
package's Booster: a manifest without that record, categorical features, an XGBoost major the C
signatures were not written against, a disagreement. A native predictor also explains through
the C API (``XGBoosterPredictFromDMatrix`` with TreeSHAP on the same handle, as
``Booster.predict(pred_contribs=True)`` calls it) and keeps no copy of the model's bytes: the
function holds one model, whichever routes it serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from treeserve.errors import ExplainUnavailable, ModelLoadError
from treeserve.model import decision
from treeserve.model.manifest import ModelManifest

if TYPE_CHECKING:
    import xgboost as xgb

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


def _contribs_args(iteration_range: tuple[int, int]) -> bytes:
    """``Booster.predict(pred_contribs=True)``'s arguments: exact TreeSHAP, the model's rounds."""
    return json.dumps(
        {
            "type": 2,
            "training": False,
            "iteration_begin": iteration_range[0],
            "iteration_end": iteration_range[1],
            "strict_shape": False,
        }
    ).encode()


_INTERFACE = (
    b'{"data": [%d, true], "shape": [%d, %d], "strides": null, "typestr": "<f4", "version": 3}'
)


def _copied(shape: Any, dims: Any, out: Any) -> np.ndarray:
    """A prediction call's output as an array of its own: the output lives in XGBoost's
    per-thread buffer only until this thread's next call."""
    sizes = [int(shape[i]) for i in range(dims.value)]
    count = math.prod(sizes)
    result = np.empty(count, dtype=np.float32)
    if count:
        ctypes.memmove(result.ctypes.data, out, count * 4)
    return result.reshape(sizes)


def _package() -> Any:
    """The xgboost package, imported on first need (see the module docstring)."""
    import xgboost  # noqa: PLC0415

    return xgboost


class DenseCall:
    """``XGBoosterPredictFromDense`` for one booster, as ``inplace_predict`` calls it."""

    def __init__(self, booster: xgb.Booster, iteration_range: tuple[int, int] = (0, 0)) -> None:
        core = _package().core
        self._setup(booster, booster.handle, core._LIB.XGBoosterPredictFromDense, core._check_call)
        self._args = _predict_args(iteration_range)

    @classmethod
    def native(cls, booster: NativeBooster, iteration_range: tuple[int, int] = (0, 0)) -> DenseCall:
        """The same call on a booster loaded through the C API alone."""
        call = cls.__new__(cls)
        call._setup(booster, booster.handle, booster.lib.XGBoosterPredictFromDense, booster.check)
        call._args = _predict_args(iteration_range)
        return call

    def _setup(
        self, owner: object, handle: Any, function: Any, check: Callable[[int], None]
    ) -> None:
        self._owner = owner  # keeps the handle alive
        self._handle = handle
        self._function = function
        self._check = check
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
        xgb = _package()
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
        return _copied(shape, dims, out)


# --- libxgboost without the package ------------------------------------------------------------

_LIBRARY_NAMES = {"linux": "libxgboost.so", "darwin": "libxgboost.dylib", "win32": "xgboost.dll"}


class NativeError(RuntimeError):
    """libxgboost answered an error (its own message)."""


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """libxgboost, loaded from where the xgboost package keeps it without importing the package
    (``find_spec`` only locates it); None when it is not there or of an XGBoost major the C
    signatures here were not written against. The package, imported later, loads the same
    library (the same handle: boosters of either are interchangeable)."""
    spec = importlib.util.find_spec("xgboost")
    name = _LIBRARY_NAMES.get(sys.platform)
    if spec is None or not spec.submodule_search_locations or name is None:
        return None
    found = [Path(p) / "lib" / name for p in spec.submodule_search_locations]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        lib.XGBGetLastError.restype = ctypes.c_char_p
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.XGBoostVersion(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    except (OSError, AttributeError) as exc:
        logger.info("libxgboost not loaded on its own (%s): the xgboost package serves", exc)
        return None
    if str(major.value) not in SUPPORTED_XGBOOST_MAJORS:
        logger.info("libxgboost %d.%d: the xgboost package serves", major.value, minor.value)
        return None
    return lib


class NativeBooster:
    """A booster created and loaded through libxgboost's C API: one thread, freed with it."""

    def __init__(self, lib: ctypes.CDLL, model: bytes) -> None:
        self.lib = lib
        self.handle = ctypes.c_void_p()
        self.check(lib.XGBoosterCreate(None, ctypes.c_uint64(0), ctypes.byref(self.handle)))
        self.check(
            lib.XGBoosterLoadModelFromBuffer(
                self.handle, ctypes.c_char_p(model), ctypes.c_uint64(len(model))
            )
        )
        # Loading may restore saved parameters; one thread per prediction on Lambda.
        self.check(lib.XGBoosterSetParam(self.handle, b"nthread", b"1"))

    def check(self, status: int) -> None:
        if status != 0:
            message = self.lib.XGBGetLastError() or b"unknown error"
            raise NativeError(message.decode("utf-8", "replace"))

    def num_features(self) -> int:
        out = ctypes.c_uint64()
        self.check(self.lib.XGBoosterGetNumFeature(self.handle, ctypes.byref(out)))
        return int(out.value)

    def save_config(self) -> str:
        """The booster's JSON configuration (``Booster.save_config``)."""
        length = ctypes.c_uint64()
        out = ctypes.c_char_p()
        self.check(
            self.lib.XGBoosterSaveJsonConfig(self.handle, ctypes.byref(length), ctypes.byref(out))
        )
        return (out.value or b"").decode()

    def contribs(self, X: np.ndarray, iteration_range: tuple[int, int]) -> np.ndarray:
        """TreeSHAP contributions of the rows (float32 (n, d + 1), or (n, k, d + 1)), as
        ``Booster.predict(DMatrix(X), pred_contribs=True)`` computes them: a DMatrix from the
        dense rows (NaN missing, one thread), ``XGBoosterPredictFromDMatrix`` with type 2."""
        rows = np.ascontiguousarray(X, dtype=np.float32)
        n, d = rows.shape
        dmatrix = ctypes.c_void_p()
        self.check(
            self.lib.XGDMatrixCreateFromDense(
                _INTERFACE % (rows.ctypes.data, n, d),
                b'{"missing": NaN, "nthread": 1}',
                ctypes.byref(dmatrix),
            )
        )
        try:
            shape = ctypes.POINTER(ctypes.c_uint64)()
            dims = ctypes.c_uint64()
            out = ctypes.POINTER(ctypes.c_float)()
            self.check(
                self.lib.XGBoosterPredictFromDMatrix(
                    self.handle,
                    dmatrix,
                    _contribs_args(iteration_range),
                    ctypes.byref(shape),
                    ctypes.byref(dims),
                    ctypes.byref(out),
                )
            )
            return _copied(shape, dims, out)
        finally:
            self.lib.XGDMatrixFree(dmatrix)

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and handle.value:
            self.lib.XGBoosterFree(handle)


def _package_booster(model_ubj: bytes) -> xgb.Booster:
    package = _package()
    try:
        booster: xgb.Booster = package.Booster(params={"nthread": 1})
        booster.load_model(bytearray(model_ubj))
        # Loading may restore saved parameters; one thread per prediction on Lambda.
        booster.set_param({"nthread": 1})
    except (package.core.XGBoostError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"XGBoost cannot load the model: {exc}") from None
    return booster


class Predictor:
    """A model version in memory. Build it with :meth:`load`; thread-safe for prediction."""

    def __init__(
        self,
        booster: xgb.Booster | None,
        manifest: ModelManifest,
        *,
        model: bytes | None = None,
    ) -> None:
        if booster is None and model is None:
            raise ValueError("a Predictor needs a Booster or the model's bytes")
        self._booster = booster
        self._model = model  # for the package's Booster, loaded on first need
        self._booster_lock = threading.Lock()
        self.native = False  # serving through a NativeBooster (see the module docstring)
        self._native: NativeBooster | None = None
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
        if len(manifest.feature_names) != manifest.num_features:
            raise ModelLoadError(
                f"manifest lists {len(manifest.feature_names)} feature names for "
                f"{manifest.num_features} features"
            )
        predictor = cls._load_native(model_ubj, manifest)
        if predictor is None:
            booster = _package_booster(model_ubj)
            if booster.num_features() != manifest.num_features:
                raise ModelLoadError(
                    f"model has {booster.num_features()} features, manifest says "
                    f"{manifest.num_features}"
                )
            predictor = cls(booster, manifest)
        predictor.smoke()
        return predictor

    @classmethod
    def _load_native(cls, model_ubj: bytes, manifest: ModelManifest) -> Predictor | None:
        """A predictor on a :class:`NativeBooster` that answers the manifest's recorded smoke
        rows bit for bit, or None (the package's Booster serves then)."""
        record = manifest.smoke_check
        if not record or "c" in manifest.feature_types:
            return None
        lib = native_library()
        if lib is None:
            return None
        try:
            native = NativeBooster(lib, model_ubj)
            if native.num_features() != manifest.num_features:
                return None  # the package's load names the disagreement
            predictor = cls(None, manifest, model=model_ubj)
            predictor._native = native
            dense = DenseCall.native(native, predictor.iteration_range)
            rows = np.asarray(record["rows"], dtype=np.float64).astype(np.float32)
            expected = np.asarray(record["predictions"], dtype=np.float32)
            got = dense(np.ascontiguousarray(rows))
        except (NativeError, KeyError, TypeError, ValueError) as exc:
            logger.info("model not loaded through the C API alone (%s); the package serves", exc)
            return None
        if got.shape != expected.shape or not np.array_equal(got, expected, equal_nan=True):
            logger.warning("the C API's predictions differ from the recorded ones; not used")
            return None
        predictor._dense = dense
        predictor.native = True
        # Predictions and explanations both run on the native booster: nothing else needs the
        # bytes, and one copy of the model is all the function holds.
        predictor._model = None
        return predictor

    @property
    def booster(self) -> xgb.Booster:
        """The xgboost package's Booster (loaded from the model's bytes on first need)."""
        if self._booster is None:
            with self._booster_lock:
                if self._booster is None:
                    if self._model is None:  # a native predictor keeps no bytes
                        raise ModelLoadError("this model is served through the C API alone")
                    self._booster = _package_booster(self._model)
        return self._booster

    def save_config(self) -> str:
        """The serving booster's JSON configuration (native or the package's)."""
        if self._native is not None:
            return self._native.save_config()
        return str(self.booster.save_config())

    def smoke(self) -> None:
        """Predict a row of zeros and a row of missing values; outputs must be finite.

        Also decides whether the direct C call serves (see :class:`DenseCall`), when the
        recorded smoke rows did not already."""
        rows = np.zeros((2, self.num_features), dtype=np.float32)
        rows[1, :] = np.nan
        if not self.native:
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
        if dense is not None and X.ndim == 2:
            if X.dtype == np.float32 and X.flags.c_contiguous:
                return dense(X)
            if self.native:  # XGBoost reads any float matrix as float32, as this does
                return dense(np.ascontiguousarray(X, dtype=np.float32))
        if self.native:
            assert dense is not None  # noqa: S101 -- set with native
            return dense(np.ascontiguousarray(np.atleast_2d(X), dtype=np.float32))
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
        if self._native is not None:
            contribs = self._native.contribs(X, self.iteration_range)
        else:
            dmatrix = _package().DMatrix(
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
