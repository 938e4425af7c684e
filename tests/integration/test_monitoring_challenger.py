"""Challengers on live traffic (treeserve.monitoring.challenger) on moto: real XGBoost models,
captures written by the capture encoder with the alias that answered, labels, live promotion."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb
from scipy import stats

from tests.conftest import BUCKET, TrainedModel, make_data
from tests.integration.test_monitoring import NOW, register, run
from treeserve import captures
from treeserve.model import metrics as model_metrics
from treeserve.monitoring import challenger
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.routing import Canary, Routing, Shadow, canary_bucket
from treeserve.registry.store import S3RegistryStore
from treeserve.settings import Settings

pytestmark = pytest.mark.integration

NAMES = [f"f{i}" for i in range(6)]
TS = NOW - timedelta(hours=2)


def fit(X: np.ndarray, y: np.ndarray, *, rounds: int, depth: int = 3) -> TrainedModel:
    """A real binary model trained on (X, y)."""
    params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.3, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(X, label=y, feature_names=NAMES), rounds)
    return TrainedModel(booster, X, y, NAMES, "binary:logistic")


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    signal = X[:, 0] + 0.8 * X[:, 1] - 0.6 * X[:, 2] + 0.5 * X[:, 3]
    return X, (signal + rng.normal(scale=0.5, size=n) > 0).astype(float)


@pytest.fixture(scope="module")
def models() -> dict[str, TrainedModel]:
    X, y = data(3000, 0)
    return {
        # one stump on f0: a weak champion
        "weak": fit(X, y, rounds=1, depth=1),
        "strong": fit(X, y, rounds=40),
        # trained on a feature the label does not depend on: a bad challenger
        "bad": fit(X, (X[:, 5] > 0).astype(float), rounds=20),
    }


def registry(s3: Any) -> ModelRegistry:
    return ModelRegistry(S3RegistryStore(BUCKET, s3=s3), "m")


def setup(
    s3: Any, champion: TrainedModel, contender: TrainedModel, routing: Routing
) -> ModelRegistry:
    reg = registry(s3)
    v1 = register(s3, champion)
    v2 = register(s3, contender)
    reg.promote(v1)
    reg.set_alias("challenger", v2)
    reg.set_routing(lambda _seen: routing)
    return reg


def serve(
    s3: Any,
    champion: TrainedModel,
    contender: TrainedModel,
    X: np.ndarray,
    *,
    percent: float,
    files: int = 3,
    ts: datetime = TS,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Write the captures serving would: each row answered by the canary when its id's bucket
    is below ``percent`` (version 2, alias challenger), else by the champion (version 1)."""
    n = X.shape[0]
    ids = [f"req-{i}" for i in range(n)]
    to_canary = np.array([canary_bucket(i.encode()) < percent for i in ids])
    champion_out = champion.booster.inplace_predict(X).astype(np.float32)
    contender_out = contender.booster.inplace_predict(X).astype(np.float32)
    outputs = np.where(to_canary, contender_out, champion_out).reshape(n, 1)
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        body = captures.encode_capture(
            captures.CaptureRows(
                model="m",
                ids=[ids[i] for i in part],
                ts_ms=np.full(part.size, round(ts.timestamp() * 1000), np.int64),
                versions=np.where(to_canary[part], 2, 1).astype(np.int64),
                inputs=X[part].astype(np.float32),
                outputs=outputs[part],
                aliases=["challenger" if to_canary[i] else "champion" for i in part],
            )
        )
        key = f"captures/m/dt={ts:%Y-%m-%d}/{ts:%Y%m%dT%H%M%S}000Z-p{f}.parquet"
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return ids, to_canary, champion_out, contender_out


def label(s3: Any, ids: list[str], y: np.ndarray, rows: np.ndarray) -> None:
    body = "id,label\n" + "".join(f"{ids[i]},{y[i]:.17g}\n" for i in rows)
    s3.put_object(Bucket=BUCKET, Key="labels/m/day.csv", Body=body.encode())


def live(**kwargs: Any) -> Settings:
    return Settings(model_bucket=BUCKET, promotion_mode="live", **kwargs)


def entry_of(report: dict[str, Any]) -> dict[str, Any]:
    (entry,) = report["challenger"]["challengers"]
    return dict(entry)


# --- verdicts and live promotion ---------------------------------------------------------------


def test_a_worse_challenger_is_held(s3: Any, models: dict[str, TrainedModel]) -> None:
    reg = setup(s3, models["strong"], models["bad"], Routing(canary=Canary("challenger", 40)))
    X, y = data(2000, 7)
    ids, to_canary, _, _ = serve(s3, models["strong"], models["bad"], X, percent=40)
    label(s3, ids, y, np.arange(2000))
    report = run(s3, settings=live(live_min_labeled_rows=300))
    e = entry_of(report)
    n_canary = int(to_canary.sum())
    assert e["rows"]["canary"] == n_canary == e["rows"]["compared"] == e["rows"]["labeled"]
    assert e["rows"]["shadow"] == 0
    assert e["verdict"] == "worse"
    q = e["quality"]
    assert q["metric"] == "auc"
    assert q["improvement"] < 0
    assert q["ci"][1] < 0
    assert e["decision"]["action"] == "held"
    assert reg.current().version == 1  # type: ignore[union-attr]
    assert reg.routing().canary == Canary("challenger", 40)
    assert reg.decisions() == []
    # the stored report carries the same section
    body = s3.get_object(Bucket=BUCKET, Key=report["report_key"])["Body"].read()
    assert orjson.loads(body)["challenger"] == orjson.loads(orjson.dumps(report["challenger"]))


def test_a_better_challenger_is_promoted_in_live_mode(
    s3: Any, models: dict[str, TrainedModel]
) -> None:
    reg = setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(2000, 8)
    ids, to_canary, champion_out, contender_out = serve(
        s3, models["weak"], models["strong"], X, percent=50
    )
    label(s3, ids, y, np.arange(2000))
    report = run(s3, settings=live(live_min_labeled_rows=300))
    e = entry_of(report)
    assert e["verdict"] == "better"
    q = e["quality"]
    # the figures are those of the models' own predictions on the canary's rows
    rows = np.flatnonzero(to_canary)
    assert q["champion"] == pytest.approx(model_metrics.roc_auc(y[rows], champion_out[rows]))
    assert q["challenger"] == pytest.approx(model_metrics.roc_auc(y[rows], contender_out[rows]))
    assert q["ci"][0] > 0
    assert e["rows"]["labeled"] == rows.size
    decision = e["decision"]
    assert decision["action"] == "promoted"
    pointer = reg.current()
    assert pointer is not None
    assert (pointer.version, pointer.previous) == (2, 1)
    assert not reg.routing().active  # the canary to the promoted version is cleared
    assert decision["routing_cleared"] == ["canary challenger"]
    (record,) = reg.decisions()
    assert decision["decision_key"].startswith("registry/m/decisions/")
    assert (record["version"], record["previous"], record["verdict"]) == (2, 1, "better")
    assert record["quality"]["ci"] == q["ci"]
    assert record["rows"]["labeled"] == rows.size
    # the next run has no routing left: nothing to compare, nothing changes
    again = run(s3, settings=live(live_min_labeled_rows=300))
    assert again["challenger"] is None
    assert reg.current().version == 2  # type: ignore[union-attr]


def test_the_same_verdict_is_only_reported_outside_live_mode(
    s3: Any, models: dict[str, TrainedModel]
) -> None:
    reg = setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(1500, 9)
    ids, *_ = serve(s3, models["weak"], models["strong"], X, percent=50)
    label(s3, ids, y, np.arange(1500))
    for mode in ("auto", "manual"):
        e = entry_of(
            run(s3, settings=Settings(BUCKET, promotion_mode=mode, live_min_labeled_rows=300))
        )
        assert e["verdict"] == "better"
        assert e["decision"]["action"] == "reported"
    assert reg.current().version == 1  # type: ignore[union-attr]
    assert reg.routing().active


def test_without_enough_labels_the_challenger_waits(
    s3: Any, models: dict[str, TrainedModel]
) -> None:
    reg = setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(1200, 10)
    ids, to_canary, *_ = serve(s3, models["weak"], models["strong"], X, percent=50)
    labelled = np.arange(0, 1200, 12)  # 100 labels, about 50 of them on canary rows
    label(s3, ids, y, labelled)
    report = run(s3, settings=live())  # LIVE_MIN_LABELED_ROWS=500
    e = entry_of(report)
    expected = int(to_canary[labelled].sum())
    assert e["rows"]["labeled"] == e["quality"]["labeled_rows"] == expected
    assert e["rows"]["canary"] == int(to_canary.sum())
    assert e["verdict"] == "not enough evidence"
    assert f"{expected} labeled rows" in e["reason"]
    assert "500" in e["reason"]
    assert e["decision"]["action"] == "held"
    assert reg.current().version == 1  # type: ignore[union-attr]
    assert reg.decisions() == []


# --- shadow scoring and the figures ------------------------------------------------------------


def independent_psi(champion: np.ndarray, challenger: np.ndarray) -> float:
    edges = np.unique(
        np.quantile(champion.astype(np.float64), np.arange(1, 10) / 10).astype(np.float32)
    )
    a = np.bincount(np.searchsorted(edges, champion), minlength=edges.size + 1) / champion.size
    b = np.bincount(np.searchsorted(edges, challenger), minlength=edges.size + 1) / challenger.size
    a, b = np.maximum(a, 1e-4), np.maximum(b, 1e-4)
    return float(np.sum((b - a) * np.log(b / a)))


def test_shadow_scores_never_change_an_answer_and_match_the_models_own_predict(
    s3: Any, models: dict[str, TrainedModel]
) -> None:
    reg = setup(s3, models["weak"], models["strong"], Routing(shadow=Shadow("challenger", 0.3)))
    X, _y = data(1500, 11)
    ids, to_canary, champion_out, _ = serve(s3, models["weak"], models["strong"], X, percent=0)
    assert not to_canary.any()
    before = {
        o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/")["Contents"]
    }
    report = run(s3, settings=live())
    after = {
        o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/")["Contents"]
    }
    assert after == before  # no capture rewritten, none added
    for body in after.values():  # the champion's answers as served
        rows = captures.decode_capture(body)
        index = [int(i.split("-")[1]) for i in rows.ids]
        np.testing.assert_array_equal(rows.outputs[:, 0], champion_out[index])
    # the drift section counts the champion's rows only
    assert [(v["version"], v["rows"]) for v in report["versions"]] == [(1, 1500)]

    # The shadow's sample, by an independent hash of the ids (blake2b, salted).
    def point(row_id: str) -> float:
        digest = hashlib.blake2b(b"shadow:" + row_id.encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") % 1_000_000) / 10_000

    sampled = np.array([point(i) < 30 for i in ids])
    e = entry_of(report)
    assert e["routes"] == ["shadow"]
    assert e["rows"]["shadow"] == int(sampled.sum()) == e["rows"]["compared"]
    assert 0.2 < sampled.mean() < 0.4
    # The shadow's scores are version 2's own predict on those rows.
    loaded = challenger.load_predictor(reg, reg.alias("challenger"))  # type: ignore[arg-type]
    own = models["strong"].booster.predict(xgb.DMatrix(X[sampled], feature_names=NAMES))
    shadow_scores = challenger.scores(loaded, X[sampled].astype(np.float32))[:, 0]
    np.testing.assert_allclose(shadow_scores, own, rtol=1e-6)
    # Agreement and shift equal an independent computation on the same rows.
    old, new = champion_out[sampled].astype(np.float64), own.astype(np.float64)
    assert e["agreement"]["agreement"] == pytest.approx(np.mean((old > 0.5) == (new > 0.5)))
    assert e["shift"]["psi"] == pytest.approx(
        independent_psi(old.astype(np.float32), new.astype(np.float32)), rel=1e-4
    )
    assert e["shift"]["ks_statistic"] == pytest.approx(stats.ks_2samp(new, old).statistic, abs=1e-6)
    assert e["decision"]["action"] == "held"  # no labels yet


def test_bounded_work_is_reported(s3: Any, models: dict[str, TrainedModel]) -> None:
    setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, _ = data(1200, 12)
    serve(s3, models["weak"], models["strong"], X, percent=50, files=6)
    report = run(s3, settings=live(challenger_max_rows=100))
    section = report["challenger"]
    e = entry_of(report)
    assert e["rows"]["canary"] == section["scored_rows"] == 100
    assert section["truncated"] is True
    assert section["files_read"] < 6


# --- the bootstrap -----------------------------------------------------------------------------


def test_weighted_metrics_with_unit_weights_are_the_metrics() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.4).astype(float)
    p = np.round(rng.random((400, 1)), 2)  # ties
    ones = np.ones((1, 400))
    for name in ("auc", "logloss", "rmse"):
        assert challenger.weighted_metric(name, y, p, ones)[0] == pytest.approx(
            challenger.metric_value(name, y, p), rel=1e-12
        )
    # a weight of 2 is the row twice
    W = np.ones((1, 400))
    W[0, :50] = 2
    twice = np.r_[np.arange(400), np.arange(50)]
    assert challenger.weighted_metric("auc", y, p, W)[0] == pytest.approx(
        model_metrics.roc_auc(y[twice], p[twice, 0]), rel=1e-12
    )


def test_the_paired_bootstrap_is_deterministic_with_its_seed() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(600) < 0.5).astype(float)
    a = np.clip(y * 0.3 + rng.random(600) * 0.7, 0, 1).reshape(-1, 1)
    b = np.clip(y * 0.4 + rng.random(600) * 0.6, 0, 1).reshape(-1, 1)
    first = challenger.paired_bootstrap("auc", True, y, a, b)
    assert challenger.paired_bootstrap("auc", True, y, a, b) == first
    assert challenger.paired_bootstrap("auc", True, y, a, b, seed=1) != first
    lo, hi, valid = first
    assert valid == challenger.BOOTSTRAP_RESAMPLES
    point = model_metrics.roc_auc(y, b[:, 0]) - model_metrics.roc_auc(y, a[:, 0])
    assert lo < point < hi


@pytest.mark.parametrize(
    ("labeled", "point", "ci", "tolerance", "expected"),
    [
        (100, 0.05, (0.01, 0.09), 0.0, "not enough evidence"),
        (600, 0.05, (0.01, 0.09), 0.0, "better"),
        (600, 0.0, (-0.004, 0.004), 0.005, "not worse"),
        (600, -0.05, (-0.09, -0.01), 0.02, "worse"),
        (600, -0.05, (-0.09, -0.03), 0.02, "worse"),
        (600, -0.01, (-0.03, -0.001), 0.02, "not enough evidence"),  # within tolerance
        (600, 0.0, (-0.03, 0.03), 0.0, "not enough evidence"),  # straddles
    ],
)
def test_verdict_rule(
    labeled: int, point: float, ci: tuple[float, float], tolerance: float, expected: str
) -> None:
    got, _ = challenger.verdict(labeled, minimum=500, point=point, ci=ci, tolerance=tolerance)
    assert got == expected


# --- latency (the serving side's latency_ms column) ---------------------------------------------


def test_latency_percentiles_per_alias() -> None:
    champion = np.arange(1, 101, dtype=np.float32)
    canary = np.array([10.0, 20.0, np.nan, 30.0], dtype=np.float32)
    out = challenger.latency({"champion": [champion[:50], champion[50:]], "challenger": [canary]})
    assert out == {
        "champion": {"rows": 100, "p50_ms": 50.5, "p95_ms": pytest.approx(95.05)},
        "challenger": {"rows": 3, "p50_ms": 20.0, "p95_ms": pytest.approx(29.0)},
    }
    assert challenger.latency({}) is None


@pytest.mark.skipif(
    "latency_ms" not in {c.name for c in captures.COLUMNS},
    reason="the capture schema has no latency_ms column on this branch yet (serving side)",
)
def test_latency_from_captures(s3: Any, models: dict[str, TrainedModel]) -> None:
    setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, _ = data(400, 13)
    ids = [f"req-{i}" for i in range(400)]
    to_canary = np.array([canary_bucket(i.encode()) < 50 for i in ids])
    lat = np.where(to_canary, 9.0, 3.0).astype(np.float32)
    rows = captures.CaptureRows(  # type: ignore[call-arg]
        model="m",
        ids=ids,
        ts_ms=np.full(400, round(TS.timestamp() * 1000), np.int64),
        versions=np.where(to_canary, 2, 1).astype(np.int64),
        inputs=X.astype(np.float32),
        outputs=np.zeros((400, 1), np.float32),
        aliases=["challenger" if c else "champion" for c in to_canary],
        latency_ms=lat,
    )
    key = f"captures/m/dt={TS:%Y-%m-%d}/{TS:%Y%m%dT%H%M%S}000Z-lat.parquet"
    s3.put_object(Bucket=BUCKET, Key=key, Body=captures.encode_capture(rows))
    section = run(s3, settings=live())["challenger"]
    assert section["latency"]["champion"]["p50_ms"] == 3.0
    assert section["latency"]["challenger"]["p95_ms"] == 9.0


def test_no_routing_no_section(s3: Any, models: dict[str, TrainedModel]) -> None:
    register(s3, models["weak"])
    registry(s3).promote(1)
    assert run(s3)["challenger"] is None


def test_emf_per_alias(
    s3: Any, models: dict[str, TrainedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    from aws_lambda_powertools import Metrics

    from tests.integration.test_monitoring_handler import emf_blobs, metric_values

    setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(1000, 14)
    ids, *_ = serve(s3, models["weak"], models["strong"], X, percent=50)
    label(s3, ids, y, np.arange(1000))
    capsys.readouterr()
    sink = Metrics(namespace="TreeserveTest", service="treeserve-test")
    report = run(s3, settings=live(live_min_labeled_rows=100), metrics=sink)
    sink.flush_metrics()
    blobs = emf_blobs(capsys.readouterr().out)
    e = entry_of(report)
    for name, expected in (
        ("ChallengerAgreement", e["agreement"]["agreement"]),
        ("ChallengerMetricDelta", e["quality"]["improvement"]),
        ("ChallengerRowsCompared", e["rows"]["compared"]),
    ):
        ((dims, value),) = metric_values(blobs, name)
        assert dims == {"service": "treeserve-test", "model": "m", "alias": "challenger"}
        assert value == pytest.approx(expected)


# --- the CLI: monitor's summary and HTML, promote's evidence -----------------------------------


def test_monitor_prints_and_renders_the_comparison_and_promote_shows_it(
    s3: Any,
    models: dict[str, TrainedModel],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.integration.test_monitoring_cli import Collector
    from treeserve_cli.cli import main

    monkeypatch.delenv("MODEL_BUCKET", raising=False)
    monkeypatch.setenv("PROMOTION_MODE", "auto")
    monkeypatch.setenv("LIVE_MIN_LABELED_ROWS", "200")
    reg = setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(1200, 15)
    now = datetime.now(UTC)
    ids, to_canary, *_ = serve(s3, models["weak"], models["strong"], X, percent=50, ts=now)
    label(s3, ids, y, np.arange(1200))
    html = tmp_path / "report.html"
    code = main(["monitor", "--bucket", BUCKET, "--name", "m", "--hours", "2", "--html", str(html)])
    out = capsys.readouterr().out
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("challenger challenger")]
    n = int(to_canary.sum())
    assert f"(v2, canary): {n:,} rows compared ({n:,} canary, 0 shadow)" in line
    assert f"on {n:,} labeled rows; verdict: better; reported" in line
    text = html.read_text(encoding="utf-8")
    parser = Collector()
    parser.feed(text)
    parser.close()
    assert parser.errors == []
    assert "Challengers on live traffic" in text
    assert '<span class="badge">better</span>' in text
    assert "1,000 bootstrap resamples" in text

    assert main(["promote", "2", "--bucket", BUCKET, "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"live evidence (s3://{BUCKET}/reports/m/dt=")
    assert "verdict: better" in out.splitlines()[1]
    assert "promoted: version 2 of m is in service" in out
    assert reg.current().version == 2  # type: ignore[union-attr]
    assert main(["promote", "1", "--bucket", BUCKET, "--name", "m"]) == 0
    assert capsys.readouterr().out.startswith("live evidence: none for version 1")


@pytest.mark.parametrize("objective", ["multi:softprob", "reg:squarederror"])
def test_multiclass_and_regression_use_the_gates_metric(s3: Any, objective: str) -> None:
    from tests.conftest import train

    champion = train(objective, n=600, rounds=2, shift=0.8)  # trained on a shifted target
    contender = train(objective, n=600, rounds=20)
    setup(s3, champion, contender, Routing(canary=Canary("challenger", 50)))
    X, signal = make_data(900, seed=21)
    if objective.startswith("multi:"):
        y = np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])).astype(float)
    else:
        y = signal
    n = X.shape[0]
    ids = [f"req-{i}" for i in range(n)]
    to_canary = np.array([canary_bucket(i.encode()) < 50 for i in ids])
    old = np.asarray(champion.booster.inplace_predict(X), np.float32).reshape(n, -1)
    new = np.asarray(contender.booster.inplace_predict(X), np.float32).reshape(n, -1)
    body = captures.encode_capture(
        captures.CaptureRows(
            model="m",
            ids=ids,
            ts_ms=np.full(n, round(TS.timestamp() * 1000), np.int64),
            versions=np.where(to_canary, 2, 1).astype(np.int64),
            inputs=X.astype(np.float32),
            outputs=np.where(to_canary[:, None], new, old),
            aliases=["challenger" if c else "champion" for c in to_canary],
        )
    )
    s3.put_object(Bucket=BUCKET, Key=f"captures/m/dt={TS:%Y-%m-%d}/x.parquet", Body=body)
    label(s3, ids, y, np.arange(n))
    e = entry_of(run(s3, settings=live(live_min_labeled_rows=100)))
    rows = np.flatnonzero(to_canary)
    q = e["quality"]
    a, b, yy = old[rows].astype(np.float64), new[rows].astype(np.float64), y[rows]
    if objective.startswith("multi:"):
        assert q["metric"] == "logloss"
        assert q["champion"] == pytest.approx(model_metrics.log_loss(yy, a))
        assert q["challenger"] == pytest.approx(model_metrics.log_loss(yy, b))
        expected = np.mean(a.argmax(axis=1) == b.argmax(axis=1))
        assert e["agreement"] == {"rows": rows.size, "kind": "labels", "agreement": expected}
    else:
        assert q["metric"] == "rmse"
        assert q["champion"] == pytest.approx(model_metrics.rmse(yy, a[:, 0]))
        assert q["challenger"] == pytest.approx(model_metrics.rmse(yy, b[:, 0]))
        diff = np.abs(a[:, 0] - b[:, 0])
        assert e["agreement"]["mean_abs_diff"] == pytest.approx(diff.mean())
        tolerance = 0.1 * a[:, 0].std()
        assert e["agreement"]["agreement"] == pytest.approx(np.mean(diff <= tolerance))
    assert q["improvement"] == pytest.approx(q["champion"] - q["challenger"])
    assert e["verdict"] == "better"
    assert e["decision"]["action"] == "promoted"


def test_a_challenger_whose_bytes_do_not_match_is_never_loaded(
    s3: Any, models: dict[str, TrainedModel]
) -> None:
    reg = setup(s3, models["weak"], models["strong"], Routing(canary=Canary("challenger", 50)))
    X, y = data(800, 16)
    ids, *_ = serve(s3, models["weak"], models["strong"], X, percent=50)
    label(s3, ids, y, np.arange(800))
    # the stored model.ubj of version 2 swapped for other bytes: its sha256 no longer matches
    s3.put_object(Bucket=BUCKET, Key=reg.model_key(2), Body=models["bad"].ubj())
    report = run(s3, settings=live(live_min_labeled_rows=100))
    e = entry_of(report)
    assert e["verdict"] == "not enough evidence"
    assert "cannot be loaded" in e["reason"]
    assert "sha256" in e["reason"]
    assert e["decision"]["action"] == "held"
    assert reg.current().version == 1  # type: ignore[union-attr]
    assert report["status"] == "ok"  # the drift report is whole
    assert sorted(v["version"] for v in report["versions"]) == [1, 2]
