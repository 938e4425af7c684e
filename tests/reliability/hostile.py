"""Hostile uploads beyond tests/corpus.py: crafted trees, deep nesting, polyglots, exploits.

Each case says which refusal codes are acceptable (several reasons can be right: a crafted tree
may be caught by a structural check or by the sandboxed load crashing).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import TrainedModel
from tests.corpus import file_member, make_package, reference_csv, tar_gz

# A split on feature 0 at this threshold sends every ordinary row left; only a request with a
# feature-0 value above it reaches the crafted right subtree.
TRIGGER_THRESHOLD = 1e30
TRIGGER_VALUE = 1e31


@dataclass(frozen=True)
class HostileUpload:
    name: str
    filename: str
    data: bytes
    codes: frozenset[str]  # any of these refusal codes is right


class _Exploit:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def exploit_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Exploit(marker), protocol=2)


def _trees(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["learner"]["gradient_booster"]["model"]["trees"]  # type: ignore[no-any-return]


def latent_crash_model(good: TrainedModel, how: str = "split_index") -> bytes:
    """A JSON model that predicts normally on ordinary rows but reads out of bounds (and
    crashes XGBoost) for a row whose feature 0 exceeds TRIGGER_THRESHOLD.

    The root of tree 0 is rewritten to split on feature 0 at TRIGGER_THRESHOLD (missing goes
    left), and the first node of its right subtree gets a split feature index far outside the
    model's features. XGBoost loads it without complaint.
    """
    doc = json.loads(good.json())
    tree = _trees(doc)[0]
    right = tree["right_children"][0]
    assert tree["left_children"][right] != -1, "the right subtree must have a split"
    tree["split_indices"][0] = 0
    tree["split_conditions"][0] = TRIGGER_THRESHOLD
    tree["default_left"][0] = 1
    if how == "split_index":
        tree["split_indices"][right] = 100_000_000
    else:
        raise ValueError(how)
    return json.dumps(doc).encode()


def _edited(good: TrainedModel, edit: Any) -> bytes:
    doc = json.loads(good.json())
    edit(doc)
    return json.dumps(doc).encode()


def _deep_ubj(depth: int) -> bytes:
    # {"learner": [[[[...]]]]}: arrays nested far beyond any real model.
    key = b"learner"
    return b"{i" + bytes([len(key)]) + key + b"[" * depth + b"]" * depth + b"}"


def _ubj_huge_typed_array() -> bytes:
    # {"learner": [$d#L <2**62>}: a typed float32 array claiming 2**62 elements in 20 bytes.
    key = b"learner"
    return b"{i" + bytes([len(key)]) + key + b"[$d#L" + struct.pack(">q", 1 << 62) + b"}"


def hostile_uploads(good: TrainedModel, marker: Path) -> list[HostileUpload]:
    """The extra hostile cases (``good``: the binary fixture model, features f0..f5)."""
    ref = reference_csv(good)
    js = good.json()
    boom = exploit_pickle(marker)
    cases: list[HostileUpload] = []

    def add(name: str, filename: str, data: bytes, *codes: str) -> None:
        cases.append(HostileUpload(name, filename, data, frozenset(codes)))

    # Crafted trees. With a reference sample the sandbox smoke-tests only ordinary rows, so a
    # branch that crashes XGBoost on unusual input is only found by checking the tree structure.
    latent = latent_crash_model(good)
    add(
        "latent_crash_branch_with_reference",
        "model.tar.gz",
        tar_gz([file_member("model.json", latent), file_member("reference.csv", ref)]),
        "corrupt",
        "load_failed",
    )
    add("latent_crash_branch_bare", "model.json", latent, "corrupt", "load_failed")

    def child_out_of_range(doc: dict[str, Any]) -> None:
        _trees(doc)[0]["left_children"][0] = 10**6

    def cyclic(doc: dict[str, Any]) -> None:
        tree = _trees(doc)[0]
        node = tree["left_children"][0]
        tree["left_children"][node] = 0  # back to the root

    def huge_num_nodes(doc: dict[str, Any]) -> None:
        _trees(doc)[0]["tree_param"]["num_nodes"] = str(10**9)

    def billion_features(doc: dict[str, Any]) -> None:
        doc["learner"]["learner_model_param"]["num_feature"] = str(10**9)
        doc["learner"]["feature_names"] = []
        doc["learner"]["feature_types"] = []

    def nan_base_score(doc: dict[str, Any]) -> None:
        doc["learner"]["learner_model_param"]["base_score"] = "NaN"

    def negative_features(doc: dict[str, Any]) -> None:
        doc["learner"]["learner_model_param"]["num_feature"] = "-6"

    add(
        "child_index_out_of_range",
        "model.json",
        _edited(good, child_out_of_range),
        "corrupt",
        "load_failed",
    )
    add("cyclic_tree", "model.json", _edited(good, cyclic), "corrupt", "load_failed", "timeout")
    add("huge_num_nodes", "model.json", _edited(good, huge_num_nodes), "corrupt", "load_failed")
    add(
        "declared_billion_features",
        "model.json",
        _edited(good, billion_features),
        "too_many_features",
        "corrupt",
    )
    add(
        "nan_base_score",
        "model.json",
        _edited(good, nan_base_score),
        "non_finite",
        "corrupt",
        "load_failed",
    )
    add("negative_feature_count", "model.json", _edited(good, negative_features), "corrupt")

    # Deep nesting and size claims in the document itself.
    deep_json = b'{"learner": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    add("deep_nesting_json", "model.json", deep_json, "corrupt")
    add("deep_nesting_ubj", "model.ubj", _deep_ubj(200_000), "corrupt")
    add("ubj_typed_array_claims_2e62", "model.ubj", _ubj_huge_typed_array(), "corrupt")
    add(
        "json_nan_literals",
        "model.json",
        js.replace(b'"base_score":"', b'"base_score":NaN,"x":"'),
        "corrupt",
        "non_finite",
        "load_failed",
    )

    # Polyglots and disguises around an exploit pickle (creates ``marker`` if ever unpickled).
    add("exploit_pickle_pkl", "model.pkl", boom, "pickle")
    add("exploit_pickle_as_ubj", "model.ubj", boom, "pickle")
    add("exploit_pickle_as_json", "model.json", boom, "pickle")
    add(
        "exploit_pickle_gzipped_as_ubj",
        "model.ubj",
        gzip.compress(boom),
        "pickle",
        "unknown_format",
    )
    add(
        "exploit_pickle_as_reference",
        "model.tar.gz",
        make_package(good, extra_members={"reference.csv": boom}),
        "pickle",
    )
    add(
        "exploit_pickle_as_manifest",
        "model.tar.gz",
        make_package(good, extra_members={"manifest.json": boom}),
        "pickle",
        "manifest_invalid",
    )
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("model.pkl", boom)
    add(
        "targz_zip_polyglot",
        "model.tar.gz",
        make_package(good) + zipped.getvalue(),
        "corrupt",
        "pickle",
        "unknown_format",
    )
    add("json_model_then_zip", "model.json", js + zipped.getvalue(), "corrupt", "pickle")
    add("ubj_then_gzip_pickle", "model.ubj", good.ubj() + gzip.compress(boom), "corrupt", "pickle")
    return cases
