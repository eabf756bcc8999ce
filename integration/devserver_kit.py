"""Run a framework's own server (flask run, manage.py runserver) and watch it from outside.

Shared by test_flask_server.py and test_django_server.py: the server runs in a
session of its own on a free loopback port, its output goes to a file, it is
stopped by PID (its process group) whatever happens, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from registry_agent import HealthStatus, ServiceInstance, open_backend

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """True when 127.0.0.1:``port`` accepts a connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def entries(url: str, service: str) -> dict[str, tuple[ServiceInstance, HealthStatus]]:
    """What the registry at ``url`` holds for ``service``: id -> (instance, health)."""
    backend = open_backend(url)
    try:
        snapshot = await backend.list(service)
    finally:
        await backend.close()
    return {h.instance.id: (h.instance, h.status) for h in snapshot.instances.values()}


class ServerRun:
    """One server process started for a test, in a session of its own."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path = ROOT
    ) -> None:
        self.log = log
        self._out = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")

    def pids_that_registered(self) -> list[int]:
        """PIDs of the processes that logged starting a registration (the app logs its pid)."""
        return [int(p) for p in re.findall(r"pid=(\d+) \S+ INFO registering ", self.output())]

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (a reloader and its child)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit status, waiting at most ``timeout`` seconds."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill what is left of the process group (by the PID we started) and reap it."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            else:  # the leader is gone; a reloader child may remain in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            self._out.close()


async def wait_registered(
    run: ServerRun, url: str, service: str, bound: float
) -> tuple[float, dict[str, tuple[ServiceInstance, HealthStatus]]]:
    """Seconds from the start until ``service`` is passing in the registry, and its entries."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        found = await entries(url, service)
        if any(status is HealthStatus.PASSING for _, status in found.values()):
            return time.monotonic() - run.started, found
        if run.proc.poll() is not None:
            raise AssertionError(f"server exited {run.proc.returncode}:\n{run.output()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"not registered within {bound}s:\n{run.output()}")


@dataclass
class Slow:
    """A request held in flight, made from a thread."""

    port: int
    seconds: float
    status: int = 0
    body: bytes = b""
    error: str = ""

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._get, daemon=True)
        self.thread.start()

    def _get(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.seconds + 30)
            conn.request("GET", f"/slow?s={self.seconds}")
            response = conn.getresponse()
            self.status, self.body = response.status, response.read()
            conn.close()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


@dataclass
class Shutdown:
    """Seconds after the signal: entry gone (read finished), port refused (connect started)."""

    gone: float
    closed: float


async def observe_shutdown(
    run: ServerRun, url: str, service: str, port: int, sig: int, bound: float, *, group: bool
) -> Shutdown:
    """Send ``sig``; then watch the registry and the port until both are gone."""
    sent = time.monotonic()
    if group:
        run.signal_group(sig)
    else:
        run.proc.send_signal(sig)
    gone = closed = None
    while time.monotonic() - sent < bound and (gone is None or closed is None):
        if gone is None and not await entries(url, service):
            gone = time.monotonic() - sent
        if closed is None:
            began = time.monotonic() - sent
            if not await asyncio.to_thread(port_open, port):
                closed = began
        await asyncio.sleep(0.01)
    assert gone is not None, f"still registered {bound}s after the signal:\n{run.output()}"
    assert closed is not None, f"port still open {bound}s after the signal:\n{run.output()}"
    return Shutdown(gone, closed)
