"""Live updates (``registrar.update``, the agent's SIGHUP) and native weights, real servers.

What is proven here: a watcher sees exactly one ``updated`` and never a gap; Consul's
checks keep their status through the rewrite (a blocking query on /v1/health/service
sees no flicker); etcd keeps the key on the same lease; an update made while the
registry is paused, or while the instance is withdrawn or held critical, is applied
later and never lost; the agent's SIGHUP that changes only tags rewrites in place with
its counters running on; Consul carries the weight in its native ``Weights``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from integration.agent_process import Agent
from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    CallableCheck,
    GateState,
    HealthStatus,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

FAST = RetryPolicy(initial=0.1, cap=0.5)
TTL = 3.0


def instance(name: str) -> ServiceInstance:
    return ServiceInstance(
        name, address="127.0.0.1", port=8080, id=f"{name}-1", tags=("v1",), meta={"zone": "a"}
    )


async def eventually(predicate: Callable[[], bool], *, within: float) -> float:
    """Poll ``predicate`` every 20 ms until true; the seconds it took (fails after ``within``)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within, f"not true within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def watching(url: str, service: str) -> AsyncIterator[list[WatchEvent]]:
    """Every event our Watcher yields for ``service`` while inside."""
    events: list[WatchEvent] = []
    async with AsyncWatcher(url, service, retry=FAST) as watcher:

        async def collect() -> None:
            async for event in watcher:
                events.append(event)

        task = asyncio.create_task(collect())
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _get(url: str, timeout: float = 10.0) -> tuple[dict[str, str], Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return dict(response.headers), json.loads(response.read() or b"null")


class HealthPoll:
    """Consul's own blocking query on /v1/health/service/<service>, in a thread: every
    answer's (tags, check statuses) of ``instance_id`` (None: the entry was absent)."""

    def __init__(self, server: ConsulServer, service: str, instance_id: str) -> None:
        self.base = f"{server.http}/v1/health/service/{service}"
        self.instance_id = instance_id
        self.seen: list[tuple[tuple[str, ...], tuple[str, ...]] | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            query = urllib.parse.urlencode({"index": index, "wait": "1s"})
            try:
                headers, entries = _get(f"{self.base}?{query}")
            except OSError:
                time.sleep(0.05)
                continue
            index = int(headers.get("X-Consul-Index", "0"))
            mine = [e for e in entries if e["Service"]["ID"] == self.instance_id]
            self.seen.append(
                (
                    tuple(mine[0]["Service"]["Tags"]),
                    tuple(sorted(c["Status"] for c in mine[0]["Checks"])),
                )
                if mine
                else None
            )

    def __enter__(self) -> HealthPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _consul_service(server: ConsulServer, instance_id: str) -> dict[str, Any]:
    return _get(f"{server.http}/v1/agent/service/{instance_id}")[1]  # type: ignore[no-any-return]


async def _etcd_lease(server: EtcdServer, registrar: AsyncRegistrar) -> int:
    import aetcd

    key = registrar.backend._key_of(registrar.instance)  # type: ignore[attr-defined]
    async with aetcd.Client(host="127.0.0.1", port=server.client_port) as client:
        kv = await client.get(key)
        assert kv is not None
        return int(kv.lease)


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
async def test_one_updated_event_and_no_gap(
    server: ServerProcess, shared: bool, measured: Callable[[str, float, float], None]
) -> None:
    name = f"live-{'s' if shared else 'o'}"
    registrar = AsyncRegistrar(
        server.url, instance(name), ttl=TTL, retry=FAST, shared_liveness=shared
    )
    consul = server if isinstance(server, ConsulServer) else None
    etcd = server if isinstance(server, EtcdServer) else None
    async with watching(server.url, name) as events:
        await registrar.start(wait_registered=10)
        await eventually(lambda: [e.type for e in events] == ["added"], within=10)
        lease = None if etcd is None else await _etcd_lease(etcd, registrar)
        poll = HealthPoll(consul, name, f"{name}-1") if consul is not None else None
        with poll if poll is not None else contextlib.nullcontext():
            await asyncio.sleep(0.3)  # the poll holds its first answer
            started = time.monotonic()
            await registrar.update(tags=["v2", "canary"], meta={"zone": "b"}, weight=3)
            returned = time.monotonic() - started
            took = await eventually(lambda: len(events) >= 2, within=10)
            await asyncio.sleep(TTL + 1)  # heartbeats and read-backs find nothing to repair
        assert [e.type for e in events] == ["added", "updated"], events
        assert events[1].instance.tags == ("v2", "canary")
        assert dict(events[1].instance.meta) == {"zone": "b", "weight": "3"}
        assert events[1].healthy
        counters = registrar.counters.to_dict()
        assert counters["registrations"] == 1
        assert counters["lease_losses"] == counters["reregistrations"] == 0
        assert registrar.ready
        if consul is not None and poll is not None:
            assert poll.seen, "the blocking query never answered"
            answers = [answer for answer in poll.seen if answer is not None]
            assert len(answers) == len(poll.seen), poll.seen  # never absent
            assert all(set(checks) == {"passing"} for _, checks in answers), answers  # no flicker
            assert answers[0][0] == ("v1",), answers
            assert answers[-1][0] == ("v2", "canary"), answers
            weights = {"Passing": 3, "Warning": 1}
            assert _consul_service(consul, f"{name}-1")["Weights"] == weights
            catalog = _get(f"{consul.http}/v1/catalog/service/{name}")[1]
            assert catalog[0]["ServiceWeights"] == weights
        if etcd is not None:
            assert await _etcd_lease(etcd, registrar) == lease  # the same key on the same lease
        await registrar.stop()
    measured(f"update seen ({'shared' if shared else 'own'})", took, 3.0)
    print(
        f"{server.name} {'shared' if shared else 'own'}: update() returned after "
        f"{returned * 1000:.1f} ms, the watcher's updated came {took * 1000:.0f} ms after it"
    )


async def test_an_update_while_the_registry_is_paused_is_applied_when_it_answers(
    server: ServerProcess, measured: Callable[[str, float, float], None]
) -> None:
    name = "live-paused"
    # A 1 s request timeout: a paused registry fails each call quickly; TTL 8 s outlives it.
    registrar = AsyncRegistrar(
        f"{server.url}?timeout=1s", instance(name), ttl=8.0, retry=FAST, shared_liveness=False
    )
    async with watching(server.url, name) as events:
        await registrar.start(wait_registered=10)
        await eventually(lambda: [e.type for e in events] == ["added"], within=10)
        server.pause()
        try:
            await registrar.update(tags=["v2"])
            await eventually(lambda: bool(registrar.status()["last_error"]), within=10)
        finally:
            server.resume()
        took = await eventually(lambda: len(events) >= 2, within=15)
        await asyncio.sleep(1.0)
        assert [e.type for e in events] == ["added", "updated"], events
        assert events[1].instance.tags == ("v2",)
        assert registrar.counters.lease_losses == 0
        await registrar.stop()
    measured("applied after resume", took, 8.0)
    print(f"{server.name}: update applied {took:.2f}s after the registry answered again")


async def test_an_update_while_withdrawn_is_registered_with_the_new_values(
    server: ServerProcess,
) -> None:
    name = "live-withdrawn"
    healthy = True
    check = CallableCheck(lambda: healthy, name="app", interval=0.1)
    registrar = AsyncRegistrar(
        server.url, instance(name), ttl=TTL, retry=FAST, checks=[check], rise=1, fall=1
    )
    async with watching(server.url, name) as events:
        await registrar.start(wait_registered=10)
        await eventually(lambda: [e.type for e in events] == ["added"], within=10)
        healthy = False
        await eventually(lambda: registrar.state is GateState.WITHDRAWN, within=5)
        await eventually(lambda: [e.type for e in events][-1:] == ["deleted"], within=10)
        await registrar.update(tags=["v3"], weight=2)
        await asyncio.sleep(0.5)
        assert [e.type for e in events] == ["added", "deleted"]  # nothing written meanwhile
        healthy = True
        await eventually(lambda: len(events) >= 3, within=10)
        assert events[2].type == "added"
        assert events[2].instance.tags == ("v3",)
        assert events[2].instance.meta["weight"] == "2"
        await registrar.stop()


async def test_consul_an_entry_held_critical_stays_critical_through_an_update(
    consul_server: ConsulServer,
) -> None:
    name = "live-critical"
    healthy = True
    check = CallableCheck(lambda: healthy, name="app", interval=0.1)
    registrar = AsyncRegistrar(
        consul_server.url,
        instance(name),
        ttl=TTL,
        retry=FAST,
        checks=[check],
        rise=1,
        fall=1,
        on_unhealthy="critical",
    )
    async with watching(consul_server.url, name) as events:
        await registrar.start(wait_registered=10)
        healthy = False
        await eventually(
            lambda: bool(events) and events[-1].status is HealthStatus.CRITICAL, within=10
        )
        count = len(events)
        with HealthPoll(consul_server, name, f"{name}-1") as poll:
            await asyncio.sleep(0.3)
            await registrar.update(tags=["v4"])
            await eventually(lambda: len(events) > count, within=10)
            await asyncio.sleep(TTL)
        assert [e.type for e in events[count:]] == ["updated"]
        assert events[-1].status is HealthStatus.CRITICAL
        assert events[-1].instance.tags == ("v4",)
        answers = [answer for answer in poll.seen if answer is not None]
        assert answers, "the blocking query never answered"
        assert len(answers) == len(poll.seen), poll.seen  # never absent
        assert all("critical" in checks for _, checks in answers), answers  # never passing
        await registrar.stop()


def test_agent_sighup_that_changes_only_tags_updates_in_place(
    server: ServerProcess,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    service = """
[[service]]
name = "live-agent"
id = "live-agent-1"
address = "127.0.0.1"
port = 8080
ttl = "3s"
tags = [{tags}]
weight = {weight}
"""
    agent = Agent(tmp_path, server.url, service.format(tags='"v1"', weight=1))
    agents.append(agent.start())
    agent.until("/readyz", 200)
    time.sleep(1.5)
    before = agent.until("/status", 200)["services"][0]["counters"]

    async def observe() -> tuple[list[WatchEvent], float]:
        async with watching(server.url, "live-agent") as events:
            await eventually(lambda: len(events) == 1, within=10)
            agent.write(service.format(tags='"v1", "v2"', weight=5))
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            took = await eventually(lambda: len(events) >= 2, within=10)
            await asyncio.sleep(3.5)  # more than the TTL: nothing withdrawn, nothing lost
            return list(events), took

    events, took = asyncio.run(observe())
    assert [e.type for e in events] == ["added", "updated"], events
    assert events[1].instance.tags == ("v1", "v2")
    assert events[1].instance.meta["weight"] == "5"
    status = agent.until("/status", 200)
    after = status["services"][0]["counters"]
    assert status["agent"]["reloads"] == 1
    assert after["registrations"] == before["registrations"] == 1
    assert after["deregistrations"] == after["lease_losses"] == 0
    # The counters ran on (a shared heartbeat answers from memory: its count grows too).
    assert after["heartbeats_ok"] + after["verifications"] > (
        before["heartbeats_ok"] + before["verifications"]
    )
    assert "1 updated in place" in agent.logs()
    code, metrics = agent.get("/metrics")
    assert code == 200
    assert "live-agent" in metrics
    if isinstance(server, ConsulServer):
        assert _consul_service(server, "live-agent-1")["Weights"]["Passing"] == 5
    assert agent.stop() == 0
    measured("SIGHUP to updated event", took, 5.0)


async def test_consul_a_peers_native_weight_reads_as_its_weight(
    consul_server: ConsulServer,
) -> None:
    body = {
        "Name": "live-peer",
        "ID": "peer-1",
        "Address": "127.0.0.1",
        "Port": 9000,
        "Weights": {"Passing": 7, "Warning": 1},
    }
    request = urllib.request.Request(
        f"{consul_server.http}/v1/agent/service/register",
        data=json.dumps(body).encode(),
        method="PUT",
    )
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).close())
    backend = open_backend(consul_server.url)
    try:
        snapshot = await backend.list("live-peer")
        assert snapshot.instances["peer-1"].instance.meta == {"weight": "7"}
    finally:
        await backend.close()
    async with watching(consul_server.url, "live-peer") as events:
        await eventually(lambda: bool(events), within=10)
        assert events[0].instance.meta == {"weight": "7"}


@pytest.mark.parametrize("fmt", ["kratos", "go-micro", "go-zero"])
async def test_etcd_peer_formats_update_what_they_carry(etcd_server: EtcdServer, fmt: str) -> None:
    # kratos and go-micro carry the meta (go-micro's metadata; kratos's metadata): one
    # updated event; go-zero carries host:port only: its value is unchanged, no event.
    name = f"live-{fmt}"
    url = f"{etcd_server.url}?format={fmt}&timeout=2"
    plain = ServiceInstance(name, address="127.0.0.1", port=8080, id=f"{name}-1", scheme="http")
    registrar = AsyncRegistrar(url, plain, ttl=TTL, retry=FAST)
    async with watching(url, name) as events:
        await registrar.start(wait_registered=10)
        await eventually(lambda: [e.type for e in events] == ["added"], within=10)
        seen: list[Any] = []
        registrar.on_event = lambda event: seen.append(event.kind)
        await registrar.update(meta={"zone": "b"}, weight=4)
        await eventually(lambda: "updated" in seen, within=10)
        await asyncio.sleep(TTL + 1)
        if fmt == "go-zero":
            assert [e.type for e in events] == ["added"], events
        else:
            assert [e.type for e in events] == ["added", "updated"], events
            assert dict(events[1].instance.meta) == {"zone": "b", "weight": "4"}
        counters = registrar.counters.to_dict()
        assert counters["lease_losses"] == counters["reregistrations"] == 0
        assert seen.count("updated") == 1
        await registrar.stop()


async def test_consul_a_weight_above_65535_is_refused_and_the_entry_kept(
    consul_server: ConsulServer,
) -> None:
    # Consul 1.8 answers 400 ("Invalid Weights: DNS Weight must be between 0 and 65535")
    # to a larger native weight on every write: refused up front, before any write.
    name = "live-bigweight"
    registrar = AsyncRegistrar(consul_server.url, instance(name), ttl=TTL, retry=FAST)
    await registrar.start(wait_registered=10)
    try:
        await registrar.update(weight=65535)
        await eventually(
            lambda: _consul_service(consul_server, f"{name}-1")["Weights"]["Passing"] == 65535,
            within=10,
        )
        with pytest.raises(Rejected, match=r"meta\.weight: Consul takes weights up to 65535"):
            await registrar.update(weight=65536)
        assert registrar.instance.meta["weight"] == "65535"  # the update was not taken
        await registrar.update(tags=["v2"], weight=3)  # later updates still go through
        await eventually(
            lambda: _consul_service(consul_server, f"{name}-1")["Weights"]["Passing"] == 3,
            within=10,
        )
        assert _consul_service(consul_server, f"{name}-1")["Tags"] == ["v2"]
        assert registrar.counters.to_dict()["errors"] == 0
        assert registrar.status()["last_error"] is None
    finally:
        await registrar.stop()
    big = ServiceInstance(name, address="127.0.0.1", port=8081, meta={"weight": 65536})  # type: ignore[dict-item]
    refused = AsyncRegistrar(consul_server.url, big, ttl=TTL, retry=FAST)
    with pytest.raises(Rejected, match=r"meta\.weight"):
        await refused.start(wait_registered=10)
    await refused.stop()
    assert _get(f"{consul_server.http}/v1/health/service/{name}")[1] == []


async def test_a_peers_text_weight_that_is_not_a_number_is_read(server: ServerProcess) -> None:
    # We refuse to write "-1" or "3.0" as a weight; another tool's entry that has one
    # is still an instance (weighted choice reads it leniently).
    name = "live-oddweight"
    if isinstance(server, ConsulServer):
        body = {"Name": name, "ID": "peer-1", "Address": "127.0.0.1", "Port": 9000}
        body["Meta"] = {"weight": "-1"}
        request = urllib.request.Request(
            f"{server.http}/v1/agent/service/register",
            data=json.dumps(body).encode(),
            method="PUT",
        )
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).close())
    else:
        import aetcd

        assert isinstance(server, EtcdServer)
        value = {"service": name, "id": "peer-1", "address": "127.0.0.1", "port": 9000}
        value["meta"] = {"weight": "-1"}
        async with aetcd.Client(host="127.0.0.1", port=server.client_port) as client:
            await client.put(f"/services/{name}/peer-1".encode(), json.dumps(value).encode())
    backend = open_backend(server.url)
    try:
        snapshot = await backend.list(name)
        assert snapshot.instances["peer-1"].instance.meta == {"weight": "-1"}
    finally:
        await backend.close()
    async with watching(server.url, name) as events:
        await eventually(lambda: bool(events), within=10)
        assert events[0].instance.meta == {"weight": "-1"}


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
async def test_consul_an_update_after_someone_removed_the_entry_counts_a_reregistration(
    consul_server: ConsulServer, shared: bool
) -> None:
    # A register of the same id would put the entry back unnoticed: the update reads
    # it first and, gone, registers it again as a read-back would (one lease loss, one
    # re-registration), with the new values.
    name = f"live-gone-{'s' if shared else 'o'}"
    registrar = AsyncRegistrar(
        consul_server.url, instance(name), ttl=TTL, retry=FAST, shared_liveness=shared
    )
    kinds: list[str] = []
    registrar.on_event = lambda event: kinds.append(str(event.kind))
    await registrar.start(wait_registered=10)
    try:
        request = urllib.request.Request(
            f"{consul_server.http}/v1/agent/service/deregister/{name}-1", method="PUT"
        )
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).close())
        await registrar.update(tags=["after"], weight=2)
        await eventually(lambda: "reregistered" in kinds, within=10)
        entry = _consul_service(consul_server, f"{name}-1")
        assert entry["Tags"] == ["after"]
        assert entry["Meta"]["weight"] == "2"
        counters = registrar.counters.to_dict()
        assert counters["lease_losses"] == counters["reregistrations"] == 1, counters
        assert counters["registrations"] == 1
        assert counters["errors"] == 0
        assert kinds.count("lease_lost") == 1, kinds
        await eventually(lambda: registrar.ready, within=10)
        checks = _get(f"{consul_server.http}/v1/agent/checks")[1]
        mine = [c for c in checks.values() if c["ServiceID"] == f"{name}-1"]
        assert mine
        assert all(c["Status"] == "passing" for c in mine), mine
    finally:
        await registrar.stop()
