"""Fixtures for the inference integration tests: a fresh function module under moto."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import BUCKET, ROOT, TrainedModel
from tests.inference_support import manifest_for
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import S3RegistryStore
from treeserve_cli.invoke import import_handler, module_name

APP_PATH = ROOT / "functions" / "inference" / "app.py"


class FakeClock:
    """A monotonic clock the test moves by hand (starts at the real one: no sleeping)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_function(path: Path = APP_PATH) -> ModuleType:
    """Import the function module afresh: a new execution environment (init runs again)."""
    import_handler(path.parent, f"{path.stem}.handler", fresh=True)  # as treeserve invoke does
    module = sys.modules[module_name(path.parent, path.stem)]
    module.metrics.clear_metrics()  # init's own metrics (the first model swap) are not the test's
    return module


@pytest.fixture(name="registry")
def registry_fixture(s3: Any, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    monkeypatch.setenv("MODEL_BUCKET", BUCKET)
    monkeypatch.setenv("MODEL_NAME", "default")
    monkeypatch.setenv("MODEL_REFRESH_SECONDS", "60")
    monkeypatch.setenv("CAPTURE_SAMPLE_RATE", "0")
    return ModelRegistry(S3RegistryStore(BUCKET), "default")


def publish(
    registry: ModelRegistry, model: TrainedModel, *, promote: bool = True, **manifest: Any
) -> int:
    """Register ``model`` through the real registry (and promote it)."""
    version = registry.register(model.ubj(), manifest_for(model, **manifest))
    if promote:
        registry.promote(version)
    return version


@pytest.fixture(name="function")
def function_fixture(registry: ModelRegistry) -> Iterator[Callable[[], ModuleType]]:
    """A factory: call it after registering models to start an execution environment."""
    loaded: list[ModuleType] = []

    def start() -> ModuleType:
        module = load_function()
        loaded.append(module)
        return module

    yield start
    for module in loaded:
        module.metrics.clear_metrics()
        sys.modules.pop(module.__name__, None)
