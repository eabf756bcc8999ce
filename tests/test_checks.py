"""Health checks: every outcome is a result, hangs are bounded, nothing leaks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from registry_agent import (
    CallableCheck,
    CommandCheck,
    ConfigError,
    GrpcCheck,
    HttpCheck,
    TcpCheck,
)
from registry_agent._health.base import INTERVAL_FLOOR, TIMEOUT_FLOOR
from registry_agent._health.checks import as_check
from registry_agent._health.command import RUN_MARK
from registry_agent.testing.servers import free_port

PASSWORD = "s3cr@t-pw:x"  # a test secret: "@" and ":" must be escaped in URLs
QUOTED_PASSWORD = "s3cr%40t-pw%3Ax"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/query":
            given = urllib.parse.parse_qs(query).get("access_token")
            self.send_response(200 if given == [f"tok-{PASSWORD}"] else 403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/auth":
            expected = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
            ok = self.headers.get("Authorization") == f"Basic {expected}"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow":
            time.sleep(2)
        status = {"/ok": 200, "/redirect": 302, "/fail": 503, "/json": 200, "/down": 200}.get(
            self.path, 404
        )
        body = json.dumps({"status": "up" if self.path == "/json" else "down"}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_pass_and_fail(http_url: str) -> None:
    ok = await HttpCheck(f"{http_url}/ok").run()
    assert ok.ok
    assert ok.detail == "HTTP 200"
    assert ok.latency > 0
    assert abs(ok.at - time.time()) < 5
    assert (await HttpCheck(f"{http_url}/redirect").run()).ok  # 3xx counts as up by default
    fail = await HttpCheck(f"{http_url}/fail").run()
    assert not fail.ok
    assert fail.detail == "HTTP 503"
    assert (await HttpCheck(f"{http_url}/fail", expect_status={503}).run()).ok


async def test_http_body_predicate(http_url: str) -> None:
    def is_up(body: object) -> bool:
        return isinstance(body, dict) and body.get("status") == "up"

    assert (await HttpCheck(f"{http_url}/json", body=is_up).run()).ok
    down = await HttpCheck(f"{http_url}/down", body=is_up).run()
    assert not down.ok
    assert "body check failed" in down.detail


async def test_http_timeout_is_bounded(http_url: str) -> None:
    check = HttpCheck(f"{http_url}/slow", timeout=0.3)
    started = time.monotonic()
    result = await check.run()
    assert not result.ok
    assert time.monotonic() - started < 1.5
    await check.aclose()


async def test_http_connection_refused() -> None:
    result = await HttpCheck(f"http://127.0.0.1:{free_port()}/").run()
    assert not result.ok
    assert result.detail


async def test_tcp() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert (await TcpCheck("127.0.0.1", port).run()).ok
    server.close()
    await server.wait_closed()
    assert not (await TcpCheck("127.0.0.1", port).run()).ok


async def test_command_exit_codes() -> None:
    assert (await CommandCheck([sys.executable, "-c", "pass"]).run()).ok
    result = await CommandCheck([sys.executable, "-c", "print('disk full'); exit(3)"]).run()
    assert not result.ok
    assert result.detail == "exit 3: disk full"
    missing = await CommandCheck(["/nonexistent/check-binary"]).run()
    assert not missing.ok


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its reaper is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_command_timeout_kills_the_whole_group_and_leaves_no_zombie(
    tmp_path: Path,
) -> None:
    # The check's shell starts a child; both must die on timeout.
    script = 'sleep 30 & echo $! > "$1"; wait'
    pidfile = tmp_path / "child.pid"
    check = CommandCheck(["sh", "-c", script, "sh", str(pidfile)], timeout=0.5)
    started = time.monotonic()
    result = await check.run()
    assert not result.ok
    assert "timed out" in result.detail
    assert time.monotonic() - started < 2
    child = int(pidfile.read_text())
    await asyncio.sleep(0.2)
    assert not _alive(child)
    # The check reaped the process it started: no zombie child of ours is left.
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - non-blocking by WNOHANG


async def test_callables_sync_async_raising_hanging() -> None:
    async def async_ok() -> bool:
        return True

    def sync_false() -> bool:
        return False

    def raises() -> bool:
        raise RuntimeError("db unreachable")

    async def hangs() -> None:
        await asyncio.sleep(60)

    def blocks() -> None:
        time.sleep(1)

    assert (await as_check(async_ok).run()).ok
    assert (await as_check(lambda: None).run()).ok
    assert not (await as_check(sync_false).run()).ok
    failed = await as_check(raises).run()
    assert (failed.ok, failed.detail) == (False, "db unreachable")
    started = time.monotonic()
    hung = await CallableCheck(hangs, timeout=0.2).run()
    assert not hung.ok
    assert time.monotonic() - started < 1
    # A blocking sync check runs off the loop: the loop keeps ticking meanwhile.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    assert not (await CallableCheck(blocks, timeout=0.3).run()).ok
    task.cancel()
    assert ticks >= 10


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: HttpCheck("ftp://x"), "http"),
        (lambda: TcpCheck("h", 0), "tcp"),
        (lambda: CommandCheck("pg_isready"), "command"),
        (lambda: CommandCheck([]), "command"),
        (lambda: HttpCheck("http://x", interval=0), "check http http://x: interval"),
        (lambda: TcpCheck("h", 1, timeout=-1), "check tcp h:1: timeout"),
        (lambda: CallableCheck(42), "checks"),  # type: ignore[arg-type]
        (lambda: TcpCheck("h", 1, interval=float("nan")), "check tcp h:1: interval"),
        (lambda: TcpCheck("h", 1, timeout=float("inf")), "check tcp h:1: timeout"),
    ],
)
def test_bad_checks_name_the_field(make: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: HttpCheck("http://x", interval=0.001), "check http http://x: interval"),
        (lambda: TcpCheck("h", 1, timeout=0.001), "check tcp h:1: timeout"),
        (lambda: CallableCheck(bool, name="db", interval=0.009), "check db: interval"),
        (lambda: CommandCheck(["true"], timeout=0.005), "check command true: timeout"),
    ],
)
def test_check_timings_have_floors(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field
    assert "must be at least 0.01s" in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_check_timings_at_the_floors_are_accepted() -> None:
    check = CallableCheck(bool, interval=INTERVAL_FLOOR, timeout=TIMEOUT_FLOOR)
    assert (check.interval, check.timeout) == (INTERVAL_FLOOR, TIMEOUT_FLOOR)


async def _until(predicate: Callable[[], bool], within: float) -> None:
    """Wait (polling, bounded) until ``predicate()`` holds; fail the test otherwise."""
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    assert predicate(), f"not true within {within}s"


# -- sync callables: a thread of their own, one run in flight -------------------------


async def test_a_hung_sync_check_holds_one_thread_and_fails_at_once_while_hung() -> None:
    release = threading.Event()
    calls = 0

    def hangs() -> bool:
        nonlocal calls
        calls += 1
        release.wait(30)
        return True

    check = CallableCheck(hangs, timeout=0.2)

    def threads() -> int:
        # Only this check's threads: other tests' threads may end meanwhile.
        return sum(t.name == f"check {check.name}" for t in threading.enumerate())

    first = await check.run()
    assert (first.ok, first.detail) == (False, "timed out after 0.2s")
    started = time.monotonic()
    for _ in range(10):
        again = await check.run()
        assert not again.ok
        assert again.detail.startswith("previous run still running after")
    assert time.monotonic() - started < 1.0  # each failed at once, without waiting
    assert calls == 1
    assert threads() == 1
    release.set()
    await _until(lambda: threads() == 0, within=5)
    assert (await check.run()).ok
    assert calls == 2


async def test_overlapping_runs_of_one_sync_check_share_one_call() -> None:
    # One check object given to two registrars: their runs overlap, one thread serves both.
    calls = 0

    def slow() -> bool:
        nonlocal calls
        calls += 1
        time.sleep(0.3)
        return True

    check = CallableCheck(slow, timeout=2)
    first, second = await asyncio.gather(check.run(), check.run())
    assert (first.ok, second.ok) == (True, True)
    assert calls == 1
    assert (await check.run()).ok
    assert calls == 2


async def test_hung_sync_checks_leave_the_default_executor_free() -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    release = threading.Event()
    checks = [CallableCheck(lambda: release.wait(30), timeout=0.1, name=f"c{i}") for i in range(8)]
    results = await asyncio.gather(*(c.run() for c in checks))
    assert not any(r.ok for r in results)
    try:
        # DNS for a neighbour's "localhost" URL goes through the default executor.
        async with asyncio.timeout(2):
            infos = await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
        assert infos
    finally:
        release.set()
        executor.shutdown(wait=False)


def test_a_process_with_a_hung_sync_check_exits_promptly() -> None:
    script = textwrap.dedent(
        """
        import asyncio, time
        from registry_agent import CallableCheck

        async def main():
            result = await CallableCheck(lambda: time.sleep(3600), timeout=0.2).run()
            print(result.detail, flush=True)

        asyncio.run(main())
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timed out after 0.2s"
    assert took < 10, f"exit took {took:.1f}s"


async def test_sync_callables_that_raise_anything_are_results() -> None:
    def exits() -> None:
        raise SystemExit(3)

    def interrupted() -> None:
        raise KeyboardInterrupt

    def huge() -> None:
        raise RuntimeError("x" * 1_000_000)

    async def cancels_itself() -> None:
        raise asyncio.CancelledError

    for func, words in [
        (exits, "SystemExit"),
        (interrupted, "KeyboardInterrupt"),
        (huge, "xxx"),
        (cancels_itself, "cancelled"),
    ]:
        result = await CallableCheck(func).run()  # type: ignore[arg-type]
        assert not result.ok
        assert words in result.detail
        assert len(result.detail) <= 500


@pytest.mark.parametrize("make_exc", [lambda: SystemExit(4), KeyboardInterrupt])
@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_a_check_raising_systemexit_or_keyboardinterrupt_fails_the_run(
    make_exc: Callable[[], BaseException], is_async: bool
) -> None:
    exc = make_exc()

    async def async_raises() -> None:
        raise exc

    def sync_raises() -> None:
        raise exc

    check = CallableCheck(async_raises if is_async else sync_raises)
    results = [await check.run() for _ in range(3)]  # and the loop goes on after each
    want = "raised SystemExit: 4" if isinstance(exc, SystemExit) else "raised KeyboardInterrupt"
    assert [(r.ok, r.detail) for r in results] == [(False, want)] * 3


# A host application whose registrar has a check raising SystemExit/KeyboardInterrupt.
# In a subprocess: were the exception to escape, it would end pytest itself.
_HOST_APP = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from registry_agent import AsyncRegistrar, CallableCheck, Registrar, ServiceInstance

    kind, flavour = sys.argv[1:]
    exc = SystemExit(4) if kind == "SystemExit" else KeyboardInterrupt()
    details = []

    async def bad():
        raise exc

    def args():
        return dict(
            backend="memory://host-app",
            instance=ServiceInstance("app", address="127.0.0.1", port=8080),
            ttl=3,
            checks=[CallableCheck(bad, interval=0.05)],
            on_check=lambda check, result: details.append(result.detail),
        )

    async def app():
        registrar = AsyncRegistrar(**args())
        await registrar.start()
        ticks = 0
        while len(details) < 5 and ticks < 200:  # the app's own work goes on meanwhile
            await asyncio.sleep(0.02)
            ticks += 1
        await registrar.stop(timeout=2)
        return ticks

    if flavour == "async":
        ticks = asyncio.run(app())
    else:
        started = time.monotonic()
        registrar = Registrar(**args()).start()
        ticks = 0
        while len(details) < 5 and time.monotonic() - started < 4:
            time.sleep(0.02)
            ticks += 1
        registrar.stop(timeout=2)
    print(json.dumps({"details": details[:5], "ticks": ticks, "survived": True}))
    """
)


@pytest.mark.parametrize("flavour", ["async", "blocking"])
@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt"])
def test_an_async_check_raising_systemexit_does_not_end_the_host_app(
    kind: str, flavour: str
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _HOST_APP, kind, flavour],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - started
    print(f"{flavour} registrar, check raising {kind}: process done in {took:.2f}s")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    want = "raised SystemExit: 4" if kind == "SystemExit" else "raised KeyboardInterrupt"
    assert seen["details"] == [want] * 5
    assert seen["survived"]


async def test_cancelling_a_run_is_still_cancellation() -> None:
    async def sleeps() -> None:
        await asyncio.sleep(30)

    task = asyncio.create_task(CallableCheck(sleeps, timeout=20).run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- commands: bounded output, group killed, reaped, scrubbed environment ------------


def test_a_command_printing_100_mb_costs_no_memory() -> None:
    # A fresh interpreter measures its own peak RSS (VmHWM) before and after the run.
    script = textwrap.dedent(
        """
        import asyncio, json, sys
        from registry_agent import CommandCheck

        def hwm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

        PRINTER = (
            "import sys\\n"
            "for _ in range(100): sys.stdout.buffer.write(b'y' * (1 << 20))\\n"
            "print('the end')"
        )

        async def main():
            check = CommandCheck([sys.executable, "-c", PRINTER], timeout=60)
            await CommandCheck([sys.executable, "-c", "pass"]).run()  # warm up
            before = hwm()
            result = await check.run()
            print(json.dumps({"ok": result.ok, "detail": result.detail,
                              "latency": result.latency, "before": before, "after": hwm()}))

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    grew_mib = (seen["after"] - seen["before"]) / 1024
    print(f"100 MB of output: {seen['latency']:.2f}s, peak RSS grew {grew_mib:.1f} MiB")
    assert seen["ok"], seen["detail"]
    assert seen["detail"].endswith("the end")
    assert grew_mib < 16


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z…), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_a_timed_out_command_loses_its_grandchildren_too(tmp_path: Path) -> None:
    # The check runs in a child subreaper: orphans come back to it, so it can see
    # how each process of the tree died (our own child must be reaped already).
    script = textwrap.dedent(
        """
        import asyncio, ctypes, json, os, sys
        from registry_agent import CommandCheck

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        pidfile = sys.argv[1]
        shell = 'sleep 100 & echo $! > "$1"; echo $$ >> "$1"; sleep 100'

        async def main():
            check = CommandCheck(["sh", "-c", shell, "sh", pidfile], timeout=0.5)
            result = await check.run()
            grandchild, child = (int(p) for p in open(pidfile).read().split())
            try:
                os.waitpid(child, os.WNOHANG)
                child_reaped = False
            except ChildProcessError:
                child_reaped = True
            try:
                _, status = os.waitpid(grandchild, 0)
                fate = f"killed by {os.WTERMSIG(status)}"
            except ChildProcessError:
                # Killed before its shell: the shell reaped it before dying itself.
                fate = "running" if os.path.exists(f"/proc/{grandchild}") else "gone"
            print(json.dumps({"detail": result.detail, "latency": result.latency,
                              "child_reaped": child_reaped, "grandchild": fate}))

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pids")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["detail"] == "timed out after 0.5s"
    assert seen["latency"] < 2.5
    assert seen["child_reaped"]
    assert seen["grandchild"] in ("killed by 9", "gone")  # SIGKILL from the check


def _marked(mark: bytes) -> list[int]:
    """Live processes (zombies excluded) whose environment holds ``mark``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0") and _state(int(name)) not in (None, "Z"):
            found.append(int(name))
    return found


_DAEMON = "setsid sh -c 'sleep 1000 & exit 0' </dev/null >/dev/null 2>&1"


@pytest.mark.parametrize(
    ("script", "ok"),
    [
        # "setsid" leaves the check's process group (and closes its end of the pipe):
        # only the walk of the process tree finds it.
        ("setsid sh -c 'exec 1>&-; sleep 1000' & exec sleep 1000", False),
        # setsid and a double fork: the daemon's parent exits, it belongs to init,
        # neither in the check's group nor in its tree; the run's mark in its
        # environment finds it (a break-it run saw 25 left by an agent after 5 s).
        (f"{_DAEMON}; sleep 1000", False),
        (f"{_DAEMON}; exit 0", True),
    ],
    ids=["setsid-escapee", "daemon-timed-out", "daemon-exited"],
)
async def test_a_command_leaves_nothing_running_once_its_run_ends(script: str, ok: bool) -> None:
    mark = f"RA_TREE_MARK={os.getpid()}-{time.monotonic_ns()}"
    check = CommandCheck(["sh", "-c", script], env=dict([mark.split("=")]), timeout=0.5)
    leftovers: list[int] = []
    try:
        for run in range(2):
            result = await check.run()
            assert result.ok == ok, result
            if not ok:
                assert result.detail == "timed out after 0.5s"
            assert result.latency < 2.5, f"run {run}: {result.latency:.2f}s"
            await asyncio.sleep(0.2)  # a SIGKILLed process may take a moment to go
            leftovers = _marked(mark.encode())
            print(f"run {run}: {result.latency:.3f}s, processes of the check left: {leftovers}")
            assert leftovers == []
    finally:
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_command_that_exits_leaves_nothing_running(tmp_path: Path) -> None:
    # The leftover keeps the output pipe open: the check must not wait for it.
    pidfile = tmp_path / "left.pid"
    check = CommandCheck(
        ["sh", "-c", 'sleep 100 & echo $! > "$1"; echo fine', "sh", str(pidfile)], timeout=5
    )
    result = await check.run()
    assert (result.ok, result.detail) == (True, "fine")
    assert result.latency < 2
    left = int(pidfile.read_text())
    await _until(lambda: _state(left) in (None, "Z"), within=5)


async def test_command_checks_get_a_scrubbed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "CONSUL_HTTP_TOKEN": "consul-token-1",
        "REGISTRY_AGENT_TOKEN": "agent-token-2",
        "REGISTRY_AGENT_BACKEND": "etcd://root:pw3@127.0.0.1:2379",
        "ETCD_PASSWORD": "etcd-password-4",
        "ETCDCTL_PASSWORD": "etcd-password-5",
        "AWS_SECRET_ACCESS_KEY": "aws-6",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_TIME", "C")
    out = tmp_path / "env"
    argv = ["sh", "-c", 'env > "$1"', "sh", str(out)]

    assert (await CommandCheck(argv).run()).ok
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    for name, value in secrets.items():
        assert name not in seen
        assert value not in out.read_text()
    assert seen["PATH"] == os.environ["PATH"]
    assert seen["LC_TIME"] == "C"
    assert seen[RUN_MARK].startswith(f"{os.getpid()}.")  # what finds its leftovers

    given = {"PGHOST": "db", "CONSUL_HTTP_TOKEN": "for-this-check"}
    assert (await CommandCheck(argv, env=given).run()).ok
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert seen["PGHOST"] == "db"
    assert seen["CONSUL_HTTP_TOKEN"] == "for-this-check"
    assert "REGISTRY_AGENT_TOKEN" not in seen


async def test_a_cancelled_command_is_killed_and_reaped_promptly(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    check = CommandCheck(["sh", "-c", 'echo $$ > "$1"; exec sleep 100', "sh", str(pidfile)])
    check.timeout = 60
    task = asyncio.create_task(check.run())
    await _until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", within=10)
    pid = int(pidfile.read_text())
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await check.aclose()
    assert time.monotonic() - started < 1.5
    assert _state(pid) is None  # killed and reaped by us: not even a zombie


async def test_a_command_killed_by_a_signal_says_so() -> None:
    result = await CommandCheck(["sh", "-c", "kill -TERM $$"]).run()
    assert (result.ok, result.detail) == (False, "killed by signal 15")


@pytest.mark.parametrize("env", [{"A": 1}, {"": "x"}, {"A=B": "x"}, ["A=B"]])
def test_bad_command_env_names_the_field(env: object) -> None:
    with pytest.raises(ConfigError) as info:
        CommandCheck(["true"], env=env)  # type: ignore[arg-type]
    assert info.value.field == "check command true: env"


# -- credentials in HTTP check URLs -----------------------------------------------


def _no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert QUOTED_PASSWORD not in text
        assert "s3cr" not in text


async def test_http_credentials_are_sent_as_basic_auth_and_never_shown(http_url: str) -> None:
    host = http_url.removeprefix("http://")
    check = HttpCheck(f"http://alice:{QUOTED_PASSWORD}@{host}/auth")
    result = await check.run()
    assert (result.ok, result.detail) == (True, "HTTP 200")
    assert check.url == f"http://alice:***@{host}/auth"
    assert check.name == f"http http://alice:***@{host}/auth"
    _no_password(check.url, check.name, repr(check), str(check.__dict__.get("url")))
    wrong = HttpCheck(f"http://alice:wrong@{host}/auth")
    assert (await wrong.run()).detail == "HTTP 401"
    assert "wrong" not in repr(wrong) + wrong.url
    # Not escaped, "@" and ":" in the password still split at the last "@".
    loose = HttpCheck(f"http://alice:{PASSWORD}@{host}/auth")
    assert (await loose.run()).ok
    assert loose.url == f"http://alice:***@{host}/auth"
    token = HttpCheck(f"http://tok-{QUOTED_PASSWORD}@{host}/ok")
    assert token.url == f"http://***@{host}/ok"
    _no_password(token.name, repr(token))
    for c in (check, wrong, loose, token):
        await c.aclose()


async def test_credentials_in_the_query_are_sent_and_never_shown(http_url: str) -> None:
    check = HttpCheck(f"{http_url}/query?access_token=tok-{QUOTED_PASSWORD}&v=1&api_key=k")
    assert (await check.run()).ok  # the server checks the token it was given
    assert check.url == f"{http_url}/query?access_token=***&v=1&api_key=***"
    _no_password(check.url, check.name, repr(check))
    refused = HttpCheck(f"http://127.0.0.1:{free_port()}/?password={QUOTED_PASSWORD}")
    result = await refused.run()
    assert not result.ok
    _no_password(result.detail, refused.url, refused.name)
    for c in (check, refused):
        await c.aclose()
    # Names a break-it run saw shown in clear: ?pass=, ?jwt=, AWS presigned URLs.
    presigned = HttpCheck(
        "http://127.0.0.1:1/h?pass=p4ss&jwt=eyJhbGci.x.y&X-Amz-Credential=AKIA/2026"
        "&X-Amz-Signature=abcd1234&X-Amz-Security-Token=t0k&v=2"
    )
    assert presigned.url == (
        "http://127.0.0.1:1/h?pass=***&jwt=***&X-Amz-Credential=***"
        "&X-Amz-Signature=***&X-Amz-Security-Token=***&v=2"
    )
    await presigned.aclose()


async def test_failing_http_checks_never_show_the_password(http_url: str) -> None:
    # Refused, timing out, a stalled server, garbage answers: every detail and error.
    stalled = socket.create_server(("127.0.0.1", 0))
    garbage = await asyncio.start_server(
        lambda r, w: (w.write(b"\x00\xffnot http " + PASSWORD.encode() + b"\r\n\r\n"), w.close()),
        "127.0.0.1",
        0,
    )
    targets = {
        "refused": f"127.0.0.1:{free_port()}/",
        "slow": f"{http_url.removeprefix('http://')}/slow",
        "stalled": f"127.0.0.1:{stalled.getsockname()[1]}/",
        "garbage": f"127.0.0.1:{garbage.sockets[0].getsockname()[1]}/",
    }
    try:
        for what, target in targets.items():
            url = f"http://alice:{QUOTED_PASSWORD}@{target}"
            check = HttpCheck(url, timeout=0.5)
            result = await check.run()
            assert not result.ok, what
            _no_password(result.detail, repr(check), check.name, json.dumps(result.to_dict()))
            try:
                async with asyncio.timeout(1):
                    await check.probe()
            except (Exception, TimeoutError) as exc:
                _no_password(str(exc), repr(exc))
            await check.aclose()
    finally:
        stalled.close()
        garbage.close()
        await garbage.wait_closed()


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://alice:{QUOTED_PASSWORD}@host/",
        f"http://alice:{QUOTED_PASSWORD}@[::1/",
        f"http://alice:{QUOTED_PASSWORD}@host:port/",
        "http://alice:s3cr/t-pw@host/",  # not escaped: "/" ends the host early
    ],
)
def test_bad_http_urls_do_not_echo_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        HttpCheck(url)
    assert info.value.field == "http"
    _no_password(str(info.value))


async def test_aclose_is_prompt_with_a_request_in_flight() -> None:
    stalled = socket.create_server(("127.0.0.1", 0))
    try:
        check = HttpCheck(f"http://127.0.0.1:{stalled.getsockname()[1]}/", timeout=30)
        task = asyncio.create_task(check.run())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await check.aclose()
        assert time.monotonic() - started < 1
    finally:
        stalled.close()


def _open_fds() -> int:
    gc.collect()  # descriptors earlier tests left to the garbage collector go first
    return len(os.listdir("/proc/self/fd"))


async def test_command_runs_leak_no_descriptors_even_when_an_escapee_holds_the_pipe() -> None:
    # "setsid" leaves the check's group: it is not killed and keeps the pipe open.
    escapes = CommandCheck(["sh", "-c", "setsid sleep 2 & echo hi"], timeout=5)
    plain = CommandCheck([sys.executable, "-c", "print('x' * 100000)"], timeout=5)
    await plain.run()
    before = _open_fds()
    for _ in range(5):
        result = await escapes.run()
        assert (result.ok, result.detail) == (True, "hi")
        assert result.latency < 1.5  # not waiting for the escapee's end of the pipe
        assert (await plain.run()).ok
    assert _open_fds() <= before


async def test_no_check_kind_raises(http_url: str, tmp_path: Path) -> None:
    def explodes(body: object) -> bool:
        raise ValueError("predicate broke")

    not_executable = tmp_path / "check.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    checks = [
        HttpCheck(f"{http_url}/json", body=explodes),
        HttpCheck(f"{http_url}/ok", body=lambda body: True),  # 200 with a JSON body: fine
        HttpCheck(f"{http_url}/redirect", body=lambda body: body["missing"]),
        CommandCheck([str(not_executable)]),
        CommandCheck(["sh", "-c", "exit 0", "nul\0byte"]),
        CallableCheck(lambda: 1 / 0),
        CallableCheck(
            lambda: asyncio.sleep(30), timeout=0.2
        ),  # a sync function returning a coroutine
    ]
    results = [await check.run() for check in checks]
    assert [r.ok for r in results] == [False, True, False, False, False, False, False]
    assert all(r.detail for r in results)
    for check in checks:
        await check.aclose()


def test_secret_header_values_are_secrets_of_the_check() -> None:
    check = HttpCheck(
        "http://127.0.0.1:1/health?api_key=k3y-v4lue",
        headers={"Authorization": "Bearer hdr-s3cret", "Accept": "text/plain"},
    )
    assert {"Bearer hdr-s3cret", "k3y-v4lue"} <= set(check.secrets())
    assert "text/plain" not in check.secrets()
    assert check._mask("echo: Bearer hdr-s3cret") == "echo: ***"


def test_each_shipped_kind_is_registered_under_its_key() -> None:
    from registry_agent._health.checks import CHECK_KINDS

    assert dict(CHECK_KINDS) == {
        "http": HttpCheck,
        "tcp": TcpCheck,
        "command": CommandCheck,
        "grpc": GrpcCheck,
    }
    assert all(cls.example.startswith(f"{kind} = ") for kind, cls in CHECK_KINDS.items())


async def test_a_details_output_cannot_forge_a_log_line_or_drive_a_terminal() -> None:
    # A break-it run: a check printing a newline, a fake log line and escape sequences
    # (clear screen, window title) got them into the agent's log and the terminal.
    forged = "boom\n2026-12-02T00:00:00Z ERROR   registry_agent.agent: FAKE\x1b[2J\x1b]0;pwned\x07"
    script = f"import sys; sys.stdout.write({forged!r}); sys.exit(1)"
    result = await CommandCheck([sys.executable, "-c", script]).run()
    assert not result.ok
    assert result.detail == (
        "exit 1: boom ⏎ 2026-12-02T00:00:00Z ERROR   registry_agent.agent: FAKE"
        "\\x1b[2J\\x1b]0;pwned\\x07"
    )
    assert result.detail.isprintable()

    def raising() -> bool:
        raise RuntimeError("line one\r\nline\ttwo\x00")

    detail = (await as_check(raising).run()).detail
    assert detail.isprintable(), detail
    assert "line one ⏎ line two\\x00" in detail
