"""registry-agent: service registration in Consul or etcd that heals itself.

The public API is re-exported here, and what a third-party backend needs is in
:mod:`registry_agent.backend`; every other module is private.
"""

from registry_agent._address import advertised_address
from registry_agent._backend import Backend, Lease
from registry_agent._blocking import Discovery, Registrar, Watcher
from registry_agent._discovery import AsyncDiscovery
from registry_agent._env import EnvBackendURL, backends_from_env
from registry_agent._errors import (
    BackendError,
    BackendNotFound,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    NoInstanceAvailable,
    RegistryError,
    Rejected,
    RevisionCompacted,
    Throttled,
)
from registry_agent._events import EventType, WatchEvent
from registry_agent._health.checks import (
    CallableCheck,
    CheckResult,
    CommandCheck,
    GrpcCheck,
    HealthCheck,
    HttpCheck,
    TcpCheck,
)
from registry_agent._health.gate import GateState, OnUnhealthy
from registry_agent._loader import load_registrars
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._options import RegistrationOptions
from registry_agent._plugins import available_backends, open_backend
from registry_agent._policy import DiscoveryPolicy, OutlierEjection
from registry_agent._registrar import (
    AsyncRegistrar,
    RegistrarEvent,
    RegistrarEventKind,
    RegistrationTimeout,
)
from registry_agent._retry import RetryPolicy
from registry_agent._select import Strategy
from registry_agent._status import BackendStatus, CheckStatus, RegistrationStatus
from registry_agent._transport import AsyncDiscoveryTransport, DiscoveryTransport
from registry_agent._watcher import AsyncWatcher, WatchedBackend, WatcherStats
from registry_agent.metrics import RegistryCollector

__version__ = "0.1.0"

__all__ = [
    "AsyncDiscovery",
    "AsyncDiscoveryTransport",
    "AsyncRegistrar",
    "AsyncWatcher",
    "Backend",
    "BackendError",
    "BackendNotFound",
    "BackendStatus",
    "BackendUnavailable",
    "CallableCheck",
    "CheckResult",
    "CheckStatus",
    "CommandCheck",
    "ConfigError",
    "Discovery",
    "DiscoveryPolicy",
    "DiscoveryTransport",
    "EnvBackendURL",
    "EventType",
    "GateState",
    "GrpcCheck",
    "HealthCheck",
    "HealthStatus",
    "HttpCheck",
    "InstanceHealth",
    "Lease",
    "LeaseLost",
    "NoInstanceAvailable",
    "OnUnhealthy",
    "OutlierEjection",
    "Registrar",
    "RegistrarEvent",
    "RegistrarEventKind",
    "RegistrationOptions",
    "RegistrationStatus",
    "RegistrationTimeout",
    "RegistryCollector",
    "RegistryError",
    "Rejected",
    "RetryPolicy",
    "RevisionCompacted",
    "ServiceInstance",
    "ServiceSnapshot",
    "Strategy",
    "TcpCheck",
    "Throttled",
    "WatchEvent",
    "WatchedBackend",
    "Watcher",
    "WatcherStats",
    "__version__",
    "advertised_address",
    "available_backends",
    "backends_from_env",
    "load_registrars",
    "open_backend",
]
