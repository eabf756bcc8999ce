"""A started blocking Registrar/Watcher the app drops keeps running: it stays held (and so
shown by RegistryCollector) until stop()/close(), and the exit hook stops it.

Memory backend: what is tested is the facades' lifetime, not a registry's behaviour.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from registry_agent import Registrar, RegistryCollector, ServiceInstance, Watcher, _blocking
from registry_agent.testing.memory import MemoryRegistry


def until(condition: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def scrape(collector: RegistryCollector) -> str:
    prom = CollectorRegistry()
    prom.register(collector)
    return generate_latest(prom).decode()


def held(kind: type, match: Callable[[object], bool]) -> list[object]:
    return [f for f in list(_blocking._running) if isinstance(f, kind) and match(f)]


def test_a_dropped_registrar_stays_held_shown_and_registered_until_stopped() -> None:
    registry = MemoryRegistry.named(f"life-{uuid.uuid4().hex}")
    instance = ServiceInstance("life", address="127.0.0.1", port=45000, id="life-1")
    collector = RegistryCollector()
    collector.add(Registrar(registry.url, instance, ttl=2).start(wait_registered=5))
    gc.collect()
    time.sleep(0.2)
    gc.collect()
    text = scrape(collector)
    assert 'registry_agent_registered{instance_id="life-1",service="life"} 1.0' in text
    assert "life-1" in registry.snapshot("life").instances
    [registrar] = held(Registrar, lambda f: f.instance.id == "life-1")  # type: ignore[attr-defined]
    assert isinstance(registrar, Registrar)
    registrar.stop()
    assert registrar not in _blocking._running  # released by stop()
    assert "life-1" not in registry.snapshot("life").instances
    del registrar
    gc.collect()
    assert "life-1" not in scrape(collector)  # no longer held by anyone: gone


def test_a_dropped_watcher_stays_held_and_shown_until_closed() -> None:
    registry = MemoryRegistry.named(f"life-{uuid.uuid4().hex}")
    instance = ServiceInstance("lifew", address="127.0.0.1", port=45001, id="lifew-1")
    with Registrar(registry.url, instance, ttl=2) as registrar:
        assert registrar.wait_registered(5)
        collector = RegistryCollector()
        watcher = Watcher(registry.url, "lifew").start()
        assert watcher.wait_synced(5)
        collector.add(watcher)
        del watcher
        gc.collect()
        assert 'registry_agent_watch_instances{backend="' in scrape(collector)
        [kept] = held(Watcher, lambda f: f.services == ("lifew",))  # type: ignore[attr-defined]
        assert isinstance(kept, Watcher)
        assert len(kept.snapshot()) == 1
        kept.close()
        assert kept not in _blocking._running
        del kept
        gc.collect()
        assert "registry_agent_watch_instances{" not in scrape(collector)
    assert registrar not in _blocking._running


def test_a_never_started_or_failed_facade_is_not_held() -> None:
    before = len(_blocking._running)
    Registrar("memory://never", ServiceInstance("n", address="127.0.0.1", port=1))
    Watcher("memory://never", "n")
    assert len(_blocking._running) == before


EXIT_SCRIPT = """
import atexit, uuid

# Registered before registry_agent is imported (and its exit hook with it), so it runs
# after that hook (atexit is LIFO).
atexit.register(lambda: print("at exit held:", "exit-1" in registry.snapshot("exit").instances))

from registry_agent import Registrar, ServiceInstance, Watcher
from registry_agent.testing.memory import MemoryRegistry

registry = MemoryRegistry.named(f"exit-{uuid.uuid4().hex}")

Registrar(
    registry.url, ServiceInstance("exit", address="127.0.0.1", port=45002, id="exit-1")
).start(wait_registered=5)
Watcher(registry.url, "exit").start().wait_synced(5)
print("running held:", "exit-1" in registry.snapshot("exit").instances)
"""


def test_interpreter_exit_stops_a_dropped_registrar_and_watcher() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["running held: True", "at exit held: False"], (
        done.stdout,
        done.stderr,
    )
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_the_exit_hook_in_a_forked_child_leaves_the_parents_registrar_alone() -> None:
    registry = MemoryRegistry.named(f"life-{uuid.uuid4().hex}")
    instance = ServiceInstance("lifef", address="127.0.0.1", port=45003, id="lifef-1")
    registrar = Registrar(registry.url, instance, ttl=2).start(wait_registered=5)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the exit hook, report what it logged
            code = 1
            try:
                warnings: list[logging.LogRecord] = []
                handler = logging.Handler(logging.WARNING)
                handler.emit = warnings.append  # type: ignore[method-assign,assignment]
                logging.getLogger("registry_agent").addHandler(handler)
                _blocking._stop_running()
                os.write(write, f"{len(warnings)} {len(_blocking._running)}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        answer = os.read(read, 100).decode()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer == "0 0"  # no warning, nothing left to stop
        assert registrar.registered  # the parent's registration is untouched
        assert registrar in _blocking._running
    finally:
        registrar.stop()
