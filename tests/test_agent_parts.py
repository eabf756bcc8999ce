"""The status server, readiness, the orphan reaper and the log formatters, alone."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from registry_agent import ConfigError
from registry_agent._agent.config import ServiceConfig, load_config, parse_config
from registry_agent._agent.logs import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    remember_secrets,
)
from registry_agent._agent.reaper import OrphanReaper, children, zombie_children
from registry_agent._agent.runtime import AgentRuntime, open_configured_backend
from registry_agent._agent.status import StatusServer, iso_time, iso_times, json_body
from registry_agent.testing.memory import MemoryRegistry


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_status_server_routes_and_methods() -> None:
    server = StatusServer("127.0.0.1", 0, {"/healthz": lambda: json_body(200, {"ok": True})})
    await server.start()
    try:
        status, headers, body = await request(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert (status, json.loads(body)) == (200, {"ok": True})
        assert headers["Content-Type"] == "application/json"
        status, _, body = await request(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        status, headers, body = await request(server.port, b"POST /healthz HTTP/1.1\r\n\r\n")
        assert (status, headers["Allow"], body) == (405, "GET, HEAD", b"only GET and HEAD\n")
        status, _, body = await request(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == 404
        assert b"/healthz" in body
        status, _, _ = await request(server.port, b"garbage\r\n\r\n")
        assert status == 400
    finally:
        await server.close()


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "registry_agent.registrar", logging.WARNING, __file__, 1, message, args, None
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_and_json_logs_mask_secrets() -> None:
    rec = record(
        "token %s rejected",
        "tok-123",
        event="register_failed",
        service="orders",
        error="bad tok-123",
    )
    text = TextFormatter(["tok-123"]).format(rec)
    assert "tok-123" not in text
    assert "token *** rejected" in text
    data = json.loads(JsonFormatter(["tok-123"]).format(rec))
    assert data["message"] == "token *** rejected"
    assert (data["event"], data["service"], data["error"]) == (
        "register_failed",
        "orders",
        "bad ***",
    )
    assert data["level"] == "warning"


def test_configure_logging_replaces_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "info", ["pw"])
        logging.getLogger("registry_agent.test").info("hello pw")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["message"] == "hello ***"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_status_token_guards_all_but_healthz() -> None:
    ok = lambda: json_body(200, {"ok": True})  # noqa: E731
    server = StatusServer("127.0.0.1", 0, {"/healthz": ok, "/status": ok}, token="t0k")
    await server.start()
    try:
        assert (await request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        status, headers, body = await request(server.port, b"GET /status HTTP/1.1\r\n\r\n")
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="registry-agent"')
        assert b"true" not in body
        wrong = b"GET /status HTTP/1.1\r\nAuthorization: Bearer t0kX\r\n\r\n"
        assert (await request(server.port, wrong))[0] == 401
        right = b"GET /status HTTP/1.1\r\nauthorization: bearer t0k\r\n\r\n"
        assert (await request(server.port, right))[0] == 200
    finally:
        await server.close()


async def test_idle_connections_are_capped_and_the_oldest_evicted() -> None:
    server = StatusServer(
        "127.0.0.1",
        0,
        {"/healthz": lambda: json_body(200, {"ok": True})},
        max_connections=4,
        head_timeout=0.5,
        redact=lambda body: body.replace(b"true", b"***"),
    )
    await server.start()
    idle = []
    try:
        for _ in range(10):
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            await asyncio.sleep(0.01)
        assert server.connections <= 4
        # A real request still gets in (it evicts the oldest idle one) and is redacted.
        status, _, body = await request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b'{\n  "ok": ***\n}\n')
        assert server.evicted >= 6
        # The oldest were cut; the rest time out on their head.
        assert await asyncio.wait_for(idle[0][0].read(), 1) == b""
        await asyncio.sleep(0.8)
        assert server.connections == 0
        assert server.timed_out >= 1
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


def test_the_reaper_reaps_only_zombies_seen_twice() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 5
    while not any(p == pid for p, _ in zombie_children()):
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    reaper = OrphanReaper()
    assert reaper.scan() == 0  # seen once: it may be someone's to wait for
    assert any(p == pid for p, _ in zombie_children())
    assert reaper.scan() == 1
    assert not any(p == pid for p, _ in zombie_children())
    assert reaper.reaped == 1


async def test_listening_beyond_loopback_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async def no_bind(self: StatusServer) -> None:
        self.port = 9750

    monkeypatch.setattr(StatusServer, "start", no_bind)
    base = {"backend": {"url": "consul://127.0.0.1:8500"}, "service": [{"name": "a", "port": 1}]}
    for listen, token, warned in (
        ("0.0.0.0:9750", None, "set [status] token to require one"),
        ("0.0.0.0:9750", "t", "needs the bearer token"),
        ("127.0.0.1:9750", None, None),
        ("[::1]:9750", None, None),
        ("localhost:9750", None, None),
    ):
        status = {"listen": listen, **({"token": token} if token else {})}
        config = parse_config({**base, "status": status}, env={}, base=tmp_path)
        caplog.clear()
        with caplog.at_level(logging.INFO, "registry_agent.agent"):
            await AgentRuntime(config)._start_status_server()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warned is None:
            assert warnings == [], listen
        else:
            (message,) = warnings
            assert "beyond loopback" in message
            assert warned in message


async def test_a_status_port_in_use_is_an_error_naming_the_field(tmp_path: Path) -> None:
    # A break-it run: "unexpected OSError: [Errno 98] Address already in use (while
    # attempting to bind ...)", naming neither the setting nor the file.
    base = {"backend": {"url": "consul://127.0.0.1:8500"}, "service": [{"name": "a", "port": 1}]}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = parse_config(
            {**base, "status": {"listen": f"127.0.0.1:{port}"}},
            env={},
            base=tmp_path,
            source=str(tmp_path / "agent.toml"),
        )
        with pytest.raises(ConfigError) as caught:
            await AgentRuntime(config)._start_status_server()
    assert str(caught.value) == (
        f"{tmp_path / 'agent.toml'}: status.listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )


def test_status_and_metrics_are_scrubbed_of_every_credential(tmp_path: Path) -> None:
    config = parse_config(
        {
            "backend": {"url": "consul://127.0.0.1:8500", "token": "backend-tok"},
            "status": {"token": "status-tok"},
            "service": [
                {
                    "name": "a",
                    "port": 8080,
                    "check": [{"http": 'http://u:p"w-8080@127.0.0.1:8080/'}],
                }
            ],
        },
        env={},
        base=tmp_path,
    )
    runtime = AgentRuntime(config)
    data = {"why": "backend-tok refused; status-tok", 'p"w-8080': ['x p"w-8080'], "port": 8080}
    assert runtime._scrub(data) == {"why": "*** refused; ***", "***": ["x ***"], "port": 8080}
    metrics = b'check_up{check="http http://u:p\\"w-8080@h/"} 1.0\nport 8080\n'
    assert (
        runtime._scrub_text(metrics) == b'check_up{check="http http://u:***@h/"} 1.0\nport 8080\n'
    )


def test_secrets_added_on_reload_are_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("text", "info", ["old-secret"])
        remember_secrets(["new-secret"])
        logging.getLogger("registry_agent.test").info("old-secret then new-secret")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.endswith("registry_agent.test: *** then ***")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _memory_services(path: Path, registry: str, names: list[str], ttl: str = "10s") -> None:
    text = f'[backend]\nurl = "memory://{registry}"\n[status]\nlisten = "off"\n'
    for name in names:
        text += f'[[service]]\nname = "{name}"\naddress = "127.0.0.1"\nport = 80\nttl = "{ttl}"\n'
    path.write_text(text)


async def _running(path: Path) -> AgentRuntime:
    """A runtime serving ``path`` on the memory backend (no signals, no subreaper)."""
    runtime = AgentRuntime(load_config(path, env={}))
    runtime._turn = asyncio.Lock()
    runtime.backend = open_configured_backend(runtime.config)
    for service in runtime.config.services:
        await runtime._start_service(service)
    return runtime


async def _held(registry: str, names: list[str], expected: int) -> int:
    """How many entries of ``names`` the registry holds, once it is ``expected`` (2s at most)."""
    memory = MemoryRegistry.named(registry)
    deadline = time.monotonic() + 2
    while True:
        held = sum(len(memory.snapshot(name).instances) for name in names)
        if held == expected or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.01)


async def test_a_reload_logs_what_it_did(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "agent.toml"
    _memory_services(path, "reload-counts", ["a", "b", "c"])
    runtime = await _running(path)
    # a unchanged, b changed (ttl), c removed, d and e added.
    text = path.read_text()
    _memory_services(path, "reload-counts", ["a", "d", "e"])
    path.write_text(
        path.read_text()
        + '[[service]]\nname = "b"\naddress = "127.0.0.1"\nport = 80\nttl = "20s"\n'
    )
    assert text != path.read_text()
    with caplog.at_level(logging.INFO, "registry_agent.agent"):
        await runtime.reload()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded")]
    assert line == "reloaded: 2 added, 1 changed, 1 removed, 1 unchanged"
    assert runtime.reloads == 1
    assert await _held("reload-counts", ["a", "b", "c", "d", "e"], 4) == 4
    await runtime.shutdown()
    assert await _held("reload-counts", ["a", "b", "c", "d", "e"], 0) == 0


async def test_a_reload_cut_short_by_a_stop_logs_what_it_did(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    names = [f"b{i}" for i in range(20)]
    _memory_services(path, "reload-cut", ["a0"])
    runtime = await _running(path)
    old_config = runtime.config
    _memory_services(path, "reload-cut", names)
    start = runtime._start_service
    started = 0

    async def start_then_stop(service: ServiceConfig) -> None:
        nonlocal started
        await start(service)
        started += 1
        if started == 3:
            runtime.request_stop()  # SIGTERM while the reload starts the new services

    runtime._start_service = start_then_stop  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, "registry_agent.agent"):
        await runtime.reload()
        assert await _held("reload-cut", ["a0", *names], 3) == 3  # b0-b2, a0 gone
        await runtime.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("reloaded") for m in messages), messages
    assert (
        "reload interrupted by stop: 3 of 20 service(s) started, 1 removed; "
        "the stop deregisters every one"
    ) in messages
    assert "stopping: deregistering 3 service(s)" in messages
    assert not any("-" + str(n) in m for m in messages for n in range(1, 21) if "service" in m)
    assert runtime.reloads == 0
    assert runtime.config is old_config  # the new file never ran whole
    assert await _held("reload-cut", ["a0", *names], 0) == 0


async def test_a_reload_queued_behind_the_stop_says_it_was_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP then SIGTERM at once: the stop takes the turn first and cancels the waiting
    reload when it is done (a race seen in a fresh-clone run); the log still says the reload
    did nothing."""
    path = tmp_path / "agent.toml"
    _memory_services(path, "reload-queued", ["a0"])
    runtime = await _running(path)
    _memory_services(path, "reload-queued", ["b0"])
    with caplog.at_level(logging.INFO, "registry_agent.agent"):
        stopping = asyncio.ensure_future(runtime.shutdown())
        await asyncio.sleep(0)  # the stop holds the turn
        runtime._spawn(runtime.reload())
        await stopping
    messages = [r.getMessage() for r in caplog.records]
    assert "reload skipped: stopping" in messages, messages
    assert not any(m.startswith("reloaded") for m in messages), messages
    assert await _held("reload-queued", ["a0", "b0"], 0) == 0


def test_the_exit_pass_reaps_adopted_zombies_and_waits_a_little_for_the_rest() -> None:
    exited = os.fork()
    if exited == 0:
        os._exit(0)
    soon = os.fork()
    if soon == 0:
        time.sleep(0.3)
        os._exit(0)
    late = os.fork()
    if late == 0:
        time.sleep(30)
        os._exit(0)
    try:
        reaper = OrphanReaper(exit_grace=1.0)
        started = time.monotonic()
        assert asyncio.run(reaper.final()) == 2
        took = time.monotonic() - started
        print(f"final pass: {took:.2f}s (grace {reaper.exit_grace:g}s)")
        # Waited the grace for the one still running, then left it alive.
        assert reaper.exit_grace <= took < reaper.exit_grace + 0.5
        assert set(children()) == {late}
        assert children()[late][0] != "Z"
    finally:
        os.kill(late, signal.SIGKILL)
        os.waitpid(late, 0)
    reaper = OrphanReaper(exit_grace=5.0)
    started = time.monotonic()
    assert asyncio.run(reaper.final()) == 0
    assert time.monotonic() - started < 0.5  # nothing left: no wait


async def test_status_readyz_and_metrics_read_one_status(tmp_path: Path) -> None:
    """/status, /readyz and /metrics are rendered from one typed status per service."""
    path = tmp_path / "agent.toml"
    path.write_text(
        '[backend]\nurl = "memory://one-status"\n[status]\nlisten = "off"\n'
        '[[service]]\nname = "up"\nid = "up-1"\nport = 80\ngate = { rise = 1 }\n'
        '[[service.check]]\ncommand = ["true"]\ninterval = "50ms"\n'
        '[[service]]\nname = "down"\nid = "down-1"\nport = 81\ngate = { rise = 1 }\n'
        '[[service.check]]\ncommand = ["false"]\ninterval = "50ms"\n'
    )
    runtime = await _running(path)
    try:
        deadline = time.monotonic() + 5
        while not runtime.snapshots()["up/up-1"].ready:
            assert time.monotonic() < deadline, runtime.status()
            await asyncio.sleep(0.02)
        snapshots = runtime.snapshots()
        down = snapshots["down/down-1"]
        assert not down.ready
        assert down.not_ready_reason
        status = {s["instance"]: s for s in runtime.status()["services"]}
        assert {k: (v["ready"], v["not_ready_reason"]) for k, v in status.items()} == {
            "up-1": (True, None),
            "down-1": (False, down.not_ready_reason),
        }
        # Nothing moves while it is down; /status shows its times in ISO 8601 (UTC, ms).
        assert status["down-1"] == iso_times(down.to_dict())
        at = status["down-1"]["checks"]["command false"]["at"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", at), at
        assert at == iso_time(down.checks["command false"].last.at)  # type: ignore[union-attr]
        assert re.fullmatch(r"\d{4}-.*Z", runtime.status()["agent"]["started_at"])
        code, _, body = runtime._readyz()
        readyz = json.loads(body)
        assert code == 503
        assert readyz["not_ready"] == {
            "down/down-1": {
                "state": down.state,
                "registered": False,
                "registry_status": None,
                "why": down.not_ready_reason,
            }
        }
        metrics = runtime.metrics.render().decode()
        for line in (
            'registry_agent_ready{instance_id="up-1",service="up"} 1.0',
            'registry_agent_ready{instance_id="down-1",service="down"} 0.0',
            'registry_agent_registered{instance_id="up-1",service="up"} 1.0',
            'registry_agent_check_up{check="command false",instance_id="down-1",service="down"}'
            " 0.0",
            'registry_agent_check_up{check="command true",instance_id="up-1",service="up"} 1.0',
            'registry_agent_service_state{instance_id="up-1",service="up",state="registered"} 1.0',
            'registry_agent_registrations_total{instance_id="up-1",service="up"} 1.0',
            'registry_agent_registrations_total{instance_id="down-1",service="down"} 0.0',
        ):
            assert line in metrics, line
    finally:
        await runtime.shutdown()


async def test_the_agents_services_share_the_backends_liveness(tmp_path: Path) -> None:
    """Every service of the agent is on one backend object: one liveness per TTL for all."""
    path = tmp_path / "agent.toml"
    _memory_services(path, "shared-liveness?shared=true", ["a", "b", "c"])
    runtime = await _running(path)
    try:
        registrars = [reg for _, reg in runtime.registrars.values()]
        deadline = time.monotonic() + 5
        while not all(reg.registered for reg in registrars):
            assert time.monotonic() < deadline, runtime.status()
            await asyncio.sleep(0.02)
        leases = [reg._lease for reg in registrars]
        assert all(lease is not None and lease.shared for lease in leases), leases
        assert len({lease.handle for lease in leases if lease is not None}) == 1
    finally:
        await runtime.shutdown()
    assert await _held("shared-liveness", ["a", "b", "c"], 0) == 0
