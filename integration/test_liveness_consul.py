"""Consul shared liveness on a real Consul 1.8 agent: one heartbeat service per TTL.

Many registrations of one backend share one heartbeat service whose TTL check
one ``check/pass`` renews every ttl/3; each service aliases it. These tests
count the requests, change one entry and watch only it move, wipe the agent,
and kill -9 a process holding 20 registrations.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from registry_agent_consul import ConsulBackend
from registry_agent_consul._heartbeat import HEARTBEAT_NAME

from integration.acl import ORDERS_ONLY_RULES, RULES, AclConsul
from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    BackendError,
    EventType,
    HealthStatus,
    Lease,
    LeaseLost,
    RetryPolicy,
    ServiceInstance,
)
from registry_agent._backend import LivenessNews, SharedLiveness
from registry_agent.testing.servers import ConsulServer, find_binary

Measured = Callable[[str, float, float], None]
TTL = 3.0
COUNT = 20


@pytest.fixture(scope="module")
def shared_consul() -> Iterator[ConsulServer]:
    """One `consul agent -dev` for the tests that neither restart nor wipe it."""
    server = ConsulServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.asynccontextmanager
async def _backend(server: ConsulServer) -> AsyncIterator[ConsulBackend]:
    backend = ConsulBackend("127.0.0.1", server.http_port, deregister_critical_after=60)
    try:
        yield backend
    finally:
        await backend.close()


def _instances(service: str, count: int = COUNT) -> list[ServiceInstance]:
    return [
        ServiceInstance(service, address="127.0.0.1", port=9000 + i, meta={"n": str(i)})
        for i in range(count)
    ]


async def _register_all(backend: ConsulBackend, instances: list[ServiceInstance]) -> list[Lease]:
    return list(await asyncio.gather(*(backend.register_shared(i, ttl=TTL) for i in instances)))


def _heartbeats(server: ConsulServer) -> dict[str, Any]:
    services = server.api("/v1/agent/services")
    return {k: v for k, v in services.items() if v["Service"] == HEARTBEAT_NAME}


def _count_requests(backend: ConsulBackend) -> collections.Counter[str]:
    """Count every request the backend sends, by method and path (query left out)."""
    counts: collections.Counter[str] = collections.Counter()
    http = backend.api.http
    send = http._request

    async def counted(callback: Any, method: str, path: str, *args: Any) -> Any:
        counts[f"{method} {path}"] += 1
        return await send(callback, method, path, *args)

    http._request = counted
    return counts


async def _wait_for(what: str, predicate: Callable[[], bool], bound: float) -> float:
    """Poll ``predicate`` (every 50 ms) until true; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > bound:
            pytest.fail(f"{what}: not within {bound:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class _Stand:
    """What a registrar does with shared leases, reduced to the reaction under test:
    on RENEWAL ask heartbeat(); on LeaseLost register again (retrying); on VERIFY lookup."""

    def __init__(self, backend: ConsulBackend, instances: list[ServiceInstance]) -> None:
        self.backend = backend
        self.instances = instances
        self.leases: dict[str, Lease] = {}
        self.news: list[tuple[str, LivenessNews]] = []
        self.reregistered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for lease in await _register_all(self.backend, self.instances):
            self._follow(lease)

    def _follow(self, lease: Lease) -> None:
        self.leases[lease.instance.id] = lease

        def notify(news: LivenessNews) -> None:
            self.news.append((lease.instance.id, news))
            task = asyncio.ensure_future(self._react(lease, news))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.backend.follow(lease, notify)

    async def _react(self, lease: Lease, news: LivenessNews) -> None:
        if news is LivenessNews.VERIFY:
            await self.backend.lookup(lease)
            return
        try:
            await self.backend.heartbeat(lease)
            return
        except LeaseLost:
            pass
        except BackendError:
            return  # renewals fail: the backend tells again when they recover or are lost
        for attempt in range(200):  # bounded: 200 tries of at most 0.2 s
            try:
                new = await self.backend.register_shared(lease.instance, ttl=TTL)
            except BackendError:
                await asyncio.sleep(0.05 + 0.15 * min(1.0, attempt / 5))
                continue
            self.reregistered += 1
            self._follow(new)
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def test_twenty_registrations_share_one_heartbeat_renewed_once_per_third_of_ttl(
    shared_consul: ConsulServer,
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        assert isinstance(backend, SharedLiveness)
        counts = _count_requests(backend)
        instances = _instances("share")
        leases = await _register_all(backend, instances)
        assert all(lease.shared for lease in leases)
        # One heartbeat service, named, tagged and labelled with this process.
        (beat,) = _heartbeats(server).values()
        assert beat["ID"].startswith(f"{HEARTBEAT_NAME}-")
        assert f"-{os.getpid()}-3s-" in beat["ID"]
        assert beat["Tags"] == [HEARTBEAT_NAME]
        assert beat["Meta"]["pid"] == str(os.getpid())
        assert beat["Meta"]["ttl"] == "3s"
        assert counts["PUT /v1/agent/service/register"] == COUNT + 1  # 20 services + heartbeat
        checks = server.api("/v1/agent/checks")
        for inst in instances:
            alias = checks[f"service:{inst.id}"]
            assert (alias["Type"], alias["Status"], alias["ServiceID"]) == (
                "alias",
                "passing",
                inst.id,
            )
            assert f"service:{inst.id}:health" not in checks  # passing: no health check
        (beat_check,) = [c for c in checks.values() if c["ServiceID"] == beat["ID"]]
        assert (beat_check["Type"], beat_check["Status"]) == ("ttl", "passing")

        # Two TTLs: one check/pass per ttl/3 for all 20, and one read-back per TTL.
        counts.clear()
        window = 2 * TTL
        await asyncio.sleep(window)
        passes = sum(n for k, n in counts.items() if k.startswith("PUT /v1/agent/check/pass/"))
        expected = window / (TTL / 3)
        assert expected - 2 <= passes <= expected + 1, counts
        assert counts["GET /v1/agent/services"] <= window / TTL + 1, counts
        assert set(counts) <= {
            f"PUT /v1/agent/check/pass/service:{beat['ID']}",
            "GET /v1/agent/services",
            "GET /v1/agent/checks",
        }, counts
        assert backend.last_renewal(leases[0]) is not None
        assert time.time() - (backend.last_renewal(leases[0]) or 0) < TTL / 3 + 1
        for lease in leases:
            await backend.heartbeat(lease)  # from memory
        assert not any(k.startswith("PUT /v1/agent/check/pass") for k in counts if False)

        # Each deregistration removes its service; the last also removes the heartbeat.
        for lease in leases[:-1]:
            await backend.deregister(lease)
        assert len(_heartbeats(server)) == 1
        await backend.deregister(leases[-1])
        assert _heartbeats(server) == {}
        assert [
            s for s in server.api("/v1/agent/services").values() if s["Service"] == "share"
        ] == []
        with pytest.raises(LeaseLost):
            await backend.heartbeat(leases[0])


async def test_holding_one_critical_or_withdrawing_it_changes_only_it(
    shared_consul: ConsulServer,
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        instances = _instances("hold")
        leases = await _register_all(backend, instances)
        told: list[tuple[str, LivenessNews]] = []
        for lease in leases:
            backend.follow(lease, lambda news, i=lease.instance.id: told.append((i, news)))
        watcher = AsyncWatcher(backend, "hold")
        events: list[tuple[EventType, str, HealthStatus | None]] = []
        await watcher.start()
        try:
            assert await watcher.wait_synced(10)
            assert len(watcher.snapshot("hold")) == COUNT

            async def collect() -> None:
                async for event in watcher:
                    events.append((event.type, event.instance.id, event.status))

            collector = asyncio.ensure_future(collect())
            one, two = leases[3], leases[7]
            await backend.set_status(one, HealthStatus.CRITICAL, "unhealthy: disk full")
            await _wait_for("the held one's event", lambda: len(events) >= COUNT + 1, 5)
            checks = server.api("/v1/agent/checks")
            health = checks[f"service:{one.instance.id}:health"]
            assert (health["Status"], health["Output"]) == ("critical", "unhealthy: disk full")
            assert [c for c in checks if c.endswith(":health")] == [
                f"service:{one.instance.id}:health"
            ]
            found = await backend.lookup(one)
            assert found is not None
            assert found.status is HealthStatus.CRITICAL
            assert found.note == "unhealthy: disk full"
            passing = server.api("/v1/health/service/hold?passing=1")
            assert sorted(e["Service"]["ID"] for e in passing) == sorted(
                lease.instance.id for lease in leases if lease is not one
            )
            # Healthy again: the health check goes, the alias alone remains.
            await backend.set_status(one, HealthStatus.PASSING, "")
            await _wait_for("the recovered one's event", lambda: len(events) >= COUNT + 2, 5)
            assert f"service:{one.instance.id}:health" not in server.api("/v1/agent/checks")
            await backend.deregister(two)
            await _wait_for("the withdrawn one's event", lambda: len(events) >= COUNT + 3, 5)
            # A whole TTL more: the verification reads all back and finds nothing to say.
            await asyncio.sleep(TTL + 1)
            # The replayed ADDED of all 20 first, then exactly the three changes.
            assert sorted(events[:COUNT]) == sorted(
                (EventType.ADDED, lease.instance.id, HealthStatus.PASSING) for lease in leases
            )
            assert events[COUNT:] == [
                (EventType.OFFLINE, one.instance.id, HealthStatus.CRITICAL),
                (EventType.ONLINE, one.instance.id, HealthStatus.PASSING),
                (EventType.DELETED, two.instance.id, None),
            ], events
            assert told == [], told
            assert len(_heartbeats(server)) == 1
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        finally:
            await watcher.close()
            for lease in leases:
                await backend.deregister(lease)


async def test_verification_tells_only_the_entry_that_changed(
    shared_consul: ConsulServer, measured: Measured
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        stand = _Stand(backend, _instances("verify"))
        await stand.start()
        try:
            victim, moved = stand.instances[2], stand.instances[5]
            # Someone removes one service's alias check, and re-registers another elsewhere.
            server.api(f"/v1/agent/check/deregister/service:{victim.id}", method="PUT")
            server.api(
                "/v1/agent/service/register",
                method="PUT",
                body={"Name": "verify", "ID": moved.id, "Address": "127.0.0.1", "Port": 1},
            )
            took = await _wait_for(
                "both told VERIFY", lambda: len({i for i, _ in stand.news}) >= 2, TTL + 2
            )
            await asyncio.sleep(0.2)
            assert sorted(stand.news) == sorted(
                [(victim.id, LivenessNews.VERIFY), (moved.id, LivenessNews.VERIFY)]
            ), stand.news
            # lookup() finds each entry is not ours any more: the registrar registers again.
            assert await backend.lookup(stand.leases[victim.id]) is None
            measured("changed entry told VERIFY", took, TTL + 2)
        finally:
            await stand.close()
            for lease in stand.leases.values():
                await backend.deregister(lease)


async def test_heartbeat_removed_by_an_operator_brings_every_entry_back(
    shared_consul: ConsulServer, measured: Measured
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        stand = _Stand(backend, _instances("removed"))
        await stand.start()
        try:
            (beat_id,) = _heartbeats(server)
            server.api(f"/v1/agent/service/deregister/{beat_id}", method="PUT")
            took = await _wait_for(
                "all re-registered", lambda: stand.reregistered >= COUNT, TTL / 3 + 3
            )
            assert {news for _, news in stand.news} == {LivenessNews.RENEWAL}
            assert list(_heartbeats(server)) == [beat_id]  # the same heartbeat, registered again
            checks = server.api("/v1/agent/checks")
            assert all(checks[f"service:{i.id}"]["Status"] == "passing" for i in stand.instances)
            measured("heartbeat removed -> all back", took, TTL / 3 + 3)
        finally:
            await stand.close()
            for lease in stand.leases.values():
                await backend.deregister(lease)


async def test_agent_restarted_empty_all_back(
    consul_server: ConsulServer, measured: Measured
) -> None:
    async with _backend(consul_server) as backend:
        stand = _Stand(backend, _instances("wiped"))
        await stand.start()
        try:
            await asyncio.to_thread(consul_server.restart, wipe=True)
            back = TTL / 3 + 2  # one renewal finds the heartbeat gone, then all re-register

            def all_back() -> bool:
                services = consul_server.api("/v1/agent/services")
                return (
                    sum(s["Service"] == "wiped" for s in services.values()) == COUNT
                    and sum(s["Service"] == HEARTBEAT_NAME for s in services.values()) == 1
                )

            took = await _wait_for("all back after the wipe", all_back, back)
            await _wait_for("every alias passing", lambda: _all_passing(consul_server), 2)
            measured("wiped agent ready -> all back", took, back)
        finally:
            await stand.close()


def _all_passing(server: ConsulServer) -> bool:
    entries = server.api("/v1/health/service/wiped")
    return len(entries) == COUNT and all(
        c["Status"] == "passing" for e in entries for c in e["Checks"]
    )


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from registry_agent import ServiceInstance
    from registry_agent_consul import ConsulBackend

    async def main() -> None:
        backend = ConsulBackend("127.0.0.1", int(sys.argv[1]), deregister_critical_after=60)
        ttl = float(sys.argv[2])
        await asyncio.gather(*(
            backend.register_shared(
                ServiceInstance("killed", address="127.0.0.1", port=9000 + i), ttl=ttl
            )
            for i in range(int(sys.argv[3]))
        ))
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_kill_9_turns_every_service_critical_within_the_ttl(
    persistent_consul_server: ConsulServer, measured: Measured
) -> None:
    server = persistent_consul_server
    holder = _spawn([sys.executable, "-c", _HOLDER, str(server.http_port), str(TTL), str(COUNT)])
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30)
        assert line.strip() == "registered"
        (beat_id,) = _heartbeats(server)
        assert f"-{holder.pid}-3s-" in beat_id
        # What Consul was given: every alias and the heartbeat reap after 60s (data folder).
        given = {}
        for path in (server.data_dir / "checks").iterdir():
            if path.is_file():
                data = json.loads(path.read_text())
                given[data["Check"]["CheckID"]] = data["ChkType"]
        for i in range(COUNT):
            alias = given[f"service:killed-127.0.0.1-{9000 + i}"]
            assert alias["AliasService"] == beat_id
            assert alias["DeregisterCriticalServiceAfter"] == 60 * 10**9  # nanoseconds
        assert given[f"service:{beat_id}"]["DeregisterCriticalServiceAfter"] == 60 * 10**9
        entries = server.api("/v1/health/service/killed?passing=1")
        assert len(entries) == COUNT
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        bound = TTL + 3  # the TTL, then Consul (a busy Go process here) turns each alias

        def all_critical() -> bool:
            entries = server.api("/v1/health/service/killed")
            return len(entries) == COUNT and all(
                any(c["Status"] == "critical" for c in e["Checks"]) for e in entries
            )

        took = await _wait_for("every service critical", all_critical, bound)
        measured("kill -9 -> all 20 critical", took, bound)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


async def test_consul_watch_shows_the_alias_checks(shared_consul: ConsulServer) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        leases = await _register_all(backend, _instances("seen", 3))
        await backend.set_status(leases[0], HealthStatus.CRITICAL, "unhealthy: db")
        watch = _spawn(
            [
                find_binary("consul"),
                "watch",
                f"-http-addr={server.host}:{server.http_port}",
                "-type=service",
                "-service=seen",
            ]
        )
        try:
            assert watch.stdout is not None
            out = await asyncio.wait_for(asyncio.to_thread(_read_json_array, watch.stdout), 15)
        finally:
            watch.terminate()
            watch.wait()
            assert watch.stdout is not None
            watch.stdout.close()
            for lease in leases:
                await backend.deregister(lease)
        by_id = {e["Service"]["ID"]: {c["CheckID"]: c for c in e["Checks"]} for e in out}
        assert set(by_id) == {lease.instance.id for lease in leases}
        for lease in leases:
            alias = by_id[lease.instance.id][f"service:{lease.instance.id}"]
            assert alias["Status"] == "passing"
            assert alias["Type"] == "alias"
        held = by_id[leases[0].instance.id][f"service:{leases[0].instance.id}:health"]
        assert (held["Status"], held["Output"]) == ("critical", "unhealthy: db")
        assert f"service:{leases[1].instance.id}:health" not in by_id[leases[1].instance.id]


def _read_json_array(stream: Any) -> Any:
    """Read `consul watch`'s first output: one pretty-printed JSON array."""
    text = ""
    for line in stream:
        text += line
        if line.rstrip() == "]":
            return json.loads(text)
    raise AssertionError(f"consul watch ended: {text!r}")


async def test_a_token_without_the_heartbeat_service_falls_back_to_a_check_per_registration(
    acl: AclConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry_agent")
    server = acl.server
    orders = _instances("orders", 2)

    def token_of(rules: str, name: str) -> str:
        policy = server.api("/v1/acl/policy", method="PUT", body={"Name": name, "Rules": rules})
        body = {"Policies": [{"ID": policy["ID"]}]}
        return str(server.api("/v1/acl/token", method="PUT", body=body)["SecretID"])

    orders_only = token_of(ORDERS_ONLY_RULES, "orders-only-services")
    backend = ConsulBackend("127.0.0.1", server.http_port, token=orders_only)
    try:
        leases = [await backend.register_shared(i, ttl=TTL) for i in orders]
        assert [lease.shared for lease in leases] == [False, False]  # today's shape
        checks = server.api("/v1/agent/checks")
        assert {f"service:{i.id}" for i in orders} <= set(checks)
        assert all(checks[f"service:{i.id}"]["Type"] == "ttl" for i in orders)
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1, warned  # once, not per registration
        assert f"grant service:write on '{HEARTBEAT_NAME}'" in warned[0]
        for lease in leases:
            await backend.heartbeat(lease)  # renewed by the caller, as register()'s
            await backend.deregister(lease)
    finally:
        await backend.close()
    # The documented policy: the service's own rule plus the heartbeat service's.
    assert f'service "{HEARTBEAT_NAME}" {{ policy = "write" }}' in RULES
    backend = ConsulBackend("127.0.0.1", server.http_port, token=acl.token)
    try:
        leases = [await backend.register_shared(i, ttl=TTL) for i in orders]
        assert [lease.shared for lease in leases] == [True, True]
        assert len(_heartbeats(server)) == 1
        checks = server.api("/v1/agent/checks")
        assert all(checks[f"service:{i.id}"]["Type"] == "alias" for i in orders)
    finally:
        await backend.close()
    assert _heartbeats(server) == {}  # close() removed it


async def test_many_registrations_at_once_are_written_with_bounded_concurrency(
    shared_consul: ConsulServer,
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        http = backend.api.http
        send = http._request
        in_flight = peak = 0

        async def counted(callback: Any, method: str, path: str, *args: Any) -> Any:
            nonlocal in_flight, peak
            if path != "/v1/agent/service/register":  # the writes (not the heartbeat's own)
                return await send(callback, method, path, *args)
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send(callback, method, path, *args)
            finally:
                in_flight -= 1

        http._request = counted
        instances = _instances("burst", 200)
        leases = await _register_all(backend, instances)
        assert 1 < peak <= 8, peak  # concurrent, and never more than 8 writes at once
        assert (
            sum(s["Service"] == "burst" for s in server.api("/v1/agent/services").values()) == 200
        )
        await asyncio.gather(*(backend.deregister(lease) for lease in leases))
        assert _heartbeats(server) == {}


async def test_maintenance_mode_is_told_once_when_it_starts_and_once_when_it_ends(
    shared_consul: ConsulServer,
) -> None:
    server = shared_consul
    async with _backend(server) as backend:
        stand = _Stand(backend, _instances("maint", 5))
        await stand.start()
        try:
            target = stand.instances[1]
            path = f"/v1/agent/service/maintenance/{target.id}"
            server.api(f"{path}?enable=true&reason=disk%20swap", method="PUT")
            await _wait_for("told VERIFY", lambda: len(stand.news) >= 1, TTL + 2)
            found = await backend.lookup(stand.leases[target.id])
            assert found is not None
            assert found.status is HealthStatus.CRITICAL
            assert "disk swap" in found.note
            await asyncio.sleep(TTL + 0.5)  # a verification later: nothing new to tell
            assert stand.news == [(target.id, LivenessNews.VERIFY)]
            server.api(f"{path}?enable=false", method="PUT")
            await _wait_for("told again", lambda: len(stand.news) >= 2, TTL + 2)
            assert stand.news == [(target.id, LivenessNews.VERIFY)] * 2
        finally:
            await stand.close()
            for lease in stand.leases.values():
                await backend.deregister(lease)


async def test_an_agent_restarted_with_its_data_has_every_alias_passing_again(
    persistent_consul_server: ConsulServer, measured: Measured
) -> None:
    """Consul 1.8 restored some alias checks critical after a restart that kept its data
    and left them so for about a minute (1 to 11 of 100 each time): the heartbeat renews
    at once, reads every entry back, and registers again the ones whose alias is stuck."""
    server = persistent_consul_server
    instances = _instances("orders", 100)
    backend = ConsulBackend("127.0.0.1", server.http_port, deregister_critical_after=60)
    registrars = [
        AsyncRegistrar(backend, i, ttl=TTL, shared_liveness=True, retry=RetryPolicy(cap=1.0))
        for i in instances
    ]

    def not_passing() -> list[str]:
        checks = server.api("/v1/health/state/any")
        return [
            c["CheckID"]
            for c in checks
            if c["ServiceName"] == "orders" and c["Status"] != "passing"
        ]

    try:
        await asyncio.gather(*(r.start(wait_registered=30) for r in registrars))
        await _wait_for("all passing", lambda: not not_passing(), 10)
        for _ in range(2):
            server.stop()
            server.start()
            took = await _wait_for("every alias passing again", lambda: not not_passing(), TTL + 2)
            measured("restarted with data: all passing", took, TTL + 2)
            await _wait_for(
                "every registrar ready", lambda: all(r.ready for r in registrars), TTL + 2
            )
    finally:
        await asyncio.gather(*(r.stop() for r in registrars))
        await backend.close()
