"""The monitoring handler: scheduled and direct events, report in S3, EMF on stdout."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.conftest import BUCKET, EVENTS, ROOT, LambdaContext, train
from tests.integration.test_monitoring import register, traffic
from treeserve.settings import MAX_WINDOW_HOURS
from treeserve_cli.invoke import import_handler, module_name

pytestmark = pytest.mark.integration

APP = ROOT / "functions" / "monitoring" / "app.py"


def load_app() -> ModuleType:
    """The monitoring function module, imported afresh (a cold start), as treeserve invoke does."""
    import_handler(APP.parent, "app.handler", fresh=True)
    module = sys.modules[module_name(APP.parent, "app")]
    module.metrics.clear_metrics()
    return module


def emf_blobs(stdout: str) -> list[dict[str, Any]]:
    blobs = []
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith("{") and '"_aws"' in line:
            blobs.append(json.loads(line))
    return blobs


def metric_values(blobs: list[dict[str, Any]], name: str) -> list[tuple[dict[str, Any], Any]]:
    """(dimensions, value) of every EMF blob that declares metric ``name``."""
    out = []
    for blob in blobs:
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            if any(m["Name"] == name for m in directive["Metrics"]):
                dims = {d: blob[d] for group in directive["Dimensions"] for d in group}
                value = blob[name]
                # Powertools writes a list when a metric was added more than once in a flush.
                out.append(
                    (dims, value[0] if isinstance(value, list) and len(value) == 1 else value)
                )
    return out


@pytest.fixture
def env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("MODEL_NAME", "m")
    monkeypatch.setenv("MONITORING_WINDOW_HOURS", "6")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    monkeypatch.delenv("NOTIFICATION_TOPIC_ARN", raising=False)
    return s3


def test_scheduled_event_writes_report_and_emits_emf(
    env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = train("binary:logistic", n=1000)
    version = register(env, model)
    X = np.random.default_rng(0).normal(size=(600, 6))
    X[:, 1] += 1.5
    X[::4, 2] = np.nan  # a data-quality flag on f2
    now = datetime.now(UTC)
    traffic(env, model, version, X, ts=now - timedelta(hours=1))
    traffic(env, model, version, X[:50], ts=now - timedelta(hours=8), prefix="old")  # outside 6 h
    app = load_app()
    event = json.loads((EVENTS / "monitoring-scheduled.json").read_text())
    capsys.readouterr()
    result = app.handler(event, LambdaContext())
    out = capsys.readouterr().out

    assert result["model"] == "m"
    assert result["rows"] == 600
    assert result["drifted_features"] == ["f1"]
    start = datetime.fromisoformat(result["window"]["start"])
    end = datetime.fromisoformat(result["window"]["end"])
    assert end - start == timedelta(hours=6)
    stored = json.loads(env.get_object(Bucket=BUCKET, Key=result["report_key"])["Body"].read())
    assert stored["summary"]["drifted_features"] == ["f1"]

    blobs = emf_blobs(out)
    assert blobs, "the handler printed EMF to stdout"
    # The DriftAlarm in template.yaml groups this metric's (service, model) series by model
    # (tests/integration/test_template.py); the service-only total stays for the dashboard.
    by_dims = {tuple(sorted(d)): v for d, v in metric_values(blobs, "DriftedFeatures")}
    assert by_dims == {("service",): 1.0, ("model", "service"): 1.0}
    model_dims = [d for d, _ in metric_values(blobs, "DriftedFeatures") if "model" in d]
    assert model_dims == [{"service": "treeserve-test", "model": "m"}]
    assert blobs[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "TreeserveTest"
    assert {v for _, v in metric_values(blobs, "RowsSeen")} == {600.0}
    flagged = {v for _, v in metric_values(blobs, "QualityFlaggedFeatures")}
    assert flagged == {2.0}  # f1 out of range (the shift), f2 missing
    assert stored["summary"]["quality_flagged_features"] == ["f1", "f2"]
    assert metric_values(blobs, "PredictionDrift")
    per_feature = {d["feature"]: v for d, v in metric_values(blobs, "FeatureDrift")}
    assert sorted(per_feature) == [f"f{i}" for i in range(6)]
    assert per_feature["f1"] == pytest.approx(
        stored["versions"][0]["features"][1]["psi"], rel=1e-12
    )
    assert max(per_feature, key=per_feature.__getitem__) == "f1"


def test_a_run_without_a_model_covers_every_model_with_captures(
    env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    first, second = train("binary:logistic", n=600), train("reg:squarederror", d=4, seed=3)
    traffic(env, first, register(env, first), first.X[:80], ts=now - timedelta(hours=1))
    v = register(env, second, "price")
    traffic(env, second, v, second.X[:30] + 3.0, name="price", ts=now - timedelta(hours=2))
    old = train("binary:logistic", seed=4)
    traffic(
        env, old, register(env, old, "quiet"), old.X[:5], name="quiet", ts=now - timedelta(days=3)
    )
    app = load_app()
    event = json.loads((EVENTS / "monitoring-scheduled.json").read_text())
    capsys.readouterr()
    result = app.handler(event, LambdaContext())
    blobs = emf_blobs(capsys.readouterr().out)
    assert result["model"] == "m"  # the default model's summary first, as before
    assert [(r["model"], r["rows"]) for r in result["models"]] == [("m", 80), ("price", 30)]
    for summary in result["models"]:
        assert summary["report_key"].startswith(f"reports/{summary['model']}/dt=")
        env.head_object(Bucket=BUCKET, Key=summary["report_key"])
    rows = {d.get("model"): v for d, v in metric_values(blobs, "RowsSeen") if "model" in d}
    assert rows == {"m": 80.0, "price": 30.0}
    drifted = {d["model"] for d, v in metric_values(blobs, "DriftedFeatures") if "model" in d}
    assert drifted == {"m", "price"}
    # A direct invoke naming a model covers that model alone.
    one = app.handler({"model": "price", "hours": 6}, LambdaContext())
    assert one["model"] == "price"
    assert "models" not in one


def test_direct_invoke_window_and_bad_events(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model = train("reg:squarederror")
    version = register(env, model, "other")
    ts = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    traffic(env, model, version, np.zeros((10, 6)), name="other", ts=ts)
    app = load_app()
    result = app.handler(
        {"model": "other", "start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"},
        LambdaContext(),
    )
    assert result["rows"] == 10
    assert result["report_key"].startswith("reports/other/dt=")
    for bad in (
        {"hours": -1},
        {"hours": "soon"},
        {"model": "../etc"},
        {"start": "yesterday"},
        {"start": "2026-11-21T00:00:00Z", "end": "2026-11-20T00:00:00Z"},
    ):
        answer = app.handler(bad, LambdaContext())
        assert answer["error"]["type"] == "bad_event", bad
    capsys.readouterr()


def test_a_window_longer_than_a_month_is_refused_before_any_listing(
    env: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = load_app()
    listed: list[str] = []
    monkeypatch.setattr(app, "run_monitoring", lambda *a, **kw: listed.append("ran"))
    limit = f"{MAX_WINDOW_HOURS:g} hours"
    for bad in (
        {"start": "1826-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},  # 200 years
        {"start": "2026-01-01T00:00:00Z"},  # until now: almost a year
        {"hours": 24 * 365 * 200},
    ):
        answer = app.handler(bad, LambdaContext())
        assert answer["error"]["type"] == "bad_event", bad
        assert limit in answer["error"]["message"], answer
    assert listed == []
    assert [r.getMessage() for r in caplog.records].count("event refused") == 3


def test_drift_notice_is_published_to_the_topic(
    env: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from treeserve.aws import sns_client, sqs_client

    topic = sns_client().create_topic(Name="alarms")["TopicArn"]
    queue = sqs_client().create_queue(QueueName="inbox")["QueueUrl"]
    queue_arn = sqs_client().get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns_client().subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    monkeypatch.setenv("NOTIFICATION_TOPIC_ARN", topic)
    model = train("binary:logistic", n=1000)
    version = register(env, model)
    X = np.random.default_rng(1).normal(size=(400, 6))
    X[:, 4] *= 3.0
    traffic(env, model, version, X, ts=datetime.now(UTC) - timedelta(hours=1))
    result = load_app().handler({"hours": 2}, LambdaContext())
    capsys.readouterr()
    assert result["drifted_features"] == ["f4"]
    messages = sqs_client().receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    (notice,) = [json.loads(m["Body"]) for m in messages]
    assert notice["model"] == "m"
    assert notice["drifted_features"] == ["f4"]
    assert notice["report_key"] == result["report_key"]


def test_drift_method_and_threshold_come_from_the_environment(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = train("binary:logistic", n=1000)
    version = register(env, model)
    X = np.random.default_rng(1).normal(size=(3000, 6))
    X[:, 4] += 0.35  # KS about 0.14: the psi rule (PSI about 0.1) is not sure, KS >= 0.1 is
    traffic(env, model, version, X, ts=datetime.now(UTC) - timedelta(hours=1))
    monkeypatch.setenv("DRIFT_METHOD", "ks")
    monkeypatch.setenv("DRIFT_THRESHOLD", "0.1")
    result = load_app().handler({"hours": 6}, LambdaContext())
    assert result["drifted_features"] == ["f4"]
    stored = json.loads(env.get_object(Bucket=BUCKET, Key=result["report_key"])["Body"].read())
    assert stored["summary"]["thresholds"]["method"] == "ks"
    monkeypatch.setenv("DRIFT_THRESHOLD", "0.5")
    assert load_app().handler({"hours": 6}, LambdaContext())["drifted_features"] == []
    monkeypatch.setenv("DRIFT_METHOD", "entropy")
    refused = load_app().handler({"hours": 6}, LambdaContext())
    assert "DRIFT_METHOD" in refused["error"]["message"]
