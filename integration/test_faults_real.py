"""The fault section of the contract on real Consul and etcd servers, through a FaultProxy."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from registry_agent_consul._http import blocking_bound

from registry_agent.testing.contract import ServerControl
from registry_agent.testing.fault_contract import FaultContract
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
        return [entry["ServiceID"] for entry in server.api(f"/v1/catalog/service/{service}")]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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

    def _keys(self, server: ServerControl, prefix: bytes) -> list[dict[str, Any]]:
        assert isinstance(server, EtcdServer)
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        reply = server.api("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return list(reply.get("kvs", []))

    def registry_ids(self, server: ServerControl, service: str) -> list[str]:
        prefix = f"/services/{service}/".encode()
        return [
            base64.b64decode(kv["key"])[len(prefix) :].decode() for kv in self._keys(server, prefix)
        ]

    def orphan_leases(self, server: ServerControl) -> list[str]:
        assert isinstance(server, EtcdServer)
        leases = {str(lease["ID"]) for lease in server.api("/v3/lease/leases").get("leases", [])}
        used = {str(kv.get("lease", "0")) for kv in self._keys(server, b"/")}
        return sorted(leases - used)
