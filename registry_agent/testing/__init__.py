"""Testing helpers: the in-memory backend and real throwaway servers.

The backend contract suite lives in :mod:`registry_agent.testing.contract`
(it needs pytest).
"""

from registry_agent.testing.memory import MemoryBackend, MemoryRegistry
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

__all__ = ["ConsulServer", "EtcdServer", "MemoryBackend", "MemoryRegistry", "ServerProcess"]
