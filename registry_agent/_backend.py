"""The seam between the core and a registry: the :class:`Backend` protocol.

Backends know nothing of the registrar, watcher or agent; the core knows a
backend only through this protocol. A third-party backend implements it and
registers its class under the entry-point group ``registry_agent.backends``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot

__all__ = [
    "Backend",
    "Lease",
    "LivenessNews",
    "SharedLiveness",
    "error_context",
    "running_loop",
]


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None: backends rebuild clients when it changes."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def error_context(
    backend: str, *, instance: ServiceInstance | None = None, service: str | None = None
) -> dict[str, str | None]:
    """The keyword arguments that tie an error to its backend, service and instance."""
    return {
        "backend": backend,
        "service": instance.service if instance is not None else service,
        "instance": instance.id if instance is not None else None,
    }


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of one registration, returned by :meth:`Backend.register`.

    ``handle`` is backend-specific (the Consul check id, the etcd lease id).
    """

    instance: ServiceInstance
    ttl: float
    handle: str | int
    backend: str
    #: True when the backend keeps this registration alive with a heartbeat it
    #: shares with the process's other registrations (same backend, same TTL),
    #: and verifies it in one read for all of them: see :class:`SharedLiveness`.
    shared: bool = False


class LivenessNews(enum.Enum):
    """What a backend that shares liveness tells a registration about its lease."""

    #: The shared renewal failed, recovered, or the shared lease was lost:
    #: call :meth:`Backend.heartbeat` now (it answers from memory, without I/O).
    RENEWAL = "renewal"
    #: The shared verification found this entry missing, changed, or holding
    #: another status than the one written: call :meth:`Backend.lookup` now.
    VERIFY = "verify"


@runtime_checkable
class SharedLiveness(Protocol):
    """Optional backend capability: one heartbeat and one verification for many registrations.

    For a :class:`Lease` from :meth:`register_shared` the backend renews the liveness
    itself (etcd: one lease per TTL on one keepalive stream; Consul: one
    heartbeat service per TTL whose TTL check every service aliases) and reads
    all its registrations back once per TTL. The registrar then runs no timer
    of its own: it calls :meth:`Backend.heartbeat` (answered from memory:
    ``LeaseLost`` when the shared lease is gone, ``BackendUnavailable`` while
    renewals fail) and :meth:`Backend.lookup` only when told to.
    """

    async def register_shared(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        """Like :meth:`Backend.register`, but the entry lives on the shared liveness of
        ``ttl`` (granted or registered first if needed) and the returned lease has
        ``shared=True``. The backend keeps it alive until it is deregistered, the
        backend is closed, or the process dies; :meth:`Backend.register` keeps its
        own lease that the caller renews."""
        ...

    def follow(self, lease: Lease, notify: Callable[[LivenessNews], None]) -> Callable[[], None]:
        """Call ``notify`` (on the event loop, never raising into the backend) with news
        about ``lease`` until the returned function is called or the lease is deregistered."""
        ...

    def last_renewal(self, lease: Lease) -> float | None:
        """Wall-clock time (``time.time()``) of the last successful shared renewal covering
        ``lease``, or None when none has succeeded yet."""
        ...


@runtime_checkable
class Backend(Protocol):
    """An asynchronous service registry.

    Every method raises a subclass of :class:`~registry_agent.BackendError`:
    :class:`~registry_agent.BackendUnavailable` when the registry cannot be
    reached within the backend's timeout, :class:`~registry_agent.LeaseLost`
    when the lease or check behind a :class:`Lease` no longer exists, and
    :class:`~registry_agent.Rejected` when the registry refuses the request.

    **Optional** ``validate(instance: ServiceInstance) -> None`` (plain or
    ``async``): check ``instance`` against what the registry documents it
    accepts (Consul: at most 64 meta keys, key and value lengths, no ``.`` in a
    meta key…) without any I/O, raising :class:`~registry_agent.Rejected` or
    :class:`~registry_agent.ConfigError` naming the field. The registrar calls
    it in ``start()`` when the backend has it, so a value the registry would
    refuse fails at once instead of being retried. It is not a member of this
    protocol, so backends without it still satisfy ``isinstance(x, Backend)``.
    Likewise optional: ``validate_options(*, ttl, deregister_critical_after)`` for
    registration options the registry refuses (Consul: reaping below 60 s), called
    by ``start()`` and by the agent when it loads its file; a hook that also takes
    ``on_unhealthy`` gets it (``"deregister"`` or ``"critical"``).

    Likewise optional: ``async update(lease, instance, *, status, note) -> Lease``,
    writing ``instance`` (the same id, new tags or meta) over the entry of ``lease`` in
    place, keeping its liveness (etcd: a put of the same key on the same lease);
    ``AsyncRegistrar.update`` calls it. Without it the registrar calls
    :meth:`register` again, which must then replace the entry in place (Consul's
    register of the same id does, keeping its checks' statuses).

    Likewise optional: a read-only ``registry_identity`` property, a hashable tuple
    saying which entries the backend writes (e.g. ``("etcd", ("127.0.0.1:2379",),
    "/services/")``): a registrar and the agent refuse two backends with equal
    identities (two lanes writing one entry would take it from each other forever).
    Without it, backends are compared by URL (credentials aside) or by object.

    Likewise optional: ``async services() -> Sequence[str]``, the names of the services
    the registry holds, sorted (Consul: its catalog without our heartbeat services;
    etcd: the services with an entry in the backend's format under its prefix).
    ``registry-agent services`` uses it; a backend without it is named in a
    one-line error there.

    :meth:`lookup` returns the registered instance itself (``lease.instance``)
    when the entry holds what was written for it, even where the registry's
    format keeps less of it than the instance says (a peer's format).
    """

    #: The URL scheme this backend serves, e.g. ``"consul"``.
    scheme: ClassVar[str]

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> Backend:
        """Build a backend from a URL and options (query string merged with keywords).

        Raises :class:`~registry_agent.ConfigError` naming a bad or unknown option.
        """
        ...

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        """Register ``instance`` (or replace its entry) and keep it for ``ttl`` seconds.

        The entry disappears (etcd) or turns critical (Consul) unless
        :meth:`heartbeat` is called within ``ttl``. ``deregister_critical_after``
        asks a registry that keeps critical entries (Consul) to remove them
        after that long; ``None`` keeps the backend's default.
        """
        ...

    async def heartbeat(self, lease: Lease) -> None:
        """Renew ``lease`` for another TTL, keeping the status last set.

        Raises ``LeaseLost`` when the lease or check is gone.
        """
        ...

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        """Our own entry as the registry holds it now, read cheaply (one key or one service).

        ``None`` when it is missing or no longer held by ``lease`` (deleted,
        replaced by someone else, or unreadable): the registrar then registers again.
        """
        ...

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        """Mark the registered instance passing or critical, with a human note."""
        ...

    async def deregister(self, lease: Lease) -> None:
        """Remove the registration; removing one that is already gone is not an error."""
        ...

    async def list(self, service: str) -> ServiceSnapshot:
        """Every instance of ``service`` with its health, and the index it was read at."""
        ...

    def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        """Yield a snapshot of ``service`` now, then a new one after every change.

        With ``since``, resume after that snapshot: the first snapshot yielded
        is the first that differs from it. Raises
        :class:`~registry_agent.RevisionCompacted` when the backend cannot
        resume from ``since`` (list again without it), and
        :class:`~registry_agent.BackendUnavailable` when the connection is lost.
        Consecutive snapshots always differ.
        """
        ...

    async def close(self) -> None:
        """Release connections. Registrations are not removed."""
        ...
