"""Watch scale: a service with 5,000 instances. Initial snapshot time and memory, and the
time from one instance changing to its event (Consul parses the whole body per change)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

from bench.common import Row, log, now, server
from registry_agent import (
    AsyncWatcher,
    EventType,
    HealthStatus,
    ServiceInstance,
    WatchEvent,
    open_backend,
)

SERVICE = "bench-scale"


async def measure(url: str, count: int, trials: int) -> tuple[float, float, list[float]]:
    writer = open_backend(url, timeout=30)
    sem = asyncio.Semaphore(64)

    async def register(i: int) -> object:
        async with sem:
            inst = ServiceInstance(
                SERVICE, address="127.0.0.1", port=1000 + i, meta={"zone": f"z{i % 3}"}
            )
            return await writer.register(inst, ttl=600)

    leases = await asyncio.gather(*(register(i) for i in range(count)))
    await asyncio.sleep(1.0)
    arrivals: list[tuple[float, WatchEvent]] = []
    tracemalloc.start()
    started = now()
    watcher = AsyncWatcher(url, SERVICE, listener=lambda e: arrivals.append((now(), e)))
    await watcher.start()
    await watcher.wait_synced(120)
    snapshot_time = now() - started
    memory = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    assert len(watcher.snapshot()) == count, len(watcher.snapshot())
    samples = []
    for n in range(trials):
        lease = leases[n * 37 % count]
        arrivals.clear()
        t0 = now()
        await writer.set_status(lease, HealthStatus.CRITICAL)  # type: ignore[arg-type]
        while not any(e.type is EventType.OFFLINE for _, e in arrivals):
            if now() - t0 > 10:
                raise RuntimeError("no event")
            await asyncio.sleep(0.001)
        samples.append(next(at for at, e in arrivals if e.type is EventType.OFFLINE) - t0)
        await writer.set_status(lease, HealthStatus.PASSING)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
    await watcher.close()
    await writer.close()
    return snapshot_time, memory, samples


def run(quick: bool = False) -> tuple[list[Row], list[list[str]]]:
    count = 1000 if quick else 5000
    rows, details = [], []
    for kind in ("consul", "etcd"):
        with server(kind) as srv:
            log(f"watch scale on {kind}: {count} instances")
            started = time.monotonic()
            snap, mem, samples = asyncio.run(measure(srv.url, count, 5 if quick else 10))
            log(f"  ({time.monotonic() - started:.0f}s)")
        details.append([kind, str(count), f"{snap:.2f} s", f"{mem:.1f} MB"])
        rows.append(
            Row(
                f"watch scale: {count} instances, one change -> event",
                kind,
                samples,
                "< 100 ms",
                max(samples) < 0.1,
                "ms",
            )
        )
    return rows, details
