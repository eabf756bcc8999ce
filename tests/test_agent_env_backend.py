"""The agent's file may leave out [backend]: `run` and `check` then take it from the
environment, as the library's from_env constructors do; with nothing set, one line
naming what to set and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry_agent._cli import main

SERVICE = '[[service]]\nname = "orders"\naddress = "127.0.0.1"\nport = 8080\n'


@pytest.fixture
def no_backend_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_check_takes_the_backend_from_the_environment(
    no_backend_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "agent.toml").write_text(SERVICE)
    no_backend_env.setenv("REGISTRY_AGENT_BACKEND", "memory://env-agent")
    assert main(["check", "-c", str(tmp_path / "agent.toml")]) == 0
    assert "valid; 1 service(s)" in capsys.readouterr().out


def test_no_backend_anywhere_is_one_line(
    no_backend_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "agent.toml").write_text(SERVICE)
    assert main(["run", "-c", str(tmp_path / "agent.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no [backend] table" in err
    assert "CONSUL_HTTP_ADDR" in err
