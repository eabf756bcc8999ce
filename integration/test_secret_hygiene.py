"""Secrets never leave the agent: a full run on a real ACL Consul and a real auth etcd.

Every byte the agent prints (text and JSON logs at debug level, through
success, refusal, outage and reload), every status endpoint, the process
title, the CLI's own errors, the notes the agent writes into the registry
and the environment its command checks get are scanned for the token and
passwords, an HTTP check URL's password included.
"""

from __future__ import annotations

import base64
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.acl import AclConsul
from integration.agent_process import ONE_SERVICE, Agent
from registry_agent.testing.servers import EtcdServer


def surfaces(agent: Agent) -> list[str]:
    """Everything an operator or a scraper can read off the running agent."""
    assert agent.proc is not None
    texts = [json.dumps(agent.get(path)) for path in ("/healthz", "/readyz", "/status")]
    texts.append(str(agent.get("/metrics")[1]))
    texts.append(Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().decode(errors="replace"))
    texts.append(Path(f"/proc/{agent.proc.pid}/comm").read_text())
    return texts


def wait_for_log(agent: Agent, needle: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if needle in agent.logs():
            return
        time.sleep(0.1)
    pytest.fail(f"{needle!r} never logged:\n{agent.logs()}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_consul_token_never_shows(
    acl: AclConsul, tmp_path: Path, agents: list[Agent], log_format: str
) -> None:
    wrong = str(uuid.uuid4())
    token_file = tmp_path / "token"
    token_file.write_text(acl.token)
    agent = Agent(tmp_path, acl.server.url, ONE_SERVICE, extra_backend='token_file = "token"')
    agents.append(agent.start("--log-format", log_format, "--log-level", "debug"))
    agent.until("/readyz", 200)
    seen = surfaces(agent)
    # Outage: errors now carry the backend's details.
    acl.server.stop()
    time.sleep(1.0)
    seen += surfaces(agent)
    acl.server.start()
    agent.until("/readyz", 200, within=20)
    # Reload with a token Consul does not know: refusals are logged (once), with no token.
    token_file.write_text(wrong)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for_log(agent, "does not know this ACL token")
    seen += surfaces(agent)
    assert agent.stop() == 0
    logs = agent.logs()
    assert "permission denied for service 'orders'" in logs
    for text in [logs, *seen]:
        assert acl.token not in text
        assert wrong not in text
        assert acl.server.acl_token not in text


def test_etcd_password_never_shows(tmp_path: Path, agents: list[Agent]) -> None:
    server = EtcdServer()
    server.start()
    try:
        server.enable_auth("root-Pa55word")
        password, wrong = "agent-Pa55word-1", "agent-Wr0ngword-2"
        server.add_user("agent", password, read_write_prefix="/services/")
        (tmp_path / "pw").write_text(password)
        agent = Agent(
            tmp_path, server.url, ONE_SERVICE, extra_backend='user = "agent"\npassword_file = "pw"'
        )
        agents.append(agent.start("--log-format", "json", "--log-level", "debug"))
        agent.until("/readyz", 200)
        seen = surfaces(agent)
        (tmp_path / "pw").write_text(wrong)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        wait_for_log(agent, "wrong user name or password")
        seen += surfaces(agent)
        assert agent.stop() == 0
        for text in [agent.logs(), *seen]:
            assert password not in text
            assert wrong not in text
    finally:
        server.close()


def test_cli_errors_never_echo_credentials_from_the_url() -> None:
    secret = "cli-Secr3t-in-url"
    for url in (
        f"consul://127.0.0.1:1?token={secret}",
        f"etcd://user:{secret}@127.0.0.1:1",
        f"consul://127.0.0.1:1?token={secret}&colour=red",
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "registry_agent",
                "list",
                "--backend",
                url,
                "orders",
                "--timeout",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert result.stderr.startswith("registry-agent: ")
        assert "Traceback" not in result.stderr
        assert secret not in result.stdout + result.stderr


# -- an HTTP check's password, the registry's credentials, a command check's environment ----------


class _Flaky(http.server.BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self) -> None:
        code = 200 if type(self).healthy else 500
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_app() -> Iterator[tuple[int, type[_Flaky]]]:
    """An HTTP service that answers 200 until its handler's ``healthy`` is set False."""
    handler = type("Flaky", (_Flaky,), {"healthy": True})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], handler
    httpd.shutdown()
    httpd.server_close()


HTTP_PASSWORD = "chk-Pa55-in-url"


def guarded_service(app_port: int, env_file: Path) -> str:
    return f"""
[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
ttl = "3s"
on_unhealthy = "critical"
gate = {{ fall = 1, rise = 1 }}

[[service.check]]
http = "http://probe:{HTTP_PASSWORD}@127.0.0.1:{app_port}/health"
interval = "200ms"

[[service.check]]
command = ["sh", "-c", "env > {env_file}"]
env = {{ CHECK_SETTING = "given-explicitly" }}
interval = "200ms"
"""


def _held_critical(agent: Agent) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, status = agent.get("/status")
        if status and status["services"][0]["registry_status"] == "critical":
            return
        time.sleep(0.1)
    pytest.fail(f"never held critical:\n{agent.logs()}")


def _check_env(env_file: Path, secrets: list[str]) -> None:
    text = env_file.read_text()
    assert "CHECK_SETTING=given-explicitly" in text
    assert "REGISTRY_AGENT_" not in text
    for secret in secrets:
        assert secret not in text


def test_consul_http_check_password_token_and_check_env_never_show(
    acl: AclConsul,
    tmp_path: Path,
    agents: list[Agent],
    flaky_app: tuple[int, type[_Flaky]],
) -> None:
    port, app = flaky_app
    env_file = tmp_path / "check.env"
    agent = Agent(tmp_path, acl.server.url, guarded_service(port, env_file))
    # The token comes from the environment: exactly what a command check must not inherit.
    agents.append(
        agent.start(
            "--log-format", "json", "--log-level", "debug", env={"REGISTRY_AGENT_TOKEN": acl.token}
        )
    )
    agent.until("/readyz", 200)
    seen = surfaces(agent)
    app.healthy = False
    _held_critical(agent)
    seen += surfaces(agent)
    checks = acl.server.api("/v1/agent/checks")
    notes = json.dumps([c for c in checks.values() if c.get("ServiceName") == "orders"])
    assert "unhealthy" in notes  # the note was written, and says why
    assert "HTTP 500" in notes
    secrets = [HTTP_PASSWORD, acl.token, acl.server.acl_token]
    _check_env(env_file, secrets)
    assert agent.stop() == 0
    for text in [agent.logs(), notes, *seen]:
        for secret in secrets:
            assert secret not in text


def test_etcd_http_check_password_and_check_env_never_show(
    tmp_path: Path, agents: list[Agent], flaky_app: tuple[int, type[_Flaky]]
) -> None:
    port, app = flaky_app
    env_file = tmp_path / "check.env"
    server = EtcdServer()
    server.start()
    try:
        server.enable_auth("root-Pa55word")
        password = "agent-Pa55word-env"
        server.add_user("agent", password, read_write_prefix="/services/")
        agent = Agent(
            tmp_path, server.url, guarded_service(port, env_file), extra_backend='user = "agent"'
        )
        agents.append(
            agent.start(
                "--log-format",
                "text",
                "--log-level",
                "debug",
                env={"REGISTRY_AGENT_PASSWORD": password},
            )
        )
        agent.until("/readyz", 200)
        seen = surfaces(agent)
        app.healthy = False
        _held_critical(agent)
        seen += surfaces(agent)
        prefix = b"/services/"
        reply = server.api(
            "/v3/kv/range",
            {
                "key": base64.b64encode(prefix).decode(),
                "range_end": base64.b64encode(prefix[:-1] + b"0").decode(),
            },
        )
        values = [base64.b64decode(kv["value"]).decode() for kv in reply["kvs"]]
        assert any("critical" in v for v in values), values
        secrets = [HTTP_PASSWORD, password, "root-Pa55word"]
        _check_env(env_file, secrets)
        assert agent.stop() == 0
        for text in [agent.logs(), *values, *seen]:
            for secret in secrets:
                assert secret not in text
    finally:
        server.close()
