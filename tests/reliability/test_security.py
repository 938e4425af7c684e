"""Logs carry no raw payloads: requests with distinctive values and secret-looking strings go
through the inference handler (success, client errors, a server-side failure), at LOG_LEVEL INFO
and DEBUG, and none of those strings appears in anything logged or printed.

Every log handler's stream is redirected for the test (Powertools' JSON handler and any other),
and file descriptors 1/2 are captured too, so the check sees what CloudWatch would.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import BUCKET, TrainedModel
from tests.inference_support import http_api_event, manifest_for
from tests.reliability import stack
from tests.reliability.faults import S3Faults, no_backoff
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

SECRET_VALUE = 987654.125  # a feature value nobody else would log
SECRET_ID = "row-AKIAIOSFODNN7EXAMPLE-ssn-078-05-1120"
SECRET_TOKEN = "sk_live_51HfakeTOKEN9f8e7d6c5b4a"
SECRET_FEATURE = "password_hunter2"
SECRETS = [str(SECRET_VALUE), SECRET_ID, SECRET_TOKEN, SECRET_FEATURE, "hunter2"]


@contextmanager
def all_log_output() -> Iterator[io.StringIO]:
    """Redirect every logging StreamHandler (whenever it was created) into one buffer."""
    sink = io.StringIO()
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler not in (
                h for h, _ in swapped
            ):
                # Not setStream(): it flushes the old stream, which may be a closed capture.
                swapped.append((handler, handler.stream))
                handler.stream = sink
    try:
        yield sink
    finally:
        for handler, stream in swapped:
            handler.stream = stream


def _requests(model: TrainedModel) -> list[tuple[str, bytes | str, dict[str, str]]]:
    row = [SECRET_VALUE, *model.X[0, 1:].tolist()]
    width = len(model.feature_names)
    deep = "[" * 1000 + json.dumps(SECRET_TOKEN) + "]" * 1000
    return [
        ("/predict", json.dumps({"instances": [row], "ids": [SECRET_ID]}), {}),
        ("/explain", json.dumps({"instances": [row], "ids": [SECRET_ID]}), {}),
        ("/predict", ",".join(map(str, row)) + "\n", {"content-type": "text/csv"}),
        ("/predict", json.dumps({"instances": [[SECRET_TOKEN] * width]}), {}),
        ("/predict", json.dumps({"instances": [{SECRET_FEATURE: 1.0}]}), {}),
        ("/predict", '{"instances": [[' + SECRET_TOKEN + "]]}", {}),
        ("/predict", json.dumps({"instances": [row], "ids": [SECRET_ID], "x": SECRET_TOKEN}), {}),
        ("/predict", f"id,{SECRET_FEATURE}\n{SECRET_ID},1\n", {"content-type": "text/csv"}),
        ("/predict", json.dumps({"instances": [row]}), {"content-type": f"text/{SECRET_TOKEN}"}),
        ("/predict", '{"instances": [' + deep.replace('"', '"\\u0041', 1) + "]}", {}),
        ("/predict", json.dumps({"instances": [row]}), {"authorization": f"Bearer {SECRET_TOKEN}"}),
    ]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_logs_carry_no_payloads(
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    binary_model: TrainedModel,
    capfd: pytest.CaptureFixture[str],
    level: str,
) -> None:
    no_backoff(monkeypatch)
    stack.set_env(
        monkeypatch, LOG_LEVEL=level, POWERTOOLS_LOG_LEVEL=level, MODEL_REFRESH_SECONDS="0"
    )
    registry = ModelRegistry(S3RegistryStore(BUCKET), stack.MODEL)
    registry.promote(registry.register(binary_model.ubj(), manifest_for(binary_model)))
    function = stack.load_handler("inference")
    statuses = []
    with all_log_output() as logs:
        for path, body, headers in _requests(binary_model):
            event = http_api_event(
                "POST", path, body, {"content-type": "application/json", **headers}
            )
            statuses.append(stack.invoke(function, event)["statusCode"])
        # A reload failure and a capture failure log too: they must not carry payloads either.
        faults = S3Faults(s3)
        faults.add("internal", operations={"GetObject"})
        event = http_api_event("POST", "/predict", json.dumps({"instances": [[SECRET_VALUE] * 6]}))
        statuses.append(stack.invoke(function, event)["statusCode"])
        faults.detach()
        # Canaries: the capture sees both Powertools' logger and the library's loggers.
        function.logger.info("canary-powertools")
        logging.getLogger("treeserve.serving.api").error("canary-library")
    out, err = capfd.readouterr()
    text = logs.getvalue() + out + err
    assert "canary-powertools" in text
    assert "canary-library" in text
    assert 200 in statuses
    assert any(400 <= s < 500 for s in statuses)
    leaked = [secret for secret in SECRETS if secret in text]
    assert leaked == [], f"logged at {level}: {leaked}"
