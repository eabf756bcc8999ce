"""The requests adapter's bookkeeping without a network: the memory registry."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import registry_agent.requests as adapter_module
from registry_agent import Discovery, HealthStatus, InstanceHealth, ServiceInstance
from registry_agent.requests import DiscoveryAdapter
from registry_agent.testing.memory import MemoryRegistry


def test_pruning_while_other_threads_route_new_services(monkeypatch: pytest.MonkeyPatch) -> None:
    # A break-it run (120 services, 6 threads on one session) saw KeyError from _prune
    # raised out of a call that had its 200: another thread's first call to a new
    # service added to the routing table between the two passes over it.
    monkeypatch.setattr(adapter_module, "_PRUNE_EVERY", 0.0)
    registry = MemoryRegistry.named(f"adapter-{uuid.uuid4().hex}")
    kept = ServiceInstance("s1", address="127.0.0.1", port=8001, id="s1")
    registry.put(InstanceHealth(kept, HealthStatus.PASSING), ttl=600)

    class Racing(Discovery):
        def instances(self, service: str, **kwargs: Any) -> list[ServiceInstance]:
            adapter._routed[("http", "127.0.0.2", 8002)] = "s2"  # a first call elsewhere
            return super().instances(service, **kwargs)

    with Racing(registry.url) as discovery:
        adapter = DiscoveryAdapter(discovery)
        adapter._routed[("http", "127.0.0.1", 8001)] = "s1"
        adapter._routed[("http", "127.0.0.1", 8009)] = "s1"  # no longer listed
        adapter._pruned = 0.0
        adapter._prune()
        assert adapter._routed == {
            ("http", "127.0.0.1", 8001): "s1",
            ("http", "127.0.0.2", 8002): "s2",  # kept for the next look
        }
        adapter.close()
