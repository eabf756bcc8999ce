"""The backend contract on real Consul and etcd servers."""

import pytest

from registry_agent import EventType
from registry_agent.testing.contract import (
    BackendContract,
    ConnectionAwareContract,
    ServerControl,
    WatcherContract,
)
from registry_agent.testing.servers import ConsulServer, EtcdServer


class TestConsulContract(BackendContract):
    @pytest.fixture
    def server(self, consul_server: ConsulServer) -> ServerControl:
        return consul_server


class TestEtcdContract(BackendContract):
    @pytest.fixture
    def server(self, etcd_server: EtcdServer) -> ServerControl:
        return etcd_server


class TestConsulWatcher(WatcherContract):
    # Consul keeps an entry whose TTL ran out, critical: watchers see it offline.
    expiry_event = EventType.OFFLINE

    @pytest.fixture
    def server(self, persistent_consul_server: ConsulServer) -> ServerControl:
        return persistent_consul_server


class TestEtcdWatcher(WatcherContract):
    @pytest.fixture
    def server(self, etcd_server: EtcdServer) -> ServerControl:
        return etcd_server


class TestConsulConnectionAware(ConnectionAwareContract):
    @pytest.fixture
    def server(self, consul_server: ConsulServer) -> ServerControl:
        return consul_server


class TestEtcdConnectionAware(ConnectionAwareContract):
    @pytest.fixture
    def server(self, etcd_server: EtcdServer) -> ServerControl:
        return etcd_server
