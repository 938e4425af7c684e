"""The Open Inference Protocol (v2) on the inference function (issue 17).

Handler tests send HTTP API events as API Gateway does (binary bodies base64-encoded, no
Content-Type); the client tests drive the stock ``tritonclient.http.InferenceServerClient`` and
KServe's ``InferenceRESTClient`` (in its own venv), unchanged, against the local stack's gateway
(LambdaGateway under uvicorn). Three models behind one function: the default (binary, class
names), penguins (3 classes), price (regression).
"""

from __future__ import annotations

import base64
import contextlib
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import BUCKET, ROOT, LambdaContext, TrainedModel, train
from tests.e2e.test_local_stack import free_port
from tests.inference_support import http_api_event, manifest_for, response_body, response_headers
from tests.integration.inference_fixtures import (  # noqa: F401 -- fixtures
    function_fixture,
    registry_fixture,
)
from treeserve import captures
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve_cli.local import LambdaGateway, make_server

pytestmark = pytest.mark.integration

Start = Callable[[], ModuleType]
CLASSES = ["no", "yes"]


@pytest.fixture(scope="module")
def trio() -> dict[str, TrainedModel]:
    return {
        "default": train("binary:logistic", d=6),
        "penguins": train("multi:softprob", d=4, seed=1),
        "price": train("reg:squarederror", d=9, seed=2),
    }


def register(name: str, model: TrainedModel, **manifest: Any) -> int:
    registry = ModelRegistry(S3RegistryStore(BUCKET), name)
    version = registry.register(model.ubj(), manifest_for(model, name=name, **manifest))
    registry.promote(version)
    return version


@pytest.fixture(name="module")
def module_fixture(
    registry: ModelRegistry, function: Start, trio: dict[str, TrainedModel]
) -> ModuleType:
    register("default", trio["default"], class_names=CLASSES)
    register("penguins", trio["penguins"])
    register("price", trio["price"])
    return function()


def own(model: TrainedModel, X: np.ndarray) -> np.ndarray:
    """The model's own prediction of float32 rows."""
    return np.asarray(model.booster.inplace_predict(X.astype(np.float32)))


def rows(model: TrainedModel, n: int = 5) -> np.ndarray:
    return np.ascontiguousarray(model.X[:n], dtype=np.float32)


def binary_request(
    X: np.ndarray, *, outputs: list[dict[str, Any]] | None = None
) -> tuple[bytes, bytes]:
    """A binary-extension request as tritonclient builds it: (JSON header, tensor bytes)."""
    raw = X.tobytes()
    header: dict[str, Any] = {
        "id": "req-1",
        "inputs": [
            {
                "name": "input-0",
                "shape": list(X.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    }
    if outputs is None:
        header["parameters"] = {"binary_data_output": True}
    else:
        header["outputs"] = outputs
    return orjson.dumps(header), raw


def call(
    module: ModuleType,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    event = http_api_event(method, path, body, headers, base64_body=body is not None)
    event["headers"].pop("content-type", None)  # the stock clients send none
    response = module.handler(event, LambdaContext())
    return response["statusCode"], response_headers(response), response_body(response)


def split(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header of a v2 answer and its binary outputs by name."""
    size = headers.get("inference-header-content-length")
    if size is None:
        return orjson.loads(body), {}
    document = orjson.loads(body[: int(size)])
    out, at = {}, int(size)
    for output in document["outputs"]:
        n = (output.get("parameters") or {}).get("binary_data_size")
        if n is not None:
            out[output["name"]] = body[at : at + n]
            at += n
    assert at == len(body)
    return document, out


# --- handler: HTTP API events -----------------------------------------------------------------


def test_binary_fp32_tensor_base64_without_content_type_is_the_models_own(
    module: ModuleType, trio: dict[str, TrainedModel]
) -> None:
    X = rows(trio["default"], 7)
    header, raw = binary_request(X)
    status, headers, body = call(
        module,
        "POST",
        "/v2/models/default/infer",
        header + raw,
        {"inference-header-content-length": str(len(header))},
    )
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-model-version"] == "1"
    document, binary = split(headers, body)
    assert document["id"] == "req-1"
    assert document["model_name"] == "default"
    assert document["model_version"] == "1"
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["predict"]["datatype"] == "BYTES"
    assert outputs["predict_proba"] == {
        "name": "predict_proba",
        "datatype": "FP32",
        "shape": [7, 2],
        "parameters": {"binary_data_size": 7 * 2 * 4},
    }
    proba = np.frombuffer(binary["predict_proba"], dtype="<f4").reshape(7, 2)
    p = own(trio["default"], X)
    assert proba[:, 1].tobytes() == p.tobytes()  # bit for bit
    labels, at, raw_labels = [], 0, binary["predict"]
    while at < len(raw_labels):
        (n,) = struct.unpack_from("<I", raw_labels, at)
        labels.append(raw_labels[at + 4 : at + 4 + n].decode())
        at += 4 + n
    assert labels == [CLASSES[int(v > 0.5)] for v in p]


def test_json_data_flat_and_nested_and_requested_outputs(
    module: ModuleType, trio: dict[str, TrainedModel]
) -> None:
    model = trio["penguins"]
    X = rows(model, 4)
    for data in (X.tolist(), X.reshape(-1).tolist()):
        request = {
            "inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP32", "data": data}],
            "outputs": [{"name": "predict_proba"}],
        }
        status, headers, body = call(
            module, "POST", "/v2/models/penguins/infer", orjson.dumps(request)
        )
        assert status == 200, body
        assert headers["content-type"] == "application/json"
        document = orjson.loads(body)
        assert "id" not in document
        [output] = document["outputs"]
        assert output["name"] == "predict_proba"
        assert output["shape"] == [4, 3]
        got = np.array(output["data"], dtype=np.float32).reshape(4, 3)
        assert got.tobytes() == own(model, X).tobytes()


def test_one_tensor_per_feature_and_regression(
    module: ModuleType, trio: dict[str, TrainedModel]
) -> None:
    model = trio["price"]
    X = rows(model, 3)
    inputs = [
        {"name": name, "shape": [3], "datatype": "FP64", "data": X[:, j].astype(float).tolist()}
        for j, name in enumerate(model.feature_names)
        if j != 4
    ]  # f4 absent: missing
    status, _, body = call(
        module, "POST", "/v2/models/price/infer", orjson.dumps({"id": 7, "inputs": inputs})
    )
    assert status == 200, body
    document = orjson.loads(body)
    assert document["id"] == 7
    [output] = document["outputs"]
    assert output["name"] == "predict"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [3]
    missing = X.copy()
    missing[:, 4] = np.nan
    want = own(model, missing)
    assert np.array(output["data"], dtype=np.float32).tobytes() == want.tobytes()


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "INT64", "BOOL"])
def test_other_datatypes_binary_and_json(
    module: ModuleType, trio: dict[str, TrainedModel], datatype: str
) -> None:
    model = trio["price"]
    dtype = {"FP64": "<f8", "INT32": "<i4", "INT64": "<i8", "BOOL": "?"}[datatype]
    X = (model.X[:4] * 3).astype(dtype)
    want = own(model, X.astype(np.float32))
    raw = X.tobytes()
    tensor = {"name": "x", "shape": [4, 9], "datatype": datatype}
    binary = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
    plain = orjson.dumps({"inputs": [{**tensor, "data": X.tolist()}]})
    for body, headers in (
        (binary + raw, {"inference-header-content-length": str(len(binary))}),
        (plain, None),
    ):
        status, _, answer = call(module, "POST", "/v2/models/price/infer", body, headers)
        assert status == 200, answer
        [output] = orjson.loads(answer)["outputs"]
        assert np.array(output["data"], dtype=np.float32).tobytes() == want.tobytes()


def test_limits_and_values_out_of_range(
    module: ModuleType, trio: dict[str, TrainedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    X = rows(trio["default"], 3)
    X[1, 2] = np.inf
    header, raw = binary_request(X)
    length = {"inference-header-content-length": str(len(header))}
    status, _, body = call(module, "POST", "/v2/models/default/infer", header + raw, length)
    assert status == 422, body
    assert "out of range" in orjson.loads(body)["error"]
    many = np.zeros((module.function.endpoints.max_rows + 1, 6), dtype=np.float32)
    header, raw = binary_request(many)
    length = {"inference-header-content-length": str(len(header))}
    status, _, body = call(module, "POST", "/v2/models/default/infer", header + raw, length)
    assert status == 413, body
    bad = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "f0",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 6},
                }
            ]
        }
    )
    status, _, body = call(
        module,
        "POST",
        "/v2/models/default/infer",
        bad + struct.pack("<I", 9) + b"ab",
        {"inference-header-content-length": str(len(bad))},
    )
    assert status == 400, body


def test_metadata_health_versions(module: ModuleType, trio: dict[str, TrainedModel]) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/price/ready"):
        status, _, body = call(module, "GET", path)
        assert status == 200, (path, body)
    status, _, body = call(module, "GET", "/v2")
    assert status == 200
    assert "binary_tensor_data" in orjson.loads(body)["extensions"]
    status, _, body = call(module, "GET", "/v2/models/penguins/versions/1")
    assert status == 200
    assert orjson.loads(body) == {
        "name": "penguins",
        "versions": ["1"],
        "platform": "xgboost",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [-1]},
            {"name": "predict_proba", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/nope/infer", b'{"inputs": []}', 404),
        ("/v2/models/default/versions/9/infer", b"{}", 404),
        ("/v2/models/default/infer", b"not json", 400),
        ("/v2/models/default/infer", b'{"inputs": []}', 400),
        (
            "/v2/models/default/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", '
            b'"data": [1, 2, 3, 4, 5]}]}',
            422,
        ),
        (
            "/v2/models/default/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", '
            b'"data": [1, 2, 3, 4, 5]}]}',
            422,
        ),
        (
            "/v2/models/default/infer",
            b'{"inputs": [{"name": "zz", "shape": [1], "datatype": "FP32", "data": [1]}, '
            b'{"name": "f0", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            422,
        ),
        (
            "/v2/models/default/infer",
            b'{"inputs": [{"name": "f0", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
            422,
        ),
        (
            "/v2/models/default/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", '
            b'"data": [1, 2, 3, 4, 5, 6]}], "outputs": [{"name": "nope"}]}',
            422,
        ),
    ],
)
def test_errors_are_v2_shaped_with_the_json_apis_codes(
    module: ModuleType, path: str, body: bytes, status: int
) -> None:
    got, headers, raw = call(module, "POST", path, body)
    assert got == status, raw
    assert isinstance(orjson.loads(raw)["error"], str)
    assert "x-model-version" in headers


def test_a_header_length_past_the_body_is_a_400(
    module: ModuleType, trio: dict[str, TrainedModel]
) -> None:
    header, raw = binary_request(rows(trio["default"], 2))
    for length in ("9999", "x", str(len(header) + 3)):
        status, _, body = call(
            module,
            "POST",
            "/v2/models/default/infer",
            header + raw,
            {"inference-header-content-length": length},
        )
        assert status == 400, (length, body)


@pytest.mark.usefixtures("registry")
def test_v2_requests_are_captured_and_measured_like_the_others(
    function: Start,
    trio: dict[str, TrainedModel],
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "1")
    register("default", trio["default"], class_names=CLASSES)
    register("penguins", trio["penguins"])
    module = function()
    capsys.readouterr()
    sent = {}
    for name in ("default", "penguins"):
        X = rows(trio[name], 3)
        header, raw = binary_request(X)
        status, _, body = call(
            module,
            "POST",
            f"/v2/models/{name}/infer",
            header + raw,
            {"inference-header-content-length": str(len(header))},
        )
        assert status == 200, body
        sent[name] = X
    out = capsys.readouterr().out
    emf = [orjson.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    assert [b["PredictedRows"] for b in emf if "PredictedRows" in b] == [[3.0], [3.0]]
    assert all("PredictLatency" in b for b in emf if "PredictedRows" in b)
    for buffer in {
        id(b): b for b in [module.function.capture, *module.function.models.captures()]
    }.values():
        buffer.flush()
    for name, X in sent.items():
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"captures/{name}/")
        [key] = [o["Key"] for o in listed["Contents"]]
        rows_ = captures.decode_capture(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert rows_.model == name
        assert np.array_equal(rows_.inputs, X)
        want = own(trio[name], X)
        got = rows_.outputs[:, 0] if want.ndim == 1 else rows_.outputs
        assert got.tobytes() == want.tobytes()
        assert rows_.versions.tolist() == [1, 1, 1]


# --- the stock client against the local stack --------------------------------------------------


@contextlib.contextmanager
def local_stack(handler: Callable[[Any, Any], Any]) -> Iterator[str]:
    """The local stack's API server (LambdaGateway under uvicorn) around ``handler``."""
    gateway = LambdaGateway(handler, LambdaContext)
    port = free_port()
    server = make_server(gateway, port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the local API server did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        gateway.close()


@pytest.fixture(name="local_url")
def local_url_fixture(module: ModuleType) -> Iterator[str]:
    with local_stack(module.handler) as url:
        yield url


def test_tritonclient_unchanged_against_the_local_stack(
    local_url: str, trio: dict[str, TrainedModel]
) -> None:
    client = triton.InferenceServerClient(local_url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("price")
    assert client.is_model_ready("price", "1")
    assert not client.is_model_ready("nope")
    metadata = client.get_model_metadata("default")
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 6]}]
    assert [o["name"] for o in metadata["outputs"]] == ["predict", "predict_proba"]
    assert client.get_server_metadata()["name"] == "treeserve"

    model = trio["default"]
    X = rows(model, 9)
    for binary in (True, False):
        tensor = triton.InferInput("input-0", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput("predict_proba", binary_data=binary),
            triton.InferRequestedOutput("predict", binary_data=binary),
        ]
        result = client.infer("default", [tensor], outputs=outputs, request_id="abc")
        assert result.get_response()["id"] == "abc"
        proba = result.as_numpy("predict_proba")
        assert proba.dtype == np.float32
        assert proba.shape == (9, 2)
        assert proba[:, 1].tobytes() == own(model, X).tobytes()
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("predict")]
        assert labels == [CLASSES[int(p > 0.5)] for p in own(model, X)]

    # no outputs named: all of them, in binary (the client's default)
    penguins = trio["penguins"]
    X = rows(penguins, 4)
    tensor = triton.InferInput("input-0", [4, 4], "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("penguins", [tensor], model_version="1")
    assert result.as_numpy("predict_proba").tobytes() == own(penguins, X).tobytes()
    assert result.as_numpy("predict").tolist() == np.argmax(own(penguins, X), axis=1).tolist()

    tensor = triton.InferInput("input-0", [4, 4], "FP32")
    tensor.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match=r"takes|shape"):
        client.infer("default", [tensor])
    with pytest.raises(InferenceServerException, match="nope"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("penguins", "7")
    client.close()


def test_a_jwt_bearer_token_reaches_the_api_through_the_clients_headers(
    module: ModuleType, trio: dict[str, TrainedModel]
) -> None:
    """ApiAuth=JWT: the HTTP API's JWT authorizer reads the Authorization header (template.yaml),
    which the stock client sends on every call given ``headers``; the event carries it."""
    template = (ROOT / "template.yaml").read_text()
    assert "identitySource: $request.header.Authorization" in template
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> Any:
        events.append(event)
        return module.handler(event, context)

    auth = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}
    with local_stack(handler) as url:
        client = triton.InferenceServerClient(url)
        assert client.is_server_ready(headers=auth)
        assert client.get_model_metadata("price", headers=auth)["name"] == "price"
        X = rows(trio["price"], 2)
        tensor = triton.InferInput("input-0", [2, 9], "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("price", [tensor], headers=auth)
        assert result.as_numpy("predict").tobytes() == own(trio["price"], X).tobytes()
        client.close()
    assert len(events) == 3
    assert all(e["headers"]["authorization"] == auth["Authorization"] for e in events)


KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


@pytest.mark.skipif(
    not KSERVE_PYTHON.exists(), reason="KServe's client lives in its own venv: make kserve-venv"
)
def test_kserve_rest_client_unchanged_against_the_local_stack(
    local_url: str, trio: dict[str, TrainedModel]
) -> None:
    """KServe's InferenceRESTClient (in a venv of its own) against the same gateway."""
    sent = {"price": rows(trio["price"], 4), "default": rows(trio["default"], 3)}
    proc = subprocess.run(  # our own script, with the venv's python
        [
            str(KSERVE_PYTHON),
            str(Path(__file__).with_name("kserve_client_check.py")),
            f"http://{local_url}",
        ],
        input=orjson.dumps({k: v.tolist() for k, v in sent.items()}),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    found = orjson.loads(proc.stdout.splitlines()[-1])
    assert found["live"] is True
    assert found["ready"] is True
    assert found["missing_ready"] is False
    assert found["price_ready"] is True
    assert "nope" in found["missing_error"]
    assert "404" in found["missing_error"]
    want = own(trio["price"], sent["price"])
    for mode in ("binary", "json"):
        price = found[f"price_{mode}"]
        assert price["id"] == f"price-{mode == 'binary'}"
        assert price["shape"] == [4]
        assert base64.b64decode(price["values"]) == want.tobytes()
        labels = found[f"default_{mode}"]["values"]
        labels = [v.decode() if isinstance(v, bytes) else v for v in labels]
        assert labels == [CLASSES[int(p > 0.5)] for p in own(trio["default"], sent["default"])]
