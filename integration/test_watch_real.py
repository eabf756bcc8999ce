"""Watcher and discovery on real servers: killed processes, compaction, the httpx transport."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aetcd
import httpx
import pytest

from registry_agent import (
    AsyncWatcher,
    Backend,
    Discovery,
    DiscoveryTransport,
    EventType,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess, free_port

from .test_healing import TTL, Measured, end_process, start_process

# A TTL running out: Consul keeps the entry critical, etcd drops the key.
EXPIRY = {"consul": EventType.OFFLINE, "etcd": EventType.DELETED}


@pytest.fixture
async def watcher(server: ServerProcess) -> AsyncIterator[AsyncWatcher]:
    watcher = AsyncWatcher(server.url, "orders", retry=RetryPolicy(initial=0.05, cap=0.5))
    yield watcher
    await watcher.close()


async def test_kill_of_the_heartbeating_process_is_seen(
    server: ServerProcess, watcher: AsyncWatcher, measured: Measured
) -> None:
    port = free_port()
    proc = start_process(server, port)
    try:
        events = aiter(watcher)
        first = await asyncio.wait_for(anext(events), 5)
        assert (first.type, first.instance.port, first.healthy) == (EventType.ADDED, port, True)
        proc.kill()
        killed = time.monotonic()
        event = await asyncio.wait_for(anext(events), TTL + 5)
        took = time.monotonic() - killed
        assert (event.type, event.instance.port) == (EXPIRY[server.name], port)
        measured("event after kill -9", took, TTL + 1 + 1)
    finally:
        end_process(proc)


async def test_etcd_compaction_during_a_disconnect_resyncs_exactly(
    etcd_server: EtcdServer,
) -> None:
    backend = open_backend(etcd_server.url, timeout=2)
    keep = ServiceInstance("orders", address="127.0.0.1", port=9001)
    drop = ServiceInstance("orders", address="127.0.0.1", port=9002)
    await backend.register(keep, ttl=60)
    drop_lease = await backend.register(drop, ttl=60)
    # A slow first retry leaves time to change and compact while it is away.
    watcher = AsyncWatcher(
        etcd_server.url, "orders", retry=RetryPolicy(initial=3.0, cap=3.0, jitter=0)
    )
    try:
        events = aiter(watcher)
        assert {(await asyncio.wait_for(anext(events), 5)).type for _ in range(2)} == {
            EventType.ADDED
        }
        etcd_server.restart()  # the watch stream breaks; the data stays
        started = time.monotonic()
        new = ServiceInstance("orders", address="127.0.0.1", port=9003)
        await backend.deregister(drop_lease)
        await backend.register(new, ttl=60)
        async with aetcd.Client(host="127.0.0.1", port=etcd_server.client_port) as raw:
            current = (await raw.get_prefix(b"/services/orders/")).header.revision
            await raw.compact(current)
        assert time.monotonic() - started < 2.5, "changed and compacted before it came back"
        got = sorted(
            (e.type, e.instance.port)
            for e in [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
        )
        assert got == [(EventType.ADDED, 9003), (EventType.DELETED, 9002)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 1.0)
        assert [h.instance.port for h in watcher.snapshot()] == [9001, 9003]
    finally:
        await watcher.close()
        await backend.close()


async def wait_ready(observer: Backend, count: int) -> None:
    for _ in range(100):
        if len((await observer.list("orders")).healthy()) == count:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{count} instances never became healthy")


async def test_transport_survives_the_kill_of_one_of_three_instances(
    server: ServerProcess, measured: Measured
) -> None:
    ports = [free_port() for _ in range(3)]
    procs = [start_process(server, port, "serve") for port in ports]
    observer = open_backend(server.url)
    try:
        await wait_ready(observer, 3)

        def traffic() -> tuple[Counter[int], float]:
            served: Counter[int] = Counter()
            left_rotation = float("nan")
            with (
                Discovery(server.url) as discovery,
                httpx.Client(
                    transport=DiscoveryTransport(discovery, retries=2), timeout=2
                ) as client,
            ):
                assert len(discovery.instances("orders")) == 3
                killed_at = None
                for n in range(400):
                    served[int(client.get("http://orders/").text)] += 1  # raises on any failure
                    if n == 20:
                        procs[0].kill()
                        killed_at = time.monotonic()
                    if killed_at and ports[0] not in {
                        i.port for i in discovery.instances("orders")
                    }:
                        left_rotation = time.monotonic() - killed_at
                        break
                    time.sleep(0.02)
            return served, left_rotation

        served, left = await asyncio.to_thread(traffic)
        assert set(served) == set(ports)
        measured("dead instance left rotation", left, TTL + 1)
    finally:
        for proc in procs:
            end_process(proc)
        await observer.close()


def test_consul_and_etcd_agree_on_events_for_an_unhealthy_add(
    consul_server: ConsulServer, etcd_server: EtcdServer
) -> None:
    async def events_for(url: str) -> list[tuple[EventType, bool]]:
        from registry_agent import HealthStatus

        backend = open_backend(url)
        await backend.register(
            ServiceInstance("orders", address="h", port=1), ttl=30, status=HealthStatus.CRITICAL
        )
        async with AsyncWatcher(backend, "orders") as watcher:
            stream = aiter(watcher)
            got = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        await backend.close()
        return [(e.type, e.healthy) for e in got]

    expected = [(EventType.ADDED, False), (EventType.OFFLINE, False)]
    assert asyncio.run(events_for(consul_server.url)) == expected
    assert asyncio.run(events_for(etcd_server.url)) == expected
