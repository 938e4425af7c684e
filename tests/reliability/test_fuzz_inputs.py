"""Property tests of the request parsers (``treeserve.serving.inputs``): any bytes, any content type.

The property: ``parse_body`` either returns a well-formed ``ParsedInput`` (float32 matrix of the
model's width, at most ``max_rows`` rows, one id per row, no infinities) or raises an
``InvalidInput`` subclass (which the API maps to a 4xx). Any other exception would be a 500.
Where the input is a valid request, the values must come through unchanged.
"""

from __future__ import annotations

import json
import math
import string
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treeserve.errors import InvalidInput
from treeserve.serving.inputs import FeatureSchema, ParsedInput, parse_body

pytestmark = [pytest.mark.reliability, pytest.mark.unit]

FEATURES = ["f0", "f1", "f2", "id_like", "x:y"]  # a name with a ':' exercises the key check
SCHEMA = FeatureSchema(FEATURES)
MAX_ROWS = 50
MAX_BYTES = 64 * 1024

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "",
            "application/json",
            "application/json; charset=utf-8",
            "application/JSON;charset=UTF-8",
            "application/vnd.api+json",
            "text/json",
            "text/csv",
            "text/csv; charset=us-ascii",
            "application/csv",
            "text/csv; charset=latin-1",
            "application/json; charset=utf-16",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            ";;;",
            "application/json; charset",
            'text/csv; charset="utf-8"',
        ]
    ),
    st.text(max_size=60),
)


def check(body: bytes, content_type: str | None) -> ParsedInput | None:
    """Run the parser and assert the property; returns the parsed input when accepted."""
    try:
        parsed = parse_body(body, content_type, SCHEMA, max_rows=MAX_ROWS, max_bytes=MAX_BYTES)
    except InvalidInput as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert 400 <= error.status < 500
        assert error.message
        return None
    assert isinstance(parsed, ParsedInput)
    assert parsed.X.dtype == np.float32
    assert parsed.X.ndim == 2
    assert parsed.X.shape[1] == len(FEATURES)
    assert 1 <= parsed.X.shape[0] <= MAX_ROWS
    assert len(parsed.ids) == parsed.X.shape[0]
    assert not np.isinf(parsed.X).any()
    return parsed


@FUZZ
@given(body=st.binary(max_size=2048), content_type=CONTENT_TYPES)
def test_any_bytes_any_content_type(body: bytes, content_type: str | None) -> None:
    check(body, content_type)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from([*FEATURES, "instances", "ids", "zz"]), children, max_size=6
        )
    ),
    max_leaves=40,
)


@FUZZ
@given(document=json_values, content_type=st.sampled_from([None, "application/json"]))
def test_any_json_document(document: Any, content_type: str | None) -> None:
    check(json.dumps(document).encode(), content_type)


@FUZZ
@given(
    instances=st.lists(
        st.one_of(
            st.lists(json_scalars, min_size=0, max_size=7),
            st.dictionaries(st.sampled_from([*FEATURES, "nope"]), json_scalars, max_size=6),
            json_scalars,
        ),
        max_size=8,
    ),
    ids=st.one_of(st.none(), st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=8)),
)
def test_any_instances(instances: list[Any], ids: list[Any] | None) -> None:
    document: dict[str, Any] = {"instances": instances}
    if ids is not None:
        document["ids"] = ids
    check(json.dumps(document).encode(), "application/json")


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
rows_strategy = st.lists(
    st.lists(st.one_of(st.none(), finite32, st.integers(-(2**31), 2**31)), min_size=5, max_size=5),
    min_size=1,
    max_size=MAX_ROWS,
)


@FUZZ
@given(rows=rows_strategy)
def test_valid_json_rows_come_through_unchanged(rows: list[list[Any]]) -> None:
    parsed = check(json.dumps({"instances": rows}).encode(), "application/json")
    assert parsed is not None, "a valid request was refused"
    expected = np.array(
        [[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64
    ).astype(np.float32)
    np.testing.assert_array_equal(parsed.X, expected)


@FUZZ
@given(rows=rows_strategy, header=st.booleans())
def test_valid_csv_rows_come_through_unchanged(rows: list[list[Any]], header: bool) -> None:
    lines = [",".join(FEATURES)] if header else []
    lines += [",".join("" if v is None else repr(v) for v in row) for row in rows]
    body = ("\r\n".join(lines) + "\r\n").encode()
    # A CSV field containing ':' needs quoting only with a header; "x:y" has no comma: fine.
    parsed = check(body, "text/csv")
    assert parsed is not None, "a valid CSV request was refused"
    expected = np.array(
        [[math.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64
    ).astype(np.float32)
    np.testing.assert_array_equal(parsed.X, expected)


csv_fields = st.one_of(
    st.text(alphabet=string.printable, max_size=8),
    st.sampled_from(["", "nan", "inf", "-inf", "1e400", "NaN", "id", "f0", "\ufeff", '"', "1,2"]),
    finite32.map(repr),
)


@FUZZ
@given(
    table=st.lists(st.lists(csv_fields, max_size=7), max_size=12),
    delimiter=st.sampled_from([",", ";", "\t"]),
    content_type=st.sampled_from(["text/csv", "application/csv", "text/csv; charset=utf-8"]),
)
def test_any_csv_table(table: list[list[str]], delimiter: str, content_type: str) -> None:
    body = "\n".join(delimiter.join(row) for row in table).encode()
    check(body, content_type)


# --- cases found by hand or by the properties above, kept as regressions ----------------------

HOSTILE_BODIES = [
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
    # orjson accepts nesting up to 1024; the duplicate-key re-check (triggered by a \u escape)
    # must not hit Python's recursion limit on the same body.
    (b'{"instances": [' + b"[" * 1000 + b'"\\u0041"' + b"]" * 1000 + b"]}", "application/json"),
    (b'{"instances": [[1, 2, 3, 4, 5]], "instances": [[1]]}', "application/json"),
    (b'{"instances": [[1, 2, 3, 4, 5], null]}', "application/json"),
    (b'{"instances": [[1, 2, 3, 4, 5], 7]}', "application/json"),
    (b'{"instances": [[1, 2, 3, 4, 5], "x"]}', "application/json"),
    (b'{"instances": [[1e39, 0, 0, 0, 0]]}', "application/json"),
    (b'{"instances": [[NaN, 0, 0, 0, 0]]}', "application/json"),
    (b'{"instances": [[18446744073709551616, 0, 0, 0, 0]]}', "application/json"),
    (b'{"instances": [[true, 0, 0, 0, 0]]}', "application/json"),
    (b'{"instances": [{"f0": 1, "f0": 2}]}', "application/json"),
    (b'{"instances": [[1,2,3,4,5]], "ids": [true]}', "application/json"),
    (b"\xff\xfe{\x00}\x00", "application/json"),
    ("f0,f1\n" * 3 + "1,2\n", "text/csv"),
    (b"f0,f0\n1,2\n", "text/csv"),
    (b"1,2,3,4,inf\n", "text/csv"),
    (b'"unterminated\n1,2,3,4,5\n', "text/csv"),
    (b"1,2,3,4,5\x00\n", "text/csv"),
    (b"\xef\xbb\xbf1,2,3,4,5\n", "text/csv"),
    (("a" * 300 + ",f0\n1,2\n").encode(), "text/csv"),
    (("id,f0\n" + "x" * 300 + ",2\n").encode(), "text/csv"),
    (b"1,2,3,4,5\n" * (MAX_ROWS + 1), "text/csv"),
    (b" " * 10, None),
    (b"{}", "application/json; charset=ebcdic"),
]


@pytest.mark.parametrize(("body", "content_type"), HOSTILE_BODIES)
def test_hostile_bodies(body: bytes | str, content_type: str | None) -> None:
    raw = body.encode() if isinstance(body, str) else body
    check(raw, content_type)


def test_csv_rows_of_empty_fields_are_missing_values_not_dropped() -> None:
    """One prediction per row: a row of empty fields is an all-missing row (ids stay aligned)."""
    parsed = check(b"1,2,3,4,5\n,,,,\n6,7,8,9,10\n", "text/csv")
    assert parsed is not None
    assert parsed.X.shape == (3, 5)
    assert np.isnan(parsed.X[1]).all()
    assert parsed.X[2, 0] == 6
