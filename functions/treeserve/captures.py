"""The capture format: written by the inference function, read by monitoring and by SQL.

A capture object is one Parquet file (:mod:`treeserve.parquet`: numpy alone writes and reads
it) at ``captures/<model>/dt=YYYY-MM-DD/<YYYYmmddTHHMMSSfffZ>-<random>.parquet``, one row per
captured prediction, with the columns of :data:`COLUMNS` (docs/ARCHITECTURE.md "Capture
format"). Athena (a Glue table with partition projection on ``model`` and ``dt``,
:func:`glue_table_input`) and DuckDB query the files where they lie; monitoring reads the
float32 columns back with ``np.frombuffer``.

:func:`encode_capture` is the one writer (the inference function's capture buffer, the tests
and the benchmarks use it), :func:`decode_capture` the one reader of every column, and
:func:`capture_split` what monitoring reads (the window's rows by version); :func:`object_key`
is the one key. Captures of the previous release (gzipped JSON Lines, ``.jsonl.gz``) stay
readable for one release: :func:`fast_split` and :func:`parse_lines` below.
This module imports no AWS code: the inference and monitoring artifacts both hold it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from treeserve import parquet
from treeserve.parquet import BYTE_ARRAY, FLOAT, INT64, Column

FORMAT = "treeserve.capture/1"
EXTENSION = ".parquet"

# The columns of a capture file, in file order. ``model`` is also the first partition key of
# the Glue table (Athena reads it from the path, the same value), so the table omits it.
COLUMNS: tuple[Column, ...] = (
    Column("id", BYTE_ARRAY, doc="the id of the row: as the request gave it, or generated (text)"),
    Column("ts", INT64, timestamp_ms=True, doc="when the row was answered (UTC, milliseconds)"),
    Column("model", BYTE_ARRAY, doc="the model's name"),
    Column("version", INT64, optional=True, doc="the registered version that answered"),
    Column(
        "alias",
        BYTE_ARRAY,
        optional=True,
        doc="the alias that answered: champion, the canary's alias, or the alias a request "
        "named (shadow scores are the monitoring function's); null: a pinned version",
    ),
    Column(
        "latency_ms",
        FLOAT,
        optional=True,
        doc="the request's latency in the function, from its start to its answer encoded "
        "(milliseconds, float32; every row of a request has its request's); null: not measured",
    ),
    Column(
        "inputs",
        FLOAT,
        kind="list",
        doc="the features in the model's order, as served (float32; NaN: missing; "
        "categorical features as their codes)",
    ),
    Column("outputs", FLOAT, kind="list", doc="every output: one value, or one per class"),
    Column("label", BYTE_ARRAY, optional=True, doc="the decided label (classification)"),
    Column(
        "categories",
        BYTE_ARRAY,
        kind="map",
        doc="each categorical feature's value, named by its code (null: missing or unseen)",
    ),
)
PARTITION_KEYS: tuple[tuple[str, str], ...] = (("model", "string"), ("dt", "string"))
_BY_NAME = {c.name: c for c in COLUMNS}


def iso_millis(ts: float) -> str:
    """A time as captures print it: UTC, milliseconds, ``Z`` (sorts as text in time order)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def object_key(model: str, ts: float) -> str:
    """The key of a capture object first written at ``ts`` (unique: a random suffix)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f"{moment.microsecond // 1000:03d}Z"
    return f"captures/{model}/dt={moment:%Y-%m-%d}/{stamp}-{uuid.uuid4().hex[:12]}{EXTENSION}"


@dataclass(slots=True)
class CaptureRows:
    """Captured rows as columns: what :func:`encode_capture` writes and
    :func:`decode_capture` gives back, value for value."""

    model: str
    ids: list[str]
    ts_ms: npt.NDArray[np.int64]
    versions: npt.NDArray[np.int64]  # -1: no registered version
    inputs: npt.NDArray[np.float32]
    outputs: npt.NDArray[np.float32]
    labels: list[str | None] | None = None
    aliases: list[str | None] | None = None
    latency_ms: npt.NDArray[np.float32] | None = None  # NaN: not measured
    # categorical feature -> its value per row (None: missing or a code outside the categories)
    categories: dict[str, list[str | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def category_values(codes: npt.NDArray[np.float32], categories: Sequence[Any]) -> list[str | None]:
    """The category value of each code (the position in ``categories``); None for NaN, a
    fraction or a code beyond the list (XGBoost's unseen category)."""
    names = np.asarray([str(c) for c in categories] + [None], dtype=object)
    valid = (
        np.isfinite(codes) & (codes >= 0) & (codes < len(categories)) & (codes == np.floor(codes))
    )
    index = np.where(valid, np.nan_to_num(codes, nan=0.0), len(categories)).astype(np.intp)
    values: list[str | None] = names[index].tolist()
    return values


def categories_of(
    inputs: npt.NDArray[np.float32],
    feature_names: Sequence[str],
    categories: Mapping[str, Sequence[Any]] | None,
) -> dict[str, list[str | None]]:
    """Each categorical feature's values, from the codes in its input column."""
    if not categories:
        return {}
    position = {name: j for j, name in enumerate(feature_names)}
    return {
        name: category_values(inputs[:, position[name]], values)
        for name, values in categories.items()
        if name in position and position[name] < inputs.shape[1]
    }


def utf8(values: Sequence[Any]) -> list[bytes]:
    """Values as UTF-8 text (one C-level join and split when they are all ``str``)."""
    try:
        joined = "\n".join(values)  # TypeError unless every value is a str
    except TypeError:
        joined = None
    if joined is not None and values and joined.count("\n") == len(values) - 1:
        return joined.encode().split(b"\n")  # no value held a newline
    return [str(v).encode() for v in values]


def _text(values: Sequence[str | None] | None, n: int) -> tuple[list[bytes], np.ndarray | None]:
    if values is None:
        return [], np.zeros(n, dtype=bool)
    if None not in values:
        return utf8(values), None
    present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    return utf8([v for v in values if v is not None]), present


def encode_capture(rows: CaptureRows, *, codec: int = parquet.UNCOMPRESSED) -> bytes:
    """The Parquet file of some captured rows (:data:`COLUMNS`)."""
    n = len(rows.ids)
    if rows.inputs.shape[0] != n or rows.outputs.shape[0] != n or rows.ts_ms.shape[0] != n:
        raise ValueError("every column needs one value per row")
    table = parquet.Table(COLUMNS, n, metadata={"treeserve.format": FORMAT})
    leaves = table.leaves
    c = _BY_NAME
    leaves[("id",)] = parquet.scalar_leaf(c["id"], utf8(rows.ids))
    leaves[("ts",)] = parquet.scalar_leaf(c["ts"], rows.ts_ms)
    leaves[("model",)] = parquet.scalar_leaf(c["model"], [rows.model.encode()] * n)
    versions = np.asarray(rows.versions, dtype=np.int64)
    known = versions >= 0
    leaves[("version",)] = parquet.scalar_leaf(
        c["version"], versions[known], None if known.all() else known
    )
    aliases, present = _text(rows.aliases, n)
    leaves[("alias",)] = parquet.scalar_leaf(c["alias"], aliases, present)
    leaves[("latency_ms",)] = _optional_float_leaf(rows.latency_ms, n)
    leaves[("inputs", "list", "element")] = parquet.fixed_list_leaf(c["inputs"], rows.inputs)
    leaves[("outputs", "list", "element")] = parquet.fixed_list_leaf(c["outputs"], rows.outputs)
    labels, present = _text(rows.labels, n)
    leaves[("label",)] = parquet.scalar_leaf(c["label"], labels, present)
    keys = [k.encode() for k in rows.categories]
    per_key = [[None if v is None else v.encode() for v in col] for col in rows.categories.values()]
    key_leaf, value_leaf = parquet.map_leaves(c["categories"], n, keys, per_key)
    leaves[("categories", "key_value", "key")] = key_leaf
    leaves[("categories", "key_value", "value")] = value_leaf
    return parquet.write_table(table, codec=codec)


def _optional_float_leaf(values: npt.NDArray[np.float32] | None, n: int) -> parquet.Leaf:
    column = _BY_NAME["latency_ms"]
    if values is None:
        return parquet.scalar_leaf(column, np.zeros(0, np.float32), np.zeros(n, dtype=bool))
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] != n:
        raise ValueError("every column needs one value per row")
    known = ~np.isnan(values)
    if known.all():
        return parquet.scalar_leaf(column, values)
    return parquet.scalar_leaf(column, values[known], known)


# --- reading -----------------------------------------------------------------------------------


def _leaf(name: str) -> tuple[list[str], int, int]:
    return _BY_NAME[name].leaves()[0]


@lru_cache(maxsize=16)
def _fixed_rep_levels(n: int, width: int) -> bytes:
    """The repetition levels :func:`encode_capture` writes for n lists of ``width`` values."""
    levels = np.ones(n * width, np.uint8)
    levels[::width] = 0
    return parquet.encode_levels(levels, 1)


def _fixed_list(pf: parquet.ParquetFile, name: str) -> npt.NDArray[np.float32]:
    """A list column whose rows all hold the same number of values, as an (n, width) matrix."""
    page = pf.page(*_leaf(name))
    n = pf.num_rows
    if n == 0:
        return np.zeros((0, 0), np.float32)
    assert page.rep is not None  # noqa: S101 - list leaves have both levels
    assert page.def_ is not None  # noqa: S101
    present = page.present()
    if present == 0:  # every list empty
        return np.zeros((n, 0), np.float32)
    width, rem = divmod(page.num_values, n)
    if rem or present != page.num_values:
        raise parquet.ParquetError(f"{name}: rows of different widths")
    if page.rep_raw != _fixed_rep_levels(n, width):  # not as encode_capture writes them
        expected = np.ones(page.num_values, np.uint8)
        expected[::width] = 0
        if not np.array_equal(page.rep, expected):
            raise parquet.ParquetError(f"{name}: rows of different widths")
    values = page.numbers()
    return values.reshape(n, width)


def _optional_ints(pf: parquet.ParquetFile, name: str) -> npt.NDArray[np.int64]:
    """An optional INT64 column with nulls as -1 (versions are positive)."""
    page = pf.page(*_leaf(name))
    values = page.numbers()
    if page.def_ is None or page.def_.all():
        return values.astype(np.int64, copy=False)
    out = np.full(page.num_values, -1, np.int64)
    out[page.def_.astype(bool)] = values
    return out


def _optional_floats(pf: parquet.ParquetFile, name: str) -> npt.NDArray[np.float32]:
    """An optional FLOAT column with nulls as NaN (all NaN in files written without it)."""
    if (name,) not in pf.chunks:
        return np.full(pf.num_rows, np.nan, np.float32)
    page = pf.page(*_leaf(name))
    values = page.numbers()
    if page.def_ is None or page.def_.all():
        return values.astype(np.float32, copy=True)
    out = np.full(page.num_values, np.nan, np.float32)
    out[page.def_.astype(bool)] = values
    return out


def _optional_text(pf: parquet.ParquetFile, name: str) -> list[str | None]:
    path, rep, max_def = _leaf(name)
    page = pf.page(path, rep, max_def)
    found = iter(page.strings(max_def))
    present = page.def_ if page.def_ is not None else np.ones(page.num_values, np.uint8)
    return [next(found).decode() if d else None for d in present.tolist()]


def read_ids(pf: parquet.ParquetFile) -> list[bytes]:
    """The id column as bytes (UTF-8), as monitoring joins labels by them."""
    path, rep, max_def = _leaf("id")
    return pf.page(path, rep, max_def).strings(max_def)


def _categories(pf: parquet.ParquetFile) -> dict[str, list[str | None]]:
    (kpath, krep, kdef), (vpath, vrep, vdef) = _BY_NAME["categories"].leaves()
    kpage, vpage = pf.page(kpath, krep, kdef), pf.page(vpath, vrep, vdef)
    assert kpage.def_ is not None  # noqa: S101 - map leaves have both levels
    assert vpage.def_ is not None  # noqa: S101
    n = pf.num_rows
    if n == 0 or not kpage.def_.any():
        return {}
    k, rem = divmod(kpage.num_values, n)
    if rem or not kpage.def_.all():
        raise parquet.ParquetError("categories: rows with different keys")
    keys = [key.decode() for key in kpage.strings(kdef)]
    names = keys[:k]
    if keys != names * n:
        raise parquet.ParquetError("categories: rows with different keys")
    found = iter(vpage.strings(vdef))
    flat = [next(found).decode() if d == vdef else None for d in vpage.def_.tolist()]
    return {name: flat[j::k] for j, name in enumerate(names)}


def decode_capture(data: bytes) -> CaptureRows:
    """Every column of a capture file (:class:`parquet.ParquetError` if it is not one)."""
    pf = parquet.read_footer(data)
    models = {m.decode() for m in pf.page(*_leaf("model")).strings(0)}
    versions = _optional_ints(pf, "version")
    return CaptureRows(
        model=models.pop() if len(models) == 1 else "",
        ids=[i.decode() for i in read_ids(pf)],
        ts_ms=pf.page(*_leaf("ts")).numbers().astype(np.int64),
        versions=versions,
        inputs=_fixed_list(pf, "inputs"),
        outputs=_fixed_list(pf, "outputs"),
        labels=_optional_text(pf, "label"),
        aliases=_optional_text(pf, "alias"),
        latency_ms=_optional_floats(pf, "latency_ms"),
        categories=_categories(pf),
    )


def capture_split(data: bytes, start_ms: int, end_ms: int, *, with_ids: bool) -> Split:
    """What monitoring reads of a capture file: its rows of ``[start_ms, end_ms)`` grouped by
    model version, with their ids (bytes) when ``with_ids``. Raises
    :class:`parquet.ParquetError` when the file is not a capture file."""
    pf = parquet.read_footer(data)
    n = pf.num_rows
    ts = pf.page(*_leaf("ts")).numbers()
    versions = _optional_ints(pf, "version")
    X = _fixed_list(pf, "inputs")
    P = _fixed_list(pf, "outputs")
    if ts.shape[0] != n or versions.shape[0] != n:
        raise parquet.ParquetError("columns of different lengths")
    ids: list[bytes] | parquet.StringRuns | None = None
    if with_ids:  # by width, as byte matrices (monitoring joins those with numpy)
        path, rep, max_def = _leaf("id")
        page = pf.page(path, rep, max_def)
        ids = page.string_runs(max_def)
        if ids is None:
            ids = page.strings(max_def)
        if (ids.count if isinstance(ids, parquet.StringRuns) else len(ids)) != n:
            raise parquet.ParquetError("columns of different lengths")
    inside = (ts >= start_ms) & (ts < end_ms)
    out_of_window = int(n - inside.sum())
    malformed = int((inside & (versions < 0)).sum())
    groups: list[Group] = []
    if out_of_window == 0 and n and versions.min() == versions.max() >= 0:
        groups.append(Group(int(versions[0]), X, P if P.shape[1] else None, ids, ids is not None))
    else:
        kept = np.where(inside, versions, -1)
        for v in np.unique(kept[kept >= 0]).tolist():
            idx = np.flatnonzero(kept == v)
            chosen = (
                None
                if ids is None
                else ids.take(idx)
                if isinstance(ids, parquet.StringRuns)
                else [ids[i] for i in idx.tolist()]
            )
            groups.append(
                Group(int(v), X[idx], P[idx] if P.shape[1] else None, chosen, chosen is not None)
            )
    return Split(out_of_window, groups, malformed)


# --- the Glue table --------------------------------------------------------------------------


def glue_table_input(location: str, name: str = "captures") -> dict[str, Any]:
    """The Glue table over ``captures/`` (``location``: ``s3://<bucket>/captures/``), as
    CloudFormation's ``AWS::Glue::Table`` ``TableInput`` and Glue's ``CreateTable`` take it:
    the columns of :data:`COLUMNS` (less the partition keys), partition projection on
    ``model`` (injected: queries name their model) and ``dt`` (dates from 2024-01-01)."""
    base = location.rstrip("/") + "/"
    partitions = {key for key, _ in PARTITION_KEYS}
    return {
        "Name": name,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {
            "classification": "parquet",
            "EXTERNAL": "TRUE",
            "projection.enabled": "true",
            "projection.model.type": "injected",
            "projection.dt.type": "date",
            "projection.dt.format": "yyyy-MM-dd",
            "projection.dt.range": "2024-01-01,NOW",
            "projection.dt.interval": "1",
            "projection.dt.interval.unit": "DAYS",
            "storage.location.template": base + "${model}/dt=${dt}/",
        },
        "PartitionKeys": [{"Name": key, "Type": kind} for key, kind in PARTITION_KEYS],
        "StorageDescriptor": {
            "Location": base,
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": (
                    "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
                )
            },
            "Columns": [
                {"Name": c.name, "Type": c.hive_type(), "Comment": c.doc}
                for c in COLUMNS
                if c.name not in partitions
            ],
        },
    }


def athena_ddl(location: str, name: str = "captures", database: str | None = None) -> str:
    """``CREATE EXTERNAL TABLE`` for Athena, rendered from :func:`glue_table_input`."""
    table = glue_table_input(location, name)
    sd = table["StorageDescriptor"]
    qualified = f"`{database}`.`{name}`" if database else f"`{name}`"
    columns = ",\n".join(
        f"  `{c['Name']}` {c['Type']} COMMENT '{c['Comment'].replace(chr(39), '')}'"
        for c in sd["Columns"]
    )
    keys = ", ".join(f"`{k['Name']}` {k['Type']}" for k in table["PartitionKeys"])
    props = ",\n".join(f"  '{k}'='{v}'" for k, v in table["Parameters"].items())
    return (
        f"CREATE EXTERNAL TABLE IF NOT EXISTS {qualified} (\n{columns}\n)\n"
        f"PARTITIONED BY ({keys})\n"
        f"ROW FORMAT SERDE '{sd['SerdeInfo']['SerializationLibrary']}'\n"
        f"STORED AS INPUTFORMAT '{sd['InputFormat']}'\n"
        f"OUTPUTFORMAT '{sd['OutputFormat']}'\n"
        f"LOCATION '{sd['Location']}'\n"
        f"TBLPROPERTIES (\n{props}\n)"
    )


# --- the previous release's JSON Lines captures (read for one release) ---------------------------
# Lines of ``{"id", "ts", "version", "features", "prediction", "label"}`` in that key order.
FIELDS = ("id", "ts", "version", "features", "prediction", "label")


def encode_lines(rows: Iterable[tuple[Any, str, int | None, list[Any], Any, Any]]) -> bytes:
    """JSON Lines of ``(id, ts, version, features, prediction, label)`` rows as the previous
    release wrote them (kept to test that such files stay readable)."""
    dumps = orjson.dumps
    lines = [
        dumps(
            {
                "id": row_id,
                "ts": ts,
                "version": version,
                "features": features,
                "prediction": prediction,
                "label": label,
            }
        )
        for row_id, ts, version, features, prediction, label in rows
    ]
    lines.append(b"")
    return b"\n".join(lines)


def parse_lines(raw: bytes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loads = orjson.loads
    for line in raw.splitlines():
        if not line:
            continue
        try:
            rec = loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


# The inference function writes every line with the same keys in the same order (see
# treeserve.serving.capture), so each field can be cut out of the whole file with one regular expression
# and the numbers of all rows parsed by one orjson call: about twice as fast as one orjson.loads
# per line, whose cost is mostly building a dict per row. Any file where a field does not occur
# exactly once per line, or where rows differ in width, takes the general per-line path.
_FEATURES_PREDICTION = re.compile(
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]'
)
_TS_VERSION = re.compile(rb'"ts":"([^"\\]{0,64})","version":(\d{1,9})[,}]')
# The inference function's own key order (id, ts, version, features, prediction, label): one
# pass over the file instead of two.
_ROW = re.compile(
    rb'"ts":"([^"\\]{0,64})","version":(\d{1,9}),'
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]'
)
# With labels to join: the same, plus the id when it is a plain string (no escapes), as the
# inference function writes its generated ids.
_ROW_ID = re.compile(
    rb'^\{"id":"([^"\\\n]*)","ts":"([^"\\]{0,64})","version":(\d{1,9}),'
    rb'"features":\[([^\]]*)\],"prediction":(\[[^\]]*\]|[-+0-9.eE]+)[,}]',
    re.MULTILINE,
)
_ID = re.compile(rb'"id":("(?:[^"\\]|\\.)*"|-?\d+)[,}]')
# orjson has no NaN literal: missing values (null) are parsed as a number no float32 can hold,
# which becomes inf in the float32 matrix and then NaN. Values beyond float32's range (which
# XGBoost could not read either) are thereby treated as missing too.
_MISSING_SENTINEL = b"1e300"


class FastBatch:
    """The columns of a capture file parsed by the fast path."""

    def __init__(
        self,
        raw: bytes,
        ts: list[bytes],
        versions: list[bytes],
        X: npt.NDArray[np.float32],
        P: npt.NDArray[np.float32] | None,
        *,
        id_bytes: list[bytes] | None = None,
    ) -> None:
        self.id_bytes = id_bytes
        self.raw = raw
        self.ts = ts
        self.versions = versions
        self.X = X
        self.P = P

    def ids(self) -> list[Any]:
        """Row ids (parsed only when labels need them)."""
        found = _ID.findall(self.raw)
        if len(found) == len(self.versions):
            ids: list[Any] = orjson.loads(b"[" + b",".join(found) + b"]")
            return ids
        return [rec.get("id") for rec in parse_lines(self.raw)]


def fast_parse(raw: bytes, *, with_ids: bool = False) -> FastBatch | None:
    """Parse a capture file by the fast path, or None when it must take the per-line one.

    Each pattern must match exactly once per line (a string value cannot fake a key: JSON
    escapes its quotes), every row must have the same width and every number must parse.
    """
    if not raw:
        return None
    # Lines, counting a last one without its newline; a blank line fails the match count below.
    n = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    id_bytes: list[bytes] | None = None
    rows_id = _ROW_ID.findall(raw) if with_ids else []
    rows = [] if len(rows_id) == n else _ROW.findall(raw)
    # zip(*rows) transposes the matches into columns at C speed.
    if len(rows_id) == n:
        ids_t, ts, versions, feats, preds = zip(*rows_id, strict=True)
        id_bytes = list(ids_t)
    elif len(rows) == n:
        ts, versions, feats, preds = zip(*rows, strict=True)
    else:  # other key order: one pattern per pair of adjacent keys
        fp = _FEATURES_PREDICTION.findall(raw)
        tv = _TS_VERSION.findall(raw)
        if not (len(fp) == len(tv) == n) or n == 0:
            return None
        feats, preds = zip(*fp, strict=True)
        ts, versions = zip(*tv, strict=True)
    width = feats[0].count(b",") + 1
    if not feats[0] or len(set(map(bytes.count, feats, repeat(b",", n)))) != 1:
        return None
    try:
        numbers = orjson.loads(b"[" + b",".join(feats).replace(b"null", _MISSING_SENTINEL) + b"]")
        with np.errstate(over="ignore"):
            X = np.fromiter(numbers, dtype=np.float32, count=n * width)
        P = rows_matrix(orjson.loads(b"[" + b",".join(preds) + b"]"))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    X[np.isinf(X)] = np.nan
    return FastBatch(
        raw,
        list(ts),
        list(versions),
        X.reshape(n, width),
        P if P is not None and P.shape[0] == n else None,
        id_bytes=id_bytes,
    )


def rows_matrix(values: list[Any], width: int | None = None) -> npt.NDArray[np.float32] | None:
    """Rows of numbers (None missing) as float32; None when ragged or not numeric."""
    try:
        arr = np.array(values, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        return None
    return arr


@dataclass(frozen=True, slots=True)
class Group:
    """One model version's rows of a capture file: features, predictions and (when labels
    are to be joined) ids: by width (:class:`treeserve.parquet.StringRuns`) from a capture
    file, else a list, of bytes when they are plain strings (see ``FastBatch.id_bytes``)."""

    version: int
    X: npt.NDArray[np.float32]
    P: npt.NDArray[np.float32] | None
    ids: list[Any] | parquet.StringRuns | None
    ids_are_bytes: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    """A capture file's rows inside the window, by version, and how many fell outside."""

    out_of_window: int
    groups: list[Group]
    malformed: int = 0  # rows inside the window without a version


def fast_split(raw: bytes, start_key: bytes, end_key: bytes, *, with_ids: bool) -> Split | None:
    """A capture file by the fast path, its rows of ``[start_key, end_key)`` grouped by model
    version (with their ids when ``with_ids``: labels are to be joined); None when the file
    must take the general path."""
    batch = fast_parse(raw, with_ids=with_ids)
    return None if batch is None else split_batch(batch, start_key, end_key, with_ids=with_ids)


def split_batch(batch: FastBatch, start_key: bytes, end_key: bytes, *, with_ids: bool) -> Split:
    """Keep the rows of ``[start_key, end_key)`` and group them by model version."""
    n = len(batch.ts)
    out_of_window = 0
    # Most files lie wholly inside the window and hold one version: check that cheaply.
    if min(batch.ts) >= start_key and max(batch.ts) < end_key:
        inside = None
    else:
        ts = np.array(batch.ts, dtype="S23")
        inside = (ts >= start_key) & (ts < end_key)
        out_of_window = int(n - inside.sum())
    distinct = set(batch.versions)
    if inside is None and len(distinct) == 1:
        picks: list[tuple[int, slice | npt.NDArray[np.intp]]] = [(int(distinct.pop()), slice(None))]
    else:
        versions = np.array(batch.versions, dtype=np.int64)
        if inside is not None:
            versions[~inside] = -1
        picks = [
            (v, np.flatnonzero(versions == v)) for v in np.unique(versions[versions >= 0]).tolist()
        ]
    ids: list[Any] | None = None
    as_bytes = batch.id_bytes is not None
    if with_ids and batch.P is not None and picks:
        ids = batch.id_bytes if batch.id_bytes is not None else batch.ids()
    groups = []
    for version, idx in picks:
        chosen = None
        if ids is not None:
            chosen = ids if isinstance(idx, slice) else [ids[i] for i in idx.tolist()]
        P = batch.P[idx] if batch.P is not None else None
        groups.append(Group(version, batch.X[idx], P, chosen, as_bytes and chosen is not None))
    return Split(out_of_window, groups)
