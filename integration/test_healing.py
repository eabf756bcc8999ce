"""DESIGN §6: every failure scenario the registrar must survive, on real Consul and etcd.

Bounds derive from the configuration (TTL, heartbeat, backoff cap, check
interval) plus a generous margin for a loaded 2-core machine; the measured
times are printed in the summary. bench/ measures them properly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aetcd
import httpx
import pytest

from registry_agent import (
    AsyncRegistrar,
    Backend,
    BackendUnavailable,
    CallableCheck,
    HealthStatus,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

TTL = 2.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
Measured = Callable[[str, float, float], None]


@pytest.fixture
async def observer(server: ServerProcess) -> AsyncIterator[Backend]:
    """A second client: what discovery sees."""
    backend = open_backend(server.url, timeout=1)
    yield backend
    await backend.close()


async def status_in(observer: Backend, instance: ServiceInstance = INSTANCE) -> HealthStatus | None:
    try:
        health = (await observer.list(instance.service)).instances.get(instance.id)
    except BackendUnavailable:
        return None
    return None if health is None else health.status


async def until(
    observer: Backend,
    wanted: set[HealthStatus | None],
    within: float,
    instance: ServiceInstance = INSTANCE,
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        if await status_in(observer, instance) in wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"{instance.id} never reached {wanted}")


PASSING = {HealthStatus.PASSING}
GONE = {None}
NOT_PASSING = {None, HealthStatus.CRITICAL}  # Consul keeps a critical entry; etcd drops it


def registrar(server: ServerProcess, **kwargs: object) -> AsyncRegistrar:
    kwargs.setdefault("ttl", TTL)
    kwargs.setdefault("retry", RETRY)
    return AsyncRegistrar(open_backend(server.url, timeout=1), INSTANCE, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(reg: AsyncRegistrar) -> AsyncIterator[AsyncRegistrar]:
    await reg.start(wait_registered=10)
    try:
        yield reg
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


# 1. Registry restarts empty
async def test_registry_restarted_empty(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    async with running(registrar(server)) as reg:
        server.restart(wipe=True)
        took = await until(observer, PASSING, 10)
        measured("re-registered", took, reg.heartbeat_interval + RETRY.cap + MARGIN)
        assert reg.counters.lease_losses >= 1
        # Consul shows the entry as soon as the service is in; the registration call
        # (which also sets the health check) may still be finishing: give it a moment.
        assert await reg.wait_registered(5.0)  # the backend's request timeout
        assert reg.counters.reregistrations >= 1


# 2. Registry down for longer than the TTL, then back
async def test_registry_down_longer_than_ttl(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    async with running(registrar(server)) as reg:
        server.stop()
        await asyncio.sleep(TTL * 2)
        assert reg.counters.errors >= 1  # it noticed, and kept trying
        server.start()
        took = await until(observer, PASSING, 10)
        measured("registered again", took, RETRY.cap + reg.heartbeat_interval + MARGIN)
        await asyncio.sleep(TTL)  # and it stays
        assert await status_in(observer) is HealthStatus.PASSING


# 3. Registry unreachable at startup
async def test_registry_unreachable_at_startup(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    server.stop()
    reg = registrar(server)
    started = time.monotonic()
    await reg.start()
    assert time.monotonic() - started < 0.5  # no crash, no blocking
    try:
        await asyncio.sleep(2.0)
        assert not reg.registered
        assert reg.counters.errors >= 3
        server.start()
        took = await until(observer, PASSING, 10)
        measured("registered once reachable", took, RETRY.cap + MARGIN)
    finally:
        await reg.stop()
        await reg.backend.close()


def start_process(server: ServerProcess, port: int, *extra: str) -> subprocess.Popen[str]:
    """A separate service process registering itself (``extra``: "serve" for HTTP)."""
    script = Path(__file__).with_name("registrar_process.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), server.url, str(port), str(TTL), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "registered", proc.stderr.read() if proc.stderr else line
    return proc


def end_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.communicate(timeout=10)  # reaps it and closes its pipes


# 4. Process frozen past the TTL, then resumed
async def test_process_frozen_past_ttl(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=9104)
    proc = start_process(server, inst.port)
    try:
        assert await status_in(observer, inst) is HealthStatus.PASSING
        proc.send_signal(signal.SIGSTOP)
        took = await until(observer, NOT_PASSING, TTL + MARGIN, inst)
        measured("expired while frozen", took, TTL + MARGIN)
        proc.send_signal(signal.SIGCONT)
        took = await until(observer, PASSING, 10, inst)
        measured("back after SIGCONT", took, TTL / 3 + RETRY.cap + MARGIN)
    finally:
        end_process(proc)


async def delete_behind_its_back(server: ServerProcess, instance: ServiceInstance) -> None:
    if isinstance(server, ConsulServer):
        async with httpx.AsyncClient(base_url=server.http) as http:
            response = await http.put(f"/v1/agent/service/deregister/{instance.id}")
            assert response.status_code == 200
    else:
        assert isinstance(server, EtcdServer)
        async with aetcd.Client(host="127.0.0.1", port=server.client_port) as client:
            assert await client.delete(f"/services/{instance.service}/{instance.id}".encode())


# 5. Our entry deleted by someone else while the lease is alive
async def test_entry_deleted_by_someone_else_is_repaired(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    async with running(registrar(server)) as reg:
        await delete_behind_its_back(server, INSTANCE)
        assert await status_in(observer) is None
        took = await until(observer, PASSING, 10)
        measured("repaired", took, reg.verify_interval + RETRY.cap + MARGIN)
        # The observer may see the entry before register() returns and counts it.
        for _ in range(40):
            if reg.counters.reregistrations:
                break
            await asyncio.sleep(0.05)
        assert reg.counters.reregistrations == 1


class Switch:
    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


# 6. Local health fails, then recovers (both on_unhealthy policies)
@pytest.mark.parametrize("policy", ["deregister", "critical"])
async def test_health_fails_then_recovers(
    server: ServerProcess, observer: Backend, measured: Measured, policy: str
) -> None:
    interval, fall, rise = 0.2, 3, 2
    check = Switch()
    reg = registrar(
        server,
        checks=[CallableCheck(check, interval=interval)],
        fall=fall,
        rise=rise,
        on_unhealthy=policy,
    )
    async with running(reg):
        check.ok = False
        wanted = GONE if policy == "deregister" else {HealthStatus.CRITICAL}
        took = await until(observer, wanted, 10)
        measured(f"withdrawn ({policy})", took, interval * fall + reg.heartbeat_interval + MARGIN)
        check.ok = True
        took = await until(observer, PASSING, 10)
        measured(f"back ({policy})", took, interval * rise + MARGIN)


# 7. Flapping health: hysteresis, no storm
async def test_flapping_health_causes_no_storm(server: ServerProcess, observer: Backend) -> None:
    results = iter([True, True] + [False, True] * 1000)
    reg = registrar(
        server, checks=[CallableCheck(lambda: next(results), interval=0.05)], fall=2, rise=2
    )
    async with running(reg):
        seen: set[HealthStatus | None] = set()
        for _ in range(20):
            seen.add(await status_in(observer))
            await asyncio.sleep(0.1)
        assert seen == {HealthStatus.PASSING}
        assert reg.counters.registrations == 1
        assert reg.counters.deregistrations == 0


# 8. SIGTERM and stop(): deregistered before exit, in bounded time
async def test_sigterm_deregisters_before_exit(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=9108)
    proc = start_process(server, inst.port)
    try:
        assert await status_in(observer, inst) is HealthStatus.PASSING
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        measured("exit after SIGTERM", time.monotonic() - started, 10 + MARGIN)
        assert code == -signal.SIGTERM  # the signal took its course after cleanup
        assert await status_in(observer, inst) is None  # gone at once, not after a TTL
    finally:
        end_process(proc)


async def test_stop_is_bounded_when_the_registry_hangs(
    server: ServerProcess, measured: Measured
) -> None:
    reg = registrar(server)
    await reg.start(wait_registered=10)
    server.pause()
    try:
        started = time.monotonic()
        await reg.stop(timeout=2)
        measured("stop() with a frozen registry", time.monotonic() - started, 2 + 0.5)
    finally:
        server.resume()
        await reg.backend.close()


# 9. kill -9: gone from discovery within the TTL
async def test_kill_9_gone_within_ttl(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=9109)
    proc = start_process(server, inst.port)
    try:
        assert await status_in(observer, inst) is HealthStatus.PASSING
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        await until(observer, NOT_PASSING, TTL + MARGIN, inst)
        took = time.monotonic() - killed
        measured("gone after kill -9", took, TTL + 1 + MARGIN)
    finally:
        end_process(proc)


async def put_garbage(server: ServerProcess) -> None:
    if isinstance(server, ConsulServer):
        async with httpx.AsyncClient(base_url=server.http) as http:
            for body in (
                {"Name": "orders", "ID": "orders with spaces"},
                {"Name": "orders", "ID": "no-port", "Meta": {"weird": "☃" * 100}},
            ):
                assert (await http.put("/v1/agent/service/register", json=body)).status_code == 200
    else:
        assert isinstance(server, EtcdServer)
        async with aetcd.Client(host="127.0.0.1", port=server.client_port) as client:
            await client.put(b"/services/orders/junk", b"\x00\xff not json")
            await client.put(b"/services/orders/list", b"[]")
            await client.put(f"/services/orders/{INSTANCE.id}x".encode(), b'{"port": "x"}')


# 10. Garbage and foreign values under our prefix/service
async def test_garbage_under_our_prefix_changes_nothing(
    server: ServerProcess, observer: Backend
) -> None:
    await put_garbage(server)
    async with running(registrar(server)) as reg:
        await asyncio.sleep(TTL * 1.5)  # several heartbeats and a verification
        assert reg.counters.errors == 0
        assert reg.counters.verifications >= 1
        healthy = (await observer.list("orders")).healthy()
        assert INSTANCE in healthy
        if isinstance(server, EtcdServer):
            assert healthy == [INSTANCE]  # values that are not instances are skipped
        else:
            # Consul accepted the foreign registrations: they are read as they are.
            assert {i.id for i in healthy} <= {INSTANCE.id, "orders with spaces", "no-port"}
