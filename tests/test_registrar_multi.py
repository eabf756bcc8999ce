"""One instance in several registries at once, on in-memory backends: the pure parts.

One set of checks and one health gate, one healing lane per backend. The same
promises are checked on real Consul and etcd together in
integration/test_multi_registry.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from test_registrar import FAST, INSTANCE, Switch, loop_clock, virtual_time

from registry_agent import (
    AsyncRegistrar,
    CallableCheck,
    ConfigError,
    Discovery,
    GateState,
    HealthStatus,
    InstanceHealth,
    Lease,
    Registrar,
    RegistrarEvent,
    RegistrarEventKind,
    RegistrationTimeout,
    Rejected,
    ServiceInstance,
    Throttled,
    Watcher,
)
from registry_agent._status import RegistrationStatus
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry, SharedMemoryBackend

K = RegistrarEventKind
TTL = 1.0


def fresh() -> MemoryRegistry:
    return MemoryRegistry.named(f"multi-{uuid.uuid4().hex}", clock=loop_clock)


def held(registry: MemoryRegistry) -> HealthStatus | None:
    health = registry.snapshot(INSTANCE.service).instances.get(INSTANCE.id)
    return None if health is None else health.status


def peek(registry: MemoryRegistry) -> HealthStatus | None:
    """What ``registry`` holds, even while it is stopped (as seen from outside)."""
    was = registry.running
    registry.start()
    try:
        return held(registry)
    finally:
        if not was:
            registry.stop()


async def within(seconds: float, predicate: Callable[[], bool]) -> float:
    """Wait (in loop time, virtual here) until ``predicate``; the time it took."""
    started = loop_clock()
    while not predicate():
        if loop_clock() - started > seconds:
            pytest.fail(f"condition not met within {seconds:g}s")
        await asyncio.sleep(0.01)
    return loop_clock() - started


def make(
    backends: list[Any], events: list[RegistrarEvent] | None = None, **kwargs: Any
) -> AsyncRegistrar:
    kwargs.setdefault("ttl", TTL)
    kwargs.setdefault("retry", FAST)
    if events is not None:
        kwargs["on_event"] = events.append
    return AsyncRegistrar(backends, INSTANCE, **kwargs)


class RefusingBackend(MemoryBackend):
    """Refuses every registration, as a registry without the permission."""

    async def register(self, instance: ServiceInstance, **kwargs: Any) -> Lease:
        raise Rejected("permission denied", backend="memory", instance=instance.id)


class HangingDeregister(MemoryBackend):
    """Never answers a deregistration, as a registry cut off mid-shutdown."""

    async def deregister(self, lease: Lease) -> None:
        await asyncio.Event().wait()


class RefusesCritical(MemoryBackend):
    """A backend that documents it cannot hold a critical entry."""

    def validate_options(
        self, *, ttl: float, deregister_critical_after: float | None, on_unhealthy: str
    ) -> None:
        if on_unhealthy == "critical":
            raise ConfigError("this registry carries no health", field="on_unhealthy")


# -- the list itself -------------------------------------------------------------------


def test_an_empty_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="non-empty") as info:
        AsyncRegistrar([], INSTANCE)
    assert info.value.field == "backend"


def test_the_same_url_twice_names_the_second() -> None:
    a = fresh()
    with pytest.raises(ConfigError, match=r"backend\[2\].*same registry as backend\[0\]") as info:
        AsyncRegistrar([a.url, fresh().url, a.url + "/"], INSTANCE)
    assert info.value.field == "backend[2]"


def test_the_same_object_twice_names_the_second() -> None:
    backend = MemoryBackend(fresh())
    with pytest.raises(ConfigError, match=r"backend\[1\]") as info:
        AsyncRegistrar([backend, backend], INSTANCE)
    assert info.value.field == "backend[1]"


def test_a_bad_url_in_the_list_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        AsyncRegistrar([fresh().url, "nonsense"], INSTANCE)
    assert info.value.field == "backend[1]"
    assert str(info.value).startswith("backend[1]: expected a URL")


def test_names_and_attributes() -> None:
    a, b = fresh(), fresh()
    own = MemoryBackend(b)
    reg = AsyncRegistrar([a.url, own], INSTANCE)
    assert reg.backends[1] is own
    assert reg.backend is reg.backends[0]
    names = [lane.name for lane in reg.snapshot().backends]
    assert names == [a.url, "memory"]

    # An object with a repr of its own is named by it, credentials masked.
    class Named(MemoryBackend):
        def __repr__(self) -> str:
            return "Named(memory://user:secret@somewhere)"

    named = AsyncRegistrar([a.url, Named(b)], INSTANCE)
    assert named.snapshot().backends[1].name == "Named(memory://***@somewhere)"
    # Two objects of one scheme: told apart by their place.
    twins = AsyncRegistrar([MemoryBackend(a), MemoryBackend(b)], INSTANCE)
    assert [s.name for s in twins.snapshot().backends] == [
        "memory (backend[0])",
        "memory (backend[1])",
    ]


@virtual_time
async def test_a_list_of_one_is_the_single_backend() -> None:
    registry = fresh()
    events: list[RegistrarEvent] = []
    single = make([registry.url], events)
    await single.start(wait_registered=2)
    status = single.status()
    assert "backends" not in status  # the status of one backend is what it always was
    assert status["backend"] == "memory"
    assert single.snapshot().backends[0].registered
    assert single.counters.registrations == 1
    await single.stop()
    assert [e.kind for e in events] == [K.REGISTERED, K.STATE_CHANGED, K.DEREGISTERED, K.STOPPED]
    assert [e.backend for e in events] == [registry.url, "", registry.url, ""]


# -- healing, each on its own ---------------------------------------------------------------


@virtual_time
async def test_registered_in_both_events_name_their_backend() -> None:
    a, b = fresh(), fresh()
    events: list[RegistrarEvent] = []
    reg = make([a.url, b.url], events)
    await reg.start(wait_registered=2)
    assert held(a) is held(b) is HealthStatus.PASSING
    registered = {e.backend for e in events if e.kind is K.REGISTERED}
    assert registered == {a.url, b.url}
    assert reg.counters.registrations == 2
    status = reg.status()
    assert [s["name"] for s in status["backends"]] == [a.url, b.url]
    assert all(s["ready"] and s["registry_status"] == "passing" for s in status["backends"])
    await reg.stop()
    assert held(a) is None
    assert held(b) is None
    gone = {e.backend for e in events if e.kind is K.DEREGISTERED}
    assert gone == {a.url, b.url}
    assert [e.backend for e in events if e.kind in (K.STATE_CHANGED, K.STOPPED)] == ["", ""]


@virtual_time
async def test_one_registry_down_at_start_the_other_registers_and_is_ready() -> None:
    a, b = fresh(), fresh()
    b.stop()
    reg = make([a.url, b.url])
    await reg.start()
    took = await within(TTL, lambda: held(a) is HealthStatus.PASSING)
    assert took < TTL
    assert reg.ready
    assert reg.registered
    assert not await reg.wait_registered(1.0)  # every backend: b is down
    snap = reg.snapshot()
    assert snap.ready
    assert snap.not_ready_reason is None
    assert snap.registry_status == "passing"
    first, second = snap.backends
    assert first.ready
    assert not second.registered
    assert second.last_error is not None
    assert "stopped" in second.last_error
    assert snap.last_error is not None
    assert snap.last_error.startswith(f"{b.url}: ")
    # The healthy one keeps heartbeating while the other is down.
    beats = first.counters["heartbeats_ok"]
    await asyncio.sleep(3 * TTL)
    assert reg.snapshot().backends[0].counters["heartbeats_ok"] >= beats + 5
    assert reg.ready
    b.start()
    await within(TTL + 2 * FAST.cap, lambda: held(b) is HealthStatus.PASSING)
    assert await reg.wait_registered(0.1)
    assert reg.snapshot().last_error is None
    await reg.stop()
    assert held(a) is None
    assert held(b) is None


@virtual_time
async def test_wait_registered_times_out_naming_the_missing_backend() -> None:
    a, b = fresh(), fresh()
    b.stop()
    reg = make([a.url, b.url])
    with pytest.raises(RegistrationTimeout) as info:
        await reg.start(wait_registered=1.0)
    text = str(info.value)
    assert f"in {b.url}:" in text
    assert "stopped" in text
    assert a.url not in text
    assert reg.state is GateState.STOPPED
    assert held(a) is None  # stopped: removed from the one that had it


@virtual_time
async def test_a_refusing_backend_fails_start_naming_it_without_delaying_the_other() -> None:
    a = fresh()
    refusing = RefusingBackend(fresh())
    reg = make([a.url, refusing])
    with pytest.raises(Rejected, match=r"backend\[1\] \(memory\): permission denied"):
        await reg.start(wait_registered=5.0)
    # Without waiting: the other is registered at once and stays, the refusal is reported.
    reg = make([a.url, refusing])
    await reg.start()
    await within(0.5, lambda: held(a) is HealthStatus.PASSING)
    assert reg.ready
    second = reg.snapshot().backends[1]
    assert second.last_error is not None
    assert "permission denied" in second.last_error
    assert second.not_ready_reason is not None
    assert "rejected" in second.not_ready_reason
    await reg.stop()


@virtual_time
async def test_validation_names_the_backend() -> None:
    reg = make([fresh().url, RefusesCritical(fresh())], on_unhealthy="critical")
    with pytest.raises(ConfigError) as info:
        await reg.start()
    assert info.value.field == "backend[1]"
    assert "on_unhealthy: this registry carries no health" in str(info.value)
    alone = make([RefusesCritical(fresh())], on_unhealthy="critical")
    with pytest.raises(ConfigError) as single:
        await alone.validate()
    assert single.value.field == "on_unhealthy"  # one backend: the error as it always was


@virtual_time
async def test_a_wiped_registry_is_healed_while_the_other_is_untouched() -> None:
    a, b = fresh(), fresh()
    events: list[RegistrarEvent] = []
    reg = make([a.url, b.url], events)
    await reg.start(wait_registered=2)
    a.wipe()
    await within(2 * TTL, lambda: held(a) is HealthStatus.PASSING)
    again = [e.backend for e in events if e.kind in (K.LEASE_LOST, K.REREGISTERED)]
    assert again == [a.url, a.url]
    counts = [s.counters for s in reg.snapshot().backends]
    assert counts[0]["reregistrations"] == 1
    assert counts[1]["reregistrations"] == counts[1]["lease_losses"] == 0
    await reg.stop()


@virtual_time
async def test_one_gate_withdraws_and_restores_both() -> None:
    a, b = fresh(), fresh()
    check = Switch()
    reg = make([a.url, b.url], checks=[CallableCheck(check.probe, interval=0.05)], rise=2, fall=2)
    await reg.start(wait_registered=2)
    check.ok = False
    await within(1.0, lambda: held(a) is None and held(b) is None)
    assert reg.state is GateState.WITHDRAWN
    reason = reg.snapshot().not_ready_reason
    assert reason is not None
    assert reason.startswith("withdrawn")
    check.ok = True
    await within(1.0, lambda: held(a) is HealthStatus.PASSING and held(b) is HealthStatus.PASSING)
    assert check.calls < 20  # one set of checks, not one per backend
    await reg.stop()


@virtual_time
async def test_critical_with_two_backends_is_held_critical_in_both() -> None:
    a, b = fresh(), fresh()
    check = Switch()
    reg = make(
        [a.url, b.url],
        checks=[CallableCheck(check.probe, interval=0.05)],
        rise=1,
        fall=1,
        on_unhealthy="critical",
    )
    await reg.start(wait_registered=2)
    check.ok = False
    await within(1.0, lambda: held(a) is held(b) is HealthStatus.CRITICAL)
    assert reg.registered
    assert not reg.ready
    assert reg.snapshot().registry_status == "critical"
    await reg.stop()


@virtual_time
async def test_stop_removes_the_healthy_entry_promptly_and_gives_up_on_the_hung_one() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url, HangingDeregister(b)])
    await reg.start(wait_registered=2)
    removed_at: list[float] = []

    async def watch_a() -> None:
        await within(5.0, lambda: held(a) is None)
        removed_at.append(loop_clock())

    watching = asyncio.create_task(watch_a())
    started = loop_clock()
    await reg.stop(timeout=4.0)
    took = loop_clock() - started
    await watching
    assert removed_at[0] - started < 0.5  # not held up by the other
    assert took <= 4.0 + 0.5
    assert reg.state is GateState.STOPPED
    hung = reg.snapshot().backends[1]
    assert hung.last_error is not None  # kept: the entry expires with its TTL there
    assert held(a) is None


@virtual_time
async def test_counters_and_status_sum_up_the_backends() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url, b.url])
    await reg.start(wait_registered=2)
    await asyncio.sleep(TTL)
    snap = reg.snapshot()
    assert isinstance(snap, RegistrationStatus)
    per = [s.counters for s in snap.backends]
    assert snap.counters == {k: per[0][k] + per[1][k] for k in per[0]}
    assert snap.last_heartbeat == max(s.last_heartbeat or 0 for s in snap.backends)
    a.stop()
    b.stop()
    await within(2 * TTL, lambda: not reg.registered)
    why = reg.snapshot().not_ready_reason
    assert why is not None
    assert a.url in why
    assert b.url in why
    await reg.stop(timeout=1.0)


def test_the_blocking_facade_takes_a_list() -> None:
    a, b = (
        MemoryRegistry.named(f"multi-{uuid.uuid4().hex}"),
        MemoryRegistry.named(f"multi-{uuid.uuid4().hex}"),
    )
    with Registrar([a.url, b.url], INSTANCE, ttl=TTL, retry=FAST) as reg:
        assert reg.wait_registered(5)
        assert reg.ready
        assert held(a) is held(b) is HealthStatus.PASSING
        assert len(reg.snapshot().backends) == 2
    assert held(a) is None
    assert held(b) is None


def test_the_blocking_watcher_and_discovery_take_a_list() -> None:
    a = MemoryRegistry.named(f"multi-{uuid.uuid4().hex}")
    b = MemoryRegistry.named(f"multi-{uuid.uuid4().hex}")
    with Registrar([a.url, b.url], INSTANCE, ttl=TTL, retry=FAST) as reg:
        assert reg.wait_registered(5)
        with Watcher([a.url, b.url], INSTANCE.service) as watcher:
            assert watcher.wait_synced(5)
            assert [h.instance for h in watcher.snapshot(INSTANCE.service)] == [INSTANCE]
        with Discovery([a.url, b.url]) as discovery:
            assert discovery.instances(INSTANCE.service) == [INSTANCE]


class ThrottlingBackend(MemoryBackend):
    """Registers, then sheds every heartbeat with a long Retry-After."""

    async def heartbeat(self, lease: Lease) -> None:
        raise Throttled("slow down", retry_after=30.0, backend="memory")


class HangingBackend(MemoryBackend):
    """Registers, then never answers again, as a registry that froze."""

    async def heartbeat(self, lease: Lease) -> None:
        await asyncio.Event().wait()

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        await asyncio.Event().wait()
        return None

    async def deregister(self, lease: Lease) -> None:
        await asyncio.Event().wait()


@virtual_time
async def test_a_throttling_registry_never_slows_the_other() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url, ThrottlingBackend(b)])
    await reg.start(wait_registered=2)
    await asyncio.sleep(3 * TTL)
    first, second = reg.snapshot().backends
    # ttl / 3 between heartbeats: about nine in 3 TTLs, whatever the other does.
    assert first.counters["heartbeats_ok"] >= 3 * TTL / reg.heartbeat_interval - 2
    assert first.ready
    assert second.counters["heartbeats_failed"] >= 1
    assert second.last_error is not None
    assert "slow down" in second.last_error
    assert reg.ready
    await reg.stop()
    assert held(a) is None


@virtual_time
async def test_a_frozen_registry_never_holds_up_the_other_nor_stop() -> None:
    a, b = fresh(), fresh()
    reg = make([HangingBackend(b), a.url])  # the frozen one listed first
    await reg.start(wait_registered=2)
    await asyncio.sleep(3 * TTL)
    frozen, healthy = reg.snapshot().backends
    assert healthy.counters["heartbeats_ok"] >= 3 * TTL / reg.heartbeat_interval - 2
    assert healthy.ready
    assert not frozen.registered  # its heartbeat never came back: a TTL, then counted lost
    assert reg.ready
    snap = reg.snapshot()
    assert snap.registry_status == "passing"  # from the backend that is ready
    started = loop_clock()
    await reg.stop(timeout=2.0)
    assert loop_clock() - started <= 2.0 + 0.1
    assert held(a) is None


@virtual_time
async def test_shared_liveness_on_two_backends_each_follows_its_own() -> None:
    a, b = fresh(), fresh()
    events: list[RegistrarEvent] = []
    reg = make([SharedMemoryBackend(a), SharedMemoryBackend(b)], events, shared_liveness=True)
    await reg.start(wait_registered=2)
    leases = [lane.reg.lease for lane in reg._lanes]
    assert all(lease is not None and lease.shared for lease in leases)
    b.wipe()
    await within(3 * TTL, lambda: held(b) is HealthStatus.PASSING)
    lost = [e.backend for e in events if e.kind in (K.LEASE_LOST, K.REREGISTERED)]
    assert lost == ["memory (backend[1])", "memory (backend[1])"]
    assert reg.snapshot().backends[0].counters["lease_losses"] == 0
    assert held(a) is HealthStatus.PASSING
    await reg.stop()
    assert held(a) is None
    assert held(b) is None


# -- changing the list while running (set_backends) ---------------------------------------


class Counting(MemoryBackend):
    """Counts the registrations and deregistrations asked of it."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.registers = 0
        self.deregisters = 0

    async def register(self, instance: ServiceInstance, **kwargs: Any) -> Lease:
        self.registers += 1
        return await super().register(instance, **kwargs)

    async def deregister(self, lease: Lease) -> None:
        self.deregisters += 1
        await super().deregister(lease)


@virtual_time
async def test_set_backends_keeps_removes_and_adds_without_touching_the_kept() -> None:
    a, b, c = fresh(), fresh(), fresh()
    ka, kb, kc = Counting(a), Counting(b), Counting(c)
    events: list[RegistrarEvent] = []
    # rise=3 at 0.5 s: waiting for the gate again would take 1.5 s.
    check = Switch()
    reg = make([ka, kb], events, checks=[CallableCheck(check.probe, interval=0.5)], rise=3)
    await reg.start(wait_registered=5)
    await asyncio.sleep(TTL)  # a few heartbeats
    a_before, b_before = reg.snapshot().backends
    before = len(events)

    started = loop_clock()
    await reg.set_backends([kc, ka])
    assert loop_clock() - started < 0.5
    assert held(b) is None  # removed at once
    assert kb.deregisters == 1
    took = await within(1.0, lambda: held(c) is HealthStatus.PASSING)
    assert took < 0.5  # healthy already: no new rise
    assert kc.registers == 1
    # The kept lane: no deregistration, no registration, its counters go on.
    assert ka.registers == 1
    assert ka.deregisters == 0
    assert held(a) is HealthStatus.PASSING
    assert reg.backends == (kc, ka)
    assert reg.backend is kc
    snap = reg.snapshot()
    assert [s.index for s in snap.backends] == [0, 1]
    assert snap.backends[1].counters["registrations"] == a_before.counters["registrations"] == 1
    assert a_before.counters["heartbeats_ok"] > 0
    assert snap.backends[1].counters["heartbeats_ok"] >= a_before.counters["heartbeats_ok"]
    assert reg.ready
    assert await reg.wait_registered(1.0)
    news = [(e.kind, e.backend) for e in events[before:]]
    assert (K.DEREGISTERED, b_before.name) in news
    assert sorted(kind for kind, _ in news) == sorted([K.DEREGISTERED, K.REGISTERED])
    await asyncio.sleep(2 * TTL)  # and it stays so
    assert ka.registers == 1
    assert held(a) is held(c) is HealthStatus.PASSING
    assert held(b) is None
    await reg.stop()
    assert held(a) is held(c) is None


@virtual_time
async def test_a_backend_added_while_withdrawn_waits_for_the_gate() -> None:
    a, c = fresh(), fresh()
    check = Switch()
    reg = make([a.url], checks=[CallableCheck(check.probe, interval=0.05)], rise=2, fall=2)
    await reg.start(wait_registered=2)
    check.ok = False
    await within(1.0, lambda: held(a) is None)
    await reg.set_backends([a.url, c.url])
    await asyncio.sleep(1.0)
    assert held(c) is None  # not while withdrawn
    assert reg.state is GateState.WITHDRAWN
    check.ok = True
    await within(1.0, lambda: held(a) is held(c) is HealthStatus.PASSING)
    await reg.stop()


@virtual_time
async def test_set_backends_by_url_keeps_the_lane_and_renames_it() -> None:
    a, b = fresh(), fresh()
    events: list[RegistrarEvent] = []
    reg = make([a.url], events)
    await reg.start(wait_registered=2)
    kept = reg.backend
    before = len(events)
    await reg.set_backends([a.url, b.url])
    assert reg.backend is kept  # the URL names the running lane: not opened again
    await within(1.0, lambda: held(b) is HealthStatus.PASSING)
    assert [s.name for s in reg.snapshot().backends] == [a.url, b.url]
    assert [(e.kind, e.backend) for e in events[before:]] == [(K.REGISTERED, b.url)]
    await reg.set_backends([b.url])
    assert held(a) is None
    assert held(b) is HealthStatus.PASSING
    assert reg.counters.registrations == 1  # b's own: one lane left
    assert [s.name for s in reg.snapshot().backends] == [b.url]
    await reg.stop()
    assert held(b) is None


@virtual_time
async def test_set_backends_refuses_a_bad_list_and_changes_nothing() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url])
    await reg.start(wait_registered=2)
    with pytest.raises(ConfigError, match="non-empty") as info:
        await reg.set_backends([])
    assert info.value.field == "backend"
    other = MemoryBackend(b)
    with pytest.raises(ConfigError, match=r"same registry as backend\[0\]") as info:
        await reg.set_backends([other, a.url, other])
    assert info.value.field == "backend[2]"
    assert len(reg.backends) == 1
    assert held(a) is HealthStatus.PASSING
    assert held(b) is None
    await reg.stop()
    with pytest.raises(RuntimeError, match="stopping"):
        await reg.set_backends([b.url])


@virtual_time
async def test_set_backends_refuses_a_backend_that_refuses_the_options() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url], on_unhealthy="critical")
    await reg.start(wait_registered=2)
    with pytest.raises(ConfigError, match=r"carries no health") as info:
        await reg.set_backends([a.url, RefusesCritical(b)])
    assert info.value.field == "backend[1]"
    assert len(reg.backends) == 1
    assert held(b) is None
    await reg.stop()


@virtual_time
async def test_set_backends_before_start_takes_the_new_list() -> None:
    a, b = fresh(), fresh()
    reg = make([a.url])
    await reg.set_backends([b.url])
    await reg.start(wait_registered=2)
    assert held(b) is HealthStatus.PASSING
    assert held(a) is None
    await reg.stop()


@virtual_time
async def test_set_backends_keeps_a_shared_lease_followed() -> None:
    a, b = fresh(), fresh()
    shared = SharedMemoryBackend(a)
    reg = make([shared], shared_liveness=True)
    await reg.start(wait_registered=2)
    await reg.set_backends([shared, b.url])
    await within(1.0, lambda: held(b) is HealthStatus.PASSING)
    a.wipe()  # the shared heartbeat's news still reaches the kept lane: healed
    await within(3 * TTL, lambda: held(a) is HealthStatus.PASSING)
    assert reg.snapshot().backends[0].counters["reregistrations"] == 1
    await reg.stop()


@virtual_time
async def test_concurrent_set_backends_take_turns() -> None:
    class SlowToValidate(Counting):
        validations = 0

        async def validate(self, instance: ServiceInstance) -> None:
            self.validations += 1
            if self.validations == 1:
                await asyncio.sleep(0.1)  # the second change comes in meanwhile

    a, b, c = fresh(), fresh(), fresh()
    kb = SlowToValidate(b)
    reg = make([a.url])
    await reg.start(wait_registered=2)
    await asyncio.gather(reg.set_backends([a.url, kb]), reg.set_backends([a.url, kb, c.url]))
    assert len(reg.backends) == 3
    await within(1.0, lambda: held(b) is held(c) is HealthStatus.PASSING)
    await asyncio.sleep(TTL)
    # The second change started from the first: b's lane was kept, not made twice.
    assert kb.registers == 1
    assert kb.deregisters == 0
    await reg.stop()


@virtual_time
async def test_a_new_object_for_the_same_registry_replaces_the_lane_in_order() -> None:
    a = fresh()
    old = Counting(a)
    events: list[RegistrarEvent] = []
    reg = make([old], events)
    await reg.start(wait_registered=2)
    new = Counting(a)  # the same registry, another object (new options, say)
    before = len(events)
    await reg.set_backends([new])
    assert reg.backend is new
    # The old entry is removed first, then the new one written: never the other way.
    kinds = [e.kind for e in events[before:]]
    assert kinds[:1] == [K.DEREGISTERED]
    await within(1.0, lambda: held(a) is HealthStatus.PASSING)
    await asyncio.sleep(2 * TTL)
    assert held(a) is HealthStatus.PASSING
    assert (old.deregisters, new.registers) == (1, 1)
    assert reg.counters.reregistrations == 0  # the new entry was never taken away
    await reg.stop()
    assert held(a) is None
