"""A `registry-agent run` subprocess for tests: config, logs, status port, signals."""

from __future__ import annotations

import asyncio
import json
import os
import resource
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
        self._pid: int | None = None
        self._prefixed = False

    def write(self, services: str) -> None:
        self.path.write_text(
            f'[backend]\nurl = "{self.backend_url}"\n{self.extra_backend}\n'
            f'[status]\nlisten = "127.0.0.1:{self.status_port}"\n' + textwrap.dedent(services)
        )

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        max_files: int | None = None,
        prefix: tuple[str, ...] = (),
    ) -> Agent:
        """Run the agent; ``max_files`` lowers its open-file limit (RLIMIT_NOFILE).

        ``prefix`` runs it under another command (e.g. ``unshare``): :attr:`pid`
        is then the agent's own, the first python among that command's children.
        """

        def limit() -> None:
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        self._prefixed = bool(prefix)
        self._pid = None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "registry_agent",
                    "run",
                    "-c",
                    str(self.path),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                preexec_fn=limit if max_files is not None else None,
            )
        return self

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 2.0
    ) -> tuple[int | None, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.status_port}{path}", headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read().decode()
                return r.status, body if path == "/metrics" else json.loads(body)
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text
        except OSError:
            return None, None

    @property
    def pid(self) -> int:
        """The agent's process id (seen from here)."""
        assert self.proc is not None
        if self._pid is None and not self._prefixed:
            self._pid = self.proc.pid
        deadline = time.monotonic() + 10
        while self._pid is None:
            children = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and _parent(int(p.name)) == self.proc.pid
            ]
            if children:
                self._pid = children[0]
            assert time.monotonic() < deadline, "the agent process never appeared"
            time.sleep(0.05)
        return self._pid

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


def _parent(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[1])


def listed(url: str, service: str) -> dict[str, HealthStatus]:
    async def read() -> dict[str, HealthStatus]:
        backend = open_backend(url)
        try:
            snapshot = await backend.list(service)
        finally:
            await backend.close()
        return {iid: h.status for iid, h in snapshot.instances.items()}

    return asyncio.run(read())
