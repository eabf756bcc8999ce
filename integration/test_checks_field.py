"""DESIGN §6 scenario 13 and issue 12 items 3 and 12: misbehaving checks hurt nothing else.

On real Consul and etcd: hung sync checks in one process leave a healthy
neighbour registered (its ``localhost`` URL still resolves), a process whose
check hangs still exits at once after ``stop()``, a timed-out command loses
its whole tree (``setsid`` escapees included), an async check raising
SystemExit is a failed result, and the password of an HTTP check URL never
reaches the registry nor the registrar's status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from registry_agent import (
    AsyncRegistrar,
    Backend,
    CallableCheck,
    HealthStatus,
    HttpCheck,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ServerProcess, free_port

TTL = 3.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
INTERVAL = 0.2
MARGIN = 3.0  # scheduling slack on a busy 2-core machine
HUNG = 10  # more than the default executor's threads on this machine (min(32, cores + 4))
PASSWORD = "pa:ss@w0rd-xyz"
QUOTED = "pa%3Ass%40w0rd-xyz"
Measured = Callable[[str, float, float], None]


class _Service(BaseHTTPRequestHandler):
    """200 when healthy (and, if the server asks for it, given alice's basic auth)."""

    def do_GET(self) -> None:
        server = self.server
        status = 200 if getattr(server, "healthy", True) else 503
        if getattr(server, "auth", False):
            expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                status = 401
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


async def _status(observer: Backend, instance: ServiceInstance) -> HealthStatus | None:
    health = (await observer.list(instance.service)).instances.get(instance.id)
    return None if health is None else health.status


async def test_hung_sync_checks_leave_a_localhost_neighbour_registered(
    server: ServerProcess, service: ThreadingHTTPServer, measured: Measured
) -> None:
    port = service.server_address[1]
    neighbour = AsyncRegistrar(
        open_backend(server.url, timeout=1),
        ServiceInstance("orders", address="127.0.0.1", port=port),
        checks=[HttpCheck(f"http://localhost:{port}/", interval=INTERVAL, timeout=2.0)],
        ttl=TTL,
        retry=RETRY,
        rise=1,
        fall=2,
    )
    release = threading.Event()
    hung = AsyncRegistrar(
        open_backend(server.url, timeout=1),
        ServiceInstance("stuck", address="127.0.0.1", port=port + 1),
        checks=[
            CallableCheck(lambda: release.wait(60), interval=INTERVAL, timeout=0.2, name=f"hang{i}")
            for i in range(HUNG)
        ],
        ttl=TTL,
        retry=RETRY,
    )
    observer = open_backend(server.url, timeout=1)
    withdrawals: list[str] = []
    try:
        await neighbour.start(wait_registered=10)
        await hung.start()
        # Long enough for the neighbour to be withdrawn several times over if starved.
        window = 15 * INTERVAL * neighbour.gate.fall
        started = time.monotonic()
        while time.monotonic() - started < window:
            if not neighbour.registered or neighbour.state != "registered":
                withdrawals.append(str(neighbour.status()["checks"]))
            await asyncio.sleep(INTERVAL)
        assert withdrawals == []
        assert await _status(observer, neighbour.instance) is HealthStatus.PASSING
        result = neighbour.status()["checks"][f"http http://localhost:{port}/"]
        assert result["ok"], result
        measured("neighbour check latency", result["latency"], 2.0)
        # Each hung check holds exactly one thread of its own; later runs fail at once.
        check_threads = [t for t in threading.enumerate() if t.name.startswith("check hang")]
        assert len(check_threads) == HUNG
        assert all(t.daemon for t in check_threads)
        details = {c["detail"] for c in hung.status()["checks"].values()}
        assert any(d.startswith("previous run still running after") for d in details), details
        assert not hung.registered
    finally:
        release.set()
        await hung.stop(timeout=5)
        await neighbour.stop(timeout=5)
        for reg in (hung, neighbour):
            await reg.backend.close()
    assert await _status(observer, neighbour.instance) is None
    await observer.close()


_HANGS_AFTER_THE_FIRST_CALL = textwrap.dedent(
    """
    import asyncio, sys, time
    from registry_agent import (
        AsyncRegistrar, CallableCheck, Registrar, RetryPolicy, ServiceInstance,
    )

    calls = 0

    def hangs_after_the_first_call():
        global calls
        calls += 1
        if calls > 1:
            time.sleep(3600)
        return True

    def make(kind):
        return (AsyncRegistrar if kind == "async" else Registrar)(
            sys.argv[1],
            ServiceInstance("orders", address="127.0.0.1", port=int(sys.argv[2])),
            checks=[CallableCheck(hangs_after_the_first_call, interval=0.2, timeout=0.3)],
            ttl=3,
            retry=RetryPolicy(initial=0.1, cap=1.0),
            rise=1,
            fall=2,
        )
    """
)

_STOPS_WITH_A_HUNG_CHECK = {
    "async": _HANGS_AFTER_THE_FIRST_CALL
    + textwrap.dedent(
        """
        async def main():
            reg = make("async")
            await reg.start(wait_registered=20)
            print("registered", flush=True)
            while reg.state == "registered":  # the hung check withdraws it
                await asyncio.sleep(0.05)
            print("stopping", reg.status()["checks"], flush=True)
            await reg.stop(timeout=5)

        asyncio.run(main())
        """
    ),
    "blocking": _HANGS_AFTER_THE_FIRST_CALL
    + textwrap.dedent(
        """
        reg = make("blocking")
        reg.start(wait_registered=20)
        print("registered", flush=True)
        while reg.state == "registered":  # the hung check withdraws it
            time.sleep(0.05)
        print("stopping", reg.status()["checks"], flush=True)
        reg.stop(timeout=5)
        """
    ),
}


@pytest.mark.parametrize("kind", ["async", "blocking"])
def test_a_process_whose_check_hangs_exits_right_after_stop(
    server: ServerProcess, measured: Measured, kind: str
) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-c", _STOPS_WITH_A_HUNG_CHECK[kind], server.url, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "registered"
            stopping = proc.stdout.readline()
            for _ in range(20):  # the withdrawal is logged (WARNING, on stderr) before it
                if stopping.startswith("stopping") or not stopping:
                    break
                stopping = proc.stdout.readline()
            stopped_at = time.monotonic()
            assert stopping.startswith("stopping"), stopping
            assert "timed out after 0.3s" in stopping or "still running" in stopping, stopping
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail("the process never exited: something joined the hung check's thread")
            took = time.monotonic() - stopped_at
            assert code == 0, proc.stdout.read()
            # stop() has 5 s at most; interpreter exit must not wait for the hung thread.
            measured("exit after stop()", took, 5 + MARGIN)
        finally:
            if proc.poll() is None:
                proc.kill()


_COMMANDS_BESIDE_A_REGISTRATION = textwrap.dedent(
    """
    import asyncio, ctypes, json, os, sys, time
    from pathlib import Path
    from registry_agent import (
        AsyncRegistrar, CallableCheck, CommandCheck, RetryPolicy, ServiceInstance,
    )

    # A child subreaper, like the agent as PID 1: orphans of the checks come back to us.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    url, port, env_file, window = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    PRINTER = "import sys\\nfor _ in range(100): sys.stdout.buffer.write(b'y' * (1 << 20))"
    RETRY = RetryPolicy(initial=0.1, cap=1.0)
    # A child that stays in the group, and one that leaves it (setsid) and closes the pipe.
    ESCAPES = "sleep 100 & setsid sh -c 'exec 1>&-; sleep 100' & sleep 100"

    async def exits():
        raise SystemExit(4)  # on the loop: it must not end this process

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

    def descendants():
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            state, ppid = text.rsplit(")", 1)[1].split()[:2]
            parents[int(stat.parent.name)] = (int(ppid), state)
        found, frontier = {}, {os.getpid()}
        while frontier:
            frontier = {p for p, (pp, _) in parents.items() if pp in frontier}
            found.update({p: parents[p][1] for p in frontier})
        return found

    async def main():
        healthy = AsyncRegistrar(
            url,
            ServiceInstance("orders", address="127.0.0.1", port=port),
            checks=[
                CommandCheck([sys.executable, "-c", PRINTER], interval=0.5, timeout=30,
                             name="prints 100 MB"),
                CommandCheck(["sh", "-c", 'env > "$1"', "sh", env_file], interval=0.5,
                             name="env"),
            ],
            ttl=3, retry=RETRY, rise=1, fall=1,
        )
        stuck = AsyncRegistrar(
            url,
            ServiceInstance("stuck", address="127.0.0.1", port=port + 1),
            checks=[
                CommandCheck(["sh", "-c", ESCAPES], interval=0.2, timeout=0.3, name="tree"),
                CallableCheck(lambda: time.sleep(3600), interval=0.2, timeout=0.3, name="hang"),
                CallableCheck(exits, interval=0.2, name="exits"),
            ],
            ttl=3, retry=RETRY,
        )
        await healthy.start(wait_registered=30)
        await stuck.start()
        before = hwm()
        print("registered", flush=True)
        started, lapses = time.monotonic(), []
        while time.monotonic() - started < window:
            if not healthy.registered:
                lapses.append(str(healthy.status()["checks"]))
            await asyncio.sleep(0.1)
        checks = {**healthy.status()["checks"], **stuck.status()["checks"]}
        await stuck.stop(timeout=5)
        await healthy.stop(timeout=5)
        left = descendants()
        print(json.dumps({
            "lapses": lapses, "rss_before_kib": before, "rss_after_kib": hwm(),
            "checks": checks,
            "running_after_stop": [p for p, state in left.items() if state != "Z"],
        }), flush=True)

    asyncio.run(main())
    """
)


def test_command_checks_that_flood_and_fork_hurt_nothing(
    server: ServerProcess, tmp_path: Path, measured: Measured
) -> None:
    port, window = free_port(), 6.0
    env_file = tmp_path / "env"
    secrets = {
        "CONSUL_HTTP_TOKEN": "consul-token-visible",
        "REGISTRY_AGENT_TOKEN": "agent-token-visible",
        "ETCDCTL_PASSWORD": "etcd-password-visible",
    }
    args = [str(env_file), str(window)]
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", _COMMANDS_BESIDE_A_REGISTRATION, server.url, str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **secrets},
    ) as proc:
        assert proc.stdout is not None
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the service process never exited")
    took = time.monotonic() - started
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert "registered" in lines, out
    seen = json.loads(lines[-1])
    checks = seen["checks"]
    # The flooding check passed every time while the registration held, on little memory.
    assert seen["lapses"] == []
    assert checks["prints 100 MB"]["ok"], checks
    grew = (seen["rss_after_kib"] - seen["rss_before_kib"]) / 1024
    print(f"peak RSS grew {grew:.1f} MiB over {window:g}s of 100 MB check runs")
    assert grew < 32
    measured("one 100 MB check run", checks["prints 100 MB"]["latency"], 30)
    # The forking check timed out each time, its tree killed (the setsid escapee too):
    # nothing runs after stop().
    assert checks["tree"]["detail"] == "timed out after 0.3s", checks
    assert checks["hang"]["detail"].startswith(("timed out", "previous run still running"))
    assert checks["exits"]["detail"] == "raised SystemExit: 4", checks
    # Killed orphans (the background sleeps) may remain as zombies for the agent's reaper.
    assert seen["running_after_stop"] == []
    text = env_file.read_text()
    for name, value in secrets.items():
        assert name not in text
        assert value not in text
    assert "PATH=" in text
    measured("service process lifetime", took, window + 30)


async def test_http_check_password_never_reaches_the_registry(
    server: ServerProcess, service: ThreadingHTTPServer, measured: Measured
) -> None:
    service.auth = True  # type: ignore[attr-defined]
    port = service.server_address[1]
    check = HttpCheck(f"http://alice:{QUOTED}@127.0.0.1:{port}/", interval=INTERVAL, timeout=1.0)
    reg = AsyncRegistrar(
        open_backend(server.url, timeout=1),
        ServiceInstance("orders", address="127.0.0.1", port=port),
        checks=[check],
        ttl=TTL,
        retry=RETRY,
        rise=1,
        fall=1,
        on_unhealthy="critical",
    )
    observer = open_backend(server.url, timeout=1)
    try:
        # Passing proves the credentials were sent (the service answers 401 without them).
        await reg.start(wait_registered=10)
        service.healthy = False  # type: ignore[attr-defined]
        started = time.monotonic()
        note = ""
        while time.monotonic() - started < 10:
            health = (await observer.list("orders")).instances.get(reg.instance.id)
            if health is not None and health.status is HealthStatus.CRITICAL and health.note:
                note = health.note
                break
            await asyncio.sleep(0.05)
        measured("held critical with a note", time.monotonic() - started, INTERVAL * 2 + MARGIN)
        assert f"***@127.0.0.1:{port}/" in note  # masked here, or its userinfo by the registrar
        assert "HTTP 503" in note
        seen = [note, json.dumps(reg.status(), default=str), repr(check), repr(reg)]
        for text in seen:
            assert PASSWORD not in text
            assert QUOTED not in text
            assert "w0rd" not in text
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
        await observer.close()
