"""etcd format=go-micro on a real etcd 3.5.16: what we write, go-micro reads; what go-micro
writes, we read.

Peer rules followed here, from micro/go-micro v6.10.0 ``registry/etcd/etcd.go`` (the
same in v5.30.0, go-micro/plugins v4 ``v4/registry/etcd``, v3.7.0 and v2.9.1):

- writer, ``registerNode``: ``Grant(TTL)`` (``server/server.go``: ``DefaultRegisterTTL``
  90 s), then ``Put(nodePath(name, node.Id), json.Marshal(service holding that one
  node), WithLease(lease))``; ``nodePath`` is ``/micro/registry/<name>/<id>``, ``/``
  in either replaced by ``-``; a server registers again every ``RegisterInterval``
  (30 s), which puts a deleted key back;
- reader, ``GetService``: ``Get("/micro/registry/<name>/", WithPrefix())``, each value
  ``json.Unmarshal``-ed into a ``registry.Service`` (skipped when that fails), grouped
  by ``version``, the nodes of each group joined; a client then dials a node's
  ``address`` (``selector``, ``client``), reading its ``metadata`` (``protocol``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aetcd

from integration.event_log import EventLog
from integration.peer_kit import MARGIN, RETRY, TTL, dial, etcdctl, listening, until
from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    AsyncWatcher,
    Discovery,
    EventType,
    HealthStatus,
    ServiceInstance,
    Watcher,
    open_backend,
)
from registry_agent.testing.servers import EtcdServer

SERVICE = "helloworld"
GO_MICRO_TTL = 90  # server/server.go: DefaultRegisterTTL
Measured = Callable[[str, float, float], None]


def url(server: EtcdServer) -> str:
    return f"{server.url}?format=go-micro&timeout=2"


def node_path(name: str, node_id: str) -> bytes:
    """go-micro's nodePath(name, id)."""
    return f"/micro/registry/{name.replace('/', '-')}/{node_id.replace('/', '-')}".encode()


async def go_micro_get_service(raw: aetcd.Client, name: str) -> list[dict[str, Any]]:
    """What go-micro's ``GetService(name)`` returns: one service per version, nodes joined."""
    by_version: dict[str, dict[str, Any]] = {}
    prefix = f"/micro/registry/{name.replace('/', '-')}/".encode()
    for kv in await raw.get_prefix(prefix):
        try:
            decoded = json.loads(kv.value)
        except ValueError:
            continue  # decode() gives nil: skipped
        if not isinstance(decoded, dict):
            continue
        group = by_version.setdefault(
            decoded.get("version", ""), {**decoded, "nodes": []}
        )  # the first value of a version gives name, metadata and endpoints
        group["nodes"].extend(decoded.get("nodes") or [])
    return list(by_version.values())


# (a) what we write is what a go-micro server writes, and go-micro's reader finds it
async def test_registrar_writes_what_go_micro_reads(
    etcd_server: EtcdServer, raw: aetcd.Client, measured: Measured
) -> None:
    async with listening() as port:
        inst = ServiceInstance(
            SERVICE,
            address="127.0.0.1",
            port=port,
            id="helloworld-py-1",
            meta={"zone": "zürich", "q": "a<b&c"},
            scheme="grpc",
            version="1.4.0",
        )
        key = node_path(SERVICE, inst.id)
        # registry.Service{name, version, metadata, endpoints, nodes[Node{metadata, id,
        # address}]} as Go's json.Marshal writes it: sorted map keys, <>& escaped.
        written = (
            '{"name":"helloworld","version":"1.4.0","metadata":null,"endpoints":[],'
            '"nodes":[{"metadata":{"protocol":"grpc","q":"a\\u003cb\\u0026c","zone":"zürich"},'
            f'"id":"helloworld-py-1","address":"127.0.0.1:{port}"}}]}}'
        ).encode()
        backend = open_backend(url(etcd_server))
        reg = AsyncRegistrar(backend, inst, ttl=TTL, retry=RETRY)
        await reg.start(wait_registered=10)
        try:
            got = await raw.get(key)
            assert got is not None
            assert got.value == written
            printed = etcdctl(etcd_server, "get", key.decode(), "--print-value-only")
            assert printed.encode() == written + b"\n"
            assert got.lease != 0
            info = await raw.get_lease_info(got.lease)
            assert 0 < info.TTL <= TTL
            assert key in list(info.keys)

            # go-micro's GetService and a client's pick: the node we meant.
            (service,) = await go_micro_get_service(raw, SERVICE)
            assert (service["name"], service["version"]) == (SERVICE, "1.4.0")
            (node,) = service["nodes"]
            assert node == {
                "metadata": {"protocol": "grpc", "q": "a<b&c", "zone": "zürich"},
                "id": inst.id,
                "address": f"127.0.0.1:{port}",
            }
            assert await dial(node["address"]) == b"hello"
            # Our reader on the same format: exactly the instance (it has no tags to lose).
            snapshot = await backend.list(SERVICE)
            assert list(snapshot.instances) == [inst.id]
            assert snapshot.instances[inst.id].instance == inst
            assert snapshot.instances[inst.id].status is HealthStatus.PASSING

            # Deleted behind its back: back, byte for byte, within a verify period.
            assert etcdctl(etcd_server, "del", key.decode()).strip() == "1"
            took = await until(lambda: raw.get(key), TTL)
            measured("go-micro key back after del", took, reg.verify_interval + RETRY.cap + MARGIN)
            again = await raw.get(key)
            assert again is not None
            assert again.value == written
            assert again.lease != 0
            assert reg.counters.reregistrations >= 1
        finally:
            await reg.stop(timeout=5)
        assert await raw.get(key) is None
        assert await go_micro_get_service(raw, SERVICE) == []
        await backend.close()


# (b) what a go-micro server writes comes out of list(), watchers and discovery
RPC_NODE = "helloworld-0b6c2a4e-55d1-4c1e-8f3a-2f6e1d9b7c10"
GRPC_NODE = "helloworld-9e8d7c6b-1a2b-4c3d-8e9f-0a1b2c3d4e5f"


def rpc_server_value(address: str) -> bytes:
    """A go-micro v6 rpc server's entry (server/rpc_server.go Register, one handler)."""
    return (
        '{"name":"helloworld","version":"latest","metadata":null,"endpoints":[{"request":'
        '{"name":"Request","type":"Request","values":[{"name":"name","type":"string",'
        '"values":null}]},"response":{"name":"Response","type":"Response","values":'
        '[{"name":"msg","type":"string","values":null}]},"metadata":{},"name":'
        '"Helloworld.Call"}],"nodes":[{"metadata":{"broker":"http","protocol":"mucp",'
        '"registry":"etcd","server":"mucp","transport":"http"},'
        f'"id":"{RPC_NODE}","address":"{address}"}}]}}'
    ).encode()


def grpc_server_value(address: str) -> bytes:
    """A go-micro v3 grpc server's entry (Node{id, address, metadata} before v4.10.2)."""
    return (
        '{"name":"helloworld","version":"2.0.0","metadata":null,"endpoints":[],'
        f'"nodes":[{{"id":"{GRPC_NODE}","address":"{address}","metadata":'
        '{"broker":"http","protocol":"grpc","registry":"etcd","server":"grpc",'
        '"transport":"grpc"}}]}'
    ).encode()


async def go_micro_register(raw: aetcd.Client, node_id: str, value: bytes) -> int:
    """registerNode: grant a lease of the register TTL, put the node's key with it."""
    lease = await raw.lease(GO_MICRO_TTL)
    await raw.put(node_path(SERVICE, node_id), value, lease=lease)
    return int(lease.id)


async def test_go_micro_entries_are_listed_watched_and_discovered(
    etcd_server: EtcdServer, raw: aetcd.Client
) -> None:
    backend = open_backend(url(etcd_server))
    watcher = AsyncWatcher(url(etcd_server), SERVICE, retry=RETRY)
    discovery = AsyncDiscovery(url(etcd_server), sync_timeout=10)
    blocking_discovery = Discovery(url(etcd_server), sync_timeout=10)
    blocking_watcher = Watcher(url(etcd_server), SERVICE, retry=RETRY).start()
    rpc = ServiceInstance.from_registry(
        service=SERVICE,
        id=RPC_NODE,
        address="127.0.0.1",
        port=8080,
        meta={"broker": "http", "registry": "etcd", "server": "mucp", "transport": "http"},
        scheme="mucp",
    )
    grpc = ServiceInstance.from_registry(
        service=SERVICE,
        id=GRPC_NODE,
        address="::1",
        port=8081,
        meta={"broker": "http", "registry": "etcd", "server": "grpc", "transport": "grpc"},
        scheme="grpc",
        version="2.0.0",
    )
    try:
        async with EventLog(watcher) as events:
            assert await watcher.wait_synced(10)
            rpc_lease = await go_micro_register(raw, RPC_NODE, rpc_server_value("127.0.0.1:8080"))
            await go_micro_register(raw, GRPC_NODE, grpc_server_value("[::1]:8081"))
            # Not go-micro entries: another layout's value, a key one level deeper.
            await raw.put(node_path(SERVICE, "ours"), b'{"service":"helloworld","port":1}')
            await raw.put(b"/micro/registry/helloworld/x/1", rpc_server_value("h:1"))

            snapshot = await backend.list(SERVICE)
            assert set(snapshot.instances) == {RPC_NODE, GRPC_NODE}
            assert snapshot.instances[RPC_NODE].instance == rpc
            assert snapshot.instances[RPC_NODE].healthy
            assert snapshot.instances[GRPC_NODE].instance == grpc

            added = await events.wait_for((EventType.ADDED, RPC_NODE), within=10)
            assert added.instance == rpc
            assert (await events.wait_for((EventType.ADDED, GRPC_NODE), within=10)).instance == grpc

            assert await discovery.instances(SERVICE) == sorted([rpc, grpc], key=lambda i: i.id)
            chosen = await asyncio.to_thread(blocking_discovery.choose, SERVICE)
            assert chosen in (rpc, grpc)
            assert await asyncio.to_thread(blocking_watcher.wait_synced, 10)
            # Synced may mean synced before the puts: its own watch brings them after.
            await until(lambda: len(blocking_watcher.snapshot(SERVICE)) == 2, 10)
            assert [h.instance for h in blocking_watcher.snapshot(SERVICE)] == [rpc, grpc]

            # The rpc server stops, or its lease runs out: deleted everywhere.
            await raw.revoke_lease(rpc_lease)
            deleted = await events.wait_for((EventType.DELETED, RPC_NODE), within=10)
            assert deleted.instance == rpc
            await until(lambda: _ids(discovery, {GRPC_NODE}), 5)
            await until(
                lambda: [h.instance for h in blocking_watcher.snapshot(SERVICE)] == [grpc], 5
            )
            assert set((await backend.list(SERVICE)).instances) == {GRPC_NODE}
            assert events.of(GRPC_NODE) == [EventType.ADDED]
    finally:
        await asyncio.to_thread(blocking_watcher.close)
        await asyncio.to_thread(blocking_discovery.close)
        await discovery.close()
        await backend.close()


async def _ids(discovery: AsyncDiscovery, ids: set[str]) -> bool:
    return {i.id for i in await discovery.instances(SERVICE)} == ids
