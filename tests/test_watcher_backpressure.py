"""Watchers under a slow consumer, several consumers, failing backends; facades that never raise.

Pure-logic tests on the in-memory backend (real backends: integration/test_watch_field.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from test_events import Replay

from registry_agent import (
    AsyncWatcher,
    BackendUnavailable,
    ConfigError,
    Discovery,
    EventType,
    HealthStatus,
    InstanceHealth,
    Registrar,
    ServiceInstance,
    Watcher,
    WatchEvent,
)
from registry_agent import _blocking as blocking
from registry_agent._backend import Lease
from registry_agent._events import InstanceMap
from registry_agent._models import ServiceSnapshot
from registry_agent._retry import RetryPolicy
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

P, C = HealthStatus.PASSING, HealthStatus.CRITICAL
FAST = RetryPolicy(initial=0.01, cap=0.05)


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"bp-{uuid.uuid4().hex}")


def inst(n: int, version: int = 0) -> ServiceInstance:
    return ServiceInstance(
        "orders", address="127.0.0.1", port=9000 + n, id=f"o{n}", meta={"v": str(version)}
    )


def final_state(watcher: AsyncWatcher | Watcher) -> dict[str, tuple[ServiceInstance, bool]]:
    return {h.instance.id: (h.instance, h.healthy) for h in watcher.snapshot()}


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_slow_consumer_memory_is_bounded_and_it_ends_at_the_current_state(
    registry: MemoryRegistry, record_property: Callable[[str, object], None]
) -> None:
    instances, changes = 100, 50_000
    generated = 0  # what an unbounded queue would have held, counted by a listener
    latest: dict[str, str] = {}

    def listener(event: WatchEvent) -> None:
        nonlocal generated
        generated += 1
        latest[event.instance.id] = event.instance.meta["v"]

    leases = [registry.put(InstanceHealth(inst(n)), ttl=600) for n in range(instances)]
    watcher = AsyncWatcher(registry.url, "orders", listener=listener, retry=FAST)
    seen, consumed = Replay(), 0
    caught_up = asyncio.Event()

    async def consume() -> None:
        nonlocal consumed
        async for event in watcher:
            seen.apply(event)
            consumed += 1
            if caught_up.is_set():
                continue
            await asyncio.sleep(0.01)  # a consumer far slower than the registry

    async with watcher:
        await watcher.wait_synced(5)
        consumer = asyncio.create_task(consume())
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            started = time.monotonic()
            for i in range(changes):
                n = i % instances
                status = P if (i // instances) % 2 else C  # every round flips health too
                registry.put(InstanceHealth(inst(n, i), status), ttl=600, lease_id=leases[n])
                if n == instances - 1:
                    # A round changed each instance once: the watcher sees every change.
                    await wait_until(lambda i=i: latest.get(f"o{instances - 1}") == str(i))
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        produced_in = time.monotonic() - started
        during = consumed
        caught_up.set()
        await wait_until(lambda: seen.known == final_state(watcher), within=10)
        consumer.cancel()
    growth = (current - baseline) / 2**20
    peak_growth = (peak - baseline) / 2**20
    report = (
        f"{changes} changes ({generated} events) in {produced_in:.1f}s; the slow consumer took "
        f"{during} meanwhile, {consumed - during} to catch up; memory growth "
        f"{growth:.2f} MB (peak {peak_growth:.2f} MB)"
    )
    print(report)
    record_property("measured", report)
    assert generated >= 2 * changes  # each change was seen: field and health events
    assert consumed - during <= 2 * instances  # what waited was one entry per instance
    assert peak_growth < 10.0


async def test_two_loops_over_one_watcher_each_get_every_event(registry: MemoryRegistry) -> None:
    registry.put(InstanceHealth(inst(1)), ttl=60)
    async with AsyncWatcher(registry.url, "orders", retry=FAST) as watcher:
        first, second = aiter(watcher), aiter(watcher)
        assert (await anext(first)).instance == inst(1)
        lease = registry.put(InstanceHealth(inst(2)), ttl=60)
        registry.put(InstanceHealth(inst(2), C), ttl=60, lease_id=lease)
        got_first = [(e.type, e.instance.id) for e in [await anext(first) for _ in range(2)]]
        await asyncio.sleep(0.05)
        got_second = [(e.type, e.instance.id) for e in [await anext(second) for _ in range(3)]]
        assert got_first in (
            [(EventType.ADDED, "o2"), (EventType.OFFLINE, "o2")],  # saw both changes
            [(EventType.ADDED, "o2"), (EventType.OFFLINE, "o2")],
        )
        assert got_second == [
            (EventType.ADDED, "o1"),
            (EventType.ADDED, "o2"),
            (EventType.OFFLINE, "o2"),
        ]
        # A loop started later begins with "added" for what exists, then follows.
        third = aiter(watcher)
        assert [(e.type, e.instance.id) for e in [await anext(third) for _ in range(3)]] == (
            got_second
        )
        registry.delete("orders", "o1", None)
        for events in (first, second, third):
            event = await asyncio.wait_for(anext(events), 2)
            assert (event.type, event.instance.id) == (EventType.DELETED, "o1")


async def test_a_cancelled_wait_loses_no_event_and_a_dropped_loop_is_forgotten(
    registry: MemoryRegistry,
) -> None:
    async with AsyncWatcher(registry.url, "orders", retry=FAST) as watcher:
        events = aiter(watcher)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 0.1)
        registry.put(InstanceHealth(inst(1)), ttl=60)
        event = await asyncio.wait_for(anext(events), 2)
        assert (event.type, event.instance.id) == (EventType.ADDED, "o1")
        async for _ in watcher:
            break
        del events, _
        gc.collect()
        assert len(watcher._consumers) == 0


async def test_listener_and_loops_together(registry: MemoryRegistry) -> None:
    heard: list[EventType] = []
    async with AsyncWatcher(registry.url, "orders", listener=lambda e: heard.append(e.type)) as w:
        events = aiter(w)
        registry.put(InstanceHealth(inst(1), C), ttl=60)
        got = [(await asyncio.wait_for(anext(events), 2)).type for _ in range(2)]
    assert got == heard == [EventType.ADDED, EventType.OFFLINE]


async def test_close_ends_every_loop(registry: MemoryRegistry) -> None:
    watcher = AsyncWatcher(registry.url, "orders", retry=FAST)

    async def drain() -> int:
        return len([e async for e in watcher])

    loops = [asyncio.create_task(drain()) for _ in range(3)]
    await watcher.wait_synced(2)
    await asyncio.sleep(0.05)
    await watcher.close()
    assert await asyncio.wait_for(asyncio.gather(*loops), 1) == [0, 0, 0]
    assert [e async for e in watcher] == []  # a closed watcher yields nothing


async def test_lagging_is_logged_once_per_episode(
    registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    lag = 0.2
    lease = registry.put(InstanceHealth(inst(1)), ttl=60)
    caplog.set_level(logging.INFO, logger="registry_agent.watcher")
    async with AsyncWatcher(registry.url, "orders", retry=FAST, lag_warning=lag) as watcher:
        events = aiter(watcher)
        await anext(events)
        version = 0
        for episode in range(2):
            deadline = time.monotonic() + 3 * lag
            while time.monotonic() < deadline:  # the registry changes; nobody reads
                version += 1
                registry.put(InstanceHealth(inst(1, version)), ttl=60, lease_id=lease)
                await asyncio.sleep(0.01)
            event = await anext(events)  # one coalesced update: the consumer caught up
            assert event.type is EventType.UPDATED
            assert event.instance.meta["v"] == str(version)
            assert event.previous is not None
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(events), 0.05)
            lines = [
                (r.levelno, r.getMessage())
                for r in caplog.records
                if "consumer of the watch" in r.getMessage()
            ]
            assert [level for level, _ in lines] == [logging.WARNING, logging.INFO] * (episode + 1)
            assert "behind" in lines[-2][1]
            assert "caught up" in lines[-1][1]


def test_lag_warning_is_validated(registry: MemoryRegistry) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncWatcher(registry.url, "orders", lag_warning=0)
    assert info.value.field == "lag_warning"


# -- the blocking Watcher ------------------------------------------------------------


def test_two_threads_iterating_a_blocking_watcher_each_get_every_event(
    registry: MemoryRegistry,
) -> None:
    registry.put(InstanceHealth(inst(1)), ttl=60)
    got: dict[str, list[tuple[EventType, str]]] = {"a": [], "b": []}
    with Watcher(registry.url, "orders", retry=FAST) as watcher:

        def consume(name: str) -> None:
            for event in watcher:
                got[name].append((event.type, event.instance.id))

        threads = [threading.Thread(target=consume, args=(name,)) for name in got]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while min(len(v) for v in got.values()) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        registry.put(InstanceHealth(inst(2)), ttl=60)
        while min(len(v) for v in got.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        registry.delete("orders", "o1", None)
        expected = [(EventType.ADDED, "o1"), (EventType.ADDED, "o2"), (EventType.DELETED, "o1")]
        while min(len(v) for v in got.values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(2)
        assert not thread.is_alive()
    assert got == {"a": expected, "b": expected}


def test_blocking_slow_consumer_gets_coalesced_events(registry: MemoryRegistry) -> None:
    instances, changes = 10, 3000
    leases = [registry.put(InstanceHealth(inst(n)), ttl=600) for n in range(instances)]
    seen = Replay()
    with Watcher(registry.url, "orders", retry=FAST) as watcher:
        assert watcher.wait_synced(5)
        events = iter(watcher)
        for _ in range(instances):
            seen.apply(next(events))
        for i in range(1, changes + 1):
            n = i % instances
            registry.put(InstanceHealth(inst(n, i), P if i % 7 else C), ttl=600, lease_id=leases[n])
            if i % 100 == 0:
                seen.apply(next(events))  # reads one event every 100 changes
        time.sleep(0.2)
        taken = 0
        while seen.known != final_state(watcher):
            seen.apply(next(events))
            taken += 1
            assert taken <= 2 * instances, "more pending than one entry per instance"
    assert {iid: inst.meta["v"] for iid, (inst, _) in seen.known.items()} == {
        f"o{n}": str(changes - (changes - n) % instances) for n in range(instances)
    }


def test_blocking_close_wakes_loops_at_once(registry: MemoryRegistry) -> None:
    watcher = Watcher(registry.url, "orders", retry=FAST)
    done = threading.Event()

    def consume() -> None:
        for _ in watcher:
            pass
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert watcher.wait_synced(2)
    time.sleep(0.05)
    started = time.monotonic()
    watcher.close()
    assert done.wait(1)
    assert time.monotonic() - started < 1
    assert list(watcher) == []  # iterating a closed watcher ends at once
    thread.join(1)


# -- any exception from a backend ----------------------------------------------------


class BrokenWatch(MemoryBackend):
    """A backend whose watch raises a non-RegistryError the first ``failures`` times."""

    def __init__(self, registry: MemoryRegistry, failures: int) -> None:
        super().__init__(registry)
        self.failures = failures

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        if self.failures > 0:
            self.failures -= 1
            raise AttributeError("'Consul' object has no attribute 'ConsulException'")
        async for snapshot in super().watch(service, since=since):
            yield snapshot


async def test_any_watch_exception_reaches_on_error_as_a_registry_error(
    registry: MemoryRegistry,
) -> None:
    registry.put(InstanceHealth(inst(1)), ttl=60)
    errors: list[tuple[str, BaseException]] = []
    backend = BrokenWatch(registry, failures=3)
    watcher = AsyncWatcher(
        backend, "orders", retry=FAST, on_error=lambda svc, exc: errors.append((svc, exc))
    )
    async with watcher:
        event = await asyncio.wait_for(anext(aiter(watcher)), 5)
    assert event.type is EventType.ADDED
    assert len(errors) == 3
    assert watcher.errors == 3
    for service, error in errors:
        assert service == "orders"
        assert isinstance(error, BackendUnavailable)
        assert "AttributeError" in str(error)
        assert "ConsulException" in str(error)
        assert isinstance(error.__cause__, AttributeError)


# -- facades never raise from stop()/close() -----------------------------------------


class BrokenStop(MemoryBackend):
    """Deregister and close fail the way an outdated client library does."""

    async def deregister(self, lease: Lease) -> None:
        raise AttributeError("'Consul' object has no attribute 'ConsulException'")

    async def close(self) -> None:
        raise AttributeError("'NoneType' object has no attribute 'close'")


def test_registrar_stop_never_raises(
    registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registrar = Registrar(BrokenStop(registry), inst(1), ttl=5)
    registrar.start(wait_registered=5)
    assert registrar.registered
    started = time.monotonic()
    registrar.stop(timeout=1)
    assert time.monotonic() - started < 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("AttributeError" in m for m in warnings), warnings
    registrar.stop()  # a second call is a no-op
    assert not registrar._thread._thread.is_alive()  # type: ignore[union-attr]


def test_registrar_stop_never_raises_whatever_the_core_raises(
    registry: MemoryRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_stop(self: object, timeout: float = 10.0) -> None:
        raise AttributeError("'NoneType' object has no attribute 'revoke'")

    registrar = Registrar(MemoryBackend(registry), inst(1), ttl=5).start(wait_registered=5)
    monkeypatch.setattr(blocking.AsyncRegistrar, "stop", broken_stop)
    registrar.stop(timeout=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "stop of o1 failed: AttributeError: 'NoneType' object has no attribute 'revoke'" in (
        warnings
    )
    assert not registrar._thread._thread.is_alive()  # type: ignore[union-attr]


def test_registrar_stop_when_the_loop_does_not_answer(
    registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registrar = Registrar(MemoryBackend(registry), inst(1), ttl=5).start(wait_registered=5)
    # The loop thread is stuck (someone blocked it): stop() gives up, logs, returns.
    stop_timeout, hop = 0.3, 2.0  # stop() waits for the loop stop_timeout + 2 s
    registrar._thread.loop.call_soon_threadsafe(time.sleep, stop_timeout + hop + 0.3)
    time.sleep(0.05)
    started = time.monotonic()
    registrar.stop(timeout=stop_timeout)
    assert time.monotonic() - started < stop_timeout + hop + 5.5  # then the thread's join
    assert any("no answer from the event loop" in r.getMessage() for r in caplog.records)


def test_watcher_and_discovery_close_never_raise(
    registry: MemoryRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry.put(InstanceHealth(inst(1)), ttl=60)

    async def broken_close(self: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'cancel'")

    watcher = Watcher(registry.url, "orders")
    assert watcher.wait_synced(2)
    discovery = Discovery(registry.url)
    assert discovery.instances("orders") == [inst(1)]
    monkeypatch.setattr(AsyncWatcher, "close", broken_close)
    monkeypatch.setattr(blocking.AsyncDiscovery, "close", broken_close)
    watcher.close()
    discovery.close()
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("closing the watcher failed: AttributeError" in m for m in failures)
    assert any("closing the discovery failed: AttributeError" in m for m in failures)


def test_a_stuck_watcher_close_is_bounded(
    registry: MemoryRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_close(self: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(blocking, "_QUICK", 0.3)
    watcher = Watcher(registry.url, "orders")
    assert watcher.wait_synced(2)
    monkeypatch.setattr(AsyncWatcher, "close", stuck_close)
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < 0.3 + 5.5  # the hop, then the loop thread's join


# -- the watcher's own cost per change -------------------------------------------------


class CountingMap(InstanceMap):
    """An InstanceMap that counts how often something walks all of it."""

    walks = 0

    def __iter__(self) -> Iterator[str]:
        CountingMap.walks += 1
        return super().__iter__()

    def items(self) -> Any:
        CountingMap.walks += 1
        return super().items()


class Scripted(MemoryBackend):
    """A backend whose watch yields the snapshots the test puts in its queue."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.queue: asyncio.Queue[ServiceSnapshot] = asyncio.Queue()

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        while True:
            yield await self.queue.get()


async def test_snapshots_that_name_their_changes_cost_the_watcher_only_those(
    registry: MemoryRegistry,
) -> None:
    count, changes = 20_000, 200
    last = CountingMap({f"o{n}": InstanceHealth(inst(n)) for n in range(count)})
    backend = Scripted(registry)
    backend.queue.put_nowait(ServiceSnapshot("orders", 1, last))
    heard: list[WatchEvent] = []
    taken: list[WatchEvent] = []
    async with AsyncWatcher(backend, "orders", retry=FAST, listener=heard.append) as watcher:
        loop = aiter(watcher)
        assert len([await anext(loop) for _ in range(count)]) == count  # "added" for each
        CountingMap.walks = 0
        for n in range(changes):
            change = {f"o{n // 2}": InstanceHealth(inst(n // 2), C if n % 2 == 0 else P)}
            if n % 50 == 0:
                change[f"new{n}"] = InstanceHealth(inst(count + n))
            last = last.evolve(change)
            backend.queue.put_nowait(ServiceSnapshot("orders", n + 2, last))
            taken.extend([await anext(loop) for _ in change])
        walks = CountingMap.walks
        assert len(watcher.snapshot()) == count + changes // 50
    # Every change reached the listener and the loop, and nothing walked the whole
    # map: a full diff per change would have walked it once per snapshot at least.
    assert walks == 0
    assert [(e.type, e.instance.id) for e in heard[count:]] == [
        (e.type, e.instance.id) for e in taken
    ]
    assert sum(e.type is EventType.OFFLINE for e in taken) == changes // 2
    assert sum(e.type is EventType.ONLINE for e in taken) == changes // 2
    assert sum(e.type is EventType.ADDED for e in taken) == changes // 50


async def test_a_failing_listener_ends_no_watch_and_is_reported_a_line_a_minute(
    registry: MemoryRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # A break-it run: a raising listener logged its traceback on every event, and one
    # calling sys.exit() ended the app's asyncio.run() with SystemExit.
    calls = 0

    def listener(event: WatchEvent) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ValueError(f"bad listener {calls}")
        raise SystemExit(3)

    for n in range(3):
        registry.put(InstanceHealth(inst(n)), ttl=600)
    with caplog.at_level(logging.ERROR, "registry_agent.watcher"):
        async with AsyncWatcher(registry.url, "orders", listener=listener, retry=FAST) as w:
            await w.wait_synced(5)
            for n in range(20):
                registry.put(InstanceHealth(inst(n % 3, version=n + 1)), ttl=600)
            registry.delete("orders", "o0", None)
            await wait_until(lambda: "o0" not in final_state(w))
            assert final_state(w).keys() == {"o1", "o2"}  # the watch went on
    assert calls >= 4  # both kinds raised, many times
    failures = [r for r in caplog.records if r.getMessage().startswith("watch listener failed")]
    assert len(failures) == 1, [r.getMessage() for r in failures]  # then counted, quiet
    assert failures[0].exc_info is not None  # the first with its traceback
