"""On real Consul and etcd: a registrar shows ``starting`` until a registry has taken its
entry, and a started blocking Registrar the app dropped stays registered, shown by the
collector and stoppable (held by registry_agent until stop())."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from integration.registry_view import registry_health
from registry_agent import (
    Registrar,
    RegistrarEvent,
    RegistryCollector,
    ServiceInstance,
    _blocking,
)
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


SIGTERM_RACE = """
import os, signal, sys, threading, time
from registry_agent import Registrar, ServiceInstance

registrar = Registrar(
    sys.argv[1],
    ServiceInstance(sys.argv[2], address="127.0.0.1", port=45010, id="s1"),
    install_signal_handlers=True,
).start(wait_registered=15)
print("registered", flush=True)
sys.stdin.readline()  # the registry is frozen now
threading.Thread(target=registrar.stop, name="app-shutdown").start()
time.sleep(0.3)  # that stop is deregistering, against the frozen registry
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("SIGTERM did not end the process", flush=True)
"""


def test_sigterm_during_a_stop_on_another_thread_ends_only_after_it(
    server: ServerProcess,
) -> None:
    service = f"sr-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_RACE, server.url, service],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "registered\n"
        assert "s1" in asyncio.run(registry_health(server.url, service))
        server.pause()
        resume = threading.Timer(1.5, server.resume)
        resume.start()
        began = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=30)
        took = time.monotonic() - began
        resume.join()
    finally:
        server.resume()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGTERM, err  # the signal took its course...
    assert took > 1.2, err  # ...once the registry answered again (resumed at 1.5 s)
    assert "s1" not in asyncio.run(registry_health(server.url, service)), err


def test_stop_from_the_registrars_own_callback_deregisters(server: ServerProcess) -> None:
    service = f"cb-{uuid.uuid4().hex[:8]}"
    holder: dict[str, Registrar] = {}
    seen: list[str] = []

    def on_event(event: RegistrarEvent) -> None:
        seen.append(event.kind)
        if event.kind == "registered" and seen.count("registered") == 1:
            holder["r"].stop()  # on the registrar's own loop thread

    registrar = Registrar(
        server.url,
        ServiceInstance(service, address="127.0.0.1", port=45011, id="c1"),
        on_event=on_event,
    )
    holder["r"] = registrar
    registrar.start()
    deadline = time.monotonic() + 15
    while registrar in _blocking._running or registrar.state != "stopped":
        assert time.monotonic() < deadline, (seen, registrar.status())
        time.sleep(0.05)
    assert "deregistered" in seen, seen
    assert "c1" not in asyncio.run(registry_health(server.url, service))


def test_the_exit_hook_stops_registrars_at_once_on_a_frozen_registry(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop_timeout, count = 1.0, 6
    monkeypatch.setattr(_blocking, "_EXIT_STOP", stop_timeout, raising=False)
    service = f"fz-{uuid.uuid4().hex[:8]}"
    registrars = [
        Registrar(
            server.url,
            ServiceInstance(service, address="127.0.0.1", port=45020 + i, id=f"z{i}"),
            ttl=30,
        ).start(wait_registered=15)
        for i in range(count)
    ]
    server.pause()
    try:
        began = time.monotonic()
        _blocking._stop_running()
        took = time.monotonic() - began
    finally:
        server.resume()
    assert all(r.state == "stopped" for r in registrars)
    assert not any(r in _blocking._running for r in registrars)
    # one after another: count * stop_timeout at least
    assert took < stop_timeout + 3.0 < count * stop_timeout


SIGTERM_WHILE_STARTING = """
import sys
from registry_agent import Registrar, RetryPolicy, ServiceInstance

registrar = Registrar(
    [sys.argv[1], sys.argv[3]],  # the second registry never answers
    ServiceInstance(sys.argv[2], address="127.0.0.1", port=45011, id="s1"),
    install_signal_handlers=True,
    retry=RetryPolicy(initial=0.1, cap=0.5),
)
print("starting", flush=True)
registrar.start(wait_registered=30)
print("start() returned", flush=True)
"""


def test_sigterm_while_start_waits_for_another_registry_deregisters(
    server: ServerProcess,
) -> None:
    # A break-it run: one registry took the entry while start(wait_registered) still
    # waited for the other; a SIGTERM then killed the process (the handlers came only
    # after start() returned) and the entry stayed, passing.
    service = f"ss-{uuid.uuid4().hex[:8]}"
    silent = f"{server.url.split('://')[0]}://127.0.0.1:{free_port()}"
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_WHILE_STARTING, server.url, service, silent],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "starting\n"
        deadline = time.monotonic() + 15
        while "s1" not in asyncio.run(registry_health(server.url, service)):
            assert time.monotonic() < deadline, "the reachable registry never took the entry"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGTERM, err  # the signal took its course...
    assert "start() returned" not in out
    assert "s1" not in asyncio.run(registry_health(server.url, service)), err  # ...after this
