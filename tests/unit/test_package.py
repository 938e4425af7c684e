"""treeserve.model.package: every bad upload refused with its own reason, valid ones accepted intact."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import TrainedModel, train
from tests.corpus import (
    HOLDOUT_ROWS,
    REFERENCE_ROWS,
    BadUpload,
    bad_uploads,
    csv_bytes,
    file_member,
    gzip_bomb,
    make_package,
    tar_gz,
)
from treeserve.errors import UploadRejected
from treeserve.model.manifest import ModelManifest
from treeserve.model.package import (
    Limits,
    ModelUpload,
    check_drift_against_features,
    check_predictions,
    read_upload,
)
from treeserve.model.sandbox import ModelInfo

pytestmark = pytest.mark.unit

# Listed here so each case is its own test id; test_corpus_is_complete keeps the list honest.
CASES = [
    "pickle",
    "pickle_protocol2",
    "pickle_protocol0",
    "joblib_zlib",
    "joblib_gzip",
    "pickle_renamed_ubj",
    "pickle_renamed_targz",
    "numpy_object_array",
    "polyglot_pickle_after_ubj",
    "polyglot_pickle_after_json",
    "pickle_as_model_in_tar",
    "pickle_as_reference_in_tar",
    "empty",
    "garbage",
    "text",
    "zip_archive",
    "gzipped_bare_model",
    "uncompressed_tar",
    "truncated_ubj",
    "truncated_json",
    "ubj_with_trailing_bytes",
    "json_not_a_model",
    "truncated_gzip",
    "corrupt_gzip",
    "unknown_objective",
    "symlink_member",
    "hardlink_member",
    "device_member",
    "fifo_member",
    "absolute_path",
    "dotdot_path",
    "duplicate_member",
    "ubj_and_json",
    "unexpected_member",
    "nested_member",
    "too_many_members",
    "gzip_bomb",
    "trailing_zeros_bomb",
    "package_without_model",
    "empty_model_member",
    "split_on_missing_feature",
    "negative_split_index",
    "child_outside_tree",
    "cyclic_tree",
    "tree_in_missing_output",
    "huge_feature_count",
    "nan_leaves",
    "infinite_leaves",
    "nan_leaves_in_package",
    "manifest_feature_count",
    "manifest_feature_names",
    "manifest_class_names_count",
    "manifest_threshold_range",
    "manifest_threshold_zero",
    "manifest_unknown_key",
    "manifest_not_json",
    "reference_wrong_columns",
    "reference_too_narrow",
    "reference_ragged_row",
    "reference_non_numeric",
    "reference_too_many_rows",
    "holdout_missing_label",
    "holdout_label_not_a_class",
]


@pytest.fixture(scope="module")
def corpus(binary_model: TrainedModel) -> dict[str, BadUpload]:
    return {case.name: case for case in bad_uploads(binary_model)}


def test_corpus_is_complete(corpus: dict[str, BadUpload]) -> None:
    assert sorted(corpus) == sorted(CASES)
    assert len(corpus) >= 25
    assert len({case.code for case in corpus.values()}) >= 20  # distinct reasons, not one catch-all
    assert max(len(case.data) for case in corpus.values()) < 4 << 20  # the bombs stay small


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to unpickle fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle an upload")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.mark.parametrize("name", CASES)
def test_bad_upload_is_refused_with_its_reason(
    name: str, corpus: dict[str, BadUpload], no_unpickling: None
) -> None:
    case = corpus[name]
    with pytest.raises(UploadRejected) as caught:
        read_upload(case.data, case.filename)
    assert caught.value.code == case.code, caught.value.message
    assert len(caught.value.message) > 20  # says what is wrong and what to do


# --- valid uploads -------------------------------------------------------------------------------


def _upload(model: TrainedModel, form: str) -> ModelUpload:
    if form == "ubj":
        return read_upload(model.ubj(), "model.ubj")
    if form == "json":
        return read_upload(model.json(), "model.json")
    classes = {"binary:logistic": ["no", "yes"], "multi:softprob": ["a", "b", "c"]}
    manifest = {"description": "test model", "metrics": {"auc": 0.9}, "label": "label"}
    if model.objective in classes:
        manifest["class_names"] = classes[model.objective]
    return read_upload(make_package(model, manifest=manifest), "model.tar.gz")


def _predict(model_ubj: bytes, X: np.ndarray) -> np.ndarray:
    booster = xgb.Booster()
    booster.load_model(bytearray(model_ubj))
    return np.asarray(booster.inplace_predict(X))


@pytest.mark.parametrize("form", ["ubj", "json", "package"])
def test_valid_upload_is_accepted(any_model: TrainedModel, form: str) -> None:
    upload = _upload(any_model, form)

    assert upload.sha256 == hashlib.sha256(upload.model_ubj).hexdigest()
    data = any_model.ubj() if form == "ubj" else any_model.json() if form == "json" else None
    if data is not None:
        assert upload.upload_sha256 == hashlib.sha256(data).hexdigest()
        assert upload.upload_size == len(data)
    np.testing.assert_array_equal(
        _predict(upload.model_ubj, any_model.X), any_model.booster.inplace_predict(any_model.X)
    )
    assert upload.feature_names == any_model.feature_names
    assert upload.feature_types == ["float"] * 6
    assert upload.info.objective == any_model.objective
    assert np.isfinite(upload.smoke_predictions).all()

    manifest = upload.to_manifest("churn")
    assert manifest.sha256 == upload.sha256
    assert manifest.model_size == len(upload.model_ubj)
    assert manifest.num_features == 6
    assert manifest.version is None
    assert manifest.reference is None
    assert (
        manifest.task
        == {
            "binary:logistic": "binary",
            "multi:softprob": "multiclass",
            "reg:squarederror": "regression",
        }[any_model.objective]
    )
    assert manifest.validation["checks"][-2:] == ["smoke_predictions", "inference_budget"]
    # What the version costs the inference function, measured in the sandbox child.
    fp = manifest.footprint
    assert fp is not None
    assert fp["measured"]
    assert 0 < fp["loaded_mb"] <= fp["peak_mb"] < fp["budget_mb"]
    assert fp["inference_memory_mb"] == 1024
    assert fp["explain_rows"] == 1000

    if form == "package":
        assert upload.reference is not None
        assert upload.holdout_X is not None
        assert upload.holdout_y is not None
        np.testing.assert_array_equal(upload.reference, any_model.X[:REFERENCE_ROWS])
        holdout = slice(REFERENCE_ROWS, REFERENCE_ROWS + HOLDOUT_ROWS)
        np.testing.assert_array_equal(upload.holdout_X, any_model.X[holdout])
        np.testing.assert_allclose(upload.holdout_y, any_model.y[holdout])
        np.testing.assert_array_equal(
            upload.smoke_predictions, any_model.booster.inplace_predict(upload.reference)
        )
        assert upload.holdout_predictions is not None
        np.testing.assert_array_equal(
            upload.holdout_predictions, any_model.booster.inplace_predict(upload.holdout_X)
        )
        assert upload.validation["smoke"]["source"] == "reference.csv"
        assert upload.validation["members"]["reference.csv"] > 0
        assert manifest.description == "test model"
        assert manifest.metrics == {"auc": 0.9}
        assert manifest.label == "label"
        assert manifest.reference_source == "reference.csv"
    else:
        assert upload.reference is None
        assert upload.validation["smoke"]["source"] == "synthetic"
        assert len(upload.smoke_predictions) == 12


def test_content_decides_not_the_name(binary_model: TrainedModel) -> None:
    # A real model named .pkl is a model; a JSON model named .ubj is read as JSON.
    upload = read_upload(binary_model.json(), "model.pkl")
    assert upload.validation["model_format"] == "json"
    np.testing.assert_array_equal(
        _predict(upload.model_ubj, binary_model.X),
        binary_model.booster.inplace_predict(binary_model.X),
    )


def _nameless(model: TrainedModel) -> bytes:
    booster = model.booster.copy()
    booster.feature_names = None
    return bytes(booster.save_raw("ubj"))


def test_feature_names_come_from_manifest_then_reference_then_defaults(
    regression_model: TrainedModel,
) -> None:
    model = regression_model
    raw = _nameless(model)
    names = ["age", "income", "tenure", "visits", "score", "region"]

    from_manifest = read_upload(
        tar_gz(
            [
                file_member("model.ubj", raw),
                file_member("manifest.json", json.dumps({"feature_names": names}).encode()),
            ]
        ),
        "m.tar.gz",
    )
    assert from_manifest.feature_names == names
    assert from_manifest.validation["feature_names_source"] == "manifest.json"

    # Reference columns in another order are put back into the model's order.
    order = [3, 0, 5, 1, 4, 2]
    shuffled = csv_bytes([names[i] for i in order], model.X[:20, order].tolist())
    from_header = read_upload(
        tar_gz(
            [
                file_member("model.ubj", raw),
                file_member("reference.csv", csv_bytes(names, model.X[:20].tolist())),
            ]
        ),
        "m.tar.gz",
    )
    assert from_header.feature_names == names
    assert from_header.validation["feature_names_source"] == "reference.csv"

    with_manifest_and_shuffled = read_upload(
        tar_gz(
            [
                file_member("mymodel/model.ubj", raw),  # one top-level folder is fine
                file_member("mymodel/manifest.json", json.dumps({"feature_names": names}).encode()),
                file_member("mymodel/reference.csv", shuffled),
            ]
        ),
        "m.tar.gz",
    )
    assert with_manifest_and_shuffled.reference is not None
    np.testing.assert_array_equal(with_manifest_and_shuffled.reference, model.X[:20])
    np.testing.assert_array_equal(
        with_manifest_and_shuffled.smoke_predictions, model.booster.inplace_predict(model.X[:20])
    )

    defaults = read_upload(raw, "model.ubj")
    assert defaults.feature_names == [f"f{i}" for i in range(6)]
    assert defaults.validation["feature_names_source"] == "default"


def test_missing_cells_and_class_name_labels(binary_model: TrainedModel) -> None:
    names = binary_model.feature_names
    rows = binary_model.X[:30].tolist()
    rows[0][2] = None  # empty cell
    reference = csv_bytes(names, rows).replace(
        b"\n", b"\nNA," + b",".join(b"1" for _ in names[1:]) + b"\n", 1
    )
    y = binary_model.y[:30]
    holdout = csv_bytes(
        [*names, "churned"],
        [[*x, "yes" if t else "no"] for x, t in zip(binary_model.X[:30].tolist(), y, strict=True)],
    )
    package = make_package(
        binary_model,
        manifest={"class_names": ["no", "yes"], "threshold": 0.3},
        extra_members={"reference.csv": reference, "holdout.csv": holdout},
    )
    upload = read_upload(package, "model.tar.gz", label="churned")

    assert upload.reference is not None
    assert np.isnan(upload.reference[0, 0])  # "NA"
    assert np.isnan(upload.reference[1, 2])  # empty
    assert upload.label == "churned"
    np.testing.assert_array_equal(upload.holdout_y, y)
    manifest = upload.to_manifest("churn")
    assert manifest.class_names == ["no", "yes"]
    assert manifest.threshold == 0.3
    np.testing.assert_array_equal(
        upload.smoke_predictions, binary_model.booster.inplace_predict(upload.reference)
    )


# --- caps ----------------------------------------------------------------------------------------


def _refused(data: bytes, filename: str, limits: Limits) -> str:
    with pytest.raises(UploadRejected) as caught:
        read_upload(data, filename, limits=limits)
    return caught.value.code


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (Limits(max_upload_bytes=1000), "too_large"),
        (Limits(max_members=2), "too_many_members"),
        (Limits(max_member_bytes=5000), "too_large"),
        (Limits(max_decompressed_bytes=20_000), "too_large"),
        (Limits(max_csv_rows=50), "too_many_rows"),
        (Limits(max_csv_cells=6 * 50), "too_many_rows"),  # rows x columns: the matrix's size
        (Limits(max_features=5), "too_many_features"),
    ],
)
def test_limits_are_enforced(binary_model: TrainedModel, limits: Limits, code: str) -> None:
    assert _refused(make_package(binary_model), "model.tar.gz", limits) == code


def test_json_models_have_a_tighter_cap(binary_model: TrainedModel) -> None:
    limits = Limits(max_json_model_bytes=len(binary_model.json()) - 1)
    assert _refused(binary_model.json(), "model.json", limits) == "too_large"
    package = make_package(binary_model, fmt="json", reference=False, holdout=False)
    assert _refused(package, "model.tar.gz", limits) == "too_large"


def test_gzip_bomb_is_refused_without_inflating(binary_model: TrainedModel) -> None:
    bomb = gzip_bomb(binary_model.ubj())
    tracemalloc.start()
    try:
        code = _refused(bomb, "model.tar.gz", Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == "too_large"
    assert len(bomb) < 2 << 20
    assert peak < 16 << 20  # the GiB inside was never materialised


def test_decompressed_bytes_are_counted_while_streaming(binary_model: TrainedModel) -> None:
    # The members' declared sizes stay under the cap, but a 64 KB PAX header does not:
    # only counting the inflated stream itself catches it.
    info, content = file_member("model.ubj", binary_model.ubj())
    info.pax_headers = {"comment": "x" * 64_000}
    package = tar_gz([(info, content)])
    assert len(content) < 20_000
    assert _refused(package, "model.tar.gz", Limits(max_decompressed_bytes=40_000)) == "too_large"


# --- prediction checks -----------------------------------------------------------------------------


def _info(objective: str, num_class: int = 0) -> ModelInfo:
    return ModelInfo(
        objective=objective,
        num_class=num_class,
        num_target=1,
        num_features=2,
        num_trees=1,
        booster="gbtree",
        feature_names=None,
        feature_types=None,
        base_score=[0.5],
        xgboost_version=xgb.__version__,
        saved_with=None,
    )


@pytest.mark.parametrize(
    ("info", "predictions", "code"),
    [
        (_info("multi:softprob", 3), np.zeros(4), "bad_shape"),
        (_info("binary:logistic"), np.zeros((4, 2)), "bad_shape"),
        (_info("reg:squarederror"), np.array([0.0, np.inf, 1.0, 2.0]), "non_finite"),
        (_info("multi:softprob", 3), np.full((4, 3), np.nan), "non_finite"),
    ],
)
def test_prediction_checks(info: ModelInfo, predictions: np.ndarray, code: str) -> None:
    with pytest.raises(UploadRejected) as caught:
        check_predictions(info, predictions, 4, "test rows")
    assert caught.value.code == code


def test_prediction_checks_accept_good_shapes() -> None:
    check: Callable[..., None] = check_predictions
    check(_info("multi:softprob", 3), np.full((4, 3), 1 / 3), 4, "rows")
    check(_info("multi:softmax", 3), np.zeros(4), 4, "rows")
    check(_info("binary:logistic"), np.zeros(4), 4, "rows")


def test_model_wider_than_the_cap_is_refused_before_loading() -> None:
    wide = train("reg:squarederror", d=12, n=60, rounds=2)
    assert _refused(wide.ubj(), "model.ubj", Limits(max_features=10)) == "too_many_features"


# --- manifest.json's drift rules ------------------------------------------------------------------


def test_drift_rules_are_validated_and_recorded_in_the_manifest(binary_model: TrainedModel) -> None:
    names = binary_model.feature_names
    drift = {
        "default": {"method": "ks", "threshold": 0.08},
        "features": {
            names[2]: {"method": "wasserstein", "threshold": 0.2},
            names[0]: {"threshold": 0.3},
        },
    }
    upload = read_upload(make_package(binary_model, manifest={"drift": drift}), "m.tar.gz")
    manifest = upload.to_manifest("churn")
    assert manifest.drift == {
        "default": {"method": "ks", "threshold": 0.08},
        "features": {
            names[2]: {"method": "wasserstein", "threshold": 0.2},
            names[0]: {"threshold": 0.3},
        },
    }
    assert ModelManifest.from_json(manifest.to_json()).drift == manifest.drift
    assert (
        read_upload(make_package(binary_model, manifest={}), "m.tar.gz").to_manifest("churn").drift
        is None
    )


@pytest.mark.parametrize(
    ("drift", "code", "says"),
    [
        ({"default": {"method": "chi2"}}, "manifest_invalid", "not one of psi, ks, wasserstein"),
        ({"default": {"method": "ks", "threshold": 2}}, "manifest_invalid", r"outside \(0, 1\]"),
        ({"default": {"threshold": 0}}, "manifest_invalid", "outside"),
        ({"default": {"threshold": "high"}}, "manifest_invalid", "not a number"),
        ({"default": {"threshold": True}}, "manifest_invalid", "not a number"),
        ({"default": {"method": "ks", "alpha": 0.1}}, "manifest_invalid", "method and/or"),
        ({"rules": {}}, "manifest_invalid", "drift must be"),
        ([], "manifest_invalid", "drift must be"),
        ({"features": ["f0"]}, "manifest_invalid", "map feature names"),
        ({"features": {"nope": {"method": "ks"}}}, "manifest_mismatch", "'nope'"),
    ],
)
def test_bad_drift_section_is_refused_with_a_clear_reason(
    binary_model: TrainedModel, drift: object, code: str, says: str
) -> None:
    with pytest.raises(UploadRejected) as caught:
        read_upload(make_package(binary_model, manifest={"drift": drift}), "m.tar.gz")
    assert caught.value.code == code, caught.value.message
    assert re.search(says, caught.value.message), caught.value.message
    assert "drift" in caught.value.message


def test_numeric_drift_rules_are_refused_on_categorical_features() -> None:
    drift = {"features": {"plan": {"method": "ks"}}}
    with pytest.raises(UploadRejected, match="categorical feature is judged by the psi rule"):
        check_drift_against_features(drift, ["plan", "age"], ["c", "float"])
    check_drift_against_features({"features": {"plan": {"threshold": 0.2}}}, ["plan"], ["c"])
    check_drift_against_features({"features": {"age": {"method": "ks"}}}, ["age"], ["float"])
