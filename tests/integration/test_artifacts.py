"""Artifacts as the build makes them: each handler imports and answers from its artifact alone.

``infra.build --platform local`` assembles each function's artifact for this interpreter (the
same requirement lists and pruning as the Lambda build, from the installed distributions), then
every handler runs in a clean ``python -I -S -B`` subprocess (no bytecode written: Lambda's
code folder is read-only) whose only import path besides the
standard library is the artifact, against a moto server on loopback: refresh promotes an
uploaded model (its sandbox child included), inference answers /health and /predict, monitoring
runs. The cross-platform Lambda artifacts are built by ``make build`` (sizes in its output).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from infra import build

from tests.conftest import EVENTS, ROOT, train
from treeserve import captures
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.routing import Routing, Shadow
from treeserve.registry.store import S3RegistryStore
from treeserve_cli.invoke import function_environment, runtime_environment
from treeserve_cli.template import Template, load_template

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNNER = textwrap.dedent(
    """
    import json, os, sys
    artifact, event_file, out_file = sys.argv[1:4]
    sys.path.insert(0, artifact)
    assert not [p for p in sys.path if "site-packages" in p], sys.path

    class Context:
        function_name = "treeserve-artifact"
        function_version = "$LATEST"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:treeserve-artifact"
        memory_limit_in_mb = 1024
        aws_request_id = "00000000-0000-4000-8000-000000000001"
        log_group_name = "/aws/lambda/treeserve-artifact"
        log_stream_name = "local"
        def get_remaining_time_in_millis(self):
            return 20000

    import app
    with open(event_file) as fh:
        result = app.handler(json.load(fh), Context())
    foreign = sorted(
        name for name, module in list(sys.modules.items())
        if getattr(module, "__file__", None)
        and "site-packages" in module.__file__
    )
    with open(out_file, "w") as fh:
        json.dump({
            "result": result,
            "foreign_modules": foreign,
            "xgboost": getattr(sys.modules.get("xgboost"), "__file__", None),
            "libxgboost": [
                line.split()[-1] for line in open("/proc/self/maps")
                if "libxgboost" in line
            ][:1] if os.path.exists("/proc/self/maps") else None,
            "pandas": "pandas" in sys.modules,
            "sklearn": "sklearn" in sys.modules,
        }, fh)
    """
)


# Opt-in: run the Lambda artifacts `make build` wrote (CPython 3.12, manylinux) with a Python 3.12
# interpreter of this machine, e.g.
#   make build && TREESERVE_LAMBDA_PYTHON=~/.pyenv/versions/3.12.1/bin/python3.12 \
#     .venv/bin/python -m pytest tests/integration/test_artifacts.py
LAMBDA_PYTHON = os.environ.get("TREESERVE_LAMBDA_PYTHON", "")
LAMBDA_ARTIFACTS = build.DEFAULT_OUT


@dataclass(frozen=True)
class Artifacts:
    python: str
    paths: dict[str, Path]


@pytest.fixture(scope="module", params=["local", "lambda"])
def artifacts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Artifacts]:
    present = [n for n in build.FUNCTIONS if (ROOT / "functions" / n / "app.py").exists()]
    if request.param == "lambda":
        if not LAMBDA_PYTHON:
            pytest.skip("set TREESERVE_LAMBDA_PYTHON to a Python 3.12 to run the Lambda artifacts")
        paths = {n: LAMBDA_ARTIFACTS / n for n in present if (LAMBDA_ARTIFACTS / n).is_dir()}
        if not paths:
            pytest.skip("no Lambda artifacts: run `make build` first")
        yield Artifacts(LAMBDA_PYTHON, paths)
        # Refresh's sandbox child writes bytecode next to the modules (in Lambda the code folder
        # is read-only and nothing is written): leave `make build`'s output as it was.
        for path in paths.values():
            for cache in list(path.rglob("__pycache__")):
                shutil.rmtree(cache, ignore_errors=True)
        return
    root = tmp_path_factory.mktemp("artifacts")
    built = {}
    for name in present:  # a missing handler is reported by the test for that function
        result = build.build(name, root / name, platform="local")
        assert not result.over_budget, (name, result.unzipped)
        built[name] = result.path
    yield Artifacts(sys.executable, built)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(reset).close()  # noqa: S310 - the loopback URL built above
        server.stop()


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str, template: Template) -> Any:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=template.bucket_name())
    return s3


def run_handler(
    python: str,
    artifact: Path,
    logical_id: str,
    event: Any,
    *,
    tmp_path: Path,
    template: Template,
    endpoint: str,
) -> dict[str, Any]:
    fn = template.function(logical_id)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        **runtime_environment(fn, function_environment(fn)),
        "LAMBDA_TASK_ROOT": str(artifact),
        # As in Lambda with `Tracing: Active`: Powertools' Tracer on (the X-Ray SDK and its
        # botocore client load), a trace header, segments sent to a daemon address (UDP, nobody
        # listening here, as harmless as in Lambda without a daemon).
        "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:2000",
        "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    }
    env.pop("AWS_SAM_LOCAL", None)  # not under `sam local`: the real runtime's behaviour
    event_file = tmp_path / f"{logical_id}-event.json"
    event_file.write_text(json.dumps(event))
    out_file = tmp_path / f"{logical_id}-out.json"
    proc = subprocess.run(
        [python, "-I", "-S", "-B", "-c", RUNNER, str(artifact), str(event_file), str(out_file)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(out_file.read_text())
    assert report["foreign_modules"] == []
    assert report["xgboost"] is None or report["xgboost"].startswith(str(artifact))
    assert not report["pandas"]
    assert not report["sklearn"]
    return report


def s3_event(template: Template, s3: Any, key: str) -> Any:
    head = s3.head_object(Bucket=template.bucket_name(), Key=key)
    event = json.loads((EVENTS / "s3-put-incoming.json").read_text())
    event["Records"][0]["s3"]["object"].update(
        {"key": key, "eTag": head["ETag"].strip('"'), "size": head["ContentLength"]}
    )
    return event


def http_event(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


def test_artifacts_hold_what_each_function_needs_and_nothing_forbidden(
    artifacts: Artifacts,
) -> None:
    paths = artifacts.paths
    for name, path in paths.items():
        assert (path / "app.py").is_file()
        assert (path / "treeserve" / "__init__.py").is_file()
        assert not (path / "treeserve" / "data").exists()  # the demo dataset stays home
        assert not list(path.rglob("__pycache__"))
        assert not list(path.rglob("tests"))
        assert not (path / "pandas").exists()
        assert not (path / "sklearn").exists()
        # Every function loads models (monitoring scores challengers): each carries XGBoost.
        assert (path / "xgboost").is_dir(), name
        data = path / "botocore" / "data"
        assert {p.name for p in data.iterdir() if p.is_dir()} <= build.BOTOCORE_SERVICES
        assert (data / "s3").is_dir()
    if "inference" in paths:
        assert (paths["inference"] / "fastapi").is_dir()
        assert (paths["inference"] / "mangum").is_dir()
    if "refresh" in paths:
        assert not (paths["refresh"] / "fastapi").exists()
    if "batch" in paths:  # the serving parser, not the web framework
        assert not (paths["batch"] / "fastapi").exists()
        assert (paths["batch"] / "treeserve" / "serving" / "inputs.py").is_file()


def test_handlers_answer_from_their_artifacts_alone(
    artifacts: Artifacts,
    bucket: Any,
    template: Template,
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    paths, python = artifacts.paths, artifacts.python
    for name in ("inference", "refresh", "batch"):
        assert name in paths, f"functions/{name}/app.py is missing"
    # Each variant (local, lambda) starts from an empty bucket.
    listing = bucket.list_objects_v2(Bucket=template.bucket_name())
    for obj in listing.get("Contents", []):
        bucket.delete_object(Bucket=template.bucket_name(), Key=obj["Key"])

    # No model yet: inference answers 503 from its artifact.
    report = run_handler(
        python,
        paths["inference"],
        "InferenceFunction",
        http_event("apigw-v2-health.json"),
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    assert report["result"]["statusCode"] == 503

    # Refresh, from its artifact, validates (in its sandbox child) and promotes an upload.
    key = "incoming/default/model.ubj"
    bucket.put_object(Bucket=template.bucket_name(), Key=key, Body=train("binary:logistic").ubj())
    report = run_handler(
        python,
        paths["refresh"],
        "RefreshFunction",
        s3_event(template, bucket, key),
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    (outcome,) = report["result"]["outcomes"]
    assert outcome["status"] == "promoted", outcome

    # Inference, cold again, serves it.
    report = run_handler(
        python,
        paths["inference"],
        "InferenceFunction",
        http_event("apigw-v2-predict-rows.json"),
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    assert report["result"]["statusCode"] == 200, report["result"]
    body = json.loads(report["result"]["body"])
    assert len(body["predictions"]) == 2
    # served through libxgboost's C API alone (the package is not imported on this path), the
    # library being the artifact's own
    assert report["xgboost"] is None
    if report["libxgboost"] is not None:  # /proc/self/maps: Linux
        (library,) = report["libxgboost"]
        assert library.startswith(str(paths["inference"])), library

    # Batch, from its artifact, scores an object of a Distributed Map batch with that model.

    pointer = ModelRegistry(S3RegistryStore(template.bucket_name(), bucket), "default").current()
    assert pointer is not None
    event = json.loads((EVENTS / "batch-map-items.json").read_text())
    event["Items"] = event["Items"][:1]
    rows = b"f0,f1,f2,f3,f4,f5\n0.1,0.2,0.3,0.4,0.5,0.6\n"
    bucket.put_object(Bucket=template.bucket_name(), Key=event["Items"][0]["Key"], Body=rows)
    head = bucket.head_object(Bucket=template.bucket_name(), Key=event["Items"][0]["Key"])
    event["Items"][0].update({"Etag": head["ETag"], "Size": head["ContentLength"]})
    event["BatchInput"]["job"].update({"version": pointer.version, "sha256": pointer.sha256})
    report = run_handler(
        python,
        paths["batch"],
        "BatchFunction",
        event,
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    (scored,) = report["result"]["objects"]
    assert scored["status"] == "scored", scored
    assert scored["rows"] == 1

    if "monitoring" not in paths:
        pytest.skip("functions/monitoring/app.py is not written yet")
    # A second version goes in service; the first becomes a shadow challenger of captured
    # champion rows, which monitoring scores from its artifact (XGBoost in it).
    key = "incoming/default/model2.ubj"
    bucket.put_object(
        Bucket=template.bucket_name(), Key=key, Body=train("binary:logistic", rounds=4).ubj()
    )
    report = run_handler(
        python,
        paths["refresh"],
        "RefreshFunction",
        s3_event(template, bucket, key),
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    (outcome,) = report["result"]["outcomes"]
    assert (outcome["status"], outcome["version"]) == ("promoted", 2), outcome
    registry = ModelRegistry(S3RegistryStore(template.bucket_name(), s3=bucket), "default")
    registry.set_alias("challenger", 1)
    registry.set_routing(lambda _seen: Routing(shadow=Shadow("challenger", 1.0)))
    X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    now = time.time() - 60
    bucket.put_object(
        Bucket=template.bucket_name(),
        Key=captures.object_key("default", now),
        Body=captures.encode_capture(
            captures.CaptureRows(
                model="default",
                ids=[f"r{i}" for i in range(40)],
                ts_ms=np.full(40, int(now * 1000), np.int64),
                versions=np.full(40, 2, np.int64),
                inputs=X,
                outputs=np.full((40, 1), 0.5, np.float32),
                aliases=["champion"] * 40,
            )
        ),
    )
    report = run_handler(
        python,
        paths["monitoring"],
        "MonitoringFunction",
        json.loads((EVENTS / "monitoring-scheduled.json").read_text()),
        tmp_path=tmp_path,
        template=template,
        endpoint=moto_endpoint,
    )
    result = report["result"]
    assert isinstance(result, dict)
    assert [(c["alias"], c["version"]) for c in result["challengers"]] == [("challenger", 1)]
    stored = json.loads(
        bucket.get_object(Bucket=template.bucket_name(), Key=result["report_key"])["Body"].read()
    )
    (entry,) = stored["challenger"]["challengers"]
    assert entry["rows"]["shadow"] == 40
    assert entry["agreement"]["rows"] == 40


SHELL_ONLY = {"yaml", "moto", "uvicorn", "treeserve_cli"}


def _imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_artifact_code_imports_no_shell_tool(artifacts: Artifacts) -> None:
    """Our code in every artifact (the handler and the treeserve package) imports none of the
    shell tools or what only they need; the tools' package is not there at all; and the
    artifact holds exactly the treeserve subpackages its handler reaches by import."""
    for name, path in artifacts.paths.items():
        files = [path / "app.py", *(path / "treeserve").rglob("*.py")]
        assert len(files) > 10, name
        for file in files:
            imported = _imports(file.read_text())
            bad = {i for i in imported if i in SHELL_ONLY or i.split(".")[0] in SHELL_ONLY}
            assert not bad, (name, file.relative_to(path), sorted(bad))
        assert not (path / "treeserve_cli").exists(), name
        assert not list((path / "treeserve").rglob("*.csv")), (
            name
        )  # the demo data stays with the shell tools
        # The import closure from the handler, over treeserve's own modules.
        seen: set[Path] = set()
        todo = [path / "app.py"]
        while todo:
            file = todo.pop()
            if file in seen:
                continue
            seen.add(file)
            for dotted in _imports(file.read_text()):
                if dotted.split(".")[0] == "treeserve":
                    found = _module_file(path, dotted)
                    if found is not None:
                        todo.append(found)
                    elif "." in dotted:  # from treeserve.x import name: the module is x
                        parent = _module_file(path, dotted.rsplit(".", 1)[0])
                        assert parent is not None, (name, file.relative_to(path), dotted)
        package = path / "treeserve"
        reached = {f.relative_to(package).parts[0] for f in seen if f.is_relative_to(package)}
        held = {
            p.name for p in (path / "treeserve").iterdir() if p.is_dir() and p.name != "__pycache__"
        }
        assert held == {r for r in reached if not r.endswith(".py")}, (name, held, reached)
        assert held == set(build.SUBPACKAGES[name]), name


def test_build_fails_over_budget_and_with_forbidden_distributions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        build.FUNCTIONS, "refresh", build.FunctionSpec(build.FUNCTIONS["refresh"].requirements, 1)
    )
    code = build.main(["--function", "refresh", "--platform", "local", "--out", str(tmp_path)])
    assert code == 1
    out, err = capsys.readouterr()
    assert "over its 1 MB budget" in err
    assert "refresh" in out  # the size table
    (tmp_path / "pandas").mkdir()
    with pytest.raises(SystemExit, match="forbidden"):
        build.check_forbidden(tmp_path)
    # A folder that is not an artifact is never cleared (a mistyped --out).
    precious = tmp_path / "elsewhere"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="refusing to clear"):
        build.build("refresh", precious, platform="local")
    assert (precious / "notes.txt").read_text() == "keep me"
