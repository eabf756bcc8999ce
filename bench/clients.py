"""Discovery-fed clients (issue 16) on real Consul and etcd, with real HTTP and grpcio servers.

1. Per-call overhead, p50/p99 over N calls on loopback: a plain client to ``ip:port`` vs
   the same client through discovery (httpx sync and async transports, the requests
   adapter, ``registry_agent.grpc`` sync and aio channels).
2. Kill 1 of 3 under load: calls at a steady rate while one of three instances
   (registered with a TCP check every 0.5 s, fall 1) is SIGKILLed, then started again.
3. Outlier ejection: an instance answering 503 / UNAVAILABLE: calls until ejected, how
   long each ejection lasted vs the configured ``base_time`` (k-th ejection: k x base),
   and recovery once it answers again.
4. Last known good: a new discovery while the registry is stopped (time to the first,
   stale, answer) and after it starts again (time to fresh).
5. ``OutlierTracker`` memory per 10,000 endpoints; ``choose()`` / ``report()`` cost per
   call with a policy (filters + prefer + outliers) vs none, over 100 instances
   (memory backend: the pure cost).

``python -m bench.clients [--quick]`` (servers on 127.0.0.1 only; every loop bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import requests

from bench.common import BACKENDS, log, percentile, server, table
from integration.grpc_channel_kit import restart, started_servers
from integration.grpc_kit import GrpcServer, unary
from registry_agent import (
    AsyncDiscovery,
    AsyncDiscoveryTransport,
    Discovery,
    DiscoveryPolicy,
    DiscoveryTransport,
    OutlierEjection,
    Registrar,
    RetryPolicy,
    ServiceInstance,
    TcpCheck,
    open_backend,
)
from registry_agent._outliers import OutlierTracker
from registry_agent.grpc import DiscoveryChannel
from registry_agent.grpc import aio as grpc_aio
from registry_agent.requests import DiscoveryAdapter
from registry_agent.testing.servers import ServerProcess, free_port

CHECK_INTERVAL = 0.5  # TCP check of every registered instance; fall 1, rise 1
RATE = 0.01  # seconds between calls of a load loop (100 calls/s)
PHASE_BOUND = 15.0  # any wait inside a scenario
BASE_TIME = 1.0  # outlier ejection's base_time in scenario 3
WARMUP = 50


def _us(seconds: float) -> str:
    micro = seconds * 1e6
    return f"{micro:.1f} µs" if micro < 10 else f"{micro:.0f} µs"


def _fresh_name(prefix: str = "orders") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _register(stack: ExitStack, url: str, service: str, port: int, checked: bool) -> None:
    instance = ServiceInstance(service, address="127.0.0.1", port=port, id=f"{service}-{port}")
    checks = [TcpCheck("127.0.0.1", port, interval=CHECK_INTERVAL, timeout=CHECK_INTERVAL)]
    registrar = Registrar(
        url, instance, checks=checks if checked else [], fall=1, rise=1, ttl=5
    ).start(wait_registered=20)
    stack.callback(registrar.stop)


def _wait(condition: Callable[[], bool], what: str, bound: float = PHASE_BOUND) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > bound:
            raise RuntimeError(f"{what}: not within {bound:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _port_of(text: str) -> str:
    return text.split(" ", 1)[0]


def _name_of(answer: bytes) -> str:
    return answer.split(b":")[0].decode()


# ---------------------------------------------------------------- the HTTP instances


class _Handler(BaseHTTPRequestHandler):
    """Answers ``"<port> <method>"``; ``/_mode/503`` and ``/_mode/ok`` switch what it answers."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stall between header and body
    mode = "ok"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/_mode/"):
            type(self).mode = self.path.removeprefix("/_mode/")
            status = 200
        else:
            status = 503 if type(self).mode == "503" else 200
        body = f"{self.server.server_port} {self.command}".encode()  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a TCP check's reset: normal
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _serve(port: int) -> None:
    httpd = _Server(("127.0.0.1", port), _Handler)
    print("ready", flush=True)
    httpd.serve_forever()


class HttpInstance:
    """One HTTP instance in a process of its own on 127.0.0.1 (killed by its PID)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> HttpInstance:
        """Start (again, on the same port); returns once it listens."""
        self.kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clients", "--serve", str(self.port)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.kill()
            raise RuntimeError(f"HTTP instance on {self.port} did not start")
        return self

    def mode(self, mode: str) -> None:
        """``503``: every answer a 503; ``ok``: 200 again."""
        url = f"http://127.0.0.1:{self.port}/_mode/{mode}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200

    def kill(self) -> None:
        """SIGKILL (by PID) and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


@contextlib.contextmanager
def services(count: int) -> Iterator[list[HttpInstance]]:
    """``count`` started HTTP instances, killed on the way out."""
    started: list[HttpInstance] = []
    try:
        for _ in range(count):
            started.append(HttpInstance().start())
        yield started
    finally:
        for one in started:
            one.kill()


_LOOP: asyncio.AbstractEventLoop | None = None


T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the one event loop of this process: grpc.aio keeps to the first loop
    it ran on (a second ``asyncio.run`` leaves it calling into a closed loop)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


class Chosen:
    """Counts ``choose()`` on a discovery (patched on the instance) and records choices."""

    def __init__(self, discovery: Any, is_async: bool) -> None:
        self.picks: list[tuple[float, ServiceInstance]] = []
        inner = discovery.choose
        if is_async:

            async def achoose(*args: Any, **kwargs: Any) -> ServiceInstance:
                got: ServiceInstance = await inner(*args, **kwargs)
                self.picks.append((time.monotonic(), got))
                return got

            discovery.choose = achoose
        else:

            def choose(*args: Any, **kwargs: Any) -> ServiceInstance:
                got: ServiceInstance = inner(*args, **kwargs)
                self.picks.append((time.monotonic(), got))
                return got

            discovery.choose = choose

    def last_pick_of(self, port: int, after: float) -> float | None:
        times = [t for t, i in self.picks if i.port == port and t >= after]
        return max(times) if times else None


# ---------------------------------------------------------------- 1. per-call overhead


def _timed(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


async def _atimed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def _overhead_row(client: str, backend: str, plain: list[float], via: list[float]) -> list[str]:
    p50, v50 = statistics.median(plain), statistics.median(via)
    return [
        client,
        backend,
        str(len(via)),
        _us(p50),
        _us(percentile(plain, 99)),
        _us(v50),
        _us(percentile(via, 99)),
        f"{(v50 - p50) * 1e6:+.0f} µs",
    ]


def overhead(kind: str, srv: ServerProcess, n: int) -> list[list[str]]:
    rows = []
    with ExitStack() as stack:
        http = stack.enter_context(services(3))
        svc = _fresh_name()
        for one in http:
            _register(stack, srv.url, svc, one.port, checked=False)
        direct = f"http://127.0.0.1:{http[0].port}/x"
        via = f"http://{svc}/x"

        discovery = stack.enter_context(Discovery(srv.url))
        _wait(lambda: len(discovery.instances(svc)) == 3, "three HTTP instances listed")
        log(f"{kind}: overhead, httpx sync")
        with (
            httpx.Client() as plain,
            httpx.Client(transport=DiscoveryTransport(discovery, services=[svc])) as routed,
        ):
            rows.append(
                _overhead_row(
                    "httpx.Client",
                    kind,
                    _timed(lambda: plain.get(direct).raise_for_status(), n),
                    _timed(lambda: routed.get(via).raise_for_status(), n),
                )
            )
        log(f"{kind}: overhead, requests")
        with requests.Session() as plain_s, requests.Session() as routed_s:
            routed_s.mount("http://", DiscoveryAdapter(discovery, services=[svc]))
            rows.append(
                _overhead_row(
                    "requests.Session",
                    kind,
                    _timed(lambda: plain_s.get(direct).raise_for_status(), n),
                    _timed(lambda: routed_s.get(via).raise_for_status(), n),
                )
            )

        log(f"{kind}: overhead, httpx async")

        async def httpx_async() -> list[str]:
            async with AsyncDiscovery(srv.url) as adisc:
                transport = AsyncDiscoveryTransport(adisc, services=[svc])
                async with (
                    httpx.AsyncClient() as plain,
                    httpx.AsyncClient(transport=transport) as routed,
                ):

                    async def p() -> None:
                        (await plain.get(direct)).raise_for_status()

                    async def r() -> None:
                        (await routed.get(via)).raise_for_status()

                    return _overhead_row(
                        "httpx.AsyncClient", kind, await _atimed(p, n), await _atimed(r, n)
                    )

        rows.append(_run(httpx_async()))

        servers = stack.enter_context(started_servers("a", "b", "c"))
        gsvc = _fresh_name()
        for one_g in servers:
            _register(stack, srv.url, gsvc, one_g.port, checked=False)
        _wait(lambda: len(discovery.instances(gsvc)) == 3, "three gRPC instances listed")
        log(f"{kind}: overhead, grpc sync")
        with (
            grpc.insecure_channel(servers[0].target) as plain_c,
            DiscoveryChannel(discovery, gsvc, idempotent=True) as routed_c,
        ):
            pg, rg = unary(plain_c), unary(routed_c)
            rows.append(
                _overhead_row(
                    "grpc channel",
                    kind,
                    _timed(lambda: pg(b"x", timeout=5), n),
                    _timed(lambda: rg(b"x", timeout=5), n),
                )
            )
        log(f"{kind}: overhead, grpc aio")

        async def grpc_async() -> list[str]:
            async with (
                AsyncDiscovery(srv.url) as adisc,
                grpc.aio.insecure_channel(servers[0].target) as plain_a,
                grpc_aio.DiscoveryChannel(adisc, gsvc, idempotent=True) as routed_a,
            ):
                pa, ra = unary(plain_a), unary(routed_a)

                async def p() -> None:
                    await pa(b"x", timeout=5)

                async def r() -> None:
                    await ra(b"x", timeout=5)

                return _overhead_row(
                    "grpc.aio channel", kind, await _atimed(p, n), await _atimed(r, n)
                )

        rows.append(_run(grpc_async()))
    return rows


# ---------------------------------------------------------------- 2. kill 1 of 3 under load


@dataclass
class Load:
    """What one load loop saw."""

    calls: int = 0
    failed: int = 0
    retried: int = 0  # calls that needed more than one attempt
    errors: list[str] = field(default_factory=list)


async def _load(
    call: Callable[[], Awaitable[str]],
    chosen: Chosen,
    until: Callable[[], Awaitable[bool]],
    load: Load,
    bound: float,
) -> bool:
    """Calls every RATE seconds until ``until()`` (True) or ``bound`` s (False)."""
    started = time.monotonic()
    tick = started
    while time.monotonic() - started < bound:
        before = len(chosen.picks)
        try:
            await call()
        except Exception as exc:  # every failure counts; the first few are kept
            load.failed += 1
            if len(load.errors) < 3:
                load.errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
        load.calls += 1
        if len(chosen.picks) - before > 1:
            load.retried += 1
        if await until():
            return True
        tick += RATE
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    return False


@dataclass
class Fleet:
    """Three instances of one service: how to kill, restart and recognize one."""

    ports: list[int]
    kill: Callable[[int], None]
    restart: Callable[[int], None]


async def _kill_scenario(
    fleet: Fleet,
    call: Callable[[], Awaitable[str]],
    listed: Callable[[], Awaitable[int]],
    chosen: Chosen,
) -> list[str]:
    load = Load()
    served: list[str] = []

    async def tracked() -> str:
        who = await call()
        served.append(who)
        return who

    async def never() -> bool:
        return False

    victim = fleet.ports[1]
    await _load(tracked, chosen, never, load, 1.0)
    fleet.kill(victim)
    killed = time.monotonic()
    left_at = 0.0

    async def gone() -> bool:
        nonlocal left_at
        if not left_at and await listed() == 2:
            left_at = time.monotonic()
        return bool(left_at) and time.monotonic() - left_at > 1.0

    await _load(tracked, chosen, gone, load, PHASE_BOUND)
    last = chosen.last_pick_of(victim, killed)
    await asyncio.to_thread(fleet.restart, victim)
    restarted = time.monotonic()
    mark = len(served)

    async def back() -> bool:
        return str(victim) in served[mark:]

    used = await _load(tracked, chosen, back, load, PHASE_BOUND)
    back_at = time.monotonic()
    await _load(tracked, chosen, never, load, 0.5)
    return [
        str(load.calls),
        f"{load.failed}" + (f" ({load.errors[0]})" if load.errors else ""),
        str(load.retried),
        f"{last - killed:.2f} s" if last is not None else "never chosen",
        f"{left_at - killed:.2f} s" if left_at else f"> {PHASE_BOUND:.0f} s",
        f"{back_at - restarted:.2f} s" if used else f"> {PHASE_BOUND:.0f} s",
    ]


def _restart_http(service: HttpInstance) -> None:
    service.start()  # the same port again


def _http_fleet(stack: ExitStack, url: str) -> tuple[str, list[HttpInstance], Fleet]:
    http = stack.enter_context(services(3))
    svc = _fresh_name()
    for one in http:
        _register(stack, url, svc, one.port, checked=True)
    by_port = {one.port: one for one in http}
    fleet = Fleet(
        [one.port for one in http],
        kill=lambda port: by_port[port].kill(),
        restart=lambda port: _restart_http(by_port[port]),
    )
    return svc, http, fleet


def _grpc_fleet(stack: ExitStack, url: str) -> tuple[str, list[GrpcServer], Fleet]:
    servers = stack.enter_context(started_servers("a", "b", "c"))
    svc = _fresh_name()
    for one in servers:
        _register(stack, url, svc, one.port, checked=True)
    by_port = {one.port: one for one in servers}
    fleet = Fleet(
        [one.port for one in servers],
        kill=lambda port: by_port[port].kill(),
        restart=lambda port: restart(by_port[port]),
    )
    return svc, servers, fleet


def kill_one(kind: str, srv: ServerProcess) -> list[list[str]]:
    rows = []
    for client in ("httpx transport", "requests adapter", "grpc sync", "grpc aio"):
        log(f"{kind}: kill 1 of 3, {client}")
        rows.append(_kill_client(client, kind, srv))
    return rows


def _kill_client(client: str, kind: str, srv: ServerProcess) -> list[str]:
    with ExitStack() as stack:
        if client.startswith("grpc"):
            svc, gservers, fleet = _grpc_fleet(stack, srv.url)
            names = {s.name: str(s.port) for s in gservers}
        else:
            svc, _, fleet = _http_fleet(stack, srv.url)
        url = f"http://{svc}/x"
        if client == "grpc aio":

            async def aio_run() -> list[str]:
                async with AsyncDiscovery(srv.url) as adisc:
                    chosen = Chosen(adisc, is_async=True)
                    async with grpc_aio.DiscoveryChannel(adisc, svc, idempotent=True) as ch:
                        get = unary(ch)

                        async def call() -> str:
                            return names[_name_of(await get(b"x", timeout=5))]

                        async def listed() -> int:
                            return len(await adisc.instances(svc))

                        for _ in range(int(PHASE_BOUND / 0.05)):
                            if await listed() == 3:
                                break
                            await asyncio.sleep(0.05)
                        return await _kill_scenario(fleet, call, listed, chosen)

            return [client, kind, *_run(aio_run())]
        discovery = stack.enter_context(Discovery(srv.url))
        chosen = Chosen(discovery, is_async=False)
        _wait(lambda: len(discovery.instances(svc)) == 3, "three listed")
        sync_call: Callable[[], str]
        if client == "httpx transport":
            hc = stack.enter_context(
                httpx.Client(transport=DiscoveryTransport(discovery, services=[svc]), timeout=5)
            )

            def sync_call(hc: httpx.Client = hc) -> str:
                r = hc.get(url)
                r.raise_for_status()
                return _port_of(r.text)

        elif client == "requests adapter":
            session = stack.enter_context(requests.Session())
            session.mount("http://", DiscoveryAdapter(discovery, services=[svc]))

            def sync_call(session: requests.Session = session) -> str:
                r = session.get(url, timeout=5)
                r.raise_for_status()
                return _port_of(r.text)

        else:
            channel = stack.enter_context(DiscoveryChannel(discovery, svc, idempotent=True))
            get = unary(channel)

            def sync_call(get: Any = get) -> str:
                return names[_name_of(get(b"x", timeout=5))]

        async def call(fn: Callable[[], str] = sync_call) -> str:
            return fn()

        async def listed(d: Discovery = discovery, s: str = svc) -> int:
            return len(d.instances(s))

        return [client, kind, *_run(_kill_scenario(fleet, call, listed, chosen))]


# ---------------------------------------------------------------- 3. outlier ejection


def _ejection_scenario(
    discovery: Discovery,
    svc: str,
    call: Callable[[], str],
    bad: str,
    break_it: Callable[[], None],
    fix_it: Callable[[], None],
) -> list[str]:
    failed = 0
    _wait(lambda: len(discovery.instances(svc)) == 3, "three listed")
    for _ in range(30):
        call()
    break_it()
    broke = time.monotonic()
    calls = 0
    # (start, end) of each ejection seen; the second one ends after the fix.
    spans: list[list[float]] = []
    calls_to_eject: int | None = None
    fixed_at = recovered_at = 0.0
    started = time.monotonic()
    while time.monotonic() - started < 4 * PHASE_BOUND:
        try:
            who = call()
        except Exception:
            failed += 1
            who = ""
        calls += 1
        now = time.monotonic()
        out = bool(discovery.ejected(svc))
        if out and (not spans or spans[-1][1]):
            spans.append([now, 0.0])
            if calls_to_eject is None:
                calls_to_eject = calls
        elif not out and spans and not spans[-1][1]:
            spans[-1][1] = now
        if len(spans) == 2 and not fixed_at:
            fix_it()
            fixed_at = time.monotonic()
        if fixed_at and who == bad and not recovered_at:
            recovered_at = now
        if recovered_at and len(spans) == 2 and spans[1][1]:
            break
        time.sleep(RATE)
    first = spans[0][1] - spans[0][0] if spans and spans[0][1] else None
    second = spans[1][1] - spans[1][0] if len(spans) > 1 and spans[1][1] else None
    return [
        str(calls_to_eject) if calls_to_eject is not None else "never",
        f"{spans[0][0] - broke:.2f} s" if spans else "-",
        f"{first:.2f} s (base {BASE_TIME:.1f})" if first is not None else "-",
        f"{second:.2f} s (2 x base {2 * BASE_TIME:.1f})" if second is not None else "-",
        f"{recovered_at - fixed_at:.2f} s" if recovered_at else "not seen",
        str(failed),
    ]


def ejection(kind: str, srv: ServerProcess) -> list[list[str]]:
    policy = DiscoveryPolicy(
        outliers=OutlierEjection(consecutive_failures=3, base_time=BASE_TIME),
        retries=2,
        retry_statuses=(503,),
    )
    rows = []
    log(f"{kind}: outlier ejection, HTTP 503")
    with ExitStack() as stack:
        svc, http, _ = _http_fleet(stack, srv.url)
        discovery = stack.enter_context(Discovery(srv.url, policy=policy))
        hc = stack.enter_context(
            httpx.Client(transport=DiscoveryTransport(discovery, services=[svc]), timeout=5)
        )

        def http_call() -> str:
            r = hc.get(f"http://{svc}/x")
            r.raise_for_status()
            return _port_of(r.text)

        rows.append(
            [
                "httpx, 503",
                kind,
                *_ejection_scenario(
                    discovery,
                    svc,
                    http_call,
                    str(http[0].port),
                    lambda: http[0].mode("503"),
                    lambda: http[0].mode("ok"),
                ),
            ]
        )
    log(f"{kind}: outlier ejection, gRPC UNAVAILABLE")
    with ExitStack() as stack:
        svc, servers, _ = _grpc_fleet(stack, srv.url)
        discovery = stack.enter_context(Discovery(srv.url, policy=policy))
        get = unary(stack.enter_context(DiscoveryChannel(discovery, svc, idempotent=True)))
        rows.append(
            [
                "grpc, UNAVAILABLE",
                kind,
                *_ejection_scenario(
                    discovery,
                    svc,
                    lambda: _name_of(get(b"x", timeout=5)),
                    servers[0].name,
                    lambda: servers[0].fail_next("UNAVAILABLE", 1_000_000),
                    lambda: servers[0].fail_next("UNAVAILABLE", 0),
                ),
            ]
        )
    return rows


# ---------------------------------------------------------------- 4. last known good


def last_known_good(kind: str, srv: ServerProcess) -> list[str]:
    log(f"{kind}: last known good")
    svc = _fresh_name()
    retry = RetryPolicy(initial=0.05, cap=0.5)

    async def register() -> None:
        writer = open_backend(srv.url, timeout=2)
        try:
            for port in (9101, 9102):
                await writer.register(ServiceInstance(svc, address="127.0.0.1", port=port), ttl=300)
        finally:
            await writer.close()

    _run(register())
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "lkg"
        with Discovery(srv.url, last_known_good=directory, retry=retry) as live:
            _wait(lambda: len(live.instances(svc)) == 2, "two instances listed")
        srv.stop()
        try:
            started = time.monotonic()
            with Discovery(
                srv.url, last_known_good=directory, retry=retry, sync_timeout=10
            ) as cold:
                served = cold.instances(svc)
                first = time.monotonic() - started
                stale = cold.stale(svc)
                before = time.monotonic()
                srv.start()
                start_took = time.monotonic() - before
                fresh_in = _wait(lambda: not cold.stale(svc), "fresh again")
                fresh = cold.instances(svc)
        finally:
            srv.start()  # a no-op when running
    return [
        kind,
        f"{first * 1000:.0f} ms",
        f"{len(served)} instances, stale={stale}",
        f"{start_took:.2f} s",
        f"{fresh_in:.2f} s",
        f"{len(fresh)} instances"
        + (" (Consul -dev keeps no data over a restart)" if kind == "consul" else ""),
    ]


# ---------------------------------------------------------------- 5. pure cost


def tracker_memory() -> list[str]:
    n = 10_000
    rule = OutlierEjection()
    instances = [
        (f"svc{i % 100}", ServiceInstance(f"svc{i % 100}", address="10.1.0.1", port=1024 + i))
        for i in range(n)
    ]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracker = OutlierTracker()
    for service, instance in instances:
        tracker.report(service, instance, False, rule)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert tracker.size == n
    return [
        f"OutlierTracker, {n} endpoints (100 services)",
        f"{held / 1024 / 1024:.2f} MiB",
        f"{held / n:.0f} B per endpoint",
    ]


def choose_cost(n: int) -> list[list[str]]:
    url = f"memory://bench-clients-{uuid.uuid4().hex[:6]}"
    svc = "orders"
    zones = ("eu-1a", "eu-1b")

    async def run() -> list[list[str]]:
        writer = open_backend(url)
        for i in range(100):
            await writer.register(
                ServiceInstance(
                    svc,
                    address="10.2.0.1",
                    port=2000 + i,
                    tags=("v2",) if i % 2 else ("v1",),
                    meta={"version": "v2" if i % 2 else "v1", "zone": zones[i % 4 // 2]},
                ),
                ttl=600,
            )
        policy = DiscoveryPolicy(
            tags=("v2",),
            meta={"version": "v2"},
            prefer={"zone": "eu-1a", "datacenter": "dc1"},
            outliers=OutlierEjection(),
        )
        rows = []
        for label, pol in (("no policy", None), ("filters + prefer + outliers", policy)):
            async with AsyncDiscovery(url, policy=pol) as d:
                chosen = await d.choose(svc)
                samples = await _atimed(lambda: d.choose(svc), n)
                report: list[float] = []
                for i in range(n):
                    started = time.perf_counter()
                    d.report(svc, chosen, i % 7 != 0)
                    report.append(time.perf_counter() - started)
                rows.append(
                    [
                        f"AsyncDiscovery.choose(), {label}",
                        _us(statistics.median(samples)),
                        _us(percentile(samples, 99)),
                    ]
                )
                rows.append(
                    [
                        f"report(), {label}",
                        _us(statistics.median(report)),
                        _us(percentile(report, 99)),
                    ]
                )
        await writer.close()
        for label, pol in (("no policy", None), ("filters + prefer + outliers", policy)):
            with Discovery(url, policy=pol) as sd:
                samples = _timed(lambda: sd.choose(svc), n)
                rows.append(
                    [
                        f"Discovery.choose() (blocking, picked in the caller), {label}",
                        _us(statistics.median(samples)),
                        _us(percentile(samples, 99)),
                    ]
                )
        return rows

    return _run(run())


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Kills are the point here: the registrars' and transports' warnings would drown the tables.
    logging.basicConfig(level=logging.ERROR)
    yield


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        _serve(int(argv[1]))
        return 0
    quick = "--quick" in argv
    n = 300 if quick else 2000
    started = time.monotonic()
    with _quiet():
        over: list[list[str]] = []
        kills: list[list[str]] = []
        ejections: list[list[str]] = []
        lkg: list[list[str]] = []
        for kind in BACKENDS:
            with server(kind) as srv:
                over += overhead(kind, srv, n)
                kills += kill_one(kind, srv)
                ejections += ejection(kind, srv)
                lkg.append(last_known_good(kind, srv))
        log("pure cost: tracker memory, choose()/report()")
        cost = [tracker_memory()]
        choose_rows = choose_cost(n)
    print(f"## Clients through discovery ({'quick' if quick else 'full'} run)\n")
    print(
        f"### Per-call overhead on loopback, {n} calls after {WARMUP} warm-up "
        "(3 instances registered; plain client to one of them)\n"
    )
    header = ["client", "backend", "n", "plain p50", "plain p99", "discovery p50"]
    print(table(over, [*header, "discovery p99", "added p50"]))
    print(
        f"\n### Kill 1 of 3 under load: a call every {RATE * 1000:.0f} ms, TCP check "
        f"every {CHECK_INTERVAL} s (fall 1), SIGKILL then start again on the same port\n"
    )
    print(
        table(
            kills,
            [
                "client",
                "backend",
                "calls",
                "failed (goal 0)",
                "retried",
                "dead last chosen after kill",
                "left registry after",
                "restarted used after",
            ],
        )
    )
    print(
        f"\n### Outlier ejection: consecutive_failures 3, base_time {BASE_TIME:.0f} s, "
        "retries 2 (503 retried for GET); a call every 10 ms\n"
    )
    print(
        table(
            ejections,
            [
                "case",
                "backend",
                "calls until ejected",
                "ejected after",
                "1st ejection",
                "2nd ejection",
                "used again after fix (made at the 2nd ejection)",
                "failed calls",
            ],
        )
    )
    print("\n### Last known good: registry stopped, then started (retry cap 0.5 s)\n")
    print(
        table(
            lkg,
            [
                "backend",
                "first answer (stale)",
                "served",
                "registry start took",
                "fresh after start",
                "fresh answer",
            ],
        )
    )
    print("\n### Pure cost (memory backend, 100 instances, 50 pass the filter)\n")
    print(table(cost, ["what", "total", "per endpoint"]))
    print()
    print(table(choose_rows, ["call", "p50", "p99"]))
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
