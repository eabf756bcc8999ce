"""Registry change -> event in user code: registry-agent's watcher vs the raw client library.

Raw baselines use the same libraries directly: an aetcd prefix watch, and
py-consul blocking queries (through the same httpx adapter). Each trial
rewrites one instance's meta; latency runs from just before the write to the
moment user code holds the event.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Awaitable, Callable

import aetcd
from registry_agent_consul import ConsulBackend

from bench.common import Row, log, now, server
from registry_agent import AsyncWatcher, EventType, ServiceInstance, WatchEvent, open_backend

SERVICE = "bench-prop"
TRIALS = 40


def instance(n: int) -> ServiceInstance:
    return ServiceInstance(SERVICE, address="127.0.0.1", port=8000, id="prop-1", meta={"n": str(n)})


async def _trials(url: str, arrivals: dict[int, float], trials: int) -> list[float]:
    writer = open_backend(url)
    samples = []
    try:
        await writer.register(instance(-1), ttl=600)
        await asyncio.sleep(0.3)
        for n in range(trials):
            started = now()
            await writer.register(instance(n), ttl=600)
            for _ in range(2000):
                if n in arrivals:
                    break
                await asyncio.sleep(0.0005)
            else:
                raise RuntimeError(f"trial {n}: no event within 1s")
            samples.append(arrivals[n] - started)
            await asyncio.sleep(0.02)
    finally:
        await writer.close()
    return samples


async def ours(url: str, trials: int) -> list[float]:
    arrivals: dict[int, float] = {}

    def listener(event: WatchEvent) -> None:
        if event.type is EventType.UPDATED or event.type is EventType.ADDED:
            arrivals[int(event.instance.meta["n"])] = now()

    watcher = AsyncWatcher(url, SERVICE, listener=listener)
    await watcher.start()
    await watcher.wait_synced(5)
    try:
        return await _trials(url, arrivals, trials)
    finally:
        await watcher.close()


async def raw_etcd(url: str, trials: int) -> list[float]:
    host, port = url.removeprefix("etcd://").split(":")
    arrivals: dict[int, float] = {}
    client = aetcd.Client(host=host, port=int(port))
    watch = await client.watch_prefix(f"/services/{SERVICE}/".encode())

    async def pump() -> None:
        async for event in watch:
            arrivals[int(json.loads(event.kv.value)["meta"]["n"])] = now()

    task = asyncio.create_task(pump())
    try:
        return await _trials(url, arrivals, trials)
    finally:
        task.cancel()
        await watch.cancel()
        await client.close()


async def raw_consul(url: str, trials: int) -> list[float]:
    backend = open_backend(url)
    assert isinstance(backend, ConsulBackend)
    api = backend.api
    arrivals: dict[int, float] = {}

    async def pump() -> None:
        index = None
        while True:
            index, entries = await api.health.service(SERVICE, index=index, wait="60s")
            for entry in entries:
                n = int((entry["Service"].get("Meta") or {}).get("n", "-2"))
                arrivals.setdefault(n, now())

    task = asyncio.create_task(pump())
    try:
        return await _trials(url, arrivals, trials)
    finally:
        task.cancel()
        await backend.close()


async def _measure(kind: str, url: str, trials: int) -> tuple[list[float], list[float]]:
    raw: Callable[[str, int], Awaitable[list[float]]] = raw_etcd if kind == "etcd" else raw_consul
    raw_samples, our_samples = [], []
    # Alternate blocks so drift on a busy machine hits both alike.
    for _ in range(2):
        raw_samples += await raw(url, trials // 2)
        our_samples += await ours(url, trials // 2)
    return raw_samples, our_samples


def run(quick: bool = False) -> list[Row]:
    rows = []
    trials = 10 if quick else TRIALS
    for kind in ("consul", "etcd"):
        with server(kind) as srv:
            log(f"propagation on {kind}: {trials} raw + {trials} registry-agent trials")
            raw, mine = asyncio.run(_measure(kind, srv.url, trials))
        extra = statistics.median(mine) - statistics.median(raw)
        rows.append(Row("propagation: raw client", kind, raw, "baseline", True, "ms"))
        rows.append(
            Row(
                "propagation: registry-agent",
                kind,
                mine,
                "<= raw + 2 ms",
                extra <= 0.002,
                "ms",
                f"median {extra * 1000:+.2f} ms vs raw "
                f"({statistics.median(mine) / statistics.median(raw):.2f}x)",
            )
        )
    return rows
