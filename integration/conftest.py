"""Real Consul and etcd servers on free loopback ports, one per test, stopped by PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

# The shared contract suites live in the package: show their failed asserts in full.
pytest.register_assert_rewrite("registry_agent.testing.contract")

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
            "measured", f"{request.node.name:70} {what:28} {seconds:6.2f}s (bound {bound:.1f}s)"
        )
        assert seconds <= bound, f"{what} took {seconds:.2f}s, bound {bound:.2f}s"

    return record


@pytest.fixture(params=["consul", "etcd"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """A real Consul, then a real etcd."""
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def consul_server() -> Iterator[ConsulServer]:
    server = ConsulServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def persistent_consul_server() -> Iterator[ConsulServer]:
    """A Consul server agent with a data folder: registrations survive a restart."""
    server = ConsulServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
