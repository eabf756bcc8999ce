"""Consul as in production: 3 servers and a client agent that the registrar talks to.

Client agent restarted with its data (services come back from the agent's own
state: no re-registration, no flap), restarted empty (re-registered), and the
server leader killed (registrations survive; watchers deliver after re-election).
"""

from __future__ import annotations

import asyncio
import itertools
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
    HealthStatus,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulCluster

TTL = 3.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0
ORDERS = ServiceInstance("orders", id="orders-1", address="127.0.0.1", port=8080)
Measured = Callable[[str, float, float], None]


@pytest.fixture
def cluster() -> Iterator[ConsulCluster]:
    # leave_on_terminate = false on the client, as for any agent restarted in place:
    # a graceful leave would drop its services from the catalog until it rejoins.
    with ConsulCluster(3, client_leave_on_terminate=False) as cluster:
        yield cluster


@pytest.fixture
async def registrar(cluster: ConsulCluster) -> AsyncIterator[AsyncRegistrar]:
    reg = AsyncRegistrar(open_backend(cluster.url, timeout=1), ORDERS, ttl=TTL, retry=RETRY)
    await reg.start(wait_registered=10)
    yield reg
    await reg.stop(timeout=5)
    await reg.backend.close()


@pytest.fixture
async def events(cluster: ConsulCluster) -> AsyncIterator[EventLog]:
    """What a discovery client on another host sees (through a server agent)."""
    backend = open_backend(cluster.servers[1].url, timeout=1, wait="5s")
    async with EventLog(AsyncWatcher(backend, "orders", retry=RETRY)) as log:
        yield log
    await backend.close()


async def status_via(backend: Backend, instance: ServiceInstance) -> HealthStatus | None:
    try:
        health = (await backend.list(instance.service)).instances.get(instance.id)
    except BackendUnavailable:
        return None
    return None if health is None else health.status


async def until_passing(backend: Backend, instance: ServiceInstance, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        if await status_via(backend, instance) is HealthStatus.PASSING:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"{instance.id} never passing")


async def test_client_agent_restarted_with_its_data_kept(
    cluster: ConsulCluster,
    registrar: AsyncRegistrar,
    events: EventLog,
    measured: Measured,
) -> None:
    await events.wait_for((EventType.ADDED, ORDERS.id))
    cluster.client.stop()
    cluster.client.start()
    back = time.monotonic()
    beats = registrar.counters.heartbeats_ok
    while registrar.counters.heartbeats_ok == beats:
        assert time.monotonic() - back < TTL + 10
        await asyncio.sleep(0.02)
    measured("heartbeating again", time.monotonic() - back, TTL / 3 + RETRY.cap + MARGIN)
    await asyncio.sleep(TTL)
    # The agent restored the service and its check from its data folder: nothing
    # to re-register, and the entry never left the catalog.
    assert registrar.counters.reregistrations == 0
    assert registrar.counters.lease_losses == 0
    ours = [e for e in events if e.instance.id == ORDERS.id]
    assert EventType.DELETED not in [e.type for e in ours]
    assert ours[-1].type in (EventType.ADDED, EventType.ONLINE)
    # A graceful stop makes Consul 1.8 drop the TTL check's saved state: it comes
    # back critical until its next update, which the connection probe sends at
    # once: watchers elsewhere see a blip of a few hundred milliseconds at most.
    for went, came in itertools.pairwise(ours):
        if went.type is EventType.OFFLINE:
            assert came.type is EventType.ONLINE
            blip = events.at(came) - events.at(went)
            # Repaired by the next heartbeat at the latest, never left to the TTL.
            measured("critical blip on restart", blip, TTL / 3 + RETRY.cap)


async def test_client_agent_restarted_empty(
    cluster: ConsulCluster, registrar: AsyncRegistrar, measured: Measured
) -> None:
    observer = open_backend(cluster.servers[0].url, timeout=1)
    bound = TTL / 3 + RETRY.cap + MARGIN
    try:
        cluster.client.restart(wipe=True)
        back = time.monotonic()
        while registrar.counters.reregistrations == 0:
            assert time.monotonic() - back < bound + 10, "never re-registered"
            await asyncio.sleep(0.02)
        await until_passing(observer, ORDERS, bound)
        measured("re-registered", time.monotonic() - back, bound)
    finally:
        await observer.close()


async def test_leader_killed(
    cluster: ConsulCluster, registrar: AsyncRegistrar, measured: Measured
) -> None:
    watched = open_backend(cluster.url, timeout=1, wait="5s")  # the host's own agent
    late = ServiceInstance("orders", id="orders-late", address="127.0.0.1", port=8081)
    other = open_backend(cluster.url, timeout=1)
    try:
        async with EventLog(AsyncWatcher(watched, "orders", retry=RETRY)) as seen:
            await seen.wait_for((EventType.ADDED, ORDERS.id))
            leader = cluster.leader()
            leader.kill()
            killed = time.monotonic()
            await other.register(late, ttl=30)  # the local agent accepts it; syncs when it can
            await seen.wait_for((EventType.ADDED, late.id))
            measured("watch event after leader kill", time.monotonic() - killed, 10.0)
            assert cluster.leader() is not leader
            await asyncio.sleep(TTL)
            survivor = next(s for s in cluster.servers if s is not leader)
            observer = open_backend(survivor.url, timeout=1)
            try:
                assert await status_via(observer, ORDERS) is HealthStatus.PASSING
            finally:
                await observer.close()
            assert registrar.counters.reregistrations == 0
            assert seen.of(ORDERS.id) == [EventType.ADDED]
    finally:
        await watched.close()
        await other.close()
