"""Issue 13, rows 8 and 9: a broken ``current.json`` through the real handlers.

Row 8: the pointer overwritten with garbage. Row 9: the pointer naming a version that does not
exist. In both, warm inference keeps serving what it loaded, ``/health`` and ``treeserve status``
say the pointer is broken and how to repair it, and the next good upload gets an outcome (no
exception, no retry, no dead letter): the newest upload replaces the broken pointer by
compare-and-swap, as ``treeserve promote`` does; an older one waits as ``stale`` and says why.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import BUCKET, TrainedModel, train
from tests.corpus import make_package
from tests.inference_support import http_api_event
from tests.reliability import stack
from treeserve.registry.model_registry import ModelRegistry, Pointer, PointerUnreadable
from treeserve.registry.store import S3RegistryStore
from treeserve_cli.cli import main

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

GARBAGE = b"\x00{ not a pointer"


def _registry() -> ModelRegistry:
    return ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)


@pytest.fixture
def served(s3: Any, binary_model: TrainedModel, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Version 1 promoted by the refresh handler and loaded by a warm inference handler."""
    stack.set_env(monkeypatch)
    refresh = stack.load_handler("refresh")
    record = stack.upload(s3, "incoming/default/v1.tar.gz", make_package(binary_model))
    assert stack.invoke(refresh, stack.s3_event(record))["outcomes"][0]["status"] == "promoted"
    inference = stack.load_handler("inference")
    assert _get(inference, "/health")[0] == 200
    return refresh, inference


def _get(inference: Any, path: str) -> tuple[int, dict[str, Any]]:
    answer = stack.invoke(inference, http_api_event("GET", path))
    return answer["statusCode"], json.loads(answer["body"])


def _predict(inference: Any, model: TrainedModel) -> tuple[int, str]:
    body = json.dumps({"instances": model.X[:3].tolist()})
    answer = stack.invoke(
        inference, http_api_event("POST", "/predict", body, {"content-type": "application/json"})
    )
    headers = {k.lower(): v for k, v in answer.get("headers", {}).items()}
    return answer["statusCode"], headers.get("x-model-version", "")


def _status(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["status", "--name", stack.MODEL, "--bucket", BUCKET, *extra]) == 0
    out, _ = capsys.readouterr()
    return out


def _point_at_missing_version(s3: Any, version: int = 99) -> None:
    pointer = _registry().current()
    assert pointer is not None
    broken = Pointer(version, pointer.sha256, pointer.promoted_at, pointer.version)
    s3.put_object(Bucket=BUCKET, Key=_registry().current_key, Body=broken.to_json())


def test_current_and_the_compare_and_swap_read_a_garbage_pointer_alike(
    served: Any, s3: Any
) -> None:
    registry = _registry()
    put = s3.put_object(Bucket=BUCKET, Key=registry.current_key, Body=GARBAGE)
    with pytest.raises(PointerUnreadable) as info:
        registry.current()
    assert info.value.etag == put["ETag"]  # what a promotion swaps against
    assert f"treeserve promote VERSION --name {stack.MODEL}" in str(info.value)
    with pytest.raises(PointerUnreadable):
        registry.current_if_changed(None)
    assert registry._read_pointer() == (None, put["ETag"])


def test_row8_a_garbage_pointer_then_a_good_upload(
    served: Any, s3: Any, binary_model: TrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    refresh, inference = served
    registry = _registry()
    s3.put_object(Bucket=BUCKET, Key=registry.current_key, Body=GARBAGE)

    # Warm inference keeps serving version 1 and says the pointer is broken.
    assert _predict(inference, binary_model) == (200, "1")
    status, health = _get(inference, "/health")
    assert status == 200
    assert health["status"] == "degraded"
    assert "not a valid pointer" in health["problem"]
    assert "treeserve promote VERSION --name default" in health["problem"]
    assert "still serves version 1" in health["problem"]
    # A new environment has nothing to load: 503 that names the problem.
    cold = stack.load_handler("inference")
    status, body = _get(cold, "/health")
    assert status == 503
    assert body["error"]["type"] == "broken_pointer"

    out = _status(capsys)
    assert "in service: BROKEN POINTER" in out
    assert "`treeserve promote 1 --name default`" in out
    data = json.loads(_status(capsys, "--json"))
    assert data["current"] is None
    assert "not a valid pointer" in data["pointer_problem"]

    # The next good upload is decided (no exception for Lambda to retry): it replaces the
    # garbage by compare-and-swap and is served.
    newer = train("binary:logistic", seed=5, shift=0.1)
    record = stack.upload(s3, "incoming/default/v2.tar.gz", make_package(newer))
    (outcome,) = stack.invoke(refresh, stack.s3_event(record))["outcomes"]
    assert (outcome["status"], outcome["version"]) == ("promoted", 2), outcome
    assert "replacing a broken pointer" in outcome["message"]
    assert "not a valid pointer" in outcome["message"]
    pointer = registry.current()
    assert pointer is not None
    assert pointer.version == 2
    assert _predict(inference, newer) == (200, "2")
    status, health = _get(inference, "/health")
    assert (status, health["status"]) == (200, "ok")
    assert "problem" not in health
    assert "BROKEN" not in _status(capsys)


def test_row9_a_pointer_naming_a_missing_version(
    served: Any, s3: Any, binary_model: TrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    refresh, inference = served
    _point_at_missing_version(s3, 99)

    assert _predict(inference, binary_model) == (200, "1")
    status, health = _get(inference, "/health")
    assert (status, health["status"]) == (200, "degraded")
    assert "names version 99, which does not exist" in health["problem"]
    assert "treeserve promote VERSION --name default" in health["problem"]

    out = _status(capsys)
    assert "in service: BROKEN POINTER: current.json names version 99, which does not exist" in out
    assert "`treeserve promote 1 --name default`" in out

    # The next upload says the truth: version 99 is not in service, it does not exist.
    newer = train("binary:logistic", seed=6, shift=0.1)
    record = stack.upload(s3, "incoming/default/v2.tar.gz", make_package(newer))
    (outcome,) = stack.invoke(refresh, stack.s3_event(record))["outcomes"]
    assert (outcome["status"], outcome["version"]) == ("promoted", 2), outcome
    assert "version 99 is in service" not in outcome["message"]
    assert "names version 99, which does not exist" in outcome["message"]
    assert _predict(inference, newer) == (200, "2")
    assert _get(inference, "/health")[1]["status"] == "ok"


def test_an_older_upload_waits_over_a_broken_pointer_and_says_why(
    served: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the newest registered version replaces a broken pointer automatically.

    Version 2 is registered, then its delivery stops before recording an outcome (a crash);
    version 3 is registered; the pointer breaks; the retried delivery of version 2 waits."""
    registry = _registry()
    stack.set_env(monkeypatch, PROMOTION_MODE="manual")
    manual = stack.load_handler("refresh")
    early = stack.upload(
        s3, "incoming/default/early.tar.gz", make_package(train("binary:logistic", seed=7))
    )
    late = stack.upload(
        s3, "incoming/default/late.tar.gz", make_package(train("binary:logistic", seed=8))
    )
    (first,) = stack.invoke(manual, stack.s3_event(early))["outcomes"]
    (second,) = stack.invoke(manual, stack.s3_event(late))["outcomes"]
    assert (first["version"], second["version"]) == (2, 3)
    s3.delete_object(Bucket=BUCKET, Key=registry.outcome_key(first["upload_id"]))
    s3.put_object(Bucket=BUCKET, Key=registry.current_key, Body=GARBAGE)

    stack.set_env(monkeypatch, PROMOTION_MODE="auto")
    auto = stack.load_handler("refresh")
    (retried,) = stack.invoke(auto, stack.s3_event(early))["outcomes"]
    assert (retried["status"], retried["code"], retried["version"]) == ("registered", "stale", 2)
    assert "not a valid pointer" in retried["message"]
    assert "version 3 was registered after this upload" in retried["message"]
    with pytest.raises(PointerUnreadable):
        registry.current()  # left for the operator: `treeserve promote VERSION`
