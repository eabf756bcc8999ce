"""Shared liveness on real Consul and etcd: the counters count as they do without it.

One heartbeat (Consul) or lease (etcd) per TTL renews every registration of the
process, and one read per TTL verifies them all. Each renewal (passed or failed)
and each read-back is credited to every registration it covered, so
``heartbeats_ok``, ``heartbeats_failed`` and ``verifications`` (and the agent's
``registry_agent_heartbeats_total``) grow for each registration, not only
``last_heartbeat``. TTL 3 s: a renewal every 1 s, a read-back every 3 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from integration.agent_process import ONE_SERVICE, Agent
from registry_agent import AsyncRegistrar, Backend, RetryPolicy, ServiceInstance, open_backend
from registry_agent.testing.servers import ServerProcess

TTL = 3.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine


def instances(n: int) -> list[ServiceInstance]:
    return [
        ServiceInstance("orders", address="127.0.0.1", port=8080 + i, id=f"orders-{i}")
        for i in range(n)
    ]


async def started(backend: Backend, n: int) -> list[AsyncRegistrar]:
    """``n`` registrars on one backend (so on one shared heartbeat), all registered."""
    regs = [
        AsyncRegistrar(backend, instance, ttl=TTL, retry=RETRY, shared_liveness=True)
        for instance in instances(n)
    ]
    for reg in regs:
        await reg.start(wait_registered=10)
    return regs


def counts(regs: list[AsyncRegistrar], name: str) -> list[int]:
    """``name`` of each registrar, and of its one backend (the per-backend families)."""
    values = []
    for reg in regs:
        snap = reg.snapshot()
        (lane,) = snap.backends
        assert lane.counters[name] == snap.counters[name]
        values.append(snap.counters[name])
    return values


async def grown(regs: list[AsyncRegistrar], name: str, above: list[int], within: float) -> float:
    """Seconds until every registrar's ``name`` is above ``above``; fails past ``within``."""
    begun = time.monotonic()
    while time.monotonic() - begun < within:
        if all(now > was for now, was in zip(counts(regs, name), above, strict=True)):
            return time.monotonic() - begun
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} stayed {counts(regs, name)} (was {above}) for {within}s")


async def test_every_shared_renewal_and_read_back_is_counted_for_each_registration(
    server: ServerProcess,
) -> None:
    backend = open_backend(f"{server.url}?timeout=1s")
    regs = await started(backend, 3)
    try:
        ok0, verified0 = counts(regs, "heartbeats_ok"), counts(regs, "verifications")
        watched = 2 * TTL + 0.5
        await asyncio.sleep(watched)
        ok, verified = counts(regs, "heartbeats_ok"), counts(regs, "verifications")
        renewals = watched / (TTL / 3)  # about 6.5 renewals went out
        for before, after in zip(ok0, ok, strict=True):
            assert renewals / 2 <= after - before <= renewals + 2, (ok0, ok)
        # One renewal covers them all: each counted it (one apart at most, as they joined).
        assert max(ok) - min(ok) <= 1, ok
        for before, after in zip(verified0, verified, strict=True):
            assert 1 <= after - before <= watched / TTL + 2, (verified0, verified)
        assert counts(regs, "heartbeats_failed") == [0, 0, 0]
        assert counts(regs, "lease_losses") == [0, 0, 0]
        assert all(reg.snapshot().last_heartbeat is not None for reg in regs)
    finally:
        for reg in regs:
            await reg.stop(timeout=5)
        await backend.close()


async def test_failed_shared_renewals_are_counted_for_each_registration(
    server: ServerProcess,
) -> None:
    # Frozen, the server answers nothing: each renewal times out (0.5 s) and fails.
    backend = open_backend(f"{server.url}?timeout=0.5s")
    regs = await started(backend, 2)
    try:
        await grown(regs, "heartbeats_ok", [0, 0], TTL + MARGIN)
        assert counts(regs, "heartbeats_failed") == [0, 0]
        server.pause()
        try:
            await grown(regs, "heartbeats_failed", [0, 0], TTL / 3 + 1 + MARGIN)
        finally:
            server.resume()
        failed = counts(regs, "heartbeats_failed")
        # Each failed renewal once per registration (their own from-memory answers are not).
        assert max(failed) - min(failed) <= 1, failed
        await grown(regs, "heartbeats_ok", counts(regs, "heartbeats_ok"), TTL + MARGIN)
    finally:
        for reg in regs:
            await reg.stop(timeout=5)
        await backend.close()


def sample(metrics: str, family: str, **labels: str) -> float:
    """The value of the one sample of ``family`` carrying ``labels``."""
    for line in metrics.splitlines():
        match = re.fullmatch(rf"{family}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no {family} sample with {labels} in:\n{metrics}")


def test_agent_metrics_count_heartbeats_and_verifications(
    server: ServerProcess, tmp_path: Path, agents: list[Agent]
) -> None:
    agent = Agent(tmp_path, server.url, ONE_SERVICE)  # ttl 3s; the agent shares liveness
    agents.append(agent.start())
    agent.until("/readyz", 200)
    ids = {"service": "orders", "instance_id": "orders-1"}
    deadline = time.monotonic() + 2 * TTL + MARGIN
    while True:
        metrics = agent.until("/metrics", 200)
        ok = sample(metrics, "registry_agent_heartbeats_total", result="ok", **ids)
        per_backend = sample(metrics, "registry_agent_backend_heartbeats_total", result="ok", **ids)
        verified = sample(metrics, "registry_agent_verifications_total", **ids)
        if (ok >= 2 and per_backend >= 2 and verified >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok >= 2, metrics
    assert per_backend == ok
    assert verified >= 1, metrics
    assert sample(metrics, "registry_agent_heartbeats_total", result="failed", **ids) == 0
