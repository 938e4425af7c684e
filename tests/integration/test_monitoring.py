"""run_monitoring on moto: captures in the inference function's format, registry manifests,
labels, reports in S3."""

from __future__ import annotations

import gzip
import hashlib
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest
import xgboost as xgb

from tests.conftest import BUCKET, TrainedModel, train
from tests.unit.test_reference import walk_numbers
from treeserve import captures
from treeserve.model.manifest import ModelManifest, task_of
from treeserve.model.reference import QUANTILES, compute_reference, reference_from_model
from treeserve.monitoring import pipeline as monitoring
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve.settings import DriftRule

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
START = NOW - timedelta(hours=24)


# --- helpers: register a model, write captures exactly as the inference function does ---------


def register(
    s3: Any,
    model: TrainedModel,
    name: str = "m",
    X_ref: np.ndarray | None = None,
    drift: dict[str, Any] | None = None,
) -> int:
    booster = model.booster
    ubj = model.ubj()
    X_ref = model.X if X_ref is None else X_ref
    num_class = int(booster.attr("num_class") or 0) or (
        3 if model.objective.startswith("multi:") else 0
    )
    manifest = ModelManifest(
        name=name,
        sha256=hashlib.sha256(ubj).hexdigest(),
        model_size=len(ubj),
        xgboost_version=xgb.__version__,
        objective=model.objective,
        task=task_of(model.objective, num_class),
        num_features=len(model.feature_names),
        feature_names=model.feature_names,
        feature_types=["float"] * len(model.feature_names),
        num_class=num_class,
        threshold=0.5 if model.objective.startswith("binary:") else None,
        reference=compute_reference(
            X_ref, model.feature_names, None, booster.inplace_predict(X_ref)
        ),
        reference_source="reference.csv",
        drift=drift,
    )
    return ModelRegistry(S3RegistryStore(BUCKET, s3=s3), name).register(ubj, manifest)


def capture_file(  # noqa: PLR0917 - beside capture_lines, the same arguments
    name: str,
    version: int | None,
    X: np.ndarray,
    predictions: np.ndarray,
    ids: list[str],
    ts: datetime,
) -> bytes:
    """A capture file as the inference function writes it (:func:`captures.encode_capture`)."""
    n = X.shape[0]
    P = np.asarray(predictions, dtype=np.float32).reshape(n, -1)
    return captures.encode_capture(
        captures.CaptureRows(
            model=name,
            ids=list(ids),
            ts_ms=np.full(n, round(ts.timestamp() * 1000), np.int64),
            versions=np.full(n, -1 if version is None else version, np.int64),
            inputs=np.asarray(X, dtype=np.float32),
            outputs=P,
            labels=[str(int(np.argmax(p))) for p in P] if P.shape[1] > 1 else None,
        )
    )


def put_capture(s3: Any, name: str, body: bytes, ts: datetime, tag: str) -> str:
    key = f"captures/{name}/dt={ts:%Y-%m-%d}/{ts:%Y%m%dT%H%M%S}000Z-{tag}.parquet"
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return key


def capture_lines(
    version: int | None,
    X: np.ndarray,
    predictions: np.ndarray,
    ids: list[str],
    ts: datetime,
) -> list[bytes]:
    """Capture lines as the previous release wrote them (:func:`captures.encode_lines`)."""
    stamp = captures.iso_millis(ts.timestamp())
    rows = [
        (
            row_id,
            stamp,
            version,
            row,
            pred,
            int(np.argmax(pred)) if isinstance(pred, list) else None,
        )
        for row_id, row, pred in zip(ids, X.tolist(), predictions.tolist(), strict=True)
    ]
    return captures.encode_lines(rows).splitlines()


def put_captures(s3: Any, name: str, lines: list[bytes], ts: datetime, tag: str) -> str:
    key = f"captures/{name}/dt={ts:%Y-%m-%d}/{ts:%Y%m%dT%H%M%S}000Z-{tag}.jsonl.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(b"\n".join([*lines, b""])))
    return key


def traffic(
    s3: Any,
    model: TrainedModel,
    version: int,
    X: np.ndarray,
    *,
    name: str = "m",
    prefix: str = "r",
    ts: datetime = NOW - timedelta(hours=1),
    files: int = 2,
) -> tuple[list[str], np.ndarray]:
    preds = model.booster.inplace_predict(X)
    ids = [f"{prefix}-{i}" for i in range(X.shape[0])]
    for f, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        body = capture_file(name, version, X[part], preds[part], [ids[i] for i in part], ts)
        put_capture(s3, name, body, ts, f"{prefix}{f}")
    return ids, preds


def independent_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def run(s3: Any, name: str = "m", **kwargs: Any) -> dict[str, Any]:
    return monitoring.run_monitoring(BUCKET, name, START, NOW, s3=s3, now=NOW, **kwargs)


def stored_report(s3: Any, report: dict[str, Any]) -> dict[str, Any]:
    body = s3.get_object(Bucket=BUCKET, Key=report["report_key"])["Body"].read()
    return dict(orjson.loads(body))


# --- tests -------------------------------------------------------------------------------------


def test_binary_report_drift_and_labelled_performance(s3: Any) -> None:
    model = train("binary:logistic", n=1500)
    version = register(s3, model)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(1200, 6))
    X[:, 2] += 1.0  # planted shift in f2 only
    X[::10, 4] = np.nan
    ids, preds = traffic(s3, model, version, X, files=3)
    # Labels arrive later for half the rows, as CSV.
    y_all = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    labelled = np.arange(0, 1200, 2)
    body = "id,label\n" + "".join(f"{ids[i]},{y_all[i]}\n" for i in labelled)
    s3.put_object(Bucket=BUCKET, Key="labels/m/day1.csv", Body=body.encode())

    calls: list[tuple[int, int]] = []
    report = run(s3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert report["report_key"].startswith("reports/m/dt=2026-11-29/")
    assert stored_report(s3, report) == orjson.loads(orjson.dumps(report))
    assert report["status"] == "ok"
    assert report["rows"] == 1200
    assert report["files"] == 3
    assert report["summary"]["drifted_features"] == ["f2"]
    (v,) = report["versions"]
    assert v["version"] == version
    assert v["features"][4]["n_missing"] == 120
    # 1 row in 10 missing where the reference had none: a quality flag, not drift
    assert "missing_rate" in v["quality_flags"]["f4"]
    assert v["quality_flags"]["f4"] == ["missing_rate"]
    assert v["quality_flags"]["f2"] == ["out_of_range"]  # the shift pushes rows past the max
    assert report["summary"]["quality_flagged_features"] == ["f2", "f4"]
    assert all(math.isfinite(x) for x in walk_numbers(report))

    perf = report["summary"]["performance"]
    y = y_all[labelled].astype(float)
    s = preds[labelled].astype(np.float32).astype(np.float64)  # captures are read as float32
    assert perf["rows"] == labelled.size
    assert abs(perf["auc"] - independent_auc(y, s)) < 1e-9
    assert abs(perf["accuracy"] - np.mean((s >= 0.5) == (y == 1))) < 1e-9
    p = np.clip(s, 1e-15, 1 - 1e-15)
    assert abs(perf["log_loss"] - float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))) < 1e-9
    assert v["performance"] == perf


def test_regression_labels_jsonl_give_rmse_mae(s3: Any) -> None:
    model = train("reg:squarederror", n=600)
    version = register(s3, model, "reg")
    X = np.random.default_rng(1).normal(size=(300, 6))
    ids, preds = traffic(s3, model, version, X, name="reg")
    target = X[:, 0] + 0.5 * X[:, 1]
    lines = [orjson.dumps({"id": ids[i], "label": float(target[i])}) for i in range(0, 300, 3)]
    s3.put_object(Bucket=BUCKET, Key="labels/reg/batch.jsonl", Body=b"\n".join(lines))
    report = run(s3, "reg")
    perf = report["summary"]["performance"]
    err = preds[::3].astype(np.float32).astype(np.float64) - target[::3]
    assert perf["rows"] == 100
    assert abs(perf["rmse"] - math.sqrt(float(np.mean(err**2)))) < 1e-9
    assert abs(perf["mae"] - float(np.mean(np.abs(err)))) < 1e-9
    assert report["summary"]["drifted_features"] == []


def test_multiclass_prediction_drift_per_class(s3: Any) -> None:
    model = train("multi:softprob", n=600)
    version = register(s3, model, "mc")
    X = np.random.default_rng(2).normal(size=(400, 6))
    X[:, 0] += 2.0  # moves the predicted classes
    ids, preds = traffic(s3, model, version, X, name="mc")
    body = "id,label\n" + "".join(f"{ids[i]},{int(np.argmax(preds[i]))}\n" for i in range(400))
    s3.put_object(Bucket=BUCKET, Key="labels/mc/l.csv", Body=body.encode())
    report = run(s3, "mc")
    (v,) = report["versions"]
    assert [p["name"] for p in v["predictions"]] == [
        "prediction[0]",
        "prediction[1]",
        "prediction[2]",
    ]
    assert report["summary"]["prediction_drifted"] is True
    assert report["summary"]["prediction_drift"] >= 0.25
    assert "f0" in report["summary"]["drifted_features"]
    assert report["summary"]["performance"]["accuracy"] == 1.0


def test_no_captures_reports_no_data(s3: Any) -> None:
    model = train("binary:logistic")
    register(s3, model)
    report = run(s3)
    assert report["status"] == "no data"
    assert report["rows"] == 0
    assert report["versions"] == []
    assert report["summary"]["n_drifted"] == 0
    assert stored_report(s3, report)["status"] == "no data"


def test_window_and_versions(s3: Any) -> None:
    old = train("binary:logistic", seed=0)
    new = train("binary:logistic", seed=1, shift=0.5)
    v1 = register(s3, old)
    v2 = register(s3, new, X_ref=new.X + np.array([0, 0, 0, 3.0, 0, 0]))
    rng = np.random.default_rng(9)
    traffic(s3, old, v1, rng.normal(size=(200, 6)), prefix="a")
    traffic(s3, new, v2, rng.normal(size=(150, 6)), prefix="b")
    # Outside the window: an older partition (not even listed) and rows late on the end day.
    traffic(s3, old, v1, rng.normal(size=(50, 6)), prefix="c", ts=START - timedelta(days=2))
    traffic(s3, old, v1, rng.normal(size=(40, 6)), prefix="d", ts=NOW + timedelta(minutes=5))
    report = run(s3)
    assert report["rows"] == 350
    assert report["rows_outside_window"] == 40
    assert report["files"] == 6  # two per day-partition of the window: a, b, d
    by_version = {v["version"]: v for v in report["versions"]}
    assert by_version[v1]["rows"] == 200
    assert by_version[v2]["rows"] == 150
    # v2's reference has f3 shifted by +3: its traffic drifts against it, v1's does not.
    assert by_version[v1]["drifted_features"] == []
    assert by_version[v2]["drifted_features"] == ["f3"]


class CountingS3:
    """The real client, counting list calls (and, when ``page`` is set, paging prefixes by it)."""

    def __init__(self, s3: Any, page: int | None = None) -> None:
        self.s3, self.page = s3, page
        self.listed: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.s3, name)

    def list_objects_v2(self, **kwargs: Any) -> Any:
        self.listed.append(kwargs)
        if self.page is not None and "Delimiter" in kwargs:
            kwargs = {**kwargs, "MaxKeys": self.page}
        return self.s3.list_objects_v2(**kwargs)


@pytest.mark.parametrize("page", [None, 2])
def test_a_long_window_lists_only_the_days_that_exist(s3: Any, page: int | None) -> None:
    model = train("binary:logistic")
    version = register(s3, model)
    rng = np.random.default_rng(4)
    days = [
        datetime(1900, 3, 1, 12, tzinfo=UTC),  # before the window: neither listed nor read
        datetime(1950, 6, 1, 12, tzinfo=UTC),
        datetime(2001, 1, 1, 0, tzinfo=UTC),
        datetime(2026, 11, 28, 23, tzinfo=UTC),
        datetime(2030, 1, 1, 12, tzinfo=UTC),  # after the window
    ]
    for i, ts in enumerate(days):
        traffic(s3, model, version, rng.normal(size=(10, 6)), prefix=f"d{i}", ts=ts, files=1)
    s3.put_object(Bucket=BUCKET, Key="captures/m/stray.jsonl.gz", Body=b"")  # no partition
    s3.put_object(Bucket=BUCKET, Key="captures/m/dt=bad/x.jsonl.gz", Body=b"")
    start, end = datetime(1926, 11, 29, tzinfo=UTC), NOW  # 100 years: 36,525 days
    client = CountingS3(s3, page)
    report = monitoring.run_monitoring(BUCKET, "m", start, end, s3=client, now=NOW, write=False)
    assert report["rows"] == 30
    assert report["files"] == 3
    captures = [k for k in client.listed if k["Prefix"].startswith("captures/")]
    by_day = [k["Prefix"] for k in captures if "Delimiter" not in k]
    assert by_day == [
        "captures/m/dt=1950-06-01/",
        "captures/m/dt=2001-01-01/",
        "captures/m/dt=2026-11-28/",
    ]
    # One listing of the partitions (pages of ``page``: 1950, 2001 | 2026, 2030: stop), then
    # one per day in the window: 5 calls for a century, not 36,525.
    assert len(captures) - len(by_day) == (1 if page is None else 2)


def test_a_day_window_lists_one_partition(s3: Any) -> None:
    model = train("binary:logistic")
    version = register(s3, model)
    for i in range(40):  # 40 earlier days of captures
        day = START - timedelta(days=i + 2)
        traffic(s3, model, version, np.zeros((1, 6)), prefix=f"o{i}", ts=day, files=1)
    traffic(s3, model, version, np.zeros((5, 6)), prefix="now")
    client = CountingS3(s3, page=2)
    report = monitoring.run_monitoring(BUCKET, "m", START, NOW, s3=client, now=NOW, write=False)
    assert report["rows"] == 5
    captures = [k for k in client.listed if k["Prefix"].startswith("captures/")]
    assert [k["Prefix"] for k in captures if "Delimiter" not in k] == ["captures/m/dt=2026-11-29/"]
    # The partition listing starts at the window's first day: the 40 before it cost nothing.
    assert len([k for k in captures if "Delimiter" in k]) == 1


def test_fast_and_general_parsers_agree_and_bad_lines_are_counted(s3: Any) -> None:
    model = train("binary:logistic")
    version = register(s3, model)
    X = np.random.default_rng(3).normal(size=(300, 6))
    X[::7, 1] = np.nan
    preds = model.booster.inplace_predict(X)
    ts = NOW - timedelta(hours=2)
    lines = capture_lines(version, X, preds, [f"x{i}" for i in range(300)], ts)
    put_captures(s3, "m", lines, ts, "fast")
    fast = run(s3, write=False)
    assert captures.fast_parse(b"\n".join(lines)) is not None
    # A blank line, a broken line and a row of the wrong width send the file the general way.
    bad_width = orjson.loads(lines[0])
    bad_width["features"] = [1.0, 2.0]
    s3.delete_object(
        Bucket=BUCKET, Key=f"captures/m/dt={ts:%Y-%m-%d}/{ts:%Y%m%dT%H%M%S}000Z-fast.jsonl.gz"
    )
    put_captures(s3, "m", [*lines, b"", b"{not json", orjson.dumps(bad_width)], ts, "slow")
    slow = run(s3, write=False)
    assert slow["rows"] == fast["rows"] == 300
    assert slow["malformed_rows"] == 1
    strip = ("p_value", "statistic", "psi", "js_distance", "chart", "current")
    for a, b in zip(fast["versions"][0]["features"], slow["versions"][0]["features"], strict=True):
        for k in strip:
            assert a[k] == b[k]


def test_version_without_manifest_is_reported_not_fatal(s3: Any) -> None:
    model = train("binary:logistic")
    register(s3, model)
    traffic(s3, model, 99, np.zeros((5, 6)))
    report = run(s3)
    (v,) = report["versions"]
    assert v["version"] == 99
    assert "no version 99" in v["error"]
    assert report["rows"] == 5


def test_model_only_reference_reports_current_shares(s3: Any) -> None:
    model = train("binary:logistic")
    ubj = model.ubj()
    manifest = ModelManifest(
        name="bare",
        sha256=hashlib.sha256(ubj).hexdigest(),
        model_size=len(ubj),
        xgboost_version=xgb.__version__,
        objective=model.objective,
        task="binary",
        num_features=6,
        feature_names=model.feature_names,
        feature_types=["float"] * 6,
        reference=reference_from_model(ubj, model.feature_names, None),
        reference_source="model",
    )
    version = ModelRegistry(S3RegistryStore(BUCKET, s3=s3), "bare").register(ubj, manifest)
    X = np.random.default_rng(6).normal(size=(200, 6)) + 5.0  # far away, yet no baseline
    traffic(s3, model, version, X, name="bare")
    report = run(s3, "bare")
    (v,) = report["versions"]
    assert v["reference_source"] == "model"
    assert v["checks"] == ["bin_shares", "missing_rate", "new_categories"]
    assert report["summary"]["drifted_features"] == []
    f0 = v["features"][0]
    assert f0["psi"] is None
    assert f0["chart"]["reference"] is None
    # Every row lies above the model's last split threshold on f0: the last bin holds them all.
    assert f0["chart"]["current"][-2] == 1.0
    assert all(math.isfinite(x) for x in walk_numbers(report))


def test_other_key_orders_parse_the_same(s3: Any) -> None:
    model = train("binary:logistic")
    version = register(s3, model)
    X = np.random.default_rng(12).normal(size=(120, 6))
    X[::9, 0] = np.nan
    preds = model.booster.inplace_predict(X)
    ts = NOW - timedelta(hours=3)
    canonical = capture_lines(version, X, preds, [f"k{i}" for i in range(120)], ts)
    put_captures(s3, "m", canonical, ts, "canonical")
    expected = run(s3, write=False)["versions"][0]["features"]

    def reorder(line: bytes, keys: list[str]) -> bytes:
        rec = orjson.loads(line)
        return orjson.dumps({k: rec[k] for k in keys})

    # ts+version and features+prediction still adjacent, but not all four in a row
    pairs_order = ["ts", "version", "id", "features", "prediction", "label"]
    pairs = [reorder(line, pairs_order) for line in canonical]
    assert captures.fast_parse(b"\n".join(pairs)) is not None  # two-pattern fast path
    shuffled_order = ["prediction", "ts", "id", "features", "label", "version"]
    shuffled = [reorder(line, shuffled_order) for line in canonical]
    assert captures.fast_parse(b"\n".join(shuffled)) is None  # general path
    for lines in (pairs, shuffled):
        for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="captures/m/")["Contents"]:
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
        put_captures(s3, "m", lines, ts, "other")
        got = run(s3, write=False)
        assert got["rows"] == 120
        for a, b in zip(expected, got["versions"][0]["features"], strict=True):
            assert a["psi"] == b["psi"]
            assert a["p_value"] == b["p_value"]
            assert a["n_missing"] == b["n_missing"]


def test_corrupt_file_is_skipped_and_storage_errors_are_domain_errors(s3: Any) -> None:
    from botocore.exceptions import ClientError

    from treeserve.errors import ConfigurationError, StorageUnavailable

    model = train("binary:logistic")
    version = register(s3, model)
    traffic(s3, model, version, np.zeros((30, 6)), files=1)
    day = (NOW - timedelta(hours=1)).strftime("%Y-%m-%d")
    s3.put_object(Bucket=BUCKET, Key=f"captures/m/dt={day}/broken.jsonl.gz", Body=b"not gzip")
    report = run(s3)
    assert report["rows"] == 30
    assert report["skipped_files"] == 1

    with pytest.raises(ConfigurationError, match="does not exist"):
        monitoring.run_monitoring("no-such-bucket", "m", START, NOW, s3=s3)

    class Throttled:
        """The real client, except that reads are throttled."""

        def __getattr__(self, name: str) -> Any:
            return getattr(s3, name)

        def get_object(self, **kwargs: Any) -> Any:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow"}}, "GetObject")

    with pytest.raises(StorageUnavailable, match="SlowDown"):
        monitoring.run_monitoring(BUCKET, "m", START, NOW, s3=Throttled())  # type: ignore[arg-type]


def test_labels_join_any_id_shape(s3: Any) -> None:
    model = train("reg:squarederror")
    version = register(s3, model, "ids")
    X = np.random.default_rng(13).normal(size=(6, 6))
    preds = model.booster.inplace_predict(X)
    ts = NOW - timedelta(hours=1)
    plain = capture_lines(version, X[:2], preds[:2], ["a-1", "a-2"], ts)
    quoted = capture_lines(version, X[2:4], preds[2:4], ['q"1', "q\\2"], ts)
    numeric = [
        orjson.dumps({**orjson.loads(line), "id": 7 + i})
        for i, line in enumerate(capture_lines(version, X[4:], preds[4:], ["", ""], ts))
    ]
    for tag, lines in (("plain", plain), ("quoted", quoted), ("numeric", numeric)):
        put_captures(s3, "ids", lines, ts, tag)
    labels = [("a-1", 1.0), ("a-2", 2.0), ('q"1', 3.0), ("q\\2", 4.0), (7, 5.0), (8, 6.0)]
    body = b"\n".join(orjson.dumps({"id": i, "label": y}) for i, y in labels)
    s3.put_object(Bucket=BUCKET, Key="labels/ids/all.jsonl", Body=body)
    perf = run(s3, "ids")["summary"]["performance"]
    assert perf["rows"] == 6
    err = preds.astype(np.float32).astype(np.float64) - np.arange(1.0, 7.0)
    assert abs(perf["mae"] - float(np.mean(np.abs(err)))) < 1e-9


def test_ids_by_width_join_as_one_lookup_per_id_would(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture files' ids are joined by width with numpy (treeserve.monitoring.labels); the
    labelled rows, their order and the metrics equal those of one dict lookup per id."""
    model = train("binary:logistic", n=1500)
    version = register(s3, model, "w")
    rng = np.random.default_rng(21)
    X = rng.normal(size=(900, 6))
    ids, preds = traffic(s3, model, version, X, name="w", prefix="id", files=3)
    y = (X[:, 0] > 0).astype(int)
    chosen = sorted(rng.choice(900, 400, replace=False).tolist())
    lines = [f"{ids[i]},{y[i]}" for i in chosen] + [f"{ids[5]},n/a", "id-99999,1", "ghost,0"]
    body = "id,label\n" + "\n".join(lines)
    s3.put_object(Bucket=BUCKET, Key="labels/w/l.csv", Body=body.encode())

    widths: list[int] = []
    indexed = monitoring.LabelIndex._width

    def counted(self: Any, width: int) -> Any:
        widths.append(width)
        return indexed(self, width)

    monkeypatch.setattr(monitoring.LabelIndex, "_width", counted)
    fast = run(s3, "w")["summary"]["performance"]
    assert widths == [4, 5, 6, 6, 6]  # "id-0".."id-299" in three runs, then one width a file
    monkeypatch.setattr(monitoring.LabelIndex, "_width", lambda self, width: None)
    slow = run(s3, "w")["summary"]["performance"]
    assert fast == slow
    keep = [i for i in chosen if i != 5]  # "n/a" is no label: its row is left out
    assert fast["rows"] == len(keep)
    s = preds[keep].astype(np.float32).astype(np.float64)
    assert abs(fast["auc"] - independent_auc(y[keep].astype(float), s)) < 1e-9


def test_the_report_is_the_same_however_rows_are_gathered(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 1,024 rows (across capture files, the last one partial) or one batch for
    the whole window: the same report, to the last bit (counts and exact sums)."""
    model = train("binary:logistic", n=1500)
    version = register(s3, model, "g")
    X = np.random.default_rng(8).normal(size=(2500, 6)) * np.float32(3.0)
    X[::7, 1] = np.nan
    traffic(s3, model, version, X, name="g", files=3)
    whole = run(s3, "g", write=False)
    monkeypatch.setattr(monitoring, "ACCUMULATE_VALUES", 6 * 100)  # 1,024 rows, the minimum
    batched = run(s3, "g", write=False)
    assert batched == whole
    assert whole["rows"] == 2500


def test_a_storage_failure_mid_run_leaves_no_download_behind(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download threads outlive a run (one pool per process); its downloads do not: when
    a file fails, the queued ones are cancelled and those under way waited for."""
    import threading
    import time

    from treeserve.errors import StorageUnavailable

    model = train("binary:logistic", n=600)
    version = register(s3, model, "fail")
    traffic(s3, model, version, np.zeros((400, 6)), name="fail", files=20)
    active: list[int] = [0]
    started: list[str] = []
    lock = threading.Lock()
    fetch = monitoring._fetch

    def slow_or_failing(s3_: Any, bucket: str, key: str, limit: int) -> bytes:
        with lock:
            active[0] += 1
            started.append(key)
            nth = len(started)
        try:
            if nth == 3:
                raise StorageUnavailable("SlowDown: try again later")
            if nth > 3:
                time.sleep(0.2)
            return fetch(s3_, bucket, key, limit)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(monitoring, "_fetch", slow_or_failing)
    with pytest.raises(StorageUnavailable):
        run(s3, "fail")
    assert active[0] == 0  # nothing of the run still downloading
    # 16 were queued (MAX_IN_FLIGHT_FILES); those no thread had taken were cancelled.
    assert monitoring.MAX_IN_FLIGHT_FILES == 16
    assert len(started) < 16
    monkeypatch.setattr(monitoring, "_fetch", fetch)
    assert run(s3, "fail")["rows"] == 400  # the pool serves the next run


def test_a_run_reads_the_labels_once(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drift part joins them; with no routing the challenger part needs none."""
    model = train("binary:logistic", n=600)
    version = register(s3, model, "once")
    X = np.random.default_rng(3).normal(size=(200, 6))
    ids, _ = traffic(s3, model, version, X, name="once")
    body = "id,label\n" + "".join(f"{i},1\n" for i in ids[::2])
    s3.put_object(Bucket=BUCKET, Key="labels/once/l.csv", Body=body.encode())
    calls: list[str] = []
    real = monitoring.read_labels

    def counted(s3_: Any, bucket: str, model_name: str) -> dict[str, Any]:
        calls.append(model_name)
        return real(s3_, bucket, model_name)

    monkeypatch.setattr(monitoring, "read_labels", counted)
    report = run(s3, "once")
    assert report["summary"]["performance"]["rows"] == 100
    assert report["challenger"] is None
    assert calls == ["once"]


def test_csv_labels_plain_quoted_and_reordered() -> None:
    plain: dict[str, Any] = {}
    monitoring._read_csv_labels("id,label\nx,1\ny,0\r\n\nz,\n", plain)
    assert plain == {"x": "1", "y": "0"}
    quoted: dict[str, Any] = {}
    monitoring._read_csv_labels('id,label,extra\n"q,1",yes,3\nw,no,4\n', quoted)
    assert quoted == {"q,1": "yes", "w": "no"}
    reordered: dict[str, Any] = {}
    monitoring._read_csv_labels("label,id\n1,x\n", reordered)
    assert reordered == {"x": "1"}


def test_drift_rules_from_settings_and_manifest_overrides(s3: Any) -> None:
    model = train("binary:logistic", n=3000)
    rng = np.random.default_rng(9)
    X = rng.normal(size=(5000, 6))
    X[:, 1] += 0.4  # KS about 0.16, normed Wasserstein about 0.4
    X[:, 3] *= 1.3  # KS about 0.07, normed Wasserstein about 0.24
    plain = register(s3, model, "plain")
    traffic(s3, model, plain, X, name="plain")
    report = run(s3, "plain", rule=DriftRule("wasserstein", 0.1))
    assert report["summary"]["drifted_features"] == ["f1", "f3"]
    assert report["summary"]["thresholds"]["method"] == "wasserstein"
    (v,) = report["versions"]
    for f in v["features"]:
        assert f["rule"] == {"method": "wasserstein", "threshold": 0.1}
        for key in ("psi", "js_distance", "ks_statistic", "wasserstein_normed"):
            assert isinstance(f[key], float), key
        assert f["ks_bound"] == 1 / (2 * QUANTILES)  # 3000 reference rows, QUANTILES kept
    assert v["predictions"][0]["rule"] == {"method": "wasserstein", "threshold": 0.1}
    assert run(s3, "plain", rule=DriftRule("ks", 0.1))["summary"]["drifted_features"] == ["f1"]

    # The manifest's rules win over the environment's: f3 judged by KS keeps quiet.
    drift = {"default": {"method": "wasserstein"}, "features": {"f3": {"method": "ks"}}}
    tuned = register(s3, model, "tuned", drift=drift)
    traffic(s3, model, tuned, X, name="tuned")
    report = run(s3, "tuned", rule=DriftRule("psi", 0.1))
    assert report["summary"]["drifted_features"] == ["f1"]
    (v,) = report["versions"]
    assert v["features"][3]["rule"] == {"method": "ks", "threshold": 0.1}
    assert v["features"][0]["rule"] == {"method": "wasserstein", "threshold": 0.1}
