"""Request body parsing: every accepted shape, and every bad one with its status."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from treeserve.errors import (
    InputMismatch,
    InvalidInput,
    MalformedBody,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from treeserve.serving.inputs import FeatureSchema, media_type, parse_body

pytestmark = pytest.mark.unit

SCHEMA = FeatureSchema(["a", "b", "c"])


def parse(body: bytes | str, content_type: str | None = "application/json", **kw: int):  # type: ignore[no-untyped-def]
    raw = body.encode() if isinstance(body, str) else body
    return parse_body(
        raw,
        content_type,
        SCHEMA,
        max_rows=kw.get("max_rows", 100),
        max_bytes=kw.get("max_bytes", 1 << 20),
        id_prefix="req",
    )


def test_json_rows_in_feature_order_with_null_missing() -> None:
    parsed = parse('{"instances": [[1, 2.5, null], [-1e3, 0, 7]]}')
    assert parsed.X.dtype == np.float32
    np.testing.assert_array_equal(parsed.X, [[1, 2.5, np.nan], [-1000, 0, 7]])
    assert parsed.ids == ["req-0", "req-1"]
    assert parsed.ids_generated


def test_json_records_by_name_any_order_absent_is_missing() -> None:
    parsed = parse(
        '{"instances": [{"c": 3, "a": 1, "b": 2}, {"b": 5}, {"a": null, "b": 1, "c": 2}]}'
    )
    np.testing.assert_array_equal(parsed.X, [[1, 2, 3], [np.nan, 5, np.nan], [np.nan, 1, 2]])


def test_given_ids_are_kept() -> None:
    parsed = parse('{"instances": [[1, 2, 3], [4, 5, 6]], "ids": ["x:1", 7]}')
    assert parsed.ids == ["x:1", 7]
    assert not parsed.ids_generated


def test_generated_ids_are_unique_without_prefix() -> None:
    a = parse_body(b'{"instances": [[1,2,3]]}', None, SCHEMA, max_rows=9, max_bytes=999)
    b = parse_body(b'{"instances": [[1,2,3]]}', None, SCHEMA, max_rows=9, max_bytes=999)
    assert a.ids != b.ids


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON;charset=UTF-8",
        "application/vnd.api+json",
        "text/json",
    ],
)
def test_json_content_types(content_type: str | None) -> None:
    assert parse('{"instances": [[1, 2, 3]]}', content_type).X.shape == (1, 3)


def test_csv_without_header() -> None:
    parsed = parse("1,2,3\n4,,6\n\n", "text/csv")
    np.testing.assert_array_equal(parsed.X, [[1, 2, 3], [4, np.nan, 6]])


def test_csv_with_header_reordered_subset_and_id_column() -> None:
    parsed = parse('id,c,"a"\nr1,3,1\nr2, 6 ,\r\n', "text/csv; charset=utf-8")
    np.testing.assert_array_equal(parsed.X, [[1, np.nan, 3], [np.nan, np.nan, 6]])
    assert parsed.ids == ["r1", "r2"]


def test_media_type_mapping() -> None:
    assert media_type("text/csv") == "csv"
    assert media_type(None) == "json"


def test_large_json_matrix_is_exact() -> None:
    schema = FeatureSchema([f"f{i}" for i in range(30)])
    X = np.random.default_rng(1).normal(size=(1000, 30)).astype(np.float32)
    body = orjson.dumps({"instances": X.tolist()})
    parsed = parse_body(body, None, schema, max_rows=1000, max_bytes=1 << 24)
    np.testing.assert_array_equal(parsed.X, X)


BAD = [
    # (body, content type, error class, message fragment)
    ("", None, MalformedBody, "empty"),
    ("{", None, MalformedBody, "JSON"),
    (b'{"instances": [[1, 2, "\xff"]]}', None, MalformedBody, "JSON"),
    ('{"instances": [[1, 2, NaN]]}', None, MalformedBody, "JSON"),
    ('{"instances": [[1, 2, Infinity]]}', None, MalformedBody, "JSON"),
    ('{"instances": [[1, 2, 1e400]]}', None, MalformedBody, "JSON"),
    ('{"instances": [[1, 2, 1%s]]}' % ("0" * 40), None, InputMismatch, "range"),
    ('{"instances": [[1, 2, 1%s]]}' % ("0" * 400), None, MalformedBody, "JSON"),
    ("[" * 5000 + "]" * 5000, None, MalformedBody, "JSON"),
    ("[[1, 2, 3]]", None, MalformedBody, "object"),
    ('{"instance": [[1, 2, 3]]}', None, MalformedBody, "unknown key"),
    ('{"instances": {"a": 1}}', None, MalformedBody, "list"),
    ('{"instances": []}', None, MalformedBody, "empty"),
    ('{"instances": [[1, 2, 3]], "instances": [[1, 2, 3]]}', None, MalformedBody, "duplicate"),
    ('{"instances": [{"a": 1, "a": 2, "b": 3}]}', None, MalformedBody, "duplicate"),
    ('{"instances": [{"\\u0061": 1, "a": 2}]}', None, MalformedBody, "duplicate"),
    ('{"instances": [[1, 2, 3]], "ids": [1, 2]}', None, MalformedBody, "ids"),
    ('{"instances": [[1, 2, 3]], "ids": [true]}', None, MalformedBody, "ids"),
    ('{"instances": [[1, 2, 3]], "ids": [[1]]}', None, MalformedBody, "ids"),
    ('{"instances": [[1, 2]]}', None, InputMismatch, "2 values"),
    ('{"instances": [[1, 2, 3, 4]]}', None, InputMismatch, "4 values"),
    ('{"instances": [[1, 2, "3"]]}', None, InputMismatch, "string"),
    ('{"instances": [[1, 2, true]]}', None, InputMismatch, "boolean"),
    ('{"instances": [[1, 2, [3]]]}', None, InputMismatch, "nested"),
    ('{"instances": [[1, 2, {"x": 3}]]}', None, InputMismatch, "nested"),
    ('{"instances": [[1, 2, 1e39]]}', None, InputMismatch, "range"),
    ('{"instances": [1, 2, 3]}', None, InputMismatch, "instance"),
    ('{"instances": [[1, 2, 3], {"a": 1}]}', None, InputMismatch, "mix"),
    ('{"instances": [{"a": 1, "zzz": 2}]}', None, InputMismatch, "unknown feature"),
    ('{"instances": [{"a": "x"}]}', None, InputMismatch, "string"),
    ("1,2\n", "text/csv", InputMismatch, "2 fields"),
    ("1,2,x\n", "text/csv", MalformedBody, "header"),
    ("1,2,3\n4,5,x\n", "text/csv", InputMismatch, "not a number"),
    ("a,b,zzz\n1,2,3\n", "text/csv", InputMismatch, "unknown"),
    ("a,b,c\n", "text/csv", MalformedBody, "no rows"),
    ("a,b,c\n1,2,abc\n", "text/csv", InputMismatch, "not a number"),
    ("a,b,c\n1,2,inf\n", "text/csv", InputMismatch, "range"),
    ("a,a,c\n1,2,3\n", "text/csv", InputMismatch, "repeats"),
    (b"a,b,c\n1,2,\xff\n", "text/csv", MalformedBody, "UTF-8"),
    (
        '{"instances": [[1, 2, 3]]}',
        "application/x-www-form-urlencoded",
        UnsupportedMediaType,
        "Content-Type",
    ),
    ('{"instances": [[1, 2, 3]]}', "text/plain", UnsupportedMediaType, "Content-Type"),
    (
        '{"instances": [[1, 2, 3]]}',
        "application/json; charset=latin-1",
        UnsupportedMediaType,
        "charset",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "error", "fragment"), BAD)
def test_bad_input(
    body: str | bytes, content_type: str | None, error: type[InvalidInput], fragment: str
) -> None:
    with pytest.raises(error, match=fragment) as info:
        parse(body, content_type)
    assert 400 <= info.value.status < 500


def test_status_codes() -> None:
    assert MalformedBody("x").status == 400
    assert PayloadTooLarge("x").status == 413
    assert UnsupportedMediaType("x").status == 415
    assert InputMismatch("x").status == 422


def test_too_many_rows_and_bytes() -> None:
    body = orjson.dumps({"instances": [[1, 2, 3]] * 11})
    with pytest.raises(PayloadTooLarge, match="rows"):
        parse(body, max_rows=10)
    assert parse(body, max_rows=11).X.shape == (11, 3)
    with pytest.raises(PayloadTooLarge, match="bytes"):
        parse(body, max_bytes=len(body) - 1)
    with pytest.raises(PayloadTooLarge, match="rows"):
        parse("1,2,3\n" * 11, "text/csv", max_rows=10)


def test_colon_inside_strings_is_not_a_duplicate() -> None:
    parsed = parse('{"ids": ["a:b", "::"], "instances": [[1, 2, 3], [4, 5, 6]]}')
    assert parsed.ids == ["a:b", "::"]


def test_null_everywhere_is_all_missing() -> None:
    parsed = parse('{"instances": [[null, null, null]]}')
    assert all(math.isnan(v) for v in parsed.X[0])


@pytest.mark.parametrize(
    ("body", "fast"),
    [
        ('{"instances": [[1, 2.5, null], [3, 4, 5e-3]]}', True),
        ('{"ids": ["t:f", "x"], "instances": [[1, 2, 3], [4, 5, 6]]}', True),
        ('{"instances": [[1, 2, true]]}', False),
        ('{"instances": [[1, 2, false]]}', False),
        ('{"instances": [[1, 2, "3"]]}', False),
        ('{"instances": [[1, 2, [3]]]}', False),
        ('{"instances": [[1, 2, {"a": 3}]]}', False),
        ('{"instances": [[1, 2, 3]], "instances": [[1, 2, 3]]}', False),
        ('{"ids": ["a\\"b"], "instances": [[1, 2, 3]]}', False),
    ],
)
def test_fast_row_path_only_for_plain_numbers(body: str, fast: bool) -> None:
    from treeserve.serving.inputs import _fast_rows

    raw = body.encode()
    document = orjson.loads(raw)
    got = _fast_rows(raw, document, document["instances"], document.get("ids"), SCHEMA)
    assert (got is not None) == fast


def test_regressions_found_by_the_fuzzers() -> None:
    with pytest.raises(InputMismatch):
        parse('{"instances": [[1, 2, 3], null]}')
    with pytest.raises(MalformedBody):
        parse('{"ids": ["\\u0061"], "instances": ' + "[" * 1000 + "]" * 1000 + "}")
    parsed = parse("1,2,3\n,,\n4,5,6\n", "text/csv")
    assert parsed.X.shape == (3, 3)
    assert np.isnan(parsed.X[1]).all()


def test_unquoted_csv_reads_as_csv_reader_reads_it() -> None:
    """Bodies without quotes or carriage returns take the one-pass reader (np.fromstring); the
    same rows with CRLF line ends take csv.reader: values, ids and errors must be the same."""
    import random

    from treeserve.errors import InvalidInput
    from treeserve.serving.inputs import FeatureSchema, parse_body

    tokens = [
        "",
        " ",
        "\t",
        "nan",
        "-inf",
        "1e5",
        "1.e5",
        "1_0",
        "0x1",
        "abc",
        " 2",
        "+3",
        ".5",
        "5.",
        "1e",
        "1 2",
        "--1",
        "1e400",
        "1e-400",
        "nan(1)",
        "١٢",
        "-0",
        "1e 5",
    ]
    schema = FeatureSchema(["a", "b", "c"])
    rng = random.Random(3)

    def parsed(body: bytes) -> tuple[Any, ...]:
        try:
            r = parse_body(body, "text/csv", schema, max_rows=100, max_bytes=1 << 20, id_prefix="p")
        except InvalidInput as exc:
            return ("error", type(exc).__name__, str(exc))
        return ("ok", r.X.tobytes(), r.ids)

    headers = [None, ["a", "b", "c"], ["id", "a", "b", "c"], ["c", "a"], ["a", "id", "b"]]
    for _ in range(3000):
        header = rng.choice(headers)
        width = len(header) if header else 3
        rows = [
            [
                rng.choice(tokens) if rng.random() < 0.4 else f"{rng.gauss(0, 1):.4g}"
                for _ in range(width + (rng.random() < 0.05))
            ]
            for _ in range(rng.randint(1, 4))
        ]
        lines = ([",".join(header)] if header else []) + [",".join(r) for r in rows]
        fast = parsed(("\n".join(lines) + "\n").encode())
        assert fast == parsed(("\r\n".join(lines) + "\r\n").encode()), lines


def test_unquoted_csv_letters_of_nan_and_inf_read_as_csv_reader_reads_them() -> None:
    """The one-pass reader takes fields with the letters of nan/inf: every field of up to three
    such characters (and the usual spellings) gives the same bits, ids and errors as csv.reader's
    path, "-nan" (whose sign np.fromstring drops) included."""
    import itertools

    from treeserve.errors import InvalidInput
    from treeserve.serving.inputs import FeatureSchema, parse_body

    schema = FeatureSchema(["a", "b"])

    def parsed(body: bytes) -> tuple[Any, ...]:
        try:
            r = parse_body(body, "text/csv", schema, max_rows=100, max_bytes=1 << 20, id_prefix="p")
        except InvalidInput as exc:
            return ("error", type(exc).__name__, str(exc))
        return ("ok", r.X.tobytes(), r.ids)

    fields = ["".join(t) for n in (1, 2, 3) for t in itertools.product("1.-enaif ", repeat=n)]
    fields += ["nan", "inf", "-inf", "+inf", "-nan", "+nan", "NaN", "infinity", "1e5nan", "nan1"]
    taken = 0
    for field in fields:
        lines = ["a,b", f"{field},1", f"2,{field}", "nan,-0"]
        fast = parsed(("\n".join(lines) + "\n").encode())
        assert fast == parsed(("\r\n".join(lines) + "\r\n").encode()), field
        taken += fast[0] == "ok"
    assert taken > 10  # some fields are numbers: the comparison is not only of errors


def test_unquoted_csv_longer_than_one_fromstring_call_reads_as_csv_reader_reads_it() -> None:
    """The one-pass reader parses 1,024 lines per np.fromstring call: bodies across several
    calls (empty fields at the lines' ends, a bad field or a short line in a later call) give
    the same values, ids and errors as csv.reader's path."""
    import random

    from treeserve.errors import InvalidInput
    from treeserve.serving.inputs import _FAST_LINES, FeatureSchema, parse_body

    schema = FeatureSchema(["a", "b", "c"])
    rng = random.Random(11)

    def parsed(body: bytes) -> tuple[Any, ...]:
        try:
            r = parse_body(body, "text/csv", schema, max_rows=10_000, max_bytes=1 << 24)
        except InvalidInput as exc:
            return ("error", type(exc).__name__, str(exc))
        return ("ok", r.X.tobytes(), r.ids)

    results = set()
    for spoil in (None, "x", "short"):
        n = 3 * _FAST_LINES + 5
        rows = [
            [rng.choice(["", "nan", f"{rng.gauss(0, 1):.5g}"]) for _ in range(3)] for _ in range(n)
        ]
        if spoil == "x":
            rows[2 * _FAST_LINES + 1][1] = "x"
        if spoil == "short":
            rows[_FAST_LINES + 3] = ["1", "2"]
        lines = ["id,a,b,c", *(f"r{i}," + ",".join(row) for i, row in enumerate(rows))]
        fast = parsed(("\n".join(lines) + "\n").encode())
        assert fast == parsed(("\r\n".join(lines) + "\r\n").encode()), spoil
        results.add(fast[0])
    assert results == {"ok", "error"}
