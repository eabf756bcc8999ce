"""A watch of a big Consul service: each change is one event, soon (real Consul).

2,000 instances are written straight into the catalog on a node of their own
(the transaction API, 64 operations per request: the agent's own endpoint
takes ~25 ms per registration at this size, 50 s in all), plus instances
registered through a raw backend on the agent. Each change, one at a time,
must give exactly one event, within half the blocking queries' ``wait``: a
change noticed only when a blocking query's wait runs out would take longer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from registry_agent_consul import ConsulBackend

from registry_agent import (
    AsyncWatcher,
    EventType,
    HealthStatus,
    ServiceInstance,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer

Measured = Callable[[str, float, float], None]

SERVICE = "scale"
COUNT = 2_000
NODE = "scale-node"  # no agent: no node checks, nothing for anti-entropy to undo
TXN_OPS = 64  # Consul's most operations per transaction
QUIET = 1.0  # after an event, a second one for the same change would come well within this


def _ops(n: int, status: str = "passing") -> list[dict[str, object]]:
    """Transaction operations writing instance ``n`` and its check."""
    service_id = f"scale-{n}"
    return [
        {
            "Service": {
                "Verb": "set",
                "Node": NODE,
                "Service": {
                    "ID": service_id,
                    "Service": SERVICE,
                    "Address": "127.0.0.1",
                    "Port": 10_000 + n,
                    "Tags": ["v1"],
                    "Meta": {"zone": f"z{n % 3}"},
                },
            }
        },
        {
            "Check": {
                "Verb": "set",
                "Check": {
                    "Node": NODE,
                    "CheckID": f"service:{service_id}",
                    "Name": "liveness",
                    "Status": status,
                    "ServiceID": service_id,
                },
            }
        },
    ]


async def _fill(http: httpx.AsyncClient) -> None:
    reply = await http.put("/v1/catalog/register", json={"Node": NODE, "Address": "127.0.0.1"})
    reply.raise_for_status()
    ops = [op for n in range(COUNT) for op in _ops(n)]
    for start in range(0, len(ops), TXN_OPS):
        reply = await http.put("/v1/txn", json=ops[start : start + TXN_OPS])
        assert reply.status_code == 200, reply.text[:300]


async def test_each_change_in_a_service_of_2000_instances_is_one_event(
    consul_server: ConsulServer, measured: Measured
) -> None:
    writer = open_backend(consul_server.url)
    watching = open_backend(consul_server.url)
    assert isinstance(watching, ConsulBackend)
    bound = watching.wait / 2
    events: list[tuple[float, WatchEvent]] = []
    arrived = asyncio.Event()

    def listener(event: WatchEvent) -> None:
        events.append((time.perf_counter(), event))
        arrived.set()

    async def one_event(what: str, change: Callable[[], object]) -> WatchEvent:
        await asyncio.sleep(QUIET)  # nothing left over from the change before
        assert events == [], events
        arrived.clear()
        started = time.perf_counter()
        result = change()
        if asyncio.iscoroutine(result):
            await result
        await asyncio.wait_for(arrived.wait(), bound * 4)  # fails below with the figure
        measured(what, events[0][0] - started, bound)
        await asyncio.sleep(QUIET)
        assert len(events) == 1, [(e.type, e.instance.id) for _, e in events]
        event = events.pop()[1]
        return event

    ours = ServiceInstance(SERVICE, "127.0.0.1", 9001, id="scale-ours")
    extra = ServiceInstance(SERVICE, "127.0.0.1", 9002, id="scale-extra", meta={"k": "v"})
    async with httpx.AsyncClient(base_url=consul_server.http, timeout=30) as http:
        filled = time.perf_counter()
        await _fill(http)
        lease = await writer.register(ours, ttl=3600)
        print(f"{COUNT} instances written in {time.perf_counter() - filled:.1f}s")
        try:
            started = time.perf_counter()
            async with AsyncWatcher(watching, SERVICE, listener=listener) as watcher:
                assert await watcher.wait_synced(60)
                assert len(watcher.snapshot()) == COUNT + 1
                measured("first snapshot of 2,001", time.perf_counter() - started, 60)
                while events:  # the first snapshot's "added" events
                    await asyncio.sleep(QUIET)
                    if all(e.type is EventType.ADDED for _, e in events):
                        events.clear()

                event = await one_event(
                    "status change -> event",
                    lambda: writer.set_status(lease, HealthStatus.CRITICAL, "scale test"),
                )
                assert (event.type, event.instance.id) == (EventType.OFFLINE, ours.id)
                assert event.status is HealthStatus.CRITICAL

                event = await one_event(
                    "membership change -> event", lambda: writer.register(extra, ttl=3600)
                )
                assert (event.type, event.instance) == (EventType.ADDED, extra)
                assert event.status is HealthStatus.PASSING

                # One of the 2,000, written into the catalog directly.
                event = await one_event(
                    "catalog status -> event",
                    lambda: http.put("/v1/txn", json=_ops(1234, "warning")[1:]),
                )
                assert (event.type, event.instance.id) == (EventType.OFFLINE, "scale-1234")
                assert event.status is HealthStatus.WARNING

                event = await one_event(
                    "deregistration -> event",
                    lambda: http.put("/v1/agent/service/deregister/scale-extra"),
                )
                assert (event.type, event.instance.id) == (EventType.DELETED, extra.id)
                assert len(watcher.snapshot()) == COUNT + 1
        finally:
            await writer.close()
            await watching.close()
