"""registry-agent: service registration in Consul or etcd that heals itself.

The public API is re-exported here; every other module is private.
"""

from registry_agent._backend import Backend, Lease
from registry_agent._errors import (
    BackendError,
    BackendNotFound,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    RegistryError,
    Rejected,
    RevisionCompacted,
)
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._plugins import available_backends, open_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "ConfigError",
    "HealthStatus",
    "InstanceHealth",
    "Lease",
    "LeaseLost",
    "RegistryError",
    "Rejected",
    "RevisionCompacted",
    "ServiceInstance",
    "ServiceSnapshot",
    "__version__",
    "available_backends",
    "open_backend",
]
