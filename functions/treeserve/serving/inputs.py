"""Request bodies -> a float matrix in the model's feature order, plus one id per row.

Accepted (see DESIGN.md "HTTP API"):

* JSON (``application/json``, ``*+json``, or no Content-Type): ``{"instances": [[...], ...]}``
  rows in feature order, or ``{"instances": [{"feature": value, ...}, ...]}`` records by name;
  ``null`` or an absent feature is missing (NaN); optional ``"ids": [...]`` (strings or integers).
* CSV (``text/csv``): rows, with an optional header of feature names (any order, a subset is
  fine: absent columns are missing; a column ``id`` gives the row ids when no feature has that
  name); an empty field is missing.

Everything a client can send wrong raises an :class:`~treeserve.errors.InvalidInput` subclass
(400 malformed, 413 too large, 415 media type, 422 does not fit the model). The JSON path is
tuned for the common case (rows of numbers): orjson, one C-level type scan, ``np.fromiter``.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import operator
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from treeserve.errors import InputMismatch, MalformedBody, PayloadTooLarge, UnsupportedMediaType
from treeserve.model.manifest import category_codes

JSON_TYPES = frozenset({"application/json", "text/json"})
CSV_TYPES = frozenset({"text/csv", "application/csv"})
CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
MAX_ID_LENGTH = 256
ID_COLUMN = "id"

_NUMBER_TYPES = frozenset({float, int, type(None)})
_TOP_LEVEL_KEYS = frozenset({"instances", "ids"})
_chain = itertools.chain.from_iterable


@dataclass(frozen=True, slots=True)
class ParsedInput:
    """A checked request: ``X`` is float32 (n, d) with NaN for missing; ``ids`` has n entries."""

    X: np.ndarray
    ids: list[Any]
    ids_generated: bool


class FeatureSchema:
    """The model's features, prepared once per model version for fast parsing."""

    def __init__(
        self, feature_names: Sequence[str], categories: dict[str, list[Any]] | None = None
    ) -> None:
        self.names = list(feature_names)
        cats = categories or {}
        # Per feature: category text -> code (None for numeric features), as XGBoost re-codes a
        # DataFrame's values against the training categories.
        self.codes = [category_codes(cats[n]) if cats.get(n) else None for n in self.names]
        self.categories = [cats.get(n) for n in self.names]
        self.categorical = any(c is not None for c in self.codes)
        self.width = len(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.name_set = frozenset(self.names)
        self._getter = itemgetter(*self.names) if self.names else None

    def describe(self) -> str:
        shown = ", ".join(self.names[:8]) + (", ..." if self.width > 8 else "")
        return f"{self.width} features ({shown})"

    def record_row(self, record: dict[str, Any]) -> Sequence[Any]:
        """Values of a record in feature order; absent features are None."""
        if len(record) == self.width and self._getter is not None:
            try:
                values = self._getter(record)
            except KeyError:
                pass
            else:
                return values if self.width > 1 else (values,)
        return [record.get(name) for name in self.names]


@functools.lru_cache(maxsize=64)
def media_type(content_type: str | None) -> str:
    """``"json"`` or ``"csv"`` for a Content-Type header; raises UnsupportedMediaType."""
    if not content_type or not content_type.strip():
        return "json"
    main, _, params = content_type.partition(";")
    kind = main.strip().lower()
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in CHARSETS:
                raise UnsupportedMediaType(
                    f"charset {charset[:40]!r} is not supported: send UTF-8 (charset=utf-8)"
                )
    if kind in JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json")):
        return "json"
    if kind in CSV_TYPES:
        return "csv"
    raise UnsupportedMediaType(
        f"Content-Type {kind[:80]!r} is not supported: send application/json "
        '({"instances": [...]}) or text/csv'
    )


def parse_body(
    body: bytes,
    content_type: str | None,
    schema: FeatureSchema,
    *,
    max_rows: int,
    max_bytes: int,
    id_prefix: str | None = None,
) -> ParsedInput:
    """Parse and check a request body; raises InvalidInput subclasses for bad input."""
    kind = media_type(content_type)
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body is {len(body)} bytes; the limit is {max_bytes} bytes")
    if not body.strip():
        raise MalformedBody('empty body: send {"instances": [[...], ...]} or CSV rows')
    if kind == "csv":
        X, ids = _parse_csv(body, schema, max_rows)
    else:
        X, ids = _parse_json(body, schema, max_rows)
    if ids is None:
        prefix = id_prefix or uuid.uuid4().hex
        return ParsedInput(X, [f"{prefix}-{i}" for i in range(X.shape[0])], True)
    return ParsedInput(X, ids, False)


# --- JSON ------------------------------------------------------------------------------------


def _parse_json(
    body: bytes, schema: FeatureSchema, max_rows: int
) -> tuple[np.ndarray, list[Any] | None]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson refuses invalid UTF-8, NaN/Infinity literals, numbers out of range and nesting
        # deeper than 1024: all malformed bodies.
        raise MalformedBody(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedBody('body must be a JSON object: {"instances": [[...], ...]}')
    extra = document.keys() - _TOP_LEVEL_KEYS
    if extra:
        shown = ", ".join(sorted(repr(k[:40]) for k in extra)[:5])
        raise MalformedBody(f'unknown key(s) {shown}: expected "instances" and optional "ids"')
    instances = document.get("instances")
    if not isinstance(instances, list):
        raise MalformedBody('"instances" must be a list of rows or records')
    n = len(instances)
    if n == 0:
        raise MalformedBody('"instances" is empty')
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows; the limit is {max_rows} rows per request")
    ids = _check_ids(document.get("ids"), n)

    first = type(instances[0])
    pairs = len(document)
    if first is list:
        fast = _fast_rows(body, document, instances, ids, schema)
        if fast is not None:
            return fast, ids
        if set(map(type, instances)) != {list}:
            raise InputMismatch("mix of rows and records: every instance must be a list")
        rows: Sequence[Sequence[Any]] = instances
    elif first is dict:
        if set(map(type, instances)) != {dict}:
            raise InputMismatch("mix of rows and records: every instance must be an object")
        rows = _records_to_rows(instances, schema)
        pairs += sum(map(len, instances))
    else:
        raise InputMismatch(
            "each instance must be a list of feature values or an object of feature: value, "
            f"got {_type_name(instances[0])} in instance 0"
        )
    _check_duplicate_keys(body, document, instances if first is dict else None, ids, pairs)
    return _rows_to_matrix(rows, schema), ids


# Bytes that can appear in a body of numeric rows outside strings: numbers, null, structure.
_ROW_BYTES = b"0123456789.-+eE,[]{} \t\r\nnul"


def _fast_rows(
    body: bytes,
    document: dict[str, Any],
    rows: list[Any],
    ids: list[Any] | None,
    schema: FeatureSchema,
) -> np.ndarray | None:
    """Rows of numbers/null without a per-value type scan, or None to take the exact path.

    orjson already proved the body is valid JSON, so outside strings it holds only numbers,
    ``null``, ``true``/``false`` and structure. Deleting the bytes numbers, null and structure
    use leaves the strings' bytes plus ``t``/``f``/``a``/``r``/``s`` of booleans, quotes and
    colons. Without backslashes (escapes), every string's raw bytes are its decoded text, so
    comparing what is left with the keys and ids we parsed proves, exactly, that the rows hold
    no strings or booleans and that no key was repeated (one colon per key). Lists or objects
    nested in a row make ``np.fromiter`` fail. Anything unusual returns None.
    """
    rest = body.translate(None, _ROW_BYTES)
    if b"\\" in rest:
        return None
    strings = [str(k) for k in document]
    if ids:
        strings.extend(v for v in ids if type(v) is str)
    text = "".join(strings)
    if (
        rest.count(b'"') != 2 * len(strings)
        or rest.count(b":") != len(document) + text.count(":")
        or rest.count(b"t") != text.count("t")
        or rest.count(b"f") != text.count("f")
    ):
        return None
    width = schema.width
    try:
        if set(map(len, rows)) != {width}:
            return None
    except TypeError:  # an instance that is not a list (null, a number): the exact path says so
        return None
    n = len(rows)
    try:
        values = np.fromiter(_chain(rows), dtype=np.float64, count=n * width)
    except (TypeError, ValueError):
        return None
    return as_float32(values.reshape(n, width), schema)


def parse_records(records: list[Any], schema: FeatureSchema) -> np.ndarray:
    """Records by feature name (already decoded JSON objects) -> the float32 matrix, with the
    checks and category coding of a JSON ``{"instances": [{...}, ...]}`` body (batch scoring's
    JSON Lines use it). Raises InvalidInput subclasses."""
    if not records:
        raise MalformedBody("no records")
    for i, record in enumerate(records):
        if type(record) is not dict:
            raise InputMismatch(
                f"instance {i} must be an object of feature: value, got {_type_name(record)}"
            )
    return _rows_to_matrix(_records_to_rows(records, schema), schema)


def _records_to_rows(records: list[dict[str, Any]], schema: FeatureSchema) -> list[Sequence[Any]]:
    name_set = schema.name_set
    for i, record in enumerate(records):
        if not record.keys() <= name_set:
            unknown = sorted(str(k)[:60] for k in record.keys() - name_set)
            raise InputMismatch(
                f"instance {i} has unknown feature(s) {', '.join(map(repr, unknown[:5]))}; "
                f"the model takes {schema.describe()}"
            )
    return [schema.record_row(record) for record in records]


def _rows_to_matrix(rows: Sequence[Sequence[Any]], schema: FeatureSchema) -> np.ndarray:
    width = schema.width
    if set(map(len, rows)) != {width}:
        for i, row in enumerate(rows):
            if len(row) != width:
                raise InputMismatch(
                    f"instance {i} has {len(row)} values; the model takes {schema.describe()}"
                )
    if not set(map(type, _chain(rows))) <= _NUMBER_TYPES:
        if not schema.categorical:
            _raise_first_bad_value(rows, schema)
        rows = _recode_rows(rows, schema)
    n = len(rows)
    values = np.fromiter(_chain(rows), dtype=np.float64, count=n * width)
    return as_float32(values.reshape(n, width), schema)


def _recode_rows(rows: Sequence[Sequence[Any]], schema: FeatureSchema) -> list[list[Any]]:
    """Category values (strings) -> the model's codes; numbers stay (they are codes already)."""
    out: list[list[Any]] = []
    for i, row in enumerate(rows):
        new = list(row)
        for j, value in enumerate(new):
            if type(value) is str and schema.codes[j] is not None:
                new[j] = _category_code(schema, i, j, value)
        out.append(new)
    if not set(map(type, _chain(out))) <= _NUMBER_TYPES:
        _raise_first_bad_value(out, schema)
    return out


def _category_code(
    schema: FeatureSchema, i: int, j: int, value: str, *, csv: bool = False
) -> float:
    codes = schema.codes[j]
    assert codes is not None  # noqa: S101 - only called for categorical features
    code = codes.get(value)
    if code is not None:
        return code
    cats = schema.categories[j] or []
    shown = ", ".join(map(repr, cats[:20])) + (", ..." if len(cats) > 20 else "")
    # XGBoost refuses a value it did not see in training ("Found a category not in the training
    # set"); 3.2 only notices it for values sorting after every training category, and silently
    # maps the others to the next category in sort order. We refuse them all.
    where = f"CSV row {i}" if csv else f"instance {i}"
    raise InputMismatch(
        f"{where}, feature {schema.names[j]!r}: {value[:40]!r} is not one of the model's "
        f"categories ({shown}); send one of them, or null for missing"
    )


def as_float32(X64: np.ndarray, schema: FeatureSchema) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        X = X64.astype(np.float32)
    if np.isinf(X).any():
        row, col = (int(v[0]) for v in np.nonzero(np.isinf(X)))
        raise InputMismatch(
            f"instance {row}, feature {schema.names[col]!r}: value out of range "
            "(finite numbers up to about 3.4e38 only)"
        )
    return X


def _raise_first_bad_value(rows: Sequence[Sequence[Any]], schema: FeatureSchema) -> None:
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if type(value) not in _NUMBER_TYPES:
                kind = _type_name(value)
                detail = (
                    "nested values are not features"
                    if isinstance(value, list | dict)
                    else "booleans are not numbers; send 0 or 1"
                    if isinstance(value, bool)
                    else "features must be numbers or null"
                )
                raise InputMismatch(
                    f"instance {i}, feature {schema.names[j]!r}: {kind} value ({detail})"
                )


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        str: "string",
        list: "list",
        dict: "object",
        float: "number",
        int: "number",
    }.get(type(value), type(value).__name__)


def _check_ids(ids: Any, n: int) -> list[Any] | None:
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise MalformedBody('"ids" must be a list with one id per instance')
    if len(ids) != n:
        raise MalformedBody(f'"ids" has {len(ids)} entries for {n} instances')
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise MalformedBody(f'"ids"[{i}] must be a string or an integer')
        if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
            raise MalformedBody(f'"ids"[{i}] is longer than {MAX_ID_LENGTH} characters')
    return ids


def _check_duplicate_keys(
    body: bytes,
    document: dict[str, Any],
    records: list[dict[str, Any]] | None,
    ids: list[Any] | None,
    pairs: int,
) -> None:
    """Refuse objects with a repeated key (orjson silently keeps the last one).

    Cheap and exact in the usual case: every key/value pair contributes one ``:`` outside
    strings, so the body's ``:`` count equals the parsed pairs plus the ``:`` inside strings
    unless some key was repeated. Bodies with ``\\u`` escapes (which can hide a ``:``) and any
    mismatch are re-checked precisely with the standard parser.
    """
    in_strings = sum(str(k).count(":") for k in document)
    if records is not None:
        in_strings += sum(str(k).count(":") for record in records for k in record)
    if ids:
        in_strings += sum(v.count(":") for v in ids if type(v) is str)
    if b"\\u" not in body and body.count(b":") == pairs + in_strings:
        return

    def no_duplicates(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(items)
        if len(result) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    raise MalformedBody(f"duplicate key {key[:60]!r} in a JSON object")
                seen.add(key)
        return result

    try:
        json.loads(body, object_pairs_hook=no_duplicates)
    except RecursionError:
        # orjson accepts nesting to 1024, deeper than the stdlib parser's recursion limit.
        raise MalformedBody("JSON nested too deeply") from None


# --- CSV -------------------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    if not text.strip():
        return True  # an empty field is a missing value
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_header(row: list[str], schema: FeatureSchema) -> bool:
    if schema.categorical:  # category values are not numbers either: a header names features
        return all(v.strip() in schema.index or v.strip() == ID_COLUMN for v in row)
    return not all(_is_number(v) for v in row)


def _parse_csv(
    body: bytes, schema: FeatureSchema, max_rows: int
) -> tuple[np.ndarray, list[Any] | None]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"CSV body is not valid UTF-8 (byte {exc.start})") from None
    if "\x00" in text:
        raise MalformedBody("CSV body contains NUL bytes")
    # Without quotes or carriage returns, csv.reader's rows are the lines split at commas: keep
    # the lines (split later, or never: _fast_block), which is several times faster.
    lines: list[str] | None = None
    records: list[list[str]] | None = None
    if '"' in text or "\r" in text:
        try:
            # Skip blank lines only: a row of empty fields (",,,") is a row of missing values.
            records = [
                row
                for row in csv.reader(io.StringIO(text))
                if len(row) > 1 or (row and row[0].strip())
            ]
        except csv.Error as exc:
            raise MalformedBody(f"CSV body cannot be read: {exc}") from None
        first = records[0] if records else None
    else:
        lines = [line for line in text.split("\n") if line.strip()]
        first = lines[0].split(",") if lines else None
    if first is None:
        raise MalformedBody("CSV body has no rows")
    header: list[str] | None = None
    if _is_header(first, schema):
        header = [v.strip() for v in first]
        if records is not None:
            records = records[1:]
        if lines is not None:
            lines = lines[1:]
        if not (records or lines):
            raise MalformedBody("CSV body has a header but no rows")
    n = len(records) if records is not None else len(lines or ())
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows; the limit is {max_rows} rows per request")
    width = len(header) if header is not None else schema.width

    id_col: int | None = None
    if header is None:
        columns = list(range(schema.width))
        targets = columns
    else:
        id_col = (
            header.index(ID_COLUMN)
            if ID_COLUMN in header and ID_COLUMN not in schema.index
            else None
        )
        if len(set(header)) != len(header):
            raise InputMismatch("CSV header repeats a column name")
        unknown = [h for k, h in enumerate(header) if k != id_col and h not in schema.index]
        if unknown:
            raise InputMismatch(
                f"CSV header has unknown feature(s) {', '.join(map(repr, unknown[:5]))}; "
                f"the model takes {schema.describe()}"
            )
        columns = [k for k in range(len(header)) if k != id_col]
        targets = [schema.index[header[k]] for k in columns]
    numeric = not (schema.categorical and any(schema.codes[t] is not None for t in targets))

    ids: list[Any] | None = None
    block: np.ndarray | None = None
    if lines is not None:
        if numeric and id_col in (None, 0):
            fast = _fast_block(lines, width, id_first=id_col == 0)
            if fast is not None:
                block, ids = fast
        if block is None:
            records = [line.split(",") for line in lines]
    if records is not None:
        for i, row in enumerate(records):
            if len(row) != width:
                expected = f"the header has {width} columns" if header else schema.describe()
                raise InputMismatch(f"CSV row {i} has {len(row)} fields; {expected}")
        if id_col is not None:
            ids = [row[id_col] for row in records]
        try:
            if not numeric:
                raise ValueError("category values are looked up field by field")
            block = np.array(
                [row[k] or "nan" for row in records for k in columns], dtype=np.float64
            )
        except ValueError:
            block = _csv_block_slow(records, columns, targets, header, schema)
    if ids is not None and any(len(v) > MAX_ID_LENGTH for v in ids):
        raise MalformedBody(f"an id is longer than {MAX_ID_LENGTH} characters")
    assert block is not None  # noqa: S101 - one of the paths above set it
    X64 = np.full((n, schema.width), np.nan, dtype=np.float64)
    X64[:, targets] = block.reshape(n, len(columns))
    return as_float32(X64, schema), ids


# A field of nothing or blanks (between commas, or a comma and the start or end): missing.
_EMPTY_FIELD = re.compile(r"(?<![^,])[ \t]*(?![^,])")
# With only these characters, np.fromstring reads a field exactly as float() does (the same
# bits) or refuses it (ValueError), except "-nan" (read without its sign bit: the caller looks
# for it) and an empty or blank field, which it would read as -1 (those become "nan" first).
# The letters let NaN and infinities ("nan", "inf", "-inf", as Python, numpy and printf write
# them) take this path; checked exhaustively over fields of up to 5 of these characters.
_NUMERIC_BYTES = b"0123456789.+-eEnaif \t,"
_count_commas = operator.methodcaller("count", ",")
_COMMA = ord(",")


def _missing_as_nan(joined: str, raw: bytes) -> str:
    """Empty and blank fields as ``nan`` (string replaces when no field has blanks); ``raw`` is
    ``joined`` in ASCII."""
    if " " in joined or "\t" in joined:
        return _EMPTY_FIELD.sub("nan", joined)
    commas = np.frombuffer(raw, dtype=np.uint8) == _COMMA  # ",," in joined, 15x faster
    if (commas[1:] & commas[:-1]).any():  # twice: ",,," holds two empty fields that overlap
        joined = joined.replace(",,", ",nan,").replace(",,", ",nan,")
    if joined.startswith(","):
        joined = "nan" + joined
    if joined.endswith(","):
        joined += "nan"
    return joined


def _fast_block(
    lines: list[str], width: int, *, id_first: bool
) -> tuple[np.ndarray, list[Any] | None] | None:
    """The numbers of unquoted CSV lines in C passes (``np.fromstring``), or None to take the
    field-by-field path, which gives the same values or names the problem: every line must have
    ``width`` fields and every field must read as float() reads it (an empty field is missing)."""
    if set(map(_count_commas, lines)) != {width - 1}:
        return None
    ids: list[Any] | None = None
    if id_first:
        parts = [line.partition(",") for line in lines]
        ids = [p[0] for p in parts]
        lines = [p[2] for p in parts]
        width -= 1
        if width == 0:
            return None
    arrays: list[np.ndarray] = []
    for start in range(0, len(lines), _FAST_LINES):
        group = lines[start : start + _FAST_LINES]
        values = _fast_values(",".join(group))
        if values is None or values.size != len(group) * width:
            return None
        arrays.append(values)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), ids


# Lines per np.fromstring call: it holds the GIL throughout, and the batch worker's predicting
# thread waits for it (a few ms at most, not the whole chunk's 20 ms).
_FAST_LINES = 1024


def _fast_values(joined: str) -> np.ndarray | None:
    try:
        raw = joined.encode("ascii")
    except UnicodeEncodeError:  # other scripts' digits: field by field
        return None
    if raw.translate(None, _NUMERIC_BYTES) or b"-nan" in raw:  # "NaN", "1_000", and "-nan"
        return None  # (numpy drops its sign): field by field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older numpy warns where numpy 2 raises
        try:
            return np.fromstring(_missing_as_nan(joined, raw), dtype=np.float64, sep=",")
        except (DeprecationWarning, ValueError):
            return None


def _csv_block_slow(
    records: list[list[str]],
    columns: list[int],
    targets: list[int],
    header: list[str] | None,
    schema: FeatureSchema,
) -> np.ndarray:
    """Field by field: category values looked up, and the first value that is not a number named.

    A field of a categorical feature is its category's value; a number that names no category is
    the model's code (as in a numpy array), except for integer categories, matched by value only.
    """
    out: list[float] = []
    for i, row in enumerate(records):
        for k, t in zip(columns, targets, strict=True):
            field = row[k].strip()
            codes = schema.codes[t]
            if codes is not None and field:
                code = codes.get(field)
                if code is None and (
                    isinstance((schema.categories[t] or [""])[0], int) or not _is_number(field)
                ):
                    code = _category_code(schema, i, t, field, csv=True)
                if code is not None:
                    out.append(code)
                    continue
            try:
                out.append(float(field) if field else math.nan)
            except ValueError:
                name = header[k] if header else schema.names[k]
                raise InputMismatch(
                    f"CSV row {i}, feature {name!r}: {field[:40]!r} is not a number"
                ) from None
    return np.array(out, dtype=np.float64)
