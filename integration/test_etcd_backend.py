"""etcd-specific behaviour on a real etcd server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aetcd
import pytest
from registry_agent_etcd import EtcdBackend

from registry_agent import RevisionCompacted, ServiceInstance, open_backend
from registry_agent.testing.servers import EtcdServer


@pytest.fixture
async def backend(etcd_server: EtcdServer) -> AsyncIterator[EtcdBackend]:
    backend = open_backend(etcd_server.url, timeout=2)
    assert isinstance(backend, EtcdBackend)
    yield backend
    await backend.close()


async def test_key_layout_and_value(backend: EtcdBackend, raw: aetcd.Client) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080, meta={"zone": "zürich"})
    lease = await backend.register(inst, ttl=5)
    got = await raw.get(f"/services/orders/{inst.id}".encode())
    assert got is not None
    assert got.lease == lease.handle
    value = json.loads(got.value)
    assert value == {**inst.to_dict(), "status": "passing"}


async def test_custom_prefix(etcd_server: EtcdServer, raw: aetcd.Client) -> None:
    backend = open_backend(etcd_server.url + "?prefix=/team-a/reg")
    try:
        inst = ServiceInstance("orders", address="h", port=1)
        await backend.register(inst, ttl=5)
        assert await raw.get(f"/team-a/reg/orders/{inst.id}".encode()) is not None
        assert set((await backend.list("orders")).instances) == {inst.id}
    finally:
        await backend.close()


GARBAGE = [
    (b"/services/orders/not-json", b"\xff\xfe not json"),
    (b"/services/orders/a-list", b"[1, 2, 3]"),
    (
        b"/services/orders/wrong-service",
        json.dumps({"service": "users", "id": "wrong-service", "address": "h", "port": 1}).encode(),
    ),
    (
        b"/services/orders/id-mismatch",
        json.dumps({"service": "orders", "id": "other", "address": "h", "port": 1}).encode(),
    ),
    (
        b"/services/orders/bad-port",
        json.dumps({"service": "orders", "id": "bad-port", "address": "h", "port": 0}).encode(),
    ),
    (
        b"/services/orders/bad-status",
        json.dumps(
            {"service": "orders", "id": "bad-status", "address": "h", "port": 1, "status": "??"}
        ).encode(),
    ),
]


async def test_foreign_values_are_logged_and_skipped(
    backend: EtcdBackend, raw: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    ours = ServiceInstance("orders", address="127.0.0.1", port=8080)
    await backend.register(ours, ttl=10)
    for key, value in GARBAGE:
        await raw.put(key, value)
    with caplog.at_level(logging.WARNING, logger="registry_agent.etcd"):
        snapshot = await backend.list("orders")
    assert set(snapshot.instances) == {ours.id}
    skipped = [r for r in caplog.records if "not a registry-agent instance" in r.getMessage()]
    assert len(skipped) == len(GARBAGE)


async def test_watch_skips_foreign_values_and_keeps_going(
    backend: EtcdBackend, raw: aetcd.Client
) -> None:
    stream = aiter(backend.watch("orders"))
    try:
        assert (await asyncio.wait_for(anext(stream), 5)).instances == {}
        for key, value in GARBAGE:
            await raw.put(key, value)
        ours = ServiceInstance("orders", address="127.0.0.1", port=8080)
        await backend.register(ours, ttl=10)
        snapshot = await asyncio.wait_for(anext(stream), 5)
        assert set(snapshot.instances) == {ours.id}
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_key_deleted_by_someone_else_is_reported(
    backend: EtcdBackend, raw: aetcd.Client
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    lease = await backend.register(inst, ttl=10)
    stream = aiter(backend.watch("orders"))
    try:
        assert set((await asyncio.wait_for(anext(stream), 5)).instances) == {inst.id}
        await raw.delete(f"/services/orders/{inst.id}".encode())
        assert (await asyncio.wait_for(anext(stream), 5)).instances == {}
        await backend.heartbeat(lease)  # the lease itself lives on: repair is the registrar's job
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_resume_from_a_compacted_revision_raises(
    backend: EtcdBackend, raw: aetcd.Client
) -> None:
    before = await backend.list("orders")
    for port in range(8000, 8005):
        await backend.register(ServiceInstance("orders", address="h", port=port), ttl=10)
    now = await backend.list("orders")
    await raw.compact(now.index)
    stream = aiter(backend.watch("orders", since=before))
    with pytest.raises(RevisionCompacted) as info:
        await asyncio.wait_for(anext(stream), 5)
    assert info.value.compacted_revision >= now.index
    await stream.aclose()  # type: ignore[attr-defined]


async def test_resume_after_the_server_was_wiped_raises(
    etcd_server: EtcdServer, backend: EtcdBackend
) -> None:
    for port in range(8000, 8005):
        await backend.register(ServiceInstance("orders", address="h", port=port), ttl=30)
    before = await backend.list("orders")
    etcd_server.restart(wipe=True)
    stream = aiter(backend.watch("orders", since=before))
    with pytest.raises(RevisionCompacted):
        await asyncio.wait_for(anext(stream), 10)
    await stream.aclose()  # type: ignore[attr-defined]
