"""`treeserve monitor`: summary on stdout, report in S3, a self-contained HTML file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import BUCKET, train
from tests.integration.test_monitoring import register, traffic
from treeserve_cli.cli import main

pytestmark = pytest.mark.integration


class Collector(HTMLParser):
    """Collects start tags with their attributes and checks that containers are balanced."""

    VOID = {"meta", "br", "img", "line", "rect", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        while self.stack and self.stack[-1] in {"td", "th", "tr", "p"} and self.stack[-1] != tag:
            self.stack.pop()  # optional end tags
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            return
        self.stack.pop()


def test_monitor_html_report(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODEL_BUCKET", raising=False)
    model = train("binary:logistic", n=800)
    version = register(s3, model)
    X = np.random.default_rng(8).normal(size=(500, 6))
    X[:, 3] -= 1.2
    traffic(s3, model, version, X, ts=datetime.now(UTC) - timedelta(minutes=30))
    html_path = tmp_path / "report.html"
    code = main(
        ["monitor", "--bucket", BUCKET, "--name", "m", "--hours", "2", "--html", str(html_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "drifted features: f3" in out
    header = next(line for line in out.splitlines() if line.startswith("feature"))
    assert header.split() == [
        "feature", "kind", "rows", "missing", "PSI", "JS", "KS", "W/sd", "test", "p(BH)", "rule",
        "drift", "flags",
    ]  # fmt: skip
    f3 = next(line for line in out.splitlines() if line.startswith("f3 "))
    assert "PSI>=0.1" in f3  # the default rule, DRIFT_METHOD=psi
    assert "rows 500" in out
    key = next(line.split(f"s3://{BUCKET}/")[1] for line in out.splitlines() if "s3://" in line)
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0

    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = Collector()
    parser.feed(text)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    charts = [a for t, a in parser.tags if t == "svg" and a.get("class") == "chart feature"]
    assert len(charts) == 6  # one per feature
    labels = [
        a["aria-label"]
        for t, a in parser.tags
        if t == "svg" and "feature" in (a.get("class") or "")
    ]
    assert labels == [f"reference vs current: f{i}" for i in range(6)]
    drifted_cards = [a for t, a in parser.tags if t == "div" and a.get("class") == "card drift"]
    assert len(drifted_cards) == 1
    assert ">f3 <" in text.split('class="card drift"')[1][:40]
    # Self-contained: no external resource of any kind.
    assert "http://" not in text
    assert "https://" not in text
    assert not [a for t, a in parser.tags if "src" in a or t in {"link", "script"}]


def test_monitor_no_data_and_missing_bucket(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODEL_BUCKET", raising=False)
    register(s3, train("binary:logistic"))
    html_path = tmp_path / "empty.html"
    assert main(["monitor", "--bucket", BUCKET, "--name", "m", "--html", str(html_path)]) == 0
    assert "no data" in capsys.readouterr().out
    assert "no captured rows in the window" in html_path.read_text(encoding="utf-8")
    assert main(["monitor", "--name", "m"]) == 1
    assert "MODEL_BUCKET" in capsys.readouterr().err
