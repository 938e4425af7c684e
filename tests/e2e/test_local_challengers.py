"""End to end: challengers on live traffic on `treeserve local`, as README's walkthrough runs it.

README's "Challengers on the local stack" blocks, run as written (from the project folder, with
the banner's environment; only the port, the /tmp paths and the venv differ, and its `sleep`s
become waits on the test stack's shorter intervals): two weaker candidates registered,
aliased, routed (canary 30%, shadow 0.5), the bundled dataset sent one request per row, the
labels uploaded, and `treeserve monitor --html` run. The test then checks what each step left:
every answer is its version's own prediction, about 30% came from the canary, and the printed
summary, the HTML and the JSON report compare both challengers on the rows that were sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.e2e.test_local_stack import (
    BIN,
    Stack,
    captured,
    running_stack,
    served_booster,
)
from treeserve.monitoring.challenger import shadow_sampled
from treeserve_cli import demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REFRESH_SECONDS = 1
CAPTURE_AGE_SECONDS = 1
VERDICTS = ("better", "not worse", "worse", "not enough evidence")
HEADING = "### Challengers on the local stack"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(
        tmp_path_factory,
        "--monitor-every",
        "0",  # monitoring only when the walkthrough runs it
        "--env",
        f"MODEL_REFRESH_SECONDS={REFRESH_SECONDS}",
        "--env",
        f"CAPTURE_MAX_AGE_SECONDS={CAPTURE_AGE_SECONDS}",
    )


def walkthrough_blocks() -> list[str]:
    """The ```sh blocks of README's challenger walkthrough, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def as_run_here(block: str, stack: Stack, tmp: Path) -> str:
    """A README block for this stack: its port, test paths, this venv; sleeps dropped."""
    lines = [line for line in block.splitlines() if not line.startswith("sleep ")]
    script = "\n".join(lines)
    return (
        script.replace("http://127.0.0.1:3000", stack.api)
        .replace("/tmp/treeserve-", f"{tmp}/treeserve-")
        .replace(".venv/bin/", f"{BIN}/")
    )


def run(script: str, stack: Stack) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=ROOT,
        env=stack.cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def routing(stack: Stack) -> dict[str, Any]:
    raw = stack.s3().get_object(Bucket=stack.bucket, Key="registry/default/routing.json")
    return dict(json.loads(raw["Body"].read()))


def test_the_readme_challenger_walkthrough_on_the_local_stack(stack: Stack, tmp_path: Path) -> None:
    setup, traffic, report = walkthrough_blocks()

    # 1. two weaker candidates, held by the gate; aliases; canary 30% and shadow 0.5
    done = run(as_run_here(setup, stack, tmp_path), stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "version 2" in done.stdout, done.stdout
    assert "version 3" in done.stdout, done.stdout
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["current"]["version"] == 1, status  # the champion still serves
    assert "canary: challenger -> version 2, 30% of unpinned requests" in done.stdout, done.stdout
    assert "shadow: staging -> version 3, scores 0.5 of the champion's" in done.stdout
    route = routing(stack)
    assert route["canary"] == {"alias": "challenger", "percent": 30.0}, route
    assert route["shadow"] == {"alias": "staging", "sample": 0.5}, route
    time.sleep(REFRESH_SECONDS + 1)  # README: sleep 5 (MODEL_REFRESH_SECONDS there)

    # 2. the dataset, one request per row with its id; the labels kept
    done = run(as_run_here(traffic, stack, tmp_path), stack)
    assert done.returncode == 0, done.stdout + done.stderr
    data = demo.load_dataset()
    n = len(data.y)
    answers = [
        json.loads(line)
        for line in (tmp_path / "treeserve-answers.jsonl").read_text().splitlines()
        if line
    ]
    assert len(answers) == n
    ids = [f"row-{i + 1}" for i in range(n)]
    assert [a["ids"] for a in answers] == [[i] for i in ids]
    boosters = {v: served_booster(stack, v) for v in (1, 2)}
    by_alias: dict[str, list[int]] = {"champion": [], "challenger": []}
    for i, a in enumerate(answers):
        model = a["model"]
        assert (model["alias"], model["version"]) in {("champion", 1), ("challenger", 2)}, model
        by_alias[model["alias"]].append(i)
    for alias, version in (("champion", 1), ("challenger", 2)):
        rows = by_alias[alias]
        expected = boosters[version].inplace_predict(data.X[rows])
        got = [answers[i]["predictions"][0] for i in rows]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    canary_share = len(by_alias["challenger"]) / n
    assert 0.22 < canary_share < 0.38, canary_share  # 30% of 569 ids: sd about 2%
    labels = (tmp_path / "treeserve-labels.csv").read_text().splitlines()
    assert labels[0] == "id,label"
    assert len(labels) == n + 1
    deadline = time.monotonic() + CAPTURE_AGE_SECONDS + 15  # README: sleep 7
    while not set(ids) <= set(captured(stack)):
        assert time.monotonic() < deadline, "the walkthrough's rows were never all captured"
        time.sleep(0.25)

    # 3. labels uploaded; monitoring with the HTML report (routing kept for the header check)
    upload, monitor, off = (as_run_here(line, stack, tmp_path) for line in report.splitlines())
    done = run(upload, stack)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(monitor, stack)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout

    canary_ids = [ids[i] for i in by_alias["challenger"]]
    champion_ids = [ids[i] for i in by_alias["champion"]]
    shadow_ids = [
        i for i, s in zip(champion_ids, shadow_sampled(champion_ids, 0.5), strict=True) if s
    ]
    assert 0.35 < len(shadow_ids) / len(champion_ids) < 0.65
    key = re.search(r"^report: s3://[^/]+/(\S+)$", summary, re.MULTILINE)
    assert key, summary
    obj = stack.s3().get_object(Bucket=stack.bucket, Key=key.group(1))
    section = json.loads(obj["Body"].read())["challenger"]
    assert section["champion"] == {"version": 1}
    assert section["min_labeled_rows"] == 100  # LIVE_MIN_LABELED_ROWS=100, as README sets it
    entries = {e["alias"]: e for e in section["challengers"]}
    assert set(entries) == {"challenger", "staging"}, entries
    expected_rows = {
        "challenger": (2, "canary", len(canary_ids), 0),
        "staging": (3, "shadow", 0, len(shadow_ids)),
    }
    html = (tmp_path / "treeserve-challengers.html").read_text()
    assert "Challengers on live traffic" in html
    for alias, (version, route_kind, canary_rows, shadow_rows) in expected_rows.items():
        e = entries[alias]
        compared = canary_rows + shadow_rows
        assert e["version"] == version
        assert e["routes"] == [route_kind]
        assert e["rows"]["canary"] == canary_rows
        assert e["rows"]["shadow"] == shadow_rows
        assert e["rows"]["compared"] == compared
        assert e["rows"]["labeled"] == e["quality"]["labeled_rows"] == compared  # all labeled
        assert e["quality"]["metric"] == "auc"
        assert e["verdict"] in VERDICTS
        # the agreement is the two versions' own decisions on the compared rows
        rows = [
            int(i.removeprefix("row-")) - 1 for i in (canary_ids if canary_rows else shadow_ids)
        ]
        champion = boosters[1].inplace_predict(data.X[rows]) >= 0.5
        other = served_booster(stack, version).inplace_predict(data.X[rows]) >= 0.5
        assert e["agreement"]["agreement"] == pytest.approx(float(np.mean(champion == other)))
        line = next(x for x in summary.splitlines() if x.startswith(f"challenger {alias} "))
        assert f"(v{version}, {route_kind}):" in line, line
        assert (
            f"{compared:,} rows compared ({canary_rows:,} canary, {shadow_rows:,} shadow)" in line
        )
        assert f"on {compared:,} labeled rows" in line, line
        assert f"verdict: {e['verdict']}" in line, line
        assert f"{alias} (v{version}, {route_kind})" in html
        assert (
            f"{compared:,} ({canary_rows:,} canary, {shadow_rows:,} shadow; {compared:,} labeled)"
            in html
        )
        assert f">{e['verdict']}</span>" in html

    # every answer names who answered, in the body and the header alike
    seen = set()
    for i in range(40):
        answer = httpx.post(
            f"{stack.api}/predict",
            json={"ids": [f"late-{i}"], "instances": [data.X[i].tolist()]},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        alias = answer.json()["model"]["alias"]
        assert answer.headers["x-model-alias"] == alias
        seen.add(alias)
    assert seen == {"champion", "challenger"}

    done = run(off, stack)  # the walkthrough's last command
    assert done.returncode == 0, done.stdout + done.stderr
    cleared = routing(stack)
    assert cleared.get("canary") is None, cleared
    assert cleared.get("shadow") is None, cleared
