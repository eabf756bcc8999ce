"""An in-memory registry for unit tests of pure logic and for users' own tests.

It follows etcd's semantics: an entry whose lease is not renewed within its
TTL disappears. Backends opened with the same ``memory://NAME`` URL share one
:class:`MemoryRegistry`, across threads and event loops, so a registrar and a
watcher in one test see each other. It is not a stand-in for proving that a
real backend works: the Consul and etcd plugins are tested on real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from registry_agent._backend import Backend, Lease
from registry_agent._errors import BackendUnavailable, LeaseLost
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._urls import Option, opt_duration, parse_backend_url, take_options

__all__ = ["MemoryBackend", "MemoryRegistry"]


@dataclass(slots=True)
class _Entry:
    health: InstanceHealth
    lease_id: int


class MemoryRegistry:
    """The shared state behind ``memory://NAME`` backends, with server-like controls.

    :meth:`stop` makes every call fail with ``BackendUnavailable`` until
    :meth:`start`; :meth:`wipe` forgets everything, like a server restarted empty.
    """

    _named: ClassVar[dict[str, MemoryRegistry]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._leases: dict[int, float] = {}
        self._lease_ids = itertools.count(1)
        self._revision = 0
        self._running = True
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @classmethod
    def named(cls, name: str) -> MemoryRegistry:
        """The registry shared by every ``memory://NAME`` backend of this process."""
        with cls._named_lock:
            registry = cls._named.get(name)
            if registry is None:
                registry = cls._named[name] = cls(name)
            return registry

    # -- server controls -------------------------------------------------

    def stop(self) -> None:
        """Refuse every call, as a server that is down."""
        with self._lock:
            self._running = False
        self._notify()

    def start(self) -> None:
        """Serve again after :meth:`stop`, with the state it had."""
        with self._lock:
            self._running = True
        self._notify()

    def wipe(self) -> None:
        """Forget every entry and lease, as a server restarted empty."""
        with self._lock:
            self._entries.clear()
            self._leases.clear()
            self._revision = 0
        self._notify()

    def pause(self) -> None:
        """Like a frozen server; here calls fail at once instead of timing out."""
        self.stop()

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self.start()

    def restart(self, *, wipe: bool = False) -> None:
        """Like a server restart: keeps state unless ``wipe``."""
        self.stop()
        if wipe:
            self.wipe()
        self.start()

    @property
    def url(self) -> str:
        """``memory://NAME`` (for a registry made with :meth:`named`)."""
        return f"memory://{self.name or 'default'}"

    @property
    def running(self) -> bool:
        """False between :meth:`stop` and :meth:`start`."""
        return self._running

    # -- operations used by MemoryBackend ------------------------------------

    def _check_running(self) -> None:
        if not self._running:
            raise BackendUnavailable(f"memory registry {self.name!r} is stopped", backend="memory")

    def _expire(self) -> bool:
        now = self.clock()
        dead = {lease for lease, expires in self._leases.items() if expires <= now}
        if not dead:
            return False
        for lease in dead:
            del self._leases[lease]
        gone = [key for key, entry in self._entries.items() if entry.lease_id in dead]
        for key in gone:
            del self._entries[key]
        if gone:
            self._revision += 1
        return bool(gone)

    def put(self, health: InstanceHealth, ttl: float, lease_id: int | None = None) -> int:
        """Store ``health`` under a new lease (or ``lease_id``); returns the lease id."""
        with self._lock:
            self._check_running()
            self._expire()
            if lease_id is None:
                lease_id = next(self._lease_ids)
                self._leases[lease_id] = self.clock() + ttl
            elif lease_id not in self._leases:
                raise LeaseLost(
                    "lease not found",
                    backend="memory",
                    service=health.instance.service,
                    instance=health.instance.id,
                )
            key = (health.instance.service, health.instance.id)
            self._entries[key] = _Entry(health, lease_id)
            self._revision += 1
        self._notify()
        return lease_id

    def keepalive(self, lease_id: int, ttl: float) -> bool:
        """Renew a lease; False when it no longer exists."""
        with self._lock:
            self._check_running()
            expired = self._expire()
            alive = lease_id in self._leases
            if alive:
                self._leases[lease_id] = self.clock() + ttl
        if expired:
            self._notify()
        return alive

    def delete(self, service: str, instance_id: str, lease_id: int | None) -> None:
        """Remove an entry and revoke its lease; missing ones are fine."""
        with self._lock:
            self._check_running()
            self._expire()
            if self._entries.pop((service, instance_id), None) is not None:
                self._revision += 1
            if lease_id is not None:
                self._leases.pop(lease_id, None)
        self._notify()

    def get(self, service: str, instance_id: str, lease_id: int) -> InstanceHealth | None:
        """The entry held by ``lease_id``, if it still is."""
        with self._lock:
            self._check_running()
            self._expire()
            entry = self._entries.get((service, instance_id))
            return entry.health if entry is not None and entry.lease_id == lease_id else None

    def snapshot(self, service: str) -> ServiceSnapshot:
        """Every live entry of ``service``."""
        with self._lock:
            self._check_running()
            self._expire()
            found = {
                iid: entry.health for (svc, iid), entry in self._entries.items() if svc == service
            }
            return ServiceSnapshot(service, self._revision, MappingProxyType(found))

    def next_expiry(self) -> float | None:
        """Seconds until the next lease expires, if any."""
        with self._lock:
            if not self._leases:
                return None
            return max(0.0, min(self._leases.values()) - self.clock())

    def subscribe(self, event: asyncio.Event) -> Callable[[], None]:
        """Set ``event`` (on its own loop) after every change; returns the unsubscribe call."""
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)

        def unsubscribe() -> None:
            with self._lock:
                self._waiters.discard(waiter)

        return unsubscribe

    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


class MemoryBackend(Backend):
    """``memory://NAME``: the in-memory :class:`Backend`."""

    scheme: ClassVar[str] = "memory"
    # ``timeout`` is accepted for symmetry with real backends; no call here waits.
    _OPTIONS: ClassVar[Mapping[str, Option]] = {"timeout": opt_duration}

    def __init__(self, registry: MemoryRegistry | None = None) -> None:
        self.registry = registry if registry is not None else MemoryRegistry()

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> MemoryBackend:
        parsed = parse_backend_url(url, default_port=0)
        take_options("memory", options, cls._OPTIONS)
        name = ",".join(host for host, _ in parsed.endpoints) or "default"
        return cls(MemoryRegistry.named(name))

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        lease_id = self.registry.put(InstanceHealth(instance, status, note), ttl)
        return Lease(instance, float(ttl), lease_id, "memory")

    async def heartbeat(self, lease: Lease) -> None:
        assert isinstance(lease.handle, int)
        if not self.registry.keepalive(lease.handle, lease.ttl):
            raise LeaseLost(
                "lease not found",
                backend="memory",
                service=lease.instance.service,
                instance=lease.instance.id,
            )

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        assert isinstance(lease.handle, int)
        return self.registry.get(lease.instance.service, lease.instance.id, lease.handle)

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        assert isinstance(lease.handle, int)
        self.registry.put(InstanceHealth(lease.instance, status, note), lease.ttl, lease.handle)

    async def deregister(self, lease: Lease) -> None:
        assert isinstance(lease.handle, int)
        self.registry.delete(lease.instance.service, lease.instance.id, lease.handle)

    async def list(self, service: str) -> ServiceSnapshot:
        return self.registry.snapshot(service)

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        changed = asyncio.Event()
        unsubscribe = self.registry.subscribe(changed)
        last = since.instances if since is not None else None
        try:
            while True:
                changed.clear()
                current = self.registry.snapshot(service)
                if last is None or dict(current.instances) != dict(last):
                    last = current.instances
                    yield current
                    continue
                wait = self.registry.next_expiry()
                # Wake at the next lease expiry too: nobody notifies for it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), None if wait is None else wait + 0.01)
        finally:
            unsubscribe()

    async def close(self) -> None:
        return None
