"""Categorical models (pandas ``category`` columns, ``enable_categorical=True``) published through
the refresh path and served with category values, as ``model.predict(df)`` answers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from tests.conftest import LambdaContext
from tests.corpus import file_member, tar_gz
from tests.inference_support import http_api_event, response_body
from tests.integration.refresh_stack import INFERENCE_DIR, RefreshStack, build_stack

pytestmark = pytest.mark.integration

PLANS = ["gold", "silver", "bronze", "tin"]
REGIONS = ["north", "south", "east"]


def frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "usage": rng.normal(size=n),
            "plan": pd.Categorical(rng.choice(PLANS, n)),
            "region": pd.Categorical(rng.choice(REGIONS, n)),
            "tenure": rng.integers(0, 60, n).astype(float),
        }
    )
    df.loc[rng.random(n) < 0.05, "plan"] = np.nan
    return df


def target(df: pd.DataFrame, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    score = (
        df["usage"].to_numpy()
        + 1.5 * (df["plan"] == "gold").to_numpy()
        - 1.0 * (df["region"] == "south").to_numpy()
        + 0.02 * df["tenure"].to_numpy()
    )
    return score + rng.normal(size=len(df)) * 0.3


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return frame(600, 0)


def fit(kind: str, df: pd.DataFrame) -> Any:
    y = target(df, 1)
    params: dict[str, Any] = {"n_estimators": 15, "max_depth": 4, "enable_categorical": True}
    if kind == "binary":
        return xgb.XGBClassifier(**params).fit(df, (y > np.median(y)).astype(int))
    if kind == "multiclass":
        return xgb.XGBClassifier(**params).fit(df, np.digitize(y, np.quantile(y, [0.33, 0.66])))
    return xgb.XGBRegressor(**params, max_cat_to_onehot=1).fit(df, y)


def package(model: Any, reference: pd.DataFrame) -> bytes:
    members = {
        "model.ubj": bytes(model.get_booster().save_raw("ubj")),
        "reference.csv": reference.to_csv().encode(),  # as users write it: index first
    }
    return tar_gz(file_member(k, v) for k, v in members.items())


@pytest.fixture
def stack(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RefreshStack:
    return build_stack(monkeypatch, s3)


def call(
    monkeypatch: pytest.MonkeyPatch, name: str, route: str, body: bytes, ctype: str
) -> tuple[int, Any]:
    from treeserve_cli.invoke import import_handler

    monkeypatch.setenv("MODEL_NAME", name)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "treeserve-inference")
    handler = import_handler(INFERENCE_DIR, "app.handler", fresh=True)
    method = "GET" if route == "/model" else "POST"
    response = handler(
        http_api_event(method, route, body, {"content-type": ctype}), LambdaContext()
    )
    return response["statusCode"], json.loads(response_body(response))


def publish(stack: RefreshStack, name: str, model: Any, reference: pd.DataFrame) -> None:
    key = f"incoming/{name}/model.tar.gz"
    stack.deliver_sqs(stack.put(key, package(model, reference)))
    outcome = stack.outcome(key, name)
    assert outcome is not None
    assert outcome["status"] == "promoted", outcome


def own_output(model: Any, df: pd.DataFrame) -> np.ndarray:
    if isinstance(model, xgb.XGBClassifier):
        proba = model.predict_proba(df)
        return proba[:, 1] if proba.shape[1] == 2 else proba
    return model.predict(df)


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in df.to_dict(orient="records"):
        out.append(
            {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        )
    return out


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_category_values_are_served_as_the_model_predicts_the_dataframe(
    stack: RefreshStack, monkeypatch: pytest.MonkeyPatch, data: pd.DataFrame, kind: str
) -> None:
    model = fit(kind, data)
    publish(stack, kind, model, data.iloc[:200])
    manifest = stack.registry(kind).manifest(1)
    assert manifest.categories == {"plan": sorted(PLANS), "region": sorted(REGIONS)}

    # Fresh rows whose DataFrame orders the categories differently from training.
    test = frame(40, 7)
    test["plan"] = test["plan"].cat.reorder_categories(["tin", "silver", "gold", "bronze"])
    want = np.asarray(own_output(model, test), dtype=np.float32)
    assert np.isnan(test["plan"].cat.codes.replace(-1, np.nan)).any()  # missing values included

    status, answer = call(
        monkeypatch,
        kind,
        "/predict",
        json.dumps({"instances": records(test)}).encode(),
        "application/json",
    )
    assert status == 200, answer
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), want)

    rows = [list(r.values()) for r in records(test)]
    status, answer = call(
        monkeypatch, kind, "/predict", json.dumps({"instances": rows}).encode(), "application/json"
    )
    assert status == 200, answer
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), want)

    status, answer = call(
        monkeypatch, kind, "/predict", test.to_csv(index=False).encode(), "text/csv"
    )
    assert status == 200, answer
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), want)

    # A number keeps meaning the model's own code, as in a numpy array.
    codes = test.copy()
    for col in ("plan", "region"):
        codes[col] = codes[col].cat.set_categories(manifest.categories[col]).cat.codes
        codes[col] = codes[col].where(codes[col] >= 0, np.nan)
    status, answer = call(
        monkeypatch,
        kind,
        "/predict",
        json.dumps(
            {
                "instances": np.where(
                    np.isnan(codes.to_numpy(float)), None, codes.to_numpy(float)
                ).tolist()
            }
        ).encode(),
        "application/json",
    )
    assert status == 200, answer
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), want)

    status, answer = call(
        monkeypatch,
        kind,
        "/explain",
        json.dumps({"instances": records(test)}).encode(),
        "application/json",
    )
    assert status == 200, answer
    margin = model.predict(test, output_margin=True)
    contributions = np.asarray(answer["contributions"], dtype=np.float64)
    bias = np.asarray(answer["bias"], dtype=np.float64)
    total = contributions.sum(axis=-1) + bias
    np.testing.assert_allclose(total, margin, rtol=1e-5, atol=1e-5)


def test_model_lists_categories_and_refuses_unseen_and_strings_for_numbers(
    stack: RefreshStack, monkeypatch: pytest.MonkeyPatch, data: pd.DataFrame
) -> None:
    model = fit("binary", data)
    publish(stack, "churn", model, data.iloc[:100])
    status, public = call(monkeypatch, "churn", "/model", b"", "application/json")
    assert status == 200
    assert public["categories"] == {"plan": sorted(PLANS), "region": sorted(REGIONS)}
    assert "code" in public["categorical_input"]

    row = {"usage": 0.1, "plan": "platinum", "region": "north", "tenure": 3}
    status, answer = call(
        monkeypatch,
        "churn",
        "/predict",
        json.dumps({"instances": [row]}).encode(),
        "application/json",
    )
    assert status == 422
    assert "'plan'" in answer["error"]["message"]
    assert "'gold'" in answer["error"]["message"]
    csv = "usage,plan,region,tenure\n0.1,gold,west,3\n"
    status, answer = call(monkeypatch, "churn", "/predict", csv.encode(), "text/csv")
    assert status == 422
    assert "'region'" in answer["error"]["message"]
    row = {"usage": "high", "plan": "gold", "region": "north", "tenure": 3}
    status, answer = call(
        monkeypatch,
        "churn",
        "/predict",
        json.dumps({"instances": [row]}).encode(),
        "application/json",
    )
    assert status == 422
    assert "'usage'" in answer["error"]["message"]


def test_a_reference_with_an_unseen_category_is_refused(
    stack: RefreshStack, data: pd.DataFrame
) -> None:
    model = fit("binary", data)
    reference = data.iloc[:50].copy()
    reference["plan"] = reference["plan"].cat.add_categories(["platinum"])
    reference.loc[reference.index[3], "plan"] = "platinum"
    key = "incoming/odd/model.tar.gz"
    stack.deliver_sqs(stack.put(key, package(model, reference)))
    outcome = stack.outcome(key, "odd")
    assert outcome is not None
    assert outcome["status"] == "rejected"
    assert outcome["code"] == "csv_invalid"
    assert "'platinum'" in outcome["message"]
    assert "'plan'" in outcome["message"]


def test_monitoring_names_categories_by_value(stack: RefreshStack, data: pd.DataFrame) -> None:
    from tests.integration.test_monitoring import NOW, capture_lines, put_captures, run
    from treeserve_cli.report_html import render_html

    model = fit("binary", data)
    reference = data[data["plan"] != "tin"].iloc[:300]  # "tin" never in the reference sample
    publish(stack, "shift", model, reference)
    manifest = stack.registry("shift").manifest(1)
    assert manifest.reference is not None
    plan_stats = manifest.reference["features"][1]
    assert plan_stats["category_values"] == sorted(PLANS)

    # Traffic: mostly "tin" (code 3), as the inference function captures it (codes).
    live = frame(400, 9)
    live["plan"] = pd.Categorical(["tin"] * 300 + ["gold"] * 100, categories=sorted(PLANS))
    X = live.assign(plan=live["plan"].cat.codes, region=live["region"].cat.codes).to_numpy(
        dtype=float
    )
    preds = model.get_booster().inplace_predict(X)
    ts = NOW - pd.Timedelta(hours=1)
    lines = capture_lines(1, X, np.asarray(preds), [f"r{i}" for i in range(len(X))], ts)
    put_captures(stack.s3, "shift", lines, ts, "a")

    report = run(stack.s3, "shift")
    plan = next(f for f in report["versions"][0]["features"] if f["name"] == "plan")
    assert plan["new_categories"] == ["tin"]
    assert plan["new_category_share"] == pytest.approx(0.75)
    assert "gold" in plan["chart"]["labels"]
    assert "plan" in report["summary"]["drifted_features"]
    html = render_html(report)
    assert ">gold<" in html


def test_penguins_demo_is_served_with_category_values(
    stack: RefreshStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The local stack's categorical demo: codes trained, manifest.json names the categories."""
    from treeserve_cli.demo import write_penguins_package

    demo = write_penguins_package(tmp_path)
    assert demo.holdout_auc > 0.9
    key = "incoming/penguins/penguins-package.tar.gz"
    stack.deliver_sqs(stack.put(key, demo.package.read_bytes()))
    outcome = stack.outcome(key, "penguins")
    assert outcome is not None
    assert outcome["status"] == "promoted", outcome
    manifest = stack.registry("penguins").manifest(1)
    assert manifest.categories == demo.categories
    assert manifest.reference is not None
    assert manifest.reference["features"][0]["category_values"] == ["Adelie", "Chinstrap", "Gentoo"]

    # As pandas would see the same records (category columns with the model's categories).
    df = pd.DataFrame(demo.example_records)
    for name, cats in demo.categories.items():
        df[name] = pd.Categorical(df[name], categories=cats)
    booster = xgb.Booster()
    booster.load_model(bytearray(stack.registry("penguins").model_bytes(1, manifest)))
    want = booster.predict(xgb.DMatrix(df, enable_categorical=True))
    status, answer = call(
        monkeypatch,
        "penguins",
        "/predict",
        json.dumps({"instances": demo.example_records}).encode(),
        "application/json",
    )
    assert status == 200, answer
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), want)
    status, answer = call(
        monkeypatch,
        "penguins",
        "/predict",
        demo.reference.read_bytes()[:2000].rsplit(b"\n", 1)[0],
        "text/csv",
    )
    assert status == 200, answer


def test_published_through_the_cli_with_the_dataframes_own_csvs(
    stack: RefreshStack,
    data: pd.DataFrame,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As a user publishes: `treeserve publish model.ubj --reference X_train.to_csv()
    --holdout ...` (category values as the DataFrame writes them), then the S3 event."""
    from tests.conftest import BUCKET
    from treeserve_cli.cli import main

    train, test = data.iloc[:400], data.iloc[400:]
    y = (target(data, 1) > 0).astype(int)
    model = xgb.XGBClassifier(n_estimators=15, max_depth=4, enable_categorical=True)
    model.fit(train, y[:400])
    model.save_model(tmp_path / "model.ubj")
    train.to_csv(tmp_path / "reference.csv")
    test.assign(churned=y[400:]).to_csv(tmp_path / "holdout.csv")
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    code = main(
        [
            "publish",
            str(tmp_path / "model.ubj"),
            "--name",
            "plans",
            "--reference",
            str(tmp_path / "reference.csv"),
            "--holdout",
            str(tmp_path / "holdout.csv"),
            "--label",
            "churned",
        ]
    )
    assert code == 0, capsys.readouterr()
    outcome = stack.deliver_sqs(stack.receive())
    assert not outcome.get("batchItemFailures"), outcome
    registry = stack.registry("plans")
    manifest = registry.manifest(registry.versions()[-1])
    assert manifest.categories is not None
    assert set(manifest.categories["plan"]) == set(PLANS)
    assert manifest.validation["holdout_rows"] == len(test)

    status, body = call(
        monkeypatch,
        "plans",
        "/predict",
        json.dumps({"instances": records(test)}).encode(),
        "application/json",
    )
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], own_output(model, test), rtol=1e-6, atol=1e-6)
    assert body["labels"] == model.predict(test).tolist()


def test_open_inference_bytes_tensors_carry_category_values(
    stack: RefreshStack, monkeypatch: pytest.MonkeyPatch, data: pd.DataFrame
) -> None:
    """v2 (issue 17): one tensor per feature, BYTES for the categorical ones (JSON and binary),
    answers as ``model.predict_proba(df)``; an unseen category is a 422."""
    import struct

    from treeserve_cli.invoke import import_handler

    model = fit("binary", data)
    publish(stack, "churn", model, data.sample(200, random_state=0))
    monkeypatch.setenv("MODEL_NAME", "churn")
    handler = import_handler(INFERENCE_DIR, "app.handler", fresh=True)
    df = data.iloc[:6].copy()
    df.loc[df.index[1], "plan"] = np.nan  # missing, as null
    region = [str(v) for v in df["region"]]
    raw_region = b"".join(struct.pack("<I", len(v)) + v.encode() for v in region)

    def infer(plan: list[Any]) -> tuple[int, Any]:
        inputs = [
            {"name": "usage", "shape": [6], "datatype": "FP64", "data": df["usage"].tolist()},
            {"name": "plan", "shape": [6, 1], "datatype": "BYTES", "data": plan},
            {"name": "tenure", "shape": [6], "datatype": "FP64", "data": df["tenure"].tolist()},
            {
                "name": "region",
                "shape": [6],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw_region)},
            },
        ]
        header = json.dumps({"inputs": inputs, "outputs": [{"name": "predict_proba"}]}).encode()
        event = http_api_event(
            "POST",
            "/v2/models/churn/infer",
            header + raw_region,
            {"inference-header-content-length": str(len(header))},
            base64_body=True,
        )
        response = handler(event, LambdaContext())
        return response["statusCode"], json.loads(response_body(response))

    plans = [None if isinstance(v, float) else str(v) for v in df["plan"]]
    status, body = infer(plans)
    assert status == 200, body
    [output] = body["outputs"]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_array_equal(got, model.predict_proba(df).astype(np.float32))
    status, body = infer(["platinum", *plans[1:]])
    assert status == 422, body
    assert "platinum" in body["error"]
