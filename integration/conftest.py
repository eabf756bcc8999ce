"""Real Consul and etcd servers on free loopback ports, one per test, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from registry_agent.testing.servers import ConsulServer, EtcdServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture
def consul_server() -> Iterator[ConsulServer]:
    server = ConsulServer()
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
