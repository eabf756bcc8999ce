"""Watch scale: one big service, one change -> event in user code, beside the floors.

Every watcher runs in a process of its own and writes a line to its stdout per
event; this process makes the change and timestamps the line (or, for
``consul watch``, the end of the JSON document) as it arrives, so registry-agent
and its floors pay the same pipe, and their CPU and peak RSS (VmHWM) are theirs
alone. Watchers are measured one after the other, each alone on the server.

- etcd, 5,000 and 50,000 keys: one instance turns critical -> ``offline``;
  floors: the raw aetcd client watching the same prefix, and ``etcdctl watch``.
- Consul, 5,000 instances: one instance turns critical -> ``offline`` (status),
  one instance registered -> ``added`` (membership); peak RSS of the watcher;
  floor: Go ``consul watch -type=service``.

``python -m bench.watch_scale [--quick] [--runs N]``: N whole runs, each
figure as the median of the run medians and the worst of all samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd

from bench.common import HERE, Row, log, now, server, table
from registry_agent import (
    AsyncWatcher,
    HealthStatus,
    ServiceInstance,
    WatchEvent,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer, find_binary

SERVICE = "bench-scale"
PREFIX = f"/services/{SERVICE}/".encode()  # the etcd backend's default prefix
# A change that no observer reports within this is a failed run, not a slow sample.
EVENT_TIMEOUT = 30.0
# Matches any line of output (consul watch: one line per change).
ANY_LINE = b"*"
# etcd's default --max-txn-ops: keys written per transaction when filling.
TXN_OPS = 128


def instance(n: int) -> ServiceInstance:
    return ServiceInstance(
        SERVICE, address="127.0.0.1", port=1000 + n % 60000, id=f"i{n}", meta={"zone": f"z{n % 3}"}
    )


def etcd_value(n: int, status: HealthStatus) -> bytes:
    """The value the etcd backend writes for instance ``n`` (see its ``_value``)."""
    return json.dumps({**instance(n).to_dict(), "status": str(status)}).encode()


# -- the watcher processes -----------------------------------------------------------


async def _child_ours(url: str) -> None:
    def listener(event: WatchEvent) -> None:
        sys.stdout.write(f"{event.type} {event.instance.id}\n")
        sys.stdout.flush()

    started = time.perf_counter()
    # No listener while it lists: the first snapshot's "added" lines are not wanted here.
    async with AsyncWatcher(url, SERVICE) as watcher:
        await watcher.wait_synced(300)
        print(f"ready {time.perf_counter() - started:.3f} {len(watcher.snapshot())}", flush=True)
        watcher.listener = listener
        await asyncio.Event().wait()


async def _child_raw_etcd(host: str, port: str) -> None:
    client = aetcd.Client(host=host, port=int(port))
    watch = await client.watch_prefix(PREFIX)
    print("ready", flush=True)
    async for event in watch:
        # What user code of the raw client does at least: read the changed value.
        status = json.loads(event.kv.value).get("status") if event.kv.value else None
        sys.stdout.write(f"{event.kind} {event.kv.key.decode()} {status}\n")
        sys.stdout.flush()


def child(argv: Sequence[str]) -> None:
    """``child ours URL`` or ``child raw-etcd HOST PORT``: one watcher, one line per event."""
    logging.basicConfig(level=logging.ERROR)
    if argv[0] == "ours":
        asyncio.run(_child_ours(argv[1]))
    else:
        asyncio.run(_child_raw_etcd(argv[1], argv[2]))


@dataclass
class Observer:
    """A watcher process whose output this process timestamps as it arrives."""

    name: str
    command: list[str]
    proc: asyncio.subprocess.Process | None = None
    buffer: bytes = b""
    last_line: str = ""
    ready_line: str = ""
    peak_rss_mb: float = 0.0
    samples: list[float] = field(default_factory=list)

    async def start(self, ready: bool) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=HERE.parent,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 24,
        )
        if ready:  # a Python watcher says when it has listed
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), 600)
            if not line.startswith(b"ready"):
                raise RuntimeError(f"{self.name} did not start: {line!r}")
            self.ready_line = line.decode().strip()

    async def arrival(self, match: bytes, timeout: float = EVENT_TIMEOUT) -> float:
        """When the output reporting ``match`` (a line, or the end of a document) arrived."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._take(match):
                        return now()
                    chunk = await self.proc.stdout.read(1 << 20)
                    if not chunk:
                        raise RuntimeError(
                            f"{self.name} ended: {await self.proc.wait()} {self.buffer[-200:]!r}"
                        )
                    self.buffer += chunk
        except TimeoutError:
            raise RuntimeError(
                f"{self.name}: no {match!r} within {timeout}s; output {self.buffer[-300:]!r}"
            ) from None

    async def warm_up(self, change: Callable[[], Awaitable[bytes]]) -> None:
        """Make changes until the watcher reports one (a Go CLI does not say when it watches)."""
        for _ in range(60):
            match = await change()
            with contextlib.suppress(RuntimeError):
                await self.arrival(match, timeout=0.5)
                await self.drain(0.5)
                return
        raise RuntimeError(f"{self.name} reported no change in 30 s")

    def _take(self, match: bytes) -> bool:
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line == match or (match == ANY_LINE and line):
                self.last_line = line.decode(errors="replace")
                return True
        return False

    async def drain(self, quiet: float = 0.5) -> None:
        """Skip output until none came for ``quiet`` seconds."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        self.buffer = b""
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(quiet):
                    if not await self.proc.stdout.read(1 << 20):
                        return

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.peak_rss_mb = max(self.peak_rss_mb, _peak_rss_mb(self.proc.pid))
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


def _peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set (VmHWM), in MiB; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024
    return 0.0


def _python_child(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.watch_scale", "child", *args]


# -- etcd ----------------------------------------------------------------------------


async def _fill_etcd(client: aetcd.Client, count: int) -> None:
    ops = client.transactions
    for first in range(0, count, TXN_OPS):
        puts = [
            ops.put(PREFIX + f"i{n}".encode(), etcd_value(n, HealthStatus.PASSING))
            for n in range(first, min(count, first + TXN_OPS))
        ]
        await client.transaction(compare=[], success=puts, failure=[])


def _etcd_match(name: str, k: int, status: HealthStatus) -> bytes:
    """The line that reports instance ``k`` turning ``status`` in ``name``'s output."""
    key = PREFIX + f"i{k}".encode()
    if name == "registry-agent":
        return f"{'online' if status is HealthStatus.PASSING else 'offline'} i{k}".encode()
    if name == "raw aetcd":
        return b"PUT " + key + b" " + str(status).encode()
    return key  # etcdctl: PUT, the key, the value on lines of their own


async def measure_etcd(srv: EtcdServer, count: int, trials: int) -> list[Observer]:
    host, port = srv.url.removeprefix("etcd://").split(":")
    writer = aetcd.Client(host=host, port=int(port))
    await _fill_etcd(writer, count)
    etcdctl = find_binary("etcdctl")
    observers = [
        Observer("registry-agent", _python_child("ours", srv.url)),
        Observer("raw aetcd", _python_child("raw-etcd", host, port)),
        Observer(
            "etcdctl watch",
            [etcdctl, f"--endpoints={host}:{port}", "watch", "--prefix", PREFIX.decode()],
        ),
    ]
    try:
        for observer in observers:
            await observer.start(ready=observer.name != "etcdctl watch")
            flips = 0

            async def flip(observer: Observer = observer) -> bytes:
                # Warm-up changes, not measured: instance 0 critical, passing, ...
                nonlocal flips
                flips += 1
                status = HealthStatus.CRITICAL if flips % 2 else HealthStatus.PASSING
                await writer.put(PREFIX + b"i0", etcd_value(0, status))
                return _etcd_match(observer.name, 0, status)

            await observer.warm_up(flip)
            await writer.put(PREFIX + b"i0", etcd_value(0, HealthStatus.PASSING))
            await observer.drain(0.3)
            for n in range(trials):
                k = 1 + (n * 7919) % (count - 1)
                key = PREFIX + f"i{k}".encode()
                match = _etcd_match(observer.name, k, HealthStatus.CRITICAL)
                started = now()
                await writer.put(key, etcd_value(k, HealthStatus.CRITICAL))
                observer.samples.append(await observer.arrival(match) - started)
                await writer.put(key, etcd_value(k, HealthStatus.PASSING))
                await observer.drain(0.2)
            await observer.stop()
    finally:
        for observer in observers:
            await observer.stop()
        await writer.close()
    return observers


# -- Consul ---------------------------------------------------------------------------


async def measure_consul(
    srv: ConsulServer, count: int, trials: int
) -> tuple[list[Observer], list[Observer]]:
    writer = open_backend(srv.url, timeout=30)
    sem = asyncio.Semaphore(64)

    async def register(n: int) -> Any:
        async with sem:
            return await writer.register(instance(n), ttl=600)

    leases = await asyncio.gather(*(register(n) for n in range(count)))
    await asyncio.sleep(1.0)
    consul = find_binary("consul")
    address = srv.http.removeprefix("http://")

    def observers() -> list[Observer]:
        return [
            Observer("registry-agent", _python_child("ours", srv.url)),
            Observer(
                "consul watch",
                # Without a handler it prints once and exits; `wc -c` reads each
                # change's JSON to the end and prints its size: one line per change.
                [
                    *(consul, "watch", f"-http-addr={address}", "-type=service"),
                    *(f"-service={SERVICE}", "wc -c"),
                ],
            ),
        ]

    status, membership = observers(), observers()
    try:
        for observer in status:
            await observer.start(ready=observer.name == "registry-agent")
            if observer.name == "consul watch":
                await observer.arrival(ANY_LINE)  # it prints the service once at start
            for n in range(-1, trials):
                lease = leases[(n * 37) % count]
                match = (
                    ANY_LINE
                    if observer.name == "consul watch"
                    else b"offline " + lease.instance.id.encode()
                )
                started = now()
                await writer.set_status(lease, HealthStatus.CRITICAL)
                arrived = await observer.arrival(match)
                if n >= 0:
                    observer.samples.append(arrived - started)
                await writer.set_status(lease, HealthStatus.PASSING)
                await observer.drain(1.0)
            await observer.stop()
        for observer in membership:
            await observer.start(ready=observer.name == "registry-agent")
            if observer.name == "consul watch":
                await observer.arrival(ANY_LINE)
            for n in range(-1, trials):
                extra = instance(count + 1 + n)
                match = (
                    ANY_LINE if observer.name == "consul watch" else b"added " + extra.id.encode()
                )
                started = now()
                lease = await writer.register(extra, ttl=600)
                arrived = await observer.arrival(match)
                if n >= 0:
                    observer.samples.append(arrived - started)
                await writer.deregister(lease)
                await observer.drain(1.0)
            await observer.stop()
    finally:
        for observer in status + membership:
            await observer.stop()
        await writer.close()
    return status, membership


# -- figures -------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ms"


def _event_rows(
    figure: str, kind: str, observers: list[Observer], goal: str, ok: Callable[[float], bool]
) -> list[Row]:
    ours, *floors = observers
    note = ", ".join(f"{f.name} {_ms(f.samples)}" for f in floors)
    rows = [Row(f"{figure}: {f.name}", kind, f.samples, "floor", True, "ms") for f in floors]
    worst = max(ours.samples)
    rows.append(Row(f"{figure}: registry-agent", kind, ours.samples, goal, ok(worst), "ms", note))
    return rows


def run(
    quick: bool = False, backends: Sequence[str] = ("etcd", "consul")
) -> tuple[list[Row], list[list[str]]]:
    small, big = (1000, 10_000) if quick else (5000, 50_000)
    trials = 5 if quick else 10
    rows: list[Row] = []
    details: list[list[str]] = []
    for count in (small, big) if "etcd" in backends else ():
        with server("etcd") as srv:
            log(f"watch scale on etcd: {count} keys, {trials} trials per watcher")
            started = time.monotonic()
            assert isinstance(srv, EtcdServer)
            observers = asyncio.run(measure_etcd(srv, count, trials))
            log(f"  ({time.monotonic() - started:.0f}s)")
            ours, raw, ctl = observers
            extra = statistics.median(ours.samples) - statistics.median(raw.samples)
            if count == small:
                goal, ok = "<= raw + 2 ms", extra <= 0.002
            else:
                goal, ok = "< 20 ms", max(ours.samples) < 0.020
            rows += _event_rows(
                f"watch scale: {count} keys, status change -> event",
                "etcd",
                observers,
                goal,
                lambda _, ok=ok: ok,
            )
            details.append(_detail("etcd", count, ours, [raw, ctl]))
    if "consul" not in backends:
        return rows, details
    with server("consul") as srv:
        log(f"watch scale on consul: {small} instances, {trials} trials per watcher")
        started = time.monotonic()
        assert isinstance(srv, ConsulServer)
        status, membership = asyncio.run(measure_consul(srv, small, trials))
        log(f"  ({time.monotonic() - started:.0f}s)")
    rows += _event_rows(
        f"watch scale: {small} instances, status change -> event",
        "consul",
        status,
        "< 100 ms",
        lambda worst: worst < 0.100,
    )
    rows += _event_rows(
        f"watch scale: {small} instances, membership change -> event",
        "consul",
        membership,
        "< 250 ms",
        lambda worst: worst < 0.250,
    )
    ours, go = status
    rss = max(ours.peak_rss_mb, membership[0].peak_rss_mb)
    go_rss = max(go.peak_rss_mb, membership[1].peak_rss_mb)
    rows.append(
        Row(
            f"watch scale: {small} instances, watcher peak RSS",
            "consul",
            [rss],
            "< 60 MB",
            rss < 60,
            "MB",
            f"consul watch {go_rss:.0f} MB",
        )
    )
    details.append(_detail("consul", small, ours, [go]))
    return rows, details


def _detail(kind: str, count: int, ours: Observer, floors: list[Observer]) -> list[str]:
    # "ready <seconds> <instances>" from our watcher process.
    listed = ours.ready_line.split()[1] if ours.ready_line else "-"
    memory = f"{ours.peak_rss_mb:.0f} MB peak RSS; " + ", ".join(
        f"{f.name} {f.peak_rss_mb:.0f} MB" for f in floors
    )
    return [kind, str(count), f"{listed} s", memory]


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["child"]:
        child(argv[1:])
        return 0
    quick = "--quick" in argv
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 1
    backends = [argv[argv.index("--only") + 1]] if "--only" in argv else ["etcd", "consul"]
    logging.basicConfig(level=logging.ERROR)
    results: dict[tuple[str, str], list[Row]] = {}
    all_details = []
    for n in range(runs):
        log(f"run {n + 1} of {runs}")
        rows, details = run(quick, backends)
        print(f"\n### Run {n + 1}\n")
        print(table([r.cells() for r in rows]))
        print()
        print(table(details, ["backend", "instances", "initial snapshot", "watcher memory"]))
        sys.stdout.flush()
        all_details += details
        for row in rows:
            results.setdefault((row.figure, row.backend), []).append(row)
    if runs > 1:
        print(f"\n### {runs} runs: median of the run medians / worst sample\n")
        lines = []
        for (figure, backend), per_run in results.items():
            unit = per_run[0].unit
            scale = 1000.0 if unit == "ms" else 1.0
            medians = [statistics.median(r.samples) * scale for r in per_run]
            worst = max(max(r.samples) for r in per_run) * scale
            met = sum(r.ok for r in per_run)
            lines.append(
                [
                    figure,
                    backend,
                    f"{statistics.median(medians):.2f} {unit}",
                    f"{worst:.2f} {unit}",
                    " / ".join(f"{m:.2f}" for m in medians),
                    per_run[0].goal,
                    f"{met}/{runs}",
                ]
            )
        print(
            table(
                lines,
                ["figure", "backend", "median", "worst", "run medians", "goal", "runs met"],
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
