"""Shared wiring for the reliability tests: the real handlers under in-process moto.

The handlers are loaded from their files (``functions/<name>/app.py``) as Lambda would, each
under its own module name (every function's module is called ``app``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

import pytest

from tests.conftest import BUCKET, ROOT, LambdaContext

MODEL = "default"
_sequencer = itertools.count(0x10000)


def load_handler(function: str) -> ModuleType:
    """``functions/<function>/app.py`` as module ``<function>_app`` (fresh on every call)."""
    name = f"{function}_app"
    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(name, ROOT / "functions" / function / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def set_env(monkeypatch: pytest.MonkeyPatch, **overrides: str) -> None:
    """The environment template.yaml gives the functions, for the test bucket."""
    env = {
        "MODEL_BUCKET": BUCKET,
        "MODEL_NAME": MODEL,
        "MODEL_REFRESH_SECONDS": "0",
        "PROMOTION_MODE": "auto",
        "PROMOTION_TOLERANCE": "0.05",
        "CAPTURE_SAMPLE_RATE": "0",
        "LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def next_sequencer() -> str:
    return f"{next(_sequencer):016X}"


def s3_record(key: str, etag: str, size: int, sequencer: str | None = None) -> dict[str, Any]:
    """One S3 ``ObjectCreated:Put`` notification record, as S3 sends it (key URL-encoded)."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-29T05:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "incoming",
            "bucket": {"name": BUCKET, "arn": f"arn:aws:s3:::{BUCKET}"},
            "object": {
                "key": quote_plus(key, safe="/"),
                "size": size,
                "eTag": etag.strip('"'),
                "sequencer": sequencer or next_sequencer(),
            },
        },
    }


def s3_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def upload(s3: Any, key: str, data: bytes) -> dict[str, Any]:
    """Put an object and return its notification record."""
    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"]
    return s3_record(key, etag, len(data))


def invoke(module: ModuleType, event: dict[str, Any]) -> Any:
    """Invoke a handler as the Lambda runtime does."""
    return module.handler(json.loads(json.dumps(event)), LambdaContext())
