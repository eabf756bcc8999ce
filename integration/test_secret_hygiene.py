"""Secrets never leave the agent: a full run on a real ACL Consul and a real auth etcd.

Every byte the agent prints (text and JSON logs at debug level, through
success, refusal, outage and reload), every status endpoint, the process
title and the CLI's own errors are scanned for the token and passwords.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
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
