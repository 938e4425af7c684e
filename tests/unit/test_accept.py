"""Accept negotiation: one function decides JSON or CSV for every path (RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest

from treeserve.serving.endpoints import _wants_csv

CSV = [
    "text/csv",
    "TEXT/CSV",
    "text/csv; charset=utf-8",
    "text/*",
    "text/csv, application/json",  # equal q, equally specific: the first listed
    "text/csv, */*",  # equal q: the more specific range
    "application/json;q=0.5, text/csv",
    "application/json; q=0.1, text/csv; q=0.2",
    "text/csv;q=1, application/json;q=0.999",
    "*/*;q=0.1, text/csv",
    "application/*;q=0.5, text/*;q=0.6",
    "text/csv ;  q=0.9 , application/json;q=0.8",
    "application/json;q=0, text/csv;q=0.01",
    "text/csv;q=0.5, application/json;q=nope",  # an invalid q: that range is skipped
]
JSON = [
    None,
    "",
    "*/*",
    "application/json",
    "text/csv;q=0, application/json",  # issue 13 row 14
    "text/csv;q=0",
    "text/csv;q=0.5, application/json",
    "application/json, text/csv",
    "application/*, text/csv;q=0.9",
    "*/*, text/csv;q=0",
    "text/*;q=0.2, */*;q=0.2, application/json",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser
    "image/png",  # neither acceptable: the default, not a 406
    "text/csv;q=0, application/json;q=0",
    "text/csv;q=2",  # out of range: skipped
    "text/csv;q=-1",
    "text/csv;q=nan",
    "text/plain",
    "application/csv",
    "*/csv",
    ",,,",
    "text/csv;q=0.3, text/*;q=0.9, */*;q=1",  # the most specific range decides CSV's q
]


@pytest.mark.parametrize("accept", CSV)
def test_csv_when_preferred(accept: str) -> None:
    assert _wants_csv(accept.encode()) is True


@pytest.mark.parametrize("accept", JSON)
def test_json_otherwise(accept: str | None) -> None:
    assert _wants_csv(None if accept is None else accept.encode()) is False


def test_long_headers_are_parsed_without_the_cache() -> None:
    padding = ", ".join(f"x-{i}/y" for i in range(100))
    assert _wants_csv(f"{padding}, text/csv".encode()) is True
    assert _wants_csv(f"{padding}, text/csv;q=0, application/json".encode()) is False
