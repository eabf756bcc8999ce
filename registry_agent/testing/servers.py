"""Throwaway real Consul and etcd servers on free loopback ports, for tests and benchmarks.

Binaries are looked up in ``$REGISTRY_AGENT_SERVERS_BIN``, then ``PATH``, then
the ``.servers/bin`` folder that ``scripts/fetch-servers.sh`` fills. Servers
are stopped by the PID this module started, never by name.
"""

from __future__ import annotations

import array
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import termios
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ConsulCluster",
    "ConsulServer",
    "EtcdCluster",
    "EtcdServer",
    "ServerProcess",
    "ServerTLS",
    "find_binary",
    "free_port",
    "freeze_process",
    "unread_input",
]


# Ports are handed out in turn from a block of their own per test worker, below
# the kernel's ephemeral range (32768+, where outgoing connections take theirs):
# a port a stopped server will restart on is not given to anyone else meanwhile,
# and two workers never race for the same port.
_PORT_BLOCK = 2000
_PORT_BASE = 20000
_next_port: list[int] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, not handed out before by this process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = _PORT_BASE + (index % 6) * _PORT_BLOCK
    if not _next_port:
        _next_port.append(low + os.getpid() % _PORT_BLOCK)
    for _ in range(_PORT_BLOCK):
        port = _next_port[0]
        _next_port[0] = low + (port + 1 - low) % _PORT_BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + _PORT_BLOCK - 1}")


def freeze_process(pid: int, within: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped.

    ``kill()`` returns before a thread running on another CPU has stopped: on a loaded
    machine a "frozen" server was seen answering one more request after it. Where
    ``/proc`` cannot say (not Linux), returns after the signal.
    """
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            states = [
                (task / "stat").read_text().rpartition(")")[2].split()[0]
                for task in tasks.iterdir()
            ]
        except (OSError, IndexError):
            return
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop within {within:g}s of SIGSTOP")


def unread_input(pid: int) -> int:
    """Bytes written to process ``pid``'s standard input pipe and not read yet (Linux).

    With :func:`freeze_process`, tells a test that a message reached a stopped process.
    """
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count)
        return count[0]
    finally:
        os.close(fd)


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

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        #: Address the server binds and advertises (a 127.x.y.z of a test host's veth).
        self.host = host
        #: Network namespace (a test host) the server runs in, or None for this one.
        self.netns = netns
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
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (cluster members wait for each other)."""
        if self.pid is not None:
            return
        # `ip netns exec` execs the server in place: the PID we hold is the server's.
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [*prefix, *self.command()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.starts += 1

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the spawned server serves requests; stop it and raise if it does not."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
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
            freeze_process(self.process.pid)
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
        bootstrap_expect: int = 1,
        client: bool = False,
        join: tuple[str, ...] = (),
        leave_on_terminate: bool | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        super().__init__(workdir, host=host, netns=netns)
        self.persistent = persistent or client or bootstrap_expect > 1
        self.acl_token = acl_token
        self.tls = tls
        self.bootstrap_expect = bootstrap_expect
        self.client = client
        self.join = join
        self.leave_on_terminate = leave_on_terminate
        self.data_dir = self.workdir / "data"
        self.binary = find_binary("consul")
        self.http_port, self.serf_lan, self.serf_wan, self.server_port = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        )
        self.node = f"node-{self.http_port}"
        # Fixed, so a wiped agent comes back as the same node (as a host's machine id).
        self.node_id = str(uuid.uuid4())

    @property
    def url(self) -> str:
        return f"consul://{self.host}:{self.http_port}"

    @property
    def serf_address(self) -> str:
        """host:port other agents join."""
        return f"{self.host}:{self.serf_lan}"

    @property
    def rpc_address(self) -> str:
        """host:port of the server RPC (what /v1/status/leader names)."""
        return f"{self.host}:{self.server_port}"

    @property
    def http(self) -> str:
        """Base URL of the HTTP API."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}"

    def api(self, path: str, *, method: str = "GET", body: Any = None) -> Any:
        """Call the HTTP API with the management token (if any); JSON in and out."""
        headers = {"X-Consul-Token": self.acl_token} if self.acl_token else {}
        context = self.tls.client_context() if self.tls else None
        return _http_json(
            f"{self.http}{path}", 5.0, context=context, headers=headers, method=method, body=body
        )

    def command(self) -> list[str]:
        if self.client:
            mode = ["-data-dir", str(self.data_dir)]
        elif self.persistent:
            # raft_multiplier 1: a server elects itself in ~1.5 s, not ~9 s.
            mode = ["-server", "-bootstrap-expect", str(self.bootstrap_expect)]
            mode += ["-data-dir", str(self.data_dir), "-hcl", "performance { raft_multiplier = 1 }"]
        else:
            mode = ["-dev"]
        for address in self.join:
            mode += ["-retry-join", address, "-retry-interval", "1s"]
        if self.leave_on_terminate is not None:
            mode += ["-hcl", f"leave_on_terminate = {str(self.leave_on_terminate).lower()}"]
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
            *("-bind", self.host, "-client", self.host, "-advertise", self.host),
            *("-node", self.node, "-node-id", self.node_id, "-log-level", "warn"),
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
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        tls: ServerTLS | None = None,
        member: str = "member",
        host: str = "127.0.0.1",
        netns: str | None = None,
        ports: tuple[int, int] | None = None,
        cluster: dict[str, str] | None = None,
        peer_host: str | None = None,
    ) -> None:
        super().__init__(workdir, host=host, netns=netns)
        #: Address members talk to each other on (``host`` unless a separate network).
        self.peer_host = peer_host or host
        self.binary = find_binary("etcd")
        self.client_port, self.peer_port = ports or (free_port(), free_port())
        self.data_dir = self.workdir / "data"
        self.tls = tls
        self.member = member
        #: member name -> peer URL of every member (this one included), for a cluster.
        self.cluster = cluster or {member: self.peer_url}
        self._auth_token: str | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """The client URL etcd listens on (https with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The URL other members reach this one on."""
        return f"http://{self.peer_host}:{self.peer_port}"

    def status(self) -> tuple[str, str]:
        """(this member's id, the leader's id as this member sees it) from etcd itself."""
        reply = self.api("/v3/maintenance/status")
        return str(reply["header"]["member_id"]), str(reply.get("leader", ""))

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

    def leases(self) -> set[int]:
        """The ids of every lease etcd holds now (the gateway writes int64 ids as strings)."""
        reply = self.api("/v3/lease/leases")
        return {int(item["ID"]) for item in reply.get("leases") or ()}

    def command(self) -> list[str]:
        client = self.client_url
        peer = self.peer_url
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
            self.member,
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
            ",".join(f"{name}={url}" for name, url in self.cluster.items()),
            "--initial-cluster-token",
            "registry-agent-" + min(self.cluster.values()).rpartition(":")[2],
            "--log-level",
            "warn",
        ]

    def ready(self) -> bool:
        context = self.tls.client_context() if self.tls else None
        health = _http_json(f"{self.client_url}/health", context=context)
        return bool(health) and health.get("health") == "true"

    def wipe_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """``size`` etcd members forming one cluster; each member is an :class:`EtcdServer`.

    ``hosts`` gives each member its own address (and ``netns`` its own test
    host); by default all share 127.0.0.1 on free ports.
    """

    name = "etcd"

    def __init__(
        self,
        size: int = 3,
        *,
        hosts: tuple[str, ...] | None = None,
        netns: tuple[str | None, ...] | None = None,
        peer_hosts: tuple[str, ...] | None = None,
    ) -> None:
        hosts = hosts or ("127.0.0.1",) * size
        peers = peer_hosts or hosts
        spaces = netns or (None,) * size
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"m{i}" for i in range(size)]
        cluster = {n: f"http://{h}:{pp}" for n, h, (_, pp) in zip(names, peers, ports, strict=True)}
        self.members = [
            EtcdServer(member=n, host=h, netns=ns, ports=pp, cluster=cluster, peer_host=ph)
            for n, h, ns, pp, ph in zip(names, hosts, spaces, ports, peers, strict=True)
        ]

    @property
    def url(self) -> str:
        """``etcd://h1:p1,h2:p2,h3:p3``: every member."""
        return "etcd://" + ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    def start(self, timeout: float = 60.0) -> None:
        """Start every member that is not running and wait for all of them."""
        stopped = [m for m in self.members if m.pid is None]
        for member in stopped:
            member.spawn()
        for member in stopped:
            member.wait_ready(timeout)

    def leader(self, timeout: float = 15.0) -> EtcdServer:
        """The member the running members agree leads (waits for an election)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids: dict[str, EtcdServer] = {}
            leaders = set()
            for member in self.members:
                if member.pid is None or member._paused:
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
                    own, leader = member.status()
                    ids[own] = member
                    leaders.add(leader)
            if len(leaders) == 1 and (found := ids.get(leaders.pop())) is not None:
                return found
            time.sleep(0.1)
        raise RuntimeError(f"no etcd leader within {timeout}s")

    def close(self) -> None:
        """Stop every member and remove their folders."""
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConsulCluster:
    """``servers`` Consul servers and one client agent, as Consul runs in production.

    Registrars talk to the client agent (:attr:`url`), as on every host.
    ``hosts``/``netns`` place the servers and the client on test hosts of
    their own (index 0 to ``servers - 1`` for servers, the last for the client).
    """

    name = "consul"

    def __init__(
        self,
        servers: int = 3,
        *,
        hosts: tuple[str, ...] | None = None,
        netns: tuple[str | None, ...] | None = None,
        client_leave_on_terminate: bool | None = None,
    ) -> None:
        hosts = hosts or ("127.0.0.1",) * (servers + 1)
        spaces = netns or (None,) * (servers + 1)
        self.servers: list[ConsulServer] = []
        for host, space in zip(hosts[:servers], spaces[:servers], strict=True):
            self.servers.append(ConsulServer(bootstrap_expect=servers, host=host, netns=space))
        joins = tuple(s.serf_address for s in self.servers)
        for server in self.servers:
            server.join = tuple(j for j in joins if j != server.serf_address)
        self.client = ConsulServer(
            client=True,
            join=joins,
            host=hosts[servers],
            netns=spaces[servers],
            leave_on_terminate=client_leave_on_terminate,
        )

    @property
    def url(self) -> str:
        """The client agent: where registrars register."""
        return self.client.url

    def start(self, timeout: float = 60.0) -> None:
        """Start every agent that is not running and wait for all of them."""
        stopped = [a for a in (*self.servers, self.client) if a.pid is None]
        for agent in stopped:
            agent.spawn()
        for agent in stopped:
            agent.wait_ready(timeout)

    def leader(self, timeout: float = 15.0) -> ConsulServer:
        """The server that leads now (waits for an election)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.pid is None:
                    continue
                with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                    address = server.api("/v1/status/leader")
                    for candidate in self.servers:
                        if candidate.rpc_address == address and candidate.pid is not None:
                            return candidate
            time.sleep(0.1)
        raise RuntimeError(f"no Consul leader within {timeout}s")

    def close(self) -> None:
        """Stop every agent and remove their folders."""
        for agent in (self.client, *self.servers):
            agent.close()

    def __enter__(self) -> ConsulCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
