"""etcd format=go-zero on a real etcd 3.5.16: what we write, go-zero reads; what go-zero
writes, we read.

Peer rules followed here, from zeromicro/go-zero v1.10.3 (unchanged since v1.0.0 but
for what the comments say):

- writer, ``core/discov/publisher.go`` ``Publisher.register``: ``Grant(TimeToLive)``
  (``core/discov/clients.go``: 10 s), then ``Put("<key>/<lease id or WithId id, %d>",
  "<host:port>", WithLease(lease))``; since v1.9.0 it puts the key back on a delete;
- reader, ``core/discov/internal/registry.go`` ``cluster.load``: ``Get("<key>/",
  WithPrefix())``; ``core/discov/subscriber.go`` ``container``: the distinct values are
  the endpoints; ``zrpc/resolver/internal/discovbuilder.go`` dials each one.

Peer writes go through the real ``etcdctl`` (a Go clientv3 program, like go-zero's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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

SERVICE = "orders.rpc"
GO_ZERO_TTL = 10  # core/discov/clients.go: timeToLive
Measured = Callable[[str, float, float], None]


def url(server: EtcdServer) -> str:
    return f"{server.url}?format=go-zero&timeout=2"


def go_zero_publish(server: EtcdServer, key: str, value: str) -> int:
    """What a go-zero Publisher without WithId does: grant, then put ``<key>/<lease>``."""
    granted = etcdctl(server, "lease", "grant", str(GO_ZERO_TTL))
    lease = int(granted.split()[1], 16)  # "lease 694d8d4a1c2e7a04 granted with TTL(10s)"
    etcdctl(server, "put", f"--lease={lease:x}", f"{key}/{lease}", value)
    return lease


async def go_zero_endpoints(raw: aetcd.Client, key: str) -> set[str]:
    """A go-zero subscriber's view of ``key``: the distinct values under ``<key>/``."""
    return {kv.value.decode() for kv in await raw.get_prefix(f"{key}/".encode())}


# (a) what we write is what a go-zero publisher writes, and go-zero's reader finds it
async def test_registrar_writes_what_go_zero_reads(
    etcd_server: EtcdServer, raw: aetcd.Client, measured: Measured
) -> None:
    async with listening() as port:
        inst = ServiceInstance(SERVICE, address="127.0.0.1", port=port, meta={"zone": "zürich"})
        backend = open_backend(url(etcd_server))
        assert isinstance(backend, EtcdBackend)
        entry_id = backend.format.entry_id(inst)
        key = f"{SERVICE}/{entry_id}".encode()
        reg = AsyncRegistrar(backend, inst, ttl=TTL, retry=RETRY)
        await reg.start(wait_registered=10)
        try:
            got = await raw.get(key)
            assert got is not None
            assert got.value == f"127.0.0.1:{port}".encode()  # bare host:port, meta lost
            assert int(entry_id) > 0  # what WithId(id) writes: "%s/%d"
            info = await raw.get_lease_info(got.lease)
            assert got.lease != 0
            assert 0 < info.TTL <= TTL
            assert key in list(info.keys)
            assert await go_zero_endpoints(raw, SERVICE) == {f"127.0.0.1:{port}"}
            assert await dial(f"127.0.0.1:{port}") == b"hello"
            # Our own reader, on the same format, sees the endpoint under its entry id.
            snapshot = await backend.list(SERVICE)
            assert set(snapshot.instances) == {entry_id}
            seen = snapshot.instances[entry_id].instance
            assert (seen.id, seen.address, seen.port) == (entry_id, "127.0.0.1", port)

            # Deleted behind its back (as `etcdctl del` would): back within a verify period.
            assert etcdctl(etcd_server, "del", key.decode()).strip() == "1"
            took = await until(lambda: go_zero_endpoints(raw, SERVICE), TTL)
            measured("go-zero key back after del", took, reg.verify_interval + RETRY.cap + MARGIN)
            again = await raw.get(key)
            assert again is not None
            assert again.value == got.value  # same key, same bytes: go-zero sees no change
            assert reg.counters.reregistrations >= 1
        finally:
            await reg.stop(timeout=5)
        assert await raw.get(key) is None
        assert await go_zero_endpoints(raw, SERVICE) == set()
        await backend.close()


async def test_shared_liveness_keeps_stable_keys_per_instance(
    etcd_server: EtcdServer, raw: aetcd.Client, measured: Measured
) -> None:
    """The agent's way: one lease for many entries; keys stay per instance, not per lease."""
    backend = open_backend(url(etcd_server))
    assert isinstance(backend, EtcdBackend)
    instances = [ServiceInstance(SERVICE, address="127.0.0.1", port=9000 + i) for i in range(3)]
    regs = [
        AsyncRegistrar(backend, i, ttl=TTL, retry=RETRY, shared_liveness=True) for i in instances
    ]
    try:
        for reg in regs:
            await reg.start(wait_registered=10)
        wanted = {f"127.0.0.1:{9000 + i}" for i in range(3)}
        assert await go_zero_endpoints(raw, SERVICE) == wanted
        keys = {kv.key for kv in await raw.get_prefix(f"{SERVICE}/".encode())}
        assert keys == {f"{SERVICE}/{backend.format.entry_id(i)}".encode() for i in instances}
        leases = {kv.lease for kv in await raw.get_prefix(f"{SERVICE}/".encode())}
        assert len(leases) == 1  # shared: the key's id is ours, not the lease's

        # The shared lease revoked (a loss): a new lease, the same keys.
        (lease,) = leases
        await raw.revoke_lease(lease)
        took = await until(lambda: _all_back(raw, keys, lease), TTL)
        measured("go-zero keys back after revoke", took, TTL + RETRY.cap + MARGIN)
    finally:
        for reg in regs:
            await reg.stop(timeout=5)
        await backend.close()
    assert await go_zero_endpoints(raw, SERVICE) == set()


async def _all_back(raw: aetcd.Client, keys: set[bytes], old_lease: int) -> bool:
    kvs = list(await raw.get_prefix(f"{SERVICE}/".encode()))
    return {kv.key for kv in kvs} == keys and all(kv.lease != old_lease for kv in kvs)


# (b) what a go-zero publisher writes comes out of list(), watchers and discovery
async def test_go_zero_entries_are_listed_watched_and_discovered(
    etcd_server: EtcdServer, raw: aetcd.Client
) -> None:
    backend = open_backend(url(etcd_server))
    watcher = AsyncWatcher(url(etcd_server), SERVICE, retry=RETRY)
    discovery = AsyncDiscovery(url(etcd_server), sync_timeout=10)
    blocking = Discovery(url(etcd_server), sync_timeout=10)
    try:
        async with EventLog(watcher) as events:
            assert await watcher.wait_synced(10)
            lease4 = go_zero_publish(etcd_server, SERVICE, "127.0.0.1:8080")
            lease6 = go_zero_publish(etcd_server, SERVICE, "[::1]:8081")
            id4, id6 = str(lease4), str(lease6)
            # A key outside go-zero's layout and a value that is no endpoint: skipped.
            etcdctl(etcd_server, "put", f"{SERVICE}/bad", '{"address":"h","port":1}')
            etcdctl(etcd_server, "put", f"{SERVICE}/x/1", "127.0.0.1:1")

            snapshot = await backend.list(SERVICE)
            assert set(snapshot.instances) == {id4, id6}
            four = snapshot.instances[id4]
            assert four.instance == ServiceInstance.from_registry(
                service=SERVICE, id=id4, address="127.0.0.1", port=8080
            )
            assert four.healthy
            six = snapshot.instances[id6].instance
            assert (six.address, six.port) == ("::1", 8081)
            assert (six.tags, dict(six.meta), six.scheme, six.version) == ((), {}, "", "")

            added = await events.wait_for((EventType.ADDED, id4), within=10)
            assert added.instance == four.instance
            await events.wait_for((EventType.ADDED, id6), within=10)

            found = await discovery.instances(SERVICE)
            assert {(i.id, i.address, i.port) for i in found} == {
                (id4, "127.0.0.1", 8080),
                (id6, "::1", 8081),
            }
            chosen = await asyncio.to_thread(blocking.choose, SERVICE)
            assert chosen.id in {id4, id6}

            # The publisher stops (go-zero revokes its lease): deleted everywhere.
            await raw.revoke_lease(lease4)
            deleted = await events.wait_for((EventType.DELETED, id4), within=10)
            assert deleted.instance.address == "127.0.0.1"
            await until(lambda: _only(discovery, {id6}), 5)
            assert set((await backend.list(SERVICE)).instances) == {id6}
            assert events.of(id6) == [EventType.ADDED]
    finally:
        await asyncio.to_thread(blocking.close)
        await discovery.close()
        await backend.close()


async def _only(discovery: AsyncDiscovery, ids: set[str]) -> bool:
    return {i.id for i in await discovery.instances(SERVICE)} == ids
