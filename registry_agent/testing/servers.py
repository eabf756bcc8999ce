"""Throwaway real Consul and etcd servers on free loopback ports, for tests and benchmarks.

Binaries are looked up in ``$REGISTRY_AGENT_SERVERS_BIN``, then ``PATH``, then
the ``.servers/bin`` folder that ``scripts/fetch-servers.sh`` fills. Servers
are stopped by the PID this module started, never by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ConsulServer",
    "EtcdServer",
    "ServerProcess",
    "ServerTLS",
    "find_binary",
    "free_port",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> str:
    """Path of the ``consul`` or ``etcd`` binary; raises FileNotFoundError with the fix."""
    candidates: list[Path] = []
    if env := os.environ.get("REGISTRY_AGENT_SERVERS_BIN"):
        candidates.append(Path(env) / name)
    if found := shutil.which(name):
        candidates.append(Path(found))
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[2]):
        candidates.append(folder / ".servers" / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError(
        f"{name} not found in $REGISTRY_AGENT_SERVERS_BIN, PATH or .servers/bin: "
        "run scripts/fetch-servers.sh"
    )


def _http_json(
    url: str,
    timeout: float = 1.0,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: Any = None,
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read() or b"null")  # loopback only


@dataclass(frozen=True)
class ServerTLS:
    """PEM files a test server serves TLS with; ``verify_clients`` asks clients for one too."""

    ca_file: str
    cert_file: str
    key_file: str
    verify_clients: bool = True

    def client_context(self) -> ssl.SSLContext:
        """A context that trusts the CA and presents the server's own certificate."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ServerProcess:
    """One server process with the controls failure tests need."""

    name = "server"

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"registry-agent-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.starts = 0

    # -- to be provided by subclasses ----------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def wipe_data(self) -> None:
        """Delete persisted state (between stop and start)."""

    @property
    def url(self) -> str:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the running server, if any."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it serves requests."""
        if self.pid is not None:
            return
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                if self.ready():
                    return
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout}s; log tail:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``timeout``)."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as a crash."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            self.process = None
            return
        if self._paused:
            self.resume()
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10.0)
        self.process = None

    def restart(self, *, wipe: bool = False) -> None:
        """Stop and start on the same ports; ``wipe`` loses every registration."""
        self.stop()
        if wipe:
            self.wipe_data()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its sockets."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Stop the server and remove its working folder if we made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        path = self.workdir / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CONSUL_ACL = 'enabled = true default_policy = "deny" down_policy = "extend-cache"'


class ConsulServer(ServerProcess):
    """A Consul agent on loopback.

    By default ``consul agent -dev``: fast to start, keeps nothing, so every
    restart starts it empty. With ``persistent=True`` a single-server agent
    with a data folder: its services survive a restart unless ``wipe=True``.
    ``acl_token`` turns ACLs on (default policy deny) with that management
    token; ``tls`` serves the HTTP API over HTTPS only.
    """

    name = "consul"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        persistent: bool = False,
        acl_token: str | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        super().__init__(workdir)
        self.persistent = persistent
        self.acl_token = acl_token
        self.tls = tls
        self.data_dir = self.workdir / "data"
        self.binary = find_binary("consul")
        self.http_port, self.serf_lan, self.serf_wan, self.server_port = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        )
        self.node = f"node-{self.http_port}"

    @property
    def url(self) -> str:
        return f"consul://127.0.0.1:{self.http_port}"

    @property
    def http(self) -> str:
        """Base URL of the HTTP API."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def api(self, path: str, *, method: str = "GET", body: Any = None) -> Any:
        """Call the HTTP API with the management token (if any); JSON in and out."""
        headers = {"X-Consul-Token": self.acl_token} if self.acl_token else {}
        context = self.tls.client_context() if self.tls else None
        return _http_json(
            f"{self.http}{path}", 5.0, context=context, headers=headers, method=method, body=body
        )

    def command(self) -> list[str]:
        if self.persistent:
            # raft_multiplier 1: the single server elects itself in ~1.5 s, not ~9 s.
            mode = ["-server", "-bootstrap-expect", "1", "-data-dir", str(self.data_dir)]
            mode += ["-hcl", "performance { raft_multiplier = 1 }"]
        else:
            mode = ["-dev"]
        if self.acl_token:
            mode += ["-hcl", f'acl {{ {_CONSUL_ACL} tokens {{ master = "{self.acl_token}" }} }}']
            mode += ["-hcl", f'acl {{ tokens {{ agent = "{self.acl_token}" }} }}']
        http_port = self.http_port
        if self.tls:
            http_port = -1
            mode += ["-hcl", f"ports {{ https = {self.http_port} }}"]
            mode += ["-hcl", f'ca_file = "{self.tls.ca_file}"']
            mode += ["-hcl", f'cert_file = "{self.tls.cert_file}"']
            mode += ["-hcl", f'key_file = "{self.tls.key_file}"']
            verify = "true" if self.tls.verify_clients else "false"
            mode += ["-hcl", f"verify_incoming_https = {verify}"]
        ports = {
            "-http-port": http_port,
            "-dns-port": -1,
            "-grpc-port": -1,
            "-serf-lan-port": self.serf_lan,
            "-serf-wan-port": self.serf_wan,
            "-server-port": self.server_port,
        }
        return [
            self.binary,
            "agent",
            *mode,
            *("-bind", "127.0.0.1", "-client", "127.0.0.1", "-advertise", "127.0.0.1"),
            *("-node", self.node, "-log-level", "warn"),
            *(item for flag, port in ports.items() for item in (flag, str(port))),
        ]

    def ready(self) -> bool:
        if not self.api("/v1/status/leader"):
            return False
        checks = self.api(f"/v1/health/node/{self.node}")
        return any(c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks)

    def wipe_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdServer(ServerProcess):
    """A single-member etcd with its own data folder; ``restart(wipe=True)`` loses it."""

    name = "etcd"

    def __init__(
        self, workdir: str | os.PathLike[str] | None = None, *, tls: ServerTLS | None = None
    ) -> None:
        super().__init__(workdir)
        self.binary = find_binary("etcd")
        self.client_port, self.peer_port = free_port(), free_port()
        self.data_dir = self.workdir / "data"
        self.tls = tls
        self._auth_token: str | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        """The client URL etcd listens on (https with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    def api(self, path: str, body: Any = None) -> Any:
        """POST to etcd's JSON gateway (``/v3/...``), logged in as root once auth is on."""
        headers = {"Authorization": self._auth_token} if self._auth_token else {}
        context = self.tls.client_context() if self.tls else None
        return _http_json(
            f"{self.client_url}{path}",
            5.0,
            context=context,
            headers=headers,
            method="POST",
            body=body or {},
        )

    def enable_auth(self, root_password: str) -> None:
        """Create ``root`` with ``root_password`` and turn authentication on."""
        self.api("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.api("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.api("/v3/auth/enable")
        reply = self.api("/v3/auth/authenticate", {"name": "root", "password": root_password})
        self._auth_token = reply["token"]

    def add_user(self, name: str, password: str, *, read_write_prefix: str) -> None:
        """A user whose only role may read and write keys under ``read_write_prefix``."""
        key = read_write_prefix.encode()
        end = key[:-1] + bytes([key[-1] + 1])
        role = f"{name}-role"
        self.api("/v3/auth/role/add", {"name": role})
        perm = {"permType": "READWRITE", "key": _b64(key), "range_end": _b64(end)}
        self.api("/v3/auth/role/grant", {"name": role, "perm": perm})
        self.api("/v3/auth/user/add", {"name": name, "password": password})
        self.api("/v3/auth/user/grant", {"user": name, "role": role})

    def command(self) -> list[str]:
        client = self.client_url
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls: list[str] = []
        if self.tls:
            tls = ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            tls += ["--trusted-ca-file", self.tls.ca_file]
            if self.tls.verify_clients:
                tls += ["--client-cert-auth"]
        return [
            self.binary,
            *tls,
            "--name",
            "member",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"member={peer}",
            "--log-level",
            "warn",
        ]

    def ready(self) -> bool:
        context = self.tls.client_context() if self.tls else None
        health = _http_json(f"{self.client_url}/health", context=context)
        return bool(health) and health.get("health") == "true"

    def wipe_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
