"""The gunicorn hooks (``registry_agent.integrations.gunicorn``): real gunicorn, real registries.

A gunicorn master this test starts (``--workers 2``, two ``--bind`` addresses,
``--max-requests 5``; free loopback ports; stopped by PID; every wait bounded)
imports the library's hooks in its config
(``integration/gunicorn_registration_app.py``). Proven against Consul and etcd:

* one registration per listening address (two binds: two entries, whatever
  the number of workers), each with the bound socket's address and port,
  registered once the workers answer the HTTP check;
* no gap while workers restart: while workers recycle (``max_requests``) and
  one is SIGKILLed and replaced, a watcher sees no ``deleted``/``offline`` and
  every poll of the registry (every 0.1 s) finds both entries passing;
* fork-clean master: NO ``GRPC_ENABLE_FORK_SUPPORT``/``GRPC_POLL_STRATEGY`` in
  gunicorn's environment, even with etcd; every worker exit (its
  ``worker_exit`` hook to the master reaping it) under 1 s;
* SIGHUP with the same config keeps the keeper and the entries untouched; the
  keeper SIGKILLed: the master starts another (within ``KEEPER_RESTART_BOUND``)
  and the entries are passing again; the master SIGKILLed (no hook runs): the
  keeper sees its parent gone and deregisters (not left to expire);
* a SIGTERM to the whole process group (``KillMode=control-group``) with a
  ``drain_delay``: the workers keep serving through the drain, stopping after it;
* SIGINT and SIGQUIT withdraw before the port closes, like SIGTERM; SIGQUIT
  right after the keeper was SIGKILLed: a one-shot process deregisters (Consul,
  before the port closes; etcd: the entries leave with the dead keeper's lease,
  within the TTL), and the log says so;
* the README's recipe (``README_RECIPE``, a config file gunicorn re-reads on
  SIGHUP) registers, keeps its keeper across SIGHUP, updates the entry in place
  when a SIGHUP changes only its tags (one ``updated`` event, never gone) and
  withdraws first;
* withdrawn first on the master's SIGTERM: the watcher sees both entries
  deleted before a prober (connecting every 5 ms) finds the port closed (the
  workers hold the listening socket until they exit: with sync workers, the
  port closes once the request in flight at the signal has completed, with 200).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from pathlib import Path
from typing import Any

import psutil
import pytest

from integration.event_log import EventLog
from integration.readme_kit import readme_block
from integration.registry_view import registry_health
from registry_agent import AsyncWatcher, EventType, HealthStatus, RetryPolicy, open_backend
from registry_agent.testing.servers import ServerProcess, freeze_process, unread_input

ROOT = Path(__file__).resolve().parent.parent
TTL = 3.0
WORKERS = 2
MAX_REQUESTS = 5
GRACEFUL_TIMEOUT = 30
# A worker's exit, from its worker_exit hook to the master reaping it (it hung 12 s
# when the master registered itself).
WORKER_EXIT_BOUND = 1.0
# The config's deregister_timeout (3 s) + the keeper's margin: the withdrawal's bound.
WITHDRAW_BOUND = 4.0
# A keeper killed: the arbiter's loop (1 s) + the first backoff (<= 0.5 s) + its start.
KEEPER_RESTART_BOUND = 5.0
SLOW_REQUEST = 2.0
POLL = 0.1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gunicorn:
    """One gunicorn master with the registration hooks, started for a test."""

    def __init__(
        self,
        workdir: Path,
        server: ServerProcess,
        drain: float = 0.0,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.ports = (_free_port(), _free_port())
        self.service = f"greg-{uuid.uuid4().hex[:8]}"
        self.events_path = workdir / f"{self.service}.events"
        self.log_path = workdir / f"{self.service}.log"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("GRPC_")  # the master must be fork-clean without them
        }
        env.update(
            PYTHONPATH=str(ROOT),
            GREG_REGISTRY=server.url,
            GREG_SERVICE=self.service,
            GREG_EVENTS=str(self.events_path),
            GREG_TTL=str(TTL),
            GREG_DRAIN=str(drain),
        )
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            f"--workers={WORKERS}",
            *(f"--bind=127.0.0.1:{port}" for port in self.ports),
            f"--max-requests={max_requests}",
            f"--graceful-timeout={GRACEFUL_TIMEOUT}",
            "--config=python:integration.gunicorn_registration_app",
            "--no-control-socket",  # else one shared socket under ~/.gunicorn for all tests
            "integration.gunicorn_registration_app:app",
        ]
        with self.log_path.open("wb") as log:
            # Its own process group (and session): a test may signal the whole group.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in events if kind is None or e["event"] == kind]

    def get(self, path: str = "/", port: int | None = None, timeout: float = 10) -> int | None:
        """One request; the pid of the worker that served it (None if not served)."""
        connection = http.client.HTTPConnection("127.0.0.1", port or self.ports[0], timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200
            pid: int = json.loads(response.read())["pid"]
            return pid
        except (ConnectionError, http.client.RemoteDisconnected, TimeoutError):
            return None  # a worker recycling as the connection came: the caller retries
        finally:
            connection.close()

    def workers(self) -> set[int]:
        """The workers forked and not yet reaped."""
        forked = {e["worker"] for e in self.events("post_fork")}
        return forked - {e["worker"] for e in self.events("child_exit")}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the master only, by PID: its keeper notices at once
            self.process.wait(10)
        # Workers notice a dead master only within gunicorn's timeout: end ours now.
        for pid in self.workers():
            with contextlib.suppress(psutil.Error):
                worker = psutil.Process(pid)
                if "integration.gunicorn_registration_app:app" in worker.cmdline():
                    worker.kill()


@pytest.fixture
def gunicorns(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(server: ServerProcess, **options: Any) -> Gunicorn:
        started.append(Gunicorn(tmp_path, server, **options))
        return started[-1]

    yield start
    for gunicorn in started:
        gunicorn.close()


async def _wait_registered(server: ServerProcess, gunicorn: Gunicorn, count: int) -> set[str]:
    """The ids once ``count`` entries are passing (within 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = await registry_health(server.url, gunicorn.service)
        if len(held) == count and set(held.values()) == {HealthStatus.PASSING}:
            return set(held)
        if gunicorn.process.poll() is not None:
            pytest.fail(f"gunicorn ended ({gunicorn.process.returncode}):\n{gunicorn.log()}")
        await asyncio.sleep(0.1)
    pytest.fail(f"not {count} passing entries within 30 s:\n{gunicorn.log()}")


class PortProber(threading.Thread):
    """Connects to a port every 5 ms; the first time it was refused."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.closed_at: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + GRACEFUL_TIMEOUT
        while time.monotonic() < deadline and not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError:
                self.closed_at = time.monotonic()
                return
            time.sleep(0.005)


async def test_one_registration_per_address_no_gap_withdrawn_first(
    server: ServerProcess,
    gunicorns: Callable[[ServerProcess], Gunicorn],
    measured: Callable[[str, float, float], None],
) -> None:
    gunicorn = gunicorns(server)
    ids = await _wait_registered(server, gunicorn, count=len(gunicorn.ports))

    # One entry per listening address, with the bound address and port; not one per worker.
    backend = open_backend(server.url)
    try:
        snapshot = await backend.list(gunicorn.service)
    finally:
        await backend.close()
    entries = {h.instance.id: h.instance for h in snapshot.instances.values()}
    assert set(entries) == ids
    assert sorted((i.address, i.port) for i in entries.values()) == sorted(
        ("127.0.0.1", port) for port in gunicorn.ports
    )
    assert {i.scheme for i in entries.values()} == {"http"}
    assert len(gunicorn.workers()) == WORKERS
    master = gunicorn.events("when_ready")[0]["master"]
    assert master == gunicorn.process.pid

    watcher = AsyncWatcher(server.url, gunicorn.service, retry=RetryPolicy(initial=0.1, cap=1.0))
    async with EventLog(watcher) as seen:
        for entry_id in ids:
            await seen.wait_for((EventType.ADDED, entry_id))
        polls: list[dict[str, HealthStatus]] = []
        stop_polling = asyncio.Event()

        async def poll() -> None:
            while not stop_polling.is_set():
                polls.append(await registry_health(server.url, gunicorn.service))
                await asyncio.sleep(POLL)

        poller = asyncio.create_task(poll())

        # Workers recycle (max_requests): each of the first two, then their replacements.
        first = gunicorn.workers()
        sent = 0
        deadline = time.monotonic() + 60
        while len(gunicorn.events("child_exit")) < 2 * WORKERS:
            assert time.monotonic() < deadline, gunicorn.log()
            assert sent < 40 * WORKERS, f"{sent} requests: {gunicorn.events('child_exit')}"
            await asyncio.to_thread(gunicorn.get, "/", gunicorn.ports[sent % 2])
            sent += 1
        recycled = {e["worker"] for e in gunicorn.events("child_exit")}
        assert first <= recycled

        # One worker SIGKILLed: the master reaps it and forks another.
        deadline = time.monotonic() + 30
        while len(gunicorn.workers()) < WORKERS:
            assert time.monotonic() < deadline, gunicorn.log()
            await asyncio.sleep(0.05)
        victim = min(gunicorn.workers())
        forked = len(gunicorn.events("post_fork"))
        os.kill(victim, signal.SIGKILL)
        while (
            victim not in {e["worker"] for e in gunicorn.events("child_exit")}
            or len(gunicorn.events("post_fork")) <= forked
        ):
            assert time.monotonic() < deadline, gunicorn.log()
            await asyncio.sleep(0.05)
        # Both addresses still served afterwards, over more than a TTL.
        began = time.monotonic()
        while time.monotonic() - began < TTL + 1:
            for port in gunicorn.ports:
                await asyncio.to_thread(gunicorn.get, "/", port)
            await asyncio.sleep(0.2)

        stop_polling.set()
        await poller
        full = dict.fromkeys(ids, HealthStatus.PASSING)
        missing = [p for p in polls if p != full]
        print(f"{len(polls)} polls during restarts, {len(missing)} without both entries passing")
        assert len(polls) > 20
        assert missing == [], missing[:3]
        assert [(e.type, e.instance.id) for e in seen if e.type is not EventType.ADDED] == []

        # Every worker exit (recycled or on the way) took under a second.
        began_exit = {e["worker"]: e["t"] for e in gunicorn.events("worker_exit")}
        reaped = {e["worker"]: e["t"] for e in gunicorn.events("child_exit")}
        exits = {pid: reaped[pid] - began_exit[pid] for pid in reaped if pid != victim}
        assert len(exits) >= 2 * WORKERS, exits
        ordered = sorted(exits.values())
        print(f"worker exits: median {ordered[len(ordered) // 2]:.3f}s, max {ordered[-1]:.3f}s")
        measured(f"worker exit x{len(exits)} (max)", ordered[-1], WORKER_EXIT_BOUND)
        print(f"{sent} requests recycled {len(exits)} workers, worker {victim} killed -9")

        # SIGTERM with a request in flight: the entries go first, then the port closes,
        # then the workers finish what they serve.
        slow: dict[str, Any] = {}

        def slow_request() -> None:
            slow["pid"] = gunicorn.get(f"/slow?s={SLOW_REQUEST}", gunicorn.ports[0], timeout=30)
            slow["t"] = time.monotonic()

        in_flight = threading.Thread(target=slow_request, daemon=True)
        in_flight.start()
        await asyncio.sleep(0.3)  # the request is being served
        prober = PortProber(gunicorn.ports[0])
        prober.start()
        signalled = time.monotonic()
        os.kill(gunicorn.process.pid, signal.SIGTERM)
        gone = [await seen.wait_for((EventType.DELETED, entry_id)) for entry_id in ids]
        gone_at = max(seen.at(event) for event in gone)
        await asyncio.to_thread(prober.join, GRACEFUL_TIMEOUT)
        await asyncio.to_thread(gunicorn.process.wait, GRACEFUL_TIMEOUT + 10)
        exited = time.monotonic()
        await asyncio.to_thread(in_flight.join, 10)

    assert gunicorn.process.returncode == 0, gunicorn.log()
    assert prober.closed_at is not None, "the port never closed"
    measured("SIGTERM -> entries gone", gone_at - signalled, WITHDRAW_BOUND)
    print(f"entries gone {prober.closed_at - gone_at:.3f}s before the port closed")
    assert gone_at < prober.closed_at, (gone_at, prober.closed_at)
    assert slow.get("pid") is not None, f"the request in flight failed:\n{gunicorn.log()}"
    measured("SIGTERM -> gunicorn exited", exited - signalled, WITHDRAW_BOUND + SLOW_REQUEST + 2)
    assert await registry_health(server.url, gunicorn.service) == {}
    log = gunicorn.log()
    assert "Traceback" not in log, log
    assert "crossed fork()" not in log, log
    assert "withdrawn in" in log, log
    assert "HTTP Request" not in log  # the keeper's checks do not flood gunicorn's log


def _keepers(gunicorn: Gunicorn) -> list[int]:
    """The keeper processes' pids, in the order the master logged starting them."""
    return [
        int(line.split("keeper ")[1].split()[0])
        for line in gunicorn.log().splitlines()
        if "registry-agent: keeper " in line and " registers " in line
    ]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


LONG_DRAIN = 20.0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
async def test_sigint_and_sigquit_withdraw_before_the_port_closes(
    server: ServerProcess,
    gunicorns: Callable[..., Gunicorn],
    measured: Callable[[str, float, float], None],
    sig: signal.Signals,
) -> None:
    # SIGINT with a long drain_delay: a second SIGINT during the drain cuts it short.
    gunicorn = gunicorns(server, drain=LONG_DRAIN if sig is signal.SIGINT else 0.0)
    ids = await _wait_registered(server, gunicorn, count=len(gunicorn.ports))
    watcher = AsyncWatcher(server.url, gunicorn.service, retry=RetryPolicy(initial=0.1, cap=1.0))
    async with EventLog(watcher) as seen:
        for entry_id in ids:
            await seen.wait_for((EventType.ADDED, entry_id))
        prober = PortProber(gunicorn.ports[1])
        prober.start()
        keeper_dead = sig is signal.SIGQUIT
        if keeper_dead:
            # The keeper killed just before the stop signal: no keeper runs when it comes
            # (its successor waits for the backoff), a one-shot process deregisters.
            [keeper] = _keepers(gunicorn)
            os.kill(keeper, signal.SIGKILL)
        signalled = time.monotonic()
        os.kill(gunicorn.process.pid, sig)
        gone = [await seen.wait_for((EventType.DELETED, entry_id)) for entry_id in ids]
        gone_at = max(seen.at(event) for event in gone)
        if sig is signal.SIGINT:
            await asyncio.sleep(0.5)  # draining (it used to wait out the whole drain_delay)
            assert gunicorn.process.poll() is None, gunicorn.log()
            again = time.monotonic()
            os.kill(gunicorn.process.pid, signal.SIGINT)
        await asyncio.to_thread(prober.join, GRACEFUL_TIMEOUT)
        await asyncio.to_thread(gunicorn.process.wait, GRACEFUL_TIMEOUT)
        if sig is signal.SIGINT:
            measured("SIGINT again during the drain -> exited", time.monotonic() - again, 5)
            assert "SIGINT during the drain: cut short" in gunicorn.log(), gunicorn.log()
    assert prober.closed_at is not None, "the port never closed"
    log = gunicorn.log()
    if keeper_dead and server.url.startswith("etcd"):
        # The entries lived on the dead keeper's lease: gone within the TTL.
        measured("SIGQUIT, keeper dead: etcd entries gone", gone_at - signalled, TTL + 1)
        assert "no keeper running (was killed by SIGKILL): withdrawn " in log, log
    else:
        what = "SIGQUIT, keeper dead (one-shot)" if keeper_dead else sig.name
        measured(f"{what} -> entries gone", gone_at - signalled, WITHDRAW_BOUND)
        print(f"{what}: entries gone {prober.closed_at - gone_at:.3f}s before the port closed")
        assert gone_at < prober.closed_at, (gone_at, prober.closed_at)
    if keeper_dead:
        assert "no keeper running (was killed by SIGKILL): withdrawn " in log, log
        assert "by a one-shot process in" in log, log
        assert "registry-agent: withdrawn in" not in log, log
    assert await registry_health(server.url, gunicorn.service) == {}
    assert all(_gone(pid) for pid in _keepers(gunicorn)), gunicorn.log()
    # A quick shutdown interrupts a worker reading the prober's connection: gunicorn logs
    # that with a traceback of its own. None may come from registry_agent's code.
    assert "registry_agent/" not in gunicorn.log(), gunicorn.log()


DRAIN = 1.5


async def test_sigterm_to_the_whole_group_serves_through_the_drain_delay(
    server: ServerProcess,
    gunicorns: Callable[..., Gunicorn],
    measured: Callable[[str, float, float], None],
) -> None:
    # systemd's KillMode=control-group, tini -g: the workers get the SIGTERM with the
    # master. They keep serving until the master has withdrawn and drained.
    # No max_requests: the master, draining, replaces no worker that recycles.
    gunicorn = gunicorns(server, drain=DRAIN, max_requests=0)
    ids = await _wait_registered(server, gunicorn, count=len(gunicorn.ports))
    watcher = AsyncWatcher(server.url, gunicorn.service, retry=RetryPolicy(initial=0.1, cap=1.0))
    async with EventLog(watcher) as seen:
        for entry_id in ids:
            await seen.wait_for((EventType.ADDED, entry_id))
        prober = PortProber(gunicorn.ports[0])
        prober.start()
        signalled = time.monotonic()
        os.killpg(gunicorn.process.pid, signal.SIGTERM)
        gone = [await seen.wait_for((EventType.DELETED, entry_id)) for entry_id in ids]
        gone_at = max(seen.at(event) for event in gone)
        # Clients that cached the entry still call during the drain: all served.
        served: list[int | None] = []
        while time.monotonic() - signalled < DRAIN - 0.3:
            served.append(await asyncio.to_thread(gunicorn.get, "/", gunicorn.ports[0], 5))
            await asyncio.sleep(0.1)
        await asyncio.to_thread(prober.join, GRACEFUL_TIMEOUT)
        await asyncio.to_thread(gunicorn.process.wait, GRACEFUL_TIMEOUT)
    exited = time.monotonic()
    assert gunicorn.process.returncode == 0, gunicorn.log()
    measured("group SIGTERM -> entries gone", gone_at - signalled, WITHDRAW_BOUND)
    print(f"{len(served)} requests during the drain, served by {set(served)}")
    assert len(served) >= 3
    assert None not in served, (served, gunicorn.log())
    assert prober.closed_at is not None
    assert prober.closed_at - signalled >= DRAIN, gunicorn.log()
    exits = [e["t"] for e in gunicorn.events("worker_exit")]
    assert len(exits) == WORKERS
    assert min(exits) - signalled >= DRAIN - 0.1, gunicorn.log()
    measured("group SIGTERM -> gunicorn exited", exited - signalled, DRAIN + WITHDRAW_BOUND)
    assert await registry_health(server.url, gunicorn.service) == {}


async def test_sighup_keeps_the_entry_and_a_killed_master_takes_it_away(
    server: ServerProcess,
    gunicorns: Callable[[ServerProcess], Gunicorn],
    measured: Callable[[str, float, float], None],
) -> None:
    gunicorn = gunicorns(server)
    ids = await _wait_registered(server, gunicorn, count=len(gunicorn.ports))
    [keeper] = _keepers(gunicorn)
    assert keeper != gunicorn.process.pid
    assert psutil.Process(keeper).ppid() == gunicorn.process.pid
    watcher = AsyncWatcher(server.url, gunicorn.service, retry=RetryPolicy(initial=0.1, cap=1.0))
    async with EventLog(watcher) as seen:
        for entry_id in ids:
            await seen.wait_for((EventType.ADDED, entry_id))

        # SIGHUP with the same config: new workers, the same keeper, the entries untouched.
        forked = len(gunicorn.events("post_fork"))
        os.kill(gunicorn.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while len(gunicorn.events("post_fork")) < forked + WORKERS:
            assert time.monotonic() < deadline, gunicorn.log()
            await asyncio.sleep(0.05)
        await asyncio.sleep(TTL)
        assert _keepers(gunicorn) == [keeper], gunicorn.log()
        assert await registry_health(server.url, gunicorn.service) == dict.fromkeys(
            ids, HealthStatus.PASSING
        )
        assert [(e.type, e.instance.id) for e in seen if e.type is not EventType.ADDED] == []

        # The keeper SIGKILLed (as the OOM killer would), and a SIGHUP with the same
        # config right after: the master restarts the keeper (now, the SIGHUP skipping
        # the backoff) and never withdraws the entries for it (it deregistered them by a
        # one-shot process: a gap of 5 s).
        killed = time.monotonic()
        os.kill(keeper, signal.SIGKILL)
        os.kill(gunicorn.process.pid, signal.SIGHUP)
        deadline = killed + KEEPER_RESTART_BOUND
        while len(_keepers(gunicorn)) < 2:
            assert time.monotonic() < deadline, gunicorn.log()
            await asyncio.sleep(0.05)
        restarted = time.monotonic()
        [_, keeper] = _keepers(gunicorn)
        assert psutil.Process(keeper).ppid() == gunicorn.process.pid
        await _wait_registered(server, gunicorn, count=len(gunicorn.ports))
        measured("keeper kill -9 -> new keeper", restarted - killed, KEEPER_RESTART_BOUND)
        measured("keeper kill -9 -> entries passing", time.monotonic() - killed, TTL + 5)
        assert "one-shot" not in gunicorn.log(), gunicorn.log()
        assert f"keeper {_keepers(gunicorn)[0]} was killed by SIGKILL" in gunicorn.log()
        if server.url.startswith("consul"):
            # (On etcd the entries live on the dead keeper's lease, which may expire first.)
            assert [e.instance.id for e in seen if e.type is EventType.DELETED] == []

        # The master SIGKILLed (no hook runs): the keeper sees its parent gone and deregisters.
        killed = time.monotonic()
        os.kill(gunicorn.process.pid, signal.SIGKILL)
        try:
            gone = [await seen.wait_for((EventType.DELETED, entry_id)) for entry_id in ids]
        except BaseException:
            print(gunicorn.log())  # the keeper logs to gunicorn's stderr
            raise
        gone_at = max(seen.at(event) for event in gone)
    measured("master kill -9 -> entries gone", gone_at - killed, WITHDRAW_BOUND)
    assert gone_at - killed < TTL  # deregistered, not expired
    deadline = time.monotonic() + 10
    while not _gone(keeper):
        assert time.monotonic() < deadline, f"keeper {keeper} still running"
        await asyncio.sleep(0.05)
    assert await registry_health(server.url, gunicorn.service) == {}


# The README's recipe, read from README.md; the test changes only the registry URL
# and the bind (loopback, a free port).
README_RECIPE = readme_block("readme:gunicorn")


def _run_config(conf: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``gunicorn -c conf`` (serving the test app), its output to ``log_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--no-control-socket"]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*command, "integration.gunicorn_registration_app:app"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=conf.parent,
        )


async def _tags(url: str, service: str) -> dict[str, tuple[str, ...]]:
    """Each entry's tags, as the registry holds them."""
    backend = open_backend(url)
    try:
        snapshot = await backend.list(service)
    finally:
        await backend.close()
    return {h.instance.id: h.instance.tags for h in snapshot.instances.values()}


async def test_the_readme_recipe(
    server: ServerProcess, tmp_path: Path, measured: Callable[[str, float, float], None]
) -> None:
    port = _free_port()
    conf = tmp_path / "gunicorn.conf.py"
    text = README_RECIPE.replace("consul://127.0.0.1:8500", server.url)
    text = text.replace('bind = "0.0.0.0:8000"', f'bind = "127.0.0.1:{port}"')
    assert text.count(server.url) == 1
    assert text.count('tags=["web"]') == 1
    assert text.count(str(port)) == 1
    conf.write_text(text)
    log_path = tmp_path / "gunicorn.log"
    process = _run_config(conf, log_path)
    try:
        deadline = time.monotonic() + 30
        while (held := await registry_health(server.url, "orders")) != {
            f"orders-127.0.0.1-{port}": HealthStatus.PASSING
        }:
            assert time.monotonic() < deadline, (held, log_path.read_text())
            assert process.poll() is None, log_path.read_text()
            await asyncio.sleep(0.1)
        [entry_id] = held
        watcher = AsyncWatcher(server.url, "orders", retry=RetryPolicy(initial=0.1, cap=1.0))
        async with EventLog(watcher) as seen:
            await seen.wait_for((EventType.ADDED, entry_id))
            # SIGHUP re-reads the file (new objects, the same registration): nothing changes.
            os.kill(process.pid, signal.SIGHUP)
            while "Hang up" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            assert log_path.read_text().count("registry-agent: keeper") == 1, log_path.read_text()
            assert [e.type for e in seen] == [EventType.ADDED]

            # SIGHUP with only the tags changed: updated in place by the same keeper,
            # never out of discovery (it was re-registered: gone for seconds).
            conf.write_text(text.replace('tags=["web"]', 'tags=["web", "v2"]'))
            hup = time.monotonic()
            os.kill(process.pid, signal.SIGHUP)
            updated = await seen.wait_for((EventType.UPDATED, entry_id))
            assert updated.instance.tags == ("web", "v2")
            measured("README: SIGHUP tags -> updated", seen.at(updated) - hup, WITHDRAW_BOUND)
            assert [e.type for e in seen] == [EventType.ADDED, EventType.UPDATED]
            assert await registry_health(server.url, "orders") == {entry_id: HealthStatus.PASSING}
            assert "updated tags/meta in place" in log_path.read_text()
            assert log_path.read_text().count("registry-agent: keeper") == 2  # + "updated"

            # The keeper dies during a SIGHUP's update (stopped, then killed, before it
            # answers): the master says so and its successor holds the new tags (it
            # restarted with the old ones, and they stayed).
            [keeper] = [
                int(line.split("keeper ")[1].split()[0])
                for line in log_path.read_text().splitlines()
                if "registry-agent: keeper " in line and " registers " in line
            ]
            conf.write_text(text.replace('tags=["web"]', 'tags=["web", "v3"]'))
            freeze_process(keeper)
            os.kill(process.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            # Killed once the update waits in its pipe: earlier, the master would find
            # it dead before sending (another path, another log line).
            while unread_input(keeper) == 0:
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
            killed = time.monotonic()
            os.kill(keeper, signal.SIGKILL)
            deadline = time.monotonic() + KEEPER_RESTART_BOUND + 10
            while (tags := await _tags(server.url, "orders")) != {entry_id: ("web", "v3")}:
                assert time.monotonic() < deadline, (tags, log_path.read_text())
                await asyncio.sleep(0.1)
            measured("README: keeper killed mid-update -> new tags", time.monotonic() - killed, 15)
            assert "the keeper was killed by SIGKILL before it answered" in log_path.read_text()
            deadline = time.monotonic() + 30
            while await registry_health(server.url, "orders") != {entry_id: HealthStatus.PASSING}:
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)

            prober = PortProber(port)
            prober.start()
            signalled = time.monotonic()
            process.terminate()
            gone = await seen.wait_for((EventType.DELETED, entry_id))
            await asyncio.to_thread(prober.join, GRACEFUL_TIMEOUT)
            await asyncio.to_thread(process.wait, GRACEFUL_TIMEOUT)
        assert process.returncode == 0, log_path.read_text()
        assert prober.closed_at is not None
        measured("README: SIGTERM -> entry gone", seen.at(gone) - signalled, WITHDRAW_BOUND)
        assert seen.at(gone) < prober.closed_at
        assert await registry_health(server.url, "orders") == {}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
