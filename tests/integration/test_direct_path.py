"""Predict and explain events through the whole handler; XGBoost's C call without its Python
wrapper (``DenseCall`` must give what ``inplace_predict`` gives, bit for bit); and the model
loaded through libxgboost's C API alone, which serves only what ``inplace_predict`` answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import ROOT, LambdaContext, TrainedModel
from tests.inference_support import http_api_event
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    publish,
    registry_fixture,
)
from treeserve.model.predictor import DenseCall, Predictor
from treeserve.registry.model_registry import ModelRegistry

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]


def _events(model: TrainedModel) -> list[tuple[str, dict[str, Any]]]:
    rows = model.X[:4].tolist()
    body = orjson.dumps({"instances": rows, "ids": ["a", "b", "c", "d"]})
    names = ",".join(model.feature_names)
    csv_body = (names + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n").encode()
    json_type = {"content-type": "application/json"}
    cases = [
        ("predict json", http_api_event("POST", "/predict", body, json_type)),
        ("predict, no content-type", http_api_event("POST", "/predict", body)),
        ("predict base64", http_api_event("POST", "/predict", body, base64_body=True)),
        ("predict function url", http_api_event("POST", "/predict", body, function_url=True)),
        (
            "predict csv in",
            http_api_event("POST", "/predict", csv_body, {"content-type": "text/csv"}),
        ),
        (
            "predict csv out",
            http_api_event("POST", "/predict", body, {**json_type, "accept": "text/csv"}),
        ),
        ("explain", http_api_event("POST", "/explain", body, json_type)),
        ("explain csv", http_api_event("POST", "/explain", body, {"accept": "text/csv"})),
        ("malformed", http_api_event("POST", "/predict", b"{", json_type)),
        ("empty body", http_api_event("POST", "/predict", None, json_type)),
        ("wrong width", http_api_event("POST", "/predict", b'{"instances": [[1, 2]]}')),
        ("media type", http_api_event("POST", "/predict", body, {"content-type": "text/xml"})),
        (
            "charset",
            http_api_event(
                "POST", "/predict", body, {"content-type": "application/json; charset=latin-1"}
            ),
        ),
        (
            "non-latin header",
            http_api_event("POST", "/predict", body, {"content-type": "application/jsön"}),
        ),
        (
            "too many rows",
            http_api_event("POST", "/predict", orjson.dumps({"instances": [rows[0]] * 2000})),
        ),
        ("percent-encoded path", http_api_event("POST", "/%70redict", body)),
        ("trailing slash", http_api_event("POST", "/predict/", body)),
        (
            "trailing slash, url, csv by q",
            http_api_event(
                "POST",
                "/explain/",
                body,
                {"accept": "application/json;q=0.5, text/csv"},
                function_url=True,
            ),
        ),
        (
            "json by q",
            http_api_event("POST", "/predict", body, {"accept": "text/csv;q=0, application/json"}),
        ),
    ]
    mixed = http_api_event("POST", "/predict", body)
    mixed["headers"]["Content-Type"] = "text/xml"  # two spellings: the last one wins, as in Mangum
    cases.append(("duplicate header names", mixed))
    return cases


@pytest.mark.parametrize("base_path", ["/", "/prod"])
def test_answers_through_the_handler(
    base_path: str,
    registry: ModelRegistry,
    function: Start,
    multiclass_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_BASE_PATH", base_path)
    monkeypatch.setenv("MAX_ROWS", "1000")
    publish(registry, multiclass_model, class_names=["a", "b", "c"])
    module = function()
    assert module.settings.api_base_path == base_path
    prefix = "" if base_path == "/" else base_path
    statuses = []
    for label, event in _events(multiclass_model):
        event["requestContext"]["http"]["path"] = prefix + event["requestContext"]["http"]["path"]
        answer = module.handler(event, LambdaContext())
        assert answer["headers"]["x-model-version"] == "1", label
        statuses.append((label, answer["statusCode"]))
    assert dict(statuses) == {
        **{label: 200 for label, _ in statuses[:8]},
        "malformed": 400,
        "empty body": 400,
        "wrong width": 422,
        "media type": 415,
        "charset": 415,
        "non-latin header": 415,
        "too many rows": 413,
        "percent-encoded path": 200,
        "trailing slash": 200,
        "trailing slash, url, csv by q": 200,
        "json by q": 200,
        "duplicate header names": 415,
    }


def test_no_model_is_503(registry: ModelRegistry, function: Start) -> None:
    module = function()
    event = http_api_event("POST", "/predict", b'{"instances": [[1]]}')
    answer = module.handler(event, LambdaContext())
    assert answer["statusCode"] == 503
    assert answer["headers"]["x-model-version"] == "none"


def test_a_body_that_is_not_base64_or_text_is_a_client_error(
    registry: ModelRegistry, function: Start, binary_model: TrainedModel
) -> None:
    publish(registry, binary_model)
    module = function()
    event = http_api_event("POST", "/predict", b"{}")
    event["body"], event["isBase64Encoded"] = "not base64!", True
    response = module.handler(event, LambdaContext())
    assert response["statusCode"] == 400
    assert orjson.loads(response["body"])["error"]["type"] == "malformed_body"
    assert response["headers"]["x-model-version"] == "1"
    event["body"], event["isBase64Encoded"] = "\udcff", False  # not text: cannot come from JSON
    assert module.handler(event, LambdaContext())["statusCode"] == 400
    event["body"] = 10**10  # not text (a direct Invoke could send it): no 10 GB of zeros
    assert module.handler(event, LambdaContext())["statusCode"] == 400


# --- DenseCall ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["binary_model", "multiclass_model", "regression_model"])
def test_dense_call_equals_inplace_predict(name: str, request: pytest.FixtureRequest) -> None:
    model: TrainedModel = request.getfixturevalue(name)
    X = model.X[:200].astype(np.float32)
    X[::7, 1] = np.nan
    call = DenseCall.checked(model.booster, X[:2])
    assert call is not None
    expected = model.booster.inplace_predict(X, validate_features=False)
    got = call(X)
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    one = call(X[:1])  # the 1-row shape too
    np.testing.assert_array_equal(one, expected[:1])
    # the output is a copy: XGBoost's per-thread buffer is reused by the next call
    call(X[5:9])
    np.testing.assert_array_equal(one, expected[:1])


def test_dense_call_from_several_threads(multiclass_model: TrainedModel) -> None:
    # XGBoost writes each thread's output to that thread's own buffer; each call copies it out.
    from concurrent.futures import ThreadPoolExecutor

    X = multiclass_model.X[:64].astype(np.float32)
    call = DenseCall.checked(multiclass_model.booster, X[:2])
    assert call is not None
    expected = multiclass_model.booster.inplace_predict(X, validate_features=False)
    chunks = [(i % 60, i % 60 + 1 + i % 4) for i in range(400)]

    def one(bounds: tuple[int, int]) -> bool:
        lo, hi = bounds
        return bool(np.array_equal(call(X[lo:hi]), expected[lo:hi]))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(one, chunks))


def test_predictor_uses_the_direct_call_only_where_it_applies(
    binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.inference_support import manifest_for

    # the xgboost package's Booster (no recorded smoke rows: the C API alone is not used)
    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model, smoke_check=False))
    assert predictor._dense is not None
    assert not predictor.native
    calls: list[tuple[int, ...]] = []
    real = predictor._dense

    def spy(X: np.ndarray) -> np.ndarray:
        calls.append(X.shape)
        return real(X)

    monkeypatch.setattr(predictor, "_dense", spy)
    X = binary_model.X[:10]
    expected = binary_model.booster.inplace_predict(X.astype(np.float32))
    for variant in (X.astype(np.float32), X, np.asfortranarray(X.astype(np.float32))):
        np.testing.assert_array_equal(predictor.raw_predict(variant), expected)
    # float64 and Fortran order take the public path
    assert calls == [(10, len(binary_model.feature_names))]


def _internals_moved(self: DenseCall, booster: object) -> None:
    raise AttributeError("module 'xgboost.core' has no attribute '_LIB'")


@pytest.mark.parametrize(
    ("name", "replacement"),
    [
        ("__call__", lambda self, X: np.zeros(len(X), np.float32)),  # disagrees
        ("__init__", _internals_moved),  # an XGBoost without the private names
    ],
)
def test_the_public_path_serves_when_the_direct_call_cannot(
    name: str, replacement: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.inference_support import manifest_for

    monkeypatch.setattr(DenseCall, name, replacement)
    predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model, smoke_check=False))
    assert predictor._dense is None
    X = binary_model.X[:10].astype(np.float32)
    np.testing.assert_array_equal(
        predictor.predict(X).values, binary_model.booster.inplace_predict(X)
    )


def test_the_direct_call_waits_for_a_known_xgboost_major(
    binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xgboost as xgb

    X = binary_model.X[:2].astype(np.float32)
    assert DenseCall.checked(binary_model.booster, X) is not None
    monkeypatch.setattr(xgb, "__version__", "4.0.0")
    assert DenseCall.checked(binary_model.booster, X) is None


def test_a_failing_c_call_raises_xgboosts_error(binary_model: TrainedModel) -> None:
    import xgboost as xgb

    call = DenseCall(binary_model.booster)
    with pytest.raises(xgb.core.XGBoostError):
        call(np.zeros((2, len(binary_model.feature_names) + 3), dtype=np.float32))


# --- the model through libxgboost's C API alone ------------------------------------------------


@pytest.mark.parametrize("name", ["binary_model", "multiclass_model", "regression_model"])
def test_the_c_api_alone_serves_what_inplace_predict_answers(
    name: str, request: pytest.FixtureRequest
) -> None:
    from tests.inference_support import manifest_for

    model: TrainedModel = request.getfixturevalue(name)
    predictor = Predictor.load(model.ubj(), manifest_for(model))
    assert predictor.native
    assert predictor._booster is None  # the package's Booster is not loaded to predict
    X = model.X[:300].astype(np.float32)
    X[::5, 2] = np.nan
    expected = model.booster.inplace_predict(X, validate_features=False)
    for variant in (X, X.astype(np.float64), np.asfortranarray(X)):
        got = predictor.raw_predict(variant)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(predictor.raw_predict(X[:1]), expected[:1])
    # explain runs TreeSHAP on the same native handle: exactly the package's pred_contribs
    contribs = predictor.explain(X[:40])
    assert predictor._booster is None  # one copy of the model: no package Booster,
    assert predictor._model is None  # and no bytes kept
    dmatrix = xgb_dmatrix(X[:40], model.feature_names)
    package = model.booster.predict(dmatrix, pred_contribs=True)
    np.testing.assert_array_equal(contribs.contributions, package[..., :-1])
    np.testing.assert_array_equal(contribs.bias, package[..., -1])
    margin = model.booster.predict(dmatrix, output_margin=True)
    np.testing.assert_allclose(
        contribs.contributions.sum(axis=-1) + contribs.bias, margin, rtol=1e-4, atol=1e-4
    )


def xgb_dmatrix(X: np.ndarray, names: list[str]) -> Any:
    import xgboost as xgb

    return xgb.DMatrix(X, feature_names=names)


def test_the_c_api_is_not_used_when_the_recorded_answers_differ(
    binary_model: TrainedModel, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.inference_support import manifest_for

    manifest = manifest_for(binary_model)
    assert manifest.smoke_check is not None
    manifest.smoke_check["predictions"][0] += 1e-6  # one value off, by a hair
    predictor = Predictor.load(binary_model.ubj(), manifest)
    assert not predictor.native
    assert "differ from the recorded ones" in caplog.text
    X = binary_model.X[:20].astype(np.float32)
    np.testing.assert_array_equal(predictor.raw_predict(X), binary_model.booster.inplace_predict(X))


def test_the_c_api_is_not_used_for_an_xgboost_major_it_was_not_written_for(
    binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.inference_support import manifest_for
    from treeserve.model import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "SUPPORTED_XGBOOST_MAJORS", ("99",))
    predictor_module.native_library.cache_clear()
    try:
        assert predictor_module.native_library() is None
        predictor = Predictor.load(binary_model.ubj(), manifest_for(binary_model))
        assert not predictor.native
    finally:
        predictor_module.native_library.cache_clear()


def test_serving_and_explaining_do_not_import_the_xgboost_package(
    binary_model: TrainedModel, tmp_path: Any
) -> None:
    from tests.inference_support import manifest_for

    (tmp_path / "model.ubj").write_bytes(binary_model.ubj())
    (tmp_path / "manifest.json").write_bytes(manifest_for(binary_model).to_json())
    X = binary_model.X[:5].astype(np.float32)
    np.save(tmp_path / "rows.npy", X)
    code = f"""
import sys, numpy as np
from pathlib import Path
from treeserve.model.manifest import ModelManifest
from treeserve.model.predictor import Predictor
folder = Path({str(tmp_path)!r})
manifest = ModelManifest.from_json((folder / "manifest.json").read_bytes())
predictor = Predictor.load((folder / "model.ubj").read_bytes(), manifest)
values = predictor.predict(np.load(folder / "rows.npy")).values
print(predictor.native, "xgboost" in sys.modules, values.tobytes().hex())
predictor.explain(np.load(folder / "rows.npy"))
print("xgboost" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "functions"), "PATH": ""},
    )
    first, second = out.stdout.split("\n")[:2]
    native, imported, values = first.split()
    assert (native, imported, second) == ("True", "False", "False")
    assert bytes.fromhex(values) == binary_model.booster.inplace_predict(X).tobytes()


@pytest.mark.parametrize("reference", [True, False])
def test_an_upload_is_served_through_the_c_api_as_the_sandbox_predicted(
    reference: bool, binary_model: TrainedModel
) -> None:
    """What refresh records (read_upload: the sandbox's own inplace_predict, on reference.csv
    rows with missing values or on its synthetic sample) lets serving use the C API alone."""
    from tests.corpus import make_package
    from treeserve.model.package import read_upload

    names = ",".join(binary_model.feature_names)
    rows = binary_model.X[:6].astype(str).tolist()
    rows[0][1] = rows[3][4] = ""  # missing values: NaN, recorded as null
    csv = (names + "\n" + "\n".join(",".join(r) for r in rows) + "\n").encode()
    package = make_package(
        binary_model,
        reference=False,
        holdout=False,
        extra_members={"reference.csv": csv} if reference else None,
    )
    upload = read_upload(package, "model.tar.gz")
    manifest = upload.to_manifest("m")
    assert manifest.smoke_check is not None
    recorded = manifest.smoke_check["rows"]
    if reference:
        assert recorded[0][1] is None
        assert recorded[3][4] is None
    assert "smoke_check" not in manifest.public()
    predictor = Predictor.load(upload.model_ubj, manifest)
    assert predictor.native
    X = binary_model.X[:50].astype(np.float32)
    np.testing.assert_array_equal(
        predictor.predict(X).values, binary_model.booster.inplace_predict(X)
    )
