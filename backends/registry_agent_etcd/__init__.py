"""etcd backend for registry-agent (``etcd://host:port``)."""

from registry_agent_etcd._backend import EtcdBackend

__all__ = ["EtcdBackend"]
