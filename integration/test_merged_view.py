"""One view over several real registries: Consul 1.8 and etcd 3.5 (ours and go-zero's format).

The same instance held by several registries is one entry (by address:port), shown from
the first backend listed that holds it; a registry that is down keeps its instances.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from registry_agent import (
    AsyncDiscovery,
    AsyncWatcher,
    EventType,
    InstanceHealth,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer, free_port

from .event_log import EventLog

Measured = Callable[[str, float, float], None]
FAST = RetryPolicy(initial=0.05, cap=0.5)
# Long enough that nothing expires during the test: only what the test does changes.
TTL = 60.0
# A watch sees a change well within this on an idle machine (it takes milliseconds).
SEEN = 10.0
# How long "no event" is waited for after the watcher has seen the change.
QUIET = 1.0


async def until(condition: Callable[[], bool], within: float = SEEN) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def held(watcher: AsyncWatcher, member: int) -> dict[str, InstanceHealth]:
    """What one backend of the watch holds now (the merged view's input)."""
    return dict(watcher._views["orders"].member(member))


async def test_one_instance_in_consul_and_etcd_is_one_entry_and_survives_a_stopped_etcd(
    consul_server: ConsulServer, etcd_server: EtcdServer, measured: Measured
) -> None:
    urls = [
        consul_server.url,
        f"{etcd_server.url}?timeout=2",
        # go-zero keeps no id: its entry's id is a number, not "orders-1".
        f"{etcd_server.url}?format=go-zero&timeout=2",
    ]
    consul, etcd, gozero = (open_backend(url) for url in urls)
    port, other_port = free_port(), free_port()
    instance = ServiceInstance("orders", address="127.0.0.1", port=port, id="orders-1")
    only_in_etcd = ServiceInstance("orders", address="127.0.0.1", port=other_port, id="orders-2")
    errors: list[tuple[str, BaseException]] = []
    watcher = AsyncWatcher(urls, "orders", retry=FAST, on_error=lambda s, e: errors.append((s, e)))
    try:
        async with EventLog(watcher) as events:
            assert await watcher.wait_synced(SEEN)
            # In etcd, then in Consul too: one added. (etcd first: a Consul entry may read
            # critical for a moment before its check is set, and etcd's passing covers it.)
            in_etcd = await etcd.register(instance, ttl=TTL)
            await until(lambda: len(events) == 1)
            in_consul = await consul.register(instance, ttl=TTL)
            await until(lambda: all(held(watcher, m) for m in (0, 1)))
            await asyncio.sleep(QUIET)
            assert [(e.type, e.instance) for e in events] == [(EventType.ADDED, instance)]

            # Deregistered from Consul: still in etcd with the same fields, no event.
            await consul.deregister(in_consul)
            await until(lambda: not held(watcher, 0))
            await asyncio.sleep(QUIET)
            assert len(events) == 1

            # Deregistered from etcd too: deleted.
            await etcd.deregister(in_etcd)
            took = await until(lambda: len(events) == 2)
            assert (events[1].type, events[1].instance) == (EventType.DELETED, instance)
            measured("deleted after the last", took, SEEN)

            # In go-zero's format: added under go-zero's id. Then in Consul, listed first:
            # shown from Consul now, one update. Then in etcd (ours) too: nothing.
            await gozero.register(instance, ttl=TTL)
            await until(lambda: len(events) == 3)
            assert events[2].type is EventType.ADDED
            assert events[2].instance.id != instance.id
            assert (events[2].instance.address, events[2].instance.port) == ("127.0.0.1", port)
            await consul.register(instance, ttl=TTL)
            await until(lambda: len(events) == 4)
            assert (events[3].type, events[3].instance) == (EventType.UPDATED, instance)
            assert events[3].previous == events[2].instance
            await etcd.register(instance, ttl=TTL)
            await etcd.register(only_in_etcd, ttl=TTL)
            await until(lambda: len(events) == 5)
            assert (events[4].type, events[4].instance) == (EventType.ADDED, only_in_etcd)
            await until(lambda: len(held(watcher, 1)) == 2)

            # etcd stopped: its watches fail, and nothing it held is deleted.
            etcd_server.stop()
            stopped = time.monotonic()
            await until(lambda: any("etcd" in str(e.backend) for _, e in errors))
            await asyncio.sleep(QUIET)
            assert len(events) == 5, events[5:]
            assert [h.instance.id for h in watcher.snapshot()] == ["orders-1", "orders-2"]
            assert all(h.healthy for h in watcher.snapshot())

            # A new discovery over the three: etcd never answers, Consul does, and the
            # view is served (what only etcd holds it never saw).
            async with AsyncDiscovery(urls, retry=FAST, sync_timeout=SEEN) as discovery:
                started = time.monotonic()
                chosen = await discovery.choose("orders")
                measured("first choose, etcd down", time.monotonic() - started, SEEN)
                assert chosen == instance
                assert chosen.node  # read from Consul
                assert await discovery.instances("orders") == [instance]
            assert len(events) == 5
            assert time.monotonic() - stopped < TTL  # nothing expired meanwhile
    finally:
        for backend in (consul, etcd, gozero):
            await backend.close()


async def test_a_frozen_registry_is_waited_for_within_sync_timeout_before_none(
    consul_server: ConsulServer, etcd_server: EtcdServer, measured: Measured
) -> None:
    """The service is only in etcd; etcd freezes for 7 s, longer than its 5 s request
    timeout: the merged first read must not answer 'no instance' from Consul's empty
    view while sync_timeout (15 s) still runs."""
    backend = open_backend(etcd_server.url, timeout=5)
    instance = ServiceInstance("frozen", address="127.0.0.1", port=free_port())
    await backend.register(instance, ttl=TTL)
    await backend.close()
    etcd_server.pause()
    thaw = asyncio.get_running_loop().call_later(7, etcd_server.resume)
    try:
        async with AsyncDiscovery(
            [consul_server.url, f"{etcd_server.url}?timeout=5"], sync_timeout=15
        ) as discovery:
            started = time.monotonic()
            chosen = await discovery.choose("frozen")
            took = time.monotonic() - started
        assert chosen == instance
        measured("found after etcd thawed", took, 15)
    finally:
        thaw.cancel()
        etcd_server.resume()
