"""KServe's ``InferenceRESTClient``, unchanged, against a treeserve URL (run in a venv of its own:
kserve pins its own fastapi, pandas, grpcio and kubernetes; ``make kserve-venv``).

Usage: ``python kserve_client_check.py BASE_URL`` with ``{"model": [[row], ...], ...}`` on stdin;
prints what the client answered, float32 outputs as base64 of their bytes (compared bit for bit
by ``tests/integration/test_open_inference.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def check(url: str, rows: dict[str, list[list[float]]]) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    found: dict[str, Any] = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "missing_ready": await client.is_model_ready(url, "nope"),
    }
    for name, values in rows.items():
        X = np.asarray(values, dtype=np.float32)
        found[f"{name}_ready"] = await client.is_model_ready(url, name)
        for binary in (True, False):
            tensor = InferInput("input-0", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            outputs = [RequestedOutput("predict", parameters={"binary_data": binary})]
            request = InferRequest(
                name, [tensor], request_id=f"{name}-{binary}", request_outputs=outputs
            )
            response = await client.infer(url, request, model_name=name)
            [output] = response.outputs
            values_out = np.asarray(output.as_numpy())
            found[f"{name}_{'binary' if binary else 'json'}"] = {
                "id": response.id,
                "shape": list(values_out.shape),
                "datatype": output.datatype,
                "values": base64.b64encode(values_out.astype(np.float32).tobytes()).decode()
                if output.datatype == "FP32"
                else values_out.tolist(),
            }
    try:
        await client.infer(url, InferRequest("nope", [tensor]), model_name="nope")
    except Exception as exc:  # httpx.HTTPStatusError, with the server's error message
        found["missing_error"] = str(exc)
    await client.close()
    return found


if __name__ == "__main__":
    sys.stdout.write(
        json.dumps(asyncio.run(check(sys.argv[1], json.loads(sys.stdin.read())))) + "\n"
    )
