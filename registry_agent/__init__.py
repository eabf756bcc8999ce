"""registry-agent: service registration in Consul or etcd that heals itself.

The public API is re-exported here; every other module is private.
"""

from registry_agent._backend import Backend, Lease
from registry_agent._blocking import Registrar
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
from registry_agent._health.checks import (
    CallableCheck,
    CheckResult,
    CommandCheck,
    HealthCheck,
    HttpCheck,
    TcpCheck,
)
from registry_agent._health.gate import GateState, OnUnhealthy
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._plugins import available_backends, open_backend
from registry_agent._registrar import (
    AsyncRegistrar,
    RegistrarEvent,
    RegistrarEventKind,
    RegistrationTimeout,
)
from registry_agent._retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "AsyncRegistrar",
    "Backend",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "CallableCheck",
    "CheckResult",
    "CommandCheck",
    "ConfigError",
    "GateState",
    "HealthCheck",
    "HealthStatus",
    "HttpCheck",
    "InstanceHealth",
    "Lease",
    "LeaseLost",
    "OnUnhealthy",
    "Registrar",
    "RegistrarEvent",
    "RegistrarEventKind",
    "RegistrationTimeout",
    "RegistryError",
    "Rejected",
    "RetryPolicy",
    "RevisionCompacted",
    "ServiceInstance",
    "ServiceSnapshot",
    "TcpCheck",
    "__version__",
    "available_backends",
    "open_backend",
]
