"""The backend kit: everything a third-party backend needs, in one public module.

A backend is a class that satisfies :class:`Backend` (``isinstance`` checks
it), built by ``from_url(url, options)`` without any I/O, and registered under
the entry-point group :data:`ENTRY_POINT_GROUP` with its URL scheme as the
name::

    [project.entry-points."registry_agent.backends"]
    zk = "registry_agent_zk:ZooKeeperBackend"

``registry_agent.open_backend("zk://…")`` and the agent's ``[backend]`` table
then find it. The agent passes every key of ``[backend]`` but ``url`` (secrets
read from ``token_file``/``password_file`` first) to ``from_url`` untouched,
when it loads its file: the backend alone decides which options it takes, with
:func:`take_options` and the ``opt_*`` converters, and its
:class:`ConfigError` (field ``backend.<option>``) is shown with the file name.

Optional capabilities, each a runtime-checkable protocol: :class:`SharedLiveness`
(one heartbeat and one verification for many registrations) and
:class:`ConnectionAware` (say at once when the registry goes away or comes back;
:class:`ConnectionProbe` implements it from one long-lived request). A backend may
also have ``validate(instance)`` (see :class:`Backend`). A ``watch`` that yields
snapshots whose ``instances`` is an :class:`InstanceMap` evolved from the previous
one (``previous.instances.evolve({id: health_or_None})``) costs watchers only the
ids that changed; any other mapping is diffed in full.

``registry_agent.testing.contract`` holds the contract suites a backend must pass.
"""

from registry_agent._backend import (
    Backend,
    Lease,
    LivenessNews,
    SharedLiveness,
    error_context,
    running_loop,
)
from registry_agent._errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    Rejected,
    RevisionCompacted,
    Throttled,
)
from registry_agent._events import InstanceMap
from registry_agent._identity import registry_address
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._options import REAP_CEILING
from registry_agent._plugins import ENTRY_POINT_GROUP
from registry_agent._probe import ConnectionAware, ConnectionProbe, Hold
from registry_agent._tls import TLSFiles
from registry_agent._urls import (
    BackendURL,
    Option,
    as_bool,
    as_choice,
    as_duration,
    as_str,
    opt_bool,
    opt_choice,
    opt_duration,
    opt_str,
    option,
    parse_backend_url,
    parse_duration,
    read_secret_file,
    take_options,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "REAP_CEILING",
    "Backend",
    "BackendError",
    "BackendURL",
    "BackendUnavailable",
    "ConfigError",
    "ConnectionAware",
    "ConnectionProbe",
    "HealthStatus",
    "Hold",
    "InstanceHealth",
    "InstanceMap",
    "Lease",
    "LeaseLost",
    "LivenessNews",
    "Option",
    "Rejected",
    "RevisionCompacted",
    "ServiceInstance",
    "ServiceSnapshot",
    "SharedLiveness",
    "TLSFiles",
    "Throttled",
    "as_bool",
    "as_choice",
    "as_duration",
    "as_str",
    "error_context",
    "opt_bool",
    "opt_choice",
    "opt_duration",
    "opt_str",
    "option",
    "parse_backend_url",
    "parse_duration",
    "read_secret_file",
    "registry_address",
    "running_loop",
    "take_options",
]
