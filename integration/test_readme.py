"""The README's examples run as written, against a real Consul and a real etcd."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from integration.readme_kit import readme_block, readme_blocks
from registry_agent.testing.servers import ConsulServer, EtcdServer


def block(marker: str) -> str:
    return readme_block(marker)


def run(code: str, tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    server.shutdown()
    server.server_close()


def url_of(kind: str, consul: ConsulServer, etcd: EtcdServer) -> str:
    return consul.url if kind == "consul" else etcd.url


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_backend_api_example(
    kind: str, consul_server: ConsulServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    url = url_of(kind, consul_server, etcd_server)
    code = block("await backend.set_status(lease").replace('"consul://127.0.0.1:8500"', repr(url))
    assert repr(url) in code
    lines = run(code, tmp_path)
    assert "critical" in lines[0]
    assert lines[1].endswith("[]")  # the watch's first snapshot: no healthy instance


AFTER_SYNC = """
assert registrar.wait_registered(10)
import asyncio
from registry_agent import open_backend
backend = open_backend({url!r})
print(asyncio.run(backend.list("orders")).healthy()[0].id)
registrar.stop()
print(asyncio.run(backend.list("orders")).instances == {{}})
"""


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_sync_registrar_example(
    kind: str,
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    health_url: str,
    tmp_path: Path,
) -> None:
    url = url_of(kind, consul_server, etcd_server)
    code = block("install_signal_handlers=True,  # SIGTERM").replace(
        '"consul://127.0.0.1:8500"', repr(url)
    )
    code = code.replace('"http://127.0.0.1:8080/healthz"', repr(health_url))
    assert repr(url) in code
    assert repr(health_url) in code
    assert run(code + AFTER_SYNC.format(url=url), tmp_path) == ["orders-10.0.0.5-8080", "True"]


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_asyncio_registrar_example(
    kind: str,
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    health_url: str,
    tmp_path: Path,
) -> None:
    url = url_of(kind, consul_server, etcd_server)
    code = block("instance, checks=checks) as registrar:").replace(
        '"etcd://127.0.0.1:2379"', repr(url)
    )
    code = code.replace('"http://127.0.0.1:8080/healthz"', repr(health_url))
    assert repr(url) in code
    assert repr(health_url) in code
    after = f"""
from registry_agent import open_backend
print(asyncio.run(open_backend({url!r}).list("orders")).instances == {{}})
"""
    assert run(code + after, tmp_path) == ["True", "True"]


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_discovery_example(
    kind: str,
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    health_url: str,
    tmp_path: Path,
) -> None:
    url = url_of(kind, consul_server, etcd_server)
    port = int(health_url.split(":")[2].split("/")[0])  # the fixture's server answers 200
    setup = f"""
import asyncio
from registry_agent import ServiceInstance, open_backend
_backend = open_backend({url!r})
asyncio.run(_backend.register(ServiceInstance("orders", address="127.0.0.1", port={port}), ttl=30))
"""
    code = block('discovery.choose("orders", strategy="weighted")')
    code = code.replace('"etcd://127.0.0.1:2379"', repr(url))
    assert repr(url) in code
    after = """
print(discovery.instances("orders")[0].port)
print(client.get("http://orders/api/items").status_code)
discovery.close()
"""
    assert run(setup + code + after, tmp_path) == [str(port), "200"]


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_shared_liveness_example(
    kind: str, consul_server: ConsulServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    url = url_of(kind, consul_server, etcd_server)
    code = block("asyncio.run(serve())").replace('"etcd://127.0.0.1:2379"', repr(url))
    assert repr(url) in code
    assert run(code, tmp_path) == ["10 registered on one lease"]
    if kind == "etcd":
        assert etcd_server.leases() == set()  # the last stop revoked the shared lease
    else:
        assert consul_server.api("/v1/agent/services") == {}  # heartbeat service included


def test_watch_example_compiles() -> None:
    compile(block("for event in watcher"), "README.md", "exec")


def test_fault_proxy_example(consul_server: ConsulServer, tmp_path: Path) -> None:
    code = block("FaultProxy(").replace(
        'FaultProxy("127.0.0.1", 8500)', f'FaultProxy("127.0.0.1", {consul_server.http_port})'
    )
    assert str(consul_server.http_port) in code
    first, second = run(code, tmp_path)
    assert first.startswith("False"), first
    assert "No cluster leader" in first, first
    assert second == "True"


def both_urls(code: str, consul: ConsulServer, etcd: EtcdServer) -> str:
    """``code`` with the README's Consul and etcd addresses pointing at the test servers."""
    code = code.replace("consul://127.0.0.1:8500", consul.url.rstrip("/"))
    code = code.replace("etcd://127.0.0.1:2379", etcd.url.rstrip("/"))
    assert consul.url.rstrip("/") in code
    assert etcd.url.rstrip("/") in code
    return code


def test_mixed_fleets_example(
    consul_server: ConsulServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    code = both_urls(block('zero.instances("users.rpc")'), consul_server, etcd_server)
    assert run(code, tmp_path) == ["[]", "grpc 10.0.0.5 9000 v1.4.0"]
    # stop() removed it from both, in the formats kratos reads
    assert etcd_server.leases() == set()
    assert consul_server.api("/v1/agent/services") == {}


def test_several_registries_example(
    consul_server: ConsulServer, etcd_server: EtcdServer, health_url: str, tmp_path: Path
) -> None:
    code = both_urls(block('"etcd://127.0.0.1:2379?format=kratos"],\n'), consul_server, etcd_server)
    code = code.replace("http://127.0.0.1:8080/healthz", health_url)
    after = """
assert registrar.wait_registered(10)
print([b["ready"] for b in registrar.status()["backends"]])
registrar.stop()
"""
    assert run(code + after, tmp_path) == ["[True, True]"]
    assert consul_server.api("/v1/agent/services") == {}


def _markers_tests_use() -> set[str]:
    """The first argument of every ``block(...)``/``readme_block(...)`` call in the tests."""
    root = Path(__file__).resolve().parents[1]
    markers: set[str] = set()
    for path in [*root.glob("tests/*.py"), *root.glob("integration/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            first = node.args[0]
            if name in {"block", "readme_block"} and isinstance(first, ast.Constant):
                markers.add(str(first.value))
    return markers


def test_every_block_runs_or_is_a_fragment() -> None:
    markers = _markers_tests_use()
    untested = [
        f"README.md line {b.line}: {b.lang or 'plain'} block {b.body.splitlines()[0]!r}"
        for b in readme_blocks()
        if not b.fragment and not any(m in b.body for m in markers)
    ]
    assert not untested, "run these in a test or mark them <!-- fragment -->: " + "; ".join(
        untested
    )


def agent(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_agent_toml_example(consul_server: ConsulServer, health_url: str, tmp_path: Path) -> None:
    text = readme_block('format = "text"                   # or "json"', "toml")
    (tmp_path / "consul-token").write_text("anonymous\n")
    for old, new in [
        ("consul://127.0.0.1:8500", consul_server.url.rstrip("/")),
        ("/run/secrets/consul-token", str(tmp_path / "consul-token")),
        ("http://127.0.0.1:8080/healthz", health_url),
    ]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "agent.toml").write_text(text)
    result = agent(["check", "-c", "agent.toml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "orders-1" in result.stdout
    # The error shown under it, for the same file with a bad interval, word for word.
    shown = readme_block("$ registry-agent run -c agent.toml", "console").splitlines()
    (tmp_path / "agent.toml").write_text(text.replace('interval = "2s"', 'interval = "2x"'))
    result = agent(["run", "-c", "agent.toml"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == shown[1]


FLEET_TOML = {
    "kratos": lambda: readme_block('format = "kratos"                 # go-kratos', "toml"),
    "go-zero": lambda: readme_block("# go-zero: zrpc clients", "toml"),
}


@pytest.mark.parametrize("example", sorted(FLEET_TOML))
def test_agent_toml_fleet_examples(
    example: str, consul_server: ConsulServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    text = FLEET_TOML[example]()
    text = text.replace("etcd://10.0.0.5:2379,10.0.0.6:2379", "etcd://127.0.0.1:2379")
    text = text.replace('token_file = "/run/secrets/consul-token"\n', "")
    (tmp_path / "agent.toml").write_text(
        both_urls(text, consul_server, etcd_server)
        if "consul://" in text
        else text.replace("etcd://127.0.0.1:2379", etcd_server.url.rstrip("/"))
    )
    result = agent(["check", "-c", "agent.toml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid; 1 service(s)" in result.stdout
