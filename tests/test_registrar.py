"""AsyncRegistrar and Registrar on the in-memory backend: the logic, quickly.

The same scenarios run against real Consul and etcd in integration/test_healing.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from registry_agent import (
    AsyncRegistrar,
    CallableCheck,
    ConfigError,
    GateState,
    HealthStatus,
    Registrar,
    RegistrarEvent,
    RegistrarEventKind,
    RegistrationTimeout,
    RetryPolicy,
    ServiceInstance,
)
from registry_agent.testing.contract import eventually
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

FAST = RetryPolicy(initial=0.05, cap=0.2)
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
K = RegistrarEventKind


class Switch:
    """A health check result the test flips."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.ok


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"reg-{uuid.uuid4().hex}")


@pytest.fixture
def events() -> list[RegistrarEvent]:
    return []


@pytest.fixture
def make(registry: MemoryRegistry, events: list[RegistrarEvent]) -> Callable[..., AsyncRegistrar]:
    def make(**kwargs: Any) -> AsyncRegistrar:
        kwargs.setdefault("ttl", 1.0)
        kwargs.setdefault("retry", FAST)
        kwargs.setdefault("on_event", events.append)
        return AsyncRegistrar(registry.url, kwargs.pop("instance", INSTANCE), **kwargs)

    return make


@pytest.fixture
async def cleanup() -> AsyncIterator[list[AsyncRegistrar]]:
    started: list[AsyncRegistrar] = []
    yield started
    for reg in started:
        await reg.stop()


async def in_registry(registry: MemoryRegistry) -> HealthStatus | None:
    health = registry.snapshot(INSTANCE.service).instances.get(INSTANCE.id)
    return None if health is None else health.status


def kinds(events: list[RegistrarEvent]) -> list[RegistrarEventKind]:
    return [e.kind for e in events]


async def test_without_checks_it_registers_at_once(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, events: list[RegistrarEvent]
) -> None:
    async with make() as reg:
        assert await reg.wait_registered(2)
        assert reg.state is GateState.REGISTERED
        assert await in_registry(registry) is HealthStatus.PASSING
    assert await in_registry(registry) is None
    assert kinds(events) == [K.REGISTERED, K.STATE_CHANGED, K.DEREGISTERED, K.STOPPED]
    assert reg.state is GateState.STOPPED


async def test_registers_only_after_rise_passes(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    check = Switch(ok=False)
    reg = make(checks=[CallableCheck(check, interval=0.05)], rise=3)
    cleanup.append(reg)
    await reg.start()
    await asyncio.sleep(0.3)
    assert check.calls >= 3
    assert reg.state is GateState.STARTING
    assert await in_registry(registry) is None
    check.ok = True
    took = await eventually(lambda: in_registry(registry), within=2)
    assert check.calls >= 3
    assert took >= 0.05 * 2  # three passes in a row, at 50 ms intervals
    assert reg.state is GateState.REGISTERED


async def test_withdrawn_after_fall_failures_and_back_after_rise(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
) -> None:
    check = Switch()
    reg = make(checks=[CallableCheck(check, interval=0.05)], rise=2, fall=3)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    check.ok = False
    took = await eventually(lambda: _is(registry, None), within=2)
    assert took <= 0.05 * 3 + 0.5
    assert reg.state is GateState.WITHDRAWN
    check.ok = True
    await eventually(lambda: _is(registry, HealthStatus.PASSING), within=2)
    assert reg.state is GateState.REGISTERED
    assert kinds(events).count(K.DEREGISTERED) == 1
    assert reg.counters.registrations == 2
    assert reg.counters.reregistrations == 0


async def _is(registry: MemoryRegistry, status: HealthStatus | None) -> bool:
    return await in_registry(registry) is status


async def test_on_unhealthy_critical_keeps_the_entry(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    check = Switch()
    reg = make(
        checks=[CallableCheck(check, interval=0.05)], rise=1, fall=1, on_unhealthy="critical"
    )
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    check.ok = False
    await eventually(lambda: _is(registry, HealthStatus.CRITICAL), within=2)
    note = registry.snapshot("orders").instances[INSTANCE.id].note
    assert "returned False" in note
    await asyncio.sleep(1.0)  # heartbeats keep the critical entry alive past the TTL
    assert await in_registry(registry) is HealthStatus.CRITICAL
    check.ok = True
    await eventually(lambda: _is(registry, HealthStatus.PASSING), within=2)
    assert reg.counters.deregistrations == 0


async def test_flapping_health_does_not_storm(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    flips = 0

    def flapping() -> bool:
        nonlocal flips
        flips += 1
        return flips % 2 == 0  # F P F P ...

    reg = make(checks=[CallableCheck(flapping, interval=0.02)], rise=1, fall=2)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    await asyncio.sleep(0.5)
    assert flips >= 10
    assert reg.counters.registrations == 1
    assert reg.counters.deregistrations == 0
    assert await in_registry(registry) is HealthStatus.PASSING


async def test_entry_deleted_behind_our_back_is_repaired(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
) -> None:
    reg = make(ttl=3.0, heartbeat=0.5)  # the lease outlives the check: only verify sees it
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    lease = reg._lease
    assert lease is not None
    registry.delete(INSTANCE.service, INSTANCE.id, None)  # key gone, lease alive
    took = await eventually(lambda: _is(registry, HealthStatus.PASSING), within=reg.ttl + 1)
    assert took <= reg.verify_interval + 0.5
    assert K.REREGISTERED in kinds(events)
    assert reg.counters.reregistrations == 1


async def test_registry_wiped_means_registered_again(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
) -> None:
    reg = make()
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    registry.wipe()
    took = await eventually(lambda: _is(registry, HealthStatus.PASSING), within=2)
    assert took <= reg.heartbeat_interval + 0.5
    assert kinds(events)[-2:] == [K.LEASE_LOST, K.REREGISTERED]


async def test_registry_down_at_start_then_up(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry.stop()
    reg = make()
    cleanup.append(reg)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registry_agent.registrar"):
        await reg.start()
        assert time.monotonic() - started < 0.1  # start() never blocks
        await asyncio.sleep(1.0)
    assert reg.counters.errors >= 5
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1  # one line, not one per attempt
    assert reg.status()["last_error"]
    registry.start()
    took = await eventually(lambda: _is(registry, HealthStatus.PASSING), within=2)
    assert took <= FAST.cap + 0.3
    assert kinds(events)[:1] == [K.BACKEND_UNAVAILABLE]
    assert K.BACKEND_RECOVERED in kinds(events)
    assert reg.status()["last_error"] is None


async def test_wait_registered_times_out_and_stops(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry
) -> None:
    registry.stop()
    reg = make()
    with pytest.raises(RegistrationTimeout) as info:
        await reg.start(wait_registered=0.3)
    assert "stopped" in str(info.value)
    assert reg.state is GateState.STOPPED
    registry.start()
    await asyncio.sleep(0.2)
    assert await in_registry(registry) is None


async def test_stop_deregisters_even_with_a_hanging_check(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry
) -> None:
    release = asyncio.Event()
    calls = 0

    async def hangs_after_first() -> bool:
        nonlocal calls
        calls += 1
        if calls > 1:
            await release.wait()
        return True

    reg = make(checks=[CallableCheck(hangs_after_first, interval=0.01, timeout=60)], rise=1)
    await reg.start(wait_registered=2)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await reg.stop(timeout=2)
    assert time.monotonic() - started < 1
    assert await in_registry(registry) is None


async def test_status_report(
    make: Callable[..., AsyncRegistrar], cleanup: list[AsyncRegistrar]
) -> None:
    reg = make(checks=[CallableCheck(Switch(), interval=0.05, name="db")], rise=1)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    await asyncio.sleep(reg.heartbeat_interval + 0.2)
    status = reg.status()
    assert status["state"] == "registered"
    assert status["registered"] is True
    assert status["registry_status"] == "passing"
    assert status["ready"] is True
    assert status["not_ready_reason"] is None
    assert status["checks"]["db"]["up"] is True
    assert status["checks"]["db"]["ok"] is True
    assert status["counters"]["heartbeats_ok"] >= 1
    assert status["last_heartbeat"] is not None


async def test_a_failing_event_callback_is_logged_not_fatal(
    registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: RegistrarEvent) -> None:
        raise RuntimeError("callback bug")

    reg = AsyncRegistrar(registry.url, INSTANCE, ttl=1.0, on_event=broken)
    with caplog.at_level(logging.ERROR):
        await reg.start(wait_registered=2)
        await reg.stop()
    assert "on_event callback failed" in caplog.text
    assert await in_registry(registry) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 9, "heartbeat": 4}, "heartbeat"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"on_unhealthy": "panic"}, "on_unhealthy"),
        ({"deregister_critical_after": 10}, "deregister_critical_after"),
        ({"rise": 0}, "rise"),
        ({"checks": [CallableCheck(bool, name="x"), CallableCheck(bool, name="x")]}, "checks"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncRegistrar("memory://", INSTANCE, **kwargs)
    assert info.value.field == field


def test_bad_backend_url_fails_at_construction() -> None:
    with pytest.raises(ConfigError):
        Registrar("consul://h:notaport", INSTANCE)


def test_no_client_is_created_before_start() -> None:
    reg = AsyncRegistrar("consul://127.0.0.1:8500", INSTANCE)
    assert reg.backend._api is None  # type: ignore[attr-defined]
    etcd = AsyncRegistrar("etcd://127.0.0.1:2379", INSTANCE)
    assert etcd.backend._client is None  # type: ignore[attr-defined]


def test_blocking_facade(registry: MemoryRegistry) -> None:
    threads_before = threading.active_count()
    events: list[RegistrarEvent] = []
    with Registrar(registry.url, INSTANCE, ttl=1.0, retry=FAST, on_event=events.append) as reg:
        assert reg.wait_registered(2)
        assert reg.registered
        assert reg.state is GateState.REGISTERED
        assert registry.snapshot("orders").healthy() == [INSTANCE]
        assert reg.status()["registered"] is True
        assert threading.active_count() == threads_before + 1
    assert registry.snapshot("orders").instances == {}
    assert reg.state is GateState.STOPPED
    assert threading.active_count() == threads_before
    assert events[-1].kind is K.STOPPED


def test_blocking_facade_with_a_backend_object(registry: MemoryRegistry) -> None:
    backend = MemoryBackend(registry)
    reg = Registrar(backend, INSTANCE, ttl=1.0).start(wait_registered=2)
    try:
        assert registry.snapshot("orders").healthy() == [INSTANCE]
    finally:
        reg.stop()
    assert registry.snapshot("orders").instances == {}


def test_blocking_wait_registered_timeout(registry: MemoryRegistry) -> None:
    registry.stop()
    with pytest.raises(RegistrationTimeout):
        Registrar(registry.url, INSTANCE, ttl=1.0, retry=FAST).start(wait_registered=0.3)
