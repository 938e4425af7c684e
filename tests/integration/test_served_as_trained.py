"""Models trained as users train them are served exactly as they predict (issue 12).

Each model is trained in a fixture with XGBoost's scikit-learn API on a pandas DataFrame of a
scikit-learn bundled dataset, saved with ``save_model``, uploaded to ``incoming/`` through moto
(the S3 event reaches the refresh handler), and asked through the inference handler: JSON and
CSV predictions, labels and explanations must equal the model's own ``predict``,
``predict_proba`` and ``predict(output_margin=True)`` on the same DataFrame.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.model_selection import train_test_split

from tests.conftest import LambdaContext
from tests.inference_support import http_api_event, response_body
from tests.integration.inference_fixtures import load_function
from tests.integration.refresh_stack import build_stack

pytestmark = pytest.mark.integration

ROWS = 40


@dataclass
class Case:
    """A fitted scikit-learn model, its evaluation rows and what its own API answers."""

    model: Any
    X: pd.DataFrame
    values: np.ndarray  # what /predict must answer as predictions
    labels: list[Any] | None  # what /predict must answer as labels
    margin: np.ndarray  # predict(output_margin=True): what contributions + bias add up to


def _split(loader: Callable[..., Any]) -> tuple[pd.DataFrame, ...]:
    X, y = loader(return_X_y=True, as_frame=True)
    return tuple(train_test_split(X, y, random_state=0, test_size=0.25))


def _case(model: Any, X: pd.DataFrame, values: np.ndarray, labels: Any) -> Case:
    return Case(
        model,
        X,
        np.asarray(values),
        None if labels is None else np.asarray(labels).tolist(),
        np.asarray(model.predict(X, output_margin=True)),
    )


def _binary(objective: str, **params: Any) -> Case:
    Xtr, Xva, ytr, yva = _split(load_breast_cancer)
    model = xgb.XGBClassifier(objective=objective, max_depth=3, learning_rate=0.3, **params)
    if "early_stopping_rounds" in params:
        model.fit(Xtr, ytr, eval_set=[(Xva, yva)], verbose=False)
    else:
        model.fit(Xtr, ytr)
    X = Xva.iloc[:ROWS]
    if objective == "binary:logistic":
        return _case(model, X, model.predict_proba(X)[:, 1], model.predict(X))
    margin = model.predict(X, output_margin=True)
    if objective == "binary:logitraw":  # values are margins; labels decided at margin 0
        return _case(model, X, margin, (margin > 0).astype(int))
    return _case(model, X, model.predict(X), model.predict(X))  # hinge: 0/1 is the label


def _multiclass(objective: str, **params: Any) -> Case:
    Xtr, Xva, ytr, _ = _split(load_iris)
    model = xgb.XGBClassifier(objective=objective, n_estimators=8, max_depth=2, **params)
    model.fit(Xtr, ytr)
    X = Xva.iloc[:ROWS]
    values = model.predict_proba(X) if objective == "multi:softprob" else model.predict(X)
    return _case(model, X, values, model.predict(X))


def _regression(objective: str = "reg:squarederror", targets: int = 1, **params: Any) -> Case:
    Xtr, Xva, ytr, yva = _split(load_diabetes)
    if targets > 1:
        ytr = pd.DataFrame({"progression": ytr, "scaled": ytr / 100.0 - Xtr["bmi"]})
    model = xgb.XGBRegressor(objective=objective, max_depth=3, **params)
    if "early_stopping_rounds" in params:
        model.fit(Xtr, ytr, eval_set=[(Xva, yva)], verbose=False)
    else:
        model.fit(Xtr, ytr)
    X = Xva.iloc[:ROWS]
    return _case(model, X, model.predict(X), None)


CASES: dict[str, Callable[[], Case]] = {
    "early_stopped_classifier": lambda: _binary(
        "binary:logistic", n_estimators=300, early_stopping_rounds=5
    ),
    "logitraw": lambda: _binary("binary:logitraw", n_estimators=20),
    "hinge": lambda: _binary("binary:hinge", n_estimators=20),
    "softprob": lambda: _multiclass("multi:softprob"),
    "softmax": lambda: _multiclass("multi:softmax"),
    "early_stopped_regressor": lambda: _regression(
        n_estimators=300, learning_rate=0.3, early_stopping_rounds=3
    ),
    "quantiles": lambda: _regression(
        "reg:quantileerror", quantile_alpha=[0.1, 0.5, 0.9], n_estimators=15
    ),
    "multi_target": lambda: _regression(targets=2, n_estimators=10),
    "multi_output_tree": lambda: _regression(
        targets=2, n_estimators=10, tree_method="hist", multi_strategy="multi_output_tree"
    ),
    "multi_output_tree_classifier": lambda: _multiclass(
        "multi:softprob", tree_method="hist", multi_strategy="multi_output_tree"
    ),
    "poisson": lambda: _regression("count:poisson", n_estimators=10),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


@pytest.fixture
def served(
    case: Case, s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[ModuleType]:
    """The case's model uploaded as saved, promoted by the refresh handler, then served."""
    stack = build_stack(monkeypatch, s3)
    path = tmp_path / "model.ubj"
    case.model.save_model(path)
    reloaded = type(case.model)()
    reloaded.load_model(path)  # the wrapper re-loaded from the file predicts as the original
    assert np.array_equal(reloaded.predict(case.X), case.model.predict(case.X))
    outcomes = stack.deliver_s3(stack.put("incoming/default/model.ubj", path.read_bytes()))
    assert [o["status"] for o in outcomes] == ["promoted"], outcomes
    monkeypatch.setenv("MODEL_REFRESH_SECONDS", "60")
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "0")
    module = load_function()
    yield module
    sys.modules.pop(module.__name__, None)


def ask(module: ModuleType, method: str, path: str, body: bytes = b"", **headers: str) -> Any:
    response = module.handler(http_api_event(method, path, body, headers), LambdaContext())
    return response["statusCode"], response_body(response)


def records(X: pd.DataFrame) -> bytes:
    return orjson.dumps({"instances": X.to_dict(orient="records")})


def close(served_values: Any, expected: np.ndarray, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(
        np.asarray(served_values, dtype=np.float32),
        expected.astype(np.float32),
        rtol=1e-6,
        atol=atol,
    )


def test_predict_json_is_the_models_own(case: Case, served: ModuleType) -> None:
    status, body = ask(served, "POST", "/predict", records(case.X))
    assert status == 200, body
    answer = orjson.loads(body)
    close(answer["predictions"], case.values)
    assert answer.get("labels") == case.labels


def test_predict_csv_has_one_named_column_per_output(case: Case, served: ModuleType) -> None:
    status, body = ask(
        served,
        "POST",
        "/predict",
        case.X.to_csv(index=False).encode(),
        **{"content-type": "text/csv", "accept": "text/csv"},
    )
    assert status == 200, body
    table = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(table) == len(case.X)
    status, meta = ask(served, "GET", "/model")
    manifest = json.loads(meta)
    columns = [c for c in table[0] if c not in ("id", "label")]
    values = np.array([[float(row[c]) for c in columns] for row in table])
    if case.values.ndim == 2 and manifest["output_names"]:
        assert columns == manifest["output_names"]
    close(values.reshape(case.values.shape), case.values)
    if case.labels is not None:
        assert [int(float(row["label"])) for row in table] == case.labels


def test_explain_adds_up_to_the_models_margin(case: Case, served: ModuleType) -> None:
    status, body = ask(served, "POST", "/explain", records(case.X))
    answer = orjson.loads(body)
    if case.model.get_params().get("multi_strategy") == "multi_output_tree":
        assert status == 422, answer
        assert "vector-leaf" in answer["error"]["message"]
        return
    assert status == 200, answer
    contributions = np.asarray(answer["contributions"], dtype=np.float64)
    total = contributions.sum(axis=-1) + np.asarray(answer["bias"], dtype=np.float64)
    close(total, case.margin.reshape(total.shape), atol=1e-4)

    status, body = ask(served, "POST", "/explain", records(case.X), accept="text/csv")
    assert status == 200
    table = list(csv.DictReader(io.StringIO(body.decode())))
    blocks = 1 if case.margin.ndim == 1 else case.margin.shape[1]
    assert len(table) == len(case.X) * blocks
    names = answer["feature_names"]
    sums = [float(r["bias"]) + sum(float(r[n]) for n in names) for r in table]
    close(np.array(sums), case.margin.reshape(-1), atol=1e-4)


def test_model_describes_rounds_and_outputs(case: Case, served: ModuleType) -> None:
    status, body = ask(served, "GET", "/model")
    assert status == 200
    manifest = json.loads(body)
    best = getattr(case.model, "best_iteration", None)
    if "early_stopping_rounds" in case.model.get_params() and case.model.early_stopping_rounds:
        assert best is not None
        assert best + 1 < case.model.get_booster().num_boosted_rounds()  # it did stop early
        assert manifest["iteration_range"] == [0, best + 1]
    else:
        assert manifest["iteration_range"] is None
    k = 1 if case.values.ndim == 1 else case.values.shape[1]
    assert manifest["num_outputs"] == k
    if case.model.get_params().get("objective") == "reg:quantileerror":
        assert manifest["output_names"] == ["quantile_0.1", "quantile_0.5", "quantile_0.9"]
    elif k > 1 and isinstance(case.model, xgb.XGBRegressor):
        assert manifest["output_names"] == ["target_0", "target_1"]
    else:
        assert manifest["output_names"] is None
    assert manifest["vector_leaf"] == (
        case.model.get_params().get("multi_strategy") == "multi_output_tree"
    )


def test_open_inference_binary_tensor_is_the_models_own(case: Case, served: ModuleType) -> None:
    """v2 (issue 17): an [n, d] FP32 tensor in the binary extension; ``predict`` and
    ``predict_proba`` are the model's own, with the shapes the metadata declares."""
    X = np.ascontiguousarray(case.X.to_numpy(), dtype=np.float32)
    raw = X.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(X.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "predict"}, {"name": "predict_proba"}]
            if case.labels is not None and case.model.get_params()["objective"] != "multi:softmax"
            else [{"name": "predict"}],
        }
    )
    event = http_api_event(
        "POST",
        "/v2/models/default/infer",
        header + raw,
        {"inference-header-content-length": str(len(header))},
        base64_body=True,  # as API Gateway sends a binary body
    )
    response = served.handler(event, LambdaContext())
    body = response_body(response)
    assert response["statusCode"] == 200, body
    assert "inference-header-content-length" not in response["headers"]  # JSON outputs
    outputs = {o["name"]: o for o in orjson.loads(body)["outputs"]}
    status, meta = ask(served, "GET", "/v2/models/default")
    assert status == 200, meta
    declared = {o["name"]: o for o in orjson.loads(meta)["outputs"]}
    assert set(declared) == set(outputs)
    for name, output in outputs.items():
        assert len(output["shape"]) == len(declared[name]["shape"])
        assert output["shape"][1:] == declared[name]["shape"][1:]
        assert output["datatype"] == declared[name]["datatype"]
    predict = np.asarray(outputs["predict"]["data"]).reshape(outputs["predict"]["shape"])
    if case.labels is None:
        assert list(predict.shape) == list(case.values.shape)
        close(predict, case.values)
    else:
        assert predict.tolist() == case.labels
    if "predict_proba" in outputs:
        proba = np.asarray(outputs["predict_proba"]["data"], dtype=np.float32)
        proba = proba.reshape(outputs["predict_proba"]["shape"])
        close(proba, case.model.predict_proba(case.X))
