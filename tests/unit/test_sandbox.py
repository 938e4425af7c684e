"""treeserve.model.sandbox: untrusted model bytes are loaded in a child process, never in ours."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

import treeserve
from tests.conftest import TrainedModel, train
from tests.corpus import crafted_ubj, repeated_trees_model
from treeserve.errors import UploadRejected
from treeserve.model.sandbox import (
    SandboxUnavailable,
    UBJDecodeError,
    _child_env,
    decode_ubj,
    inspect_model,
    model_facts,
    split_thresholds,
    synthetic_rows,
)

pytestmark = pytest.mark.unit


def _load(raw: bytes) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def test_good_model_round_trips_as_ubj(any_model: TrainedModel) -> None:
    rows = any_model.X[:40]
    result = inspect_model(any_model.ubj(), "ubj", rows)

    again = _load(result.model_ubj)
    assert result.model_ubj[:1] == b"{"
    np.testing.assert_array_equal(
        again.inplace_predict(rows), any_model.booster.inplace_predict(rows)
    )
    np.testing.assert_array_equal(result.predictions, any_model.booster.inplace_predict(rows))
    assert result.synthetic is False
    info = result.info
    assert info.objective == any_model.objective
    assert info.num_features == any_model.X.shape[1]
    assert info.feature_names == any_model.feature_names
    assert info.num_trees == len(any_model.booster.get_dump())
    assert info.xgboost_version == xgb.__version__
    assert info.num_class == (3 if any_model.objective.startswith("multi:") else 0)


def test_json_model_is_resaved_as_ubj(binary_model: TrainedModel) -> None:
    result = inspect_model(binary_model.json(), "json", None)

    assert result.model_ubj != binary_model.json()
    assert not result.model_ubj.lstrip().startswith(b'{"')  # UBJ, not JSON text
    rows = binary_model.X[:25]
    np.testing.assert_array_equal(
        _load(result.model_ubj).inplace_predict(rows), binary_model.booster.inplace_predict(rows)
    )
    # No rows given: a synthetic sample (zeros, all-missing, around the split thresholds).
    assert result.synthetic is True
    assert result.rows.shape == (12, 6)
    np.testing.assert_array_equal(result.rows[0], np.zeros(6))
    assert np.isnan(result.rows[1]).all()
    np.testing.assert_allclose(
        result.predictions, binary_model.booster.inplace_predict(result.rows), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("empty", b""),  # aborts the process in xgboost-cpu 3.2
        ("garbage", os.urandom(256)),
        ("text", b"not a model at all\n"),
    ],
)
def test_unloadable_bytes_are_refused_without_killing_us(name: str, raw: bytes) -> None:
    with pytest.raises(UploadRejected) as caught:
        inspect_model(raw, "ubj", None)
    assert caught.value.code == "load_failed"
    assert "save_model" in caught.value.message  # says what to do next
    assert os.getpid() > 0  # still here


def test_truncated_model_is_refused(binary_model: TrainedModel) -> None:
    with pytest.raises(UploadRejected) as caught:
        inspect_model(binary_model.ubj()[:700], "ubj", None)
    assert caught.value.code == "load_failed"


def _many_trees_json(model: TrainedModel, copies: int) -> bytes:
    """The model's JSON with its trees repeated ``copies`` times (a model slow to load)."""
    doc = json.loads(model.json())
    gb = doc["learner"]["gradient_booster"]["model"]
    trees = [dict(t) for _ in range(copies) for t in gb["trees"]]
    for i, tree in enumerate(trees):
        tree["id"] = i
    gb["trees"] = trees
    gb["tree_info"] = [0] * len(trees)
    gb["iteration_indptr"] = list(range(len(trees) + 1))
    gb["gbtree_model_param"]["num_trees"] = str(len(trees))
    return json.dumps(doc).encode()


def test_timeout_is_enforced(binary_model: TrainedModel) -> None:
    slow = _many_trees_json(binary_model, 300)  # 3000 trees
    with pytest.raises(UploadRejected) as caught:
        inspect_model(slow, "json", None, timeout=0.1)
    assert caught.value.code == "timeout"
    # The same model within a generous timeout loads: the limit, not the model, refused it.
    assert inspect_model(slow, "json", None, timeout=120).info.num_trees == 3000


def test_a_memory_limit_too_small_to_start_is_not_the_models_fault(
    binary_model: TrainedModel,
) -> None:
    with pytest.raises(SandboxUnavailable, match="memory limit 48 MiB"):
        inspect_model(binary_model.ubj(), "ubj", None, memory_bytes=48 << 20)


def test_a_load_that_runs_out_of_memory_is_too_big_for_inference(
    binary_model: TrainedModel,
) -> None:
    """Issue 13 row 2 at the sandbox: 20,000 trees need more than 450 MiB of address space to
    load (the same model loads with 800 MiB). Not a corrupt file: too big, with what to do."""
    big = repeated_trees_model(binary_model, 20_000)
    with pytest.raises(UploadRejected) as caught:
        inspect_model(big, "ubj", None, memory_bytes=450 << 20)
    assert caught.value.code == "too_big_for_inference"
    assert "450 MiB" in caught.value.message
    assert "fewer or shallower trees" in caught.value.message
    assert "re-save" not in caught.value.message
    assert inspect_model(big, "ubj", None, memory_bytes=800 << 20).info.num_trees == 20_000


def test_wrong_width_rows_fail_prediction(binary_model: TrainedModel) -> None:
    with pytest.raises(UploadRejected) as caught:
        inspect_model(binary_model.ubj(), "ubj", np.zeros((3, 2)))
    assert caught.value.code == "predict_failed"


# --- the pure-Python UBJ reader (used before any child is spawned) ----------------------------


def test_ubj_facts_equal_json_facts(multiclass_model: TrainedModel) -> None:
    ubj_doc, end = decode_ubj(multiclass_model.ubj())
    assert end == len(multiclass_model.ubj())
    from_ubj = model_facts(ubj_doc)
    from_json = model_facts(json.loads(multiclass_model.json()))
    assert from_ubj == from_json
    assert from_ubj["num_class"] == 3
    assert from_ubj["num_trees"] == 30
    assert from_ubj["feature_names"] == multiclass_model.feature_names


def test_ubj_reader_reports_trailing_bytes(binary_model: TrainedModel) -> None:
    raw = binary_model.ubj()
    _, end = decode_ubj(raw + b"\x80\x04trailing")
    assert end == len(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[" * 500,  # nesting bomb
        b"[$d#L\x7f\xff\xff\xff\xff\xff\xff\xff",  # huge typed array in a few bytes
        b"[$Z#L\x00\x00\x00\x00\x7f\xff\xff\xff",  # huge zero-byte elements
        b"SL\x00\x00\x00\x00\x00\x00\x10\x00abc",  # string longer than the data
        b"{L\x00\x00\x00\x00\x00\x00\x00\x01aX",  # unknown marker
    ],
)
def test_ubj_reader_refuses_malformed_documents(raw: bytes) -> None:
    with pytest.raises(UBJDecodeError):
        decode_ubj(raw)


def _facts_of_prefix(raw: bytes) -> dict[str, object]:
    doc, _ = decode_ubj(raw)
    return model_facts(doc)  # a prefix that happens to decode still lacks the learner


def test_truncation_anywhere_is_detected(regression_model: TrainedModel) -> None:
    raw = regression_model.ubj()
    for cut in range(1, len(raw), max(1, len(raw) // 97)):
        with pytest.raises((UBJDecodeError, ValueError)):
            _facts_of_prefix(raw[:cut])


def test_synthetic_rows_straddle_split_thresholds() -> None:
    model = train("reg:squarederror", d=3, rounds=4)
    doc, _ = decode_ubj(model.ubj())
    thresholds = split_thresholds(doc, 3)
    rows = synthetic_rows(thresholds)
    assert rows.shape == (12, 3)
    for j, t in enumerate(thresholds):
        if len(t):
            lo, hi = rows[2, j], rows[3, j]  # around the smallest threshold
            assert lo < t.min() < hi


def test_child_imports_from_the_parents_sys_path(
    tmp_path: Path, binary_model: TrainedModel
) -> None:
    """As in Lambda: treeserve is importable only through an entry the parent put on sys.path."""
    task = tmp_path / "task"
    shutil.copytree(Path(treeserve.__file__).parent, task / "treeserve")
    model = tmp_path / "model.ubj"
    model.write_bytes(binary_model.ubj())
    site_dirs = [
        p for p in sys.path if p.endswith(("site-packages", "lib-dynload")) or "python3" in p
    ]
    script = (
        "import sys\n"
        f"sys.path[:] = [{str(task)!r}] + {site_dirs!r}\n"
        "import treeserve.model.sandbox as s\n"
        f"assert s.__file__.startswith({str(task)!r}), s.__file__\n"
        "r = s.inspect_model(open(sys.argv[1], 'rb').read(), 'ubj', None)\n"
        "print(r.info.num_features, r.info.objective)\n"
    )
    # -S: no site-packages hooks (the editable install's .pth) in the parent either.
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["6", "binary:logistic"]


@pytest.mark.parametrize(("key", "value"), [("split_indices", 10**9), ("left_children", 10**6)])
def test_a_model_that_segfaults_xgboost_is_contained(
    binary_model: TrainedModel, key: str, value: int
) -> None:
    # Structurally valid UBJ whose tree indices XGBoost trusts: it crashes the process that
    # loads it. (treeserve.model.package refuses these before loading; here we load them anyway.)
    with pytest.raises(UploadRejected) as caught:
        inspect_model(crafted_ubj(binary_model.ubj(), key, value), "ubj", None)
    assert caught.value.code == "load_failed"
    assert "crashed" in caught.value.message


def test_the_child_gets_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = _child_env()
    assert not any(k.startswith(("AWS_", "PYTHON")) for k in env)
    assert env["OMP_NUM_THREADS"] == "1"
