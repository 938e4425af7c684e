"""Category values in request bodies and package manifests (see tests/integration/test_categorical)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import xgboost as xgb

from treeserve.errors import InputMismatch, UploadRejected
from treeserve.model.package import read_upload
from treeserve.serving.inputs import FeatureSchema, parse_body

SCHEMA = FeatureSchema(["plan", "k", "x"], {"plan": ["bronze", "gold"], "k": [3, 7, 10]})


def parse(body: bytes, ctype: str = "application/json") -> np.ndarray:
    return parse_body(body, ctype, SCHEMA, max_rows=100, max_bytes=1 << 20).X


def test_strings_are_values_and_numbers_codes_for_integer_categories() -> None:
    X = parse(b'{"instances": [["gold", "7", 1.5], [0, 7, null], [null, "10", 2]]}')
    np.testing.assert_array_equal(X, np.array([[1, 1, 1.5], [0, 7, np.nan], [np.nan, 2, 2]], "f4"))


def test_csv_fields_are_values_headerless_or_not() -> None:
    np.testing.assert_array_equal(
        parse(b"gold,10,1\n,3,\n", "text/csv"), np.array([[1, 2, 1], [np.nan, 0, np.nan]], "f4")
    )
    np.testing.assert_array_equal(
        parse(b"x,k,plan\n1,10,gold\n", "text/csv"), np.array([[1, 2, 1]], "f4")
    )


@pytest.mark.parametrize(
    ("body", "ctype", "feature"),
    [
        (b'{"instances": [{"plan": "platinum"}]}', "application/json", "'plan'"),
        (b'{"instances": [["gold", "5", 1]]}', "application/json", "'k'"),
        (b"gold,5,1\n", "text/csv", "'k'"),  # integer categories: CSV numbers are values
        (b'{"instances": [["gold", 3, "high"]]}', "application/json", "'x'"),
    ],
)
def test_unseen_values_and_strings_for_numbers_are_422(
    body: bytes, ctype: str, feature: str
) -> None:
    with pytest.raises(InputMismatch, match=feature):
        parse(body, ctype)


def codes_model() -> bytes:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(0, 3, 300), rng.normal(size=300)]).astype(float)
    d = xgb.DMatrix(
        X,
        label=X[:, 0] == 2,
        feature_names=["c", "x"],
        feature_types=["c", "float"],
        enable_categorical=True,
    )
    return bytes(
        xgb.train({"max_cat_to_onehot": 1, "objective": "binary:logistic"}, d, 5).save_raw("ubj")
    )


def package(manifest: dict[str, object], reference: str | None = None) -> bytes:
    out = io.BytesIO()
    members = {"model.ubj": codes_model(), "manifest.json": json.dumps(manifest).encode()}
    if reference is not None:
        members["reference.csv"] = reference.encode()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def test_manifest_categories_name_a_model_trained_on_codes() -> None:
    upload = read_upload(
        package({"categories": {"c": ["a", "b", "z"]}}, "c,x\nz,1\nb,\n"), "m.tar.gz"
    )
    assert upload.to_manifest("m").categories == {"c": ["a", "b", "z"]}
    assert upload.reference is not None
    np.testing.assert_array_equal(upload.reference, [[2, 1], [1, np.nan]])


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ({"x": ["a", "b", "c"]}, "not categorical"),
        ({"c": ["a"]}, "code 1"),  # the splits name codes 0 and 1
        ({"c": ["a", "a", "b"]}, "unique"),
    ],
)
def test_bad_manifest_categories_are_refused(
    categories: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(UploadRejected, match=message):
        read_upload(package({"categories": categories}), "m.tar.gz")
