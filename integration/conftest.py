"""Real Consul and etcd servers on free loopback ports, one per test, stopped by PID.

With REGISTRY_AGENT_CONSUL_URL / REGISTRY_AGENT_ETCD_URL set, tests use those
servers instead (see compose-tests.sh) and skip what needs a server of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The shared contract suites live in the package: show their failed asserts in full.
pytest.register_assert_rewrite(
    "registry_agent.testing.contract", "registry_agent.testing.fault_contract"
)

from integration.acl import AclConsul  # noqa: E402
from integration.agent_process import Agent  # noqa: E402
from integration.certs import CertFiles, make_certs  # noqa: E402
from registry_agent._urls import parse_backend_url  # noqa: E402
from registry_agent.testing.servers import (  # noqa: E402 - after the rewrite hook
    ConsulServer,
    EtcdServer,
    ServerProcess,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print every recovery time the tests measured (xdist carries user_properties over)."""
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "measured":
                rows.append(value)
    if rows:
        terminalreporter.section("measured recovery times (bounds are generous; bench/ measures)")
        for row in sorted(rows):
            terminalreporter.write_line(row)


@pytest.fixture
def measured(
    record_property: Callable[[str, object], None], request: pytest.FixtureRequest
) -> Callable[[str, float, float], None]:
    """Record and check one measured duration: ``measured(what, seconds, bound)``."""

    def record(what: str, seconds: float, bound: float) -> None:
        record_property(
            "measured", f"{request.node.name:70}  {what:28} {seconds:6.2f}s (bound {bound:.1f}s)"
        )
        assert seconds <= bound, f"{what} took {seconds:.2f}s, bound {bound:.2f}s"

    return record


@pytest.fixture(params=["consul", "etcd"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """A real Consul, then a real etcd."""
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    return server


class ExternalServer:
    """A server someone else runs (docker compose): usable, but not ours to stop or wipe."""

    def __init__(self, name: str, url: str) -> None:
        parsed = parse_backend_url(url, default_port=8500 if name == "consul" else 2379)
        ((host, port),) = parsed.endpoints
        self.name = name
        self.url = url
        self.http = f"http://{host}:{port}"
        self.http_port = self.client_port = port

    def _not_ours(self, *args: object, **kwargs: object) -> None:
        pytest.skip(f"needs a {self.name} server of its own, not the shared one at {self.url}")

    stop = start = restart = pause = resume = kill = close = _not_ours


def _server(kind: str, make: Callable[[], ServerProcess]) -> Iterator[Any]:
    url = os.environ.get(f"REGISTRY_AGENT_{kind.upper()}_URL")
    if url:
        yield ExternalServer(kind, url)
        return
    server = make()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def consul_server() -> Iterator[ConsulServer]:
    """A throwaway `consul agent -dev` (or $REGISTRY_AGENT_CONSUL_URL's server)."""
    yield from _server("consul", ConsulServer)


@pytest.fixture
def persistent_consul_server() -> Iterator[ConsulServer]:
    """A Consul server agent with a data folder: registrations survive a restart."""
    yield from _server("consul", lambda: ConsulServer(persistent=True))


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A throwaway single-member etcd (or $REGISTRY_AGENT_ETCD_URL's server)."""
    yield from _server("etcd", EtcdServer)


@pytest.fixture
async def raw(etcd_server: EtcdServer) -> Any:
    """A plain aetcd client on ``etcd_server``, to read and write keys as anyone would."""
    import aetcd

    async with aetcd.Client(host="127.0.0.1", port=etcd_server.client_port) as client:
        yield client


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agent processes a test starts; killed at its end if still running."""
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.close()


@pytest.fixture
def acl() -> Iterator[AclConsul]:
    """A Consul agent with ACLs on (default deny) and a token for ``orders*`` only."""
    server = ConsulServer(acl_token=str(uuid.uuid4()))
    server.start()
    try:
        yield AclConsul(server)
    finally:
        server.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A throwaway CA with a 127.0.0.1 server certificate and a client certificate."""
    return make_certs(tmp_path_factory.mktemp("certs"))
