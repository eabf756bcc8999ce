"""The backend contract on the in-memory backend."""

import uuid

import pytest

from registry_agent.testing.contract import BackendContract, ServerControl
from registry_agent.testing.memory import MemoryRegistry


class TestMemoryContract(BackendContract):
    ttl = 1.0

    @pytest.fixture
    def server(self) -> ServerControl:
        return MemoryRegistry.named(f"contract-{uuid.uuid4().hex}")
