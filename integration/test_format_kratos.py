"""etcd format=kratos on a real etcd 3.5.16: what we write, kratos reads; what kratos
writes, we read.

Peer rules followed here, from go-kratos/kratos v3.0.0 (commit 668db92c; the same
since v2.5.0 but for what the comments say):

- writer, ``contrib/registry/etcd/registry.go`` ``Register``: ``Grant(ttl)`` (default
  15 s), then ``Put("<namespace>/<name>/<id>", marshal(instance), WithLease(lease))``
  with namespace ``/microservices``; ``service.go`` ``marshal`` is ``json.Marshal`` of
  ``registry.ServiceInstance``; ``Deregister`` deletes the key;
- reader, ``registry.go`` ``GetService`` and ``watcher.go`` ``getInstance``:
  ``Get("<namespace>/<name>", WithPrefix())``, every value unmarshalled (one that
  fails fails the whole read), those whose ``name`` is not the service skipped;
- client, ``transport/grpc/resolver/discovery/resolver.go`` ``update`` with
  ``internal/endpoint/endpoint.go`` ``ParseEndpoint``: of an instance's endpoints
  the first whose scheme is ``grpc`` (``grpcs`` with TLS), dialled at its host.

Peer writes go through the real ``etcdctl`` (a Go clientv3 program, like kratos's).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aetcd
from registry_agent_etcd import EtcdBackend

from integration.event_log import EventLog
from integration.peer_kit import MARGIN, RETRY, TTL, dial, etcdctl, listening, until
from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    AsyncWatcher,
    Discovery,
    EventType,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import EtcdServer

SERVICE = "orders"
NAMESPACE = "/microservices"  # registry.go New: the default namespace
KRATOS_TTL = 15  # registry.go New: the default ttl
Measured = Callable[[str, float, float], None]


def url(server: EtcdServer, extra: str = "") -> str:
    return f"{server.url}?format=kratos&timeout=2{extra}"


def kratos_register(server: EtcdServer, name: str, instance_id: str, value: bytes) -> int:
    """What kratos's Register does: grant the ttl, put ``<ns>/<name>/<id>`` with the lease."""
    granted = etcdctl(server, "lease", "grant", str(KRATOS_TTL))
    lease = int(granted.split()[1], 16)  # "lease 694d8d4a1c2e7a04 granted with TTL(15s)"
    etcdctl(
        server, "put", f"--lease={lease:x}", f"{NAMESPACE}/{name}/{instance_id}", value.decode()
    )
    return lease


async def kratos_get_service(raw: aetcd.Client, name: str) -> list[dict[str, Any]]:
    """kratos's GetService: every value under the prefix ``<ns>/<name>`` (no trailing
    slash) unmarshalled, those of another name skipped."""
    items = []
    for kv in await raw.get_prefix(f"{NAMESPACE}/{name}".encode()):
        instance = json.loads(kv.value)  # an error here fails kratos's whole read
        if instance["name"] == name:
            items.append(instance)
    return items


def kratos_endpoint(instance: dict[str, Any], scheme: str) -> str:
    """endpoint.ParseEndpoint: the host of the first endpoint of ``scheme``, else ""."""
    for endpoint in instance["endpoints"] or []:
        parts = urlsplit(endpoint)
        if parts.scheme == scheme:
            return parts.netloc
    return ""


# (a) what we write is what kratos's Register writes, and kratos's reader finds it
async def test_registrar_writes_what_kratos_reads(
    etcd_server: EtcdServer, raw: aetcd.Client, measured: Measured
) -> None:
    async with listening() as port:
        inst = ServiceInstance(
            SERVICE,
            address="127.0.0.1",
            port=port,
            scheme="grpc",
            version="v1.4.0",
            tags=("lost",),
            meta={"zone": "zürich", "q": "a<b>&c"},
        )
        key = f"{NAMESPACE}/{SERVICE}/{inst.id}".encode()
        backend = open_backend(url(etcd_server))
        assert isinstance(backend, EtcdBackend)
        reg = AsyncRegistrar(backend, inst, ttl=TTL, retry=RETRY)
        await reg.start(wait_registered=10)
        try:
            got = await raw.get(key)
            assert got is not None
            # json.Marshal of kratos's ServiceInstance: struct order, sorted metadata,
            # HTML escapes, no spaces; the tags are lost.
            assert (
                got.value
                == (
                    f'{{"id":"{inst.id}","name":"orders","version":"v1.4.0",'
                    '"metadata":{"q":"a\\u003cb\\u003e\\u0026c","zone":"zürich"},'
                    f'"endpoints":["grpc://127.0.0.1:{port}"]}}'
                ).encode()
            )
            assert got.lease != 0
            info = await raw.get_lease_info(got.lease)
            assert 0 < info.TTL <= TTL
            assert key in list(info.keys)

            (found,) = await kratos_get_service(raw, SERVICE)
            assert (found["id"], found["version"]) == (inst.id, "v1.4.0")
            assert found["metadata"] == {"zone": "zürich", "q": "a<b>&c"}
            assert kratos_endpoint(found, "grpc") == f"127.0.0.1:{port}"
            assert kratos_endpoint(found, "http") == ""  # its HTTP client skips a gRPC server
            assert await dial(kratos_endpoint(found, "grpc")) == b"hello"

            snapshot = await backend.list(SERVICE)
            assert set(snapshot.instances) == {inst.id}
            seen = snapshot.instances[inst.id].instance
            assert seen == ServiceInstance(
                SERVICE,
                address="127.0.0.1",
                port=port,
                scheme="grpc",
                version="v1.4.0",
                meta={"zone": "zürich", "q": "a<b>&c"},
            )

            # Deleted behind its back (`etcdctl del`): back within a verify period (one TTL).
            etcdctl(etcd_server, "del", key.decode())
            assert await raw.get(key) is None
            took = await until(lambda: raw.get(key), TTL)
            measured("kratos key back after del", took, reg.verify_interval + RETRY.cap + MARGIN)
            again = await raw.get(key)
            assert again is not None
            assert again.value == got.value
            assert again.lease != 0
            assert reg.counters.reregistrations >= 1
        finally:
            await reg.stop(timeout=5)
        assert await raw.get(key) is None
        assert await kratos_get_service(raw, SERVICE) == []
        await backend.close()


# Two kratos apps as Register writes them: an HTTP+gRPC server (app.go buildInstance, one
# endpoint per server in kratos.Server(...) order), and a gRPC-only one on IPv6.
APP_A = "5e5a0bd6-8f3a-11ee-b9d1-0242ac120002"
APP_B = "6f6b1ce7-8f3a-11ee-b9d1-0242ac120002"
VALUE_A = (
    f'{{"id":"{APP_A}","name":"orders","version":"v2.0.1","metadata":{{"region":"eu"}},'
    '"endpoints":["http://127.0.0.1:8000","grpc://127.0.0.1:9000"]}'
).encode()
VALUE_B = (
    f'{{"id":"{APP_B}","name":"orders","version":"","metadata":null,'
    '"endpoints":["grpc://[::1]:9001"]}'
).encode()


# (b) what kratos writes comes out of list(), watchers and discovery
async def test_kratos_entries_are_listed_watched_and_discovered(
    etcd_server: EtcdServer, raw: aetcd.Client
) -> None:
    grpc_url = url(etcd_server, "&scheme=grpc")
    backend = open_backend(url(etcd_server))  # no scheme: the first endpoint
    watcher = AsyncWatcher(grpc_url, SERVICE, retry=RETRY)
    discovery = AsyncDiscovery(grpc_url, sync_timeout=10)
    blocking = Discovery(grpc_url, sync_timeout=10)
    try:
        async with EventLog(watcher) as events:
            assert await watcher.wait_synced(10)
            lease_a = kratos_register(etcd_server, SERVICE, APP_A, VALUE_A)
            kratos_register(etcd_server, SERVICE, APP_B, VALUE_B)
            # Another service sharing the prefix "orders" and a foreign value: skipped.
            kratos_register(
                etcd_server, "orders-v2", "c", VALUE_B.replace(b'"orders"', b'"orders-v2"')
            )
            etcdctl(etcd_server, "put", f"{NAMESPACE}/{SERVICE}/bad", '{"address":"h"}')

            snapshot = await backend.list(SERVICE)
            assert set(snapshot.instances) == {APP_A, APP_B}
            first = snapshot.instances[APP_A]
            assert first.healthy
            assert first.instance == ServiceInstance.from_registry(
                service=SERVICE,
                id=APP_A,
                address="127.0.0.1",
                port=8000,
                scheme="http",
                version="v2.0.1",
                meta={"region": "eu"},
            )
            b = snapshot.instances[APP_B].instance
            assert (b.address, b.port, b.scheme, b.version, dict(b.meta)) == (
                "::1",
                9001,
                "grpc",
                "",
                {},
            )

            # scheme=grpc: app A's gRPC endpoint, as kratos's gRPC client picks it.
            added = await events.wait_for((EventType.ADDED, APP_A), within=10)
            assert (added.instance.scheme, added.instance.port) == ("grpc", 9000)
            assert added.instance.meta == {"region": "eu"}
            await events.wait_for((EventType.ADDED, APP_B), within=10)

            found = await discovery.instances(SERVICE)
            assert {(i.id, i.scheme, i.address, i.port) for i in found} == {
                (APP_A, "grpc", "127.0.0.1", 9000),
                (APP_B, "grpc", "::1", 9001),
            }
            chosen = await asyncio.to_thread(blocking.choose, SERVICE)
            assert chosen.id in {APP_A, APP_B}

            # The app stops (its lease revoked): deleted everywhere.
            await raw.revoke_lease(lease_a)
            deleted = await events.wait_for((EventType.DELETED, APP_A), within=10)
            assert deleted.instance.port == 9000
            await until(lambda: _only(discovery, {APP_B}), 5)
            assert set((await backend.list(SERVICE)).instances) == {APP_B}
            assert events.of(APP_B) == [EventType.ADDED]
    finally:
        await asyncio.to_thread(blocking.close)
        await discovery.close()
        await backend.close()


async def _only(discovery: AsyncDiscovery, ids: set[str]) -> bool:
    return {i.id for i in await discovery.instances(SERVICE)} == ids
