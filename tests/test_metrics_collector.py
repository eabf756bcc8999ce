"""The public Prometheus collector, the watcher's stats, the readiness apps and WARNING levels.

Memory backend (a real Prometheus scraping real backends: integration/test_prometheus_scrape.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    CallableCheck,
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Registrar,
    RegistryCollector,
    ServiceInstance,
    Watcher,
)
from registry_agent._retry import RetryPolicy
from registry_agent.readiness import make_asgi_app, make_wsgi_app, readiness
from registry_agent.testing.memory import MemoryRegistry

FAST = RetryPolicy(initial=0.01, cap=0.05)
C = HealthStatus.CRITICAL


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"metrics-{uuid.uuid4().hex}")


def inst(n: int, version: int = 0) -> ServiceInstance:
    return ServiceInstance(
        "orders", address="127.0.0.1", port=9000 + n, id=f"o{n}", meta={"v": str(version)}
    )


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def samples(collector: RegistryCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one scrape, by (name, labels), parsed back from the text exposition."""
    prom = CollectorRegistry()
    prom.register(collector)
    text = generate_latest(prom).decode()
    assert 'instance="' not in text  # never Prometheus's own target label
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def seen(watcher: AsyncWatcher, version: str) -> bool:
    """The watcher holds o1 at ``version``."""
    return watcher.snapshot()[0].instance.meta["v"] == version


class Switch:
    def __init__(self) -> None:
        self.ok = True

    def probe(self) -> bool:
        return self.ok


@pytest.fixture
async def running(registry: MemoryRegistry) -> AsyncIterator[list[Any]]:
    """Registrars and watchers to close at the end."""
    opened: list[Any] = []
    yield opened
    for item in opened:
        if isinstance(item, AsyncRegistrar):
            await item.stop(2.0)
        else:
            await item.close()


async def test_registrar_families_carry_instance_id(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    switch = Switch()
    collector = RegistryCollector()
    reg = AsyncRegistrar(
        registry.url,
        inst(1),
        ttl=1.0,
        retry=FAST,
        checks=[CallableCheck(switch.probe, interval=0.02, name="db")],
        rise=1,
        fall=1,
        on_check=collector.check_observer("orders", "o1"),
    )
    running.append(reg)
    collector.add(reg)
    await reg.start(wait_registered=5.0)
    await wait_until(lambda: reg.ready)
    ids = {"service": "orders", "instance_id": "o1"}
    got = samples(collector)
    assert got[key("registry_agent_ready", **ids)] == 1.0
    assert got[key("registry_agent_registered", **ids)] == 1.0
    assert got[key("registry_agent_registrations_total", **ids)] == 1.0
    assert got[key("registry_agent_service_state", **ids, state="registered")] == 1.0
    assert got[key("registry_agent_service_state", **ids, state="withdrawn")] == 0.0
    assert got[key("registry_agent_check_up", **ids, check="db")] == 1.0
    backend = reg.snapshot().backends[0].name
    assert got[key("registry_agent_backend_ready", **ids, backend=backend)] == 1.0
    stamp = got[key("registry_agent_last_heartbeat_timestamp_seconds", **ids)]
    assert abs(stamp - time.time()) < 5
    count = key("registry_agent_check_latency_seconds_count", **ids, check="db", result="ok")
    assert got[count] >= 1

    switch.ok = False
    await wait_until(lambda: not reg.ready)
    got = samples(collector)
    assert got[key("registry_agent_ready", **ids)] == 0.0
    assert got[key("registry_agent_service_state", **ids, state="withdrawn")] == 1.0
    assert got[key("registry_agent_check_up", **ids, check="db")] == 0.0


async def test_watcher_families_and_stats(registry: MemoryRegistry, running: list[Any]) -> None:
    lease1 = registry.put(InstanceHealth(inst(1)), ttl=60)
    registry.put(InstanceHealth(inst(2), C), ttl=60)
    watcher = AsyncWatcher(registry.url, "orders", retry=FAST)
    running.append(watcher)
    collector = RegistryCollector(watchers=[watcher])
    assert await watcher.wait_synced(5.0)
    registry.put(InstanceHealth(inst(1, 1)), ttl=60, lease_id=lease1)  # updated
    registry.put(InstanceHealth(inst(3)), ttl=60)  # added
    registry.delete("orders", "o2", None)  # deleted
    await wait_until(lambda: watcher.stats().events[("orders", "deleted")] == 1)
    await wait_until(lambda: watcher.stats().events[("orders", "added")] == 3)
    stats = watcher.stats()
    assert dict(stats.events) == {
        ("orders", "added"): 3,
        ("orders", "offline"): 1,
        ("orders", "updated"): 1,
        ("orders", "deleted"): 1,
        ("orders", "online"): 0,
    }
    (watched,) = stats.watched
    assert (watched.instances, watched.healthy, watched.synced) == (2, 2, True)
    backend = stats.backends[0]
    got = samples(collector)
    labels = {"service": "orders", "backend": backend}
    assert got[key("registry_agent_watch_events_total", **labels, type="added")] == 3
    assert got[key("registry_agent_watch_events_total", **labels, type="updated")] == 1
    assert got[key("registry_agent_watch_instances", **labels)] == 2
    assert got[key("registry_agent_watch_healthy_instances", **labels)] == 2
    assert got[key("registry_agent_watch_synced", **labels)] == 1
    assert got[key("registry_agent_watch_errors_total", **labels)] == 0
    assert got[key("registry_agent_watch_consumers", **labels)] == 0

    # Two watchers of the same service and backend: counters summed, gauges not doubled.
    twin = AsyncWatcher(registry.url, "orders", retry=FAST)
    running.append(twin)
    assert await twin.wait_synced(5.0)
    collector.add(twin)
    got = samples(collector)
    assert got[key("registry_agent_watch_events_total", **labels, type="added")] == 3 + 2
    assert got[key("registry_agent_watch_instances", **labels)] == 2


async def test_a_slow_consumer_shows_pending_lag_and_coalesced_changes(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    lease = registry.put(InstanceHealth(inst(1)), ttl=60)
    watcher = AsyncWatcher(registry.url, "orders", retry=FAST)
    running.append(watcher)
    consumer = watcher._subscribe()
    first = await asyncio.wait_for(consumer.__anext__(), 5)  # added o1; then it stops reading
    assert first.instance.id == "o1"
    for version in range(1, 6):
        registry.put(InstanceHealth(inst(1, version)), ttl=60, lease_id=lease)
        await wait_until(partial(seen, watcher, str(version)))
    stats = watcher.stats()
    assert stats.consumers == 1
    assert stats.pending == 1  # five changes of one instance: one pending
    assert stats.coalesced == 4
    assert stats.lag > 0
    got = samples(RegistryCollector(watchers=[watcher]))
    labels = {"service": "orders", "backend": stats.backends[0]}
    assert got[key("registry_agent_watch_coalesced_total", **labels)] == 4
    assert got[key("registry_agent_watch_consumer_pending", **labels)] == 1
    assert got[key("registry_agent_watch_consumer_lag_seconds", **labels)] > 0
    event = await asyncio.wait_for(consumer.__anext__(), 5)
    assert event.instance.meta["v"] == "5"  # the coalesced change ends at the current state
    assert watcher.stats().pending == 0
    await consumer.aclose()


async def test_watch_errors_are_counted_per_backend(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    other = MemoryRegistry.named(f"metrics-other-{uuid.uuid4().hex}")
    registry.put(InstanceHealth(inst(1)), ttl=60)
    other.stop()  # never answers
    watcher = AsyncWatcher([registry.url, other.url], "orders", retry=FAST)
    running.append(watcher)
    assert await watcher.wait_synced(5.0)
    await wait_until(lambda: watcher.stats().watched[1].errors >= 2)
    first, second = watcher.stats().watched
    assert (first.errors, first.synced, first.instances) == (0, True, 1)
    assert (second.synced, second.instances) == (False, 0)
    got = samples(RegistryCollector(watchers=[watcher]))
    view = ",".join(watcher.stats().backends)
    errors = got[key("registry_agent_watch_errors_total", service="orders", backend=second.backend)]
    assert errors >= 2
    assert (
        got[key("registry_agent_watch_events_total", service="orders", backend=view, type="added")]
        == 1
    )


def test_blocking_facades_scraped_from_another_thread_while_they_change(
    registry: MemoryRegistry,
) -> None:
    """A scrape thread reads while the loop threads change what it reads: never an error,
    never a wait for the loop, and the last scrape sees the final state."""
    reg = Registrar(registry.url, inst(0), ttl=1.0, retry=FAST)
    watcher = Watcher(registry.url, "orders", retry=FAST)
    collector = RegistryCollector([reg], [watcher])
    errors: list[BaseException] = []
    stop = threading.Event()
    scrapes = 0
    slowest = 0.0

    def scrape() -> None:
        nonlocal scrapes, slowest
        prom = CollectorRegistry()
        prom.register(collector)
        while not stop.is_set():
            started = time.monotonic()
            try:
                generate_latest(prom)
            except BaseException as exc:
                errors.append(exc)
            slowest = max(slowest, time.monotonic() - started)
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    try:
        reg.start(wait_registered=5.0)
        watcher.start()
        assert watcher.wait_synced(5.0)
        scraper.start()
        leases = [registry.put(InstanceHealth(inst(n)), ttl=60) for n in range(1, 51)]
        for round_ in range(1, 21):
            for n, lease in enumerate(leases, start=1):
                registry.put(InstanceHealth(inst(n, round_)), ttl=60, lease_id=lease)
        deadline = time.monotonic() + 10
        while watcher.stats().events[("orders", "updated")] < 50:
            assert time.monotonic() < deadline, watcher.stats()
            time.sleep(0.01)
    finally:
        stop.set()
        if scraper.is_alive():
            scraper.join(10)
        watcher.close()
        reg.stop(2.0)
    assert not errors, errors[:3]
    assert scrapes > 10
    assert slowest < 1.0, slowest
    got = samples(collector)
    ids = {"service": "orders", "instance_id": "o0"}
    assert got[key("registry_agent_service_state", **ids, state="stopped")] == 1.0
    # A closed watcher is no longer shown (its last reads are stale).
    assert not any(k[0] == "registry_agent_watch_instances" for k in got)


async def test_add_remove_weak_references_and_bad_input(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    watcher = AsyncWatcher(registry.url, "orders", retry=FAST)
    collector = RegistryCollector(watchers=[watcher])
    collector.add(watcher)  # once however often added
    assert sum(1 for k in samples(collector) if k[0] == "registry_agent_watch_instances") == 1
    collector.remove(watcher)
    assert not any(k[0] == "registry_agent_watch_instances" for k in samples(collector))
    collector.add(watcher)
    del watcher
    gc.collect()
    assert not any(k[0] == "registry_agent_watch_instances" for k in samples(collector))
    with pytest.raises(ConfigError, match="expected a Registrar") as info:
        RegistryCollector(["memory://"])  # type: ignore[list-item]
    assert info.value.field == "registrars"
    with pytest.raises(ConfigError) as info:
        collector.add(object())  # type: ignore[arg-type]
    assert info.value.field == "add"


def test_registered_in_a_registry_once() -> None:
    """describe() names every family: a second collector in one registry is refused."""
    prom = CollectorRegistry()
    RegistryCollector(registry=prom)
    with pytest.raises(ValueError, match="Duplicated"):
        RegistryCollector(registry=prom)
    text = generate_latest(prom).decode()
    assert "# TYPE registry_agent_ready gauge" in text
    assert "# TYPE registry_agent_watch_events_total counter" in text


async def test_readiness_apps_answer_like_the_agent(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    switch = Switch()
    reg = AsyncRegistrar(
        registry.url,
        inst(1),
        ttl=1.0,
        retry=FAST,
        checks=[CallableCheck(switch.probe, interval=0.02, name="db")],
        rise=1,
        fall=1,
    )
    running.append(reg)
    registrars: list[AsyncRegistrar] = []
    asgi = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_asgi_app(registrars)))
    wsgi = httpx.Client(transport=httpx.WSGITransport(app=make_wsgi_app(registrars)))

    async def both(method: str, url: str = "http://app/readyz") -> list[httpx.Response]:
        """The ASGI app on the loop, the WSGI app from another thread (as a server's)."""
        return [
            await asgi.request(method, url),
            await asyncio.to_thread(wsgi.request, method, url),
        ]

    async with asgi:
        with wsgi:
            # No registrars: not ready (as the agent with no services).
            for response in await both("GET"):
                assert response.status_code == 503
                assert response.json()["why"] == "no services running"
            registrars.append(reg)  # the list is read at each request
            await reg.start(wait_registered=5.0)
            await wait_until(lambda: reg.ready)
            for response in await both("GET"):
                assert response.status_code == 200
                assert response.json() == {"ready": True}
                assert response.headers["content-type"] == "application/json"
            switch.ok = False
            await wait_until(lambda: not reg.ready)
            for response in await both("GET"):
                assert response.status_code == 503
                why = response.json()["not_ready"]["orders/o1"]
                assert why["state"] == "withdrawn"
                assert why["why"] == reg.snapshot().not_ready_reason
                assert readiness(registrars) == (503, response.json())
            for response in await both("HEAD", "http://app/"):
                assert response.status_code == 503
                assert response.content == b""
            for response in await both("POST", "http://app/"):
                assert response.status_code == 405
                assert response.headers["allow"] == "GET, HEAD"
                assert response.text == "only GET and HEAD\n"
    with pytest.raises(ConfigError) as info:
        make_wsgi_app([reg, "memory://"])  # type: ignore[list-item]
    assert info.value.field == "registrars[1]"


async def test_a_withdrawal_is_logged_at_warning(
    registry: MemoryRegistry, running: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    reg = AsyncRegistrar(
        registry.url,
        inst(1),
        ttl=1.0,
        retry=FAST,
        checks=[CallableCheck(switch.probe, interval=0.02, name="db")],
        rise=1,
        fall=1,
    )
    running.append(reg)
    with caplog.at_level(logging.INFO, logger="registry_agent.registrar"):
        await reg.start(wait_registered=5.0)
        switch.ok = False
        await wait_until(lambda: not reg.registered)
    levels = {
        r.__dict__.get("event"): r.levelno for r in caplog.records if r.name.endswith("registrar")
    }
    assert levels["registered"] == logging.INFO
    assert levels["deregistered"] == logging.WARNING, levels
    assert levels["state_changed"] == logging.WARNING, levels  # the last one: withdrawn
    # Every record carries the documented fields, error among them (None when none).
    for record in caplog.records:
        if record.name.endswith("registrar"):
            fields = {name: record.__dict__.get(name, "absent") for name in FIELDS}
            assert "absent" not in fields.values(), (record.getMessage(), fields)
            assert fields["error"] is None, (record.getMessage(), fields)


FIELDS = ("event", "service", "instance", "backend", "error")


async def test_failed_writes_and_watch_records_carry_an_error_field(
    registry: MemoryRegistry, running: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    registry.stop()  # every call fails
    reg = AsyncRegistrar(registry.url, inst(1), ttl=1.0, retry=FAST)
    watcher = AsyncWatcher(registry.url, "orders", retry=FAST)
    # The watcher closed first: the memory backend's watch can miss a close that meets
    # the deregistration's wake-up (asyncio.wait_for on Python 3.11).
    running.extend([watcher, reg])
    with caplog.at_level(logging.INFO, logger="registry_agent"):
        await reg.start()
        await watcher.start()
        await wait_until(lambda: reg.snapshot().counters["errors"] >= 1)
        await wait_until(lambda: watcher.stats().watched[0].errors >= 1)
        registry.start()
        await reg.wait_registered(5.0)
        await wait_until(lambda: watcher.stats().watched[0].synced)
    mine = [r for r in caplog.records if r.name.startswith("registry_agent")]
    assert {r.__dict__.get("event") for r in mine} >= {"register_failed", "registered"}
    for record in mine:
        assert "error" in record.__dict__, (record.name, record.getMessage())
    failed = [r for r in mine if r.__dict__.get("event") == "register_failed"]
    assert all(isinstance(r.__dict__["error"], str) and r.__dict__["error"] for r in failed)


async def test_a_registrar_is_starting_until_its_entry_is_first_written(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    """No checks: the health gate lets the entry in at once, but until a registry has taken
    it (or before start()) the state shown is starting, never registered."""
    ids = {"service": "orders", "instance_id": "o1"}
    never = Registrar(registry.url, inst(1), ttl=1.0, retry=FAST)  # blocking, never started
    collector = RegistryCollector(registrars=[never])
    assert never.snapshot().state == "starting"
    got = samples(collector)
    assert got[key("registry_agent_service_state", **ids, state="starting")] == 1.0
    assert got[key("registry_agent_service_state", **ids, state="registered")] == 0.0
    code, body = readiness([never])
    assert (code, body["not_ready"]["orders/o1"]["state"]) == (503, "starting")

    registry.stop()  # started, but no registry takes the entry yet
    reg = AsyncRegistrar(registry.url, inst(2), ttl=1.0, retry=FAST)
    running.append(reg)
    await reg.start()
    await wait_until(lambda: reg.snapshot().counters["errors"] >= 2)
    assert reg.snapshot().state == "starting"
    registry.start()
    assert await reg.wait_registered(5.0)
    assert reg.snapshot().state == "registered"
    registry.stop()  # once written, a lost registry leaves the state (registered is False)
    await wait_until(lambda: not reg.registered)
    assert reg.snapshot().state == "registered"
    await reg.stop(2.0)
    assert reg.snapshot().state == "stopped"


async def test_a_closed_watcher_is_not_shown(registry: MemoryRegistry, running: list[Any]) -> None:
    """A closed watcher's last reads would hide, as the largest gauge, a live one's."""
    leases = [registry.put(InstanceHealth(inst(n)), ttl=60) for n in range(4)]
    closed = AsyncWatcher(registry.url, "orders", retry=FAST)
    live = Watcher(registry.url, "orders", retry=FAST)
    running.append(closed)
    try:
        assert await closed.wait_synced(5.0)
        assert await asyncio.to_thread(live.wait_synced, 5.0)
        collector = RegistryCollector(watchers=[closed, live])
        backend = live.stats().backends[0]
        labels = {"service": "orders", "backend": backend}
        assert samples(collector)[key("registry_agent_watch_instances", **labels)] == 4
        await closed.close()
        for n in (1, 2, 3):
            registry.delete("orders", f"o{n}", leases[n])
        await wait_until(lambda: len(live.snapshot()) == 1)
        got = samples(collector)
        assert got[key("registry_agent_watch_instances", **labels)] == 1
        assert got[key("registry_agent_watch_events_total", **labels, type="deleted")] == 3
        await asyncio.to_thread(live.close)
        assert not any(k[0] == "registry_agent_watch_instances" for k in samples(collector))
    finally:
        await asyncio.to_thread(live.close)


async def test_starlette_routes_serve_readiness_and_metrics(
    registry: MemoryRegistry, running: list[Any]
) -> None:
    """The README's recipe: a Route for /readyz, prometheus_client's ASGI app mounted."""
    from prometheus_client import make_asgi_app as metrics_app
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    reg = AsyncRegistrar(registry.url, inst(1), ttl=1.0, retry=FAST)
    running.append(reg)
    prom = CollectorRegistry()
    RegistryCollector([reg], registry=prom)
    app = Starlette(
        routes=[
            Route("/readyz", make_asgi_app([reg])),
            Mount("/metrics", app=metrics_app(prom)),
        ]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app", follow_redirects=True
    ) as client:
        assert (await client.get("/readyz")).status_code == 503  # not started yet
        await reg.start(wait_registered=5.0)
        await wait_until(lambda: reg.ready)
        response = await client.get("/readyz")
        assert (response.status_code, response.json()) == (200, {"ready": True})
        metrics = (await client.get("/metrics")).text
        assert 'registry_agent_ready{instance_id="o1",service="orders"} 1.0' in metrics
