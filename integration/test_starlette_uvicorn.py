"""registry_lifespan and the --workers launcher under a real uvicorn, on real Consul and etcd.

Each test starts uvicorn in a subprocess (free loopback port, stopped by PID, every
wait bounded) and watches it from outside with one clock: the registry, read in a
tight loop through a backend of our own, and the port, probed with a TCP connect.

* Startup: the entry appears only once the port accepts (the default check).
* SIGTERM with one 2 s request in flight: the entry is gone before the port
  refuses connections, and the request completes with 200; with ``drain_delay=1``
  the port stays open at least ~1 s after the entry is gone. The same app with
  ``handle_signals=False`` shows the order this fixes: withdrawn only at the
  lifespan's shutdown, after uvicorn has closed the port and drained.
* ``--workers 2`` (integration/uvicorn_launch.py): a worker killed with SIGKILL is
  replaced and the entry stays, without a gap (a watcher sees no event, a poll every
  few ms sees it passing throughout); SIGTERM to the supervisor withdraws it before
  the port closes, and the request in flight completes. Its instance is built
  without an address: the entry advertises 127.0.0.1, the host uvicorn binds (not
  the default route's address, where nothing listens).
* ``uvicorn app:app --workers 2`` with registry_lifespan in the app: each worker
  refuses at startup (a ConfigError naming integrations.uvicorn.run), uvicorn stops,
  and nothing was registered.
* An advertised address nothing listens on (127.0.0.2, uvicorn on 127.0.0.1): the
  entry never registers and one WARNING says why, naming both addresses.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from registry_agent import AsyncWatcher, HealthStatus, WatchEvent, open_backend
from registry_agent._backend import Backend
from registry_agent.testing.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
TTL = 3.0
SLOW = 2.0  # the request in flight at SIGTERM
# Bounds are generous (2 cores shared by many tests); the printed numbers are the point.
START_BOUND = 30.0
GONE_BOUND = 3.0  # SIGTERM -> entry gone: one deregistration on loopback
EXIT_BOUND = SLOW + 10.0

Measured = Callable[[str, float, float], None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Uvicorn:
    """One uvicorn (``uvicorn …`` or the --workers launcher) started for a test."""

    def __init__(
        self,
        workdir: Path,
        server: ServerProcess,
        mode: str,
        *,
        drain: float = 0.0,
        workers: int = 1,
        env_more: dict[str, str] | None = None,
    ) -> None:
        self.port = _free_port()
        self.service = f"uva-{uuid.uuid4().hex[:8]}"
        self.instance_id = f"{self.service}-1"
        if mode == "workers":  # the launcher's instance has no address and no id
            self.instance_id = f"{self.service}-127.0.0.1-{self.port}"
        self.log_path = workdir / f"{self.service}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "UVA_REGISTRY": server.url,
            "UVA_SERVICE": self.service,
            "UVA_PORT": str(self.port),
            "UVA_DRAIN": str(drain),
            "UVA_TTL": str(TTL),
            "UVA_MODE": "plain" if mode == "workers" else mode,
            **(env_more or {}),
        }
        if mode == "workers":
            command = [sys.executable, "-m", "integration.uvicorn_launch"]
        else:
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "integration.uvicorn_app:app",
                "--host=127.0.0.1",
                f"--port={self.port}",
                *([f"--workers={workers}"] if workers > 1 else []),
            ]
        #: Worker pids seen (a supervisor killed by the fixture leaves them to us).
        self.known_workers: list[int] = []
        self.launched = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def workers(self) -> list[int]:
        """The pids of the supervisor's worker processes (not its resource tracker)."""
        found = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child.pid)
            except psutil.Error:  # a dead worker not reaped yet (zombie)
                continue
        return sorted(found)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        # Workers of a supervisor killed here are orphans: ours, stopped by pid.
        for pid in self.known_workers:
            try:
                worker = psutil.Process(pid)
                if "spawn_main" in " ".join(worker.cmdline()):  # still ours, not a reused pid
                    worker.kill()
            except psutil.Error:
                pass


@pytest.fixture
def uvicorns(tmp_path: Path) -> Iterator[list[Uvicorn]]:
    started: list[Uvicorn] = []
    yield started
    for one in started:
        one.stop()


@dataclass
class Entry:
    """Reads our instance's entry in the registry through a backend of our own."""

    backend: Backend
    service: str
    instance_id: str

    async def address(self) -> str | None:
        """The address the entry advertises (None: no entry)."""
        snapshot = await self.backend.list(self.service)
        return next(
            (
                h.instance.address
                for h in snapshot.instances.values()
                if h.instance.id == self.instance_id
            ),
            None,
        )

    async def status(self) -> HealthStatus | None:
        snapshot = await self.backend.list(self.service)
        health = next(
            (h for h in snapshot.instances.values() if h.instance.id == self.instance_id), None
        )
        return None if health is None else health.status


@pytest.fixture
async def entry_of() -> Any:
    backends: list[Backend] = []

    def make(server: ServerProcess, app: Uvicorn) -> Entry:
        backend = open_backend(server.url)
        backends.append(backend)
        return Entry(backend, app.service, app.instance_id)

    yield make
    for backend in backends:
        await backend.close()


async def _wait_registered(app: Uvicorn, entry: Entry) -> tuple[float, float]:
    """Poll port and registry until the entry passes; (port first open, entry first
    seen), both from the launch. Each round probes the port before the registry."""
    port_at: float | None = None
    deadline = time.monotonic() + START_BOUND
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            pytest.fail(f"uvicorn ended ({app.process.returncode}):\n{app.log()}")
        is_open = _port_open(app.port)
        if is_open and port_at is None:
            port_at = time.monotonic()
        status = await entry.status()
        if status is not None:
            seen = time.monotonic()
            assert port_at is not None, f"registered ({status}) before the port accepted"
            if status is HealthStatus.PASSING:
                return port_at - app.launched, seen - app.launched
        await asyncio.sleep(0.01)
    pytest.fail(f"not registered within {START_BOUND}s:\n{app.log()}")


@dataclass
class Shutdown:
    """What the outside saw after SIGTERM, in seconds from the signal."""

    gone: float | None = None  # entry first seen absent
    closed: float | None = None  # port first seen refusing
    last_open: float | None = None  # port last seen accepting
    request_done: float | None = None
    request_status: int | None = None
    exited: float | None = None
    notes: list[str] = field(default_factory=list)


def _slow_request(app: Uvicorn, result: Shutdown, since: list[float]) -> threading.Thread:
    def call() -> None:
        status, _ = app.get(f"/slow?seconds={SLOW}", timeout=SLOW + 20)
        result.request_status = status
        result.request_done = time.monotonic() - since[0]

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def _wait_inflight(app: Uvicorn, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # With several workers, ask until the busy one answers.
        if app.get("/inflight")[1]["inflight"] >= count:
            return
        time.sleep(0.02)
    pytest.fail(f"the slow request never reached the app:\n{app.log()}")


async def _terminate_and_watch(app: Uvicorn, entry: Entry) -> Shutdown:
    """One 2 s request in flight, SIGTERM, then registry and port in a tight loop."""
    result = Shutdown()
    since = [0.0]
    requester = _slow_request(app, result, since)
    _wait_inflight(app, 1)
    since[0] = sent = time.monotonic()
    app.process.send_signal(signal.SIGTERM)
    deadline = sent + EXIT_BOUND
    while time.monotonic() < deadline:
        if result.gone is None and await entry.status() is None:
            result.gone = time.monotonic() - sent
        if _port_open(app.port):
            result.last_open = time.monotonic() - sent
        elif result.closed is None:
            result.closed = time.monotonic() - sent
        if result.gone is not None and result.closed is not None:
            break
        await asyncio.sleep(0.005)
    requester.join(SLOW + 20)
    try:
        app.process.wait(EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uvicorn did not exit within {EXIT_BOUND}s:\n{app.log()}")
    result.exited = time.monotonic() - sent
    assert result.gone is not None, f"entry still there after {EXIT_BOUND}s:\n{app.log()}"
    assert result.closed is not None, f"port still open after {EXIT_BOUND}s:\n{app.log()}"
    return result


def _show(label: str, result: Shutdown) -> None:
    print(
        f"\n{label}: after SIGTERM entry gone {result.gone:.3f}s, port last open "
        f"{result.last_open or 0:.3f}s, refused {result.closed:.3f}s; the request in flight "
        f"{result.request_status} at {result.request_done or 0:.3f}s; exited {result.exited:.3f}s"
    )


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_startup_registers_once_serving(
    server: ServerProcess,
    uvicorns: list[Uvicorn],
    entry_of: Any,
    measured: Measured,
    tmp_path: Path,
) -> None:
    app = Uvicorn(tmp_path, server, "lifespan")
    uvicorns.append(app)
    entry = entry_of(server, app)
    port_at, entry_at = await _wait_registered(app, entry)
    print(f"\nstartup ({server.name}): port accepts {port_at:.3f}s, entry passing {entry_at:.3f}s")
    measured("port open -> entry passing", entry_at - port_at, 10.0)
    assert entry_at >= port_at
    # The app's own lifespan ran first, and the registrar is app.state.registrar.
    status, body = app.get("/")
    for _ in range(50):  # the registry shows the entry a moment before the app reads its answer
        if body.get("registered") is True:
            break
        await asyncio.sleep(0.1)
        status, body = app.get("/")
    assert status == 200
    assert body["registered"] is True
    assert body["opened_at"] > 0


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
@pytest.mark.parametrize("drain", [0.0, 1.0])
async def test_sigterm_withdraws_before_the_port_closes(
    server: ServerProcess,
    drain: float,
    uvicorns: list[Uvicorn],
    entry_of: Any,
    measured: Measured,
    tmp_path: Path,
) -> None:
    app = Uvicorn(tmp_path, server, "lifespan", drain=drain)
    uvicorns.append(app)
    entry = entry_of(server, app)
    await _wait_registered(app, entry)
    result = await _terminate_and_watch(app, entry)
    _show(f"uvicorn drain_delay={drain} ({server.name})", result)
    assert result.gone is not None
    assert result.closed is not None
    assert result.gone <= result.closed, "the port closed while the entry was still there"
    assert result.last_open is not None
    if drain:  # without a drain delay the port may close within one probe of the entry going
        assert result.last_open >= result.gone
    assert result.request_status == 200, app.log()
    assert result.request_done is not None
    assert result.request_done >= result.gone
    measured(f"SIGTERM -> gone (drain {drain:g})", result.gone, GONE_BOUND)
    if drain:
        # The port keeps accepting for drain_delay after the entry is gone.
        assert result.closed - result.gone >= drain * 0.9, result
        measured("gone -> port closed", result.closed - result.gone, drain + GONE_BOUND)


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_without_the_signal_hook_the_entry_outlives_the_port(
    server: ServerProcess, uvicorns: list[Uvicorn], entry_of: Any, tmp_path: Path
) -> None:
    """The order the hook fixes: withdrawn at the lifespan's shutdown, which uvicorn
    runs after it has closed the port and drained the 2 s request."""
    app = Uvicorn(tmp_path, server, "nosignals")
    uvicorns.append(app)
    entry = entry_of(server, app)
    await _wait_registered(app, entry)
    result = await _terminate_and_watch(app, entry)
    _show(f"uvicorn handle_signals=False ({server.name})", result)
    assert result.gone is not None
    assert result.closed is not None
    assert result.closed < result.gone
    assert result.gone - result.closed >= SLOW * 0.5, result
    assert result.request_status == 200


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_workers_one_registration_kept_through_a_killed_worker(
    server: ServerProcess,
    uvicorns: list[Uvicorn],
    entry_of: Any,
    measured: Measured,
    tmp_path: Path,
) -> None:
    app = Uvicorn(tmp_path, server, "workers")
    uvicorns.append(app)
    entry = entry_of(server, app)
    await _wait_registered(app, entry)
    # Built without an address: the host uvicorn binds, not the default route's.
    assert await entry.address() == "127.0.0.1"
    for _ in range(int(START_BOUND / 0.05)):
        if len(workers := app.workers()) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(workers) == 2, app.log()
    app.known_workers = list(workers)

    events: list[WatchEvent] = []
    async with AsyncWatcher(server.url, app.service) as watcher:
        assert await watcher.wait_synced(10)

        async def collect() -> None:
            async for event in watcher:
                events.append(event)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0.3)  # the first snapshot's "added"
        killed = workers[0]
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()
        polls = 0
        replaced_at: float | None = None
        # Watch until the replacement serves, then three more check intervals.
        window_end = killed_at + START_BOUND
        while time.monotonic() < window_end:
            status = await entry.status()
            polls += 1
            after = time.monotonic() - killed_at
            assert status is HealthStatus.PASSING, f"entry {status} {after:.3f}s after the kill"
            now_workers = app.workers()
            if replaced_at is None and len(now_workers) == 2 and killed not in now_workers:
                replaced_at = time.monotonic()
                app.known_workers += now_workers
                window_end = replaced_at + 3.0
            await asyncio.sleep(0.01)
        collector.cancel()
    assert replaced_at is not None, f"no replacement worker:\n{app.log()}"
    kinds = [(e.type.value, e.instance.id) for e in events]
    assert kinds == [("added", app.instance_id)], kinds
    print(
        f"\nworkers ({server.name}): worker {killed} SIGKILLed, replaced after "
        f"{replaced_at - killed_at:.3f}s; entry passing in all {polls} polls; watcher saw {kinds}"
    )
    measured("worker killed -> replaced", replaced_at - killed_at, 15.0)
    # Both workers answer again.
    assert app.get("/")[0] == 200

    result = await _terminate_and_watch(app, entry)
    _show(f"uvicorn --workers 2 ({server.name})", result)
    assert result.gone is not None
    assert result.closed is not None
    assert result.gone <= result.closed
    assert result.last_open is not None
    assert result.last_open >= result.gone
    assert result.request_status == 200, app.log()
    measured("workers: SIGTERM -> gone", result.gone, GONE_BOUND)


@pytest.mark.parametrize("server", ["consul"], indirect=True)
async def test_registry_lifespan_refuses_uvicorn_workers(
    server: ServerProcess, uvicorns: list[Uvicorn], entry_of: Any, tmp_path: Path
) -> None:
    """``uvicorn app:app --workers 2`` with registry_lifespan: every worker would
    register the same id and the first to stop would remove it for all."""
    app = Uvicorn(tmp_path, server, "lifespan", workers=2)
    uvicorns.append(app)
    entry = entry_of(server, app)
    deadline = time.monotonic() + START_BOUND
    seen: HealthStatus | None = None
    while app.process.poll() is None and time.monotonic() < deadline:
        seen = seen or await entry.status()
        await asyncio.sleep(0.05)
    exited = time.monotonic() - app.launched
    assert app.process.poll() is not None, f"uvicorn still running:\n{app.log()}"
    log = app.log()
    assert "ConfigError: workers: registry_lifespan cannot run in a worker" in log, log
    assert "registry_agent.integrations.uvicorn.run" in log
    assert "failed to start, stopping the parent process" in log
    assert seen is None
    assert await entry.status() is None
    print(f"\nuvicorn --workers 2 with registry_lifespan: refused, exited after {exited:.3f}s")


@pytest.mark.parametrize("server", ["consul"], indirect=True)
async def test_unreachable_advertised_address_warns(
    server: ServerProcess, uvicorns: list[Uvicorn], entry_of: Any, tmp_path: Path
) -> None:
    """The default check probes the advertised address: nothing listens on 127.0.0.2
    (uvicorn binds 127.0.0.1), so the entry never registers, and one WARNING says why."""
    warn_after = 2.0
    app = Uvicorn(
        tmp_path,
        server,
        "lifespan",
        env_more={"UVA_ADDRESS": "127.0.0.2", "UVA_WARN_AFTER": str(warn_after)},
    )
    uvicorns.append(app)
    entry = entry_of(server, app)
    wanted = "is not registered after 2s: its checks fail"
    deadline = time.monotonic() + START_BOUND
    while wanted not in app.log() and time.monotonic() < deadline:
        assert app.process.poll() is None, app.log()
        assert await entry.status() is None, "registered an address nothing listens on"
        await asyncio.sleep(0.1)
    log = app.log()
    assert wanted in log, log
    line = next(line for line in log.splitlines() if wanted in line)
    assert f"127.0.0.2:{app.port} is not reachable" in line, line
    assert f"uvicorn listens on 127.0.0.1:{app.port}" in line, line
    await asyncio.sleep(1.0)
    assert app.log().count(wanted) == 1
    assert app.get("/")[0] == 200
    assert await entry.status() is None
