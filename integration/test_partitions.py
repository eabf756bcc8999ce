"""Real network partitions: registry and registrar on test hosts of their own, the link cut.

Hosts are network namespaces joined by bridges (see netns.py); the test
process sits on the bridges as an observer that is never cut off. Every
scenario prints what it measured.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_agent_etcd import EtcdBackend

from integration.event_log import EventLog
from integration.netns import Host, TestNet, netlab
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
from registry_agent.testing.servers import ConsulServer, EtcdCluster, EtcdServer

TTL = 2.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0
REGISTRAR = Path(__file__).with_name("registrar_process.py")
Measured = Callable[[str, float, float], None]


@pytest.fixture
def net() -> Iterator[TestNet]:
    with netlab() as net:
        yield net


class Process:
    """A process on a test host, its output lines collected by a thread."""

    def __init__(self, net: TestNet, host: Host, *argv: str) -> None:
        self.proc = subprocess.Popen(
            net.command(host, *argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_line(self, predicate: Callable[[str], bool], within: float) -> float:
        """Monotonic time of the first line matching ``predicate``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if predicate(line):
                    return at
            time.sleep(0.02)
        pytest.fail(f"no such line within {within}s: {[line for _, line in self.lines]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def json_events(process: Process) -> list[tuple[float, dict[str, Any]]]:
    found = []
    for at, line in list(process.lines):
        if line.startswith("{"):
            found.append((at, json.loads(line)))
    return found


async def status_in(observer: Backend, instance_id: str) -> HealthStatus | None:
    try:
        health = (await observer.list("orders")).instances.get(instance_id)
    except BackendUnavailable:
        return None
    return None if health is None else health.status


async def until_status(
    observer: Backend, instance_id: str, wanted: set[HealthStatus | None], within: float
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        if await status_in(observer, instance_id) in wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"{instance_id} never reached {wanted}")


# -- etcd --------------------------------------------------------------------------


async def test_etcd_registrar_cut_off_expires_then_heals(net: TestNet, measured: Measured) -> None:
    net.network("lan")
    db, app = net.host("db", "lan"), net.host("app", "lan")
    server = EtcdServer(host=db.address(), netns=db.netns)
    server.start()
    registrar = Process(net, app, sys.executable, str(REGISTRAR), server.url, "8080", str(TTL))
    observer = open_backend(server.url, timeout=1)
    instance_id = "orders-127.0.0.1-8080"
    try:
        registrar.wait_line(lambda line: line == "registered", 20)
        net.cut(app)
        took = await until_status(observer, instance_id, {None}, TTL + MARGIN)
        measured("lease expired behind the cut", took, TTL + MARGIN)
        await asyncio.sleep(1.0)
        net.heal(app)
        took = await until_status(observer, instance_id, {HealthStatus.PASSING}, 10)
        # gRPC reconnect (capped at 1 s) + our backoff cap + a heartbeat interval.
        measured("registered again after heal", took, 1.0 + RETRY.cap + TTL / 3 + MARGIN)
    finally:
        await observer.close()
        registrar.close()
        server.close()


async def test_etcd_watcher_cut_off_resyncs_exactly_after_heal(
    net: TestNet, measured: Measured
) -> None:
    net.network("lan")
    db, app = net.host("db", "lan"), net.host("app", "lan")
    server = EtcdServer(host=db.address(), netns=db.netns)
    server.start()
    backend = open_backend(server.url, timeout=1)
    first = ServiceInstance("orders", id="orders-1", address="127.0.0.1", port=8081)
    second = ServiceInstance("orders", id="orders-2", address="127.0.0.1", port=8082)
    watch = Process(
        net,
        app,
        *(sys.executable, "-m", "registry_agent", "watch", "orders"),
        *("--backend", server.url, "--json", "--timeout", "1"),
    )
    try:
        lease = await backend.register(first, ttl=60)
        watch.wait_line(lambda line: '"orders-1"' in line, 15)
        net.cut(app)
        await asyncio.sleep(1.0)
        await backend.deregister(lease)  # behind the watcher's back
        await backend.register(second, ttl=60)
        # The watcher (same URL, so same keepalive) must notice the dead connection
        # while cut off: wait past its detection bound.
        assert isinstance(backend, EtcdBackend)
        await asyncio.sleep(backend.keepalive_time + backend.keepalive_timeout + 1.0)
        cut_events = len(json_events(watch))
        net.heal(app)
        healed = time.monotonic()
        at = watch.wait_line(lambda line: '"orders-2"' in line, 20)
        watch.wait_line(lambda line: '"deleted"' in line and '"orders-1"' in line, 5)
        measured("watcher resynced after heal", at - healed, 1.0 + 2.0 + MARGIN)
        events = [(e["type"], e["id"]) for _, e in json_events(watch)]
        assert cut_events == 1  # nothing invented while cut off
        assert sorted(events) == [
            ("added", "orders-1"),
            ("added", "orders-2"),
            ("deleted", "orders-1"),
        ], events
    finally:
        watch.close()
        await backend.close()
        server.close()


async def test_etcd_member_in_a_minority_is_left_by_watchers_and_registrars(
    net: TestNet, measured: Measured
) -> None:
    # Clients reach every member on "lan"; members talk to each other on "peers".
    net.network("lan")
    net.network("peers")
    members = [net.host(f"m{i}", "lan", "peers") for i in range(3)]
    cluster = EtcdCluster(
        3,
        hosts=tuple(m.address("lan") for m in members),
        peer_hosts=tuple(m.address("peers") for m in members),
        netns=tuple(m.netns for m in members),
    )
    cluster.start()
    # Both clients list m0 first, so they start on the member we isolate.
    watched = open_backend(cluster.url, timeout=1)
    registrar = AsyncRegistrar(
        open_backend(cluster.url, timeout=1),
        ServiceInstance("orders", id="orders-1", address="127.0.0.1", port=8081),
        ttl=3,
        retry=RETRY,
    )
    majority = open_backend(
        "etcd://" + ",".join(f"{m.host}:{m.client_port}" for m in cluster.members[1:]),
        timeout=1,
    )
    try:
        async with EventLog(AsyncWatcher(watched, "orders", retry=RETRY)) as seen:
            await registrar.start(wait_registered=10)
            await seen.wait_for(lambda e: True, 10)
            assert watched.host == cluster.members[0].host  # type: ignore[attr-defined]
            net.cut(members[0], "peers")
            isolated = time.monotonic()
            late = ServiceInstance("orders", id="orders-late", address="127.0.0.1", port=8082)
            while True:  # the majority may be electing a leader if m0 led
                try:
                    await majority.register(late, ttl=60)
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.1)
            event = await seen.wait_for(lambda e: e.instance.id == late.id, 20)
            took = seen.at(event) - isolated
            # etcd ends require-leader watches after 3 election timeouts without a
            # leader (3 x 1 s); the watcher then fails over and re-lists.
            measured("watch event despite minority", took, 3 * 1.0 + RETRY.cap + MARGIN + 1)
            assert watched.host != cluster.members[0].host  # type: ignore[attr-defined]
            await asyncio.sleep(3.0)
            status = await status_in(majority, "orders-1")
            assert status is HealthStatus.PASSING  # the registrar moved on too
            assert seen.of("orders-1") == [EventType.ADDED]
    finally:
        await registrar.stop(timeout=5)
        await registrar.backend.close()
        await watched.close()
        await majority.close()
        cluster.close()


# -- Consul ------------------------------------------------------------------------


async def test_consul_client_host_cut_from_the_servers(net: TestNet, measured: Measured) -> None:
    # The registrar and its client agent share the "app" host; the server and
    # the observer are elsewhere. Cut off, the services stay in the local agent
    # (heartbeats keep working) while the servers mark the node failed: watchers
    # see it offline, then online again after the heal, with no re-registration.
    net.network("lan")
    srv, app = net.host("srv", "lan"), net.host("app", "lan")
    server = ConsulServer(host=srv.address(), netns=srv.netns)
    server.start()
    client = ConsulServer(
        client=True, join=(server.serf_address,), host=app.address(), netns=app.netns
    )
    client.start()
    observer = open_backend(server.url, timeout=1, wait="5s")
    registrar = Process(net, app, sys.executable, str(REGISTRAR), client.url, "8080", str(TTL))
    try:
        async with EventLog(AsyncWatcher(observer, "orders", retry=RETRY)) as seen:
            registrar.wait_line(lambda line: line == "registered", 20)
            await seen.wait_for(lambda e: True, 10)
            net.cut(app)
            cut = time.monotonic()
            offline = await seen.wait_for(lambda e: e.type is EventType.OFFLINE, 30)
            measured("offline after the cut (serf)", seen.at(offline) - cut, 15.0)
            net.heal(app)
            healed = time.monotonic()
            online = await seen.wait_for(
                lambda e: e.type is EventType.ONLINE and seen.at(e) > seen.at(offline), 30
            )
            measured("online after heal", seen.at(online) - healed, 15.0)
            kinds = [e.type for e in seen]
            assert EventType.DELETED not in kinds, kinds
            assert registrar.proc.poll() is None
            assert not any("re-registered" in line for _, line in registrar.lines)
    finally:
        await observer.close()
        registrar.close()
        client.close()
        server.close()
