"""Detection, crash and heal: how fast the registry reflects what happened.

- detection: the health endpoint starts failing -> ``deleted`` at a watcher
  (interval 1 s, fall 2); and back (rise 2).
- crash: kill -9 of a registered process -> gone from discovery (TTL 3 s, 10 s).
- heal: the registry restarted empty -> our entry passing again, from the
  moment the server accepts connections (default TTL 10 s, and TTL 3 s).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, log, now, server, start_service_process, stop_process
from registry_agent import (
    AsyncRegistrar,
    Backend,
    EventType,
    HealthStatus,
    HttpCheck,
    ServiceInstance,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


class Events:
    """Arrival times of watcher events, by type."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, WatchEvent]] = []

    def __call__(self, event: WatchEvent) -> None:
        self.seen.append((now(), event))

    async def wait(
        self, kinds: set[EventType], after: float, within: float, port: int = 0
    ) -> float:
        deadline = now() + within
        while now() < deadline:
            for at, event in self.seen:
                if (
                    at >= after
                    and event.type in kinds
                    and (not port or event.instance.port == port)
                ):
                    return at
            await asyncio.sleep(0.002)
        raise RuntimeError(f"no {kinds} event within {within}s")


async def detection(url: str, trials: int) -> tuple[list[float], list[float]]:
    interval, fall, rise = 1.0, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        flag = Path(tmp) / "healthy"
        flag.touch()
        port = free_port()
        sample = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, str(ROOT / "scripts" / "sample_service.py"), str(port), str(flag)]
        )
        from registry_agent import AsyncWatcher

        events = Events()
        watcher = AsyncWatcher(url, "bench-detect", listener=events)
        await watcher.start()
        registrar = AsyncRegistrar(
            url,
            ServiceInstance("bench-detect", address="127.0.0.1", port=port),
            checks=[HttpCheck(f"http://127.0.0.1:{port}/healthz", interval=interval, timeout=0.5)],
            fall=fall,
            rise=rise,
        )
        down, up = [], []
        try:
            await registrar.start(wait_registered=10)
            for _ in range(trials):
                await asyncio.sleep(random.uniform(0, interval))  # any phase of the check cycle
                flag.unlink()
                t0 = now()
                down.append(await events.wait({EventType.DELETED}, t0, 10) - t0)
                await asyncio.sleep(random.uniform(0, interval))
                flag.touch()
                t0 = now()
                up.append(await events.wait({EventType.ADDED}, t0, 10) - t0)
        finally:
            await registrar.stop()
            await watcher.close()
            sample.kill()
            sample.wait()
    return down, up


async def crash(srv: ServerProcess, ttl: float, trials: int) -> list[float]:
    from registry_agent import AsyncWatcher

    events = Events()
    watcher = AsyncWatcher(srv.url, "bench-crash", listener=events)
    await watcher.start()
    samples = []
    gone = {EventType.OFFLINE, EventType.DELETED}
    try:
        for _ in range(trials):
            port = free_port()
            proc = await asyncio.to_thread(start_service_process, srv.url, port, ttl)
            await events.wait({EventType.ADDED}, 0, 10, port)
            await asyncio.sleep(random.uniform(0, ttl / 3))  # any phase of the heartbeat cycle
            proc.kill()
            t0 = now()
            samples.append(await events.wait(gone, t0, ttl + 10, port) - t0)
            await asyncio.to_thread(stop_process, proc)
    finally:
        await watcher.close()
    return samples


async def passing(observer: Backend, instance: ServiceInstance) -> bool:
    try:
        health = (await observer.list(instance.service)).instances.get(instance.id)
    except Exception:
        return False
    return health is not None and health.status is HealthStatus.PASSING


async def heal(srv: ServerProcess, ttl: float, trials: int) -> list[float]:
    instance = ServiceInstance("bench-heal", address="127.0.0.1", port=8000)
    registrar = AsyncRegistrar(srv.url, instance, ttl=ttl)
    observer = open_backend(srv.url, timeout=1)
    samples = []
    try:
        await registrar.start(wait_registered=10)
        for _ in range(trials):
            await asyncio.sleep(random.uniform(0, ttl / 3))  # any phase of the heartbeat cycle
            await asyncio.to_thread(srv.restart, wipe=True)
            t0 = now()  # the server accepts connections again
            while not await passing(observer, instance):
                if now() - t0 > ttl + 15:
                    raise RuntimeError("not re-registered")
                await asyncio.sleep(0.005)
            samples.append(now() - t0)
    finally:
        await registrar.stop()
        await observer.close()
    return samples


def run(quick: bool = False) -> list[Row]:
    rows = []
    n = 3 if quick else 6
    for kind in ("consul", "etcd"):
        with server(kind) as srv:
            log(f"detection on {kind}: {n} trials (interval 1s, fall 2, rise 2)")
            down, up = asyncio.run(detection(srv.url, n))
            rows.append(
                Row(
                    "detection: health fails -> deleted",
                    kind,
                    down,
                    "<= 2.5 s (1s x 2 + 0.5)",
                    max(down) <= 2.5,
                )
            )
            rows.append(
                Row(
                    "detection: health back -> added",
                    kind,
                    up,
                    "<= 2.5 s (1s x 2 + 0.5)",
                    max(up) <= 2.5,
                )
            )
            for ttl, trials in ((3.0, 3 if quick else 6), (10.0, 1 if quick else 3)):
                log(f"crash on {kind}: TTL {ttl:g}s, {trials} kill -9")
                samples = asyncio.run(crash(srv, ttl, trials))
                rows.append(
                    Row(
                        f"crash: kill -9 -> gone (TTL {ttl:g}s)",
                        kind,
                        samples,
                        f"<= {ttl + 1:g} s",
                        max(samples) <= ttl + 1,
                    )
                )
            for ttl, trials in ((10.0, 3 if quick else 8), (3.0, 3 if quick else 8)):
                log(f"heal on {kind}: TTL {ttl:g}s, {trials} restarts with data loss")
                samples = asyncio.run(heal(srv, ttl, trials))
                rows.append(
                    Row(
                        f"heal: restarted empty -> back (TTL {ttl:g}s)",
                        kind,
                        samples,
                        "<= 2 s",
                        max(samples) <= 2.0,
                    )
                )
    return rows


if __name__ == "__main__":
    from bench.common import table

    print(table([r.cells() for r in run(quick="--quick" in sys.argv)]))
    time.sleep(0)
