"""The capture format end to end: captures written by the real inference handler (a categorical
multiclass model published through refresh, on moto) are read back by monitoring bit for bit,
and the README's SQL examples run on them with DuckDB, over the view the README documents.
Also: captures of the previous release (JSON Lines) stay readable beside Parquet ones, a
corrupt Parquet object is skipped and counted, and the Glue table follows the schema."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.conftest import BUCKET, ROOT, LambdaContext
from tests.inference_support import http_api_event, response_body
from tests.integration.refresh_stack import INFERENCE_DIR, RefreshStack, build_stack
from tests.integration.test_categorical import fit, frame, publish, records
from treeserve import captures, parquet
from treeserve.monitoring import pipeline as monitoring

pytestmark = pytest.mark.integration

duckdb = pytest.importorskip("duckdb")
MODEL = "churn"  # the README's examples name this model


@pytest.fixture
def stack(s3: Any, monkeypatch: pytest.MonkeyPatch) -> RefreshStack:
    return build_stack(monkeypatch, s3)


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- capture-sql-examples -->", 1)[1].split(
        "<!-- /capture-sql-examples -->", 1
    )[0]
    queries = re.findall(r"```sql\n(.*?)```", block, flags=re.DOTALL)
    assert len(queries) >= 3
    return queries


def readme_view(root: Path) -> str:
    """The README's DuckDB view, pointed at a local copy of the bucket."""
    text = (ROOT / "README.md").read_text()
    view = next(q for q in re.findall(r"```sql\n(.*?)```", text, re.DOTALL) if "CREATE VIEW" in q)
    return view.replace("s3://BUCKET/", f"{root}/")


def serve(monkeypatch: pytest.MonkeyPatch, body: bytes) -> tuple[Any, dict[str, Any]]:
    from treeserve_cli.invoke import import_handler

    monkeypatch.setenv("MODEL_NAME", MODEL)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "treeserve-inference")
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    monkeypatch.setenv("CAPTURE_MAX_ROWS", "25")  # two objects for 40 rows
    handler = import_handler(INFERENCE_DIR, "app.handler", fresh=True)
    response = handler(
        http_api_event("POST", "/predict", body, {"content-type": "application/json"}),
        LambdaContext(),
    )
    assert response["statusCode"] == 200, response
    return handler, json.loads(response_body(response))


def test_inference_captures_read_back_bit_for_bit_and_queried_with_duckdb(
    stack: RefreshStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from treeserve.serving.capture import wait_for_writes

    data = frame(600, 0)
    model = fit("multiclass", data)
    publish(stack, MODEL, model, data.iloc[:200])
    manifest = stack.registry(MODEL).manifest(1)
    assert manifest.categories is not None

    traffic = frame(40, 5)
    ids = [f"row-{i}" if i % 7 else f'ünï "{i}"' for i in range(40)]  # any text is an id
    body = json.dumps({"instances": records(traffic), "ids": ids}).encode()
    _, answer = serve(monkeypatch, body)
    wait_for_writes()

    listed = stack.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"captures/{MODEL}/")
    keys = sorted(o["Key"] for o in listed["Contents"])
    assert len(keys) == 1  # one request: one batch (the bound is checked per request)
    raw = stack.s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    got = captures.decode_capture(raw)

    # What the service computed: the float32 matrix of codes (in the manifest's category
    # order) and the outputs it answered with.
    codes = {
        name: {str(v): float(c) for c, v in enumerate(values)}
        for name, values in manifest.categories.items()
    }
    X = np.column_stack(
        [
            traffic[name].map(codes[name]).astype(float).to_numpy()
            if name in codes
            else traffic[name].to_numpy(dtype=float)
            for name in manifest.feature_names
        ]
    ).astype(np.float32)
    P = np.asarray(answer["predictions"], dtype=np.float32)
    assert P.shape == (40, 3)
    assert got.model == MODEL
    assert got.ids == answer["ids"] == ids
    assert got.versions.tolist() == [1] * 40
    assert np.array_equal(got.inputs.view(np.uint32), X.view(np.uint32))  # NaNs included
    assert np.array_equal(got.outputs.view(np.uint32), P.view(np.uint32))
    assert got.labels == [str(label) for label in answer["labels"]]
    assert got.aliases == ["champion"] * 40  # the champion answered (no routing)
    assert got.latency_ms is not None
    assert np.all(got.latency_ms > 0)
    assert np.unique(got.latency_ms).size == 1
    for name in ("plan", "region"):
        want = [None if pd.isna(v) else str(v) for v in traffic[name].astype(object)]
        assert got.categories[name] == want
    now = datetime.now(UTC)
    assert abs(int(got.ts_ms[0]) / 1000 - now.timestamp()) < 120

    # Monitoring reads the same bits.
    start, end = now - timedelta(hours=1), now + timedelta(minutes=1)
    split = captures.capture_split(raw, monitoring._ms(start), monitoring._ms(end), with_ids=True)
    (group,) = split.groups
    assert group.version == 1
    assert np.array_equal(group.X.view(np.uint32), X.view(np.uint32))
    assert group.P is not None
    assert np.array_equal(group.P.view(np.uint32), P.view(np.uint32))
    assert group.ids == [i.encode() for i in ids]
    report = monitoring.run_monitoring(BUCKET, MODEL, start, end, s3=stack.s3, write=False)
    assert report["rows"] == 40
    assert report["files"] == 1

    # The README's queries, with DuckDB, over a copy of the bucket's captures.
    for key in keys:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
    con = duckdb.connect()
    con.execute(readme_view(tmp_path))
    per_day, per_plan, per_hour, per_alias = (con.execute(q).fetchall() for q in readme_queries())
    assert per_day == [
        (now.date(), 1, 40, pytest.approx(float(P[:, 0].astype(np.float64).mean()), rel=1e-6))
    ]
    plans = Counter(None if pd.isna(v) else str(v) for v in traffic["plan"].astype(object))
    assert {row[0]: row[1] for row in per_plan} == dict(plans)
    assert sum(row[2] for row in per_hour) == 40
    assert {row[1] for row in per_hour} == {str(label) for label in answer["labels"]}
    [(alias, version, count, mean_score, mean_latency)] = per_alias
    assert (alias, version, count) == ("champion", 1, 40)
    assert mean_score == pytest.approx(float(P[:, 0].astype(np.float64).mean()), rel=1e-6)
    assert mean_latency == pytest.approx(float(got.latency_ms[0]), rel=1e-6)


def test_json_lines_captures_of_the_previous_release_are_still_read(s3: Any) -> None:
    """A window that spans the upgrade: the same rows as JSON Lines and as Parquet count alike."""
    from tests.conftest import train
    from tests.integration.test_monitoring import (
        NOW,
        capture_file,
        capture_lines,
        put_capture,
        put_captures,
        register,
        run,
    )

    model = train("binary:logistic", n=400)
    version = register(s3, model)
    X = model.X[:300].astype(np.float32)
    preds = model.booster.inplace_predict(X)
    ids = [f"x{i}" for i in range(300)]
    ts = NOW - timedelta(hours=2)
    put_capture(s3, "m", capture_file("m", version, X[:150], preds[:150], ids[:150], ts), ts, "new")
    both = run(s3, write=False)
    put_captures(s3, "m", capture_lines(version, X[150:], preds[150:], ids[150:], ts), ts, "old")
    mixed = run(s3, write=False)
    assert both["rows"] == 150
    assert mixed["rows"] == 300
    assert mixed["files"] == 2
    # The same 300 rows all in Parquet give the same statistics as the mixed window.
    s3.delete_object(
        Bucket=BUCKET,
        Key=f"captures/m/dt={ts:%Y-%m-%d}/{ts:%Y%m%dT%H%M%S}000Z-old.jsonl.gz",
    )
    put_capture(s3, "m", capture_file("m", version, X[150:], preds[150:], ids[150:], ts), ts, "b")
    parquet_only = run(s3, write=False)
    assert parquet_only["versions"][0]["features"] == mixed["versions"][0]["features"]


def test_corrupt_parquet_is_skipped_and_rows_without_version_are_malformed(s3: Any) -> None:
    from tests.conftest import train
    from tests.integration.test_monitoring import NOW, put_capture, register, run

    model = train("binary:logistic", n=200)
    version = register(s3, model)
    n = 20
    X = model.X[:n].astype(np.float32)
    ts = NOW - timedelta(hours=1)
    t_ms = round(ts.timestamp() * 1000)
    rows = captures.CaptureRows(
        model="m",
        ids=[f"i{i}" for i in range(n)],
        ts_ms=np.array([t_ms] * (n - 2) + [t_ms - 86_400_000 * 3, t_ms], np.int64),
        versions=np.array([version] * (n - 1) + [-1], np.int64),
        inputs=X,
        outputs=model.booster.inplace_predict(X).astype(np.float32).reshape(-1, 1),
    )
    body = captures.encode_capture(rows)
    put_capture(s3, "m", body, ts, "good")
    put_capture(s3, "m", body[: len(body) // 2] + body[-8:], ts, "truncated")
    put_capture(s3, "m", b"PAR1 not really PAR1", ts, "junk")
    report = run(s3, write=False)
    assert report["rows"] == n - 2
    assert report["rows_outside_window"] == 1
    assert report["malformed_rows"] == 1
    assert report["skipped_files"] == 2
    assert report["files"] == 1


def test_parquet_strings_levels_and_gzip_pages_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = [b"", b"a", "ünï".encode(), b"\x00x\x00", b"y" * 300, b"tail\x00"]
    for picked in ([values[i % len(values)] for i in range(50)], [b"same\x00"] * 9, [b""] * 3):
        encoded = parquet.encode_strings(picked)
        assert parquet.decode_strings(encoded, 0, len(picked)) == picked
    for max_level in (1, 2, 3):
        levels = rng.integers(0, max_level + 1, 1001).astype(np.uint8)
        data = parquet.encode_levels(levels, max_level)
        back, end = parquet.decode_levels(data, 0, levels.size, max_level)
        assert end == len(data)
        assert np.array_equal(back, levels)
    n = 300
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    rows = captures.CaptureRows(
        model="m",
        ids=[str(i) * (i % 5) for i in range(n)],  # "" included, lengths vary
        ts_ms=np.arange(n, dtype=np.int64) + 1_795_927_250_123,
        versions=np.where(np.arange(n) % 11 == 0, -1, 2).astype(np.int64),
        inputs=X,
        outputs=rng.random((n, 2)).astype(np.float32),
        labels=[None if i % 3 else f"c{i}" for i in range(n)],
        aliases=[None if i % 2 else "canary" for i in range(n)],
        latency_ms=np.where(np.arange(n) % 7 == 0, np.nan, np.arange(n) / 8).astype(np.float32),
        categories={"k": [None if i % 4 else f"v{i}" for i in range(n)]},
    )
    for codec in (parquet.UNCOMPRESSED, parquet.GZIP):
        data = captures.encode_capture(rows, codec=codec)
        back = captures.decode_capture(data)
        assert back.ids == rows.ids
        assert np.array_equal(back.ts_ms, rows.ts_ms)
        assert np.array_equal(back.versions, rows.versions)
        assert np.array_equal(back.inputs.view(np.uint32), X.view(np.uint32))
        assert np.array_equal(back.outputs, rows.outputs)
        assert back.labels == rows.labels
        assert back.aliases == rows.aliases
        assert back.latency_ms is not None
        assert rows.latency_ms is not None
        assert np.array_equal(back.latency_ms, rows.latency_ms, equal_nan=True)
        assert back.categories == rows.categories
        # and DuckDB reads the same values
        con = duckdb.connect()
        path = tmp_path / f"capture-{codec}.parquet"
        path.write_bytes(data)
        got = con.execute(
            "SELECT id, version, alias, label, categories['k'], outputs[2], epoch_ms(ts), "
            "latency_ms "
            "FROM read_parquet(?)",
            [str(path)],
        ).fetchall()
        assert [r[0] for r in got] == rows.ids
        assert [r[1] for r in got] == [None if v < 0 else int(v) for v in rows.versions]
        assert [r[2] for r in got] == rows.aliases
        assert [r[3] for r in got] == rows.labels
        assert [r[4] for r in got] == rows.categories["k"]
        assert [r[5] for r in got] == pytest.approx(rows.outputs[:, 1].tolist())
        assert [r[6] for r in got] == rows.ts_ms.tolist()
        assert [r[7] for r in got] == [
            None if np.isnan(v) else pytest.approx(float(v)) for v in rows.latency_ms
        ]


def test_glue_table_follows_the_schema() -> None:
    table = captures.glue_table_input("s3://bucket/captures/")
    columns = {c["Name"]: c["Type"] for c in table["StorageDescriptor"]["Columns"]}
    assert columns == {
        "id": "string",
        "ts": "timestamp",
        "version": "bigint",
        "alias": "string",
        "latency_ms": "float",
        "inputs": "array<float>",
        "outputs": "array<float>",
        "label": "string",
        "categories": "map<string,string>",
    }  # every file column but model, which Athena takes from the partition
    assert [k["Name"] for k in table["PartitionKeys"]] == ["model", "dt"]
    params = table["Parameters"]
    assert params["storage.location.template"] == "s3://bucket/captures/${model}/dt=${dt}/"
    assert params["projection.model.type"] == "injected"
    ddl = captures.athena_ddl("s3://bucket/captures/", "captures", "treeserve")
    assert ddl.startswith("CREATE EXTERNAL TABLE IF NOT EXISTS `treeserve`.`captures`")
    for name, kind in columns.items():
        assert f"`{name}` {kind}" in ddl
    assert "PARTITIONED BY (`model` string, `dt` string)" in ddl
