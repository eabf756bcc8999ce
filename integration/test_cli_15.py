"""The command line of issue 15 against real Consul and etcd: services, the environment,
watch --once, a watch failure episode across a server restart, init then check."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry_agent import ServiceInstance, open_backend
from registry_agent._agent.config import load_config
from registry_agent._cli import main
from registry_agent.testing.servers import ConsulServer, EtcdServer, free_port

from .test_healing import Measured

ENV_NAMES = (
    "REGISTRY_AGENT_BACKEND",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "ETCDCTL_ENDPOINTS",
)


@pytest.fixture(autouse=True)
def no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def instance(service: str, port: int) -> ServiceInstance:
    return ServiceInstance(service, address="127.0.0.1", port=port)


async def test_services_on_consul_leave_out_our_heartbeat_service(
    consul_server: ConsulServer, capsys: pytest.CaptureFixture[str]
) -> None:
    backend: Any = open_backend(consul_server.url)
    try:
        await backend.register(instance("orders", 9001), ttl=30)
        await backend.register(instance("orders", 9002), ttl=30)
        # Shared liveness registers our heartbeat service beside it.
        await backend.register_shared(instance("users", 9003), ttl=30)
        catalog = consul_server.api("/v1/catalog/services")
        assert any(name.startswith("registry-agent") for name in catalog), catalog
        code = await asyncio.to_thread(main, ["services", "--backend", consul_server.url])
        assert code == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        rows = [line.split() for line in captured.out.splitlines()]
        assert rows[0] == ["SERVICE", "INSTANCES", "HEALTHY"]
        listed = {row[0]: row[1:] for row in rows[1:]}
        assert listed["orders"] == ["2", "2"]
        assert listed["users"] == ["1", "1"]
        assert "consul" in listed  # the server's own service is a service like any other
        assert not [name for name in listed if name.startswith("registry-agent")]
    finally:
        await backend.close()


async def test_services_on_etcd_per_format(
    etcd_server: EtcdServer, raw: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = open_backend(etcd_server.url)
    try:
        await backend.register(instance("orders", 9001), ttl=30)
        await raw.put(b"/services/broken/x", b"not json")  # not an instance: left out
        await raw.put(b"users.rpc/1", b"127.0.0.1:9005")  # go-zero's layout
        await raw.put(b"users.rpc/2", b"127.0.0.1:9006")
        code = await asyncio.to_thread(main, ["services", "--backend", etcd_server.url])
        assert code == 0
        captured = capsys.readouterr()
        assert [line.split() for line in captured.out.splitlines()] == [
            ["SERVICE", "INSTANCES", "HEALTHY"],
            ["orders", "1", "1"],
        ]
        assert captured.err == ""
        go_zero = f"{etcd_server.url}?format=go-zero"
        code = await asyncio.to_thread(main, ["services", "--backend", go_zero, "--json"])
        assert code == 0
        captured = capsys.readouterr()
        rows = [json.loads(line) for line in captured.out.splitlines()]
        assert [(r["service"], r["instances"], r["healthy"]) for r in rows] == [("users.rpc", 2, 2)]
        assert captured.err == ""  # keys of other formats are not instances here: no warning
    finally:
        await backend.close()


@pytest.mark.parametrize("variable", ["CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS"])
async def test_backend_from_the_registrys_own_variables(
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = consul_server if variable == "CONSUL_HTTP_ADDR" else etcd_server
    backend = open_backend(server.url)
    try:
        await backend.register(instance("orders", 9010), ttl=30)
        port = consul_server.http_port if server is consul_server else etcd_server.client_port
        monkeypatch.setenv(variable, f"127.0.0.1:{port}")
        code = await asyncio.to_thread(main, ["list", "orders", "--json"])
        assert code == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (row["id"], row["healthy"]) == ("orders-127.0.0.1-9010", True)
        code = await asyncio.to_thread(main, ["watch", "orders", "--once"])
        assert code == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[1:] for line in lines] == [
            ["EVENT", "SERVICE", "ID", "ADDRESS", "HEALTH"],
            ["added", "orders", "orders-127.0.0.1-9010", "127.0.0.1:9010", "healthy"],
        ]
    finally:
        await backend.close()


async def register_once(url: str, what: ServiceInstance) -> None:
    """Write an entry (it lives for its TTL: the backend is closed, not deregistered)."""
    backend = open_backend(url)
    try:
        await backend.register(what, ttl=30)
    finally:
        await backend.close()


class _Lines:
    """The lines a process writes on one stream, read as they come."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds until a line holding ``text`` was read; fails after ``timeout``."""
        started = time.monotonic()
        while not any(text in line for line in self.lines):
            assert time.monotonic() - started < timeout, (text, self.lines)
            time.sleep(0.05)
        return time.monotonic() - started

    def join(self) -> None:
        self._thread.join(timeout=10)


def test_a_watch_failure_episode_is_two_lines_across_an_etcd_restart(
    etcd_server: EtcdServer, measured: Measured
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    argv = ["watch", "orders", "--backend", etcd_server.url, "--timeout", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "registry_agent", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = _Lines(proc.stdout), _Lines(proc.stderr)
        out.wait_for("HEALTH", 10)
        etcd_server.stop()
        took = err.wait_for("failed (failure 1, retrying)", 15)
        measured("first failure line after etcd stopped", took, 15)
        time.sleep(4)  # retries back off up to 2 s: several more failures, no more lines
        etcd_server.start()
        # The watcher says "resumed" with the first snapshot after the failures: etcd
        # resumes a watch silently when nothing changed, so a change ends the episode.
        asyncio.run(register_once(etcd_server.url, instance("orders", 9020)))
        took = err.wait_for("resumed after", 30)
        measured("resumed line after an entry was written", took, 30)
        out.wait_for("orders-127.0.0.1-9020", 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        out.join()
        err.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert len(err.lines) == 2, err.lines
    assert err.lines[0].startswith("registry-agent: watch of orders failed (failure 1, retrying)")
    resumed = err.lines[1]
    assert resumed.startswith("registry-agent: watch of orders resumed after "), resumed
    failures = int(resumed.split("resumed after ")[1].split()[0])
    assert failures >= 3, resumed  # several failures, said in one line
    print(f"watch: {failures} failures while etcd was down, 2 lines on stderr")


@pytest.fixture
def health_port() -> Iterator[int]:
    """A loopback HTTP server answering 200 on /healthz."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_init_then_check_against_a_real_consul(
    consul_server: ConsulServer,
    health_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "agent.toml"
    argv = ["init", str(path), "--backend", consul_server.url, "--port", str(health_port)]
    assert main(argv) == 0
    config = load_config(path, env={})
    assert config.backend.url == consul_server.url
    assert config.services[0].instance.port == health_port
    capsys.readouterr()
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok web-" in out
    assert "valid; 1 service(s), 0 check(s) failing" in out
    assert main(["check", "-c", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["valid"], result["ok"]) == (True, True)
    assert result["services"][0]["checks"][0]["detail"].startswith("HTTP 200")
    # The check really runs: with nothing listening it fails, exit 1.
    closed = free_port()
    path.write_text(path.read_text().replace(f":{health_port}/healthz", f":{closed}/healthz"))
    assert main(["check", "-c", str(path)]) == 1
    assert "FAIL web-" in capsys.readouterr().out


@pytest.mark.parametrize("registry", ["consul", "etcd"])
def test_watch_piped_to_head_ends_quietly_while_it_waits_on_a_real_registry(
    registry: str, consul_server: ConsulServer, etcd_server: EtcdServer, measured: Measured
) -> None:
    # `registry-agent watch orders | head -2`: the watch then waits in a blocking query
    # (Consul) or an open watch stream (etcd) for a change that does not come; it ends
    # when the reader goes away, as `tail -f` does, with 141 and nothing on stderr.
    url = consul_server.url if registry == "consul" else etcd_server.url
    service = f"piped-{registry}-{uuid.uuid4().hex[:8]}"
    asyncio.run(register_once(url, instance(service, 9030)))
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    proc = subprocess.Popen(
        [sys.executable, "-m", "registry_agent", "watch", service, "--backend", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        header, row = proc.stdout.readline(), proc.stdout.readline()
        assert header.split() == ["TIME", "EVENT", "SERVICE", "ID", "ADDRESS", "HEALTH"]
        expected = ["added", service, f"{service}-127.0.0.1-9030", "127.0.0.1:9030", "healthy"]
        assert row.split()[1:] == expected
        assert [m.start() for m in re.finditer(r"\S+", row)] == [
            m.start() for m in re.finditer(r"\S+", header)
        ]  # the row lines up with the header
        started = time.monotonic()
        proc.stdout.close()
        code = proc.wait(timeout=20)
        measured(f"{registry}: watch exit after its reader left", time.monotonic() - started, 20)
        assert proc.stderr.read() == ""
        assert code == 141
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
