"""Config from the environment against real Consul and etcd: each scenario runs this
file as a process with a clean environment (only PATH, PYTHONPATH and the variables
under test), so the test process's own environment is never changed.

Usage as a process: python test_env_config.py from_env SERVICE PORT
                    python test_env_config.py load AGENT_TOML
It prints JSON lines (``registered``, ``stopped``), logs at DEBUG on stderr, and
stops its registrars when a line arrives on stdin.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# -- the process --------------------------------------------------------------------


def _from_env(service: str, port: int) -> None:
    from registry_agent import Registrar, RetryPolicy, ServiceInstance, backends_from_env

    began = time.monotonic()
    instance = ServiceInstance(service, address="127.0.0.1", port=port)
    registrar = Registrar.from_env(instance, ttl=3, retry=RetryPolicy(initial=0.1, cap=1.0))
    registrar.start(wait_registered=30)
    names = [lane.name for lane in registrar.snapshot().backends]
    urls = [str(url) for url in backends_from_env()]  # what an app would print
    took = time.monotonic() - began
    print(json.dumps({"registered": took, "backends": names, "urls": urls}), flush=True)
    sys.stdin.readline()
    registrar.stop()
    print(json.dumps({"stopped": True}), flush=True)


def _load(path: str) -> None:
    from registry_agent import load_registrars

    began = time.monotonic()
    registrars = load_registrars(path, blocking=True)
    for registrar in registrars:
        registrar.start()
    for registrar in registrars:
        assert registrar.wait_registered(30), registrar.status()
    ids = [r.instance.id for r in registrars]
    backends = [len(r.snapshot().backends) for r in registrars]
    print(
        json.dumps({"registered": time.monotonic() - began, "ids": ids, "backends": backends}),
        flush=True,
    )
    sys.stdin.readline()
    for registrar in registrars:
        registrar.stop()
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    if sys.argv[1] == "from_env":
        _from_env(sys.argv[2], int(sys.argv[3]))
    else:
        _load(sys.argv[2])
    sys.exit(0)


# -- the tests ----------------------------------------------------------------------

import pytest  # noqa: E402

from integration.acl import AclConsul  # noqa: E402
from integration.registry_view import registry_health  # noqa: E402
from registry_agent import HealthStatus  # noqa: E402
from registry_agent._urls import parse_backend_url  # noqa: E402
from registry_agent.testing.servers import ConsulServer, EtcdServer  # noqa: E402


class Child:
    """This file run as a process with only ``env`` (plus PATH and PYTHONPATH)."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), **env}
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean,
            cwd=ROOT,
        )

    def read(self, key: str, within: float = 40.0) -> dict[str, Any]:
        """The next JSON line carrying ``key``, within ``within`` seconds."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([stdout], [], [], left)
            if not ready:
                break
            line = stdout.readline()
            if not line:
                pytest.fail(f"the process ended early: {self.finish()}")
            message: dict[str, Any] = json.loads(line)
            if key in message:
                return message
        self.process.kill()
        pytest.fail(f"no {key!r} line within {within}s: {self.finish()}")

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        self.read("stopped")

    def finish(self) -> str:
        """Its stderr once it has ended (killed after 20 s)."""
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return str(err)


def _hostport(url: str) -> str:
    ((host, port),) = parse_backend_url(url, default_port=0).endpoints
    return f"{host}:{port}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _held(url: str, service: str) -> dict[str, HealthStatus]:
    return await registry_health(url, service)


async def test_registrar_from_env_with_only_consul_http_addr_registers(
    consul_server: ConsulServer,
) -> None:
    service = f"orders-env-{uuid.uuid4().hex[:8]}"
    child = Child(
        "from_env", service, "8080", env={"CONSUL_HTTP_ADDR": _hostport(consul_server.url)}
    )
    try:
        registered = child.read("registered")
        print(f"\nregistered from CONSUL_HTTP_ADDR in {registered['registered']:.2f} s")
        assert registered["backends"] == [consul_server.url]
        assert list((await _held(consul_server.url, service)).values()) == [HealthStatus.PASSING]
        child.stop()
        assert await _held(consul_server.url, service) == {}
    finally:
        child.finish()


async def test_consul_token_from_the_environment_on_an_acl_agent(acl: AclConsul) -> None:
    service = f"orders-acl-{uuid.uuid4().hex[:8]}"
    env = {
        "CONSUL_HTTP_ADDR": f"http://{_hostport(acl.server.url)}",
        "CONSUL_HTTP_TOKEN": acl.token,
    }
    child = Child("from_env", service, "8080", env=env)
    try:
        child.read("registered")
        held = [s for s in acl.services() if s.startswith(service)]
        assert len(held) == 1, acl.services()
        child.stop()
        assert not [s for s in acl.services() if s.startswith(service)]
    finally:
        log = child.finish()
    assert f"{service}-127.0.0.1-8080 registered" in log, log  # it logged, at DEBUG...
    assert acl.token not in log  # ...never the token


async def test_etcdctl_endpoints_with_two_members(etcd_server: EtcdServer) -> None:
    service = f"orders-etcd-{uuid.uuid4().hex[:8]}"
    # The first member is down: the backend moves to the second, as with a cluster.
    dead = f"http://127.0.0.1:{_closed_port()}"
    endpoints = f"{dead},http://{_hostport(etcd_server.url)}"
    child = Child("from_env", service, "8080", env={"ETCDCTL_ENDPOINTS": endpoints})
    try:
        registered = child.read("registered")
        took = registered["registered"]
        print(f"\nregistered through the second of two ETCDCTL_ENDPOINTS in {took:.2f} s")
        (name,) = registered["backends"]
        assert name == f"etcd://{dead.removeprefix('http://')},{_hostport(etcd_server.url)}"
        assert list((await _held(etcd_server.url, service)).values()) == [HealthStatus.PASSING]
        child.stop()
        assert await _held(etcd_server.url, service) == {}
    finally:
        child.finish()


SERVICES = """
[[service]]
name = "{a}"
address = "127.0.0.1"
port = 8080
ttl = 3
[[service.check]]
tcp = "{open}"
interval = "1s"

[[service]]
name = "{b}"
address = "127.0.0.1"
port = 8081
ttl = 3
"""


@pytest.mark.parametrize("where", ["file", "environment"])
async def test_the_loaders_registrars_register_from_a_real_agent_toml(
    consul_server: ConsulServer, etcd_server: EtcdServer, tmp_path: Path, where: str
) -> None:
    a, b = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("orders", "billing"))
    # The tcp check probes a port that is open for sure: Consul's own.
    text = SERVICES.format(a=a, b=b, open=_hostport(consul_server.url))
    env: dict[str, str] = {}
    if where == "file":
        text = (
            f'[[backend]]\nurl = "{consul_server.url}"\n\n[[backend]]\nurl = "{etcd_server.url}"\n'
            + text
        )
    else:
        env["REGISTRY_AGENT_BACKEND"] = f"{consul_server.url} {etcd_server.url}"
    path = tmp_path / "agent.toml"
    path.write_text(text)
    child = Child("load", str(path), env=env)
    try:
        registered = child.read("registered")
        print(f"\n{where}: two services in two registries in {registered['registered']:.2f} s")
        assert registered["backends"] == [2, 2]
        for url in (consul_server.url, etcd_server.url):
            for service in (a, b):
                assert list((await _held(url, service)).values()) == [HealthStatus.PASSING]
        child.stop()
        for url in (consul_server.url, etcd_server.url):
            for service in (a, b):
                assert await _held(url, service) == {}
    finally:
        child.finish()


async def test_a_consul_token_in_registry_agent_backends_query_on_an_acl_agent(
    acl: AclConsul,
) -> None:
    # The token written in the URL's query reaches Consul (default deny: without it
    # nothing registers) and never the URL's text, the backend names or the log.
    service = f"orders-qtoken-{uuid.uuid4().hex[:8]}"
    url = f"consul://{_hostport(acl.server.url)}"
    child = Child(
        "from_env", service, "8080", env={"REGISTRY_AGENT_BACKEND": f"{url}?token={acl.token}"}
    )
    try:
        registered = child.read("registered")
        assert registered["urls"] == [url]
        held = [s for s in acl.services() if s.startswith(service)]
        assert len(held) == 1, acl.services()
        child.stop()
        assert not [s for s in acl.services() if s.startswith(service)]
    finally:
        log = child.finish()
    assert f"{service}-127.0.0.1-8080 registered" in log, log
    assert acl.token not in log


async def test_an_etcd_password_in_registry_agent_backends_user_info_on_an_auth_etcd() -> None:
    # A private member: authentication on would lock out every other test.
    server = EtcdServer()
    server.start()
    try:
        password = f"pa/ss@{uuid.uuid4().hex}"  # '/' and '@' percent-encoded in the URL
        server.enable_auth("root-" + uuid.uuid4().hex)
        server.add_user("agent", password, read_write_prefix="/services/")
        service = f"orders-upw-{uuid.uuid4().hex[:8]}"
        hostport = _hostport(server.url)
        quoted = password.replace("/", "%2F").replace("@", "%40")
        env = {"REGISTRY_AGENT_BACKEND": f"etcd://agent:{quoted}@{hostport}"}
        child = Child("from_env", service, "8080", env=env)
        try:
            registered = child.read("registered")
            assert registered["urls"] == [f"etcd://{hostport}?user=agent"]
            view = f"etcd://agent:{quoted}@{hostport}"
            assert list((await _held(view, service)).values()) == [HealthStatus.PASSING]
            child.stop()
            assert await _held(view, service) == {}
        finally:
            log = child.finish()
        assert f"{service}-127.0.0.1-8080 registered" in log, log
        assert password not in log
        assert quoted not in log
    finally:
        server.close()


async def test_etcdctls_default_keepalive_registers_on_a_real_etcd(
    etcd_server: EtcdServer,
) -> None:
    # ETCDCTL_KEEPALIVE_TIME=2s (etcdctl's default) is raised to etcd's 5s floor.
    service = f"orders-ka-{uuid.uuid4().hex[:8]}"
    env = {
        "ETCDCTL_ENDPOINTS": _hostport(etcd_server.url),
        "ETCDCTL_KEEPALIVE_TIME": "2s",
        "ETCDCTL_KEEPALIVE_TIMEOUT": "6s",
    }
    child = Child("from_env", service, "8080", env=env)
    try:
        registered = child.read("registered")
        assert registered["urls"] == [
            f"etcd://{_hostport(etcd_server.url)}?keepalive_time=5s&keepalive_timeout=6s"
        ]
        assert list((await _held(etcd_server.url, service)).values()) == [HealthStatus.PASSING]
        child.stop()
    finally:
        log = child.finish()
    said = [line for line in log.splitlines() if "ETCDCTL_KEEPALIVE_TIME=2s raised to 5s" in line]
    assert len(said) == 1, log
    assert said[0].startswith("INFO:registry_agent:"), said
