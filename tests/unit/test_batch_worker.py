"""The batch worker's pieces without S3: line blocks over pieces, the output table, whole objects
scored from a file through the same interfaces as S3 (a real XGBoost model)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TrainedModel, train
from treeserve.batch.stream import FileReader, FileWriter, line_blocks
from treeserve.batch.worker import BatchModel, _Table, score_object
from treeserve.model.manifest import ModelManifest
from treeserve.model.predictor import Predictor, sha256_hex
from treeserve.serving.inputs import FeatureSchema

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_line_blocks_cut_anywhere_give_the_same_lines(size: int) -> None:
    text = b"h1,h2\r\n1,2\n\n3,4\n  \n5,6"  # CRLF, blank lines, no final newline
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    blocks = list(line_blocks(pieces, 2))
    assert [line for block in blocks for line in block] == [b"h1,h2", b"1,2", b"3,4", b"5,6"]
    assert all(1 <= len(block) <= 2 for block in blocks)


def batch_model(trained: TrainedModel) -> BatchModel:
    ubj = trained.ubj()
    manifest = ModelManifest.from_dict(
        {
            "name": "unit",
            "sha256": sha256_hex(ubj),
            "model_size": len(ubj),
            "xgboost_version": "3",
            "objective": trained.objective,
            "task": {"binary:logistic": "binary", "reg:squarederror": "regression"}.get(
                trained.objective, "multiclass"
            ),
            "num_features": len(trained.feature_names),
            "feature_names": trained.feature_names,
            "feature_types": ["float"] * len(trained.feature_names),
            "num_class": 3 if trained.objective.startswith("multi:") else 0,
        }
    )
    predictor = Predictor.load(ubj, manifest)
    return BatchModel("unit", 1, manifest.sha256, predictor, FeatureSchema(trained.feature_names))


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_the_direct_csv_writer_writes_what_csv_writer_writes(objective: str) -> None:
    model = batch_model(train(objective))
    rows = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    ids: list[Any] = [f"r{i}" for i in range(50)]
    direct, general = _Table("csv", model), _Table("csv", model)
    general._plain_csv = lambda *a: None  # type: ignore[method-assign]
    assert direct.encode(ids, rows) + direct.encode(ids, rows) == general.encode(
        ids, rows
    ) + general.encode(ids, rows)
    quoted = [*ids[:-1], 'needs "quotes", commas']
    assert _Table("csv", model).encode(quoted, rows) == general.__class__("csv", model)._csv(
        *_header_rows(model, quoted, rows)
    )


def _header_rows(model: BatchModel, ids: list[Any], rows: np.ndarray) -> tuple[Any, Any]:
    from treeserve.serving.endpoints import prediction_table

    p = model.predictor
    prediction = p.predict(rows)
    return prediction_table(ids, prediction.values, prediction.labels, p.class_names, None)


def test_objects_from_a_file_are_scored_as_the_booster_predicts(tmp_path: Path) -> None:
    trained = train("binary:logistic")
    model = batch_model(trained)
    X = trained.X[:23].astype(np.float32)
    X[3, 2] = np.nan
    lines = ["f5,id,f0,f1,f2,f3,f4"] + [
        ",".join(
            ["" if np.isnan(v) else repr(float(v)) for v in (r[5],)]
            + [f"row{i}"]
            + ["" if np.isnan(v) else repr(float(v)) for v in r[:5]]
        )
        for i, r in enumerate(X)
    ]
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    result = score_object(
        model,
        "in.csv",
        FileReader(source, part_bytes=97),
        FileWriter(tmp_path / "o.csv"),
        chunk_rows=5,
    )
    assert result.status == "scored", result
    assert result.rows == 23
    out = list(csv.DictReader(io.StringIO((tmp_path / "o.csv").read_text())))
    assert [r["id"] for r in out] == [f"row{i}" for i in range(23)]
    got = np.array([float(r["prediction"]) for r in out], dtype=np.float32)
    np.testing.assert_array_equal(got, trained.booster.inplace_predict(X))

    records = tmp_path / "in.jsonl"
    records.write_text(
        "".join(json.dumps({"f0": float(r[0]), "f4": float(r[4])}) + "\n" for r in X)
    )
    result = score_object(model, "in.jsonl", FileReader(records), FileWriter(tmp_path / "o.jsonl"))
    assert result.status == "scored", result
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"in.jsonl:{i}" for i in range(23)]
    only = np.full_like(X, np.nan)
    only[:, [0, 4]] = X[:, [0, 4]]
    np.testing.assert_array_equal(
        np.array([r["prediction"] for r in rows], dtype=np.float32),
        trained.booster.inplace_predict(only),
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"f0": 1}\n{"f0": "x"}\n')
    result = score_object(model, "bad.jsonl", FileReader(bad), FileWriter(tmp_path / "b.jsonl"))
    assert result.status == "failed"
    assert "lines 0..1" in str(result.reason)
    assert not (tmp_path / "b.jsonl").exists()  # nothing written for a failed object
