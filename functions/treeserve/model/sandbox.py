"""Load untrusted model bytes in a child process, never in the caller's.

XGBoost's model loader is not hardened: an empty buffer aborts the process (xgboost-cpu 3.2) and
crafted files can crash it or make it allocate without bound. :func:`inspect_model` therefore
runs the load in a child Python (``sys.executable -I -S -B``: no PYTHON* variables, no site hooks,
no bytecode written) with an address-space and CPU limit, no core dumps, no file writes and no AWS
credentials in its environment. The child loads the model, reads its facts, re-saves it as UBJ
(the registry always stores UBJ) and predicts on the given rows (or on a small synthetic sample),
then answers over stdout.

Protocol (both directions): a frame is a 4-byte big-endian length and a JSON header, followed
by the raw blobs whose sizes the header gives. The parent's first frame is its ``sys.path`` (in
Lambda ``/var/task`` is on the path through a mechanism ``-I`` does not keep); the child imports
only from that list, so it sees exactly the parent's modules. The second frame is the request.
The rows to predict on travel as their raw float64 buffer (shape in the header; the child
uses it in place), the child's arrays as ``.npy`` bytes read back with ``allow_pickle=False``.

This module also holds :func:`decode_ubj` and :func:`model_facts`, a small pure-Python reader
of XGBoost's UBJSON/JSON model documents: the parent uses it for cheap structural checks before
a child is spawned, the child to read the facts of the model it re-saved.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Literal

import numpy as np

from treeserve.errors import TreeserveError, UploadRejected

ModelFormat = Literal["ubj", "json"]

DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_MEMORY_BYTES = 2 << 30
# Starting the child (Python + numpy + xgboost imports) is not the model's time: it gets its own
# allowance, and the load timeout starts once the child says it is ready.
STARTUP_TIMEOUT_SECONDS = 30.0
MAX_UBJ_DEPTH = 64
# TreeSHAP (``/explain``) keeps a path buffer of about 8 * depth**2 bytes per thread: 8 MB at
# this depth (measured: 115 MB at 4,000, 1.2 GB at 12,000). Trained trees are a few dozen deep.
MAX_TREE_DEPTH = 1000
# XGBoost stores a categorical split as the set of its category codes and allocates a bitset up
# to the largest code at load: a code of 2**30 costs 128 MB per split. Real codes are indices
# into the training data's categories (pandas codes), far below this bound.
MAX_CATEGORY = 1 << 16
# How much of the child's stderr a rejection message quotes (XGBoost's own error line).
_STDERR_TAIL = 400
_RESAVE_HINT = (
    "re-save it with Booster.save_model('model.ubj') (xgboost >= 2.0) and upload that file"
)

_BOOTSTRAP = (
    "import sys,json,struct\n"
    "n=struct.unpack('>I',sys.stdin.buffer.read(4))[0]\n"
    "setup=json.loads(sys.stdin.buffer.read(n))\n"
    "sys.path[:]=setup['sys_path']\n"
    "from treeserve.model.sandbox import _child_main\n"
    "sys.exit(_child_main(setup))\n"
)


class UnsafeModel(ValueError):
    """A well-formed model that production cannot serve safely; ``code`` is the refusal code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SandboxUnavailable(TreeserveError):
    """The child process could not start (environment, memory limit): not the model's fault.

    Let it propagate so the invocation fails and is retried; never record it as a rejection.
    """


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model, as XGBoost (in the child) sees them."""

    objective: str
    num_class: int  # 0 for binary/regression, k for multi:* objectives
    num_target: int
    num_features: int
    num_trees: int
    booster: str  # gbtree, dart or gblinear
    feature_names: list[str] | None
    feature_types: list[str] | None
    base_score: list[float]
    xgboost_version: str  # the XGBoost that re-saved model_ubj
    saved_with: str | None  # the XGBoost version recorded in the uploaded file
    # [begin, end) in boosting rounds that the model's own predict uses (early stopping's
    # best_iteration + 1), or None for every round.
    iteration_range: list[int] | None = None
    outputs: list[str] | None = None  # what each of several outputs is (quantile alphas)
    vector_leaf: bool = False  # multi_output_tree: XGBoost has no TreeSHAP for these trees
    # feature name -> training categories in code order (XGBoost >= 3.1 stores them)
    categories: dict[str, list[Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SandboxResult:
    """What the child answered: the facts, the canonical UBJ bytes, the smoke predictions."""

    info: ModelInfo
    model_ubj: bytes
    rows: np.ndarray  # the rows predicted on (the given rows or the synthetic sample)
    predictions: np.ndarray  # output_margin=False
    synthetic: bool  # True when no rows were given and the child made its own sample
    # What loading cost the child (see :func:`_memory`): ``baseline_bytes`` (RSS before the load),
    # ``load_peak_bytes`` and ``loaded_bytes`` (peak and retained RSS growth of the load),
    # ``explain_peak_bytes`` (peak RSS growth over the loaded model of explaining one row; None
    # when XGBoost cannot explain it), ``load_seconds``, ``child_peak_bytes`` (the child's peak
    # RSS, imports included). Only ``load_seconds`` where /proc is not available.
    footprint: dict[str, Any] = field(default_factory=dict)


# --- UBJSON reader -----------------------------------------------------------------------------

_INTS: dict[int, struct.Struct] = {
    ord("i"): struct.Struct(">b"),
    ord("U"): struct.Struct(">B"),
    ord("I"): struct.Struct(">h"),
    ord("l"): struct.Struct(">i"),
    ord("L"): struct.Struct(">q"),
}
_FLOATS: dict[int, struct.Struct] = {ord("d"): struct.Struct(">f"), ord("D"): struct.Struct(">d")}
_NUMPY: dict[int, np.dtype[Any]] = {
    ord("i"): np.dtype("i1"),
    ord("U"): np.dtype("u1"),
    ord("I"): np.dtype(">i2"),
    ord("l"): np.dtype(">i4"),
    ord("L"): np.dtype(">i8"),
    ord("d"): np.dtype(">f4"),
    ord("D"): np.dtype(">f8"),
}
# Elements of these types take no bytes; cap their count so a tiny file cannot ask for a huge list.
_EMPTY_TYPES = frozenset(b"ZTFN")
_MAX_EMPTY_COUNT = 1 << 16
_OBJ, _ARR, _END_OBJ, _END_ARR, _TYPE, _COUNT = (ord(c) for c in "{[}]$#")
_STR, _HIGH, _CHAR, _NULL, _TRUE, _FALSE, _NOOP = (ord(c) for c in "SHCZTFN")


class UBJDecodeError(ValueError):
    """The bytes are not one well-formed UBJSON document."""


class _UBJReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0

    def byte(self) -> int:
        pos = self.pos
        if pos >= self.size:
            raise UBJDecodeError(f"truncated at byte {pos}")
        self.pos = pos + 1
        return self.data[pos]

    def unpack(self, st: struct.Struct) -> Any:
        pos = self.pos
        end = pos + st.size
        if end > self.size:
            raise UBJDecodeError(f"truncated at byte {pos} (wants {st.size} more bytes)")
        self.pos = end
        return st.unpack_from(self.data, pos)[0]

    def integer(self, marker: int) -> int:
        st = _INTS.get(marker)
        if st is None:
            raise UBJDecodeError(f"expected an integer marker at byte {self.pos - 1}")
        value: int = self.unpack(st)
        return value

    def count(self) -> int:
        n = self.integer(self.byte())
        if n < 0:
            raise UBJDecodeError(f"negative length at byte {self.pos}")
        return n

    def string(self) -> str:
        n = self.count()
        pos = self.pos
        if pos + n > self.size:
            raise UBJDecodeError(f"truncated at byte {pos} (a string of {n} bytes)")
        self.pos = pos + n
        try:
            return self.data[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise UBJDecodeError(f"invalid UTF-8 string at byte {pos}") from None

    def value(self, marker: int, depth: int) -> Any:
        while marker == _NOOP:
            marker = self.byte()
        st = _INTS.get(marker) or _FLOATS.get(marker)
        if st is not None:
            return self.unpack(st)
        if marker == _OBJ:
            return self.container(depth + 1, is_object=True)
        if marker == _ARR:
            return self.container(depth + 1, is_object=False)
        if marker in (_STR, _HIGH):
            return self.string()
        if marker == _NULL:
            return None
        if marker == _TRUE:
            return True
        if marker == _FALSE:
            return False
        if marker == _CHAR:
            return chr(self.byte())
        raise UBJDecodeError(f"unknown marker {marker:#04x} at byte {self.pos - 1}")

    def container(self, depth: int, *, is_object: bool) -> Any:
        if depth > MAX_UBJ_DEPTH:
            raise UBJDecodeError(f"nesting deeper than {MAX_UBJ_DEPTH}")
        data = self.data
        elem_type: int | None = None
        count: int | None = None
        if self.pos < self.size and data[self.pos] == _TYPE:
            self.pos += 1
            elem_type = self.byte()
            if self.byte() != _COUNT:
                raise UBJDecodeError(f"typed container without a count at byte {self.pos - 1}")
            count = self.count()
        elif self.pos < self.size and data[self.pos] == _COUNT:
            self.pos += 1
            count = self.count()
        if count is not None:
            remaining = self.size - self.pos
            if elem_type in _EMPTY_TYPES:
                if count > _MAX_EMPTY_COUNT:
                    raise UBJDecodeError(f"implausible element count {count}")
            elif count > remaining:
                raise UBJDecodeError(f"truncated: {count} elements but {remaining} bytes left")
        if not is_object and count is not None and elem_type in _NUMPY:
            dtype = _NUMPY[elem_type]
            nbytes = count * dtype.itemsize
            if self.pos + nbytes > self.size:
                raise UBJDecodeError(f"truncated typed array at byte {self.pos}")
            array = np.frombuffer(data, dtype=dtype, count=count, offset=self.pos)  # a view
            self.pos += nbytes
            return array
        if is_object:
            obj: dict[str, Any] = {}
            seen = 0
            while True:
                if count is None:
                    if self.pos < self.size and data[self.pos] == _END_OBJ:
                        self.pos += 1
                        return obj
                elif seen >= count:
                    return obj
                key = self.string()
                marker = elem_type if elem_type is not None else self.byte()
                obj[key] = self.value(marker, depth)
                seen += 1
        items: list[Any] = []
        while True:
            if count is None:
                marker = self.byte()
                if marker == _END_ARR:
                    return items
            elif len(items) >= count:
                return items
            else:
                marker = elem_type if elem_type is not None else self.byte()
            items.append(self.value(marker, depth))


def decode_ubj(data: bytes) -> tuple[Any, int]:
    """Decode one UBJSON value from the start of ``data``: ``(value, end offset)``.

    Typed numeric arrays become read-only numpy views (no per-element cost), so a large model
    decodes quickly. Raises :class:`UBJDecodeError` on truncation or malformed structure.
    """
    reader = _UBJReader(data)
    value = reader.value(reader.byte(), 0)
    return value, reader.pos


# --- model facts from the decoded document ----------------------------------------------------


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            raise ValueError(f"the model has no {'.'.join(path)}")
        obj = obj[key]
    return obj


def _as_int(value: Any, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise ValueError(f"{what} is not an integer: {str(value)[:40]!r}") from None


def _str_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return list(value) or None


def _base_score(value: Any, what: str = "base_score") -> list[float]:
    text = str(value).strip()
    if text.startswith("["):
        text = text[1:-1]
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what} is not numeric: {text[:40]!r}") from None


def model_trees(doc: Mapping[str, Any]) -> list[Any]:
    """The tree objects of a decoded model document (empty for gblinear)."""
    gb = _get(doc, "learner", "gradient_booster")
    name = _get(gb, "name")
    if name == "gbtree":
        trees = _get(gb, "model", "trees")
    elif name == "dart":
        trees = _get(gb, "gbtree", "model", "trees")
    elif name == "gblinear":
        return []
    else:
        raise ValueError(f"unknown booster {str(name)[:40]!r}")
    if not isinstance(trees, list):
        raise ValueError("the model's trees are not a list")
    return trees


def model_facts(doc: Any) -> dict[str, Any]:
    """Objective, classes, features and trees of a decoded XGBoost model (UBJ or JSON).

    Raises ValueError naming the first missing or malformed field.
    """
    if not isinstance(doc, Mapping):
        raise ValueError("the document is not an object")
    learner = _get(doc, "learner")
    param = _get(learner, "learner_model_param")
    version = doc.get("version")
    saved_with = (
        ".".join(str(int(v)) for v in version)
        if isinstance(version, list | np.ndarray) and len(version) == 3
        else None
    )
    return {
        "objective": str(_get(learner, "objective", "name")),
        "num_class": _as_int(param.get("num_class", 0), "num_class"),
        "num_target": _as_int(param.get("num_target", 1), "num_target"),
        "num_features": _as_int(_get(param, "num_feature"), "num_feature"),
        "num_trees": len(model_trees(doc)),
        "booster": str(_get(learner, "gradient_booster", "name")),
        "feature_names": _str_list(learner.get("feature_names"), "feature_names"),
        "feature_types": _str_list(learner.get("feature_types"), "feature_types"),
        "base_score": _base_score(param.get("base_score", "0")),
        "saved_with": saved_with,
        "iteration_range": _iteration_range(learner.get("attributes")),
        "vector_leaf": any(
            isinstance(t, Mapping) and vector_leaf_size(t) > 1 for t in model_trees(doc)
        ),
        "outputs": _output_names(learner),
        "categories": model_categories(doc),
    }


def _iteration_range(attributes: Any) -> list[int] | None:
    """``[0, best_iteration + 1)`` when early stopping recorded a best iteration, else None.

    The scikit-learn wrapper (and a wrapper re-loaded from the file) predicts with exactly this
    range; the Booster alone would use every round."""
    if not isinstance(attributes, Mapping) or attributes.get("best_iteration") is None:
        return None
    best = _as_int(attributes["best_iteration"], "best_iteration")
    if best < 0:
        raise ValueError(f"best_iteration is negative ({best})")
    return [0, best + 1]


def _output_names(learner: Mapping[str, Any]) -> list[str] | None:
    """Names of the outputs of a multi-quantile model (``alpha=0.1``, ...), else None."""
    objective = learner.get("objective")
    if not isinstance(objective, Mapping) or objective.get("name") != "reg:quantileerror":
        return None
    param = objective.get("quantile_loss_param")
    alphas = (
        _base_score(param.get("quantile_alpha", ""), "quantile_alpha")
        if isinstance(param, Mapping)
        else []
    )
    return [f"quantile_{a:g}" for a in alphas] if len(alphas) > 1 else None


# XGBoost's array-interface type codes of signed integer category arrays (int8..int64).
_INT_CATEGORY_TYPES = frozenset({9, 11, 13, 15})


def model_categories(doc: Mapping[str, Any]) -> dict[str, list[Any]] | None:
    """The training categories XGBoost (>= 3.1) stores in the model: name -> values, code order.

    ``gradient_booster.model.cats.enc`` has one entry per feature: strings as UTF-8 bytes
    (``values``) cut by ``offsets``, or integers (``type`` + ``values``); numeric features and
    models trained without a DataFrame have empty entries. None when no feature has categories.
    """
    learner = _get(doc, "learner")
    gb = _get(learner, "gradient_booster")
    model = gb.get("gbtree", gb).get("model", {}) if isinstance(gb, Mapping) else {}
    cats = model.get("cats") if isinstance(model, Mapping) else None
    if not isinstance(cats, Mapping) or not isinstance(cats.get("enc"), list):
        return None
    names = _str_list(learner.get("feature_names"), "feature_names")
    out: dict[str, list[Any]] = {}
    for j, entry in enumerate(cats["enc"]):
        values = _category_values(entry, j)
        if values:
            name = names[j] if names is not None and j < len(names) else f"f{j}"
            if len(set(values)) != len(values):
                raise ValueError(f"feature {name!r}: the stored categories repeat a value")
            out[name] = values
    return out or None


def _category_values(entry: Any, j: int) -> list[Any]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"cats.enc[{j}] is not an object")
    values = np.asarray(entry.get("values", []))
    if "offsets" in entry:
        offsets = np.asarray(entry["offsets"], dtype=np.int64)
        if values.size == 0 and offsets.size <= 1:
            return []
        if (
            offsets.size < 2
            or offsets[0] != 0
            or offsets[-1] != values.size
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError(f"cats.enc[{j}]: offsets do not cut the category bytes")
        raw = values.astype(np.uint8).tobytes()
        try:
            return [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets.tolist())]
        except UnicodeDecodeError:
            raise ValueError(f"cats.enc[{j}]: a category is not UTF-8") from None
    if values.size == 0:
        return []
    if entry.get("type") not in _INT_CATEGORY_TYPES or values.dtype.kind not in "iu":
        raise ValueError(f"cats.enc[{j}]: categories of an unsupported type")
    return [int(v) for v in values]


def category_codes_used(doc: Any) -> dict[int, int]:
    """Feature index -> the highest category code any categorical split of the model names.

    Call after :func:`check_trees` (which proved the category arrays in bounds).
    """
    used: dict[int, int] = {}
    for i, tree in enumerate(model_trees(doc)):
        nodes = _int_array(tree, "categories_nodes", i) if "categories_nodes" in tree else None
        if nodes is None or not nodes.size:
            continue
        idx = _int_array(tree, "split_indices", i)
        cats = np.atleast_1d(np.asarray(_get(tree, "categories"), dtype=np.int64))
        start = _int_array(tree, "categories_segments", i)
        size = _int_array(tree, "categories_sizes", i)
        for node, a, k in zip(nodes, start, size, strict=True):
            if k:
                f = int(idx[node])
                used[f] = max(used.get(f, -1), int(cats[a : a + k].max()))
    return used


def _int_array(tree: Mapping[str, Any], key: str, i: int) -> np.ndarray:
    try:
        return np.asarray(_get(tree, key), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"tree {i}: {key} is not an integer array") from None


def check_trees(doc: Any, num_features: int, num_groups: int) -> int:
    """Refuse trees whose indices point outside their arrays or the features; return the depth
    of the deepest tree (root = 0; 0 without trees).

    XGBoost trusts these indices: a crafted split index or child id makes it read out of bounds
    (a segfault in xgboost-cpu 3.2), possibly only for some inputs, so a model that survived the
    smoke test could still crash the serving process later. Raises ValueError naming the defect,
    or :class:`UnsafeModel` for a valid model production cannot serve: non-finite values
    (``non_finite``), trees deeper than :data:`MAX_TREE_DEPTH` (``too_deep``), category codes
    outside ``0..MAX_CATEGORY-1`` (``bad_category``).
    """
    trees = model_trees(doc)
    deepest = 0
    _check_base_score(doc)
    gb = _get(doc, "learner", "gradient_booster")
    model = gb.get("model") if gb.get("name") != "dart" else gb.get("gbtree", {}).get("model")
    if isinstance(model, Mapping) and len(trees):
        info = model.get("tree_info")
        if info is not None:
            groups = np.asarray(info, dtype=np.int64)
            if groups.shape != (len(trees),):
                raise ValueError(f"tree_info has {groups.size} entries for {len(trees)} trees")
            if groups.size and (groups.min() < 0 or groups.max() >= max(1, num_groups)):
                raise ValueError("tree_info assigns a tree to an output that does not exist")
    for i, tree in enumerate(trees):
        if not isinstance(tree, Mapping):
            raise ValueError(f"tree {i} is not an object")
        left = _int_array(tree, "left_children", i)
        right = _int_array(tree, "right_children", i)
        index = _int_array(tree, "split_indices", i)
        n = len(left)
        param = tree.get("tree_param")
        if (
            isinstance(param, Mapping)
            and "num_nodes" in param
            and _as_int(param["num_nodes"], "num_nodes") != n
        ):
            raise ValueError(f"tree {i}: num_nodes disagrees with its arrays")
        if n == 0 or len(right) != n or len(index) != n:
            raise ValueError(f"tree {i}: node arrays are empty or differ in length")
        for key in ("parents", "split_conditions", "default_left", "split_type"):
            if key in tree and len(np.atleast_1d(np.asarray(tree[key]))) != n:
                raise ValueError(f"tree {i}: {key} has the wrong length")
        leaf = left == -1
        if vector_leaf_size(tree) > 1:
            right = _check_vector_leaves(tree, i, leaf, right, num_groups)
        if ((right == -1) != leaf).any():
            raise ValueError(f"tree {i}: a node has only one child")
        inner = ~leaf
        kids = np.concatenate([left[inner], right[inner]])
        if kids.size and (kids.min() < 1 or kids.max() >= n):
            raise ValueError(f"tree {i}: a child id points outside the tree")
        if (np.bincount(kids, minlength=n) > 1).any():
            raise ValueError(f"tree {i}: a node has two parents")  # cycles and shared nodes
        split_on = index[inner]
        if split_on.size and (split_on.min() < 0 or split_on.max() >= num_features):
            bad = int(split_on[(split_on < 0) | (split_on >= num_features)][0])
            raise ValueError(
                f"tree {i} splits on feature {bad} but the model has {num_features} features"
            )
        _check_values(tree, i, leaf)
        deepest = max(deepest, _check_depth(left, right, i))
        if "split_type" in tree:
            kind = _int_array(tree, "split_type", i)
            categorical = np.flatnonzero(inner & (kind == 1))
            if categorical.size:
                _check_categories(tree, i, categorical, n)
    return deepest


def vector_leaf_size(tree: Mapping[str, Any]) -> int:
    """A tree's ``size_leaf_vector``: above 1 for ``multi_strategy="multi_output_tree"``."""
    param = tree.get("tree_param")
    if not isinstance(param, Mapping) or "size_leaf_vector" not in param:
        return 1
    return _as_int(param["size_leaf_vector"], "size_leaf_vector")


def _check_vector_leaves(
    tree: Mapping[str, Any], i: int, leaf: np.ndarray, right: np.ndarray, num_groups: int
) -> np.ndarray:
    """Check a vector-leaf tree's leaves; return ``right`` with its leaves' slots set to -1.

    In these trees a leaf's right-child slot holds the index of its vector in ``leaf_weights``
    (``size_leaf_vector`` values per leaf, one per output), so it must point inside that array.
    """
    size = vector_leaf_size(tree)
    if size != num_groups:
        raise ValueError(
            f"tree {i}: leaf vectors of {size} values for a model with {num_groups} outputs"
        )
    weights = len(np.atleast_1d(np.asarray(_get(tree, "leaf_weights"))))
    if weights % size:
        raise ValueError(f"tree {i}: leaf_weights is not a whole number of leaf vectors")
    if "base_weights" in tree and len(np.atleast_1d(np.asarray(tree["base_weights"]))) != (
        len(leaf) * size
    ):
        raise ValueError(f"tree {i}: base_weights has the wrong length")
    slots = right[leaf]
    if slots.size and (slots.min() < 0 or slots.max() >= weights // size):
        raise ValueError(f"tree {i}: a leaf points outside leaf_weights")
    out = right.copy()
    out[leaf] = -1
    return out


def _check_base_score(doc: Any) -> None:
    param = _get(doc, "learner", "learner_model_param")
    score = _base_score(param.get("base_score", "0"))
    if not all(math.isfinite(v) for v in score):
        raise UnsafeModel(
            "non_finite", f"base_score is {score} (not finite): retrain or re-save the model"
        )


def _check_values(tree: Mapping[str, Any], i: int, leaf: np.ndarray) -> None:
    """Leaf values and split conditions must be finite: a NaN leaf reached only by inputs the
    smoke rows never send would answer ``null`` in production."""
    try:
        cond = np.asarray(_get(tree, "split_conditions"), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"tree {i}: split_conditions is not a number array") from None
    bad = ~np.isfinite(cond)
    if bad.any():
        node = int(np.flatnonzero(bad)[0])
        what = "leaf value" if leaf[node] else "split condition"
        raise UnsafeModel(
            "non_finite",
            f"tree {i} node {node}: its {what} is {cond[node]} (not finite), so some inputs "
            "would be answered NaN: retrain the model (check the training labels and weights)",
        )
    weights = tree.get("base_weights")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape == leaf.shape and not np.isfinite(w[leaf]).all():
            raise UnsafeModel(
                "non_finite", f"tree {i}: a leaf weight is not finite: retrain the model"
            )


def tree_depth(left: np.ndarray, right: np.ndarray, limit: int) -> int:
    """The tree's depth (root = 0), counting at most ``limit + 1`` levels."""
    frontier = np.zeros(1, dtype=np.int64)
    depth = 0
    while depth <= limit:
        inner = frontier[left[frontier] != -1]
        if not inner.size:
            return depth
        frontier = np.concatenate([left[inner], right[inner]])
        depth += 1
    return depth


def _check_depth(left: np.ndarray, right: np.ndarray, i: int) -> int:
    depth = tree_depth(left, right, MAX_TREE_DEPTH)
    if depth > MAX_TREE_DEPTH:
        raise UnsafeModel(
            "too_deep",
            f"tree {i} is more than {MAX_TREE_DEPTH} levels deep: explaining one row with it "
            f"would need about {8 * depth * depth >> 20} MiB or more; retrain with max_depth "
            f"<= {MAX_TREE_DEPTH}",
        )
    return depth


def _check_categories(tree: Mapping[str, Any], i: int, nodes: np.ndarray, n: int) -> None:
    values = np.atleast_1d(np.asarray(_get(tree, "categories"), dtype=np.int64))
    cats = len(values)
    if cats and (values.min() < 0 or values.max() >= MAX_CATEGORY):
        bad = int(values[(values < 0) | (values >= MAX_CATEGORY)][0])
        raise UnsafeModel(
            "bad_category",
            f"tree {i}: a categorical split names category {bad}, outside 0..{MAX_CATEGORY - 1}; "
            "encode categories as codes 0..k-1 (pandas category dtype) and retrain",
        )
    where = _int_array(tree, "categories_nodes", i)
    start = _int_array(tree, "categories_segments", i)
    size = _int_array(tree, "categories_sizes", i)
    if not (len(where) == len(start) == len(size)):
        raise ValueError(f"tree {i}: category arrays differ in length")
    if where.size and (where.min() < 0 or where.max() >= n):
        raise ValueError(f"tree {i}: a categorical split names a node outside the tree")
    if start.size and ((start < 0).any() or (size < 0).any() or (start + size > cats).any()):
        raise ValueError(f"tree {i}: a categorical split points outside its category list")
    if not np.isin(nodes, where).all():
        raise ValueError(f"tree {i}: a categorical split has no categories")


def split_features(doc: Any, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks over the features: split numerically, split by category."""
    numeric = np.zeros(num_features, dtype=bool)
    categorical = np.zeros(num_features, dtype=bool)
    for tree in model_trees(doc):
        left = np.asarray(_get(tree, "left_children"), dtype=np.int64)
        idx = np.asarray(_get(tree, "split_indices"), dtype=np.int64)
        kind = np.asarray(tree.get("split_type", np.zeros_like(left)), dtype=np.int64)
        inner = (left != -1) & (idx >= 0) & (idx < num_features)
        numeric[idx[inner & (kind == 0)]] = True
        categorical[idx[inner & (kind == 1)]] = True
    return numeric, categorical


def split_thresholds(doc: Any, num_features: int) -> list[np.ndarray]:
    """Per feature, the sorted numeric split thresholds used by the model's trees."""
    feats: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for tree in model_trees(doc):
        left = np.asarray(_get(tree, "left_children"), dtype=np.int64)
        idx = np.asarray(_get(tree, "split_indices"), dtype=np.int64)
        cond = np.asarray(_get(tree, "split_conditions"), dtype=np.float64)
        kind = np.asarray(tree.get("split_type", np.zeros_like(left)), dtype=np.int64)
        if not (len(left) == len(idx) == len(cond) == len(kind)):
            raise ValueError("a tree's node arrays differ in length")
        inner = (left != -1) & (kind == 0) & (idx >= 0) & (idx < num_features)
        feats.append(idx[inner])
        values.append(cond[inner])
    out: list[np.ndarray] = [np.empty(0) for _ in range(num_features)]
    if feats:
        f = np.concatenate(feats)
        v = np.concatenate(values)
        keep = np.isfinite(v)
        f, v = f[keep], v[keep]
        order = np.lexsort((v, f))
        f, v = f[order], v[order]
        bounds = np.searchsorted(f, np.arange(num_features + 1))
        for j in range(num_features):
            out[j] = v[bounds[j] : bounds[j + 1]]
    return out


SYNTHETIC_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_rows(thresholds: list[np.ndarray]) -> np.ndarray:
    """A small deterministic sample that exercises the model's splits.

    One row of zeros, one all-missing row, and for each quantile of each feature's split
    thresholds a row just below and a row just above it (zeros where a feature has no split).
    """
    n = len(thresholds)
    rows = [np.zeros(n), np.full(n, np.nan)]
    for q in SYNTHETIC_QUANTILES:
        point = np.array([float(np.quantile(t, q)) if len(t) else 0.0 for t in thresholds])
        eps = 1e-3 * (np.abs(point) + 1.0)
        rows.append(point - eps)
        rows.append(point + eps)
    return np.vstack(rows).astype(np.float64) if n else np.zeros((len(rows), 0))


# --- framing -----------------------------------------------------------------------------------


def _write_frame(out: IO[bytes], header: dict[str, Any], *blobs: bytes | memoryview) -> None:
    head = json.dumps(header).encode()
    out.write(struct.pack(">I", len(head)))
    out.write(head)
    for blob in blobs:
        out.write(blob)
    out.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError(f"stream ended {left} bytes early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_buffer(stream: IO[bytes], n: int) -> bytearray:
    """Exactly ``n`` bytes, read straight into one buffer."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    done = 0
    while done < n:
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise EOFError(f"stream ended {n - done} bytes early")
        done += got
    return buffer


def _read_frame(stream: IO[bytes]) -> dict[str, Any]:
    (n,) = struct.unpack(">I", _read_exact(stream, 4))
    header: dict[str, Any] = json.loads(_read_exact(stream, n))
    return header


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(raw: bytes) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(raw), allow_pickle=False)
    return array


# --- the child -----------------------------------------------------------------------------------


def _limit_resources(memory_bytes: int, cpu_seconds: int) -> None:
    import resource  # noqa: PLC0415 - POSIX only, and only the child needs it

    limits = [
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_CORE, 0),  # an abort must not write a core file
        (resource.RLIMIT_FSIZE, 0),  # the child has no reason to write files
    ]
    for which, wanted in limits:
        _, hard = resource.getrlimit(which)
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(which, (soft, hard))


def _memory() -> tuple[int, int] | None:
    """(current, peak) RSS of this process in bytes, from /proc (Linux, as on Lambda)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith((b"VmRSS:", b"VmHWM:")):
                    key, value = line.split(b":", 1)
                    found[key.decode()] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    if "VmRSS" not in found or "VmHWM" not in found:
        return None
    return found["VmRSS"], found["VmHWM"]


def _explain_one_row(xgb: Any, booster: Any) -> bool:
    """TreeSHAP on one row of zeros, as the inference function's explain runs it (nthread=1).

    TreeSHAP's working memory depends on the trees (depth), not on the row's values. False when
    XGBoost cannot explain the model (vector-leaf trees)."""
    try:
        dmatrix = xgb.DMatrix(
            np.zeros((1, booster.num_features()), dtype=np.float32),
            feature_names=booster.feature_names,
            feature_types=booster.feature_types,
            nthread=1,
        )
        booster.predict(dmatrix, pred_contribs=True, validate_features=False)
    except (xgb.core.XGBoostError, ValueError, TypeError):
        return False
    return True


def _footprint(
    before: tuple[int, int] | None,
    loaded: tuple[int, int] | None,
    explained: tuple[int, int] | None,
    load_seconds: float,
) -> dict[str, Any]:
    """Growth figures from three (RSS, peak RSS) readings: before the load, after it, after one
    explain (None: not explainable). The peak is a high-water mark of the whole process, so the
    explain's own peak is only visible when it exceeds the load's: otherwise it is at most the
    load's (``explain_peak_bytes`` then reads 0, and the caller bounds it by the trees' depth)."""
    out: dict[str, Any] = {"load_seconds": round(load_seconds, 4)}
    if before is None or loaded is None:
        return out
    rss0, peak0 = before
    rss1, peak1 = loaded
    out["baseline_bytes"] = rss0
    out["loaded_bytes"] = max(0, rss1 - rss0)
    out["load_peak_bytes"] = max(0, peak1 - rss0) if peak1 > peak0 else out["loaded_bytes"]
    if explained is None:
        out["explain_peak_bytes"] = None
    else:
        out["explain_peak_bytes"] = max(0, explained[1] - rss1) if explained[1] > peak1 else 0
    return out


def _child_main(setup: dict[str, Any]) -> int:
    """Child entry point (after the bootstrap has set sys.path): serve one request."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if hasattr(os, "fork"):  # POSIX: resource limits are available
        _limit_resources(int(setup["memory_bytes"]), int(setup["cpu_seconds"]))

    import xgboost as xgb  # noqa: PLC0415 - imported after the limits are in place

    _write_frame(stdout, {"ready": True})  # from here on, failures are the model's
    request = _read_frame(stdin)
    raw = _read_buffer(stdin, int(request["model_size"]))
    # The rows arrive as the parent's float64 buffer and are used in place (no copies: a
    # package's samples can be hundreds of MB).
    rows_buffer = _read_buffer(stdin, int(request["rows_size"]))

    def first_line(exc: BaseException) -> str:
        # XGBoost prefixes "[hh:mm:ss] /path/file.cc:123: "; keep only what it says.
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", lines[0]) if lines else type(exc).__name__

    def fail(code: str, message: str) -> int:
        _write_frame(stdout, {"ok": False, "code": code, "message": message[:_STDERR_TAIL]})
        return 0

    try:
        before = _memory()
        started = time.perf_counter()
        booster = xgb.Booster()
        booster.load_model(raw)
        booster.set_param({"nthread": 1})
        load_seconds = time.perf_counter() - started
        loaded = _memory()
        # Measured before anything else allocates (the re-saved bytes, the decoded document),
        # so the readings are what the inference function pays: load, then explain.
        explained = _memory() if _explain_one_row(xgb, booster) else None
        footprint = _footprint(before, loaded, explained, load_seconds)
        model_ubj = bytes(booster.save_raw("ubj"))
    except xgb.core.XGBoostError as exc:
        return fail("load_failed", first_line(exc))
    del raw
    try:
        doc, end = decode_ubj(model_ubj)
        if end != len(model_ubj):
            raise ValueError("the re-saved model has trailing bytes")
        facts = model_facts(doc)
        if booster.num_features() != facts["num_features"]:
            raise ValueError("num_feature disagrees with the booster")
        iteration_range = _checked_iteration_range(booster, facts["iteration_range"])
    except ValueError as exc:
        return fail("corrupt", f"the loaded model is inconsistent: {exc}")
    synthetic = request.get("rows_shape") is None
    try:
        if synthetic:
            rows = synthetic_rows(split_thresholds(doc, facts["num_features"]))
        else:
            rows = np.frombuffer(rows_buffer, dtype=np.float64).reshape(request["rows_shape"])
        predictions = np.asarray(
            booster.inplace_predict(
                rows,
                missing=np.nan,
                validate_features=False,
                iteration_range=iteration_range,
            )
        )
    except (xgb.core.XGBoostError, ValueError) as exc:
        return fail(
            "predict_failed", f"XGBoost could not predict with the model: {first_line(exc)}"
        )
    facts["xgboost_version"] = xgb.__version__
    final = _memory()
    if final is not None:
        footprint["child_peak_bytes"] = final[1]  # the whole child's, imports included
    rows_npy = b"" if not synthetic else _npy_bytes(rows)
    pred_npy = _npy_bytes(predictions)
    header = {
        "ok": True,
        "info": facts,
        "model_size": len(model_ubj),
        "rows_size": len(rows_npy),
        "pred_size": len(pred_npy),
        "footprint": footprint,
    }
    _write_frame(stdout, header, model_ubj, rows_npy, pred_npy)
    return 0


def _checked_iteration_range(booster: Any, from_document: list[int] | None) -> tuple[int, int]:
    """The booster's own best iteration as a range; it must agree with the document's."""
    best = booster.attr("best_iteration")
    range_ = None if best is None else [0, _as_int(best, "best_iteration") + 1]
    if range_ != from_document:
        raise ValueError("best_iteration disagrees between the file and the booster")
    if range_ is None:
        return (0, 0)
    rounds = booster.num_boosted_rounds()
    if range_[1] > rounds:
        raise ValueError(
            f"best_iteration {range_[1] - 1} is beyond the model's {rounds} boosting rounds"
        )
    return (range_[0], range_[1])


# --- the parent ----------------------------------------------------------------------------------

_ENV_KEEP = ("PATH", "LD_LIBRARY_PATH", "TMPDIR", "LANG", "LC_ALL", "SYSTEMROOT")


def _child_env() -> dict[str, str]:
    # No AWS credentials or other secrets in the child that parses untrusted bytes.
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
    env["OMP_NUM_THREADS"] = "1"
    return env


class _StderrTail(threading.Thread):
    """Drains the child's stderr (a pipe, so the no-file-writes limit does not apply), keeping
    only its end: a chatty child can neither block on a full pipe nor fill our memory."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.tail = b""

    def run(self) -> None:
        while chunk := self.stream.read(4096):
            self.tail = (self.tail + chunk)[-4 * _STDERR_TAIL :]

    def last_line(self) -> str:
        text = self.tail.decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return (lines[-1] if lines else "")[-_STDERR_TAIL:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _out_of_memory(text: str) -> bool:
    return any(w in text for w in ("bad_alloc", "MemoryError", "Cannot allocate"))


def _too_big(memory_bytes: int, detail: str) -> UploadRejected:
    """A load that ran out of the child's memory: far beyond what inference can hold."""
    return UploadRejected(
        "too_big_for_inference",
        f"loading the model needs more than the {memory_bytes >> 20} MiB the refresh check "
        f"allows a load ({detail[:120]}), far more than one model may take of the inference "
        "function: upload a smaller model (fewer or shallower trees)",
    )


def inspect_model(
    raw: bytes,
    fmt: ModelFormat,
    rows: np.ndarray | None,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> SandboxResult:
    """Load ``raw`` in a child process; return its facts, UBJ bytes and predictions on ``rows``.

    ``rows`` (float, NaN = missing, model feature order) or None for a synthetic sample.
    Raises UploadRejected: ``load_failed`` (XGBoost refused or the loader crashed),
    ``predict_failed``, ``corrupt`` (loaded but inconsistent), ``timeout``,
    ``too_big_for_inference`` (the load ran out of ``memory_bytes``).
    """
    given = None if rows is None else np.ascontiguousarray(rows, dtype=np.float64)
    setup = {
        "sys_path": sys.path,
        "memory_bytes": int(memory_bytes),
        "cpu_seconds": math.ceil(STARTUP_TIMEOUT_SECONDS + timeout),
    }
    request = {
        "format": fmt,
        "model_size": len(raw),
        "rows_size": 0 if given is None else given.nbytes,
        "rows_shape": None if given is None else list(given.shape),
    }
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code, no shell
        [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        close_fds=True,
    )
    assert proc.stdin is not None  # noqa: S101 - stdin=PIPE
    assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
    assert proc.stderr is not None  # noqa: S101 - stderr=PIPE
    stderr = _StderrTail(proc.stderr)
    stderr.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    ready = False
    reply: dict[str, Any] | None = None
    blobs: list[bytes] = []
    watchdog = threading.Timer(STARTUP_TIMEOUT_SECONDS, kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            _write_frame(proc.stdin, setup)
            ready = _read_frame(proc.stdout).get("ready") is True
        except (OSError, EOFError, ValueError, struct.error):
            ready = False
        watchdog.cancel()
        if ready:
            timed_out.clear()
            watchdog = threading.Timer(timeout, kill)
            watchdog.daemon = True
            watchdog.start()
            try:
                _write_frame(
                    proc.stdin,
                    request,
                    bytes(raw),
                    b"" if given is None else given.data.cast("B"),
                )
                proc.stdin.close()
            except OSError:  # BrokenPipeError included
                pass  # the child died or was killed; its exit status tells why
            try:
                reply = _read_frame(proc.stdout)
                if reply.get("ok"):
                    for key in ("model_size", "rows_size", "pred_size"):
                        blobs.append(_read_exact(proc.stdout, int(reply[key])))
            except (EOFError, ValueError, struct.error):
                reply = None
        else:
            proc.kill()
        returncode = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.join(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    detail = stderr.last_line()

    if not ready:
        why = (
            f"it did not start within {STARTUP_TIMEOUT_SECONDS:g} s"
            if timed_out.is_set()
            else f"it exited with status {returncode}: {detail or 'no message'}"
        )
        raise SandboxUnavailable(
            f"the model sandbox could not start ({why}); memory limit {memory_bytes >> 20} MiB"
        )
    if timed_out.is_set():
        raise UploadRejected(
            "timeout",
            f"loading and smoke-testing the model took longer than {timeout:g} s; "
            "upload a smaller model (fewer or shallower trees)",
        )
    if returncode == -signal.SIGXCPU:
        raise UploadRejected(
            "timeout",
            f"loading the model used more than {setup['cpu_seconds']} s of CPU; "
            "upload a smaller model (fewer or shallower trees)",
        )
    if reply is None or returncode != 0:
        if returncode < 0:
            why = f"the loader crashed ({_signal_name(-returncode)})"
        else:
            why = f"the loader exited with status {returncode}"
        if detail:
            why += f": {detail}"
        if _out_of_memory(detail):
            raise _too_big(memory_bytes, why)
        if "map" in detail:
            why += f" (memory limit {memory_bytes >> 20} MiB)"
        raise UploadRejected(
            "load_failed", f"XGBoost could not load the model: {why}; {_RESAVE_HINT}"
        )
    if not reply.get("ok"):
        code = str(reply.get("code", "load_failed"))
        message = str(reply.get("message", ""))
        if code == "load_failed" and _out_of_memory(message):
            raise _too_big(memory_bytes, message)
        if code == "load_failed":
            message = f"XGBoost could not load the model: {message}; {_RESAVE_HINT}"
        raise UploadRejected(code, message)

    model_ubj, rows_blob, pred_blob = blobs
    info = ModelInfo(**reply["info"])
    predictions = _npy_load(pred_blob)
    used_rows = _npy_load(rows_blob) if rows_blob else np.asarray(rows, dtype=np.float64)
    return SandboxResult(
        info=info,
        model_ubj=model_ubj,
        rows=used_rows,
        predictions=predictions,
        synthetic=rows is None,
        footprint=dict(reply.get("footprint") or {}),
    )
