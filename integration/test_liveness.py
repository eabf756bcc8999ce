"""Shared liveness (issue 13): many registrations of one process, one heartbeat per TTL.

On real Consul and etcd, 20 AsyncRegistrars on one backend: one lease /
heartbeat for all, renewals about once per ttl/3 whatever their number,
withdrawing one touches only it, an entry deleted behind our back comes back
through the shared verification (and only it is looked up), a lost lease or a
wiped server brings all back, kill -9 takes all away within the TTL, a process
frozen past the TTL comes back whole.

Run as ``python -m integration.test_liveness URL TTL COUNT`` it is the service
process of the kill -9 and freeze tests: it prints "registered" once all its
registrations are in, then idles until a signal ends it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry_agent import (
    AsyncRegistrar,
    Backend,
    BackendError,
    BackendUnavailable,
    CallableCheck,
    HealthStatus,
    RetryPolicy,
    ServiceInstance,
    ServiceSnapshot,
    open_backend,
)
from registry_agent._backend import SharedLiveness
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

TTL = 2.0
COUNT = 20
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine
SERVICE = "orders"
Measured = Callable[[str, float, float], None]


def instances(count: int = COUNT, service: str = SERVICE) -> list[ServiceInstance]:
    return [ServiceInstance(service, address="127.0.0.1", port=9000 + i) for i in range(count)]


def registrar(backend: Backend, instance: ServiceInstance, **kwargs: Any) -> AsyncRegistrar:
    kwargs.setdefault("ttl", TTL)
    kwargs.setdefault("retry", RETRY)
    return AsyncRegistrar(backend, instance, shared_liveness=True, **kwargs)


@contextlib.asynccontextmanager
async def keeping(
    server: ServerProcess,
    regs: Iterable[ServiceInstance | AsyncRegistrar],
    *,
    backend: Backend | None = None,
) -> AsyncIterator[tuple[Backend, list[AsyncRegistrar]]]:
    """Started registrars of ``regs`` (instances, or registrars made on ``backend``)."""
    backend = backend or open_backend(server.url, timeout=1)
    assert isinstance(backend, SharedLiveness), f"{backend!r} does not share liveness"
    made = [r if isinstance(r, AsyncRegistrar) else registrar(backend, r) for r in regs]
    try:
        await asyncio.gather(*(r.start(wait_registered=10) for r in made))
        assert all(r.registered for r in made)
        yield backend, made
    finally:
        await asyncio.gather(*(r.stop(timeout=5) for r in made))
        await backend.close()


@pytest.fixture
async def observer(server: ServerProcess) -> AsyncIterator[Backend]:
    """A second client: what discovery sees."""
    backend = open_backend(server.url, timeout=1)
    yield backend
    await backend.close()


async def statuses(observer: Backend, service: str = SERVICE) -> dict[str, HealthStatus]:
    try:
        snapshot = await observer.list(service)
    except BackendUnavailable:
        return {}
    return {h.instance.id: h.status for h in snapshot.instances.values()}


async def until(
    observer: Backend, check: Callable[[dict[str, HealthStatus]], bool], within: float, what: str
) -> float:
    started = time.monotonic()
    seen: dict[str, HealthStatus] = {}
    while time.monotonic() - started < within + 10:
        seen = await statuses(observer)
        if check(seen):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"never {what}: {seen}")


def all_passing(wanted: list[ServiceInstance]) -> Callable[[dict[str, HealthStatus]], bool]:
    ids = {i.id for i in wanted}
    return lambda seen: all(seen.get(i) is HealthStatus.PASSING for i in ids)


def none_passing(wanted: list[ServiceInstance]) -> Callable[[dict[str, HealthStatus]], bool]:
    # Consul keeps a critical entry until deregister_critical_after; etcd drops it.
    ids = {i.id for i in wanted}
    return lambda seen: all(seen.get(i) is not HealthStatus.PASSING for i in ids)


def keepalives(server: EtcdServer) -> float:
    """LeaseKeepAlive messages etcd has received, from its own metrics."""
    with urllib.request.urlopen(f"{server.client_url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    pattern = r'grpc_server_msg_received_total\{[^}]*grpc_method="LeaseKeepAlive"[^}]*\} (\S+)'
    return sum(float(m) for m in re.findall(pattern, text))


async def consul_checks(server: ConsulServer) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        checks: dict[str, object] = (await http.get("/v1/agent/checks")).json()
    return checks


async def test_twenty_registrations_one_heartbeat(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    wanted = instances()
    async with keeping(server, wanted) as (_, keepers):
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        if isinstance(server, EtcdServer):
            assert len(server.leases()) == 1, server.leases()
            before, started = keepalives(server), time.monotonic()
            await asyncio.sleep(2 * TTL)
            renewals = keepalives(server) - before
            per_period = renewals / ((time.monotonic() - started) / (TTL / 3))
            # One renewal per ttl/3 for all 20 (per-registration leases would be 20).
            measured("etcd keepalives per ttl/3", per_period, 1.5)
            assert per_period >= 0.5, renewals
            assert len(server.leases()) == 1
        else:
            assert isinstance(server, ConsulServer)
            ttl_checks = [
                c
                for c in (await consul_checks(server)).values()
                if c["Type"] == "ttl"  # type: ignore[index]
            ]
            assert len(ttl_checks) == 1, ttl_checks
            await asyncio.sleep(2 * TTL)
        assert all(k.counters.lease_losses == 0 for k in keepers)
        assert await statuses(observer) == {i.id: HealthStatus.PASSING for i in wanted}
        last = keepers[0].snapshot().last_heartbeat  # the shared renewal's
        assert last is not None
        assert time.time() - last < TTL
    # Stopping the last one removes the shared liveness too.
    await until(observer, lambda seen: not seen, MARGIN, "all deregistered")
    if isinstance(server, EtcdServer):
        assert server.leases() == set()


async def _changes(observer: Backend, seen: list[ServiceSnapshot], ready: asyncio.Event) -> None:
    async for snapshot in observer.watch(SERVICE):
        seen.append(snapshot)
        ready.set()


async def test_withdrawing_one_changes_only_it(server: ServerProcess, observer: Backend) -> None:
    wanted = instances()
    healthy = True
    backend = open_backend(server.url, timeout=1)
    regs: list[ServiceInstance | AsyncRegistrar] = list(wanted)
    regs[3] = registrar(
        backend,
        wanted[3],
        checks=[CallableCheck(lambda: healthy, interval=0.1)],
        fall=1,
        rise=1,
        on_unhealthy="critical",
    )
    async with keeping(server, regs, backend=backend) as (_, keepers):
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        seen: list[ServiceSnapshot] = []
        ready = asyncio.Event()
        watch = asyncio.get_running_loop().create_task(_changes(observer, seen, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            first = dict(seen[-1].instances)
            assert len(first) == COUNT
            # Critical: its entry stays, with its status; nothing else moves.
            healthy = False
            await asyncio.sleep(TTL + 1)  # a verification and a few renewals pass
            assert len(seen) == 2, [sorted(s.instances) for s in seen]
            changed = {k for k, v in seen[1].instances.items() if first.get(k) != v}
            assert changed == {wanted[3].id}
            assert seen[1].instances[wanted[3].id].status is HealthStatus.CRITICAL
            # Stopping one deletes only its entry.
            await keepers[5].stop(timeout=5)
            await asyncio.sleep(TTL + 1)
            assert len(seen) == 3, [sorted(s.instances) for s in seen]
            assert set(seen[1].instances) - set(seen[2].instances) == {wanted[5].id}
            assert all(seen[2].instances[k] == seen[1].instances[k] for k in seen[2].instances)
            assert all(k.counters.lease_losses == 0 for k in keepers)
            assert all(k.counters.reregistrations == 0 for k in keepers)
            if isinstance(server, EtcdServer):
                assert len(server.leases()) == 1
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackendError):
                await watch


async def delete_behind_its_back(server: ServerProcess, instance: ServiceInstance) -> None:
    if isinstance(server, ConsulServer):
        async with httpx.AsyncClient(base_url=server.http) as http:
            response = await http.put(f"/v1/agent/service/deregister/{instance.id}")
            assert response.status_code == 200
    else:
        assert isinstance(server, EtcdServer)
        key = f"/services/{instance.service}/{instance.id}".encode()
        reply = server.api("/v3/kv/deleterange", {"key": base64.b64encode(key).decode()})
        assert reply.get("deleted") == "1", reply


async def test_entry_deleted_behind_its_back_is_verified_back(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    wanted = instances()
    async with keeping(server, wanted) as (_, keepers):
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        await asyncio.sleep(TTL + 0.5)  # past the registrars' own first read-back
        before = [k.counters.verifications for k in keepers]
        begun = time.monotonic()
        await delete_behind_its_back(server, wanted[7])
        took = await until(observer, all_passing(wanted), 2 * TTL + MARGIN, "repaired")
        # Found by the next verification (once per TTL), then one lookup and one put.
        measured("deleted entry back", took, TTL + RETRY.cap + MARGIN)
        looked_up = [k.counters.verifications - n for k, n in zip(keepers, before, strict=True)]
        reads = (time.monotonic() - begun) / TTL + 1  # shared read-backs since, at most
        # One read verified all (each keeper counts it): only the deleted one was told to
        # look its entry up, the others counted the same shared read-backs and no more.
        others = looked_up[:7] + looked_up[8:]
        assert len(set(others)) == 1, looked_up
        assert 1 <= others[0] <= reads, looked_up
        assert looked_up[7] >= 1, looked_up


async def test_lease_revoked_by_someone_else_all_back(
    etcd_server: EtcdServer, measured: Measured
) -> None:
    wanted = instances()
    observer = open_backend(etcd_server.url, timeout=1)
    try:
        async with keeping(etcd_server, wanted) as (_, keepers):
            await until(observer, all_passing(wanted), MARGIN, "all passing")
            (lease_id,) = etcd_server.leases()
            etcd_server.api("/v3/lease/revoke", {"ID": str(lease_id)})
            revoked = time.monotonic()
            await until(observer, lambda seen: len(seen) < COUNT, MARGIN, "revoked")
            await until(observer, all_passing(wanted), TTL + MARGIN, "all back")
            # The next renewal (ttl/3) hears it is gone; one grant, batched re-puts.
            measured("all back after revoke", time.monotonic() - revoked, TTL / 3 + MARGIN)
            assert all(k.counters.lease_losses == 1 for k in keepers)
            assert len(etcd_server.leases()) == 1
    finally:
        await observer.close()


async def test_close_revokes_the_shared_lease_only(etcd_server: EtcdServer) -> None:
    backend = open_backend(etcd_server.url, timeout=1)
    assert isinstance(backend, SharedLiveness)
    shared = [await backend.register_shared(i, ttl=TTL) for i in instances(3)]
    own = await backend.register(instances(4)[3], ttl=30)  # today's per-registration lease
    assert etcd_server.leases() == {shared[0].handle, own.handle}
    await backend.close()
    # The shared entries go with their lease; a registration of its own stays (until its TTL).
    assert etcd_server.leases() == {own.handle}
    observer = open_backend(etcd_server.url, timeout=1)
    try:
        assert set(await statuses(observer)) == {own.instance.id}
    finally:
        await observer.close()


async def test_server_wiped_all_back(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    wanted = instances()
    async with keeping(server, wanted) as (_, keepers):
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        server.restart(wipe=True)
        took = await until(observer, all_passing(wanted), 10, "all back")
        measured("all back after wipe", took, TTL + RETRY.cap + MARGIN)
        # etcd's lease group puts the entries back itself, then tells the registrars:
        # their counters follow a moment later on a loaded machine.
        for _ in range(int((TTL + MARGIN) / 0.05)):
            if all(k.counters.reregistrations >= 1 for k in keepers):
                break
            await asyncio.sleep(0.05)
        assert all(k.counters.reregistrations >= 1 for k in keepers)
        if isinstance(server, EtcdServer):
            assert len(server.leases()) == 1


def start_process(server: ServerProcess, count: int = COUNT) -> subprocess.Popen[str]:
    """A separate service process keeping ``count`` shared registrations."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "integration.test_liveness", server.url, str(TTL), str(count)],
        cwd=Path(__file__).parent.parent,
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


async def test_kill_9_all_gone_within_ttl(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    wanted = instances()
    proc = start_process(server)
    try:
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        await until(observer, none_passing(wanted), TTL + 1 + MARGIN, "all gone")
        measured("all gone after kill -9", time.monotonic() - killed, TTL + 1 + MARGIN)
    finally:
        end_process(proc)


async def test_frozen_past_ttl_all_back(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    wanted = instances()
    proc = start_process(server)
    try:
        await until(observer, all_passing(wanted), MARGIN, "all passing")
        proc.send_signal(signal.SIGSTOP)
        await until(observer, none_passing(wanted), TTL + 1 + MARGIN, "all expired")
        proc.send_signal(signal.SIGCONT)
        took = await until(observer, all_passing(wanted), 10, "all back")
        # It finds its lease stale at once (no renewal for a TTL) and grants a new one.
        measured("all back after SIGCONT", took, TTL / 3 + RETRY.cap + MARGIN)
    finally:
        end_process(proc)


async def _serve(url: str, ttl: float, count: int) -> None:
    backend = open_backend(url, timeout=1)
    assert isinstance(backend, SharedLiveness)
    regs = [registrar(backend, inst, ttl=ttl) for inst in instances(count)]
    await asyncio.gather(*(r.start(wait_registered=20) for r in regs))
    print("registered", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
