"""Registrars inside a real gunicorn (``--preload -w 2``), on real Consul and etcd.

Two patterns, each run by a gunicorn master this test starts (free loopback
port, stopped by PID, every wait bounded), with hooks that append JSON lines
(``post_fork``, ``worker_exit`` in the worker, ``child_exit`` in the master,
each with a ``time.monotonic()`` stamp, one clock for all processes):

* the mistake users make: a blocking ``Registrar`` created and started at
  import of the app module (``integration/gunicorn_app/preloaded.py``). With
  ``--preload`` it lives in the master and crosses fork() into every worker;
  its atexit hook runs in each worker as it exits and must return at once
  (it used to wait ~12 s on a loop thread that does not exist there). The
  master's entry stays passing while workers recycle (``max_requests``), and
  the master's SIGTERM deregisters it.
* the recommended pattern: a ``Registrar`` per worker, created and started in
  ``post_fork`` under an id carrying the worker's pid, stopped in
  ``worker_exit`` (``integration/gunicorn_app/conf_per_worker.py``): a
  recycled worker's entry is gone by the time the master has reaped it.

etcd: gRPC is not fork-safe while its streams run; gunicorn gets
``GRPC_ENABLE_FORK_SUPPORT=1`` and ``GRPC_POLL_STRATEGY=poll`` (see also
``test_fork.py``), as any gunicorn whose master runs etcd clients needs.
Measured with this file: without them, 7 runs of 10 of the preloaded case had a
worker die of SIGSEGV at birth (caught here: a worker reaped without its exit
hook); with them, none in 20. The per-worker case (no gRPC running in the
master) passed 10 of 10 either way.
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
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.registry_view import registry_health
from registry_agent import HealthStatus
from registry_agent.testing.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = Path(__file__).resolve().parent / "gunicorn_app"
TTL = 3.0
WORKERS = 2
MAX_REQUESTS = 5
# A worker's exit, from its worker_exit hook to the master reaping it: ~0.1-0.4 s, and the
# hang this guards against was 12 s; 2 s leaves room for a loaded 2-core CI machine.
CHILD_EXIT_BOUND = 2.0
# The recommended pattern's worker deregisters first: one DELETE/revoke on loopback.
DEREGISTER_BOUND = 2.0
# Long enough that a worker hanging ~12 s in its exit shows as such (gunicorn
# would SIGKILL it after this and hide the hang).
GRACEFUL_TIMEOUT = 30
# gunicorn's stop polls its workers every 0.1 s; the master then deregisters.
MASTER_EXIT_BOUND = CHILD_EXIT_BOUND + 0.1 + DEREGISTER_BOUND
GRPC_FORK_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "1", "GRPC_POLL_STRATEGY": "poll"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gunicorn:
    """One gunicorn master (and its workers) started for a test."""

    def __init__(self, workdir: Path, server: ServerProcess, app: str, conf: str) -> None:
        self.port = _free_port()
        self.service = f"guni-{uuid.uuid4().hex[:8]}"
        self.events_path = workdir / f"{self.service}.events"
        self.log_path = workdir / f"{self.service}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GUNI_REGISTRY": server.url,
            "GUNI_SERVICE": self.service,
            "GUNI_PORT": str(self.port),
            "GUNI_EVENTS": str(self.events_path),
            "GUNI_TTL": str(TTL),
            **(GRPC_FORK_ENV if server.name == "etcd" else {}),
        }
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            f"--workers={WORKERS}",
            f"--bind=127.0.0.1:{self.port}",
            f"--max-requests={MAX_REQUESTS}",
            f"--graceful-timeout={GRACEFUL_TIMEOUT}",
            f"--config={APP_DIR / conf}",
            "--no-control-socket",  # else one shared socket under ~/.gunicorn for all tests
            f"integration.gunicorn_app.{app}:app",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in events if kind is None or e["event"] == kind]

    def wait_events(self, kind: str, count: int, within: float) -> list[dict[str, Any]]:
        """At least ``count`` events of ``kind``, waiting at most ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if len(found := self.events(kind)) >= count:
                return found
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn ended ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"{count} {kind} events not seen within {within}s:\n{self.log()}")

    def get(self) -> int | None:
        """One request; the pid of the worker that served it (None if not served)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200
            pid: int = json.loads(response.read())["pid"]
            return pid
        except (ConnectionError, http.client.RemoteDisconnected, TimeoutError):
            # A worker recycling as the connection came, or none free to answer
            # (workers hanging in their exit): the test retries, then measures.
            return None
        finally:
            connection.close()

    def recycle(self, exits: int, within: float = 60.0) -> int:
        """Send requests until ``exits`` workers have been reaped (max_requests); how many sent."""
        deadline = time.monotonic() + within
        sent = 0
        while len(self.events("child_exit")) < exits:
            assert time.monotonic() < deadline, f"only {self.events('child_exit')}:\n{self.log()}"
            assert sent < 40 * exits, f"{sent} requests, {self.events('child_exit')}"
            self.get()
            sent += 1
        return sent

    def terminate(self, within: float = GRACEFUL_TIMEOUT + 10) -> float:
        """SIGTERM to the master; seconds until the whole gunicorn has exited."""
        signalled = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(within)
        return time.monotonic() - signalled

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the master only, by PID: its workers notice and exit
            self.process.wait(10)


@pytest.fixture
def gunicorns(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(server: ServerProcess, app: str, conf: str) -> Gunicorn:
        started.append(Gunicorn(tmp_path, server, app, conf))
        return started[-1]

    yield start
    for gunicorn in started:
        gunicorn.close()


def _exit_times(gunicorn: Gunicorn) -> dict[int, float]:
    """Per reaped worker: seconds from its worker_exit hook to the master reaping it."""
    began = {e["worker"]: e["t"] for e in gunicorn.events("worker_exit")}
    reaped = {e["worker"]: e["t"] for e in gunicorn.events("child_exit")}
    assert set(reaped) <= set(began), f"a worker died without its exit hook: {gunicorn.log()}"
    return {pid: reaped[pid] - began[pid] for pid in reaped}


async def test_registrar_started_at_import_with_preload(
    server: ServerProcess,
    gunicorns: Callable[..., Gunicorn],
    measured: Callable[[str, float, float], None],
) -> None:
    gunicorn = gunicorns(server, "preloaded", "conf_events.py")
    registered = gunicorn.wait_events("registered", 1, within=30)
    master_id = registered[0]["id"]
    assert registered[0]["master"] == gunicorn.process.pid  # it lives in the master
    gunicorn.wait_events("post_fork", WORKERS, within=30)
    assert await registry_health(server.url, gunicorn.service) == {master_id: HealthStatus.PASSING}

    # Workers recycle (max_requests), one after another over more than a TTL: each
    # exit runs the inherited atexit hook; the master's entry stays passing throughout.
    first_workers = {e["worker"] for e in gunicorn.events("post_fork")}
    began = time.monotonic()
    sent = 0
    for exits in range(1, 2 * WORKERS + 1):
        sent += gunicorn.recycle(exits)
        assert await registry_health(server.url, gunicorn.service) == {
            master_id: HealthStatus.PASSING
        }
        await asyncio.sleep(TTL / 2)
    assert time.monotonic() - began > TTL  # the master heartbeated meanwhile
    recycled = _exit_times(gunicorn)
    assert len(recycled) >= 2 * WORKERS, recycled
    assert first_workers <= set(recycled)
    measured(f"worker exit x{len(recycled)} (max)", max(recycled.values()), CHILD_EXIT_BOUND)
    print(f"{sent} requests recycled {len(recycled)} workers")
    assert await registry_health(server.url, gunicorn.service) == {master_id: HealthStatus.PASSING}

    # SIGTERM to the master: its workers exit at once, then it deregisters and exits.
    alive = {e["worker"] for e in gunicorn.events("post_fork")} - set(recycled)
    took = gunicorn.terminate()
    assert gunicorn.process.returncode == 0, gunicorn.log()
    on_stop = {pid: t for pid, t in _exit_times(gunicorn).items() if pid in alive}
    assert set(on_stop) == alive, gunicorn.log()
    measured("worker exit on SIGTERM (max)", max(on_stop.values()), CHILD_EXIT_BOUND)
    measured("gunicorn exit on SIGTERM", took, MASTER_EXIT_BOUND)
    assert await registry_health(server.url, gunicorn.service) == {}  # deregistered by the master

    log = gunicorn.log()
    assert "Traceback" not in log, log
    warnings = [line for line in log.splitlines() if "crossed fork()" in line]
    # One per worker (its atexit stop()), as a warning, naming the registrar.
    assert len(warnings) == len(gunicorn.events("worker_exit")), log
    assert all(line.startswith("WARNING registry_agent") for line in warnings), warnings
    assert all(master_id in line for line in warnings), warnings


async def test_registrar_per_worker_started_in_post_fork(
    server: ServerProcess,
    gunicorns: Callable[..., Gunicorn],
    measured: Callable[[str, float, float], None],
) -> None:
    gunicorn = gunicorns(server, "per_worker", "conf_per_worker.py")
    first = gunicorn.wait_events("registered", WORKERS, within=30)
    ids = {e["id"] for e in first}
    assert len(ids) == WORKERS  # one entry per worker
    assert await registry_health(server.url, gunicorn.service) == dict.fromkeys(
        ids, HealthStatus.PASSING
    )

    # Each of the first workers recycles (max_requests): its entry goes with it.
    gunicorn.recycle(exits=WORKERS)
    gone = {e["worker"] for e in gunicorn.events("child_exit")}
    held = await registry_health(server.url, gunicorn.service)
    assert not {f"{gunicorn.service}-{pid}" for pid in gone} & set(held), held
    stops = {e["worker"]: e["took"] for e in gunicorn.events("deregistered")}
    assert set(stops) >= gone
    measured("worker stop() (max)", max(stops.values()), DEREGISTER_BOUND)
    exits = _exit_times(gunicorn)
    measured("worker exit incl. stop (max)", max(exits.values()), DEREGISTER_BOUND)

    # The replacements register; the registry holds exactly the live workers.
    gunicorn.wait_events("registered", WORKERS + len(gone), within=30)
    # More may have recycled meanwhile: a worker is gone once its exit hook deregistered
    # it, even before the master has reaped it.
    gone = {e["worker"] for e in gunicorn.events("child_exit")}
    gone |= {e["worker"] for e in gunicorn.events("deregistered")}
    want = {e["id"] for e in gunicorn.events("registered") if e["worker"] not in gone}
    assert await registry_health(server.url, gunicorn.service) == dict.fromkeys(
        want, HealthStatus.PASSING
    )

    # A worker still in post_fork ignores SIGTERM (gunicorn installs the worker's signal
    # handlers only after post_fork returns) and is killed at graceful_timeout: let every
    # worker that recycling just started finish registering first.
    deadline = time.monotonic() + 30
    while True:
        gone = {e["worker"] for e in gunicorn.events("child_exit")}
        gone |= {e["worker"] for e in gunicorn.events("deregistered")}
        forked = {e["worker"] for e in gunicorn.events("post_fork")} - gone
        if forked <= {e["worker"] for e in gunicorn.events("registered")}:
            break
        assert time.monotonic() < deadline, gunicorn.log()
        await asyncio.sleep(0.05)
    alive = forked
    took = gunicorn.terminate()
    assert gunicorn.process.returncode == 0, gunicorn.log()
    on_stop = {pid: t for pid, t in _exit_times(gunicorn).items() if pid in alive}
    assert set(on_stop) == alive, gunicorn.log()
    measured("worker exit on SIGTERM (max)", max(on_stop.values()), DEREGISTER_BOUND)
    measured("gunicorn exit on SIGTERM", took, MASTER_EXIT_BOUND)
    assert await registry_health(server.url, gunicorn.service) == {}  # every worker deregistered
    log = gunicorn.log()
    assert "Traceback" not in log, log
    assert "crossed fork()" not in log, log
