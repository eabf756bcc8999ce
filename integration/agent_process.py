"""A `registry-agent run` subprocess for tests: config, logs, status port, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from registry_agent import HealthStatus, open_backend
from registry_agent.testing.servers import free_port

ONE_SERVICE = """
[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
ttl = "3s"
"""


class Agent:
    """A `registry-agent run` subprocess with its config, logs and status port."""

    def __init__(
        self, tmp_path: Path, backend_url: str, services: str, extra_backend: str = ""
    ) -> None:
        self.status_port = free_port()
        self.path = tmp_path / "agent.toml"
        self.log_path = tmp_path / "agent.log"
        self.backend_url = backend_url
        self.extra_backend = extra_backend
        self.write(services)
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, services: str) -> None:
        self.path.write_text(
            f'[backend]\nurl = "{self.backend_url}"\n{self.extra_backend}\n'
            f'[status]\nlisten = "127.0.0.1:{self.status_port}"\n' + textwrap.dedent(services)
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> Agent:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registry_agent", "run", "-c", str(self.path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return self

    def get(self, path: str) -> tuple[int | None, Any]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.status_port}{path}", timeout=2
            ) as r:
                body = r.read().decode()
                return r.status, body if path == "/metrics" else json.loads(body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())
        except OSError:
            return None, None

    def until(self, path: str, status: int, within: float = 15.0) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            code, body = self.get(path)
            if code == status:
                return body
            time.sleep(0.1)
        pytest.fail(f"{path} never answered {status}; last {code} {body}\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def listed(url: str, service: str) -> dict[str, HealthStatus]:
    async def read() -> dict[str, HealthStatus]:
        backend = open_backend(url)
        try:
            snapshot = await backend.list(service)
        finally:
            await backend.close()
        return {iid: h.status for iid, h in snapshot.instances.items()}

    return asyncio.run(read())
