"""The CLI in-process (``treeserve_cli.cli.main``) against moto: output, files uploaded, exit codes.

``publish --wait`` is tested with a fake refresh (a thread that writes the outcome record
through ModelRegistry, as the refresh function does) and once with the real RefreshService.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import BUCKET, TrainedModel
from tests.unit.test_registry_contract import manifest_for
from treeserve.registry.model_registry import ModelRegistry, upload_id
from treeserve.registry.routing import Canary, Routing, Shadow
from treeserve.registry.store import S3RegistryStore
from treeserve_cli import commands
from treeserve_cli.cli import main

pytestmark = pytest.mark.integration

NAME = "churn"


@pytest.fixture
def env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto with the bucket; MODEL_BUCKET set as a user would; fast --wait polling."""
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.delenv("MODEL_NAME", raising=False)
    monkeypatch.setattr(commands, "POLL_SECONDS", 0.02)
    return s3


@pytest.fixture
def registry(env: Any) -> ModelRegistry:
    return ModelRegistry(S3RegistryStore(BUCKET, env), NAME)


@pytest.fixture
def files(tmp_path: Path, binary_model: TrainedModel) -> dict[str, Path]:
    """A real model and its CSVs, as a user has them on disk."""
    model = binary_model.save(tmp_path / "churn-model.ubj")
    header = ",".join(binary_model.feature_names)
    rows = "\n".join(",".join(f"{x:.5f}" for x in row) for row in binary_model.X[:50])
    reference = tmp_path / "reference.csv"
    reference.write_text(f"{header}\n{rows}\n")
    holdout = tmp_path / "holdout.csv"
    labelled = "\n".join(
        ",".join(f"{x:.5f}" for x in row) + f",{int(y)}"
        for row, y in zip(binary_model.X[50:120], binary_model.y[50:120], strict=True)
    )
    holdout.write_text(f"{header},churned\n{labelled}\n")
    return {"model": model, "reference": reference, "holdout": holdout}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def uploaded(s3: Any, name: str = NAME) -> list[dict[str, Any]]:
    return s3.list_objects_v2(Bucket=BUCKET, Prefix=f"incoming/{name}/").get("Contents", [])


def expect_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# --- help ----------------------------------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "publish",
        "status",
        "promote",
        "rollback",
        "alias",
        "route",
        "monitor",
        "invoke",
        "local",
    ):
        assert command in out


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "publish",
            [
                "MODEL",
                "--name",
                "--bucket",
                "--reference",
                "--holdout",
                "--label",
                "--wait",
                "--timeout",
                "exit codes",
                "2 rejected",
                "3 no verdict",
            ],
        ),
        ("status", ["--name", "--bucket", "--json"]),
        ("promote", ["VERSION", "--name", "--bucket"]),
        ("rollback", ["--to", "--name", "--bucket"]),
        ("alias", ["set", "clear", "ALIAS", "VERSION", "--name", "--bucket", "champion"]),
        (
            "route",
            [
                "--canary ALIAS PERCENT",
                "--shadow ALIAS SAMPLE",
                "--off",
                "--name",
                "--bucket",
                "row ids",
                "never rerouted",
                "MODEL_REFRESH_SECONDS",
            ],
        ),
    ],
)
def test_each_command_help_mentions_its_options(
    capsys: pytest.CaptureFixture[str], command: str, options: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in options:
        assert option in out


# --- publish -------------------------------------------------------------------------------------


def test_publish_a_bare_model(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME)
    assert code == 0
    [obj] = uploaded(env)
    assert obj["Key"].startswith(f"incoming/{NAME}/")
    assert obj["Key"].endswith("-churn-model.ubj")
    assert f"uploaded s3://{BUCKET}/{obj['Key']}" in out
    assert f"etag {obj['ETag']}" in out
    assert f"upload id {upload_id(obj['Key'], obj['ETag'])}" in out
    body = env.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    assert body == files["model"].read_bytes()


def test_publish_packs_model_reference_and_holdout(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(
        capsys,
        "publish",
        str(files["model"]),
        "--name",
        NAME,
        "--reference",
        str(files["reference"]),
        "--holdout",
        str(files["holdout"]),
        "--label",
        "churned",
    )
    assert code == 0
    [obj] = uploaded(env)
    assert obj["Key"].endswith("-churn-model.tar.gz")
    data = env.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"model.ubj", "reference.csv", "holdout.csv", "manifest.json"}
        assert all(m.isreg() for m in members.values())

        def read(n: str) -> bytes:
            fh = tar.extractfile(n)
            assert fh is not None
            return fh.read()

        assert read("model.ubj") == files["model"].read_bytes()
        assert read("reference.csv") == files["reference"].read_bytes()
        assert read("holdout.csv") == files["holdout"].read_bytes()
        assert json.loads(read("manifest.json")) == {"label": "churned"}

    # What publish packs is what the refresh function accepts (the real validation).
    from treeserve.model.package import read_upload

    upload = read_upload(data, obj["Key"].rsplit("/", 1)[1])
    assert upload.label == "churned"
    assert upload.feature_names == [f"f{i}" for i in range(6)]


def test_publish_shows_progress_on_stderr(
    env: Any,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commands, "PROGRESS_MIN_BYTES", 0)
    code, out, err = run(capsys, "publish", str(files["model"]), "--name", NAME)
    assert code == 0
    size = files["model"].stat().st_size
    assert "uploading churn-model.ubj" in err
    assert err.strip().splitlines()[-1].endswith("100%")
    assert f"{size / (1 << 20):.1f} MB" in err
    assert "uploading" not in out


@pytest.mark.parametrize(
    ("make", "extra", "needles"),
    [
        (lambda d: d / "missing.ubj", [], ["does not exist"]),
        (lambda d: _write(d / "model.pkl", b"\x80\x04\x95junk"), [], ["pickle", "save_model"]),
        (lambda d: _write(d / "model.ubj", b"\x80\x05\x95junk"), [], ["pickle"]),
        (lambda d: _write(d / "model.bin", b"binf"), [], [".ubj", ".tar.gz"]),
        (lambda d: _write(d / "model.ubj", b""), [], ["empty"]),
        (lambda d: _write(d / "model.tar.gz", b"not gzip"), [], ["tar czf"]),
        (lambda d: d / "churn-model.ubj", ["--holdout", "{holdout}"], ["--label"]),
        (lambda d: d / "churn-model.ubj", ["--label", "y"], ["--holdout"]),
        (
            lambda d: d / "churn-model.ubj",
            ["--holdout", "{holdout}", "--label", "nope"],
            ["'nope'", "churned"],
        ),
        (
            lambda d: d / "churn-model.ubj",
            ["--reference", "{headerless}"],
            ["no header", "feature names"],
        ),
        (lambda d: d / "churn-model.ubj", ["--reference", "{dir}"], ["not a file"]),
        (
            lambda d: _write(d / "pkg.tar.gz", b"\x1f\x8b rest"),
            ["--reference", "{reference}"],
            ["already a package"],
        ),
    ],
)
def test_publish_checks_local_files_first(  # noqa: PLR0917 - pytest fixtures and params
    env: Any,
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Path],
    extra: list[str],
    needles: list[str],
) -> None:
    headerless = _write(tmp_path / "headerless.csv", b"1.0,2.0\n3.0,4.0\n")
    names = {
        "holdout": str(files["holdout"]),
        "reference": str(files["reference"]),
        "headerless": str(headerless),
        "dir": str(tmp_path),
    }
    argv = ["publish", str(make(tmp_path)), "--name", NAME, *(a.format(**names) for a in extra)]
    code, out, err = run(capsys, *argv)
    expect_one_line_error(code, err, *needles)
    assert out == ""
    assert uploaded(env) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- publish --wait ------------------------------------------------------------------------------


def fake_refresh(
    s3: Any, decide: Callable[[ModelRegistry, str, str, str], dict[str, Any] | None]
) -> threading.Thread:
    """Wait for the upload, then record a verdict the way the refresh function does."""

    def work() -> None:
        try:
            watch()
        except Exception as exc:  # shown by the test that failed
            thread.error = exc  # type: ignore[attr-defined]
            raise

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            objs = uploaded(s3)
            if objs:
                key, etag = objs[0]["Key"], objs[0]["ETag"]
                registry = ModelRegistry(S3RegistryStore(BUCKET, s3), NAME)
                uid = upload_id(key, etag)
                outcome = decide(registry, uid, key, etag)
                if outcome is not None:
                    registry.record_outcome(uid, {"upload_id": uid, "key": key, **outcome})
                return
            time.sleep(0.01)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_wait_prints_a_promotion(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_bytes = files["model"].read_bytes()

    def promote(registry: ModelRegistry, uid: str, key: str, etag: str) -> dict[str, Any]:
        version = registry.register(model_bytes, manifest_for(model_bytes, NAME))
        registry.promote(version)
        time.sleep(0.1)  # the CLI is polling meanwhile
        return {"status": "promoted", "version": version, "message": "gate passed"}

    thread = fake_refresh(env, promote)
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert code == 0
    assert "promoted: version 1 of churn is in service" in out
    assert "gate passed" in out


def test_wait_prints_a_registration_awaiting_promotion(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_bytes = files["model"].read_bytes()

    def register(registry: ModelRegistry, uid: str, key: str, etag: str) -> dict[str, Any]:
        version = registry.register(model_bytes, manifest_for(model_bytes, NAME))
        return {"status": "registered", "version": version, "code": "manual", "message": "held"}

    thread = fake_refresh(env, register)
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert code == 0
    assert "registered: version 1 of churn, not promoted (manual)" in out
    assert "treeserve promote 1 --name churn" in out


def test_wait_prints_a_rejection_and_exits_2(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    def reject(registry: ModelRegistry, uid: str, key: str, etag: str) -> dict[str, Any]:
        # As the refresh function does: the rejection record, then the outcome record.
        registry.reject(uid, "manifest_mismatch", "6 vs 7 features", {"key": key})
        return {"status": "rejected", "code": "manifest_mismatch", "message": "6 vs 7 features"}

    thread = fake_refresh(env, reject)
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert code == 2
    [obj] = uploaded(env)
    assert "rejected: manifest_mismatch: 6 vs 7 features" in out
    assert f"kept at s3://{BUCKET}/{obj['Key']}" in out


def test_wait_reads_a_rejection_record_without_an_outcome(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    def reject_only(registry: ModelRegistry, uid: str, key: str, etag: str) -> None:
        registry.reject(uid, "pickle", "pickle content is never loaded", {"key": key})

    thread = fake_refresh(env, reject_only)
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert code == 2
    assert "rejected: pickle: pickle content is never loaded" in out


@pytest.mark.parametrize(
    ("outcome", "exit_code", "line"),
    [
        (
            {"status": "duplicate", "version": 4, "code": "duplicate", "message": "same bytes"},
            0,
            "duplicate: the same model is already version 4 of churn; same bytes",
        ),
        (
            {"status": "ignored", "code": "superseded", "message": "overwritten since"},
            1,
            "ignored: superseded: overwritten since",
        ),
    ],
)
def test_wait_prints_other_verdicts(  # noqa: PLR0917 - pytest fixtures and params
    env: Any,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    outcome: dict[str, Any],
    exit_code: int,
    line: str,
) -> None:
    thread = fake_refresh(env, lambda *_: outcome)
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert code == exit_code
    assert line in out


def test_wait_rides_out_storage_hiccups(
    env: Any,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 failing while --wait polls (throttling, 5xx) is not a verdict: it keeps polling."""
    from tests.reliability.faults import S3Faults, no_backoff

    no_backoff(monkeypatch)
    faults = S3Faults(env)
    faults.add("slowdown", operations={"GetObject"}, key_contains="/uploads/", times=12)
    thread = fake_refresh(
        env, lambda *_: {"status": "promoted", "version": 1, "message": "after the storm"}
    )
    code, out, _ = run(capsys, "publish", str(files["model"]), "--name", NAME, "--wait")
    thread.join(5)
    assert faults.total_injected == 12  # every poll during the storm failed, and was retried
    assert code == 0
    assert "after the storm" in out


def test_wait_gives_up_with_exit_3(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code, out, err = run(
        capsys, "publish", str(files["model"]), "--name", NAME, "--wait", "--timeout", "0.3"
    )
    assert code == 3
    assert 0.3 <= time.monotonic() - started < 5
    assert "uploaded" in out
    assert "no verdict after" in err
    assert "treeserve status --name churn" in err


def test_wait_with_the_real_refresh_function(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end in one process: publish --wait while RefreshService handles the upload."""
    from treeserve.refresh.pipeline import RefreshService
    from treeserve.settings import Settings

    service = RefreshService(Settings(model_bucket=BUCKET), s3=env)

    def refresh(registry: ModelRegistry, uid: str, key: str, etag: str) -> None:
        service.process(BUCKET, key, etag)  # records the outcome itself

    thread = fake_refresh(env, refresh)
    code, out, err = run(
        capsys,
        "publish",
        str(files["model"]),
        "--name",
        NAME,
        "--holdout",
        str(files["holdout"]),
        "--label",
        "churned",
        "--wait",
        "--timeout",
        "60",
    )
    thread.join(10)
    assert code == 0, (out, err, getattr(thread, "error", None))
    assert "promoted: version 1 of churn is in service" in out


# --- status, promote, rollback -------------------------------------------------------------------


@pytest.fixture
def three_versions(registry: ModelRegistry) -> list[bytes]:
    from tests.unit.test_registry_contract import distinct_models

    models = distinct_models(3)
    for i, model in enumerate(models):
        manifest = manifest_for(model, NAME, holdout_metrics={"auc": 0.9 + i / 100})
        manifest.source = {"key": f"incoming/{NAME}/m{i}.ubj"}
        if i == 1:  # versions registered before issue 13 have no footprint
            manifest.footprint = {
                "peak_mb": 14.5,
                "budget_mb": 281.6,
                "inference_load_seconds": 0.03,
            }
        registry.register(model, manifest)
    return models


def test_status_shows_service_versions_and_rejections(
    registry: ModelRegistry, three_versions: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(1)
    registry.promote(2)
    registry.reject(
        "u1", "pickle", "pickle content is never loaded", {"key": f"incoming/{NAME}/evil.pkl"}
    )
    code, out, _ = run(capsys, "status", "--name", NAME)
    assert code == 0
    assert "in service: version 2 (promoted " in out
    assert "previous 1; sha256 " in out
    lines = out.splitlines()
    row = next(line for line in lines if line.strip().startswith("* 2"))
    sha2 = hashlib.sha256(three_versions[1]).hexdigest()
    assert sha2[:12] in row
    assert "binary:logistic" in row
    assert "auc=0.91" in row
    assert "14.5/281.6 MB 0.03 s" in row  # what it costs the inference function
    assert any(line.strip().startswith("3 ") for line in lines)  # listed, not in service
    assert "versions (3)" in out
    assert f"pickle  incoming/{NAME}/evil.pkl" in out
    assert "pickle content is never loaded" in out

    code, out, _ = run(capsys, "status", "--name", NAME, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["current"]["version"] == 2
    assert data["current"]["previous"] == 1
    assert [v["version"] for v in data["versions"]] == [3, 2, 1]
    assert data["versions"][1]["sha256"] == sha2
    assert data["versions"][0]["holdout_metrics"] == {"auc": 0.92}
    assert data["versions"][1]["footprint"]["peak_mb"] == 14.5
    assert data["versions"][0]["footprint"] is None
    assert data["rejections"][0]["code"] == "pickle"


def test_status_of_an_empty_registry_says_what_to_do(
    env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--name", NAME)
    assert code == 0
    assert "in service: none" in out
    assert "treeserve publish MODEL --name churn" in out
    assert "rejections: none" in out


def test_alias_set_and_clear_and_status_of_every_model(
    registry: ModelRegistry, three_versions: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(1)
    other = ModelRegistry(registry.store, "penguins")
    other.register(three_versions[2], manifest_for(three_versions[2], name="penguins"))
    code, out, _ = run(capsys, "alias", "set", "challenger", "3", "--name", NAME)
    assert code == 0
    assert "alias challenger of churn -> version 3" in out
    assert "/models/churn@challenger/predict" in out
    assert registry.alias("challenger").version == 3  # type: ignore[union-attr]
    code, out, _ = run(capsys, "status", "--name", NAME)
    assert code == 0
    lines = out.splitlines()
    assert any(line.split() == ["churn", "1", "3", "challenger=3"] for line in lines), out
    assert any(line.split() == ["penguins", "-", "1", "-"] for line in lines), out
    assert "aliases: challenger -> version 3" in out
    code, out, _ = run(capsys, "status", "--name", NAME, "--json")
    data = json.loads(out)
    assert data["aliases"] == {"challenger": 3}
    assert [m["name"] for m in data["models"]] == ["churn", "penguins"]
    code, _, err = run(capsys, "alias", "set", "champion", "2", "--name", NAME)
    expect_one_line_error(code, err, "champion", "treeserve promote")
    code, _, err = run(capsys, "alias", "set", "challenger", "9", "--name", NAME)
    assert code == 1
    code, out, _ = run(capsys, "alias", "clear", "challenger", "--name", NAME)
    assert code == 0
    assert "cleared" in out
    assert registry.alias("challenger") is None
    code, out, _ = run(capsys, "alias", "clear", "challenger", "--name", NAME)
    assert "was not set" in out


def test_promote_and_rollback_print_the_new_pointer(
    registry: ModelRegistry, three_versions: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "rollback", "--name", NAME)
    expect_one_line_error(code, err, "nothing to roll back", "treeserve promote")

    for version in (1, 2, 3):
        code, out, _ = run(capsys, "promote", str(version), "--name", NAME)
        assert code == 0
        assert f"promoted: version {version} of churn is in service" in out
    assert registry.current().version == 3  # type: ignore[union-attr]

    code, out, _ = run(capsys, "rollback", "--name", NAME)
    assert code == 0
    assert "rolled back: version 2 of churn is in service (previous: 3;" in out
    code, out, _ = run(capsys, "rollback", "--name", NAME)
    assert "rolled back: version 1" in out
    code, _, err = run(capsys, "rollback", "--name", NAME)
    expect_one_line_error(code, err, "rollback --to")
    code, out, _ = run(capsys, "rollback", "--to", "3", "--name", NAME)
    assert code == 0
    assert "rolled back: version 3" in out
    assert registry.current().version == 3  # type: ignore[union-attr]

    code, _, err = run(capsys, "promote", "9", "--name", NAME)
    expect_one_line_error(code, err, "no version 9", "treeserve status")
    code, _, err = run(capsys, "rollback", "--to", "9", "--name", NAME)
    expect_one_line_error(code, err, "no version 9")
    assert registry.current().version == 3  # type: ignore[union-attr]


def test_name_and_bucket_come_from_the_environment(
    env: Any,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_NAME", "fraud")
    code, _, _ = run(capsys, "publish", str(files["model"]))
    assert code == 0
    assert len(uploaded(env, "fraud")) == 1
    code, _, err = run(capsys, "status", "--name", "../etc")
    expect_one_line_error(code, err, "not valid", "--name")


# --- errors users meet ---------------------------------------------------------------------------


def test_no_bucket_configured(
    aws: None, files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv("MODEL_BUCKET", raising=False)
    code, _, err = run(capsys, "status")
    expect_one_line_error(code, err, "MODEL_BUCKET", "--bucket")
    code, _, err = run(capsys, "publish", str(files["model"]))
    expect_one_line_error(code, err, "MODEL_BUCKET")


def test_a_bucket_that_does_not_exist(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["status", "--bucket", "no-such-bucket-here"],
        ["publish", str(files["model"]), "--bucket", "no-such-bucket-here"],
        ["promote", "1", "--bucket", "no-such-bucket-here"],
    ):
        code, _, err = run(capsys, *argv)
        expect_one_line_error(code, err, "'no-such-bucket-here' does not exist", "create it")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def outside_moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No moto: the CLI talks to AWS_ENDPOINT_URL, here a loopback port nobody listens on."""
    from treeserve.aws import reset_clients

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    reset_clients()
    yield
    reset_clients()


def test_an_unreachable_endpoint(outside_moto: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status")
    expect_one_line_error(code, err, "cannot reach S3", "AWS_ENDPOINT_URL")


def test_no_credentials(
    outside_moto: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = run(capsys, "rollback")
    expect_one_line_error(code, err, "no AWS credentials", "aws configure")


def test_the_version_argument_must_be_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["promote", "latest"])
    assert exit_.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_progress_lines_in_a_log_are_few() -> None:
    stream = io.StringIO()
    progress = commands._Progress("m.tar.gz", 10 << 20, stream)
    for _ in range(160):
        progress(64 << 10)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["0%", "25%", "50%", "75%", "100%"]
    assert np.isclose(progress.done, 10 << 20)


def test_progress_on_a_terminal_is_one_live_line() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = commands._Progress("m.tar.gz", 4 << 20, stream)
    for _ in range(64):
        progress(64 << 10)
    text = stream.getvalue()
    assert text.count("\n") == 1  # rewritten in place with \r, one newline at the end
    percents = [int(part.rsplit(" ", 1)[1].rstrip("%\n")) for part in text.split("\r")[1:]]
    assert percents == sorted(set(percents))  # each shown once, only forwards
    assert percents[-1] == 100
    assert text.rstrip().endswith("4.0 MB / 4.0 MB  100%")


def _packed_manifest(env: Any) -> dict[str, Any]:
    [obj] = uploaded(env)
    data = env.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        fh = tar.extractfile("manifest.json")
        assert fh is not None
        manifest: dict[str, Any] = json.loads(fh.read())
    from treeserve.model.package import read_upload

    upload = read_upload(data, obj["Key"].rsplit("/", 1)[1])
    assert upload.to_manifest(NAME).class_names == manifest["class_names"]
    return manifest


def test_publish_class_names_wraps_a_bare_model(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "publish", str(files["model"]), "--name", NAME, "--class-names", "stays, churns"
    )
    assert code == 0, err
    [obj] = uploaded(env)
    assert obj["Key"].endswith("-churn-model.tar.gz")
    assert _packed_manifest(env) == {"class_names": ["stays", "churns"]}


def test_publish_class_names_merges_into_a_packages_manifest(
    env: Any, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "churn.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        tar.add(files["model"], arcname="model.ubj")
        tar.add(files["holdout"], arcname="holdout.csv")
        manifest = json.dumps({"label": "churned", "description": "v2"}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    code, _, err = run(capsys, "publish", str(package), "--name", NAME, "--class-names", "a,b")
    assert code == 0, err
    assert _packed_manifest(env) == {
        "label": "churned",
        "description": "v2",
        "class_names": ["a", "b"],
    }


@pytest.mark.parametrize("names", ["solo", "a,,b", "a,a"])
def test_publish_refuses_unusable_class_names(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str], names: str
) -> None:
    code, _, err = run(capsys, "publish", str(files["model"]), "--class-names", names)
    expect_one_line_error(code, err, "--class-names", "one distinct, non-empty name per class")
    assert uploaded(env) == []


# --- route ---------------------------------------------------------------------------------------


def test_route_sets_each_part_prints_it_and_clears_it(
    registry: ModelRegistry, three_versions: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(1)
    code, out, _ = run(capsys, "route", "--name", NAME)
    assert code == 0
    assert "routing: none" in out
    code, _, err = run(capsys, "route", "--name", NAME, "--canary", "challenger", "30")
    expect_one_line_error(code, err, "challenger", "treeserve alias set challenger VERSION")
    registry.set_alias("challenger", 3)
    registry.set_alias("staging", 2)
    code, out, _ = run(capsys, "route", "--name", NAME, "--canary", "challenger", "30")
    assert code == 0, out
    assert "canary: challenger -> version 3, 30% of unpinned requests" in out
    assert "--off" in out
    assert registry.routing().canary is not None
    code, out, _ = run(capsys, "route", "--name", NAME, "--shadow", "staging", "0.25")
    assert code == 0
    routing = registry.routing()  # the shadow added, the canary kept
    assert routing.canary is not None
    assert routing.canary.to_dict() == {
        "alias": "challenger",
        "percent": 30.0,
    }
    assert routing.shadow is not None
    assert routing.shadow.to_dict() == {
        "alias": "staging",
        "sample": 0.25,
    }
    assert "shadow: staging -> version 2, scores 0.25" in out
    code, out, _ = run(capsys, "route", "--name", NAME, "--canary", "challenger", "5")
    assert registry.routing().canary.percent == 5.0  # type: ignore[union-attr]
    assert "5% of unpinned" in out
    # status shows it, in the table and the JSON
    code, out, _ = run(capsys, "status", "--name", NAME)
    assert "canary: challenger -> version 3, 5% of unpinned requests" in out
    code, out, _ = run(capsys, "status", "--name", NAME, "--json")
    data = json.loads(out)
    assert data["routing"]["canary"] == {"alias": "challenger", "percent": 5.0}
    assert data["routing"]["shadow"] == {"alias": "staging", "sample": 0.25}
    # clear errors
    for argv, needles in (
        (["--canary", "challenger", "0"], ["canary percent", "(0, 100]"]),
        (["--canary", "challenger", "lots"], ["'lots' is not a number"]),
        (["--shadow", "staging", "2"], ["shadow sample", "(0, 1]"]),
        (["--canary", "champion", "10"], ["champion", "challenger"]),
        (["--off", "--canary", "challenger", "10"], ["--off"]),
    ):
        code, _, err = run(capsys, "route", "--name", NAME, *argv)
        expect_one_line_error(code, err, *needles)
    # an alias cleared after the routing named it: shown as such
    registry.clear_alias("staging")
    code, out, _ = run(capsys, "route", "--name", NAME)
    assert "staging (NOT SET: the champion answers instead)" in out
    code, out, _ = run(capsys, "route", "--name", NAME, "--off")
    assert code == 0
    assert "routing: none" in out
    assert not registry.routing().active


def test_rollback_prints_the_routing_it_cleared(
    registry: ModelRegistry, three_versions: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(1)
    registry.promote(2)
    registry.set_alias("challenger", 2)  # the canary names the version in service
    registry.set_alias("staging", 3)
    registry.set_routing(lambda seen: Routing(Canary("challenger", 20.0), Shadow("staging", 0.5)))
    code, out, _ = run(capsys, "rollback", "--name", NAME)
    assert code == 0
    assert "rolled back" in out
    assert "routing cleared: canary challenger (it sent traffic to version 2)" in out
    routing = registry.routing()
    assert routing.canary is None
    assert routing.shadow is not None
    assert routing.shadow.alias == "staging"
    code, out, _ = run(capsys, "status", "--name", NAME)
    assert "shadow: staging -> version 3" in out
    # a rollback that clears nothing says nothing of routing
    registry.promote(2)
    code, out, _ = run(capsys, "rollback", "--name", NAME)
    assert code == 0
    assert "routing cleared" not in out
