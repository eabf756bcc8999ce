"""The blocking Registrar changes its registries while running, like AsyncRegistrar."""

from __future__ import annotations

import time
import uuid

from registry_agent import Registrar, ServiceInstance
from registry_agent.testing.memory import MemoryRegistry

INSTANCE = ServiceInstance("orders", address="10.0.0.5", port=8080)


def holds(registry: MemoryRegistry) -> bool:
    return INSTANCE.id in registry.snapshot(INSTANCE.service).instances


def until(condition: object, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.02)
    return False


def test_set_backends_keeps_adds_and_drops() -> None:
    a, b, c = (MemoryRegistry.named(f"blk-{uuid.uuid4().hex}") for _ in range(3))
    registrar = Registrar([a.url, b.url], INSTANCE, ttl=2).start(wait_registered=5)
    try:
        assert holds(a)
        assert holds(b)
        kept = registrar.status()["backends"][0]["counters"]["registrations"]
        registrar.set_backends([a.url, c.url])
        assert until(lambda: holds(c))
        assert not holds(b)  # dropped: deregistered within the call
        assert holds(a)
        status = registrar.status()
        assert status["backends"][0]["counters"]["registrations"] == kept  # not touched
        assert [s["name"] for s in status["backends"]] == [a.url, c.url]
    finally:
        registrar.stop()
    assert not holds(a)
    assert not holds(c)
