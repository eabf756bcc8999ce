"""The backend contract on the in-memory backend."""

import uuid

import pytest

from registry_agent.testing.contract import BackendContract, ServerControl, WatcherContract
from registry_agent.testing.memory import MemoryRegistry


class TestMemoryContract(BackendContract):
    ttl = 1.0

    @pytest.fixture
    def server(self) -> ServerControl:
        return MemoryRegistry.named(f"contract-{uuid.uuid4().hex}")


class TestMemoryWatcher(WatcherContract):
    ttl = 1.0

    @pytest.fixture
    def server(self) -> ServerControl:
        return MemoryRegistry.named(f"watch-{uuid.uuid4().hex}")
