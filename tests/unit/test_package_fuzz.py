"""Property tests: any bytes give a verdict (a ModelUpload or UploadRejected), never a crash."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TrainedModel, train
from tests.corpus import make_package
from treeserve.errors import UploadRejected
from treeserve.model.package import (
    Limits,
    ModelUpload,
    parse_manifest,
    parse_model_document,
    read_package,
    read_upload,
    sniff,
)
from treeserve.model.sandbox import UBJDecodeError, decode_ubj

pytestmark = pytest.mark.unit

MODEL = train("binary:logistic", n=120, rounds=3)
UBJ = MODEL.ubj()
JSON = MODEL.json()
PACKAGE = make_package(MODEL, holdout=False)
SMALL = Limits(max_decompressed_bytes=1 << 20, max_member_bytes=1 << 20)


def _verdict(check: Callable[[], object]) -> str | None:
    """The rejection code, or None when accepted. Any other exception fails the test."""
    try:
        check()
    except UploadRejected as exc:
        return exc.code
    return None


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=2048))
def test_ubj_reader_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(UBJDecodeError):
        decode_ubj(data)


@FAST
@given(edits)
def test_mutated_ubj_model_gets_a_verdict_without_xgboost(changes: list[tuple[int, int]]) -> None:
    code = _verdict(lambda: parse_model_document(_mutate(UBJ, changes), "ubj", "model.ubj"))
    # A mutated float32 can become NaN or infinity (one byte of its exponent): the static
    # check's own verdict, as for JSON.
    assert code in {None, "corrupt", "pickle", "non_finite"}


@FAST
@given(edits)
def test_mutated_json_model_gets_a_verdict_without_xgboost(changes: list[tuple[int, int]]) -> None:
    code = _verdict(lambda: parse_model_document(_mutate(JSON, changes), "json", "model.json"))
    # A mutation can also make a name XGBoost refuses, a non-finite value, a deep chain or a
    # huge category code: each is one of the static checks' own verdicts.
    assert code in {
        None,
        "corrupt",
        "pickle",
        "bad_feature_names",
        "non_finite",
        "too_deep",
        "bad_category",
    }


@FAST
@given(st.binary(max_size=4096), st.sampled_from(["model.ubj", "model.json", "m.tar.gz", "x"]))
def test_sniff_on_any_bytes(data: bytes, filename: str) -> None:
    assert _verdict(lambda: sniff(data, filename)) in {
        None,
        "empty",
        "pickle",
        "unknown_format",
        "corrupt",
    }


@FAST
@given(edits)
def test_mutated_package_gets_a_verdict(changes: list[tuple[int, int]]) -> None:
    members: dict[str, bytes] = {}
    code = _verdict(lambda: members.update(read_package(_mutate(PACKAGE, changes), SMALL)))
    assert code is not None or set(members) <= {"model.ubj", "reference.csv"}


@FAST
@given(st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_manifest_parser_on_any_bytes(data: bytes) -> None:
    assert _verdict(lambda: parse_manifest(data)) in {None, "manifest_invalid"}


def _float_payloads(ubj: bytes, key: str) -> list[tuple[int, int]]:
    """(offset, length) of every float32 typed-array payload stored under ``key``."""
    needle = key.encode() + b"[$d#L"
    spans, start = [], 0
    while (at := ubj.find(needle, start)) != -1:
        count_at = at + len(needle)
        (count,) = struct.unpack(">q", ubj[count_at : count_at + 8])
        spans.append((count_at + 8, 4 * count))
        start = count_at
    return spans


def test_mutated_leaf_values_reach_xgboost_in_the_child_only(binary_model: TrainedModel) -> None:
    """Random bytes inside the trees' float arrays keep the structure valid, so the model
    really reaches XGBoost (in the child): every verdict is a clean one."""
    base = binary_model.ubj()
    spans = _float_payloads(base, "split_conditions") + _float_payloads(base, "base_weights")
    assert spans
    verdicts = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        raw = bytearray(base)
        for _ in range(12):
            offset, length = spans[int(rng.integers(len(spans)))]
            pos = offset + int(rng.integers(length))
            raw[pos] = int(rng.integers(0, 256))
        accepted: list[ModelUpload] = []
        code = _verdict(lambda: accepted.append(read_upload(bytes(raw), "model.ubj")))  # noqa: B023
        assert code in {None, "non_finite", "load_failed", "predict_failed"}
        if code is None:
            assert "load" in accepted[0].validation["checks"]
            assert np.isfinite(accepted[0].smoke_predictions).all()
        verdicts.append(code)
    assert len(verdicts) == 4
