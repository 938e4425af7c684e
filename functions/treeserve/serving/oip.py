"""The Open Inference Protocol (v2) on the served models (DESIGN.md "Open Inference Protocol").

Requests are JSON (``{"id", "inputs": [{"name", "datatype", "shape", "data"}], "outputs"}``) or
the binary tensor extension: an ``Inference-Header-Content-Length`` header gives the size of the
JSON header at the front of the body, and each input with ``parameters.binary_data_size`` has
its raw little-endian bytes after it, in input order (BYTES: a 4-byte length before each
element). Inputs are one ``[n, d]`` tensor in feature order, or one ``[n]`` (or ``[n, 1]``) tensor
per feature, named by feature (BYTES values of a categorical feature are its categories).
Outputs: ``predict`` (values, or labels for classifiers) and, for classifiers,
``predict_proba``; in binary when the request asks (``binary_data_output``, or an output's
``binary_data``). Client errors raise :class:`~treeserve.errors.InvalidInput` subclasses; the
routes answer them as ``{"error": "..."}`` with the JSON API's status codes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from treeserve.errors import InputMismatch, MalformedBody, PayloadTooLarge
from treeserve.model.predictor import Prediction, Predictor
from treeserve.serving.inputs import FeatureSchema, as_float32

HEADER_LENGTH = b"inference-header-content-length"
BINARY_TYPE = b"application/octet-stream"
INPUT_NAME = "input-0"
PREDICT = "predict"
PROBA = "predict_proba"

_NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A checked infer request: ``X`` float32 (n, d) in feature order (NaN missing)."""

    id: Any
    X: np.ndarray
    outputs: list[str] | None  # requested output names (None: all)
    binary: dict[str, bool]  # output name -> in binary
    binary_default: bool


def parse_infer(
    body: bytes, header_length: bytes | None, schema: FeatureSchema, max_rows: int
) -> InferRequest:
    """Parse an infer request body (JSON, or the binary tensor extension)."""
    if header_length is not None:
        try:
            header_size = int(header_length)
        except ValueError:
            raise MalformedBody("Inference-Header-Content-Length is not an integer") from None
        if not 0 < header_size <= len(body):
            raise MalformedBody(
                f"Inference-Header-Content-Length {header_size} does not fit a body of "
                f"{len(body)} bytes"
            )
        header, binary = body[:header_size], memoryview(body)[header_size:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the inference request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise MalformedBody('the inference request must be an object {"inputs": [...]}')
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise MalformedBody('"inputs" must be a non-empty list of tensors')
    tensors = []
    offset = 0
    for tensor in inputs:
        name, datatype, shape = _tensor_head(tensor)
        size = _parameters(tensor).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise MalformedBody(f"input {name!r}: binary_data_size runs past the body")
            values = _from_binary(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            values = _from_json(name, datatype, shape, tensor.get("data"))
        tensors.append((name, datatype, shape, values))
    if offset != len(binary):
        raise MalformedBody(f"{len(binary) - offset} bytes of binary data belong to no input")
    X = _matrix(tensors, schema, max_rows)
    parameters = _parameters(request)
    outputs, binary_flags = None, {}
    requested = request.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise MalformedBody('"outputs" must be a list of {"name": ...}')
        outputs = [o["name"] for o in requested]
        binary_flags = {
            o["name"]: bool(_parameters(o).get("binary_data", False)) for o in requested
        }
    return InferRequest(
        request.get("id"), X, outputs, binary_flags, bool(parameters.get("binary_data_output"))
    )


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise MalformedBody('"parameters" must be an object')
    return parameters


def _tensor_head(tensor: dict[str, Any]) -> tuple[str, str, list[int]]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise MalformedBody('every input needs a "name"')
    if not isinstance(datatype, str):
        raise MalformedBody(f'input {name!r} needs a "datatype"')
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(s) is int and s >= 0 for s in shape)
    ):
        raise MalformedBody(f'input {name!r}: "shape" must be a list of non-negative integers')
    if datatype != "BYTES" and datatype not in _NUMERIC:
        raise InputMismatch(f"input {name!r}: datatype {datatype[:20]!r} is not supported")
    return name, datatype, shape


def _from_binary(name: str, datatype: str, shape: list[int], raw: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items: list[Any] = []
        at = 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise MalformedBody(f"input {name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, at)
            at += 4
            if at + length > len(raw):
                raise MalformedBody(f"input {name!r}: truncated BYTES element")
            items.append(bytes(raw[at : at + length]).decode("utf-8", "replace"))
            at += length
        if len(items) != count:
            raise MalformedBody(f"input {name!r}: {len(items)} elements for shape {shape}")
        return np.array(items, dtype=object)
    dtype = _NUMERIC[datatype]
    if len(raw) != count * dtype.itemsize:
        raise MalformedBody(
            f"input {name!r}: {len(raw)} bytes for shape {shape} of {datatype} "
            f"({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(raw, dtype=dtype)


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise MalformedBody(f'input {name!r} needs "data" (a list) or binary_data_size')
    flat = _flatten(data)
    if len(flat) != math.prod(shape):
        raise InputMismatch(f"input {name!r}: {len(flat)} values for shape {shape}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) or v is None for v in flat):
            raise InputMismatch(f"input {name!r}: BYTES data must be strings")
        return np.array(flat, dtype=object)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise InputMismatch(f"input {name!r}: BOOL data must be true or false")
    elif not all(type(v) in (int, float) or v is None for v in flat):
        raise InputMismatch(f"input {name!r}: {datatype} data must be numbers (or null)")
    return np.array(flat, dtype=np.float64)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    for v in data:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _matrix(
    tensors: list[tuple[str, str, list[int], np.ndarray]], schema: FeatureSchema, max_rows: int
) -> np.ndarray:
    width = schema.width
    if len(tensors) == 1 and tensors[0][0] not in schema.index:
        name, datatype, shape, values = tensors[0]
        if len(shape) != 2 or shape[1] != width:
            raise InputMismatch(
                f"input {name!r} has shape {shape}; send [n, {width}] in feature order "
                f"({schema.describe()}), or one tensor per feature named by feature"
            )
        n = shape[0]
        _check_rows(n, max_rows)
        if datatype == "BYTES":
            columns = [
                _column(schema, j, values.reshape(n, width)[:, j], "BYTES") for j in range(width)
            ]
            return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float32)
        if datatype == "FP32":
            X = values.reshape(n, width)
            if not X.flags.aligned:
                X = X.copy()
            return _checked(X, schema)
        return as_float32(values.astype(np.float64).reshape(n, width), schema)
    return _by_feature(tensors, schema, max_rows)


def _by_feature(
    tensors: list[tuple[str, str, list[int], np.ndarray]], schema: FeatureSchema, max_rows: int
) -> np.ndarray:
    rows: int | None = None
    out: np.ndarray | None = None
    for name, datatype, shape, values in tensors:
        j = schema.index.get(name)
        if j is None:
            raise InputMismatch(
                f"input {name[:80]!r} is not a feature of the model ({schema.describe()})"
            )
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise InputMismatch(f"input {name!r}: shape {shape}; send [n] or [n, 1]")
        if out is None:
            rows = shape[0]
            _check_rows(rows, max_rows)
            out = np.full((rows, schema.width), np.nan, dtype=np.float32)
        elif shape[0] != rows:
            raise InputMismatch(f"input {name!r} has {shape[0]} rows, the first input {rows}")
        with np.errstate(over="ignore", invalid="ignore"):
            out[:, j] = _column(schema, j, values, datatype)
    assert out is not None  # noqa: S101 -- inputs are not empty
    return _checked(out, schema)


def _checked(X: np.ndarray, schema: FeatureSchema) -> np.ndarray:
    if np.isinf(X).any():
        return as_float32(X.astype(np.float64), schema)  # raises with the place
    return X


def _column(schema: FeatureSchema, j: int, values: np.ndarray, datatype: str) -> np.ndarray:
    if datatype != "BYTES":
        return values.astype(np.float64)
    codes = schema.codes[j]
    feature = schema.names[j]
    if codes is None:
        raise InputMismatch(f"feature {feature!r} is numeric; send it as a number, not BYTES")
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = np.nan
            continue
        code = codes.get(value)
        if code is None:
            cats = schema.categories[j] or []
            shown = ", ".join(map(repr, cats[:20])) + (", ..." if len(cats) > 20 else "")
            raise InputMismatch(
                f"row {i}, feature {feature!r}: {str(value)[:40]!r} is not one of the model's "
                f"categories ({shown})"
            )
        out[i] = code
    return out


def _check_rows(n: int, max_rows: int) -> None:
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows; the limit is {max_rows} per request")
    if n == 0:
        raise InputMismatch("no rows: the batch dimension is 0")


# --- outputs -----------------------------------------------------------------------------------


def label_datatype(predictor: Predictor) -> str:
    table = getattr(predictor, "_label_table", [])
    return "INT64" if all(isinstance(v, int) for v in table) else "BYTES"


def output_metadata(predictor: Predictor) -> list[dict[str, Any]]:
    """The ``outputs`` of the model metadata: names, datatypes and shapes (-1: the batch)."""
    manifest = predictor.manifest
    if predictor.is_classifier:
        outputs = [{"name": PREDICT, "datatype": label_datatype(predictor), "shape": [-1]}]
        if _has_proba(predictor):
            k = 2 if predictor.task == "binary" else max(manifest.num_class, 1)
            outputs.append({"name": PROBA, "datatype": "FP32", "shape": [-1, k]})
        return outputs
    k = manifest.num_outputs
    return [{"name": PREDICT, "datatype": "FP32", "shape": [-1] if k <= 1 else [-1, k]}]


def input_metadata(schema: FeatureSchema) -> list[dict[str, Any]]:
    """One ``[n, d]`` FP32 tensor in feature order (one tensor per feature is accepted too)."""
    return [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, schema.width]}]


def _has_proba(predictor: Predictor) -> bool:
    return predictor.task == "binary" or predictor.manifest.objective != "multi:softmax"


def outputs(predictor: Predictor, prediction: Prediction) -> dict[str, tuple[str, np.ndarray]]:
    """Output name -> (datatype, array) for a prediction."""
    values = prediction.values
    if prediction.labels is None:
        return {PREDICT: ("FP32", values)}
    datatype = label_datatype(predictor)
    labels = (
        np.array(prediction.labels, dtype=np.int64)
        if datatype == "INT64"
        else np.array([str(v) for v in prediction.labels], dtype=object)
    )
    found = {PREDICT: (datatype, labels)}
    if predictor.task == "binary":
        found[PROBA] = ("FP32", np.stack([np.float32(1.0) - values, values], axis=1))
    elif values.ndim == 2:
        found[PROBA] = ("FP32", values)
    return found


def encode_response(
    model_name: str,
    version: int | None,
    request: InferRequest,
    produced: dict[str, tuple[str, np.ndarray]],
) -> tuple[bytes, bytes, int | None]:
    """(content type, body, JSON header length or None) of the infer response."""
    names = list(produced) if request.outputs is None else request.outputs
    for name in names:
        if name not in produced:
            raise InputMismatch(
                f"output {name[:80]!r} is not an output of this model ({', '.join(produced)})"
            )
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        datatype, array = produced[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            raw = _to_binary(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    document: dict[str, Any] = {
        "model_name": model_name,
        "model_version": "" if version is None else str(version),
    }
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = described
    header = orjson.dumps(document)
    if not chunks:
        return b"application/json", header, None
    return BINARY_TYPE, b"".join([header, *chunks]), len(header)


def _to_binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            text = str(value).encode()
            parts.append(struct.pack("<I", len(text)) + text)
        return b"".join(parts)
    raw: bytes = np.ascontiguousarray(array, dtype=_NUMERIC[datatype]).tobytes()
    return raw


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
