"""Health checks: every outcome is a result, hangs are bounded, nothing leaks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from registry_agent import CallableCheck, CommandCheck, ConfigError, HttpCheck, TcpCheck
from registry_agent._health.checks import as_check
from registry_agent.testing.servers import free_port


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
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
    ],
)
def test_bad_checks_name_the_field(make: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field
