"""End to end: `treeserve local` started as a user would, driven over real HTTP and the CLI.

One stack per module (started once, in a subprocess, on free ports): predict against the demo
model, publish a better model and see it served, publish a pickle and see it refused while the
champion keeps serving, roll back, run monitoring and read its report, and Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
import xgboost as xgb

from tests.conftest import ROOT
from treeserve import captures
from treeserve_cli import demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

START_TIMEOUT = 90.0  # a cold venv on a busy 2-core machine; typically under 10 s
REFRESH_SECONDS = 1  # MODEL_REFRESH_SECONDS of the stack under test
MONITOR_EVERY = 5  # seconds between scheduled monitoring runs of the stack under test
CAPTURE_AGE_SECONDS = 1  # captured rows are written within about this long, requests or not
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no endpoint, no AWS settings from the test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODEL_"))}
    env.pop("POWERTOOLS_SERVICE_NAME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    log: Path
    api: str
    moto: str
    cli_env: dict[str, str]  # as the banner's `export` line says
    bucket: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "treeserve"), *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def printed(self, marker: str, **paths: str) -> subprocess.CompletedProcess[str]:
        """Run the CLI example of the banner containing ``marker``, as printed (from the project
        folder, with the exported environment); ``paths`` swaps its /tmp paths for test ones."""
        lines = [
            line.strip()
            for line in self.output().split("Use the CLI against this stack", 1)[1].splitlines()
            if marker in line and not line.strip().startswith("export ")
        ]
        assert lines, f"no printed command with {marker!r}:\n{self.output()}"
        command = lines[0].split("#", 1)[0]
        for printed_path, test_path in paths.items():
            assert printed_path in command, command
            command = command.replace(printed_path, test_path)
        return subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.moto,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def exported_env(banner: str) -> dict[str, str]:
    match = re.search(r"^\s*export (.+)$", banner, re.MULTILINE)
    assert match, banner
    return dict(pair.split("=", 1) for pair in shlex.split(match.group(1)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(
        tmp_path_factory,
        "--monitor-every",
        str(MONITOR_EVERY),
        "--env",
        f"MODEL_REFRESH_SECONDS={REFRESH_SECONDS}",
        "--env",
        "CAPTURE_SAMPLE_RATE=1",
        "--env",
        f"CAPTURE_MAX_AGE_SECONDS={CAPTURE_AGE_SECONDS}",
    )


def running_stack(tmp_path_factory: pytest.TempPathFactory, *options: str) -> Iterator[Stack]:
    """``treeserve local OPTIONS`` on free ports, healthy and its banner printed; stopped with
    Ctrl-C afterwards if a test did not stop it."""
    port, moto_port, sfn_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("stack") / "local.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "treeserve_cli.cli",
                "local",
                "--port",
                str(port),
                "--moto-port",
                str(moto_port),
                "--sfn-port",
                str(sfn_port),
                *options,
            ],
            cwd=ROOT,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"treeserve local exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"treeserve local not healthy in {START_TIMEOUT} s:\n{log.read_text()}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        # the banner is printed just before uvicorn starts; wait for it to be complete
        while "Ctrl-C stops everything" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        banner = log.read_text()
        env = {**clean_env(), **exported_env(banner)}
        yield Stack(proc, log, api, f"http://127.0.0.1:{moto_port}", env, env["MODEL_BUCKET"])
    finally:
        if proc.poll() is None:  # a test failed before Ctrl-C: stop it cleanly all the same
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def served_booster(stack: Stack, version: int) -> xgb.Booster:
    key = f"registry/default/versions/{version}/model.ubj"
    raw = stack.s3().get_object(Bucket=stack.bucket, Key=key)["Body"].read()
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def current_version(stack: Stack) -> int:
    raw = stack.s3().get_object(Bucket=stack.bucket, Key="registry/default/current.json")
    return int(json.loads(raw["Body"].read())["version"])


def predict(stack: Stack, rows: list[list[float]]) -> httpx.Response:
    return httpx.post(f"{stack.api}/predict", json={"instances": rows}, timeout=10)


def wait_for_version(stack: Stack, rows: list[list[float]], version: int) -> httpx.Response:
    deadline = time.monotonic() + REFRESH_SECONDS + 15
    while True:
        answer = predict(stack, rows)
        assert answer.status_code == 200, answer.text
        if answer.json()["model"]["version"] == version:
            return answer
        assert time.monotonic() < deadline, f"version {version} not served: {answer.json()}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def holdout() -> np.ndarray:
    _, hold = demo.split(demo.load_dataset())
    return hold.X[:25]


def test_the_demo_model_is_served_with_the_boosters_values(
    stack: Stack, holdout: np.ndarray
) -> None:
    answer = predict(stack, holdout.tolist())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": "default", "version": 1, "alias": "champion"}
    assert answer.headers["x-model-version"] == "1"
    assert current_version(stack) == 1
    expected = served_booster(stack, 1).inplace_predict(holdout)
    np.testing.assert_allclose(body["predictions"], expected, rtol=1e-6, atol=1e-7)
    assert body["labels"] == ["malignant" if p >= 0.5 else "benign" for p in expected]


def test_a_stock_triton_client_is_answered_by_treeserve_local(
    stack: Stack, holdout: np.ndarray
) -> None:
    """tritonclient's InferenceServerClient, unchanged, against the running ``treeserve local``
    (the Open Inference Protocol over the stack's own HTTP port): the demo model's own values."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(stack.api.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("default")
        assert client.is_model_ready("penguins")
        metadata = client.get_model_metadata("default")
        assert metadata["inputs"][0]["shape"] == [-1, holdout.shape[1]]
        X = np.ascontiguousarray(holdout, dtype=np.float32)
        tensor = triton.InferInput("input-0", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=True)
        result = client.infer("default", [tensor])  # every output, in binary
        expected = served_booster(stack, 1).inplace_predict(X)
        assert result.as_numpy("predict_proba")[:, 1].tobytes() == expected.tobytes()
    finally:
        client.close()


def test_the_printed_curl_examples_work_as_printed(stack: Stack) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    commands = [
        line.strip()
        for line in stack.output().splitlines()
        if line.strip().startswith(("curl ", "head "))
    ]
    assert len(commands) >= 4, stack.output()
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command} -w '\\n%{{http_code}}'"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.rstrip().endswith("200"), (command, done.stdout[-500:])


def test_the_walkthroughs_curl_examples_work_as_written(stack: Stack) -> None:
    """docs/local.md's curl commands, with the default port swapped for the stack's."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from tests.e2e.test_local_parts import doc_commands

    commands = [c for c in doc_commands("curl ") + doc_commands("printf ") if "curl " in c]
    assert len(commands) >= 5
    for written in commands:
        assert "http://127.0.0.1:3000/" in written, written
        command = written.replace("http://127.0.0.1:3000", stack.api)
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command} -w '\\n%{{http_code}}'"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.rstrip().endswith("200"), (command, done.stdout[-500:])


def test_a_published_better_model_is_promoted_and_served(
    stack: Stack, holdout: np.ndarray, tmp_path: Path
) -> None:
    # the two commands the stack printed: train a second model, publish it and wait
    v2 = str(tmp_path / "v2")
    done = stack.printed("-m treeserve_cli.demo", **{"/tmp/treeserve-v2": v2})
    assert done.returncode == 0, done.stdout + done.stderr
    done = stack.printed(" publish ", **{"/tmp/treeserve-v2": v2})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "promoted: version 2" in done.stdout, done.stdout
    assert current_version(stack) == 2
    answer = wait_for_version(stack, holdout.tolist(), 2)
    assert answer.headers["x-model-version"] == "2"
    expected = served_booster(stack, 2).inplace_predict(holdout)
    np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=1e-6, atol=1e-7)
    v1 = served_booster(stack, 1).inplace_predict(holdout)
    assert not np.allclose(expected, v1)  # a different model really is being served


def test_a_pickle_is_refused_with_its_reason_and_the_champion_keeps_serving(
    stack: Stack, holdout: np.ndarray, tmp_path: Path
) -> None:
    payload = pickle.dumps({"not": "a model"})
    bare = tmp_path / "model.pkl"
    bare.write_bytes(payload)
    # The CLI refuses a bare pickle before uploading anything ...
    done = stack.cli("publish", str(bare), "--wait")
    assert done.returncode != 0
    assert "pickle" in done.stderr.lower(), done.stderr
    # ... and the refresh function refuses one hidden in a package, keeping it with its reason.
    package = tmp_path / "sneaky.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        info = tarfile.TarInfo("model.ubj")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    done = stack.cli("publish", str(package), "--wait")
    assert done.returncode == 2, done.stdout + done.stderr  # 2: rejected
    assert "rejected: pickle" in done.stdout, done.stdout
    status = stack.printed(" status")  # as printed: the human table
    assert status.returncode == 0, status.stderr
    assert "rejections" in status.stdout, status.stdout
    assert "pickle" in status.stdout, status.stdout
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    rejections = json.loads(status.stdout)["rejections"]
    assert any(r.get("code") == "pickle" for r in rejections), rejections
    assert current_version(stack) == 2
    for _ in range(3):  # across refresh intervals, still the champion
        answer = predict(stack, holdout.tolist())
        assert answer.status_code == 200
        assert answer.json()["model"]["version"] == 2
        time.sleep(REFRESH_SECONDS)


def test_rollback_serves_the_previous_version(stack: Stack, holdout: np.ndarray) -> None:
    done = stack.printed(" rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert current_version(stack) == 1
    answer = wait_for_version(stack, holdout.tolist(), 1)
    expected = served_booster(stack, 1).inplace_predict(holdout)
    np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=1e-6, atol=1e-7)


def captured(stack: Stack) -> dict[str, dict[str, Any]]:
    """Every captured row in the bucket, by row id."""
    s3 = stack.s3()
    found: dict[str, dict[str, Any]] = {}
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix="captures/default/")
    for obj in listed.get("Contents", []):
        rows = captures.decode_capture(
            s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"].read()
        )
        for i, row_id in enumerate(rows.ids):
            found[row_id] = {"version": int(rows.versions[i]), "inputs": rows.inputs[i]}
    return found


def report_keys(stack: Stack) -> list[str]:
    listed = stack.s3().list_objects_v2(Bucket=stack.bucket, Prefix="reports/default/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_the_printed_batch_example_scores_the_demo_rows_on_the_local_state_machine(
    stack: Stack,
) -> None:
    done = stack.printed(" batch submit")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status succeeded" in done.stdout, done.stdout
    status = stack.printed(" batch status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "execution SUCCEEDED" in status.stdout, status.stdout
    listed = stack.s3().list_objects_v2(Bucket=stack.bucket, Prefix="batch/default/demo/output/")
    (output,) = listed["Contents"]
    body = stack.s3().get_object(Bucket=stack.bucket, Key=output["Key"])["Body"].read()
    assert body.decode().splitlines()[0] == "id,prediction,label"


def test_monitoring_runs_on_the_timer_and_on_demand(
    stack: Stack, holdout: np.ndarray, tmp_path: Path
) -> None:
    deadline = time.monotonic() + MONITOR_EVERY * 3 + 10
    while not report_keys(stack):  # the stack's own schedule
        assert time.monotonic() < deadline, "the monitoring timer wrote no report"
        time.sleep(0.5)
    answer = predict(stack, holdout.tolist())  # more traffic, and then no request at all
    assert answer.status_code == 200
    last_ids = set(answer.json()["ids"])
    deadline = time.monotonic() + CAPTURE_AGE_SECONDS + 10
    while not last_ids <= set(captured(stack)):  # written by the age bound alone
        assert time.monotonic() < deadline, "the last request's rows were never captured"
        time.sleep(0.25)
    rows = len(captured(stack))
    before = set(report_keys(stack))
    html = tmp_path / "report.html"
    done = stack.printed(" monitor", **{"/tmp/treeserve-monitor.html": str(html)})
    assert done.returncode == 0, done.stdout + done.stderr
    new = sorted(set(report_keys(stack)) - before)
    assert new, "treeserve monitor wrote no report under reports/default/"
    obj = stack.s3().get_object(Bucket=stack.bucket, Key=new[-1])
    report = json.loads(obj["Body"].read())
    assert report["model"] == "default"
    # every captured row is in the window (CAPTURE_SAMPLE_RATE=1: every predicted row)
    assert report["rows"] >= rows >= 4 * len(holdout), (report["rows"], rows)
    assert {v["version"] for v in report["versions"]} >= {1, 2}
    assert html.read_text().lstrip().lower().startswith("<!doctype html")


def test_a_port_in_use_is_a_clear_error(stack: Stack) -> None:
    taken = stack.api.rsplit(":", 1)[1]
    done = subprocess.run(
        [str(BIN / "treeserve"), "local", "--port", taken, "--moto-port", str(free_port())],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert f"port {taken}" in done.stderr
    assert "--port" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_stops_everything_with_exit_0(stack: Stack) -> None:
    stack.proc.send_signal(signal.SIGINT)
    code = stack.proc.wait(timeout=15)
    assert code == 0, stack.output()[-3000:]
    assert "treeserve local: stopped" in stack.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.api}/health", timeout=2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.moto, timeout=2)
