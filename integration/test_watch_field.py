"""Watchers in the field, on real Consul and etcd: slow consumers and several consumers.

A consumer slower than the registry gets coalesced events (memory bounded by
the number of instances), a legal sequence that ends at the registry's
state, and one log line when it lags and one when it caught up. Every loop
over one watcher, async or in threads, gets every event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from registry_agent import (
    AsyncWatcher,
    Backend,
    EventType,
    HealthStatus,
    RetryPolicy,
    ServiceInstance,
    Watcher,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ServerProcess
from tests.test_events import Replay

P, C = HealthStatus.PASSING, HealthStatus.CRITICAL
RETRY = RetryPolicy(initial=0.05, cap=0.5)
WITHIN = 15.0  # a change reaches a watcher well within this on a busy machine


@pytest.fixture
async def backend(server: ServerProcess) -> AsyncIterator[Backend]:
    backend = open_backend(server.url)
    yield backend
    await backend.close()


def inst(service: str, n: int, version: int = 0) -> ServiceInstance:
    return ServiceInstance(
        service, address="127.0.0.1", port=9000 + n, id=f"{service}-{n}", meta={"v": str(version)}
    )


async def registry_state(backend: Backend, service: str) -> dict[str, tuple[ServiceInstance, bool]]:
    snapshot = await backend.list(service)
    return {h.instance.id: (h.instance, h.healthy) for h in snapshot.instances.values()}


async def next_events(events: AsyncIterator[WatchEvent], count: int) -> list[tuple[str, str]]:
    got = []
    for _ in range(count):
        event = await asyncio.wait_for(anext(events), WITHIN)
        got.append((str(event.type), event.instance.id))
    return got


async def test_a_slow_consumer_gets_a_legal_coalesced_sequence_ending_at_the_registry(
    server: ServerProcess,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
    measured: Callable[[str, float, float], None],
    record_property: Callable[[str, object], None],
) -> None:
    service = f"slow-{uuid.uuid4().hex[:8]}"
    instances, rounds, per_event, lag = 6, 30, 0.25, 1.0
    generated = 0

    def listener(event: WatchEvent) -> None:
        nonlocal generated
        generated += 1

    caplog.set_level(logging.INFO, logger="registry_agent.watcher")
    watcher = AsyncWatcher(server.url, service, retry=RETRY, listener=listener, lag_warning=lag)
    seen, consumed, most_pending = Replay(), 0, 0

    events = aiter(watcher)
    (backlog,) = [c.backlog for c in watcher._consumers]

    async def consume() -> None:
        nonlocal consumed
        async for event in events:
            seen.apply(event)
            consumed += 1
            await asyncio.sleep(per_event)

    async with watcher:
        assert await watcher.wait_synced(WITHIN)
        consumer = asyncio.create_task(consume())
        started = time.monotonic()
        for version in range(1, rounds + 1):
            for n in range(instances):  # every change moves both fields and health
                status = C if version % 2 else P
                await backend.register(inst(service, n, version), ttl=60, status=status)
                most_pending = max(most_pending, backlog.pending)
        produced_in = time.monotonic() - started
        last_change = time.monotonic()
        expected = await registry_state(backend, service)
        deadline = last_change + 2 * instances * per_event + WITHIN
        while seen.known != expected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        caught_up = time.monotonic() - last_change
        assert seen.known == expected  # the consumer ends at the registry's state
        assert {h.instance.id: (h.instance, h.healthy) for h in watcher.snapshot()} == expected
        consumer.cancel()
    report = (
        f"{rounds * instances} changes in {produced_in:.1f}s made {generated} events; "
        f"the consumer ({per_event}s per event) took {consumed}; at most {most_pending} pending"
    )
    print(report)
    record_property("measured", report)
    measured("slow consumer catch-up", caught_up, 2 * instances * per_event + WITHIN)
    assert generated >= rounds * instances  # the watcher saw a stream of changes...
    assert consumed < generated / 2  # ...that the slow consumer got coalesced
    # One pending entry per instance whatever the lag (+ the second event of one diff).
    assert most_pending <= instances + 1
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if "consumer of the watch" in r.getMessage()
    ]
    assert lines[0][0] == logging.WARNING
    assert "behind" in lines[0][1]
    assert lines[-1] == (logging.INFO, f"a consumer of the watch of {service} caught up")
    assert len(lines) % 2 == 0  # each lagging episode ends with one "caught up"
    assert len(lines) <= 4


async def test_every_loop_over_one_watcher_gets_every_event(
    server: ServerProcess, backend: Backend
) -> None:
    service = f"loops-{uuid.uuid4().hex[:8]}"
    a, b = inst(service, 1), inst(service, 2)
    async with AsyncWatcher(server.url, service, retry=RETRY) as watcher:
        first = aiter(watcher)
        assert await watcher.wait_synced(WITHIN)
        lease_a = await backend.register(a, ttl=60)
        await backend.register(b, ttl=60, status=C)
        assert sorted(await next_events(first, 3)) == [
            ("added", a.id),
            ("added", b.id),
            ("offline", b.id),
        ]
        # A loop started now begins with "added" (and "offline") for what exists.
        second = aiter(watcher)
        assert await next_events(second, 3) == [
            ("added", a.id),
            ("added", b.id),
            ("offline", b.id),
        ]
        await backend.deregister(lease_a)
        for events in (first, second):
            assert await next_events(events, 1) == [("deleted", a.id)]


def test_every_thread_over_one_blocking_watcher_gets_every_event(server: ServerProcess) -> None:
    service = f"threads-{uuid.uuid4().hex[:8]}"
    a = inst(service, 1)
    got: dict[int, list[tuple[EventType, str]]] = {0: [], 1: []}
    with Watcher(server.url, service, retry=RETRY) as watcher:
        assert watcher.wait_synced(WITHIN)

        def consume(k: int) -> None:
            for event in watcher:
                got[k].append((event.type, event.instance.id))

        threads = [threading.Thread(target=consume, args=(k,)) for k in got]
        for thread in threads:
            thread.start()

        async def change() -> None:
            backend = open_backend(server.url)
            try:
                lease = await backend.register(a, ttl=60)
                await wait_for_both(1)
                await backend.set_status(lease, C)
                await wait_for_both(2)
                await backend.deregister(lease)
                await wait_for_both(3)
            finally:
                await backend.close()

        async def wait_for_both(count: int) -> None:
            deadline = time.monotonic() + WITHIN
            while min(len(v) for v in got.values()) < count:
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.02)

        asyncio.run(change())
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    expected = [(EventType.ADDED, a.id), (EventType.OFFLINE, a.id), (EventType.DELETED, a.id)]
    assert got == {0: expected, 1: expected}
