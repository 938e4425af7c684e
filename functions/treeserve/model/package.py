"""Every check of an uploaded model, from raw bytes to a validated :class:`ModelUpload`.

An upload is a bare XGBoost model (``.ubj``/``.json`` as written by ``Booster.save_model``) or a
``.tar.gz`` package (``model.ubj`` or ``model.json``; optional ``manifest.json``,
``reference.csv``, ``holdout.csv``). The format is decided by content, never by the file name.

Checks run cheapest first, so most bad uploads are refused before a child process is spawned:
size caps, serialized-Python sniffing (pickle, joblib, object ``.npy``: detected by content,
never unpickled), archive structure (links, devices, paths, duplicates, member and byte caps
counted while streaming), a structural parse of the model document (truncation, trailing bytes,
feature count), the manifest and the CSVs. Only then is the model loaded by XGBoost, in
:mod:`treeserve.model.sandbox`, which also re-saves it as UBJ and smoke-predicts.

Every refusal is :class:`~treeserve.errors.UploadRejected` with one of these stable codes:

``empty``, ``too_large``, ``pickle``, ``unknown_format``, ``corrupt``, ``link_member``,
``special_member``, ``path_traversal``, ``duplicate_member``, ``unexpected_member``,
``too_many_members``, ``missing_model``, ``too_many_features``, ``manifest_invalid``,
``manifest_mismatch``, ``csv_invalid``, ``csv_mismatch``, ``too_many_rows``, ``missing_label``,
``load_failed``, ``predict_failed``, ``timeout``, ``non_finite``, ``bad_shape``,
``unsupported_booster``, ``too_deep``, ``bad_category``, ``bad_feature_names``,
``too_big_for_inference``, ``too_slow_to_load``.

``non_finite`` also covers a NaN/inf leaf, split condition or base_score found statically (a
leaf the smoke rows never reach); ``too_deep``: a tree deeper than ``MAX_TREE_DEPTH`` (TreeSHAP
memory grows with depth squared); ``bad_category``: a category code outside ``0..MAX_CATEGORY-1``
(XGBoost allocates up to the largest code at load); ``bad_feature_names``: names XGBoost refuses
(``[``, ``]``, ``<``, duplicates); ``manifest_mismatch`` also covers declared feature types the
splits contradict.

**The inference budget.** The sandbox child measures what the model costs the process that
loads it (RSS growth and peak of the load, load time, the peak of explaining one row);
:func:`footprint` adds the model bytes the inference function holds while loading and the
worst explain request the limits allow, and :func:`check_footprint` refuses a model whose peak
exceeds :attr:`InferenceBudget.model_mb` (``too_big_for_inference``) or whose load would take
longer than :attr:`InferenceBudget.load_seconds` on the inference function
(``too_slow_to_load``). The figures are recorded in the manifest (``footprint``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import re
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import numpy as np

from treeserve.errors import UploadRejected

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
from treeserve.model.manifest import ModelManifest, category_codes, smoke_check_record, task_of
from treeserve.model.sandbox import (
    ModelFormat,
    ModelInfo,
    UBJDecodeError,
    UnsafeModel,
    category_codes_used,
    check_trees,
    decode_ubj,
    inspect_model,
    model_facts,
    split_features,
)
from treeserve.settings import (
    DEFAULT_DRIFT_THRESHOLD,
    DRIFT_RULE_HELP,
    MAX_EXPLAIN_ROWS,
    MAX_LAMBDA_PAYLOAD_BYTES,
    Settings,
    drift_rule_problem,
    inference_usable_mb,
)

MiB = 1 << 20

MODEL_MEMBERS = ("model.ubj", "model.json")
OPTIONAL_MEMBERS = ("manifest.json", "reference.csv", "holdout.csv")
ALLOWED_MEMBERS = frozenset(MODEL_MEMBERS + OPTIONAL_MEMBERS)
MANIFEST_KEYS = frozenset(
    {
        "name",
        "description",
        "feature_names",
        "feature_types",
        "class_names",
        "threshold",
        "metrics",
        "label",
        "output_names",
        "categories",
        "drift",
    }
)
DRIFT_HINT = (
    'drift must be {"default": {"method": M, "threshold": T}, "features": {"<feature>": '
    '{"method": M, "threshold": T}}} (each part optional)'
)
FEATURE_TYPES = frozenset({"float", "int", "i", "q", "c"})
MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none"})
DEFAULT_LABEL = "label"
MAX_MANIFEST_BYTES = 1 * MiB
# tar pads its end with zero blocks (10 KiB records by default); anything far beyond is a bomb.
MAX_TAR_PADDING = 1 * MiB
_READ_CHUNK = 1 * MiB
_PACKAGE_HINT = (
    "upload the file written by Booster.save_model('model.ubj') (or .json), or a .tar.gz "
    "package holding model.ubj|model.json and optionally manifest.json, reference.csv, holdout.csv"
)

UploadKind = Literal["ubj", "json", "targz"]


@dataclass(frozen=True)
class Limits:
    """Caps on what an upload may cost. The defaults fit a 3 GB Lambda function."""

    max_upload_bytes: int = 256 * MiB
    max_members: int = 8
    max_decompressed_bytes: int = 512 * MiB  # all members together, as extracted
    max_member_bytes: int = 256 * MiB
    max_csv_rows: int = 200_000
    # Cells (rows x columns) of one CSV: its float64 matrix stays under 160 MB however wide.
    max_csv_cells: int = 20_000_000
    max_features: int = 10_000
    # JSON models are parsed into Python objects (about 10x their size in memory); UBJ is read
    # as zero-copy array views, so only JSON gets this tighter cap.
    max_json_model_bytes: int = 64 * MiB
    load_timeout_seconds: float = 60.0
    load_memory_bytes: int = 2 << 30


# --- what a model may cost the inference function -----------------------------------------------

# INFERENCE_HEADROOM_FRACTION and INFERENCE_RUNTIME_MB live in treeserve.settings (the inference
# function's model cache sizes itself from them without importing this module). What headroom and
# runtime leave is shared by the model cache (MODEL_CACHE_MB, half of it by default) and one slot
# for what is not cached: at a swap or a first use the models in the cache keep serving (and
# explaining) while the next one loads. Each model must fit the smaller of the two, so it can be
# both cached and loaded; with the default cache that is half, as when one function served one
# model (MODELS_AT_ONCE of them: the one in service and the one loading).
MODELS_AT_ONCE = 2
# Bytes per contribution value of one explain answer, over XGBoost's float32 output: the
# contiguous copies, the JSON or CSV text and its copies on the way out (measured: 8-17 B on the
# JSON path, 44-65 B on the CSV path, which holds every value as a Python float); rounded up.
EXPLAIN_BYTES_PER_VALUE = 96
# Bytes per input value of one request once parsed (float64 matrix, float32 DMatrix copy).
INPUT_BYTES_PER_VALUE = 16
# A loaded model's answer to one explain, per thread, is at least its TreeSHAP path buffer of
# about 8 * (depth + 2)**2 bytes (measured, see sandbox.MAX_TREE_DEPTH).
TREESHAP_PATH_BYTES = 8
# Lambda gives a function one full vCPU at 1769 MB and a proportional share below it; a model's
# load is single-threaded, so it takes this much longer on a smaller function than in the child.
FULL_VCPU_MB = 1769
INFERENCE_LOAD_SECONDS = 5.0


@dataclass(frozen=True)
class InferenceBudget:
    """What one model may cost the inference function (its MemorySize and request limits)."""

    memory_mb: int = 1024  # the inference function's MemorySize (INFERENCE_MEMORY_MB)
    explain_rows: int = MAX_EXPLAIN_ROWS  # most rows one explain request carries
    max_body_bytes: int = MAX_LAMBDA_PAYLOAD_BYTES  # most bytes one request carries
    load_seconds: float = INFERENCE_LOAD_SECONDS  # most seconds a load may take there
    # The inference function's model cache (MODEL_CACHE_MB); None: its default, half the usable.
    cache_mb: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceBudget:
        return cls(
            memory_mb=settings.inference_memory_mb,
            explain_rows=settings.max_explain_rows,
            max_body_bytes=settings.max_body_bytes,
            cache_mb=settings.cache_mb,
        )

    @property
    def model_mb(self) -> float:
        """The peak memory one model may reach (MB): the smaller of the model cache and the slot
        the cache leaves of what headroom and runtime leave (see :data:`MODELS_AT_ONCE`)."""
        usable = inference_usable_mb(self.memory_mb)
        cache = usable / MODELS_AT_ONCE if self.cache_mb is None else self.cache_mb
        return max(0.0, min(cache, usable - cache))

    @property
    def cpu_factor(self) -> float:
        """How much slower a single-threaded load runs there than on one full vCPU."""
        return max(1.0, FULL_VCPU_MB / self.memory_mb)


def _mb(n: float) -> float:
    return round(n / MiB, 1)


def footprint(
    measured: dict[str, Any],
    *,
    model_bytes: int,
    num_features: int,
    num_outputs: int,
    max_depth: int,
    explainable: bool,
    budget: InferenceBudget,
) -> dict[str, Any]:
    """What the model costs the inference function, in MB, from the sandbox child's readings.

    ``load_peak_mb``: the child's load peak plus the model bytes the inference function holds
    while loading (the bytes read from S3 and the copy XGBoost parses); ``loaded_mb``: what stays;
    ``explain_peak_mb``: one explain request of the most rows the limits allow, over the loaded
    model (the child's one-row TreeSHAP peak, at least the path buffer, plus the answer's values
    and the parsed input); ``peak_mb``: the larger of the load's peak and loaded + explain.
    """
    load_peak = int(measured.get("load_peak_bytes", 0)) + 2 * model_bytes
    loaded = int(measured.get("loaded_bytes", 0))
    rows = max(1, min(budget.explain_rows, budget.max_body_bytes // max(1, num_features)))
    explain = 0
    if explainable:
        one_row = int(measured.get("explain_peak_bytes") or 0)
        path = TREESHAP_PATH_BYTES * (max_depth + 2) ** 2
        values = rows * (num_features + 1) * max(1, num_outputs)
        explain = (
            max(one_row, path)
            + values * EXPLAIN_BYTES_PER_VALUE
            + rows * num_features * INPUT_BYTES_PER_VALUE
        )
    seconds = float(measured.get("load_seconds", 0.0))
    return {
        "loaded_mb": _mb(loaded),
        "load_peak_mb": _mb(load_peak),
        "explain_rows": rows if explainable else 0,
        "explain_peak_mb": _mb(explain),
        "peak_mb": _mb(max(load_peak, loaded + explain)),
        "load_seconds": round(seconds, 3),
        "inference_load_seconds": round(seconds * budget.cpu_factor, 3),
        "budget_mb": round(budget.model_mb, 1),
        "inference_memory_mb": budget.memory_mb,
        "measured": bool(measured.get("baseline_bytes")),
    }


def check_footprint(fp: dict[str, Any], budget: InferenceBudget) -> None:
    """Refuse a model that does not fit the inference function (see the module docstring)."""
    fix = (
        "upload a smaller model (fewer or shallower trees, fewer features or classes), or give "
        "the inference function more memory (the template's InferenceMemoryMB parameter, which "
        "sets its MemorySize and the refresh function's INFERENCE_MEMORY_MB)"
    )
    if fp["peak_mb"] > fp["budget_mb"]:
        raise UploadRejected(
            "too_big_for_inference",
            f"the model would need {fp['peak_mb']:g} MB in the inference function (loading it "
            f"peaks at {fp['load_peak_mb']:g} MB, it keeps {fp['loaded_mb']:g} MB, and one "
            f"explain of {fp['explain_rows']} rows adds {fp['explain_peak_mb']:g} MB), more "
            f"than the {fp['budget_mb']:g} MB one model may use of the function's "
            f"{budget.memory_mb} MB: {fix}",
        )
    if fp["inference_load_seconds"] > budget.load_seconds:
        raise UploadRejected(
            "too_slow_to_load",
            f"loading the model took {fp['load_seconds']:g} s here, about "
            f"{fp['inference_load_seconds']:g} s on an inference function of "
            f"{budget.memory_mb} MB, more than the {budget.load_seconds:g} s a cold start may "
            f"spend on it: {fix}",
        )


@dataclass
class ModelUpload:
    """A validated upload: the canonical model bytes plus everything checked about them."""

    model_ubj: bytes  # as re-saved by XGBoost; what the registry stores
    sha256: str  # of model_ubj
    upload_sha256: str  # of the uploaded object as received
    upload_size: int
    info: ModelInfo
    feature_names: list[str]
    feature_types: list[str]
    declared: dict[str, Any]  # validated manifest.json fields
    reference: np.ndarray | None  # float64 (n, num_features), NaN = missing, model order
    holdout_X: np.ndarray | None  # noqa: N815 - X, y: the ML convention
    holdout_y: np.ndarray | None  # float64; class index for classification
    label: str | None
    smoke_predictions: np.ndarray
    smoke_check: dict[str, Any]  # manifest.smoke_check: rows the sandbox predicted, its answers
    holdout_predictions: np.ndarray | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    footprint: dict[str, Any] | None = None  # what it costs the inference function (MB, s)

    @property
    def categories(self) -> dict[str, list[Any]] | None:
        """The model's own training categories, else manifest.json's."""
        return self.info.categories or self.declared.get("categories")

    @property
    def task(self) -> str:
        return task_of(self.info.objective, self.info.num_class)

    def to_manifest(self, name: str) -> ModelManifest:
        """The version manifest (version and reference statistics left for the registry)."""
        task = task_of(self.info.objective, self.info.num_class)
        threshold = self.declared.get("threshold")
        if threshold is None and task == "binary":
            threshold = 0.5
        return ModelManifest(
            name=name,
            sha256=self.sha256,
            model_size=len(self.model_ubj),
            xgboost_version=self.info.xgboost_version,
            objective=self.info.objective,
            task=task,
            num_features=self.info.num_features,
            feature_names=list(self.feature_names),
            feature_types=list(self.feature_types),
            num_class=self.info.num_class,
            num_trees=self.info.num_trees,
            iteration_range=self.info.iteration_range,
            num_outputs=num_outputs(self.info),
            output_names=output_names(self.info, self.declared.get("output_names")),
            vector_leaf=self.info.vector_leaf,
            class_names=self.declared.get("class_names"),
            categories=self.categories,
            threshold=threshold,
            label=self.label,
            description=self.declared.get("description"),
            metrics=dict(self.declared.get("metrics") or {}),
            validation=dict(self.validation),
            footprint=self.footprint,
            reference_source="reference.csv" if self.reference is not None else None,
            drift=self.declared.get("drift"),
            source={"upload_sha256": self.upload_sha256, "upload_size": self.upload_size},
            smoke_check=self.smoke_check,
        )


# --- content sniffing --------------------------------------------------------------------------

# Protocol 0/1 openings: GLOBAL "cmod\nname\n", MARK+DICT/LIST, EMPTY_LIST/EMPTY_DICT + PUT/MARK,
# INT "I1\n", STRING "S'...'".
_PICKLE_PROTO0 = re.compile(rb"^(c[\w.]+\n[\w.]+\n|\((dp|lp|tp)\d*\n|[\]}](q|\(|h)|I-?\d+\n|S')")


def _looks_like_pickle(head: bytes, tail: bytes | None = None) -> bool:
    """Pickle by its opcodes: PROTO 2-5 first, or a protocol 0/1 opening that ends with STOP."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if _PICKLE_PROTO0.match(head):
        return tail is None or tail.rstrip(b"\r\n")[-1:] == b"."
    return False


def _peek_decompressed(data: bytes, kind: str, n: int = 1024) -> bytes:
    """The first ``n`` decompressed bytes, never inflating more than that."""
    try:
        if kind == "zlib":
            return zlib.decompressobj().decompress(data[: 64 * 1024], n)
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data[: 64 * 1024], n)
        if kind == "bz2":
            return bz2.BZ2Decompressor().decompress(data[: 64 * 1024], n)
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data[: 64 * 1024], n)
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
        return b""
    return b""


_ZLIB_SECOND = frozenset({0x01, 0x5E, 0x9C, 0xDA})


def _refuse_pickle(what: str) -> UploadRejected:
    return UploadRejected(
        "pickle",
        f"{what} is a Python pickle (or joblib dump); pickles are never loaded because "
        "unpickling runs arbitrary code: save the booster with Booster.save_model('model.ubj') "
        "(for an sklearn wrapper: model.get_booster().save_model('model.ubj')) and upload that",
    )


def _refuse_serialized_python(data: bytes, what: str) -> None:
    """Raise for pickle, joblib (plain or compressed) or object-dtype .npy content."""
    head, tail = data[:1024], data[-16:]
    if _looks_like_pickle(head, tail):
        raise _refuse_pickle(what)
    if head[:2] == b"ZF":  # joblib's legacy zlib container
        raise _refuse_pickle(what)
    if head[:6] == b"\x93NUMPY":
        header = head[10:].split(b"\n", 1)[0]
        if b"'O'" in header or b"|O" in header or b"<O" in header:
            raise _refuse_pickle(what)
        raise UploadRejected(
            "unknown_format", f"{what} is a numpy array, not a model: {_PACKAGE_HINT}"
        )
    kind = None
    if len(head) >= 2 and head[0] == 0x78 and head[1] in _ZLIB_SECOND:
        kind = "zlib"
    elif head[:2] == b"\x1f\x8b":
        kind = "gzip"
    elif head[:3] == b"BZh":
        kind = "bz2"
    elif head[:6] == b"\xfd7zXZ\x00":
        kind = "xz"
    if kind is not None and _looks_like_pickle(_peek_decompressed(data, kind)):
        raise _refuse_pickle(what)


def _json_or_ubj(data: bytes) -> ModelFormat:
    """Both start with ``{``: JSON continues with whitespace and a quoted key, UBJ with a length."""
    body = data.lstrip()
    after = body[1:].lstrip(b" \t\r\n")[:1]
    if after in (b'"', b"}"):
        return "json"
    return "ubj"


def sniff(data: bytes, filename: str) -> UploadKind:
    """What the bytes are: a UBJ model, a JSON model or a gzip tarball. Refuses the rest."""
    if not data:
        raise UploadRejected(
            "empty", f"the upload {filename!r} is empty (0 bytes): {_PACKAGE_HINT}"
        )
    _refuse_serialized_python(data, f"the upload {filename!r}")
    head = data[:1024]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if head.lstrip()[:1] == b"{":
        return _json_or_ubj(data.removeprefix(b"\xef\xbb\xbf"))
    if head[:2] == b"\x1f\x8b":
        inner = _peek_decompressed(data, "gzip", 1024)
        if len(inner) >= 262 and inner[257:262] == b"ustar":
            return "targz"
        if inner.lstrip()[:1] == b"{":
            raise UploadRejected(
                "unknown_format",
                "a gzip-compressed model is not accepted: upload the .ubj/.json file itself, "
                "or pack it as model.ubj inside a .tar.gz package",
            )
        if not inner:
            raise UploadRejected(
                "corrupt", "the gzip stream is truncated or corrupt: pack the package again"
            )
        raise UploadRejected(
            "unknown_format", f"a gzip file that is not a tar archive: {_PACKAGE_HINT}"
        )
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        raise UploadRejected(
            "unknown_format",
            f"zip archives are not accepted: pack the files as .tar.gz (tar czf model.tar.gz "
            f"model.ubj ...): {_PACKAGE_HINT}",
        )
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise UploadRejected(
            "unknown_format", "an uncompressed tar archive: compress it with gzip (tar czf ...)"
        )
    if head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        raise UploadRejected(
            "unknown_format", f"bzip2/xz archives are not accepted: use gzip: {_PACKAGE_HINT}"
        )
    if _looks_like_legacy_binary(head):
        raise UploadRejected(
            "unknown_format",
            f"{filename!r} is an XGBoost model in the legacy binary format (Booster.save_model "
            "to a .bin/.model file before XGBoost 2.0), which XGBoost 3.1 and later cannot "
            "read: load it with an XGBoost before 3.1 (pip install 'xgboost<3.1'), save it "
            "again with booster.save_model('model.ubj') and upload that file",
        )
    raise UploadRejected(
        "unknown_format", f"{filename!r} is not an XGBoost model or package: {_PACKAGE_HINT}"
    )


# The legacy binary model: an optional "binf" tag, a 136-byte parameter block, then the
# objective's name and the booster's name, each a little-endian uint64 length and its bytes.
_LEGACY_PARAM_BYTES = 136
_LEGACY_BOOSTERS = (b"gbtree", b"gblinear", b"dart")


def _looks_like_legacy_binary(head: bytes) -> bool:
    body = head[4:] if head[:4] == b"binf" else head
    pos = _LEGACY_PARAM_BYTES
    names: list[bytes] = []
    for _ in range(2):
        if len(body) < pos + 8:
            return False
        n = int.from_bytes(body[pos : pos + 8], "little")
        if not 0 < n <= 64 or len(body) < pos + 8 + n:
            return False
        names.append(body[pos + 8 : pos + 8 + n])
        pos += 8 + n
    return b":" in names[0] and names[1] in _LEGACY_BOOSTERS


# --- the model document (cheap structural checks, no XGBoost) --------------------------------


def _trailing(rest: bytes, what: str) -> UploadRejected:
    if _looks_like_pickle(rest.lstrip()[:1024]):
        return _refuse_pickle(f"data appended after the model in {what}")
    return UploadRejected(
        "corrupt",
        f"{what} has {len(rest)} bytes after the end of the model document (two files glued "
        "together?): upload the file exactly as Booster.save_model wrote it",
    )


def feature_name_problem(names: list[str]) -> str | None:
    """Why XGBoost's DMatrix would refuse these feature names, or None."""
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        return f"duplicated: {dupes[:5]}"
    bad = [n for n in names if any(c in n for c in "[]<")]
    if bad:
        return f"with '[', ']' or '<': {[b[:40] for b in bad[:5]]}"
    return None


def parse_model_document(raw: bytes, fmt: ModelFormat, what: str) -> dict[str, Any]:
    """Decode the model document without XGBoost and read its facts (refuses on any defect)."""
    if fmt == "ubj":
        try:
            doc, end = decode_ubj(raw)
        except (UBJDecodeError, RecursionError) as exc:
            raise UploadRejected(
                "corrupt",
                f"{what} is not a complete UBJ model ({exc}): upload the file exactly as "
                "Booster.save_model wrote it",
            ) from None
        if end != len(raw):
            raise _trailing(raw[end:], what)
    else:
        # surrogateescape: bytes glued after the document (a pickle) must not hide as bad UTF-8.
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
        try:
            doc, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
            text[:end].encode("utf-8")  # the document itself must be valid UTF-8
        except (UnicodeEncodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UploadRejected(
                "corrupt",
                f"{what} is not a complete JSON model ({str(exc)[:120]}): upload the file "
                "exactly as Booster.save_model wrote it",
            ) from None
        if text[end:].strip():
            raise _trailing(text[end:].encode("utf-8", "surrogateescape"), what)
    try:
        facts = model_facts(doc)
    except ValueError as exc:
        raise UploadRejected(
            "corrupt", f"{what} is not an XGBoost model ({exc}): {_PACKAGE_HINT}"
        ) from None
    try:
        facts["max_depth"] = check_trees(
            doc, facts["num_features"], max(facts["num_class"], facts["num_target"])
        )
    except UnsafeModel as exc:
        raise UploadRejected(exc.code, f"{what}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UploadRejected(
            "corrupt",
            f"{what} has malformed trees ({exc}): XGBoost would read out of bounds with it; "
            "re-save the model with Booster.save_model",
        ) from None
    facts["category_codes_used"] = category_codes_used(doc)
    numeric, categorical = split_features(doc, facts["num_features"])
    facts["numeric_splits"] = np.flatnonzero(numeric).tolist()
    facts["categorical_splits"] = np.flatnonzero(categorical).tolist()
    names = facts["feature_names"]
    if names is not None:
        problem = feature_name_problem(names)
        if problem:
            raise UploadRejected(
                "bad_feature_names",
                f"{what} has feature names XGBoost refuses ({problem}), so every /explain would "
                "fail: rename the columns (no '[', ']' or '<', each name once) and retrain",
            )
    if names is not None and len(names) != facts["num_features"]:
        raise UploadRejected(
            "corrupt",
            f"{what} declares {facts['num_features']} features but names {len(names)}: "
            "re-save the model with Booster.save_model",
        )
    return facts


# --- the tarball -------------------------------------------------------------------------------


class _Capped:
    """A reader that raises once more than ``cap`` bytes came through (a bomb never inflates)."""

    def __init__(self, inner: gzip.GzipFile, cap: int) -> None:
        self.inner = inner
        self.cap = cap
        self.count = 0

    def read(self, size: int | None = -1) -> bytes:
        want = _READ_CHUNK if size is None or size < 0 else min(size, self.cap - self.count + 1)
        chunk = self.inner.read(max(want, 0))
        self.count += len(chunk)
        if self.count > self.cap:
            raise _TooLarge(self.count)
        return chunk


class _TooLarge(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def _member_name(info: tarfile.TarInfo) -> PurePosixPath:
    name = info.name
    if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise UploadRejected(
            "path_traversal",
            f"the archive member {name[:100]!r} has an absolute path: pack the files with "
            "relative names (cd into the folder, then tar czf model.tar.gz model.ubj ...)",
        )
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UploadRejected(
            "path_traversal",
            f"the archive member {name[:100]!r} points outside the archive ('..'): pack the "
            "files with plain relative names",
        )
    return PurePosixPath(*[p for p in path.parts if p not in (".", "")])


def read_package(data: bytes, limits: Limits) -> dict[str, bytes]:
    """The members of a gzip tarball, checked while streaming. Returns {basename: bytes}."""
    members: dict[str, bytes] = {}
    prefixes: set[tuple[str, ...]] = set()
    total = 0
    seen = 0
    capped = _Capped(
        gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb"), limits.max_decompressed_bytes
    )
    try:
        with tarfile.open(fileobj=cast(IO[bytes], capped), mode="r|") as archive:
            for info in archive:
                seen += 1
                if seen > limits.max_members:
                    raise UploadRejected(
                        "too_many_members",
                        f"the archive has more than {limits.max_members} members: a package "
                        "holds at most model.ubj|model.json, manifest.json, reference.csv, "
                        "holdout.csv",
                    )
                path = _member_name(info)
                if info.issym() or info.islnk():
                    raise UploadRejected(
                        "link_member",
                        f"the archive member {info.name[:100]!r} is a "
                        f"{'symbolic' if info.issym() else 'hard'} link: pack regular files "
                        "only (tar czh follows links)",
                    )
                if info.isdir():
                    continue
                if not info.isreg():
                    raise UploadRejected(
                        "special_member",
                        f"the archive member {info.name[:100]!r} is a device, FIFO or other "
                        "special file: pack regular files only",
                    )
                base = path.name
                if base not in ALLOWED_MEMBERS or len(path.parts) > 2:
                    hint = (
                        " (macOS metadata: pack with COPYFILE_DISABLE=1 tar czf ...)"
                        if base.startswith("._")
                        else ""
                    )
                    raise UploadRejected(
                        "unexpected_member",
                        f"the archive member {info.name[:100]!r} is not part of a model "
                        f"package{hint}: allowed are {', '.join(sorted(ALLOWED_MEMBERS))}",
                    )
                prefixes.add(path.parts[:-1])
                if base in members or len(prefixes) > 1:
                    raise UploadRejected(
                        "duplicate_member",
                        f"the archive holds {base!r} more than once (or in several folders): "
                        "pack each file once",
                    )
                if info.size > limits.max_member_bytes:
                    raise UploadRejected(
                        "too_large",
                        f"{base} is {info.size} bytes once extracted, more than the "
                        f"{limits.max_member_bytes} allowed: upload a smaller file",
                    )
                total += info.size
                if total > limits.max_decompressed_bytes:
                    raise UploadRejected(
                        "too_large",
                        f"the archive's members add up to more than "
                        f"{limits.max_decompressed_bytes} bytes once extracted: upload a "
                        "smaller package (sample reference.csv and holdout.csv)",
                    )
                handle = archive.extractfile(info)
                if handle is None:  # pragma: no cover - isreg() members always have data
                    raise UploadRejected("corrupt", f"{base} has no data")
                content = handle.read()
                if len(content) != info.size:
                    raise UploadRejected("corrupt", f"{base} is truncated in the archive")
                members[base] = content
        # The rest of the stream must be tar padding, and the gzip trailer must check out.
        padding = 0
        while chunk := capped.read(_READ_CHUNK):
            padding += len(chunk)
            if padding > MAX_TAR_PADDING or chunk.strip(b"\0"):
                raise UploadRejected(
                    "corrupt" if chunk.strip(b"\0") else "too_large",
                    "the archive continues after its end (data or padding beyond "
                    f"{MAX_TAR_PADDING} bytes): pack the package again with tar czf",
                )
    except _TooLarge:
        raise UploadRejected(
            "too_large",
            f"the archive inflates to more than {limits.max_decompressed_bytes} bytes: upload "
            "a smaller package",
        ) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UploadRejected(
            "corrupt",
            f"the archive is truncated or corrupt ({str(exc)[:120]}): pack it again "
            "(tar czf model.tar.gz model.ubj ...) and upload the whole file",
        ) from None
    return members


# --- manifest ------------------------------------------------------------------------------------


def _manifest_error(message: str) -> UploadRejected:
    return UploadRejected("manifest_invalid", f"manifest.json: {message}")


def _names(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _manifest_error(f"{key} must be a non-empty list of strings")
    out: list[str] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise _manifest_error(f"{key} must hold strings, found {type(v).__name__}")
        text = str(v)
        if not text.strip() or len(text) > 256:
            raise _manifest_error(f"{key} has an empty or over-long entry")
        out.append(text)
    if len(set(out)) != len(out):
        raise _manifest_error(f"{key} has duplicate entries")
    return out


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Validate manifest.json on its own (agreement with the model is checked later)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UploadRejected(
            "too_large", f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes"
        )
    try:
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise _manifest_error(f"not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise _manifest_error("must be a JSON object")
    unknown = sorted(set(data) - MANIFEST_KEYS)
    if unknown:
        raise _manifest_error(
            f"unknown keys {unknown[:10]}: allowed are {', '.join(sorted(MANIFEST_KEYS))}"
        )
    out: dict[str, Any] = {}
    for key in ("name", "description", "label"):
        if data.get(key) is not None:
            value = data[key]
            if not isinstance(value, str) or not value.strip() or len(value) > 4096:
                raise _manifest_error(f"{key} must be a non-empty string")
            out[key] = value
    if data.get("feature_names") is not None:
        out["feature_names"] = _names(data["feature_names"], "feature_names")
        problem = feature_name_problem(out["feature_names"])
        if problem:
            raise _manifest_error(
                f"feature_names XGBoost refuses ({problem}): no '[', ']' or '<' in a name"
            )
    if data.get("feature_types") is not None:
        types = data["feature_types"]
        if not isinstance(types, list) or not all(t in FEATURE_TYPES for t in types):
            raise _manifest_error(
                f"feature_types must be a list of {', '.join(sorted(FEATURE_TYPES))}"
            )
        out["feature_types"] = list(types)
    if data.get("class_names") is not None:
        out["class_names"] = _names(data["class_names"], "class_names")
    if data.get("output_names") is not None:
        out["output_names"] = _names(data["output_names"], "output_names")
    if data.get("threshold") is not None:
        t = data["threshold"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 < float(t) < 1.0:
            raise _manifest_error(
                f"threshold must be a number strictly between 0 and 1, got {str(t)[:40]}"
            )
        out["threshold"] = float(t)
    if data.get("metrics") is not None:
        metrics = data["metrics"]
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            for k, v in metrics.items()
        ):
            raise _manifest_error("metrics must map names to finite numbers")
        out["metrics"] = {k: float(v) for k, v in metrics.items()}
    if data.get("categories") is not None:
        out["categories"] = _declared_categories(data["categories"])
    if data.get("drift") is not None:
        out["drift"] = _declared_drift(data["drift"])
    return out


def _drift_rule(value: Any, where: str, inherited: str = "psi") -> dict[str, Any]:
    if not isinstance(value, dict) or not value or set(value) - {"method", "threshold"}:
        raise _manifest_error(
            f"{where} must be an object with method and/or threshold; {DRIFT_HINT}"
        )
    method = value.get("method", inherited)
    threshold = value.get("threshold", DEFAULT_DRIFT_THRESHOLD)
    problem = drift_rule_problem(method, threshold)
    if problem:
        raise _manifest_error(f"{where}: {problem} ({DRIFT_RULE_HELP})")
    return {k: (float(v) if k == "threshold" else v) for k, v in value.items()}


def _declared_drift(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - {"default", "features"}:
        raise _manifest_error(DRIFT_HINT)
    out: dict[str, Any] = {}
    if value.get("default") is not None:
        out["default"] = _drift_rule(value["default"], "drift.default")
    features = value.get("features")
    if features is not None:
        if not isinstance(features, dict):
            raise _manifest_error(f"drift.features must map feature names to rules; {DRIFT_HINT}")
        inherited = (out.get("default") or {}).get("method", "psi")
        out["features"] = {
            str(name): _drift_rule(rule, f"drift.features[{str(name)[:60]!r}]", inherited)
            for name, rule in features.items()
        }
    return out


def check_drift_against_features(
    drift: dict[str, Any] | None, names: list[str], types: list[str]
) -> None:
    """Refuse drift overrides of features the model does not have, or numeric rules
    (ks, wasserstein) on a categorical feature."""
    if not drift:
        return
    kinds = dict(zip(names, types, strict=True))
    for name, rule in (drift.get("features") or {}).items():
        if name not in kinds:
            raise _mismatch(
                f"drift.features names {name[:60]!r}, which is not one of the model's features "
                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
            )
        if kinds[name] == "c" and rule.get("method", "psi") != "psi":
            raise _mismatch(
                f"drift.features[{name[:60]!r}] asks for {rule['method']}, a rule for numeric "
                "features; a categorical feature is judged by the psi rule (set only its "
                "threshold, or method psi)"
            )


def _declared_categories(value: Any) -> dict[str, list[str]]:
    hint = "categories must map each categorical feature to its values in code order"
    if not isinstance(value, dict) or not value:
        raise _manifest_error(hint)
    for name, cats in value.items():
        if (
            not isinstance(cats, list)
            or not cats
            or not all(isinstance(c, str) and c for c in cats)
            or len(set(cats)) != len(cats)
        ):
            raise _manifest_error(f"{hint}; {str(name)[:60]!r} needs unique non-empty strings")
    return {str(k): list(v) for k, v in value.items()}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in manifest.json")


# --- CSV -----------------------------------------------------------------------------------------


# A CSV is parsed in chunks of about this many cells: a chunk's Python strings are all that
# exists of the text at any time (the whole file as Python strings would take several times its
# size: issue 13 measured 3.1 GB for two 258 MB CSVs).
CSV_CHUNK_CELLS = 1 << 18


@dataclass
class _Table:
    """A checked CSV: its header and row count, its bytes parsed again chunk by chunk."""

    header: list[str]
    raw: bytes
    index_column: bool  # DataFrame.to_csv() wrote its index first, under an empty name
    n_rows: int

    def rows(self) -> Iterator[list[str]]:
        """The data rows (blank lines skipped, the index column dropped)."""
        # BytesIO shares the bytes it is given; the wrapper decodes a few KB at a time.
        text = io.TextIOWrapper(io.BytesIO(self.raw), encoding="utf-8-sig", newline="")
        reader = csv.reader(text, strict=True)
        next(reader, None)
        for line in reader:
            if not line or (len(line) == 1 and not line[0].strip()):
                continue
            yield line[1:] if self.index_column else line

    def chunks(self) -> Iterator[tuple[int, list[list[str]]]]:
        """``(first row index, rows)`` in chunks of about :data:`CSV_CHUNK_CELLS` cells."""
        size = max(1, CSV_CHUNK_CELLS // max(1, len(self.header)))
        start, chunk = 0, []
        for row in self.rows():
            chunk.append(row)
            if len(chunk) == size:
                yield start, chunk
                start, chunk = start + size, []
        if chunk:
            yield start, chunk

    def column(self, j: int) -> list[str]:
        return [row[j].strip() for row in self.rows()]


def _read_csv(raw: bytes, what: str, limits: Limits) -> _Table:
    """Check the CSV in one streaming pass (UTF-8, a header of unique names, one field per
    column on every row, the row and cell caps); nothing of it is kept but the header."""
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline="")
    reader = csv.reader(text, strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header or not any(header):
            raise UploadRejected(
                "csv_invalid", f"{what} is empty: it needs a header row of feature names"
            )
        index_column = len(header) > 1 and not header[0] and all(header[1:])
        if index_column:
            header = header[1:]
        if any(not h for h in header) or len(set(header)) != len(header):
            raise UploadRejected(
                "csv_invalid", f"{what} has empty or duplicate column names in its header"
            )
        max_rows = min(limits.max_csv_rows, limits.max_csv_cells // len(header))
        width = len(header) + (1 if index_column else 0)
        n_rows = 0
        for line in reader:
            if not line or (len(line) == 1 and not line[0].strip()):
                continue
            if len(line) != width:
                got = len(line) - (1 if index_column else 0)
                raise UploadRejected(
                    "csv_mismatch",
                    f"{what} line {reader.line_num} has {got} fields but the header has "
                    f"{len(header)}: every row needs one value per column",
                )
            n_rows += 1
            if n_rows > max_rows:
                raise UploadRejected(
                    "too_many_rows",
                    f"{what} has more than {max_rows} rows (at most {limits.max_csv_rows} rows "
                    f"and {limits.max_csv_cells} cells of {len(header)} columns): upload a "
                    "sample",
                )
    except UnicodeDecodeError:
        raise UploadRejected(
            "csv_invalid", f"{what} is not UTF-8 text: save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise UploadRejected("csv_invalid", f"{what} is not valid CSV ({exc})") from None
    if not n_rows:
        raise UploadRejected("csv_invalid", f"{what} has a header but no rows")
    return _Table(header, raw, index_column, n_rows)


def _numeric_cells(cells: list[str], first: int, name: str, what: str) -> np.ndarray:
    cleaned = ["nan" if c.strip().lower() in MISSING_TOKENS else c.strip() for c in cells]
    try:
        column = np.array(cleaned, dtype=np.float64)
    except ValueError:
        for i, c in enumerate(cleaned):
            try:
                float(c)
            except ValueError:
                raise UploadRejected(
                    "csv_invalid",
                    f"{what} row {first + i + 1}, column {name!r} holds {c[:40]!r}, not a "
                    "number: features must be numeric (leave a cell empty for missing)",
                ) from None
        raise  # pragma: no cover - numpy and float() agree on what parses
    if np.isinf(column).any():
        i = int(np.flatnonzero(np.isinf(column))[0])
        raise UploadRejected(
            "csv_invalid",
            f"{what} row {first + i + 1}, column {name!r} is infinite: use finite values",
        )
    return column


def _category_cells(
    cells: list[str], first: int, name: str, what: str, categories: list[Any]
) -> np.ndarray:
    """Category values (as a DataFrame's ``to_csv`` writes them) -> the model's codes.

    A number that names no category is taken as a code when the categories are strings (a
    sample written from codes); integer categories are matched by value only.
    """
    codes = category_codes(categories)
    numbers_are_codes = not isinstance(categories[0], int)
    column = np.empty(len(cells), dtype=np.float64)
    for i, raw_cell in enumerate(cells):
        cell = raw_cell.strip()
        code = codes.get(cell)
        if code is None and cell.lower() in MISSING_TOKENS:
            code = math.nan
        if code is None and numbers_are_codes and _is_code(cell):
            code = float(cell)
        if code is None:
            shown = ", ".join(map(repr, categories[:10])) + (
                ", ..." if len(categories) > 10 else ""
            )
            raise UploadRejected(
                "csv_invalid",
                f"{what} row {first + i + 1}, column {name!r} holds {cell[:40]!r}, which is "
                f"not one of the model's categories ({shown}): the sample must come from the "
                "data the model was trained on",
            )
        column[i] = code
    return column


def _is_code(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _feature_matrix(
    table: _Table,
    names: list[str],
    what: str,
    label: str | None,
    categories: dict[str, list[Any]] | None = None,
) -> np.ndarray:
    columns = [h for h in table.header if h != label]
    have, want = set(table.header), set(names)
    missing = [n for n in names if n not in have]
    extra = [c for c in columns if c not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks the model's features {missing[:10]}")
        if extra:
            parts.append(f"has columns the model does not know {extra[:10]}")
        raise UploadRejected(
            "csv_mismatch",
            f"{what} {' and '.join(parts)}: its header must name exactly the model's features "
            f"({len(names)} columns{', plus the label' if label else ''})",
        )
    index = {h: j for j, h in enumerate(table.header)}
    matrix = np.empty((table.n_rows, len(names)), dtype=np.float64)
    plan = [(k, index[name], name, (categories or {}).get(name)) for k, name in enumerate(names)]
    for first, chunk in table.chunks():
        stop = first + len(chunk)
        for k, j, name, cats in plan:
            cells = [row[j] for row in chunk]
            matrix[first:stop, k] = (
                _numeric_cells(cells, first, name, what)
                if cats is None
                else _category_cells(cells, first, name, what, cats)
            )
    return matrix


def _labels(
    table: _Table, label: str, task: str, class_names: list[str] | None, num_class: int
) -> np.ndarray:
    cells = table.column(table.header.index(label))
    lookup = {name: float(i) for i, name in enumerate(class_names or [])}
    y = np.empty(len(cells), dtype=np.float64)
    for i, c in enumerate(cells):
        if c.lower() in MISSING_TOKENS:
            raise UploadRejected(
                "csv_invalid", f"holdout.csv row {i + 1} has no value in the label column {label!r}"
            )
        if c in lookup:
            y[i] = lookup[c]
            continue
        try:
            y[i] = float(c)
        except ValueError:
            known = f" (class_names: {class_names[:10]})" if class_names else ""
            raise UploadRejected(
                "csv_invalid",
                f"holdout.csv row {i + 1}: label {c[:40]!r} is neither a number nor a class "
                f"name{known}",
            ) from None
    if not np.isfinite(y).all():
        raise UploadRejected("csv_invalid", "holdout.csv has non-finite labels")
    if task in ("binary", "multiclass"):
        k = 2 if task == "binary" else num_class
        bad = (y != np.round(y)) | (y < 0) | (y >= k)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UploadRejected(
                "csv_invalid",
                f"holdout.csv row {i + 1}: label {cells[i][:40]!r} is not a class of this model "
                f"(0..{k - 1}{' or a class name' if class_names else ''})",
            )
    return y


# --- agreement between model, manifest and data ----------------------------------------------


def _mismatch(message: str) -> UploadRejected:
    return UploadRejected("manifest_mismatch", f"manifest.json disagrees with the model: {message}")


def _check_manifest_against_model(declared: dict[str, Any], facts: dict[str, Any]) -> None:
    n = facts["num_features"]
    names = declared.get("feature_names")
    if names is not None:
        if len(names) != n:
            raise _mismatch(f"it names {len(names)} features, the model has {n}")
        model_names = facts["feature_names"]
        if model_names is not None and names != model_names:
            diff = [f"{a!r}!={b!r}" for a, b in zip(names, model_names, strict=True) if a != b]
            raise _mismatch(
                f"feature_names differ from the model's ({', '.join(diff[:5])}): drop "
                "feature_names from manifest.json or list the model's own, in order"
            )
    types = declared.get("feature_types")
    if types is not None:
        if len(types) != n:
            raise _mismatch(f"it gives {len(types)} feature types, the model has {n} features")
        if facts["feature_types"] is not None and types != facts["feature_types"]:
            raise _mismatch("feature_types differ from the model's")
    task = task_of(facts["objective"], facts["num_class"])
    classes = declared.get("class_names")
    if classes is not None:
        if task == "binary" and len(classes) != 2:
            raise _mismatch(f"a binary model has 2 classes, class_names lists {len(classes)}")
        if task == "multiclass" and len(classes) != facts["num_class"]:
            raise _mismatch(
                f"the model has {facts['num_class']} classes, class_names lists {len(classes)}"
            )
        if task not in ("binary", "multiclass"):
            raise _mismatch(f"class_names given for a {task} model ({facts['objective']})")
    outputs = declared.get("output_names")
    k = max(facts["num_target"], len(facts["outputs"] or []))
    if outputs is not None and (task in ("binary", "multiclass") or len(outputs) != k):
        raise _mismatch(
            f"output_names lists {len(outputs)} names; the model ({facts['objective']}) has "
            f"{k} output{'s' if k != 1 else ''}: name each target of a multi-target regression"
        )
    if declared.get("categories") is not None:
        _check_categories_against_model(declared["categories"], facts, declared)
    if declared.get("threshold") is not None and task != "binary":
        raise _mismatch(f"threshold applies to binary models, this one is {facts['objective']}")


def num_outputs(info: ModelInfo) -> int:
    """Values per row in a prediction: k for multi:softprob, the quantiles or the targets."""
    shape = expected_shape(info, 1)
    return shape[1] if len(shape) == 2 else 1


def output_names(info: ModelInfo, declared: list[str] | None) -> list[str] | None:
    """What each output of a multi-output regression is: the manifest's ``output_names`` (target
    names), else the quantiles (``quantile_0.1``), else ``target_0``, ...; None otherwise."""
    k = num_outputs(info)
    if k < 2 or task_of(info.objective, info.num_class) in ("binary", "multiclass"):
        return None
    if declared is not None:
        return list(declared)
    if info.outputs is not None and len(info.outputs) == k:
        return list(info.outputs)
    return [f"target_{i}" for i in range(k)]


def _check_categories_against_model(
    categories: dict[str, list[str]], facts: dict[str, Any], declared: dict[str, Any]
) -> None:
    if facts.get("categories"):
        if categories != facts["categories"]:
            raise _mismatch(
                "categories differ from the ones stored in the model: drop categories from "
                "manifest.json (the model's own are used)"
            )
        return
    names = facts["feature_names"] or declared.get("feature_names") or []
    types = facts["feature_types"] or declared.get("feature_types") or []
    categorical = {n for n, t in zip(names, types, strict=False) if t == "c"}
    unknown = sorted(set(categories) - categorical)
    if unknown:
        raise _mismatch(
            f"categories names {unknown[:5]}, which are not categorical features of the model "
            f"(categorical: {sorted(categorical)[:10]})"
        )
    used = facts.get("category_codes_used", {})
    for j, name in enumerate(names):
        if name in categories and used.get(j, -1) >= len(categories[name]):
            raise _mismatch(
                f"the model's splits use category code {used[j]} of {name!r}, but categories "
                f"lists only {len(categories[name])} values: list every training category"
            )


def check_types_against_splits(
    types: list[str], names: list[str], facts: dict[str, Any], source: str
) -> None:
    """Refuse feature types the model's own splits contradict (a numeric feature declared 'c'
    would be served and monitored as categories, and the other way round)."""
    wrong = [
        f"{names[j]!r} is split numerically but declared 'c'"
        for j in facts["numeric_splits"]
        if types[j] == "c"
    ] + [
        f"{names[j]!r} is split by category but declared {types[j]!r}"
        for j in facts["categorical_splits"]
        if types[j] != "c"
    ]
    if wrong:
        raise UploadRejected(
            "manifest_mismatch",
            f"the feature types from {source} contradict the model's splits ({'; '.join(wrong[:5])}"
            f"{f'; {len(wrong) - 5} more' if len(wrong) > 5 else ''}): declare 'c' only for the "
            "features trained as categorical (pandas category dtype), or drop feature_types",
        )


def expected_shape(info: ModelInfo, n: int) -> tuple[int, ...]:
    """The shape ``inplace_predict`` (output_margin=False) gives for n rows of this model."""
    if info.objective == "multi:softprob" and info.num_class > 1:
        return (n, info.num_class)
    if info.num_target > 1:
        return (n, info.num_target)
    return (n,)


def check_predictions(info: ModelInfo, predictions: np.ndarray, n: int, source: str) -> None:
    """Refuse predictions of the wrong shape or with NaN/inf values."""
    want = expected_shape(info, n)
    if predictions.shape != want:
        raise UploadRejected(
            "bad_shape",
            f"predictions on {source} have shape {predictions.shape}, expected {want} for "
            f"objective {info.objective}: re-train or re-save the model",
        )
    finite = np.isfinite(predictions)
    if not finite.all():
        bad_rows = int((~finite.reshape(n, -1)).any(axis=1).sum()) if n else 0
        raise UploadRejected(
            "non_finite",
            f"the model predicts NaN or infinity on {bad_rows} of {n} rows of {source}: "
            "check the trees' leaf values (and base_score) and re-train",
        )


# --- the whole check ---------------------------------------------------------------------------


def read_upload(
    data: bytes,
    filename: str,
    *,
    limits: Limits | None = None,
    label: str | None = None,
    budget: InferenceBudget | None = None,
) -> ModelUpload:
    """Check an uploaded object completely; raise UploadRejected with a stable code if refused.

    The checks run cheapest first, each stage named in ``validation.checks``: the object and its
    archive (:func:`_model_member`), the model document without XGBoost
    (:func:`_document_facts`), the manifest, the CSVs and the feature layout
    (:func:`_feature_layout`, :func:`_matrices`), then the sandboxed load and smoke predictions,
    and what the model would cost the inference function (``budget``, default 1024 MB).

    ``label`` names the holdout's label column (default: the manifest's ``label``, else
    ``"label"``). :class:`treeserve.model.sandbox.SandboxUnavailable` (the child could not start)
    is not a verdict on the upload and propagates: fail the invocation so it is retried.
    """
    limits = limits or Limits()
    budget = budget or InferenceBudget()
    checks: list[str] = []
    size = len(data)
    if size > limits.max_upload_bytes:
        raise UploadRejected(
            "too_large",
            f"the upload is {size} bytes, more than the {limits.max_upload_bytes} allowed",
        )
    upload_sha256 = hashlib.sha256(data).hexdigest()
    kind = sniff(data, filename)
    checks.append("format")
    members, model_name, model_raw, fmt = _model_member(data, filename, kind, limits, checks)
    facts = _document_facts(model_raw, fmt, model_name, limits)
    checks.append("model_document")

    declared: dict[str, Any] = {}
    if "manifest.json" in members:
        declared = parse_manifest(members["manifest.json"])
        _check_manifest_against_model(declared, facts)
        checks.append("manifest")
    task = task_of(facts["objective"], facts["num_class"])
    label_name = label or declared.get("label") or None
    tables: dict[str, _Table] = {
        m: _read_csv(members[m], m, limits)
        for m in ("reference.csv", "holdout.csv")
        if m in members
    }
    if "holdout.csv" in tables:
        label_name = label_name or DEFAULT_LABEL
        if label_name not in tables["holdout.csv"].header:
            raise UploadRejected(
                "missing_label",
                f"holdout.csv has no label column {label_name!r}: add it, or name the column "
                "with manifest.json 'label' (treeserve publish --label COL)",
            )
    names, names_source, types, categories = _feature_layout(facts, declared, tables, label_name)
    reference, holdout_X, holdout_y = _matrices(
        tables,
        names,
        label_name,
        categories,
        task=task,
        declared=declared,
        num_class=facts["num_class"],
        checks=checks,
    )
    del tables

    n = facts["num_features"]
    parts = [a for a in (reference, holdout_X) if a is not None]
    rows = np.vstack(parts) if parts else None
    started = time.monotonic()
    result = inspect_model(
        model_raw,
        fmt,
        rows,
        timeout=limits.load_timeout_seconds,
        memory_bytes=limits.load_memory_bytes,
    )
    load_seconds = time.monotonic() - started
    checks.append("load")
    info = result.info
    if (info.num_features, info.objective, info.num_class) != (
        n,
        facts["objective"],
        facts["num_class"],
    ):
        raise UploadRejected(
            "corrupt",
            "XGBoost reads different facts from the model than its document states "
            f"({info.num_features} features, {info.objective}): re-save it with Booster.save_model",
        )
    predictions = result.predictions
    smoke_source = "synthetic" if result.synthetic else "reference.csv"
    if reference is None and holdout_X is not None:
        smoke_source = "holdout.csv"
    sample = "the synthetic sample" if rows is None else "reference.csv/holdout.csv"
    check_predictions(info, predictions, len(result.rows), sample)
    checks.append("smoke_predictions")
    cost = footprint(
        result.footprint,
        model_bytes=len(result.model_ubj),
        num_features=n,
        num_outputs=num_outputs(info),
        max_depth=facts["max_depth"],
        explainable=not info.vector_leaf,
        budget=budget,
    )
    check_footprint(cost, budget)
    checks.append("inference_budget")
    n_ref = 0 if reference is None else len(reference)
    holdout_predictions = predictions[n_ref:] if holdout_X is not None else None
    smoke = predictions[:n_ref] if reference is not None else predictions

    validation: dict[str, Any] = {
        "checks": checks,
        "upload": {"filename": filename, "size": size, "sha256": upload_sha256, "kind": kind},
        "members": {m: len(b) for m, b in members.items()},
        "decompressed_bytes": sum(len(b) for b in members.values()),
        "model_format": fmt,
        "uploaded_model_size": len(model_raw),
        "model_size": len(result.model_ubj),
        "saved_with": facts["saved_with"],  # the uploaded file's, not the re-saved one's
        "feature_names_source": names_source,
        "smoke": {
            "source": smoke_source,
            "rows": len(smoke),
            "min": float(np.min(smoke)) if smoke.size else None,
            "max": float(np.max(smoke)) if smoke.size else None,
        },
        "reference_rows": n_ref,
        "holdout_rows": 0 if holdout_X is None else len(holdout_X),
        "load_seconds": round(load_seconds, 3),
        # The sandbox child's peak RSS: with this process's, what the refresh function holds.
        "sandbox_peak_mb": _mb(result.footprint.get("child_peak_bytes", 0)),
    }
    return ModelUpload(
        model_ubj=result.model_ubj,
        sha256=hashlib.sha256(result.model_ubj).hexdigest(),
        upload_sha256=upload_sha256,
        upload_size=size,
        info=info,
        feature_names=list(names),
        feature_types=list(types),
        declared=declared,
        reference=reference,
        holdout_X=holdout_X,
        holdout_y=holdout_y,
        label=label_name,
        smoke_predictions=smoke,
        smoke_check=smoke_check_record(result.rows, predictions),
        holdout_predictions=holdout_predictions,
        validation=validation,
        footprint=cost,
    )


def _model_member(
    data: bytes, filename: str, kind: str, limits: Limits, checks: list[str]
) -> tuple[dict[str, bytes], str, bytes, ModelFormat]:
    """(members, the model's name, its bytes, its format) of a bare model or a package."""
    members: dict[str, bytes]
    if kind == "targz":
        members = read_package(data, limits)
        checks.append("archive")
        present = [m for m in MODEL_MEMBERS if m in members]
        if not present:
            raise UploadRejected(
                "missing_model",
                "the package has no model.ubj or model.json: add the model written by "
                "Booster.save_model",
            )
        if len(present) > 1:
            raise UploadRejected(
                "duplicate_member",
                "the package holds both model.ubj and model.json: keep one of them",
            )
        model_name = present[0]
        for name, content in members.items():
            if content:
                _refuse_serialized_python(content, f"{name} in the package")
        model_raw = members[model_name]
        if not model_raw:
            raise UploadRejected("empty", f"{model_name} in the package is empty")
        model_raw = model_raw.removeprefix(b"\xef\xbb\xbf")
        if model_raw.lstrip()[:1] != b"{":
            raise UploadRejected(
                "unknown_format", f"{model_name} in the package is not an XGBoost model"
            )
        fmt: ModelFormat = _json_or_ubj(model_raw)
    else:
        members = {}
        model_name = filename
        model_raw = data.removeprefix(b"\xef\xbb\xbf")
        fmt = cast(ModelFormat, kind)
    if len(model_raw) > limits.max_member_bytes:
        raise UploadRejected(
            "too_large", f"the model is {len(model_raw)} bytes, more than {limits.max_member_bytes}"
        )
    return members, model_name, model_raw, fmt


def _document_facts(
    model_raw: bytes, fmt: ModelFormat, model_name: str, limits: Limits
) -> dict[str, Any]:
    """The model document's facts (no XGBoost), refused when treeserve cannot serve it."""
    if fmt == "json" and len(model_raw) > limits.max_json_model_bytes:
        raise UploadRejected(
            "too_large",
            f"the JSON model is {len(model_raw)} bytes, more than the "
            f"{limits.max_json_model_bytes} allowed for JSON: save it as UBJ "
            "(Booster.save_model('model.ubj')), which is smaller and faster to check",
        )
    facts = parse_model_document(model_raw, fmt, model_name)
    if facts["num_features"] > limits.max_features:
        raise UploadRejected(
            "too_many_features",
            f"the model has {facts['num_features']} features, more than the "
            f"{limits.max_features} allowed",
        )
    if facts["num_features"] < 1:
        raise UploadRejected("corrupt", "the model has no features")
    if facts["booster"] == "gblinear":
        raise UploadRejected(
            "unsupported_booster",
            f"{model_name} is a linear model (booster='gblinear'), which XGBoost cannot "
            "predict in place (treeserve's serving path) nor explain with TreeSHAP: retrain "
            "with booster='gbtree' (the default) or 'dart', or serve it yourself with "
            "Booster.predict(DMatrix(...))",
        )
    return facts


def _feature_layout(
    facts: dict[str, Any],
    declared: dict[str, Any],
    tables: Mapping[str, _Table],
    label_name: str | None,
) -> tuple[list[str], str, list[str], Any]:
    """(names, where they came from, types, categories), checked against the model's splits.

    Names: the model's own, else the manifest's, else a CSV header, else f0..f{n-1}."""
    n = facts["num_features"]
    names_source = "model"
    names: list[str] | None = facts["feature_names"]
    if names is None and "feature_names" in declared:
        names, names_source = declared["feature_names"], "manifest.json"
    if names is None:
        for member, table in tables.items():
            header = [h for h in table.header if h != label_name]
            if len(header) != n:
                raise UploadRejected(
                    "csv_mismatch",
                    f"{member} has {len(header)} feature columns, the model has {n} features",
                )
            names, names_source = header, member
            break
    if names is None:
        names, names_source = [f"f{i}" for i in range(n)], "default"
    types: list[str] = facts["feature_types"] or declared.get("feature_types") or ["float"] * n
    categories = facts.get("categories") or declared.get("categories")
    types_source = "the model" if facts["feature_types"] else "manifest.json"
    check_types_against_splits(types, names, facts, types_source)
    check_drift_against_features(declared.get("drift"), names, types)
    return names, names_source, types, categories


def _matrices(
    tables: Mapping[str, _Table],
    names: list[str],
    label_name: str | None,
    categories: Any,
    *,
    task: str,
    declared: dict[str, Any],
    num_class: int,
    checks: list[str],
) -> tuple[Any, Any, Any]:
    """(reference rows, holdout rows, holdout labels) from the package's CSVs, None if absent."""
    reference = holdout_X = holdout_y = None
    if "reference.csv" in tables:
        reference = _feature_matrix(
            tables["reference.csv"], names, "reference.csv", label_name, categories
        )
        checks.append("reference_csv")
    if "holdout.csv" in tables:
        assert label_name is not None  # noqa: S101 - set by the caller when a holdout exists
        holdout_X = _feature_matrix(
            tables["holdout.csv"], names, "holdout.csv", label_name, categories
        )
        holdout_y = _labels(
            tables["holdout.csv"], label_name, task, declared.get("class_names"), num_class
        )
        checks.append("holdout_csv")
    return reference, holdout_X, holdout_y
