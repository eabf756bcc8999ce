"""On real Consul and etcd: a registrar shows ``starting`` until a registry has taken its
entry, and a started blocking Registrar the app dropped stays registered, shown by the
collector and stoppable (held by registry_agent until stop())."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid

from prometheus_client import CollectorRegistry, generate_latest

from integration.registry_view import registry_health
from registry_agent import Registrar, RegistryCollector, ServiceInstance, _blocking
from registry_agent._retry import RetryPolicy
from registry_agent.readiness import readiness
from registry_agent.testing.servers import ServerProcess, free_port

FAST = RetryPolicy(initial=0.05, cap=0.2)


def scrape(collector: RegistryCollector) -> str:
    prom = CollectorRegistry()
    prom.register(collector)
    return generate_latest(prom).decode()


def state_line(service: str, instance: str, state: str) -> str:
    return (
        f'registry_agent_service_state{{instance_id="{instance}",service="{service}",'
        f'state="{state}"}} 1.0'
    )


def test_starting_until_a_registry_took_the_entry(server: ServerProcess) -> None:
    service = f"st-{uuid.uuid4().hex[:8]}"
    scheme = server.url.split(":", 1)[0]
    nowhere = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens: every write fails
    never = Registrar(server.url, ServiceInstance(service, address="127.0.0.1", port=1, id="n1"))
    failing = Registrar(
        nowhere, ServiceInstance(service, address="127.0.0.1", port=2, id="f1"), retry=FAST
    )
    good = Registrar(server.url, ServiceInstance(service, address="127.0.0.1", port=3, id="g1"))
    collector = RegistryCollector([never, failing, good])
    try:
        failing.start()
        deadline = time.monotonic() + 10
        while failing.snapshot().counters["errors"] < 2:
            assert time.monotonic() < deadline, failing.snapshot()
            time.sleep(0.05)
        good.start(wait_registered=15)
        text = scrape(collector)
        assert state_line(service, "n1", "starting") in text  # never started
        assert state_line(service, "f1", "starting") in text  # started, never written
        assert state_line(service, "g1", "registered") in text
        code, body = readiness([never, failing])
        assert code == 503
        assert {k: v["state"] for k, v in body["not_ready"].items()} == {
            f"{service}/n1": "starting",
            f"{service}/f1": "starting",
        }
    finally:
        failing.stop(2)
        good.stop()
    assert good.snapshot().state == "stopped"


def test_a_dropped_registrar_stays_registered_shown_and_stoppable(server: ServerProcess) -> None:
    service = f"dr-{uuid.uuid4().hex[:8]}"
    collector = RegistryCollector()
    collector.add(
        Registrar(
            server.url, ServiceInstance(service, address="127.0.0.1", port=45000, id="d1")
        ).start(wait_registered=15)
    )
    gc.collect()
    time.sleep(0.5)
    gc.collect()
    assert state_line(service, "d1", "registered") in scrape(collector)
    assert "d1" in asyncio.run(registry_health(server.url, service))
    [registrar] = [
        f
        for f in list(_blocking._running)
        if isinstance(f, Registrar) and f.instance.id == "d1" and f.instance.service == service
    ]
    registrar.stop()
    assert registrar not in _blocking._running
    assert "d1" not in asyncio.run(registry_health(server.url, service))
