"""The etcd backend through a misbehaving network and a frozen member (real etcd).

Every fault of the fault proxy, every backend method: only ``RegistryError``s,
within a bound derived from the timeout; dead connections noticed within
keepalive time + keepalive timeout + 1 s; no orphan lease after a fault heals.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from registry_agent_etcd import EtcdBackend

from registry_agent import (
    AsyncRegistrar,
    BackendUnavailable,
    ConfigError,
    HealthStatus,
    Lease,
    LeaseLost,
    RegistryError,
    Rejected,
    ServiceInstance,
    ServiceSnapshot,
    Throttled,
    open_backend,
)
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import EtcdServer

TIMEOUT = 1.0
# register is two calls (grant, put), each bounded by the timeout plus a second;
# a new watch lists (one call) then waits the timeout for etcd to create it.
CALL_BOUND = 2 * (TIMEOUT + 1.0) + 1.0

Measured = Callable[[str, float, float], None]


async def wait_for_leases(server: EtcdServer, expected: set[int], bound: float) -> float:
    """Seconds until etcd holds exactly ``expected`` leases; fails after ``bound``."""
    start = time.monotonic()
    while (held := server.leases()) != expected:
        assert time.monotonic() - start < bound, f"etcd holds leases {held}, expected {expected}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def instance(port: int) -> ServiceInstance:
    return ServiceInstance("orders", address="127.0.0.1", port=port)


@pytest.fixture
def proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", etcd_server.client_port) as proxy:
        yield proxy


@pytest.fixture
async def proxied(proxy: FaultProxy) -> AsyncIterator[EtcdBackend]:
    backend = open_backend(f"etcd://{proxy.host}:{proxy.port}", timeout=TIMEOUT)
    assert isinstance(backend, EtcdBackend)
    yield backend
    await backend.close()


async def open_watch(
    backend: EtcdBackend, marker: ServiceInstance
) -> tuple[AsyncIterator[ServiceSnapshot], Lease]:
    """A watch whose stream etcd has created (a change after the first snapshot came
    through), and the lease of the marker registered to make that change."""
    stream = aiter(backend.watch("orders"))
    await asyncio.wait_for(anext(stream), 5)
    lease = await backend.register(marker, ttl=30)
    snapshot = await asyncio.wait_for(anext(stream), 5)
    assert marker.id in snapshot.instances
    return stream, lease


FAULTS: dict[str, Callable[[FaultProxy], None]] = {
    "stall": lambda p: p.stall(),
    "blackhole": lambda p: p.blackhole(),
    "reset": lambda p: p.reset_after(1),
    "refuse": lambda p: p.refuse(),
    "http-429": lambda p: p.http(429, "slow down", {"Retry-After": "1"}),
    "http-500": lambda p: p.http(500, "No cluster leader"),
    "garbage": lambda p: p.garbage(1024),
    "latency": lambda p: p.latency(TIMEOUT + 1.0),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_every_method_raises_registry_errors_in_bounded_time_then_heals(
    fault: str,
    etcd_server: EtcdServer,
    proxy: FaultProxy,
    proxied: EtcdBackend,
    measured: Measured,
) -> None:
    lease = await proxied.register(instance(8080), ttl=30)
    stream, marker = await open_watch(proxied, instance(8081))
    FAULTS[fault](proxy)

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "register": lambda: proxied.register(instance(8082), ttl=30),
        "heartbeat": lambda: proxied.heartbeat(lease),
        "set_status": lambda: proxied.set_status(lease, HealthStatus.CRITICAL, "down"),
        "lookup": lambda: proxied.lookup(lease),
        "list": lambda: proxied.list("orders"),
        "deregister": lambda: proxied.deregister(lease),
        "open watch": lambda: anext(stream),
        "new watch": lambda: anext(aiter(proxied.watch("orders"))),
    }
    worst = 0.0
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(RegistryError) as info:
            # The outer bound only keeps a hang from hanging the suite.
            await asyncio.wait_for(call(), CALL_BOUND + 10)
        took = time.monotonic() - start
        worst = max(worst, took)
        error = info.value
        print(f"{fault} {name}: {took:.2f}s {type(error).__name__}: {error}")
        assert isinstance(error, BackendUnavailable), f"{name}: {error!r}"
        assert error.backend == "etcd"
        # The words of the server or of gRPC about it, after our "etcd at host:port …:".
        assert error.message.rsplit(":", 1)[-1].strip(), f"{name}: {error.message!r}"
        assert took <= CALL_BOUND, f"{name} took {took:.2f}s"
    measured(f"{fault}: slowest call", worst, CALL_BOUND)

    proxy.heal()
    start = time.monotonic()
    while True:  # bounded: healing is a fresh connection, at most a failed call away
        try:
            await proxied.heartbeat(marker)
            break
        except BackendUnavailable:
            assert time.monotonic() - start < 2 * CALL_BOUND, "not healed"
            await asyncio.sleep(0.1)
    measured(f"{fault}: heartbeat after heal", time.monotonic() - start, 2 * CALL_BOUND)
    # No orphan: the lease whose deregistration failed during the fault, and
    # the grant of the registration that failed (it may have landed), are
    # revoked as soon as etcd answers again.
    took = await wait_for_leases(etcd_server, {int(marker.handle)}, 2 * CALL_BOUND)
    measured(f"{fault}: orphan leases revoked", took, 2 * CALL_BOUND)
    fresh = await proxied.register(instance(8083), ttl=30)
    snapshot = await proxied.list("orders")
    assert set(snapshot.instances) == {instance(8081).id, instance(8083).id}
    assert etcd_server.leases() == {int(marker.handle), int(fresh.handle)}
    await stream.aclose()  # type: ignore[attr-defined]


KEEPALIVE_CASES = {
    "defaults": ("", 5.0, 2.0),
    "options": ("&keepalive_time=6s&keepalive_timeout=1s", 6.0, 1.0),
}


def keepalive_bound(backend: EtcdBackend) -> float:
    return backend.keepalive_time + backend.keepalive_timeout + 1.0


async def quiet_watch(backend: EtcdBackend) -> asyncio.Future[ServiceSnapshot]:
    """The next snapshot of a created watch, after a quiet keepalive period it survived.

    The quiet period proves etcd accepts our pings (no GOAWAY for pinging too
    often) and leaves only the keepalive ping to notice what comes next.
    """
    stream, _ = await open_watch(backend, instance(8081))
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(keepalive_bound(backend))
    assert not pending.done(), "a quiet watch on a healthy etcd ended"
    return pending


@pytest.mark.parametrize("case", sorted(KEEPALIVE_CASES))
async def test_a_watch_on_a_blackholed_connection_ends_within_keepalive(
    case: str, proxy: FaultProxy, measured: Measured
) -> None:
    query, time_, timeout = KEEPALIVE_CASES[case]
    backend = open_backend(f"etcd://{proxy.host}:{proxy.port}?timeout=1s{query}")
    assert isinstance(backend, EtcdBackend)
    assert (backend.keepalive_time, backend.keepalive_timeout) == (time_, timeout)
    try:
        pending = await quiet_watch(backend)
        proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await asyncio.wait_for(pending, 60)  # 60: gRPC's own ping timeout
        print(info.value)
        measured("watch ended", time.monotonic() - start, keepalive_bound(backend))
        proxy.heal()
        start = time.monotonic()
        stream = aiter(backend.watch("orders"))
        assert instance(8081).id in (await asyncio.wait_for(anext(stream), 10)).instances
        measured("listed again after heal", time.monotonic() - start, CALL_BOUND)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await backend.close()


async def test_a_frozen_member_ends_watches_and_probe_and_bounds_every_call(
    etcd_server: EtcdServer, measured: Measured
) -> None:
    backend = open_backend(etcd_server.url, timeout=TIMEOUT)
    assert isinstance(backend, EtcdBackend)
    bound = keepalive_bound(backend)
    try:
        lease = await backend.register(instance(8080), ttl=60)
        probe = asyncio.create_task(backend.wait_connection_change())
        pending = await quiet_watch(backend)
        assert backend._probe.up, "the probe never saw etcd"
        assert not probe.done()
        etcd_server.pause()
        start = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable) as info:
                await asyncio.wait_for(pending, 60)
            measured("watch ended", time.monotonic() - start, bound)
            print(info.value)
            await asyncio.wait_for(probe, 60)
            measured("probe saw it", time.monotonic() - start, bound)
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "heartbeat": lambda: backend.heartbeat(lease),
                "lookup": lambda: backend.lookup(lease),
                "set_status": lambda: backend.set_status(lease, HealthStatus.CRITICAL, "x"),
                "register": lambda: backend.register(instance(8082), ttl=60),
                "list": lambda: backend.list("orders"),
            }
            for name, call in calls.items():
                began = time.monotonic()
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(call(), 30)
                measured(f"{name} while frozen", time.monotonic() - began, CALL_BOUND)
        finally:
            etcd_server.resume()
        start = time.monotonic()
        while True:
            try:
                await backend.heartbeat(lease)
                break
            except BackendUnavailable:
                assert time.monotonic() - start < CALL_BOUND
                await asyncio.sleep(0.1)
        measured("heartbeat after resume", time.monotonic() - start, CALL_BOUND)
    finally:
        began = time.monotonic()
        await backend.close()
        assert time.monotonic() - began <= TIMEOUT + 1.0


async def test_a_frozen_member_does_not_hang_close(
    etcd_server: EtcdServer, measured: Measured
) -> None:
    backend = open_backend(etcd_server.url, timeout=TIMEOUT)
    assert isinstance(backend, EtcdBackend)
    stream, _ = await open_watch(backend, instance(8081))
    probe = asyncio.create_task(backend.wait_connection_change())
    await asyncio.sleep(0.5)
    etcd_server.pause()
    try:
        start = time.monotonic()
        await backend.close()
        measured("close while frozen", time.monotonic() - start, TIMEOUT + 1.0)
    finally:
        etcd_server.resume()
        probe.cancel()
        await stream.aclose()  # type: ignore[attr-defined]


@pytest.fixture
async def direct(etcd_server: EtcdServer) -> AsyncIterator[EtcdBackend]:
    backend = open_backend(etcd_server.url, timeout=TIMEOUT)
    assert isinstance(backend, EtcdBackend)
    yield backend
    await backend.close()


def delete_key(server: EtcdServer, key: str) -> None:
    server.api("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})


async def test_repairing_a_deleted_key_leaves_exactly_one_lease(
    etcd_server: EtcdServer, direct: EtcdBackend
) -> None:
    inst = instance(8080)
    old = await direct.register(inst, ttl=30)
    assert etcd_server.leases() == {old.handle}
    delete_key(etcd_server, f"/services/orders/{inst.id}")
    assert await direct.lookup(old) is None
    # What the registrar does on a lost entry: drop the old lease, register again.
    await direct.deregister(old)
    await direct.deregister(old)  # gone already: not an error
    with pytest.raises(LeaseLost):
        await direct.heartbeat(old)
    new = await direct.register(inst, ttl=30)
    assert etcd_server.leases() == {new.handle}
    found = await direct.lookup(new)
    assert found is not None
    assert found.instance == inst


def big_instance(size: int) -> ServiceInstance:
    return ServiceInstance("orders", address="127.0.0.1", port=8080, meta={"blob": "x" * size})


MIB = 1024 * 1024


async def test_validate_refuses_what_etcd_would_refuse_before_sending(
    etcd_server: EtcdServer, direct: EtcdBackend
) -> None:
    direct.validate(instance(8080))
    direct.validate(big_instance(MIB))  # under 1.5 MiB
    too_big = big_instance(MIB * 3 // 2)
    with pytest.raises(Rejected) as info:
        direct.validate(too_big)
    assert "max_request_bytes" in str(info.value)
    assert info.value.instance == too_big.id
    with pytest.raises(Rejected):
        await direct.register(too_big, ttl=30)
    assert etcd_server.leases() == set()  # refused before any grant
    lease = await direct.register(instance(8080), ttl=30)
    with pytest.raises(Rejected):
        await direct.set_status(lease, HealthStatus.CRITICAL, "n" * (MIB * 3 // 2))


@pytest.mark.parametrize("size", [MIB * 3 // 2, MIB * 5 // 2], ids=["over-limit", "over-grpc-max"])
async def test_etcd_refusing_a_request_is_rejected_and_leaks_no_lease(
    size: int, etcd_server: EtcdServer, measured: Measured
) -> None:
    # A backend told the cluster takes more than it does: etcd itself refuses.
    backend = open_backend(etcd_server.url, timeout=TIMEOUT, max_request_bytes=8 * MIB)
    try:
        with pytest.raises(Rejected) as info:
            await backend.register(big_instance(size), ttl=30)
        print(info.value)
        assert "too large" in str(info.value) or "larger than max" in str(info.value)
        took = await wait_for_leases(etcd_server, set(), CALL_BOUND)
        measured("granted lease revoked", took, CALL_BOUND)
        await backend.register(instance(8080), ttl=30)  # the connection is fine
    finally:
        await backend.close()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


ERRORS: list[tuple[BaseException, type[RegistryError], str]] = [
    (
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"),
        Throttled,
        "too many requests",
    ),
    (
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"),
        Rejected,
        "request is too large",
    ),
    (
        rpc_error(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
        LeaseLost,
        "requested lease not found",
    ),
    (
        rpc_error(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
        Rejected,
        "permission denied",
    ),
    (
        rpc_error(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
        BackendUnavailable,
        "leader changed",
    ),
    (
        rpc_error(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 429"),
        Throttled,
        "status: 429",
    ),
    (AttributeError("'NoneType' object has no attribute 'kvs'"), BackendUnavailable, "kvs"),
    (grpc.aio.UsageError("Please don't mix two styles"), BackendUnavailable, "UsageError"),
    (asyncio.InvalidStateError("invalid state"), BackendUnavailable, "InvalidStateError"),
    (TimeoutError(), BackendUnavailable, "no answer within"),
]


@pytest.mark.parametrize(("raised", "expected", "words"), ERRORS, ids=lambda v: str(v)[:30])
async def test_every_client_error_maps_into_our_tree(
    direct: EtcdBackend, raised: BaseException, expected: type[RegistryError], words: str
) -> None:
    async def fail(client: object) -> None:
        raise raised

    with pytest.raises(RegistryError) as info:
        await direct._call(fail, instance=instance(8080))
    assert type(info.value) is expected, repr(info.value)
    assert words in str(info.value)
    assert info.value.instance == instance(8080).id


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("keepalive_time=1s", "backend.keepalive_time"),
        ("keepalive_timeout=100ms", "backend.keepalive_timeout"),
        ("max_request_bytes=lots", "backend.max_request_bytes"),
        ("max_request_bytes=10", "backend.max_request_bytes"),
    ],
)
def test_keepalive_and_size_options_have_floors(query: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_backend(f"etcd://127.0.0.1:2379?{query}")
    assert info.value.field == field


async def test_a_slow_link_connects(etcd_server: EtcdServer) -> None:
    """300 ms each way: gRPC takes min_reconnect_backoff as the least time a connection
    attempt gets; at 100 ms no attempt over such a link ever connected."""
    with FaultProxy("127.0.0.1", etcd_server.client_port) as proxy:
        proxy.latency(0.3)
        backend = EtcdBackend("127.0.0.1", proxy.port, timeout=5)
        try:
            started = time.monotonic()
            inst = ServiceInstance("slow", address="127.0.0.1", port=8080)
            lease = await backend.register(inst, ttl=10)
            assert [h.instance for h in (await backend.list("slow")).instances.values()] == [inst]
            await backend.deregister(lease)
            assert time.monotonic() - started < 15
        finally:
            await backend.close()


async def test_shared_registrations_come_back_quietly_after_a_long_blackhole(
    etcd_server: EtcdServer, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # A break-it run: after a blackhole longer than the TTL, the lease granted on the
    # heal was counted lost 1 ms later (timed from its send, held up by the reconnect),
    # a second grant's put-back met the members' own puts of the same keys in one
    # transaction, and etcd refused it: an ERROR "no retry can fix this" per entry.
    backend = open_backend(f"etcd://{proxy.host}:{proxy.port}")  # default 5 s timeout > TTL
    ttl = 3.0
    registrars = [
        AsyncRegistrar(backend, instance(9900 + i), ttl=ttl, shared_liveness=True) for i in range(3)
    ]
    try:
        for registrar in registrars:
            await registrar.start(wait_registered=10)
        with caplog.at_level(logging.DEBUG, "registry_agent"):
            for _ in range(2):
                await asyncio.sleep(1.5)
                proxy.blackhole()
                await asyncio.sleep(2 * ttl)
                proxy.heal()
                began = time.monotonic()
                while not all(r.status()["ready"] for r in registrars):
                    assert time.monotonic() - began < 10, [r.status() for r in registrars]
                    await asyncio.sleep(0.05)
        grants = [r for r in caplog.records if "granted" in r.getMessage()]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        assert len(grants) == 2, [r.getMessage() for r in grants]  # one per heal
        assert len(etcd_server.leases()) == 1
    finally:
        for registrar in registrars:
            await registrar.stop(timeout=3)
        await backend.close()
