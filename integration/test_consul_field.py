"""The Consul backend in the field: a misbehaving network, Consul's own limits, many nodes.

Every test talks to a real Consul 1.8 agent, through a FaultProxy where the
network misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from registry_agent_consul import ConsulBackend
from registry_agent_consul._http import blocking_bound

from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    BackendUnavailable,
    ConfigError,
    EventType,
    HealthStatus,
    LeaseLost,
    RegistryError,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    Throttled,
    open_backend,
)
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import ConsulCluster, ConsulServer

Measured = Callable[[str, float, float], None]
TIMEOUT = 2.0


@pytest.fixture
def proxy(consul_server: ConsulServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", consul_server.http_port) as proxy:
        yield proxy


@pytest.fixture
async def proxied(proxy: FaultProxy) -> AsyncIterator[ConsulBackend]:
    backend = open_backend(f"consul://{proxy.host}:{proxy.port}", timeout=TIMEOUT, wait="2s")
    assert isinstance(backend, ConsulBackend)
    yield backend
    await backend.close()


async def _first_snapshot(backend: ConsulBackend, service: str) -> object:
    stream = aiter(backend.watch(service))
    try:
        return await anext(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# What each method raises under each answer of the proxy: (type, words it carries).
# None: the call succeeds (deregistering what is gone, looking up what is unknown).
_LOST = (LeaseLost, "404 page not found")
_ANSWERS: dict[str, tuple[Callable[[FaultProxy], None], dict[str, Any]]] = {
    "429": (
        lambda p: p.http(429, "Too many requests, slow down", {"Retry-After": "1"}),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (Throttled, "slow down"),
        ),
    ),
    "503": (
        lambda p: p.http(503, "Service Unavailable: in maintenance", {"Retry-After": "3"}),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (Throttled, "in maintenance"),
        ),
    ),
    "500": (
        lambda p: p.http(500, "No cluster leader"),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (BackendUnavailable, "No cluster leader"),
        ),
    ),
    "403": (
        lambda p: p.http(403, "Permission denied"),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (Rejected, "Permission denied"),
        ),
    ),
    "400": (
        lambda p: p.http(400, "Invalid check: TTL must be > 0"),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (Rejected, "TTL must be > 0"),
        ),
    ),
    "404": (
        lambda p: p.http(404, "404 page not found"),
        {
            "register": (Rejected, "404 page not found"),
            "heartbeat": _LOST,
            "set_status": _LOST,
            "lookup": None,
            "deregister": None,
            "list": (Rejected, "404 page not found"),
            "watch": (Rejected, "404 page not found"),
        },
    ),
    "200-not-json": (
        lambda p: p.http(200, "<html>captive portal</html>"),
        {
            "register": None,  # Consul's answer to a register is empty: nothing to read
            "heartbeat": None,
            "set_status": None,
            "lookup": (BackendUnavailable, "captive portal"),
            "deregister": None,
            "list": (BackendUnavailable, "captive portal"),
            "watch": (BackendUnavailable, "captive portal"),
        },
    ),
    "garbage": (
        lambda p: p.garbage(512),
        dict.fromkeys(
            ("register", "heartbeat", "set_status", "lookup", "deregister", "list", "watch"),
            (BackendUnavailable, "not HTTP"),
        ),
    ),
}


@pytest.mark.parametrize("answer", list(_ANSWERS))
async def test_every_method_raises_our_errors_with_the_servers_words(
    proxy: FaultProxy, proxied: ConsulBackend, answer: str
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    lease = await proxied.register(inst, ttl=30)
    inject, expected = _ANSWERS[answer]
    inject(proxy)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "register": lambda: proxied.register(inst, ttl=30),
        "heartbeat": lambda: proxied.heartbeat(lease),
        "set_status": lambda: proxied.set_status(lease, HealthStatus.CRITICAL, "down"),
        "lookup": lambda: proxied.lookup(lease),
        "list": lambda: proxied.list("orders"),
        "watch": lambda: _first_snapshot(proxied, "orders"),
        "deregister": lambda: proxied.deregister(lease),
    }
    for method, call in calls.items():
        outcome = expected[method]
        error = await _raised(call)
        if outcome is None:
            assert error is None, f"{method}: unexpected {error!r}"
            continue
        kind, words = outcome
        assert isinstance(error, RegistryError), f"{method} raised {error!r}"
        assert type(error) is kind, f"{method}: {error!r}"
        assert words in str(error), f"{method}: {error}"
        if isinstance(error, Throttled):
            assert error.retry_after == (1.0 if answer == "429" else 3.0)


async def _raised(call: Callable[[], Awaitable[object]]) -> BaseException | None:
    try:
        await asyncio.wait_for(call(), timeout=TIMEOUT + 5)
    except Exception as exc:
        return exc
    return None


async def test_throttling_is_noted_once_per_episode_at_debug(
    proxy: FaultProxy, proxied: ConsulBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # The registrar owns the user-facing WARNING; the backend only notes it for debugging.
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    lease = await proxied.register(inst, ttl=30)
    proxy.http(429, "slow down", {"Retry-After": "1"})
    with caplog.at_level("DEBUG", logger="registry_agent.consul"):
        for _ in range(3):
            with pytest.raises(Throttled):
                await proxied.heartbeat(lease)
        proxy.heal()
        await proxied.heartbeat(lease)
        proxy.http(503, "busy")
        with pytest.raises(Throttled) as info:
            await proxied.heartbeat(lease)
    assert info.value.retry_after is None  # no Retry-After header: None, not a guess
    noted = [r for r in caplog.records if "shedding load" in r.getMessage()]
    assert len(noted) == 2, [r.getMessage() for r in noted]
    assert "retry after 1s" in noted[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in noted)


async def test_a_throttled_registrar_warns_once_per_episode(
    proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    url = f"consul://{proxy.host}:{proxy.port}?timeout=2s"
    registrar = AsyncRegistrar(url, inst, ttl=3)
    await registrar.start(wait_registered=10)
    try:
        with caplog.at_level("DEBUG", logger="registry_agent"):
            proxy.http(429, "slow down", {"Retry-After": "1"})
            await asyncio.sleep(3.5)  # several heartbeats refused, Retry-After honoured
            proxy.heal()
            assert await registrar.wait_registered(5)
            await asyncio.sleep(1.5)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and "shedding load" in r.getMessage()
        ]
        assert len(warnings) == 1, warnings  # (a lease lost past the TTL is its own line)
        assert "slow down" in warnings[0]
    finally:
        await registrar.stop()


async def test_a_blocking_query_on_a_dead_connection_ends_within_15s_by_default(
    proxy: FaultProxy, measured: Measured
) -> None:
    backend = ConsulBackend(proxy.host, proxy.port)  # every default
    bound = blocking_bound(backend.wait, backend.timeout)
    assert bound <= 15.0
    try:
        stream = aiter(backend.watch("orders"))
        await anext(stream)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # the blocking query is on the wire
        assert not pending.done()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await asyncio.wait_for(pending, timeout=30)
        measured("dead blocking query noticed", time.monotonic() - started, bound)
        assert "no answer within" in str(info.value)
        # Short calls are bounded by `timeout`, whatever the connection does.
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.list("orders")
        measured("short call on a dead proxy", time.monotonic() - started, backend.timeout + 0.5)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await backend.close()


async def test_wait_and_timeout_have_floors_naming_the_field(consul_server: ConsulServer) -> None:
    for query, field in (
        ("wait=500ms", "backend.wait"),
        ("wait=11m", "backend.wait"),
        ("timeout=0s", "backend.timeout"),
        ("deregister_critical_after=30s", "backend.deregister_critical_after"),
    ):
        with pytest.raises(ConfigError) as info:
            open_backend(f"{consul_server.url}?{query}")
        assert info.value.field == field, query


# Each: meta Consul refuses (with its words), the field our message names.
_REFUSED: list[tuple[dict[str, str], str, str]] = [
    ({f"k{i}": "v" for i in range(65)}, "64 key/value pairs", "meta"),
    ({"k": "v" * 513}, "Value is too long", "meta.k"),
    ({"k": "é" * 257}, "Value is too long", "meta.k"),  # 514 bytes: Consul counts bytes
    ({"k" * 129: "v"}, "Key is too long", "meta.kkkk"),
    ({"a.b": "v"}, "invalid characters", "meta.a.b"),
    ({"zürich": "v"}, "invalid characters", "meta.zürich"),
    ({"consul-version": "v"}, "reserved for internal use", "meta.consul-version"),
]
_ACCEPTED: list[dict[str, str]] = [
    {f"k{i}": "v" for i in range(64)},
    {"k": "v" * 512},
    {"k" * 128: "v"},
    {"a-B_9": "v"},
]


async def _raw_register(server: ConsulServer, meta: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http) as http:
        body = {"Name": "orders", "ID": "raw", "Port": 1, "Meta": meta}
        return await http.put("/v1/agent/service/register", json=body)


async def test_validate_refuses_exactly_what_consul_refuses(consul_server: ConsulServer) -> None:
    backend = open_backend(consul_server.url, timeout=TIMEOUT)
    assert isinstance(backend, ConsulBackend)
    try:
        for meta, consul_words, field in _REFUSED:
            raw = await _raw_register(consul_server, meta)
            assert raw.status_code == 400, raw.text
            assert consul_words in raw.text
            inst = ServiceInstance("orders", address="127.0.0.1", port=8080, meta=meta)
            with pytest.raises(Rejected) as info:
                backend.validate(inst)
            assert str(info.value).startswith(field), str(info.value)
            with pytest.raises(Rejected):
                await backend.register(inst, ttl=30)  # refused before sending
            assert (await backend.list("orders")).instances == {}
        for meta in _ACCEPTED:
            assert (await _raw_register(consul_server, meta)).status_code == 200
            inst = ServiceInstance("orders", address="127.0.0.1", port=8080, meta=meta)
            backend.validate(inst)
            lease = await backend.register(inst, ttl=30)
            assert (await backend.lookup(lease)) is not None
    finally:
        await backend.close()


async def test_two_nodes_with_the_same_id_are_two_instances() -> None:
    cluster = ConsulCluster(servers=1)
    cluster.start()
    agents = [cluster.servers[0], cluster.client]
    backends = [open_backend(a.url, timeout=TIMEOUT, wait="2s") for a in agents]
    watcher = AsyncWatcher(backends[0], "orders")
    try:
        inst = ServiceInstance("orders", address="127.0.0.1", port=8080, id="orders-8080")
        leases = [await b.register(inst, ttl=30) for b in backends]
        await watcher.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the client's entry reaches the catalog
            if len((await backends[0].list("orders")).instances) == 2:
                break
            await asyncio.sleep(0.2)
        for backend, local in zip(backends, agents, strict=True):
            snapshot = await backend.list("orders")
            other = next(a for a in agents if a is not local)
            # Our own agent's entry under its id, the other node's under node/id.
            assert set(snapshot.instances) == {"orders-8080", f"{other.node}/orders-8080"}
            assert snapshot.instances["orders-8080"].instance.node == local.node
            assert snapshot.instances[f"{other.node}/orders-8080"].instance.node == other.node
            assert all(h.instance == inst for h in snapshot.instances.values())
        for backend, lease, local in zip(backends, leases, agents, strict=True):
            found = await backend.lookup(lease)
            assert found is not None
            assert found.instance.node == local.node
        assert await watcher.wait_synced(10)
        assert len(watcher.snapshot("orders")) == 2
        # One node's instance going away is one `deleted`, the other stays.
        await backends[1].deregister(leases[1])
        for _ in range(100):
            if len(watcher.snapshot("orders")) == 1:
                break
            await asyncio.sleep(0.2)
        [left] = watcher.snapshot("orders")
        assert left.instance.node == agents[0].node
    finally:
        await watcher.close()
        for backend in backends:
            await backend.close()
        cluster.close()


async def test_deregister_critical_after_from_the_url_reaches_consul_through_a_registrar(
    persistent_consul_server: ConsulServer,
) -> None:
    server = persistent_consul_server
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    registrar = AsyncRegistrar(f"{server.url}?deregister_critical_after=5m", inst, ttl=3)
    await registrar.start(wait_registered=10)
    try:
        # The agent keeps what it was given in its data folder: read what arrived.
        found = {}
        for path in (server.data_dir / "checks").iterdir():
            if not path.is_file():
                continue  # state/: the checks' statuses
            data = json.loads(path.read_text())
            found[data["Check"]["CheckID"]] = data["ChkType"]
        liveness = found[f"service:{inst.id}"]
        assert liveness["DeregisterCriticalServiceAfter"] == 300 * 10**9  # nanoseconds
        health = found[f"service:{inst.id}:health"]
        assert not health.get("DeregisterCriticalServiceAfter")  # never reaps
    finally:
        await registrar.stop()


_HELD_CRITICAL = textwrap.dedent(
    """
    import asyncio, sys
    from registry_agent import (
        AsyncRegistrar, CallableCheck, RetryPolicy, ServiceInstance, open_backend,
    )

    healthy = True

    async def main() -> None:
        global healthy
        instance = ServiceInstance("orders", address="127.0.0.1", port=int(sys.argv[2]))
        shared = sys.argv[3] == "shared"  # the heartbeat service + alias check shape
        registrar = AsyncRegistrar(
            # the heartbeat service is reaped after the backend's own setting
            open_backend(sys.argv[1], deregister_critical_after=60) if shared else sys.argv[1],
            instance, ttl=3,
            fall=1, rise=1, checks=[CallableCheck(lambda: healthy, interval=0.5)],
            on_unhealthy="critical", deregister_critical_after=60,
            retry=RetryPolicy(initial=0.1, cap=1.0), shared_liveness=shared,
        )
        await registrar.start(wait_registered=20)
        healthy = False
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _spawn_held_critical(url: str, port: int, shape: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", _HELD_CRITICAL, url, str(port), shape],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "registered"
    return process


def _heartbeats_of(server: ConsulServer, pid: int) -> list[str]:
    """The heartbeat services the agent holds for process ``pid``."""
    services = server.api("/v1/agent/services")
    return [
        sid
        for sid, svc in services.items()
        if svc["Service"] == "registry-agent-heartbeat" and svc["Meta"].get("pid") == str(pid)
    ]


async def test_held_critical_stays_while_running_and_a_crashed_one_is_reaped(
    consul_server: ConsulServer, measured: Measured
) -> None:
    # Three processes hold their instance critical; two are killed -9 at once.
    # Consul reaps a service whose check with DeregisterCriticalServiceAfter (60s)
    # has been critical that long, its reaper running every 30s: the crashed ones
    # go within ttl + 60 + 30 s; the running one must stay, critical, all along.
    # 8081 and 8082 use the shared shape (heartbeat service, alias check, a health
    # check while held critical), 8083 a TTL check of its own.
    reap_bound = 3 + 60 + 30 + 25  # slack: one run under load took longer
    watcher = AsyncWatcher(consul_server.url, "orders")
    events: list[tuple[EventType, int]] = []
    kept = _spawn_held_critical(consul_server.url, 8081, "shared")
    crashed = _spawn_held_critical(consul_server.url, 8082, "shared")
    crashed_alone = _spawn_held_critical(consul_server.url, 8083, "own")
    try:
        await watcher.start()
        assert await watcher.wait_synced(10)

        async def collect() -> None:
            async for event in watcher:
                events.append((event.type, event.instance.port))

        collector = asyncio.ensure_future(collect())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # both marked critical by their registrars
            snapshot = await watcher.backend.list("orders")
            statuses = [h.status for h in snapshot.instances.values()]
            if statuses == [HealthStatus.CRITICAL] * 3:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"not all three critical: {statuses}")
        for process in (crashed, crashed_alone):
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert _heartbeats_of(consul_server, crashed.pid), "no heartbeat service to reap"
        started = time.monotonic()
        reaped_after = heartbeat_reaped_after = None
        while time.monotonic() - started < reap_bound:
            snapshot = await watcher.backend.list("orders")
            ports = {h.instance.port: h for h in snapshot.instances.values()}
            assert 8081 in ports, f"held critical yet reaped after {time.monotonic() - started}"
            assert ports[8081].status is HealthStatus.CRITICAL
            if 8082 not in ports and 8083 not in ports and reaped_after is None:
                reaped_after = time.monotonic() - started
            if heartbeat_reaped_after is None and not _heartbeats_of(consul_server, crashed.pid):
                heartbeat_reaped_after = time.monotonic() - started
            if reaped_after is not None and time.monotonic() - started > 95:
                break  # the running one outlived a whole reap period after its TTL
            await asyncio.sleep(1.0)
        assert reaped_after is not None, "the crashed process's entry was never reaped"
        assert heartbeat_reaped_after is not None, "the crashed process's heartbeat stayed"
        assert _heartbeats_of(consul_server, kept.pid), "the running process's heartbeat went"
        measured("crashed heartbeat service reaped", heartbeat_reaped_after, reap_bound)
        measured("crashed critical reaped", reaped_after, reap_bound)
        measured("held critical, not reaped", time.monotonic() - started, reap_bound)
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        # No flicker: the running one was never deleted nor added again.
        assert [e for e in events if e[1] == 8081 and e[0] is not EventType.OFFLINE] == [
            (EventType.ADDED, 8081)
        ], events
        assert (EventType.DELETED, 8082) in events
        assert (EventType.DELETED, 8083) in events
    finally:
        for process in (kept, crashed, crashed_alone):
            if process.poll() is None:
                process.terminate()
                process.wait(10)
            assert process.stdout is not None
            process.stdout.close()
        await watcher.close()


async def test_registration_is_back_soon_after_a_throttle_ends(
    consul_server: ConsulServer, proxy: FaultProxy, measured: Measured
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    registrar = AsyncRegistrar(
        f"consul://{proxy.host}:{proxy.port}?timeout=2s",
        inst,
        ttl=3,
        retry=RetryPolicy(initial=0.2, cap=10.0),
    )
    await registrar.start(wait_registered=10)
    try:
        async with httpx.AsyncClient(base_url=consul_server.http) as http:
            proxy.http(429, "Too many requests, slow down", {"Retry-After": "1"})
            # Gone from the agent while the registrar is throttled: it must come back.
            await http.put(f"/v1/agent/service/deregister/{inst.id}")
            await asyncio.sleep(5.0)
            proxy.heal()
            healed = time.monotonic()
            while time.monotonic() - healed < 15:
                services = (await http.get("/v1/agent/services")).json()
                if inst.id in services:
                    break
                await asyncio.sleep(0.05)
        measured("registered after throttle", time.monotonic() - healed, 2.0)
    finally:
        await registrar.stop()


def test_snapshot_keys_give_the_agents_node_the_plain_id() -> None:
    # The key rule, without and with the agent's node name known.
    backend = ConsulBackend()
    entry = {"Service": {"Service": "s", "ID": "a"}, "Node": {"Node": "n1", "Address": "h"}}
    other = {"Service": {"Service": "s", "ID": "a"}, "Node": {"Node": "n2", "Address": "h"}}
    assert set(backend._parse_entries("s", [other, entry])) == {"a", "n2/a"}
    backend._node = "n2"
    assert set(backend._parse_entries("s", [entry, other])) == {"a", "n1/a"}
