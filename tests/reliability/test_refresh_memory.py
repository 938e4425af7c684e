"""Issue 13, row 4: the largest package the limits allow fits the refresh function's memory.

Two packages at the caps, each refreshed in a process of its own (tests/reliability/
refresh_peak.py) whose peak RSS, plus the sandbox child's, must stay within the refresh
function's MemorySize (read from template.yaml) less a fifth of headroom:

- long decimals: reference.csv and holdout.csv of 200,000 rows (the row cap) of six features
  written with 210 digits, 244 MiB each (under the 256 MiB member cap; issue 13 measured 3.1 GB);
- wide: 9,990 rows of 2,000 features (20 million cells, the cell cap) of 9-digit decimals.

And the inference side: the footprint refresh records for the largest model the budget admits
is what a process serving it pays.

Slow (a minute each): ``make fuzz`` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import ROOT, TrainedModel
from tests.corpus import file_member, long_decimals_csv, repeated_trees_model, tar_gz
from treeserve.model.package import Limits, read_upload
from treeserve.settings import INFERENCE_RUNTIME_MB
from treeserve_cli.template import load_template

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HEADROOM = 0.2


def _refresh_memory_mb() -> int:
    return load_template(ROOT / "template.yaml").function("refresh").memory_size


def _package(ubj: bytes, names: list[str], rows: int, digits: int) -> bytes:
    members = [
        file_member("model.ubj", ubj),
        file_member("reference.csv", long_decimals_csv(names, rows, digits)),
        file_member("holdout.csv", long_decimals_csv(names, rows, digits, label="label", seed=1)),
    ]
    return tar_gz(members, compresslevel=1)


def _refresh_peak(package: bytes, tmp_path: Path) -> dict[str, Any]:
    limits = Limits()
    assert len(package) <= limits.max_upload_bytes
    path = tmp_path / "model.tar.gz"
    path.write_bytes(package)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reliability.refresh_peak", str(path)],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=280,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _assert_fits(result: dict[str, Any]) -> None:
    assert result["status"] == "promoted", result
    total = result["parent_peak_mb"] + result["child_peak_mb"]
    assert total <= _refresh_memory_mb() * (1 - HEADROOM), result


def test_row4_two_csvs_of_long_decimals_at_the_row_cap(
    binary_model: TrainedModel, tmp_path: Path
) -> None:
    limits = Limits()
    rows = limits.max_csv_rows
    package = _package(binary_model.ubj(), binary_model.feature_names, rows, 210)
    _assert_fits(_refresh_peak(package, tmp_path))


def test_two_csvs_at_the_cell_cap(tmp_path: Path) -> None:
    limits = Limits()
    features = 2_000
    rows = limits.max_csv_cells // features - 10  # the label column counts as a cell too
    rng = np.random.default_rng(0)
    X = rng.random((300, features))
    names = [f"f{i}" for i in range(features)]
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(X, label=(X[:, 0] > 0.5).astype(int), feature_names=names),
        num_boost_round=20,
    )
    package = _package(bytes(booster.save_raw("ubj")), names, rows, 9)
    _assert_fits(_refresh_peak(package, tmp_path))


def test_the_footprint_predicts_what_the_inference_function_pays(
    binary_model: TrainedModel, tmp_path: Path
) -> None:
    """The largest model of its kind the 1024 MB budget admits (38,000 trees): its manifest's
    footprint against a fresh process that loads it and explains 1000 rows as the inference
    function does (tests/reliability/inference_peak.py)."""
    upload = read_upload(repeated_trees_model(binary_model, 38_000), "model.ubj")
    fp = upload.footprint
    assert fp is not None
    assert fp["budget_mb"] * 0.8 < fp["peak_mb"] <= fp["budget_mb"]
    model, manifest = tmp_path / "model.ubj", tmp_path / "manifest.json"
    model.write_bytes(upload.model_ubj)
    manifest.write_bytes(upload.to_manifest("default").to_json())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.inference_peak",
            str(model),
            str(manifest),
            "1000",
        ],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=280,
    )
    served = json.loads(proc.stdout)
    assert served["peak_mb"] <= fp["peak_mb"] * 1.05 + 2, (served, fp)
    assert abs(served["loaded_mb"] - fp["loaded_mb"]) <= 0.1 * fp["loaded_mb"] + 2, (served, fp)
    # The runtime the budget sets aside covers the process before any model is loaded.
    assert served["runtime_mb"] <= INFERENCE_RUNTIME_MB
