"""The backend contract on real Consul and etcd servers."""

import pytest

from registry_agent.testing.contract import BackendContract, ServerControl
from registry_agent.testing.servers import ConsulServer, EtcdServer


class TestConsulContract(BackendContract):
    @pytest.fixture
    def server(self, consul_server: ConsulServer) -> ServerControl:
        return consul_server


class TestEtcdContract(BackendContract):
    @pytest.fixture
    def server(self, etcd_server: EtcdServer) -> ServerControl:
        return etcd_server
