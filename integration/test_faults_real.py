"""The fault section of the contract on real Consul and etcd servers, through a FaultProxy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from registry_agent_consul._http import blocking_bound

from registry_agent.testing.contract import ServerControl
from registry_agent.testing.fault_contract import (
    FaultContract,
    consul_ids,
    etcd_ids,
    etcd_orphan_leases,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer

CONSUL_WAIT = 5.0
ETCD_KEEPALIVE = (5.0, 2.0)


class _Measured:
    @pytest.fixture
    def measure(self, measured: Callable[[str, float, float], None]) -> Any:
        return measured


class TestConsulFaults(_Measured, FaultContract):
    backend_options: ClassVar[dict[str, Any]] = {"wait": CONSUL_WAIT}
    dead_connection = blocking_bound(CONSUL_WAIT, FaultContract.timeout)

    @pytest.fixture
    def server(self, consul_server: ConsulServer) -> ServerControl:
        return consul_server

    def registry_ids(self, server: ServerControl, service: str) -> list[str]:
        assert isinstance(server, ConsulServer)
        return consul_ids(server, service)


class TestEtcdFaults(_Measured, FaultContract):
    backend_options: ClassVar[dict[str, Any]] = {
        "keepalive_time": ETCD_KEEPALIVE[0],
        "keepalive_timeout": ETCD_KEEPALIVE[1],
    }
    dead_connection = ETCD_KEEPALIVE[0] + ETCD_KEEPALIVE[1] + 1.0
    speaks_http = False  # gRPC over HTTP/2: the proxy's HTTP answers are garbage to it

    @pytest.fixture
    def server(self, etcd_server: EtcdServer) -> ServerControl:
        return etcd_server

    def registry_ids(self, server: ServerControl, service: str) -> list[str]:
        assert isinstance(server, EtcdServer)
        return etcd_ids(server, service)

    def orphan_leases(self, server: ServerControl) -> list[str]:
        assert isinstance(server, EtcdServer)
        return etcd_orphan_leases(server)
