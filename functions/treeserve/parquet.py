"""The small part of Parquet that captures need, written and read with numpy alone.

A capture object is one Parquet file with one row group and one data page (v1) per column,
PLAIN values, levels in the RLE/bit-packed hybrid, optionally GZIP pages: what Athena, DuckDB,
Spark and pyarrow all read. Writing it costs little more than ``ndarray.tobytes`` (the float32
matrices of a request are already Parquet's PLAIN FLOAT values), so the inference function
needs no Arrow library (arro3-io alone would not fit its artifact budget), and reading it back
is ``np.frombuffer`` on the page: monitoring gets its columns at memory speed.

Columns (:class:`Column`) are a scalar (required or optional) or a list of one scalar type
(``LIST``) or a map of string keys to optional string values (``MAP``), as Parquet's
three-level layouts. :func:`write_table` writes them; :func:`read_table` reads back the columns
asked for from a file of this layout (one row group, one page per column; anything else raises
:class:`ParquetError`). The footer is Thrift's compact protocol, encoded and decoded here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"PAR1"

# parquet.thrift enums
BOOLEAN, INT32, INT64, FLOAT, DOUBLE, BYTE_ARRAY = 0, 1, 2, 4, 5, 6
REQUIRED, OPTIONAL, REPEATED = 0, 1, 2
UTF8, MAP, MAP_KEY_VALUE, LIST, TIMESTAMP_MILLIS = 0, 1, 2, 3, 9
PLAIN, RLE = 0, 3
UNCOMPRESSED, GZIP = 0, 2
DATA_PAGE = 0

_NUMPY = {INT32: "<i4", INT64: "<i8", FLOAT: "<f4", DOUBLE: "<f8"}
_HIVE = {INT32: "int", INT64: "bigint", FLOAT: "float", DOUBLE: "double", BYTE_ARRAY: "string"}


class ParquetError(ValueError):
    """A file that is not Parquet of the layout :func:`write_table` writes."""


# --- Thrift compact protocol -------------------------------------------------------------------
# Types of the compact protocol; a struct is written from [(field id, type, value), ...].
T_TRUE, T_FALSE, T_I32, T_I64, T_BINARY, T_LIST, T_STRUCT = 1, 2, 5, 6, 8, 9, 12
_T_BYTE, _T_I16, _T_DOUBLE = 3, 4, 7

Fields = list[tuple[int, int, Any]]


def _varint(value: int, out: bytearray) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _write_value(kind: int, value: Any, out: bytearray) -> None:
    if kind in (T_I32, T_I64):
        _varint(_zigzag(int(value)), out)
    elif kind == T_BINARY:
        data = value.encode() if isinstance(value, str) else bytes(value)
        _varint(len(data), out)
        out += data
    elif kind == T_STRUCT:
        _write_struct(value, out)
    elif kind == T_LIST:
        elem, items = value
        if len(items) < 15:
            out.append((len(items) << 4) | elem)
        else:
            out.append(0xF0 | elem)
            _varint(len(items), out)
        for item in items:
            _write_value(elem, item, out)
    else:  # pragma: no cover - the writer uses only the kinds above
        raise ParquetError(f"thrift type {kind} not written")


def _write_struct(fields: Fields, out: bytearray) -> None:
    last = 0
    for fid, kind, value in fields:
        if value is None:
            continue
        wire = (T_TRUE if value else T_FALSE) if kind == T_TRUE else kind
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | wire)
        else:
            out.append(wire)
            _varint(_zigzag(fid), out)
        if kind != T_TRUE:
            _write_value(kind, value, out)
        last = fid
    out.append(0)


def thrift_struct(fields: Fields) -> bytes:
    out = bytearray()
    _write_struct(fields, out)
    return bytes(out)


class _Reader:
    """Decodes compact-protocol structs into {field id: value} (lists as Python lists)."""

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        try:
            b = self.data[self.pos]
        except IndexError:
            raise ParquetError("truncated thrift") from None
        self.pos += 1
        return int(b)

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ParquetError("bad varint")

    def signed(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, kind: int) -> Any:
        if kind == T_TRUE:
            return True
        if kind == T_FALSE:
            return False
        if kind == _T_BYTE:
            return self.byte()
        if kind in (_T_I16, T_I32, T_I64):
            return self.signed()
        if kind == _T_DOUBLE:
            self.pos += 8
            return struct.unpack_from("<d", self.data, self.pos - 8)[0]
        if kind == T_BINARY:
            n = self.varint()
            self.pos += n
            if self.pos > len(self.data):
                raise ParquetError("truncated thrift")
            return bytes(self.data[self.pos - n : self.pos])
        if kind in (T_LIST, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if elem in (T_TRUE, T_FALSE):
                return [self.byte() == 1 for _ in range(size)]
            return [self.value(elem) for _ in range(size)]
        if kind == T_STRUCT:
            return self.struct()
        raise ParquetError(f"thrift type {kind} not read")

    def struct(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return out
            kind, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.signed()
            out[fid] = self.value(kind)
            last = fid


# --- levels: the RLE / bit-packed hybrid -------------------------------------------------------


def bit_width(max_level: int) -> int:
    return int(max_level).bit_length()


def encode_levels(levels: npt.NDArray[np.uint8], max_level: int) -> bytes:
    """Levels in the hybrid encoding, 4-byte length first (data page v1): one RLE run when
    they are all equal, else one bit-packed run."""
    width = bit_width(max_level)
    out = bytearray()
    n = int(levels.size)
    if n and (levels == levels[0]).all():
        _varint(n << 1, out)
        out += int(levels[0]).to_bytes((width + 7) // 8, "little")
    elif n:
        groups = (n + 7) // 8
        padded = np.zeros(groups * 8, np.uint8)
        padded[:n] = levels
        bits = (padded[:, None] >> np.arange(width, dtype=np.uint8)) & 1
        _varint((groups << 1) | 1, out)
        out += np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    return len(out).to_bytes(4, "little") + bytes(out)


def decode_levels(
    data: bytes | memoryview, pos: int, count: int, max_level: int
) -> tuple[npt.NDArray[np.uint8], int]:
    """``count`` levels at ``pos`` (after their 4-byte length); returns them and the next pos."""
    (length,) = struct.unpack_from("<I", data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise ParquetError("levels beyond the page")
    width = bit_width(max_level)
    reader = _Reader(data, pos + 4)
    parts: list[npt.NDArray[np.uint8]] = []
    got = 0
    while got < count and reader.pos < end:
        head = reader.varint()
        if head & 1:  # bit-packed: groups of 8 values
            nbytes = (head >> 1) * width
            raw = np.frombuffer(data, np.uint8, nbytes, reader.pos)
            reader.pos += nbytes
            bits = np.unpackbits(raw, bitorder="little")
            if width == 1:
                vals = bits
            else:
                weights = np.left_shift(1, np.arange(width, dtype=np.uint8)).astype(np.uint8)
                vals = (bits.reshape(-1, width) * weights).sum(axis=1, dtype=np.uint8)
        else:
            nb = (width + 7) // 8
            value = int.from_bytes(bytes(data[reader.pos : reader.pos + nb]), "little")
            reader.pos += nb
            if head >> 1 >= count and not parts:  # one run: a view, nothing allocated
                return np.broadcast_to(np.uint8(value), (count,)), end
            vals = np.full(head >> 1, value, np.uint8)
        parts.append(vals)
        got += vals.size
    if got < count:
        raise ParquetError("too few levels")
    levels = np.concatenate(parts)[:count] if len(parts) != 1 else parts[0][:count]
    return levels, end


# --- byte arrays -------------------------------------------------------------------------------


def encode_strings(values: Sequence[bytes]) -> bytes:
    """PLAIN BYTE_ARRAY: each value's 4-byte length, then its bytes (numpy scatters the
    bytes: about 0.1 us a value, where a Python loop takes 1.5)."""
    n = len(values)
    if n == 0:
        return b""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    if n > 1 and values.count(values[0]) == n:  # one value in every row (the model name)
        return (struct.pack("<I", len(values[0])) + values[0]) * n
    data = np.frombuffer(b"".join(values), np.uint8)
    out = np.empty(4 * n + data.size, np.uint8)
    starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1] + 4, out=starts[1:])  # where each value's length goes
    heads = (starts[:, None] + np.arange(4)).reshape(-1)
    out[heads] = lengths.astype("<u4").view(np.uint8)
    mask = np.ones(out.size, dtype=bool)
    mask[heads] = False
    out[mask] = data
    return out.tobytes()


@dataclass(frozen=True, slots=True)
class StringRuns:
    """``count`` BYTE_ARRAY values grouped by their length: for each width, the positions of
    its values (ascending) and their bytes, a ``(values, width)`` matrix."""

    count: int
    widths: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]

    def take(self, positions: npt.NDArray[np.int64]) -> StringRuns:
        """The values at ``positions`` (ascending), numbered from 0 again."""
        chosen = np.zeros(self.count, bool)
        chosen[positions] = True
        renumbered = np.cumsum(chosen) - 1
        widths = {}
        for width, (rows, values) in self.widths.items():
            keep = chosen[rows]
            if keep.any():
                widths[width] = (renumbered[rows[keep]], values[keep])
        return StringRuns(int(positions.size), widths)

    def tolist(self) -> list[bytes]:
        if len(self.widths) == 1:
            ((_, values),) = self.widths.values()
            return _cut(values)
        out = [b""] * self.count
        for rows, values in self.widths.values():
            for row, value in zip(rows.tolist(), _cut(values), strict=True):
                out[row] = value
        return out


def _cut(values: npt.NDArray[np.uint8]) -> list[bytes]:
    """The rows of a ``(n, width)`` byte matrix as bytes objects."""
    n, width = values.shape
    if width == 0:
        return [b""] * n
    cut: list[bytes] = np.ascontiguousarray(values).view(f"S{width}")[:, 0].tolist()
    if set(map(len, cut)) == {width}:  # "S" drops trailing NULs: keep those by hand
        return cut
    flat = values.tobytes()
    return [flat[i : i + width] for i in range(0, len(flat), width)]


# Values per run of one length, on average, below which string_runs gives up (the caller cuts
# the values one by one: a numpy call per run would cost more).
MIN_RUN = 16


def string_runs(data: bytes | memoryview, pos: int, count: int) -> StringRuns | None:
    """``count`` PLAIN BYTE_ARRAY values at ``pos``, cut by numpy run by run: a run of values
    of one length is found by checking, in growing windows, that the length prefixes lie where
    that length puts them (exact: a prefix that differs starts the next run). None when the
    runs are short (fewer than ``MIN_RUN`` values each, on average)."""
    buf = memoryview(data)
    size = len(buf)
    runs: dict[int, list[tuple[int, int, int]]] = {}  # width -> (first value, values, pos)
    row = nruns = 0
    while row < count:
        if pos + 4 > size:
            raise ParquetError("strings beyond the page")
        (width,) = struct.unpack_from("<I", buf, pos)
        stride = 4 + width
        most = min(count - row, (size - pos) // stride)  # values of this width that fit
        if most == 0:
            raise ParquetError("strings beyond the page")
        n, window = 0, 1024
        while n < most:
            m = min(window, most - n)
            heads = np.frombuffer(buf, np.uint8, m * stride, pos + n * stride)
            lengths = heads.reshape(m, stride)[:, :4].view("<u4")[:, 0]
            differ = np.flatnonzero(lengths != width)
            if differ.size:
                n += int(differ[0])
                break
            n += m
            window *= 4
        runs.setdefault(width, []).append((row, n, pos))
        row += n
        pos += n * stride
        nruns += 1
        if nruns > 4 and row < nruns * MIN_RUN:
            return None
    widths = {}
    for width, parts in runs.items():
        rows = np.concatenate([np.arange(r, r + n, dtype=np.int64) for r, n, _ in parts])
        blocks = [
            np.frombuffer(buf, np.uint8, n * (4 + width), p).reshape(n, 4 + width)[:, 4:]
            for _, n, p in parts
        ]
        widths[width] = (rows, blocks[0] if len(blocks) == 1 else np.concatenate(blocks))
    return StringRuns(count, widths)


def decode_strings(data: bytes | memoryview, pos: int, count: int) -> list[bytes]:
    """``count`` PLAIN BYTE_ARRAY values at ``pos``: cut by numpy in runs of one length
    (:func:`string_runs`), else one by one."""
    if count == 0:
        return []
    runs = string_runs(data, pos, count)
    if runs is not None:
        return runs.tolist()
    buf = memoryview(data)
    out = []
    unpack = struct.Struct("<I").unpack_from
    for _ in range(count):
        (n,) = unpack(buf, pos)
        out.append(bytes(buf[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if pos > len(buf):
        raise ParquetError("strings beyond the page")
    return out


# --- schema ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a table: a scalar, a ``list`` of scalars, or a ``map`` string -> string.

    ``physical``: INT32, INT64, FLOAT, DOUBLE or BYTE_ARRAY (text); ``optional``: the scalar
    (or the map's value) may be null; ``timestamp_ms``: INT64 milliseconds since the epoch, UTC.
    """

    name: str
    physical: int
    kind: str = "scalar"  # scalar | list | map
    optional: bool = False
    timestamp_ms: bool = False
    doc: str = ""

    def hive_type(self) -> str:
        """The column's type in Hive DDL (Athena, Glue)."""
        scalar = "timestamp" if self.timestamp_ms else _HIVE[self.physical]
        if self.kind == "list":
            return f"array<{scalar}>"
        if self.kind == "map":
            return "map<string,string>"
        return scalar

    def _scalar_element(self, name: str, repetition: int) -> Fields:
        converted = UTF8 if self.physical == BYTE_ARRAY else None
        logical: Fields | None = [(1, T_STRUCT, [])] if self.physical == BYTE_ARRAY else None
        if self.timestamp_ms:
            converted = TIMESTAMP_MILLIS
            unit: Fields = [(1, T_STRUCT, [])]  # MILLIS
            logical = [(8, T_STRUCT, [(1, T_TRUE, True), (2, T_STRUCT, unit)])]
        return [
            (1, T_I32, self.physical),
            (3, T_I32, repetition),
            (4, T_BINARY, name),
            (6, T_I32, converted),
            (10, T_STRUCT, logical),
        ]

    def schema_elements(self) -> list[Fields]:
        if self.kind == "scalar":
            return [self._scalar_element(self.name, OPTIONAL if self.optional else REQUIRED)]
        if self.kind == "list":
            return [
                [
                    (3, T_I32, REQUIRED),
                    (4, T_BINARY, self.name),
                    (5, T_I32, 1),
                    (6, T_I32, LIST),
                    (10, T_STRUCT, [(3, T_STRUCT, [])]),
                ],
                [(3, T_I32, REPEATED), (4, T_BINARY, "list"), (5, T_I32, 1)],
                self._scalar_element("element", OPTIONAL if self.optional else REQUIRED),
            ]
        key = Column("key", BYTE_ARRAY)
        value = Column("value", BYTE_ARRAY, optional=True)
        return [
            [
                (3, T_I32, REQUIRED),
                (4, T_BINARY, self.name),
                (5, T_I32, 1),
                (6, T_I32, MAP),
                (10, T_STRUCT, [(2, T_STRUCT, [])]),
            ],
            [
                (3, T_I32, REPEATED),
                (4, T_BINARY, "key_value"),
                (5, T_I32, 2),
                (6, T_I32, MAP_KEY_VALUE),
            ],
            key._scalar_element("key", REQUIRED),
            value._scalar_element("value", OPTIONAL),
        ]

    def leaves(self) -> list[tuple[list[str], int, int]]:
        """(path, max repetition level, max definition level) of each leaf column."""
        if self.kind == "scalar":
            return [([self.name], 0, 1 if self.optional else 0)]
        if self.kind == "list":
            return [([self.name, "list", "element"], 1, 2 if self.optional else 1)]
        return [([self.name, "key_value", "key"], 1, 1), ([self.name, "key_value", "value"], 1, 2)]


# --- values of one column ----------------------------------------------------------------------


@dataclass(slots=True)
class Leaf:
    """A leaf column's page content: levels and PLAIN values."""

    values: bytes
    num_values: int
    rep: npt.NDArray[np.uint8] | None = None
    def_: npt.NDArray[np.uint8] | None = None


def _plain(physical: int, values: Any) -> bytes:
    if physical == BYTE_ARRAY:
        return encode_strings(values)
    return np.ascontiguousarray(values, dtype=_NUMPY[physical]).tobytes()


def scalar_leaf(col: Column, values: Any, present: npt.NDArray[np.bool_] | None = None) -> Leaf:
    """A scalar column: ``values`` of the present rows (all rows when ``present`` is None)."""
    n = len(values) if present is None else int(present.size)
    if not col.optional:
        return Leaf(_plain(col.physical, values), n)
    defs = np.ones(n, np.uint8) if present is None else present.astype(np.uint8)
    return Leaf(_plain(col.physical, values), n, def_=defs)


def fixed_list_leaf(col: Column, matrix: npt.NDArray[Any]) -> Leaf:
    """A list column where every row holds ``matrix.shape[1]`` values (required elements)."""
    n, width = matrix.shape
    if width == 0:  # every list empty: one level pair per row, no values
        zeros = np.zeros(n, np.uint8)
        return Leaf(b"", n, rep=zeros, def_=zeros)
    rep = np.ones(n * width, np.uint8)
    rep[::width] = 0
    return Leaf(_plain(col.physical, matrix), n * width, rep=rep, def_=np.ones(n * width, np.uint8))


def map_leaves(
    col: Column, n: int, keys: Sequence[bytes], values: Sequence[Sequence[bytes | None]]
) -> tuple[Leaf, Leaf]:
    """A map column whose every row holds the same ``keys``: ``values[k][row]`` is key k's
    value in that row (None: null)."""
    k = len(keys)
    if k == 0:
        zeros = np.zeros(n, np.uint8)
        return Leaf(b"", n, rep=zeros, def_=zeros), Leaf(b"", n, rep=zeros, def_=zeros)
    rep = np.ones(n * k, np.uint8)
    rep[::k] = 0
    flat = [v for row in zip(*values, strict=True) for v in row]
    present = np.array([v is not None for v in flat], dtype=bool)
    key_leaf = Leaf(encode_strings(list(keys) * n), n * k, rep=rep, def_=np.ones(n * k, np.uint8))
    value_leaf = Leaf(
        encode_strings([v for v in flat if v is not None]),
        n * k,
        rep=rep,
        def_=np.where(present, 2, 1).astype(np.uint8),
    )
    return key_leaf, value_leaf


# --- files -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Table:
    """Columns and, per leaf path, its page content (for :func:`write_table`)."""

    columns: Sequence[Column]
    num_rows: int
    leaves: dict[tuple[str, ...], Leaf] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def write_table(table: Table, *, codec: int = UNCOMPRESSED, level: int = 1) -> bytes:
    """One Parquet file: one row group, one data page per leaf column."""
    out: list[bytes] = [MAGIC]
    written = len(MAGIC)
    chunks: list[Fields] = []
    total = 0
    for col in table.columns:
        for path, max_rep, max_def in col.leaves():
            leaf = table.leaves[tuple(path)]
            parts = []
            if max_rep:
                assert leaf.rep is not None  # noqa: S101 - the leaf builders set it
                parts.append(encode_levels(leaf.rep, max_rep))
            if max_def:
                assert leaf.def_ is not None  # noqa: S101
                parts.append(encode_levels(leaf.def_, max_def))
            parts.append(leaf.values)
            body = b"".join(parts)
            raw_size = len(body)
            if codec == GZIP:
                z = zlib.compressobj(level, zlib.DEFLATED, 31)
                body = z.compress(body) + z.flush()
            header = thrift_struct(
                [
                    (1, T_I32, DATA_PAGE),
                    (2, T_I32, raw_size),
                    (3, T_I32, len(body)),
                    (
                        5,
                        T_STRUCT,
                        [
                            (1, T_I32, leaf.num_values),
                            (2, T_I32, PLAIN),
                            (3, T_I32, RLE),
                            (4, T_I32, RLE),
                        ],
                    ),
                ]
            )
            offset = written
            out += (header, body)
            size = len(header) + len(body)
            written += size
            total += len(header) + raw_size
            meta: Fields = [
                (1, T_I32, BYTE_ARRAY if col.kind == "map" else col.physical),
                (2, T_LIST, (T_I32, [PLAIN, RLE])),
                (3, T_LIST, (T_BINARY, path)),
                (4, T_I32, codec),
                (5, T_I64, leaf.num_values),
                (6, T_I64, len(header) + raw_size),
                (7, T_I64, size),
                (9, T_I64, offset),
            ]
            chunks.append([(2, T_I64, offset), (3, T_STRUCT, meta)])
    schema: list[Fields] = [[(4, T_BINARY, "schema"), (5, T_I32, len(table.columns))]]
    for col in table.columns:
        schema.extend(col.schema_elements())
    footer = thrift_struct(
        [
            (1, T_I32, 1),
            (2, T_LIST, (T_STRUCT, schema)),
            (3, T_I64, table.num_rows),
            (
                4,
                T_LIST,
                (
                    T_STRUCT,
                    [
                        [
                            (1, T_LIST, (T_STRUCT, chunks)),
                            (2, T_I64, total),
                            (3, T_I64, table.num_rows),
                        ]
                    ],
                ),
            ),
            (
                5,
                T_LIST,
                (
                    T_STRUCT,
                    [[(1, T_BINARY, k), (2, T_BINARY, v)] for k, v in table.metadata.items()],
                ),
            ),
            (6, T_BINARY, "treeserve"),
        ]
    )
    out += (footer, len(footer).to_bytes(4, "little"), MAGIC)
    return b"".join(out)


@dataclass(slots=True)
class Page:
    """A leaf column read back: its levels (None when the column has none) and its values."""

    num_values: int
    rep: npt.NDArray[np.uint8] | None
    def_: npt.NDArray[np.uint8] | None
    data: bytes | memoryview
    pos: int  # where the PLAIN values start in ``data``
    physical: int

    max_def: int = 0
    rep_raw: bytes = b""  # the repetition levels as stored (length prefix included)

    def present(self, level: int | None = None) -> int:
        """How many levels equal ``level`` (the maximum: values present)."""
        level = self.max_def if level is None else level
        if self.def_ is None:
            return self.num_values
        if self.def_.size and self.def_.strides[0] == 0:  # one run (a broadcast view)
            return self.num_values if int(self.def_[0]) == level else 0
        return int(np.count_nonzero(self.def_ == level))

    def numbers(self) -> npt.NDArray[Any]:
        count = self.present()
        dtype = np.dtype(_NUMPY[self.physical])
        if self.pos + count * dtype.itemsize > len(self.data):
            raise ParquetError("values beyond the page")
        return np.frombuffer(self.data, dtype, count, self.pos)

    def strings(self, max_def: int) -> list[bytes]:
        count = self.present(max_def)
        return decode_strings(self.data, self.pos, count)

    def string_runs(self, max_def: int) -> StringRuns | None:
        """:func:`string_runs` of the page's values (None when their runs are short)."""
        return string_runs(self.data, self.pos, self.present(max_def))


@dataclass(slots=True)
class ParquetFile:
    """A parsed footer: rows, key-value metadata and where each leaf column's page is."""

    data: bytes
    num_rows: int
    metadata: dict[str, str]
    chunks: dict[tuple[str, ...], dict[int, Any]]

    def page(self, path: Sequence[str], max_rep: int, max_def: int) -> Page:
        meta = self.chunks.get(tuple(path))
        if meta is None:
            raise ParquetError(f"no column {'.'.join(path)}")
        reader = _Reader(self.data, int(meta[9]))
        header = reader.struct()
        dph = header.get(5)
        if header.get(1) != DATA_PAGE or dph is None or dph.get(2) != PLAIN:
            raise ParquetError("only PLAIN v1 data pages are read")
        start, size = reader.pos, int(header[3])
        if int(meta[5]) != int(dph[1]) or start + size > len(self.data):
            raise ParquetError("one page per column chunk expected")
        body: bytes | memoryview = memoryview(self.data)[start : start + size]
        if meta.get(4) == GZIP:
            try:
                body = zlib.decompress(body, 47)
            except zlib.error as exc:
                raise ParquetError(f"bad gzip page: {exc}") from None
        elif meta.get(4) != UNCOMPRESSED:
            raise ParquetError(f"codec {meta.get(4)} not read")
        n = int(dph[1])
        pos = 0
        rep = defs = None
        rep_raw = b""
        if max_rep:
            rep, end = decode_levels(body, pos, n, max_rep)
            rep_raw, pos = bytes(body[pos:end]), end
        if max_def:
            defs, pos = decode_levels(body, pos, n, max_def)
        return Page(n, rep, defs, body, pos, int(meta[1]), max_def, rep_raw)


def read_footer(data: bytes) -> ParquetFile:
    """The footer of a Parquet file of one row group (:class:`ParquetError` otherwise)."""
    if len(data) < 12 or data[:4] != MAGIC or data[-4:] != MAGIC:
        raise ParquetError("not a Parquet file")
    (length,) = struct.unpack_from("<I", data, len(data) - 8)
    start = len(data) - 8 - length
    if start < 4:
        raise ParquetError("bad footer length")
    meta = _Reader(data, start).struct()
    groups = meta.get(4) or []
    if len(groups) != 1:
        raise ParquetError(f"{len(groups)} row groups; one expected")
    chunks: dict[tuple[str, ...], dict[int, Any]] = {}
    for chunk in groups[0].get(1, []):
        cm = chunk.get(3) or {}
        chunks[tuple(p.decode() for p in cm.get(3, []))] = cm
    kv = {item[1].decode(): item.get(2, b"").decode() for item in meta.get(5) or [] if 1 in item}
    return ParquetFile(data, int(meta.get(3, 0)), kv, chunks)
