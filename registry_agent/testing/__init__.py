"""Testing helpers: the in-memory backend, real throwaway servers and a fault proxy.

The backend contract suite lives in :mod:`registry_agent.testing.contract`
(it needs pytest).
"""

from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

__all__ = [
    "ConsulServer",
    "EtcdServer",
    "FaultProxy",
    "MemoryBackend",
    "MemoryRegistry",
    "ServerProcess",
]
