"""One instance in real Consul AND real etcd at once: each registry healed on its own.

One registrar, one health gate, one lane per backend. A registry stopped, frozen,
wiped or refusing must never delay the other. Bounds derive from the TTL, the
heartbeat and the backoff cap, plus a margin for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from integration.acl import AclConsul
from registry_agent import (
    AsyncRegistrar,
    Backend,
    BackendUnavailable,
    ConfigError,
    HealthStatus,
    RegistrationTimeout,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer

TTL = 2.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
Measured = Callable[[str, float, float], None]


async def held(url: str, instance: ServiceInstance = INSTANCE) -> HealthStatus | None:
    """What the registry at ``url`` holds of ``instance`` now (None: nothing, or down)."""
    observer: Backend = open_backend(url, timeout=1)
    try:
        health = (await observer.list(instance.service)).instances.get(instance.id)
    except BackendUnavailable:
        return None
    finally:
        await observer.close()
    return None if health is None else health.status


async def until(
    url: str, wanted: HealthStatus | None, within: float, instance: ServiceInstance = INSTANCE
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        if await held(url, instance) is wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"{instance.id} never reached {wanted} in {url}")


async def soon(predicate: Callable[[], bool], within: float) -> bool:
    """Whether ``predicate`` holds within ``within`` seconds. The registrar learns of a
    write when the call returns, which may be after an observer already sees it."""
    for _ in range(int(within / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def both(consul: ConsulServer, etcd: EtcdServer, **kwargs: object) -> AsyncRegistrar:
    kwargs.setdefault("ttl", TTL)
    kwargs.setdefault("retry", RETRY)
    urls = [f"{consul.url}?timeout=1s", f"{etcd.url}?timeout=1s"]
    return AsyncRegistrar(urls, kwargs.pop("instance", INSTANCE), **kwargs)  # type: ignore[arg-type]


async def test_one_instance_in_consul_and_etcd_each_healed_on_its_own(
    consul_server: ConsulServer, etcd_server: EtcdServer, measured: Measured
) -> None:
    consul, etcd = consul_server.url, etcd_server.url
    reg = both(consul_server, etcd_server)
    await reg.start(wait_registered=10)
    try:
        assert await held(consul) is HealthStatus.PASSING
        assert await held(etcd) is HealthStatus.PASSING
        names = [lane.name for lane in reg.snapshot().backends]
        assert names == [consul, etcd]

        # etcd stopped: Consul keeps the entry passing and its heartbeats go on, ready stays.
        beats = reg.snapshot().backends[0].counters["heartbeats_ok"]
        etcd_server.stop()
        down_since = time.monotonic()
        while time.monotonic() - down_since < 2 * TTL:
            assert reg.ready, reg.snapshot().not_ready_reason
            assert await held(consul) is HealthStatus.PASSING
            await asyncio.sleep(0.2)
        lanes = reg.snapshot().backends
        expected = int(2 * TTL / reg.heartbeat_interval) - 2
        assert lanes[0].counters["heartbeats_ok"] >= beats + expected
        assert lanes[0].ready
        assert not lanes[1].registered  # a TTL without renewal: etcd dropped it
        assert lanes[1].last_error is not None
        snap = reg.snapshot()
        assert snap.ready
        assert snap.last_error is not None
        assert snap.last_error.startswith(f"{etcd}: ")

        # etcd back: registered there again within a backoff and a heartbeat. (etcd
        # restores its leases on restart, so the observer alone could see the old entry.)
        etcd_server.start()
        back = time.monotonic()
        assert await reg.wait_registered(RETRY.cap + reg.heartbeat_interval + MARGIN + 5)
        measured(
            "back in etcd", time.monotonic() - back, RETRY.cap + reg.heartbeat_interval + MARGIN
        )
        etcd_lane = reg.snapshot().backends[1]
        assert etcd_lane.counters["lease_losses"] >= 1
        assert etcd_lane.counters["reregistrations"] >= 1
        assert etcd_lane.last_error is None
        assert await held(etcd) is HealthStatus.PASSING
        assert await held(consul) is HealthStatus.PASSING

        # Consul wiped behind its back: healed there, etcd untouched.
        etcd_before = dict(reg.snapshot().backends[1].counters)
        async with httpx.AsyncClient(base_url=consul_server.http) as http:
            response = await http.put(f"/v1/agent/service/deregister/{INSTANCE.id}")
            assert response.status_code == 200
        # (It may be back before an observer reads it: the re-registration count proves it went.)
        took = await until(consul, HealthStatus.PASSING, 10)
        measured("healed in consul", took, reg.verify_interval + RETRY.cap + MARGIN)
        # Consul lists the service before the registration call (which sets its check) returns.
        assert await soon(lambda: reg.snapshot().backends[0].counters["reregistrations"] >= 1, 5)
        lanes = reg.snapshot().backends
        for counter in ("registrations", "reregistrations", "lease_losses"):
            assert lanes[1].counters[counter] == etcd_before[counter], counter
        assert await held(etcd) is HealthStatus.PASSING
    finally:
        await reg.stop(timeout=5)
    assert await held(consul) is None
    assert await held(etcd) is None


async def test_stop_removes_the_healthy_entry_promptly_while_the_other_is_frozen(
    consul_server: ConsulServer, etcd_server: EtcdServer, measured: Measured
) -> None:
    consul, etcd = consul_server.url, etcd_server.url
    reg = both(consul_server, etcd_server)
    await reg.start(wait_registered=10)
    etcd_server.pause()  # a blackhole: calls hang until the 1 s backend timeout
    try:
        await asyncio.sleep(TTL / 2)
        assert reg.ready
        started = time.monotonic()
        stopping = asyncio.create_task(reg.stop(timeout=4))
        gone = await until(consul, None, 4)
        measured("consul entry removed", gone, 1.0 + MARGIN / 2)
        await stopping
        took = time.monotonic() - started
        measured("stop() with etcd frozen", took, 4 + 0.5)
        etcd_lane = reg.snapshot().backends[1]
        assert etcd_lane.last_error is not None  # kept, and the entry expires with its TTL
    finally:
        etcd_server.resume()
    took = await until(etcd, None, TTL + MARGIN)
    measured("gone from etcd after resume", took, TTL + MARGIN)

    # Frozen before start: Consul is registered as fast as alone; waiting for both
    # times out naming etcd only, and stop() is not held up by the register in flight.
    etcd_server.pause()
    try:
        late = both(consul_server, etcd_server)
        started = time.monotonic()
        with pytest.raises(RegistrationTimeout, match=r" in etcd://[^:]+:\d+: ") as info:
            await late.start(wait_registered=3.0)
        # 3 s waiting, then its stop() (10 s at most, by default).
        measured("start() timed out, etcd frozen", time.monotonic() - started, 3.0 + 10 + 0.5)
        assert consul not in str(info.value)
        assert await held(consul) is None  # that start() stopped it
        alone = both(consul_server, etcd_server)
        started = time.monotonic()
        await alone.start()
        # Ready once Consul answered the registration (which also sets its check).
        assert await soon(lambda: alone.ready, 10)
        measured("ready via consul, etcd frozen", time.monotonic() - started, 1.0 + MARGIN)
        assert await held(consul) is HealthStatus.PASSING
        started = time.monotonic()
        await alone.stop(timeout=4)
        measured("stop(), etcd frozen, no lease", time.monotonic() - started, 4 + 0.5)
        assert await held(consul) is None
    finally:
        etcd_server.resume()


async def test_a_refusing_registry_never_delays_the_other(
    acl: AclConsul, etcd_server: EtcdServer, measured: Measured
) -> None:
    # The token may write orders* only: Consul refuses "payments" (403, Rejected).
    payments = ServiceInstance("payments", address="127.0.0.1", port=8090)
    urls = [f"{acl.server.url}?token={acl.token}&timeout=1s", f"{etcd_server.url}?timeout=1s"]
    reg = AsyncRegistrar(urls, payments, ttl=TTL, retry=RETRY)
    started = time.monotonic()
    await reg.start()
    try:
        took = await until(etcd_server.url, HealthStatus.PASSING, 5, payments)
        measured("registered in etcd beside a refusal", took, 1.0 + MARGIN)
        assert await soon(lambda: reg.ready, 5)
        refused = reg.snapshot().backends[0]
        assert not refused.registered
        assert refused.not_ready_reason is not None
        assert refused.not_ready_reason.startswith("rejected by the registry")
        await asyncio.sleep(TTL)  # and etcd keeps it while Consul keeps refusing
        assert await held(etcd_server.url, payments) is HealthStatus.PASSING
        assert "payments" not in acl.services()
    finally:
        await reg.stop(timeout=5)
    assert await held(etcd_server.url, payments) is None

    # Waiting for both: the refusal fails start at once, naming the backend.
    waiting = AsyncRegistrar(urls, payments, ttl=TTL, retry=RETRY)
    started = time.monotonic()
    with pytest.raises(Rejected, match=r"^backend\[0\] \(consul://"):
        await waiting.start(wait_registered=30)
    measured("start() refused", time.monotonic() - started, MARGIN)
    assert await held(etcd_server.url, payments) is None  # stopped: removed from etcd too

    # A presence-only etcd format cannot hold a critical entry: refused before anything runs.
    gozero = f"{etcd_server.url}?format=go-zero"
    with pytest.raises(ConfigError) as info:
        await AsyncRegistrar(
            [f"{acl.server.url}?token={acl.token}", gozero], INSTANCE, on_unhealthy="critical"
        ).start()
    assert info.value.field == "backend[1]"
    assert INSTANCE.service not in acl.services()
