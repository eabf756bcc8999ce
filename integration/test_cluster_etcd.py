"""A real 3-member etcd cluster: the backend fails over between members, leases survive.

The registrar is given every member (``etcd://h1,h2,h3``) and talks to one at a
time. Killing or freezing that member, or the leader, must not lose the
registration (the lease lives in the cluster), and watchers keep delivering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from integration.event_log import EventLog
from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    Backend,
    BackendUnavailable,
    EventType,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import EtcdCluster, EtcdServer

# A hung member costs a heartbeat interval (TTL / 3) plus the call's TIMEOUT before the
# next member is asked: TTL 5 leaves 2.3 s for that member to answer on a loaded machine
# (with TTL 3 a CI run saw no heartbeat succeed for a whole TTL, and a lease counted lost).
TTL = 5.0
TIMEOUT = 1.0  # per request: how long a hung member can hold a call
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0
ORDERS = ServiceInstance("orders", id="orders-1", address="127.0.0.1", port=8080)
Measured = Callable[[str, float, float], None]


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
async def registrar(cluster: EtcdCluster) -> AsyncIterator[AsyncRegistrar]:
    reg = AsyncRegistrar(open_backend(cluster.url, timeout=TIMEOUT), ORDERS, ttl=TTL, retry=RETRY)
    await reg.start(wait_registered=10)
    yield reg
    await reg.stop(timeout=5)
    await reg.backend.close()


def member_in_use(cluster: EtcdCluster, backend: Backend) -> EtcdServer:
    host, port = backend.host, backend.port  # type: ignore[attr-defined]
    return next(m for m in cluster.members if (m.host, m.client_port) == (host, port))


class Presence:
    """Polls the other members' view of the registration every 50 ms."""

    def __init__(self, cluster: EtcdCluster, skip: EtcdServer) -> None:
        urls = [m.url for m in cluster.members if m is not skip]
        self.backend = open_backend("etcd://" + ",".join(u[7:] for u in urls), timeout=TIMEOUT)
        self.missing_since: float | None = None
        self.gaps: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            try:
                present = ORDERS.id in (await self.backend.list("orders")).instances
            except BackendUnavailable:
                present = True  # no answer is not an absence
            now = time.monotonic()
            if not present and self.missing_since is None:
                self.missing_since = now
            elif present and self.missing_since is not None:
                self.gaps.append(now - self.missing_since)
                self.missing_since = None
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Presence:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self.backend.close()


async def heartbeats_resume(reg: AsyncRegistrar, after: int, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        if reg.counters.heartbeats_ok > after:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    pytest.fail("heartbeats never resumed")


def bound() -> float:
    # The failed call's timeout, a backoff step, and a heartbeat interval.
    return TIMEOUT + RETRY.cap + TTL / 3 + MARGIN


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_the_member_in_use_dies_or_hangs_and_the_registration_survives(
    cluster: EtcdCluster, registrar: AsyncRegistrar, measured: Measured, fault: str
) -> None:
    used = member_in_use(cluster, registrar.backend)
    async with Presence(cluster, used) as presence:
        await asyncio.sleep(0.3)
        beats = registrar.counters.heartbeats_ok
        getattr(used, fault)()
        took = await heartbeats_resume(registrar, beats, bound())
        measured(f"heartbeating again ({fault})", took, bound())
        assert member_in_use(cluster, registrar.backend) is not used
        await asyncio.sleep(TTL)  # well past the TTL: still there
    assert presence.gaps == []
    assert presence.missing_since is None
    assert registrar.counters.lease_losses == 0
    assert registrar.counters.reregistrations == 0
    if fault == "pause":
        used.resume()


async def test_the_leader_dies_registrations_survive_and_watchers_deliver(
    cluster: EtcdCluster, registrar: AsyncRegistrar, measured: Measured
) -> None:
    watched = open_backend(cluster.url, timeout=TIMEOUT)
    other = open_backend(cluster.url, timeout=TIMEOUT)
    try:
        async with EventLog(AsyncWatcher(watched, "orders", retry=RETRY)) as events:
            await events.wait_for((EventType.ADDED, ORDERS.id), 10)
            leader = cluster.leader()
            leader.kill()
            killed = time.monotonic()
            late = ServiceInstance("orders", id="orders-late", address="127.0.0.1", port=8081)
            while True:  # a write needs a new leader: retry until the cluster has one
                try:
                    await other.register(late, ttl=30)
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.05)
            await events.wait_for((EventType.ADDED, late.id), 20)
            took = time.monotonic() - killed
            measured("watch event after leader kill", took, TIMEOUT * 2 + RETRY.cap + MARGIN + 2)
            assert cluster.leader() is not leader
            assert events.of(ORDERS.id) == [EventType.ADDED]
            assert registrar.counters.lease_losses == 0
    finally:
        await watched.close()
        await other.close()


async def test_an_endpoint_list_in_the_agent_config(cluster: EtcdCluster) -> None:
    from registry_agent._agent.config import parse_config

    config = parse_config(
        {"backend": {"url": cluster.url}, "service": [{"name": "orders", "port": 8080}]}, env={}
    )
    backend = open_backend(config.backend.url, **config.backend.options())
    try:
        assert backend.endpoints == tuple(  # type: ignore[attr-defined]
            (m.host, m.client_port) for m in cluster.members
        )
        cluster.members[0].kill()
        await backend.register(ORDERS, ttl=5)  # the first member is dead: the next one answers
    finally:
        await backend.close()
