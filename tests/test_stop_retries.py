"""stop()'s deregistration: what is retried (unavailable, throttled: Retry-After honoured
up to the deadline), what is not (Rejected), the last resort (the entry marked critical)
and the WARNING that says it was not deregistered. The registry is the in-memory one,
its deregister answering a planned list of errors first (the backends' own behaviour
is tested on real servers in integration/test_stop_retries.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from registry_agent import (
    AsyncRegistrar,
    BackendUnavailable,
    HealthStatus,
    Rejected,
    ServiceInstance,
    Throttled,
)
from registry_agent._backend import Lease
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

INSTANCE = ServiceInstance(service="svc", id="svc-1", address="127.0.0.1", port=9)


class Failing(MemoryBackend):
    """A memory backend whose deregister raises ``plan``'s errors first, in order."""

    def __init__(self, plan: list[Exception], *, forever: bool = False) -> None:
        super().__init__(MemoryRegistry())
        self.plan = plan
        self.forever = forever
        self.calls: list[float] = []

    async def deregister(self, lease: Lease) -> None:
        self.calls.append(time.monotonic())
        if self.forever:
            raise self.plan[0]
        if self.plan:
            raise self.plan.pop(0)
        await super().deregister(lease)


def _status(backend: MemoryBackend) -> Any:
    found = backend.registry.snapshot("svc").instances
    return {key: health.status for key, health in found.items()}


async def _started(backend: MemoryBackend) -> AsyncRegistrar:
    registrar = AsyncRegistrar(backend, INSTANCE, ttl=30.0)
    await registrar.start(wait_registered=2.0)
    return registrar


async def test_unavailable_then_throttled_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    backend = Failing([BackendUnavailable("connection refused"), Throttled("503", retry_after=0.3)])
    registrar = await _started(backend)
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="registry_agent"):
        await registrar.stop(timeout=5.0)
    assert _status(backend) == {}
    assert len(backend.calls) == 3
    # The Retry-After (0.3 s, plus up to 10 %) was honoured before the third try.
    assert 0.3 <= backend.calls[2] - backend.calls[1] <= 0.45
    assert time.monotonic() - began < 2.0
    assert not [r for r in caplog.records if "not deregistered" in r.getMessage()]
    assert any(getattr(r, "event", "") == "deregister_retried" for r in caplog.records)
    assert registrar.status()["last_error"] is None


async def test_a_retry_after_beyond_the_deadline_is_cut_to_it() -> None:
    backend = Failing([Throttled("429", retry_after=60.0)])
    registrar = await _started(backend)
    began = time.monotonic()
    await registrar.stop(timeout=1.5)
    took = time.monotonic() - began
    # Retried once more before the deadline (not after 60 s, not never).
    assert len(backend.calls) == 2
    assert _status(backend) == {}
    assert took < 1.5


async def test_rejected_is_not_retried_and_the_entry_is_marked_critical(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Failing([Rejected("permission denied")], forever=True)
    registrar = await _started(backend)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        await registrar.stop(timeout=5.0)
    assert time.monotonic() - began < 1.0
    assert len(backend.calls) == 1
    assert _status(backend) == {"svc-1": HealthStatus.CRITICAL}
    lines = [r for r in caplog.records if "not deregistered" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING]
    assert "permission denied" in lines[0].getMessage()
    assert "marked critical" in lines[0].getMessage()
    assert "permission denied" in (registrar.status()["last_error"] or "")


async def test_down_for_the_whole_stop_returns_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Failing([BackendUnavailable("connection refused")], forever=True)
    registrar = await _started(backend)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        await registrar.stop(timeout=1.0)
    took = time.monotonic() - began
    assert took < 1.2
    assert len(backend.calls) >= 3  # retried with a short backoff meanwhile
    lines = [r for r in caplog.records if "not deregistered" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING]
    # The registry itself answers set_status here: the last resort marked it critical.
    assert _status(backend) == {"svc-1": HealthStatus.CRITICAL}
