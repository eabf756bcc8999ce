"""One connection watch per backend, however many registrars follow it."""

from __future__ import annotations

import asyncio

from registry_agent import AsyncRegistrar, ServiceInstance
from registry_agent._connection import _watches, follow_connection
from registry_agent._probe import ConnectionAware
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry


class ProbedBackend(MemoryBackend):
    """A memory backend whose connection 'changes' when the test says so."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.waiting = 0
        self.most_waiting = 0
        self.change = asyncio.Event()

    async def wait_connection_change(self) -> None:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.change.wait()
            self.change.clear()
        finally:
            self.waiting -= 1


async def test_many_registrars_share_one_wait_and_all_hear_the_change() -> None:
    backend = ProbedBackend(MemoryRegistry())
    assert isinstance(backend, ConnectionAware)
    registrars = [
        AsyncRegistrar(backend, ServiceInstance("orders", address="127.0.0.1", port=p))
        for p in range(9000, 9050)
    ]
    for registrar in registrars:
        await registrar.start(wait_registered=5)
    await asyncio.sleep(0.05)
    assert backend.waiting == 1
    heard: list[int] = []
    unfollow = follow_connection(backend, lambda: heard.append(1))
    backend.change.set()
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard == [1]
    # every registrar read its entry back on the change (a lease of its own)
    assert all(r.status()["counters"]["verifications"] >= 1 for r in registrars)
    unfollow()
    for registrar in registrars:
        await registrar.stop()
    await asyncio.sleep(0.05)
    assert backend.most_waiting == 1
    assert backend.waiting == 0  # the watch ended with its last follower
    assert not [w for w in _watches.values() if w.backend is backend]


async def test_a_failing_probe_is_retried_and_a_raising_follower_harms_no_one() -> None:
    calls = 0

    class Flaky:
        async def wait_connection_change(self) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError("probe down")
            await asyncio.sleep(0.01)

    heard: list[int] = []

    def broken() -> None:
        raise RuntimeError("a hostile follower")

    flaky = Flaky()
    stop_broken = follow_connection(flaky, broken)
    stop_heard = follow_connection(flaky, lambda: heard.append(1))
    for _ in range(300):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard  # after the failed wait (retried a second later) and past the broken follower
    stop_broken()
    stop_heard()
