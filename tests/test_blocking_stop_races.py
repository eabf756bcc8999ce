"""Blocking Registrar.stop() racing itself: a second caller (another thread, the signal
handler, the exit hook) waits for the stop the first one is making; stop() from the
registrar's own loop thread (an on_event callback) still deregisters; the exit hook stops
every registrar at once, not one after another.

What is tested is the facade's threading: the registry is the in-memory one, its
deregistration made slow by a test backend (real registries that stall: see
integration/test_registrar_lifetime_real.py).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from registry_agent import Registrar, RegistrarEvent, ServiceInstance, _blocking
from registry_agent._backend import Lease
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

SLOW = 1.0  # how long the slow backend takes to deregister


class SlowDeregister(MemoryBackend):
    """The in-memory registry, deregistering after ``SLOW`` seconds."""

    async def deregister(self, lease: Lease) -> None:
        await asyncio.sleep(SLOW)
        await super().deregister(lease)


def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"races-{uuid.uuid4().hex}")


def held_by(registry: MemoryRegistry, service: str) -> list[str]:
    return list(registry.snapshot(service).instances)


def test_a_second_stop_waits_for_the_one_in_progress() -> None:
    reg = registry()
    instance = ServiceInstance("race", address="127.0.0.1", port=46000, id="race-1")
    registrar = Registrar(SlowDeregister(reg), instance, ttl=30).start(wait_registered=5)
    first = threading.Thread(target=registrar.stop, name="first-stopper")
    first.start()
    time.sleep(0.2)  # the first stop is deregistering now
    assert registrar in _blocking._running  # held until that stop has ended
    began = time.monotonic()
    registrar.stop()
    waited = time.monotonic() - began
    assert held_by(reg, "race") == []  # returned only once deregistered
    assert registrar.state == "stopped"
    assert registrar not in _blocking._running
    assert SLOW - 0.5 < waited < SLOW + 5.0
    first.join(10)
    assert not first.is_alive()


def test_stop_from_the_registrars_own_callback_deregisters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = registry()
    instance = ServiceInstance("cb", address="127.0.0.1", port=46001, id="cb-1")
    returned: list[float] = []
    holder: dict[str, Registrar] = {}

    def on_event(event: RegistrarEvent) -> None:
        if event.kind == "registered" and not returned:
            began = time.monotonic()
            holder["r"].stop()
            returned.append(time.monotonic() - began)

    holder["r"] = registrar = Registrar(reg.url, instance, ttl=30, on_event=on_event)
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        registrar.start()
        deadline = time.monotonic() + 10
        while registrar.state != "stopped" or registrar in _blocking._running:
            assert time.monotonic() < deadline, registrar.status()
            time.sleep(0.02)
    assert len(returned) == 1
    assert returned[0] < 0.5  # returned at once, the stop ran on
    assert held_by(reg, "cb") == []
    assert not registrar._thread._thread or not registrar._thread._thread.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    registrar.stop()  # a later stop: already done, returns at once


def test_the_exit_hook_stops_every_registrar_at_once() -> None:
    reg = registry()
    count = 8
    registrars = [
        Registrar(
            SlowDeregister(reg),
            ServiceInstance("hook", address="127.0.0.1", port=46100 + i, id=f"hook-{i}"),
            ttl=30,
        ).start(wait_registered=5)
        for i in range(count)
    ]
    assert len(held_by(reg, "hook")) == count
    began = time.monotonic()
    _blocking._stop_running()
    took = time.monotonic() - began
    assert held_by(reg, "hook") == []
    assert all(r.state == "stopped" for r in registrars)
    assert took < SLOW * count / 2  # one after another: count * SLOW at least


SIGNAL_SCRIPT = """
import asyncio, os, signal, threading, time
from registry_agent import Registrar, ServiceInstance
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

class SlowDeregister(MemoryBackend):
    async def deregister(self, lease):
        await asyncio.sleep(1.0)
        await super().deregister(lease)

registry = MemoryRegistry.named("sig")
chained = []
def previous(signum, frame):
    chained.append(list(registry.snapshot("sig").instances))
signal.signal(signal.SIGTERM, previous)

registrar = Registrar(
    SlowDeregister(registry),
    ServiceInstance("sig", address="127.0.0.1", port=46200, id="sig-1"),
    ttl=30,
    install_signal_handlers=True,
).start(wait_registered=5)
threading.Thread(target=registrar.stop, name="app-shutdown").start()
time.sleep(0.2)  # that stop is deregistering now
os.kill(os.getpid(), signal.SIGTERM)
print("chained after deregistration:", chained == [[]])
print("previous handler back:", signal.getsignal(signal.SIGTERM) is previous)
"""


def test_sigterm_during_a_stop_on_another_thread_waits_then_chains() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGNAL_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "chained after deregistration: True",
        "previous handler back: True",
    ], (done.stdout, done.stderr)
