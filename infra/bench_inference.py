"""Inference benchmark: the whole handler against XGBoost alone, and cold start.

Warm: ``handler(event, context)`` of functions/inference/app.py with an HTTP API (2.0) event,
for 1 row and 1000 rows x 30 features, against ``Booster.inplace_predict`` on the same model
and rows (what any serving layer must at least spend). Two timings, both alternating the two
so machine noise hits both: "interleaved" (one call each in turn: each runs after the other
evicted its code and data from the CPU caches) and "back-to-back" (alternating blocks of calls,
as a warm function serves requests: the bare ``inplace_predict`` then keeps the trees in cache,
while the handler's parsing evicts them on every request). Per-call medians and their ratio.

The handler is the one request path: the event through Mangum to the FastAPI app, its
middleware stack and routing, the body parsed, predicted, serialised. A third timing, for
context and without a target, sets the handler against XGBoost's C function alone
(``XGBoosterPredictFromDense`` through ``treeserve.model.predictor.DenseCall``, without
``inplace_predict``'s per-call Python work): what the handler costs on top of the model itself.
treeserve predicts through that same call.

The model is published as a user's upload is (``treeserve.model.package.read_upload``: the sandbox,
the manifest with its recorded smoke rows), so the function loads it as in production: through
libxgboost's C API alone, without importing the xgboost package (``treeserve.model.predictor``).

Cold start: a fresh Python process until its first answer. treeserve imports the function
module (FastAPI, Mangum, boto3; reads ``current.json``, the manifest and the model from S3 on a
moto server over HTTP, verifies, loads, checks the recorded smoke rows) and answers one event;
the baseline is a bare FastAPI + Mangum handler that imports xgboost, loads the same model from
a local file and answers the same event. Both run from the inference function's artifact
(``infra.build --platform local``, in ``python -I -S``): what Lambda imports, and nothing the
development venv holds besides (pandas and scikit-learn are installed there for the tests, and
with them ``import xgboost`` imports both). Runs alternate; medians.

Many models (issue 16): the same model published under a second name, a request by name
(``POST /models/other/predict``, the model cache's path) against the default model's short route
(``POST /predict``) in one warm function, alternating; and the first request to a model not in
the cache yet (loaded on first use: pointer, manifest and model read from S3, verified, loaded),
by model size, each size under fresh names (medians).

Open Inference Protocol (issue 17): the same 1000 rows as one binary FP32 tensor (the binary
tensor extension, base64-encoded by API Gateway, every output answered in binary), beside the
JSON case: no JSON numbers to parse either way.

Canary routing (DESIGN.md "Challengers on live traffic"): a second version behind the alias
``challenger`` and a routing.json sending it 30% of requests. The decision itself (the key of
the request's row ids, its blake2b point, the comparison) timed alone against a whole 1-row
request; and the whole 1-row request with the 30% canary against the same requests without
routing (distinct ids cycled, alternating blocks): what routing adds, the canary's own path
(its alias's cache entry, a dimension set of metrics) included.

Targets (medians): 1 row <= 2.0x, 1000 rows <= 1.75x, v2 binary 1000 rows <= 1.3x, cold start
<= 1.0x; a cached model by name <= 1.1x the default model; the canary decision <= 0.02x a
1-row request.
"""

# Heavy modules (moto, xgboost, treeserve) are imported where used: `make bench` imports every
# section module up front.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "functions" / "inference" / "app.py"
BUCKET = "treeserve-bench"
FEATURES = 30
TARGETS = {
    "1 row": 2.0,
    "1000 rows": 1.75,
    "v2 binary 1000 rows": 1.3,
    "cold start": 1.0,
    "by name": 1.1,
    "canary routing decision": 0.02,
}
CANARY_PERCENT = 30.0
CANARY_IDS = 1000
# Trees of the models whose first (uncached) request is timed, and fresh names per size.
FIRST_USE_TREES = (50, 300, 1000)
FIRST_USE_RUNS = 3

_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "POWERTOOLS_SERVICE_NAME": "treeserve-bench",
    "POWERTOOLS_METRICS_NAMESPACE": "TreeserveBench",
    "MODEL_BUCKET": BUCKET,
    "MODEL_NAME": "bench",
    "CAPTURE_SAMPLE_RATE": "0",
}


class Context:
    function_name = "treeserve-bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:treeserve-bench"
    memory_limit_in_mb = 1769
    aws_request_id = "00000000-0000-4000-8000-000000000000"
    log_group_name = "/aws/lambda/treeserve-bench"
    log_stream_name = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def train_model(trees: int, depth: int, seed: int = 0) -> tuple[Any, np.ndarray]:
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(5000, FEATURES))
    signal = X[:, 0] + 0.5 * X[:, 1] * X[:, 2] - 0.25 * X[:, 3] + rng.normal(scale=0.5, size=5000)
    names = [f"f{i}" for i in range(FEATURES)]
    dtrain = xgb.DMatrix(X, label=(signal > 0).astype(float), feature_names=names)
    params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "nthread": 1}
    booster = xgb.train(params, dtrain, num_boost_round=trees)
    booster.set_param({"nthread": 1})
    return booster, np.round(rng.normal(size=(1000, FEATURES)), 4)


def publish(registry: Any, raw: bytes) -> None:
    """Register and promote ``raw`` as a user's upload is: validated in the sandbox, with the
    manifest refresh writes (its recorded smoke rows included)."""
    from treeserve.model.package import read_upload

    upload = read_upload(raw, "model.ubj")
    registry.promote(registry.register(upload.model_ubj, upload.to_manifest(registry.name)))


def v2_event(X32: np.ndarray) -> dict[str, Any]:
    """``POST /v2/models/bench/infer`` with ``X32`` as one binary FP32 tensor, as tritonclient
    sends it (no Content-Type; every output asked in binary) and API Gateway passes it on (the
    body base64-encoded)."""
    raw = X32.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(X32.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    event = http_event(b"", "/v2/models/bench/infer")
    event["headers"] = {
        "host": "bench.execute-api",
        "inference-header-content-length": str(len(header)),
    }
    event["body"] = base64.b64encode(header + raw).decode()
    event["isBase64Encoded"] = True
    return event


def v2_probabilities(response: dict[str, Any]) -> np.ndarray:
    """The positive-class column of a binary v2 answer's ``predict_proba``."""
    body = base64.b64decode(response["body"])
    size = int(response["headers"]["inference-header-content-length"])
    at = size
    for output in orjson.loads(body[:size])["outputs"]:
        n = output["parameters"]["binary_data_size"]
        if output["name"] == "predict_proba":
            return np.frombuffer(body[at : at + n], dtype="<f4").reshape(output["shape"])[:, 1]
        at += n
    raise RuntimeError("no predict_proba in the v2 answer")


def http_event(body: bytes, path: str = "/predict") -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "bench.execute-api"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "bench",
            "domainName": "bench.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "bench",
            "http": {
                "method": "POST",
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "bench",
            },
            "requestId": "bench-request",
            "routeKey": "$default",
            "stage": "$default",
            "time": "29/Nov/2026:04:40:50 +0000",
            "timeEpoch": 1795927250000,
        },
        "body": body.decode(),
        "isBase64Encoded": False,
    }


@contextlib.contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_function() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_inference_app", APP)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {APP}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate(
    a: Callable[[], object], b: Callable[[], object], rounds: int, block: int
) -> tuple[float, float, float, float]:
    """Per-call medians (wall a, wall b, CPU a, CPU b) in seconds, in alternating blocks of
    ``block`` calls. CPU time (this thread's) leaves out the time the OS gave other processes
    on a shared machine; both code paths are single-threaded (XGBoost runs with nthread 1)."""
    wa: list[float] = []
    wb: list[float] = []
    ca: list[float] = []
    cb: list[float] = []
    wall, cpu = time.perf_counter, time.thread_time
    for _ in range(max(1, rounds // block)):
        for fn, w, c in ((a, wa, ca), (b, wb, cb)):
            for _ in range(block):
                w0, c0 = wall(), cpu()
                fn()
                c.append(cpu() - c0)
                w.append(wall() - w0)
    med = statistics.median
    return med(wa), med(wb), med(ca), med(cb)


# --- warm -----------------------------------------------------------------------------------


Timings = list[tuple[str, float, float, float, float]]
FirstUse = list[tuple[int, float, float]]


def bench_warm(
    trees: int, depth: int, rounds: int
) -> tuple[Timings, tuple[tuple[Timings, FirstUse], Timings]]:
    from moto import mock_aws

    from treeserve.aws import reset_clients, s3_client
    from treeserve.model.predictor import DenseCall
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    booster, rows = train_model(trees, depth)
    dense = DenseCall(booster)
    raw = bytes(booster.save_raw("ubj"))
    results = []
    env = {**_ENV, "MODEL_NAME": "bench"}
    env.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    with environment(env), mock_aws():
        reset_clients()
        s3_client().create_bucket(Bucket=BUCKET)
        registry = ModelRegistry(S3RegistryStore(BUCKET), "bench")
        publish(registry, raw)
        module = load_function()
        if not module.service.current().predictor.native:
            raise RuntimeError("the function did not load the model through the C API alone")
        context = Context()
        cases = [
            ("1 row", rows[:1]),
            ("1000 rows", rows),
            ("v2 binary 1000 rows", rows),
            ("1000 rows, 17-digit floats", rows + 1e-9),
        ]
        sink = io.StringIO()
        for label, X in cases:
            X32 = X.astype(np.float32)
            v2 = label.startswith("v2")
            event = v2_event(X32) if v2 else http_event(orjson.dumps({"instances": X.tolist()}))
            response = module.handler(event, context)
            if response["statusCode"] != 200:
                raise RuntimeError(f"handler answered {response['body'][:300]}")
            served = (
                v2_probabilities(response)
                if v2
                else np.asarray(orjson.loads(response["body"])["predictions"], dtype=np.float32)
            )
            if served.tobytes() != booster.inplace_predict(X32).tobytes():
                raise RuntimeError("the handler's predictions differ from inplace_predict")
            n = rounds if len(X) == 1 else max(15, rounds // 40)
            with contextlib.redirect_stdout(sink):  # EMF lines: written, as on Lambda
                for _ in range(min(50, n)):  # warm-up
                    module.handler(event, context)
                    booster.inplace_predict(X32)

                def whole(e: dict[str, Any] = event) -> object:
                    return module.handler(e, context)

                def bare(x: np.ndarray = X32) -> object:
                    return booster.inplace_predict(x)

                def c_call(x: np.ndarray = X32) -> object:
                    return dense(x)

                for mode, block in (("interleaved", 1), ("back-to-back", 50 if len(X) == 1 else 5)):
                    timings = alternate(whole, bare, n, block=block)
                    results.append((f"{label}, {mode}", *timings))
                timings = alternate(whole, c_call, n, block=1)
                results.append((f"{label}, vs C call", *timings))
            sink.seek(0)
            sink.truncate()
        many = bench_models(module, booster, rows, rounds, depth)
        canary = bench_canary(module, registry, rows, rounds, trees=trees, depth=depth)
        reset_clients()
    return results, (many, canary)


def bench_models(
    module: ModuleType, booster: Any, rows: np.ndarray, rounds: int, depth: int
) -> tuple[Timings, FirstUse]:
    """A cached model by name against the default model; the first request to uncached models
    (trees, model MB, median first-request seconds)."""
    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    store = S3RegistryStore(BUCKET)
    publish(ModelRegistry(store, "other"), bytes(booster.save_raw("ubj")))
    context = Context()
    body = orjson.dumps({"instances": rows[:1].tolist()})
    default_event, named_event = http_event(body), http_event(body, "/models/other/predict")
    sink = io.StringIO()
    results = []
    with contextlib.redirect_stdout(sink):
        first = module.handler(named_event, context)
        reference = module.handler(default_event, context)
        if first["statusCode"] != 200 or (
            orjson.loads(first["body"])["predictions"]
            != orjson.loads(reference["body"])["predictions"]
        ):
            raise RuntimeError(f"the model by name answered {first['body'][:300]}")
        for _ in range(50):
            module.handler(named_event, context)
            module.handler(default_event, context)

        def named() -> object:
            return module.handler(named_event, context)

        def default() -> object:
            return module.handler(default_event, context)

        for mode, block in (("interleaved", 1), ("back-to-back", 50)):
            results.append((f"by name, 1 row, {mode}", *alternate(named, default, rounds, block)))
    loads = []
    for trees in FIRST_USE_TREES:
        model, _ = train_model(trees, depth, seed=trees)
        raw = bytes(model.save_raw("ubj"))
        seconds = []
        for run in range(FIRST_USE_RUNS):
            name = f"first-{trees}-{run}"
            publish(ModelRegistry(store, name), raw)
            event = http_event(body, f"/models/{name}/predict")
            with contextlib.redirect_stdout(sink):
                started = time.perf_counter()
                response = module.handler(event, context)
                seconds.append(time.perf_counter() - started)
            if response["statusCode"] != 200:
                raise RuntimeError(f"{name} answered {response['body'][:300]}")
        loads.append((trees, len(raw) / (1 << 20), statistics.median(seconds)))
    return results, loads


def bench_canary(
    module: ModuleType, registry: Any, rows: np.ndarray, rounds: int, *, trees: int, depth: int
) -> Timings:
    """The canary decision alone vs a 1-row request; a 1-row request with a 30% canary vs
    without routing (per-call medians, wall and CPU)."""
    from treeserve.model.package import read_upload
    from treeserve.registry.routing import Canary, Routing, canary_bucket, ids_key

    challenger, _ = train_model(trees, depth, seed=7)
    raw = bytes(challenger.save_raw("ubj"))

    upload = read_upload(raw, "model.ubj")
    version = registry.register(upload.model_ubj, upload.to_manifest(registry.name))
    registry.set_alias("challenger", version)
    registry.set_routing(lambda seen: Routing(Canary("challenger", CANARY_PERCENT)))
    service = module.service
    service.refresh()  # the routing read as a warm function reads it, at its next check
    canary = service.canary
    if canary is None or canary.percent != CANARY_PERCENT:
        raise RuntimeError("the function did not read the routing")
    context = Context()
    row = rows[:1].tolist()
    events = [
        http_event(orjson.dumps({"instances": row, "ids": [f"customer-{i}"]}))
        for i in range(CANARY_IDS)
    ]
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        answered = {
            orjson.loads(module.handler(e, context)["body"])["model"]["alias"] for e in events
        }
    if answered != {"champion", "challenger"}:
        raise RuntimeError(f"the canary did not answer its share: {answered}")
    routed, plain = iter(range(1 << 62)), iter(range(1 << 62))

    def with_canary() -> object:
        service.canary = canary
        return module.handler(events[next(routed) % CANARY_IDS], context)

    def without_routing() -> object:
        service.canary = None
        return module.handler(events[next(plain) % CANARY_IDS], context)

    results = []
    with contextlib.redirect_stdout(sink):
        for _ in range(50):
            with_canary()
            without_routing()
        for mode, block in (("interleaved", 1), ("back-to-back", 50)):
            timings = alternate(with_canary, without_routing, rounds, block)
            results.append((f"{CANARY_PERCENT:g}% canary vs none, 1 row, {mode}", *timings))
        # The decision alone: what an unpinned request of a routed model computes.
        ids = [["customer-42"]]
        loops = 200

        def decide() -> object:
            hit = False
            for _ in range(loops):
                hit = canary_bucket(ids_key(ids[0])) < canary.percent
            return hit

        def request() -> object:
            return without_routing()

        decision, whole, decision_cpu, whole_cpu = alternate(decide, request, rounds, 50)
        results.append(
            (
                "canary routing decision, vs a 1-row request",
                decision / loops,
                whole,
                decision_cpu / loops,
                whole_cpu,
            )
        )
    service.canary = canary
    registry.set_routing(lambda seen: Routing())
    service.refresh()
    return results


# --- cold start -----------------------------------------------------------------------------

TREESERVE_CHILD = """
import sys, time, json
sys.path.insert(0, {artifact!r})
import importlib.util
spec = importlib.util.spec_from_file_location("app", {app!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
event = json.loads(sys.stdin.read())

class Context:
    function_name = "bench"; function_version = "$LATEST"; memory_limit_in_mb = 1769
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    aws_request_id = "cold"; log_group_name = "g"; log_stream_name = "s"
    def get_remaining_time_in_millis(self): return 30000

response = module.handler(event, Context())
if "xgboost" in sys.modules:
    raise SystemExit("the xgboost package was imported on the cold path")
sys.stderr.write("ANSWER " + str(response["statusCode"]) + " " + response["body"][:80] + "\\n")
"""

BARE_CHILD = """
import sys, json
sys.path.insert(0, {artifact!r})
import numpy as np
import orjson
import xgboost as xgb
from fastapi import FastAPI, Request
from fastapi.responses import Response
from mangum import Mangum

booster = xgb.Booster(params={{"nthread": 1}})
booster.load_model({model!r})
app = FastAPI()

@app.post("/predict")
async def predict(request: Request) -> Response:
    rows = orjson.loads(await request.body())["instances"]
    values = booster.inplace_predict(np.asarray(rows, dtype=np.float32))
    return Response(orjson.dumps({{"predictions": values.tolist()}}), media_type="application/json")

handler = Mangum(app, lifespan="off")
event = json.loads(sys.stdin.read())

class Context:
    function_name = "bench"; function_version = "$LATEST"; memory_limit_in_mb = 1769
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    aws_request_id = "cold"; log_group_name = "g"; log_stream_name = "s"
    def get_remaining_time_in_millis(self): return 30000

response = handler(event, Context())
sys.stderr.write("ANSWER " + str(response["statusCode"]) + " " + response["body"][:80] + "\\n")
"""


def _run_child(code: str, env: dict[str, str], event: bytes) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        input=event,
        env=env,
        capture_output=True,
        check=False,
        cwd=str(ROOT),
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or b"ANSWER 200" not in proc.stderr:
        raise RuntimeError(f"cold start child failed: {proc.stderr.decode()[-2000:]}")
    return elapsed


def bench_cold(trees: int, depth: int, runs: int) -> tuple[float, float]:
    import boto3
    from moto.server import ThreadedMotoServer

    from treeserve.registry.model_registry import ModelRegistry
    from treeserve.registry.store import S3RegistryStore

    booster, rows = train_model(trees, depth)
    raw = bytes(booster.save_raw("ubj"))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",  # noqa: S106 -- moto
        )
        s3.create_bucket(Bucket=BUCKET)
        registry = ModelRegistry(S3RegistryStore(BUCKET, s3), "bench")
        publish(registry, raw)
        event = orjson.dumps(http_event(orjson.dumps({"instances": rows[:1].tolist()})))
        with tempfile.TemporaryDirectory() as tmp:
            from infra import build

            artifact = Path(tmp) / "inference"
            build.build("inference", artifact, platform="local")
            local = Path(tmp) / "model.ubj"
            local.write_bytes(raw)
            base_env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("AWS_", "POWERTOOLS_", "MODEL_"))
            }
            tree_env = {**base_env, **_ENV, "AWS_ENDPOINT_URL": endpoint}
            tree_code = TREESERVE_CHILD.format(app=str(artifact / "app.py"), artifact=str(artifact))
            bare_code = BARE_CHILD.format(model=str(local), artifact=str(artifact))
            # one untimed run each: page cache, .pyc files
            _run_child(tree_code, tree_env, event)
            _run_child(bare_code, base_env, event)
            tree_times, bare_times = [], []
            for _ in range(runs):
                tree_times.append(_run_child(tree_code, tree_env, event))
                bare_times.append(_run_child(bare_code, base_env, event))
    finally:
        server.stop()
    return statistics.median(tree_times), statistics.median(bare_times)


def _row(label: str, ours: float, base: float, unit: str, scale: float) -> str:
    ratio = ours / base
    target = None if "C call" in label else TARGETS.get(label.split(",", maxsplit=1)[0])
    verdict = "" if target is None else ("ok" if ratio <= target else "MISSED") + f" (<= {target}x)"
    return (
        f"{label:<48} {ours * scale:>12.{4 if ours * scale < 0.01 else 3}f} "
        f"{base * scale:>12.3f} {unit:<3} "
        f"{ratio:>6.{3 if ratio < 0.1 else 2}f}x  {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_inference", description=__doc__)
    parser.add_argument("--trees", type=int, default=300)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2000, help="1-row iterations")
    parser.add_argument("--cold-runs", type=int, default=7)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args([] if argv is None else argv)  # `make bench` calls main()

    print(
        f"model: binary:logistic, {args.trees} trees, depth {args.depth}, {FEATURES} features; "
        "rows: 4-decimal values unless noted"
    )
    warm, ((by_name, first_use), canary) = bench_warm(args.trees, args.depth, args.rounds)
    cold = None if args.skip_cold else bench_cold(args.trees, args.depth, args.cold_runs)
    print(f"{'case':<48} {'treeserve':>12} {'baseline':>12}     {'ratio':>7}")
    print("warm: whole handler vs Booster.inplace_predict (medians; 'C call' rows: for context)")
    for label, whole, bare, whole_cpu, bare_cpu in warm:
        print(_row(label, whole, bare, "ms", 1e3))
        print(_row(f"{label}, CPU", whole_cpu, bare_cpu, "ms", 1e3))
    print("many models: a cached model by name vs the default model's /predict, one function")
    for label, whole, bare, whole_cpu, bare_cpu in by_name:
        print(_row(label, whole, bare, "ms", 1e3))
        print(_row(f"{label}, CPU", whole_cpu, bare_cpu, "ms", 1e3))
    print(
        f"canary routing: {CANARY_PERCENT:g}% to the alias challenger (another version), "
        f"{CANARY_IDS} distinct ids cycled"
    )
    for label, whole, bare, whole_cpu, bare_cpu in canary:
        print(_row(label, whole, bare, "ms", 1e3))
        print(_row(f"{label}, CPU", whole_cpu, bare_cpu, "ms", 1e3))
    print(f"first request to an uncached model (median of {FIRST_USE_RUNS} fresh names each):")
    for trees, size_mb, seconds in first_use:
        print(f"  {trees:>5} trees, {size_mb:7.2f} MB model: {seconds * 1e3:9.1f} ms")
    if cold is not None:
        print(f"cold start: fresh process -> first answer, {args.cold_runs} alternating runs")
        print(_row("cold start", cold[0], cold[1], "s", 1.0))
        print("  (treeserve reads the model from S3 on a moto server; baseline: local file)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
