"""AsyncRegistrar and Registrar on the in-memory backend: the logic, quickly.

The same scenarios run against real Consul and etcd in integration/test_healing.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from registry_agent import (
    AsyncRegistrar,
    CallableCheck,
    ConfigError,
    GateState,
    HealthStatus,
    InstanceHealth,
    Lease,
    Registrar,
    RegistrarEvent,
    RegistrarEventKind,
    RegistrationTimeout,
    RegistryError,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    Throttled,
)
from registry_agent._backend import SharedLiveness
from registry_agent._status import RegistrationStatus
from registry_agent.testing.contract import eventually
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry, SharedMemoryBackend

FAST = RetryPolicy(initial=0.05, cap=0.2)
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
K = RegistrarEventKind


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer whenever nothing is ready.

    A registrar's TTLs, heartbeats and backoffs then take no real time. Only for
    code that wakes the loop from no other thread (async checks, the memory backend).
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = time.monotonic()
        select = self._selector.select  # type: ignore[attr-defined]

        def jump(timeout: float | None = None) -> Any:
            ready = select(0)
            if ready or timeout is None or timeout <= 0:
                return ready if ready or timeout is not None else select(None)
            self._now += timeout
            return []

        self._selector.select = jump  # type: ignore[attr-defined]

    def time(self) -> float:
        return self._now


def virtual_time(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on a :class:`VirtualTimeLoop`, stopping its registrars after it."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def body() -> None:
            try:
                await test(*args, **kwargs)
            finally:
                for reg in kwargs.get("cleanup", []):
                    await reg.stop()

        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runner.run(body())

    return run


def loop_clock() -> float:
    """The running loop's clock (virtual in a VirtualTimeLoop), else the monotonic clock."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class Switch:
    """A health check result the test flips."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.ok

    async def probe(self) -> bool:
        """The same, on the loop: no thread wakes a virtual-time loop."""
        return self()


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"reg-{uuid.uuid4().hex}", clock=loop_clock)


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


@virtual_time
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


@virtual_time
async def test_registers_only_after_rise_passes(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    check = Switch(ok=False)
    reg = make(checks=[CallableCheck(check.probe, interval=0.05)], rise=3)
    cleanup.append(reg)
    await reg.start()
    await asyncio.sleep(0.3)
    assert check.calls >= 3
    assert reg.state is GateState.STARTING
    assert await in_registry(registry) is None
    check.ok = True
    started = loop_clock()
    await eventually(lambda: in_registry(registry), within=2)
    took = loop_clock() - started
    assert check.calls >= 3
    assert took >= 0.05 * 2  # three passes in a row, at 50 ms intervals
    assert reg.state is GateState.REGISTERED


@virtual_time
async def test_withdrawn_after_fall_failures_and_back_after_rise(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
) -> None:
    check = Switch()
    reg = make(checks=[CallableCheck(check.probe, interval=0.05)], rise=2, fall=3)
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


@virtual_time
async def test_on_unhealthy_critical_keeps_the_entry(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    check = Switch()
    reg = make(
        checks=[CallableCheck(check.probe, interval=0.05)], rise=1, fall=1, on_unhealthy="critical"
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


@virtual_time
async def test_flapping_health_does_not_storm(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    flips = 0

    async def flapping() -> bool:
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


@virtual_time
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


@virtual_time
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


@virtual_time
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
    started = loop_clock()
    with caplog.at_level(logging.WARNING, logger="registry_agent.registrar"):
        await reg.start()
        assert loop_clock() - started < 0.1  # start() never blocks
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


@virtual_time
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


@virtual_time
async def test_status_report(
    make: Callable[..., AsyncRegistrar], cleanup: list[AsyncRegistrar]
) -> None:
    reg = make(checks=[CallableCheck(Switch().probe, interval=0.05, name="db")], rise=1)
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


@virtual_time
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
        ({"ttl": 0.001}, "ttl"),  # 1 ms: 80 heartbeats a second
        ({"ttl": "1ms"}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": 9, "heartbeat": 4}, "heartbeat"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"ttl": 60, "heartbeat": 0.01}, "heartbeat"),
        ({"deregister_critical_after": "5m"}, "deregister_critical_after"),
        ({"on_unhealthy": "panic"}, "on_unhealthy"),
        ({"deregister_critical_after": 0}, "deregister_critical_after"),
        ({"deregister_critical_after": "1m"}, "deregister_critical_after"),
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


# -- field hardening: errors, throttles, rejections, truthful state, leases, forks --------


class Faulty(MemoryBackend):
    """The memory backend, with calls that fail on demand and a registry-side status override."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.fail: dict[str, BaseException] = {}
        self.calls: dict[str, int] = {}
        self.held: tuple[HealthStatus, str] | None = None  # what "someone else" holds us at
        self.register_kwargs: list[dict[str, Any]] = []

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail[name]

    async def register(self, instance: ServiceInstance, **kwargs: Any) -> Lease:
        self._call("register")
        self.register_kwargs.append(kwargs)
        return await super().register(instance, **kwargs)

    async def heartbeat(self, lease: Lease) -> None:
        self._call("heartbeat")
        await super().heartbeat(lease)

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        self._call("lookup")
        found = await super().lookup(lease)
        if found is not None and self.held is not None:
            return InstanceHealth(found.instance, *self.held)
        return found

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        self._call("set_status")
        await super().set_status(lease, status, note)

    async def deregister(self, lease: Lease) -> None:
        self._call("deregister")
        await super().deregister(lease)


@pytest.fixture
def faulty(registry: MemoryRegistry) -> Faulty:
    return Faulty(registry)


def lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and text in r.getMessage() and r.name == "registry_agent.registrar"
    ]


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("module 'consul.base' has no attribute 'ConsulException'"),
        RuntimeError("boom"),
        Rejected("403 Permission denied", backend="memory"),
    ],
)
async def test_stop_never_raises_whatever_the_backend_raises(
    faulty: Faulty,
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    error: BaseException,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=FAST, on_event=events.append)
    await reg.start(wait_registered=2)
    faulty.fail["deregister"] = error
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registry_agent.registrar"):
        await reg.stop(timeout=1)  # does not raise
    assert time.monotonic() - started < 1.5
    assert reg.state is GateState.STOPPED
    assert kinds(events)[-1] is K.STOPPED
    last_error = reg.status()["last_error"]
    assert last_error is not None
    if not isinstance(error, RegistryError):
        assert f"unexpected {type(error).__name__}" in last_error
    # One WARNING telling the truth (a Rejected one is not retried; the others are,
    # until the deadline); the registry still answering writes, the entry is marked
    # critical as a last resort (else it would be left to its TTL).
    assert len(lines(caplog, logging.WARNING, "not deregistered")) == 1
    assert await in_registry(registry) is HealthStatus.CRITICAL


@virtual_time
async def test_unexpected_errors_reach_callbacks_as_registry_errors(
    faulty: Faulty, events: list[RegistrarEvent], cleanup: list[AsyncRegistrar]
) -> None:
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=FAST, on_event=events.append)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    faulty.fail["heartbeat"] = AttributeError("no attribute 'ConsulException'")
    await eventually(lambda: _true(K.BACKEND_UNAVAILABLE in kinds(events)), within=2)
    failure = next(e for e in events if e.kind is K.BACKEND_UNAVAILABLE)
    assert failure.detail.startswith("unexpected AttributeError: no attribute")
    assert (reg.status()["last_error"] or "").startswith("unexpected AttributeError")


async def _true(value: bool) -> bool:
    return value


@virtual_time
async def test_throttled_retries_when_told_not_at_the_backoff_cap(
    faulty: Faulty, cleanup: list[AsyncRegistrar], caplog: pytest.LogCaptureFixture
) -> None:
    retry = RetryPolicy(initial=0.2, cap=10.0)  # the default: unanswered, it would reach 3.2 s
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=retry)
    cleanup.append(reg)
    faulty.fail["register"] = Throttled("429 slow down", retry_after=0.5, backend="memory")
    with caplog.at_level(logging.DEBUG, logger="registry_agent.registrar"):
        await reg.start()
        await asyncio.sleep(2.5)
        tries = faulty.calls["register"]
        assert 4 <= tries <= 7  # every ~0.5 s as told: no spin, no growing backoff
        del faulty.fail["register"]
        ended = loop_clock()
        assert await reg.wait_registered(5)
    took = loop_clock() - ended
    print(f"registered {took:.2f}s after the throttle ended (Retry-After 0.5s)")
    assert took <= 0.5 * 1.1 + 0.3
    assert len(lines(caplog, logging.WARNING, "register failed")) == 1  # once per episode
    assert "shedding load" in lines(caplog, logging.WARNING, "register failed")[0]


@virtual_time
async def test_throttled_without_retry_after_comes_back_within_the_answered_cap(
    faulty: Faulty, cleanup: list[AsyncRegistrar]
) -> None:
    retry = RetryPolicy(initial=0.2, cap=10.0)
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=retry)
    cleanup.append(reg)
    faulty.fail["register"] = Throttled("503 No cluster leader", backend="memory")
    await reg.start()
    await asyncio.sleep(3.0)
    del faulty.fail["register"]
    ended = loop_clock()
    assert await reg.wait_registered(5)
    took = loop_clock() - ended
    print(f"registered {took:.2f}s after 503s ended (no Retry-After)")
    assert took <= retry.answered_cap + 0.3


@virtual_time
async def test_rejected_fails_start_at_once(
    faulty: Faulty, registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    faulty.fail["register"] = Rejected("400 Meta key 'a.b' contains '.'", backend="memory")
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=FAST)
    started = loop_clock()
    with (
        caplog.at_level(logging.WARNING, logger="registry_agent.registrar"),
        pytest.raises(Rejected, match="contains"),
    ):
        await reg.start(wait_registered=10)
    assert loop_clock() - started < 1  # not after the 10 s wait
    assert reg.state is GateState.STOPPED
    assert len(lines(caplog, logging.ERROR, "register failed")) == 1
    assert await in_registry(registry) is None


@virtual_time
async def test_a_value_the_backend_refuses_fails_start_naming_the_field(
    faulty: Faulty, registry: MemoryRegistry
) -> None:
    # e.g. Consul's 60 s reaping floor: the backend's rule, raised when it registers.
    faulty.fail["register"] = ConfigError(
        "Consul's floor is 60s, got 10s", field="deregister_critical_after"
    )
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=FAST, deregister_critical_after=10)
    started = loop_clock()
    with pytest.raises(ConfigError) as info:
        await reg.start(wait_registered=10)
    assert loop_clock() - started < 1
    assert info.value.field == "deregister_critical_after"
    assert faulty.calls["register"] == 1  # not retried as if the registry were down
    assert await in_registry(registry) is None


@virtual_time
async def test_rejected_is_reported_and_retried_slowly(
    faulty: Faulty, cleanup: list[AsyncRegistrar], caplog: pytest.LogCaptureFixture
) -> None:
    retry = RetryPolicy(initial=0.05, cap=0.5)
    faulty.fail["register"] = Rejected("403 Permission denied", backend="memory")
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=retry)
    cleanup.append(reg)
    with caplog.at_level(logging.DEBUG, logger="registry_agent.registrar"):
        await reg.start()
        await asyncio.sleep(1.6)
    # At the cap (0.25..0.5 s) from the first refusal: at most 1 + 1.6 / 0.25 tries.
    assert 3 <= faulty.calls["register"] <= 7
    status = reg.status()
    assert status["ready"] is False
    assert status["not_ready_reason"].startswith("rejected by the registry: 403 Permission")
    assert len(lines(caplog, logging.ERROR, "register failed")) == 1
    del faulty.fail["register"]  # an operator fixed the permission
    assert await reg.wait_registered(retry.cap + 0.5)
    assert reg.status()["ready"] is True
    assert reg.status()["last_error"] is None


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_backend_validate_fails_start_before_anything_runs(
    registry: MemoryRegistry, kind: str
) -> None:
    class Validating(Faulty):
        def validate(self, instance: ServiceInstance) -> None:
            raise ConfigError("at most 64 meta keys, got 65", field="meta")

    class AsyncValidating(Faulty):
        async def validate(self, instance: ServiceInstance) -> None:
            raise Rejected("meta key 'a.b' contains '.'", backend="memory")

    backend = Validating(registry) if kind == "sync" else AsyncValidating(registry)
    reg = AsyncRegistrar(backend, INSTANCE, ttl=1.0)
    with pytest.raises(ConfigError if kind == "sync" else Rejected):
        await reg.start(wait_registered=5)
    await asyncio.sleep(0.1)
    assert backend.calls == {}
    assert await in_registry(registry) is None
    await reg.stop()


@virtual_time
async def test_entry_counted_lost_a_ttl_after_the_last_heartbeat(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    events: list[RegistrarEvent],
    cleanup: list[AsyncRegistrar],
) -> None:
    reg = make()
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    assert reg.status()["ready"] is True
    registry.stop()
    stopped = loop_clock()
    await eventually(lambda: _true(not reg.registered), within=5)
    took = loop_clock() - stopped
    print(f"registered turned False {took:.2f}s into the outage (TTL {reg.ttl:g}s)")
    # The last heartbeat came at most one interval before the outage.
    assert reg.ttl - reg.heartbeat_interval - 0.05 <= took <= reg.ttl + 0.3
    await asyncio.sleep(0.1)
    status = reg.status()
    assert status["registered"] is False
    assert status["registry_status"] is None
    assert status["ready"] is False
    assert "no heartbeat succeeded" in (status["not_ready_reason"] or "") + (
        status["last_error"] or ""
    )
    assert K.LEASE_LOST in kinds(events)
    assert reg.counters.lease_losses == 1
    registry.start()
    assert await reg.wait_registered(FAST.cap + 1)
    assert reg.status()["ready"] is True
    assert reg.counters.reregistrations == 1


@virtual_time
async def test_registry_side_health_is_read_back_and_reported(
    faulty: Faulty, cleanup: list[AsyncRegistrar], caplog: pytest.LogCaptureFixture
) -> None:
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, retry=FAST)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    faulty.held = (
        HealthStatus.CRITICAL,
        "Maintenance mode is enabled (by http://ops:hunter2@10.0.0.1/)",
    )
    with caplog.at_level(logging.INFO, logger="registry_agent.registrar"):
        await eventually(lambda: _true(not reg.ready), within=reg.verify_interval + 1)
        writes = faulty.calls.get("set_status", 0)
        await asyncio.sleep(reg.verify_interval * 3)
        status = reg.status()
        assert status["registered"] is True
        assert status["registry_status"] == "critical"
        assert status["ready"] is False
        reason = status["not_ready_reason"]
        assert reason.startswith("the registry holds our entry as critical: Maintenance mode")
        assert "hunter2" not in reason
        assert "hunter2" not in (status["registry_note"] or "x")
        assert writes <= 1  # one rewrite of our status, then only reported
        assert faulty.calls.get("set_status", 0) == writes
        faulty.held = None
        await eventually(lambda: _true(reg.ready), within=reg.verify_interval + 1)
    warned = lines(caplog, logging.WARNING, "although we set it passing")
    assert len(warned) == 1
    assert "hunter2" not in warned[0]
    assert lines(caplog, logging.INFO, "as passing again")


@virtual_time
async def test_repairing_a_deleted_entry_releases_its_lease(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    reg = make(ttl=3.0, heartbeat=0.5)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    registry.delete(INSTANCE.service, INSTANCE.id, None)  # key gone, lease alive
    await eventually(lambda: _is(registry, HealthStatus.PASSING), within=reg.ttl + 1)
    assert reg.counters.reregistrations == 1
    assert len(registry._leases) == 1  # the old lease was revoked, not left for a TTL


@virtual_time
async def test_stop_in_a_forked_child_returns_at_once(
    make: Callable[..., AsyncRegistrar],
    registry: MemoryRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = make()
    await reg.start(wait_registered=2)
    parent = reg._fork.pid
    reg._fork.pid = os.getpid() + 1  # as if it were created in our parent
    with caplog.at_level(logging.WARNING):
        started = loop_clock()
        await reg.stop()
        assert loop_clock() - started < 0.05
    assert "crossed fork()" in caplog.text
    assert await in_registry(registry) is HealthStatus.PASSING  # the parent's entry stays
    reg._fork.pid = parent
    await reg.stop()
    assert await in_registry(registry) is None


def test_created_before_fork_and_started_after_deregisters_on_stop(
    registry: MemoryRegistry,
) -> None:
    # A gunicorn master with preload creates it; a worker starts and stops it.
    reg = AsyncRegistrar(registry.url, INSTANCE, ttl=1.0, retry=FAST)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        try:

            async def worker() -> str:
                await reg.start(wait_registered=2)
                held = await in_registry(registry)
                await reg.stop(timeout=2)
                return f"{held} then {await in_registry(registry)}"

            report = asyncio.run(worker())
        except BaseException as exc:
            report = f"child failed: {exc!r}"
        os.write(write, report.encode())
        os._exit(0)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], deadline - time.monotonic())
            chunk = os.read(read, 4096) if ready else b""
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert b"".join(chunks).decode() == f"{HealthStatus.PASSING} then None"


async def test_a_blocked_event_loop_is_logged(
    make: Callable[..., AsyncRegistrar],
    cleanup: list[AsyncRegistrar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = make()
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    with caplog.at_level(logging.WARNING, logger="registry_agent.registrar"):
        await asyncio.sleep(0.05)
        time.sleep(reg.ttl * 1.2)  # noqa: ASYNC251 - blocks the event loop past the TTL
        await asyncio.sleep(0.2)
    assert lines(caplog, logging.WARNING, "event loop was blocked")
    assert await reg.wait_registered(2)  # and it heals


@virtual_time
async def test_the_note_in_the_registry_never_holds_credentials(
    make: Callable[..., AsyncRegistrar], registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    ok = True

    async def check() -> bool:
        if not ok:
            raise RuntimeError("GET http://admin:hunter2@127.0.0.1:9/health: refused")
        return True

    reg = make(
        checks=[CallableCheck(check, interval=0.05)], rise=1, fall=1, on_unhealthy="critical"
    )
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    ok = False
    await eventually(lambda: _is(registry, HealthStatus.CRITICAL), within=2)
    note = registry.snapshot("orders").instances[INSTANCE.id].note
    assert "refused" in note
    assert "hunter2" not in note
    assert "admin" not in note
    assert "hunter2" not in (reg.status()["not_ready_reason"] or "")


def test_scrub_credentials() -> None:
    from registry_agent._registrar import scrub_credentials

    assert scrub_credentials("GET https://u:p@h:1/x and etcd://root:pw@10.0.0.1:2379") == (
        "GET https://***@h:1/x and etcd://***@10.0.0.1:2379"
    )
    assert scrub_credentials("http://h/a@b") == "http://h/a@b"  # an @ in the path is no userinfo


@pytest.mark.parametrize(("given", "sent"), [(None, None), (120, 120.0)])
async def test_deregister_critical_after_defaults_to_the_backends_own(
    faulty: Faulty, given: float | None, sent: float | None
) -> None:
    kwargs = {} if given is None else {"deregister_critical_after": given}
    reg = AsyncRegistrar(faulty, INSTANCE, ttl=1.0, **kwargs)  # type: ignore[arg-type]
    await reg.start(wait_registered=2)
    await reg.stop()
    assert faulty.register_kwargs[0]["deregister_critical_after"] == sent


def test_blocking_facade_defaults_and_readiness(faulty: Faulty) -> None:
    with Registrar(faulty, INSTANCE, ttl=1.0, retry=FAST) as reg:
        assert reg.wait_registered(2)
        assert reg.ready
        faulty.held = (HealthStatus.CRITICAL, "Service Maintenance Mode: disk swap")
        assert eventually_sync(lambda: not reg.ready, within=reg._async.ttl + 2)
    # None: the backend's own deregister_critical_after (e.g. from its URL), not a fixed 60 s.
    assert faulty.register_kwargs[0]["deregister_critical_after"] is None


def eventually_sync(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@virtual_time
async def test_registered_follows_the_clock_not_the_last_report(
    make: Callable[..., AsyncRegistrar], cleanup: list[AsyncRegistrar]
) -> None:
    reg = make(ttl=30.0)  # nothing renews or expires during the test on its own
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    now = loop_clock()
    reg._clock = lambda: now + 29.9  # a frozen loop cannot report: the property must tell
    assert reg.registered
    reg._clock = lambda: now + 30.1
    assert not reg.registered
    assert reg.status()["registered"] is False
    assert reg.status()["ready"] is False
    reg._clock = loop_clock
    assert reg.registered


# -- shared liveness: one lease per TTL renewed by the backend, news instead of timers ----


async def until(predicate: Callable[[], bool], *, within: float) -> float:
    async def check() -> bool:
        return predicate()

    return await eventually(check, within=within)


def other(n: int) -> ServiceInstance:
    return ServiceInstance("orders", address="127.0.0.1", port=9000 + n, id=f"orders-{n}")


class CountingShared(SharedMemoryBackend):
    """The shared memory backend, counting the calls the registrars make."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def register(self, instance: ServiceInstance, **kwargs: Any) -> Lease:
        self._count("register")
        return await super().register(instance, **kwargs)

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        self._count("lookup")
        return await super().lookup(lease)

    async def heartbeat(self, lease: Lease) -> None:
        self._count("heartbeat")
        await super().heartbeat(lease)


@dataclass
class SharedPair:
    """Two registrars on one shared-liveness backend (TTL 1 s), started by ``async with``."""

    backend: CountingShared
    regs: list[AsyncRegistrar]
    seen: list[RegistrarEvent]

    async def __aenter__(self) -> SharedPair:
        for n in range(2):
            reg = AsyncRegistrar(
                self.backend,
                other(n),
                ttl=1.0,
                retry=FAST,
                on_event=self.seen.append,
                shared_liveness=True,
            )
            self.regs.append(reg)
            await reg.start(wait_registered=2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for reg in self.regs:
            await reg.stop()
        await self.backend.close()


@pytest.fixture
def shared_pair(registry: MemoryRegistry) -> SharedPair:
    return SharedPair(CountingShared(registry), [], [])


@virtual_time
async def test_shared_liveness_is_opt_in(
    registry: MemoryRegistry, cleanup: list[AsyncRegistrar]
) -> None:
    # By default a registrar keeps its own lease, on any backend: today's semantics.
    reg = AsyncRegistrar(SharedMemoryBackend(registry), INSTANCE, ttl=1.0, retry=FAST)
    cleanup.append(reg)
    assert isinstance(reg.backend, SharedLiveness)
    await reg.start(wait_registered=2)
    assert reg._lease is not None
    assert not reg._lease.shared
    await asyncio.sleep(1.0)
    assert reg.counters.heartbeats_ok >= 2


def test_memory_url_opens_the_shared_backend() -> None:
    backend = MemoryBackend.from_url("memory://shared-url?shared=true", {})
    assert isinstance(backend, SharedLiveness)
    assert not isinstance(MemoryBackend.from_url("memory://plain", {}), SharedLiveness)


@virtual_time
async def test_shared_registrations_run_no_timers_of_their_own(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        backend = pair.backend
        regs = pair.regs
        assert all(reg._lease is not None and reg._lease.shared for reg in regs)
        assert len(registry._leases) == 1  # one lease for both
        before = time.time()
        await asyncio.sleep(2.5)  # 2.5 TTLs: the backend renewed ~7 times and verified twice
        assert backend.calls.get("register", 0) == 0
        assert backend.calls.get("heartbeat", 0) == 0
        assert backend.calls.get("lookup", 0) == 0  # the backend reads back for all
        assert len(registry.snapshot("orders").healthy()) == 2
        for reg in regs:
            status = reg.status()
            assert status["ready"] is True
            assert status["last_heartbeat"] is not None
            assert status["last_heartbeat"] > before
            assert status["counters"]["heartbeats_ok"] == 0


@virtual_time
async def test_shared_withdrawing_one_keeps_the_other_and_the_last_revokes(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        regs = pair.regs
        (lease_id,) = registry._leases
        await regs[0].stop()
        assert registry.snapshot("orders").healthy() == [other(1)]
        assert list(registry._leases) == [lease_id]
        await regs[1].stop()
        assert registry.snapshot("orders").instances == {}
        assert registry._leases == {}


@virtual_time
async def test_shared_outage_is_announced_once_and_recovered(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        regs = pair.regs
        seen = pair.seen
        seen.clear()
        registry.stop()
        await until(lambda: kinds(seen).count(K.BACKEND_UNAVAILABLE) == 2, within=2)
        assert all(reg.status()["last_error"] is not None for reg in regs)
        registry.start()  # back within the TTL: the lease held
        await until(lambda: kinds(seen).count(K.BACKEND_RECOVERED) == 2, within=2)
        assert K.LEASE_LOST not in kinds(seen)
        assert kinds(seen).count(K.BACKEND_UNAVAILABLE) == 2
        assert len(registry.snapshot("orders").healthy()) == 2


@virtual_time
async def test_shared_lease_lost_after_a_ttl_down_then_all_back_on_one_new_lease(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        regs = pair.regs
        seen = pair.seen
        seen.clear()
        registry.stop()
        await until(lambda: kinds(seen).count(K.LEASE_LOST) == 2, within=3)
        assert not any(reg.registered for reg in regs)
        registry.start()
        await until(lambda: kinds(seen).count(K.REREGISTERED) == 2, within=3)
        assert len(registry.snapshot("orders").healthy()) == 2
        assert len(registry._leases) == 1


@virtual_time
async def test_shared_wipe_brings_every_entry_back(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        regs = pair.regs
        seen = pair.seen
        seen.clear()
        registry.wipe()
        await until(lambda: kinds(seen).count(K.REREGISTERED) == 2, within=3)
        assert kinds(seen).count(K.LEASE_LOST) == 2
        assert len(registry.snapshot("orders").healthy()) == 2
        assert len(registry._leases) == 1
        assert all(reg.counters.lease_losses == 1 for reg in regs)


@virtual_time
async def test_shared_verification_repairs_only_the_entry_that_changed(
    registry: MemoryRegistry,
    shared_pair: SharedPair,
) -> None:
    async with shared_pair as pair:
        regs = pair.regs
        seen = pair.seen
        seen.clear()
        registry.delete("orders", other(0).id, None)  # someone deleted one entry
        await until(lambda: K.REREGISTERED in kinds(seen), within=3)
        assert [e.instance for e in seen if e.kind is K.REREGISTERED] == [other(0)]
        await asyncio.sleep(1.5)  # the backend verified again: the other entry is fine
        assert regs[1].counters.verifications == 0  # the other entry was fine: no news
        assert len(registry.snapshot("orders").healthy()) == 2
        assert regs[1].counters.lease_losses == 0


# -- one typed status -----------------------------------------------------------------


@virtual_time
async def test_snapshot_is_the_typed_status_and_status_is_its_dict(
    make: Callable[..., AsyncRegistrar], cleanup: list[AsyncRegistrar]
) -> None:
    check = Switch(ok=True)
    reg = make(checks=[CallableCheck(check.probe, interval=0.05, name="db")], rise=1)
    cleanup.append(reg)
    await reg.start(wait_registered=2)
    snap = reg.snapshot()
    assert isinstance(snap, RegistrationStatus)
    assert snap.ready is True
    assert snap.registry_status == "passing"
    assert snap.checks["db"].up is True
    assert snap.counters["registrations"] == 1
    assert list(reg.status()) == [
        "service",
        "instance",
        "backend",
        "state",
        "registered",
        "registry_status",
        "registry_note",
        "ready",
        "not_ready_reason",
        "last_heartbeat",
        "last_error",
        "checks",
        "counters",
    ]
    as_dict = snap.to_dict()
    assert as_dict["checks"]["db"]["up"] is True
    assert set(as_dict["checks"]["db"]) == {"up", "ok", "detail", "latency", "at"}
    assert as_dict["counters"] == reg.counters.to_dict()
    with pytest.raises(AttributeError):
        snap.ready = False  # type: ignore[misc]
