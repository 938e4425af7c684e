"""What a 503 says depends on why no model is loaded."""

from __future__ import annotations

from typing import Any

import pytest

from treeserve.errors import NoModelInService, StorageUnavailable
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import InMemoryRegistryStore
from treeserve.serving.service import ModelService
from treeserve.settings import Settings


class FailingStore(InMemoryRegistryStore):
    """The in-memory store while S3 is down."""

    def get(self, key: str) -> Any:
        raise StorageUnavailable("SlowDown")

    def get_if_changed(self, key: str, etag: str | None) -> Any:
        raise StorageUnavailable("SlowDown")


def test_nothing_promoted_tells_the_operator_to_publish() -> None:
    service = ModelService(ModelRegistry(InMemoryRegistryStore(), "m"), Settings("b"))
    with pytest.raises(NoModelInService, match="treeserve publish"):
        service.current()


def test_storage_failure_at_cold_start_does_not_send_them_publishing() -> None:
    service = ModelService(ModelRegistry(FailingStore(), "m"), Settings("b"))
    with pytest.raises(NoModelInService, match="could not be loaded yet") as info:
        service.current()
    assert "publish" not in str(info.value)
    assert "SlowDown" not in str(info.value)  # details stay in the logs
