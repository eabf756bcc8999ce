"""Hundreds of services watched at once through one Consul agent (real Consul).

Consul resets every HTTP connection beyond ``limits.http_max_conns_per_client``
(200) from one address, and keeps a blocking query whose client left counted
until its ``wait`` ends. One blocking query per watched service and kind (three
per service) made 120 services fail their first read. The backend now runs at
most ``DIRECT_MAX`` blocking queries on their own connections and emulates the
rest from two shared change signals: every read succeeds, a change to any one
service is seen soon (not after ``wait``), and this process holds a few dozen
connections to the agent whatever the number of services.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psutil
import pytest
from registry_agent_consul import ConsulBackend, _hub
from registry_agent_consul._http import BLOCKING_MAX
from registry_agent_consul._hub import DIRECT_MAX

from registry_agent import AsyncDiscovery, AsyncWatcher, EventType, WatchEvent, open_backend
from registry_agent.testing.servers import ConsulServer

Measured = Callable[[str, float, float], None]

COUNT = 300
PORT = 20_000
# Blocking queries on their own connections, the two signals, the 8 short-call
# connections and a few closing: far below Consul's 200 per client address.
MOST_CONNECTIONS = DIRECT_MAX + 2 + 8 + 8
assert MOST_CONNECTIONS < BLOCKING_MAX + 8 < 200


def _register(consul: ConsulServer, count: int) -> None:
    for k in range(count):
        consul.api(
            "/v1/agent/service/register",
            method="PUT",
            body={"ID": f"m{k}", "Name": f"many{k}", "Address": "127.0.0.1", "Port": PORT + k},
        )


def _connections(consul: ConsulServer) -> int:
    """This process's TCP connections to the agent's HTTP port."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == consul.http_port and c.status == psutil.CONN_ESTABLISHED
    )


async def _until(check: Callable[[], object], bound: float) -> float:
    """Seconds until ``check()`` is true (polled; at most twice ``bound``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < bound * 2, "not seen in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_one_discovery_reads_300_services_and_sees_changes(
    consul_server: ConsulServer, measured: Measured
) -> None:
    _register(consul_server, COUNT)
    backend = open_backend(consul_server.url)
    assert isinstance(backend, ConsulBackend)
    change_bound = backend.wait / 2  # a change noticed only after `wait` would take longer
    discovery = AsyncDiscovery(backend, sync_timeout=60)
    most = 0
    try:
        started = time.monotonic()
        found = await asyncio.gather(*(discovery.instances(f"many{k}") for k in range(COUNT)))
        measured(f"{COUNT} concurrent first reads", time.monotonic() - started, 60)
        assert [[i.port for i in instances] for instances in found] == [
            [PORT + k] for k in range(COUNT)
        ]
        await asyncio.sleep(1.0)  # every watch blocking (on Consul, or on a signal)
        most = _connections(consul_server)

        # Another client on this address still gets a connection (they were reset before).
        last = f"many{COUNT - 1}"
        started = time.monotonic()
        await asyncio.to_thread(
            consul_server.api,
            "/v1/agent/service/register",
            method="PUT",
            body={"ID": "extra", "Name": last, "Address": "127.0.0.1", "Port": PORT - 1},
        )

        async def count(service: str) -> int:
            return len(await discovery.instances(service))

        while await count(last) != 2:
            assert time.monotonic() - started < change_bound * 2, "registration not seen"
            await asyncio.sleep(0.02)
        measured("registration in 1 of 300 seen", time.monotonic() - started, change_bound)

        # A health change (the checks signal), in a service in the middle.
        middle = COUNT // 2
        started = time.monotonic()
        await asyncio.to_thread(
            consul_server.api,
            f"/v1/agent/service/maintenance/m{middle}?enable=true&reason=test",
            method="PUT",
        )
        while await count(f"many{middle}") != 0:
            assert time.monotonic() - started < change_bound * 2, "maintenance not seen"
            await asyncio.sleep(0.02)
        measured("check change in 1 of 300 seen", time.monotonic() - started, change_bound)
        most = max(most, _connections(consul_server))
        print(f"{COUNT} services: {most} connections to the agent")
        assert 0 < most <= MOST_CONNECTIONS, most
    finally:
        await discovery.close()
        await backend.close()


async def test_one_watcher_over_300_services_gets_one_services_change(
    consul_server: ConsulServer, measured: Measured
) -> None:
    _register(consul_server, COUNT)
    backend = open_backend(consul_server.url)
    assert isinstance(backend, ConsulBackend)
    change_bound = backend.wait / 2
    events: list[WatchEvent] = []
    names = [f"many{k}" for k in range(COUNT)]
    try:
        started = time.monotonic()
        async with AsyncWatcher(backend, names, listener=events.append) as watcher:
            assert await watcher.wait_synced(60)
            measured(f"watcher synced on {COUNT}", time.monotonic() - started, 60)
            assert sum(len(watcher.snapshot(n)) for n in names) == COUNT
            await _until(lambda: len(events) >= COUNT, 30)
            await asyncio.sleep(1.0)
            assert len(events) == COUNT
            assert {e.type for e in events} == {EventType.ADDED}
            events.clear()
            most = _connections(consul_server)

            target = f"many{COUNT - 7}"
            started = time.monotonic()
            await asyncio.to_thread(
                consul_server.api,
                "/v1/agent/service/register",
                method="PUT",
                body={"ID": "extra", "Name": target, "Address": "127.0.0.1", "Port": PORT - 1},
            )
            took = await _until(lambda: bool(events), change_bound)
            measured("watcher: 1 of 300 changed", took, change_bound)
            await asyncio.sleep(1.0)
            assert [(e.type, e.service, e.instance.port) for e in events] == [
                (EventType.ADDED, target, PORT - 1)
            ]
            most = max(most, _connections(consul_server))
            print(f"watcher over {COUNT} services: {most} connections to the agent")
            assert 0 < most <= MOST_CONNECTIONS, most
    finally:
        await backend.close()


async def test_emulated_watches_see_changes_after_an_agent_restart(
    persistent_consul_server: ConsulServer, measured: Measured, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every blocking query emulated (as beyond DIRECT_MAX): the signals must notice
    # the agent going away and coming back (its indexes start over).
    monkeypatch.setattr(_hub, "DIRECT_MAX", 0)
    consul = persistent_consul_server
    _register(consul, 3)
    backend = open_backend(consul.url)
    assert isinstance(backend, ConsulBackend)
    events: list[WatchEvent] = []
    names = [f"many{k}" for k in range(3)]
    try:
        async with AsyncWatcher(backend, names, listener=events.append) as watcher:
            assert await watcher.wait_synced(30)
            await _until(lambda: len(events) >= 3, 10)
            hub = backend.api.registry_agent_hub
            assert isinstance(hub, _hub.Hub)
            assert hub.direct == 0
            assert hub.catalog.task is not None
            assert hub.checks.task is not None

            await asyncio.to_thread(consul.restart)
            await asyncio.to_thread(
                consul.api,
                "/v1/agent/service/register",
                method="PUT",
                body={"ID": "extra", "Name": "many1", "Address": "127.0.0.1", "Port": PORT - 1},
            )
            took = await _until(
                lambda: any(
                    e.type is EventType.ADDED and e.instance.port == PORT - 1 for e in events
                ),
                backend.wait,
            )
            measured("emulated watch after restart", took, backend.wait)
            ports = sorted(i.instance.port for i in watcher.snapshot("many1"))
            assert ports == [PORT - 1, PORT + 1]
    finally:
        await backend.close()
