"""Testing helpers: the in-memory backend, real throwaway servers and a fault proxy.

The backend contract suite lives in :mod:`registry_agent.testing.contract`,
its fault section (a :class:`FaultProxy` between client and server) in
:mod:`registry_agent.testing.fault_contract`; both need pytest.
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
