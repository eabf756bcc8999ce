"""Garbage in the registry, on real servers: watchers and registrars skip it and go on.

Someone (a bug, an old client, an attacker with write access) puts values
under our prefix that are not instances: random bytes, invalid UTF-8, deep
nesting, huge values, JSON of the wrong shape. The watcher must keep
delivering exact events for the real instances, never emit a corrupt one,
and warn once per bad key; a registrar whose own key is overwritten repairs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator

import aetcd
import httpx
import pytest

from integration.event_log import EventLog
from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    EventType,
    RetryPolicy,
    ServiceInstance,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer

ORDERS = ServiceInstance("orders", id="orders-1", address="127.0.0.1", port=8080)
LATE = ServiceInstance("orders", id="orders-late", address="127.0.0.1", port=8081)
VALID = {**ORDERS.to_dict(), "status": "passing"}


def hostile_values(rng: random.Random, count: int) -> list[bytes]:
    """Values that are never a valid instance of ``orders`` (seeded, so reproducible)."""
    broken_fields: list[dict[str, object]] = [
        {"port": 0},
        {"port": 70000},
        {"port": "8080"},
        {"port": True},
        {"service": "billing"},
        {"service": None},
        {"address": "a b"},
        {"address": "x\x00y"},
        {"tags": "t"},
        {"tags": [1, 2]},
        {"meta": {"k": 1}},
        {"meta": []},
        {"status": "sunny"},
        {"id": "../etc"},
    ]
    values: list[bytes] = [
        b"",
        b"\xff\xfe\xfd",
        b"[" * 50_000,
        b"{" + b'"a":{' * 20_000,
        json.dumps({**VALID, "meta": {"big": "v" * 1_000_000, "bad": 1}}).encode(),
        b"null",
        b"[]",
        b'"orders-1"',
    ]
    while len(values) < count:
        kind = rng.randrange(3)
        if kind == 0:
            values.append(rng.randbytes(rng.randrange(1, 200)))
        elif kind == 1:
            values.append(json.dumps({**VALID, **rng.choice(broken_fields)}).encode())
        else:
            doc = json.dumps({**VALID, **rng.choice(broken_fields)}).encode()
            cut = rng.randrange(1, len(doc))
            values.append(doc[:cut])
    return values


def assert_valid(events: list[WatchEvent]) -> None:
    for event in events:
        instance = event.instance
        assert instance.service == "orders"
        assert instance.id in {ORDERS.id, LATE.id}, instance
        assert ServiceInstance.from_dict(instance.to_dict()) == instance


@pytest.fixture
async def watching(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    server = request.getfixturevalue(request.param)
    watcher = AsyncWatcher(server.url, "orders", retry=RetryPolicy(initial=0.05, cap=0.5))
    async with EventLog(watcher) as events:
        yield events


@pytest.mark.parametrize("watching", ["etcd_server"], indirect=True)
async def test_etcd_garbage_under_the_prefix(
    etcd_server: EtcdServer, watching: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry_agent")
    reg = AsyncRegistrar(
        open_backend(etcd_server.url), ORDERS, ttl=2, retry=RetryPolicy(initial=0.05, cap=0.5)
    )
    await reg.start(wait_registered=10)
    raw = aetcd.Client(port=etcd_server.client_port)
    other = open_backend(etcd_server.url)
    try:
        await watching.wait_for((EventType.ADDED, ORDERS.id), 5)
        values = hostile_values(random.Random(7), 150)
        for i, value in enumerate(values):
            await raw.put(f"/services/orders/junk-{i}".encode(), value)
        await raw.put(b"/services/orders/\xff\xfe", b"{}")  # a key that is not UTF-8
        await other.register(LATE, ttl=30)
        await watching.wait_for((EventType.ADDED, LATE.id), 10)  # it went on
        # Our own key overwritten with garbage: withdrawn for watchers, then repaired.
        await raw.put(f"/services/orders/{ORDERS.id}".encode(), b"\x00garbage")
        broken = time.monotonic()
        await watching.wait_for((EventType.DELETED, ORDERS.id), 5)
        deadline = time.monotonic() + reg.ttl + 5
        while time.monotonic() < deadline:
            if sum(e.type is EventType.ADDED and e.instance.id == ORDERS.id for e in watching) > 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the registrar never repaired its key")
        assert time.monotonic() - broken < reg.ttl + 5
        assert_valid(watching)
        snapshot = await other.list("orders")
        assert sorted(snapshot.instances) == [ORDERS.id, LATE.id]
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
        await other.close()
        await raw.close()
    warned = [r for r in caplog.records if getattr(r, "event", "") == "skip_foreign"]
    assert warned, "garbage must be reported"
    # Once per bad key and client (watcher, observer), not once per read.
    assert len(warned) <= 2 * (len(values) + 2), len(warned)


@pytest.mark.parametrize("watching", ["consul_server"], indirect=True)
async def test_consul_odd_entries(consul_server: ConsulServer, watching: EventLog) -> None:
    reg = AsyncRegistrar(open_backend(consul_server.url), ORDERS, ttl=2)
    await reg.start(wait_registered=10)
    accepted = 0
    try:
        await watching.wait_for((EventType.ADDED, ORDERS.id), 5)
        rng = random.Random(11)
        odd: list[dict[str, object]] = [
            {"Address": "a b c", "Port": 1},
            {"Address": "127.0.0.1", "Port": 0},
            {"Address": "127.0.0.1", "Port": 1, "Tags": ["\x00", "é" * 5000]},
            {"Address": "127.0.0.1", "Port": 1, "Meta": {"k": "v" * 512}},
            {"Address": "127.0.0.1", "Port": 1, "ID": "orders weird id"},
        ]
        odd += [
            {"Address": "127.0.0.1", "Port": 1, "Tags": [rng.randbytes(20).decode("latin-1")]}
            for _ in range(20)
        ]
        async with httpx.AsyncClient(base_url=consul_server.http) as http:
            for i, fields in enumerate(odd):
                body = {"Name": "orders", "ID": f"odd-{i}", **fields}
                reply = await http.put("/v1/agent/service/register", json=body)
                accepted += reply.status_code == 200
        assert accepted >= 3
        await watching.wait_for((EventType.ADDED, "odd-2"), 10)
        late = open_backend(consul_server.url)
        try:
            await late.register(LATE, ttl=30)
            await watching.wait_for((EventType.ADDED, LATE.id), 10)
        finally:
            await late.close()
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
    for event in watching:
        instance = event.instance
        assert instance.service == "orders"
        assert ServiceInstance.from_registry(**instance.to_dict()) == instance
        assert instance.address.isprintable()
        assert " " not in instance.address
    ids = {e.instance.id for e in watching}
    # Entries are read as Consul holds them; only an unusable address is skipped.
    assert "odd-0" not in ids  # "a b c" is no address
    assert "odd-1" in ids
    assert "orders weird id" in ids
    assert {e.instance.port for e in watching if e.instance.id == "odd-1"} == {0}
