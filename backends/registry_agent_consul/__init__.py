"""Consul backend for registry-agent (``consul://host:port``)."""

from registry_agent_consul._backend import ConsulBackend

__all__ = ["ConsulBackend"]
