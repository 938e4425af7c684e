"""Reliability figures: tests hand their counts to ``reliability_report``; pytest prints them
in the terminal summary (the figures docs/reliability.md quotes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_REPORT: list[tuple[str, list[str]]] = []


@pytest.fixture
def reliability_report() -> Callable[[str, list[str]], None]:
    def add(title: str, lines: list[str]) -> None:
        _REPORT.append((title, list(lines)))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _REPORT:
        return
    terminalreporter.section("reliability figures")
    for title, lines in _REPORT:
        terminalreporter.write_line(title)
        for line in lines:
            terminalreporter.write_line(f"  {line}")
