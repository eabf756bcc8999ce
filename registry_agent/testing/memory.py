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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from registry_agent._backend import Backend, Lease, LivenessNews
from registry_agent._errors import BackendUnavailable, LeaseLost
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance, ServiceSnapshot
from registry_agent._retry import RetryPolicy
from registry_agent._urls import Option, opt_bool, opt_duration, parse_backend_url, take_options

__all__ = ["MemoryBackend", "MemoryRegistry", "SharedMemoryBackend"]


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
    def named(cls, name: str, *, clock: Callable[[], float] | None = None) -> MemoryRegistry:
        """The registry shared by every ``memory://NAME`` backend of this process
        (made with ``clock`` if it does not exist yet)."""
        with cls._named_lock:
            registry = cls._named.get(name)
            if registry is None:
                registry = cls._named[name] = cls(name, clock=clock or time.monotonic)
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

    def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds with no entry on it yet."""
        with self._lock:
            self._check_running()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = self.clock() + ttl
            return lease_id

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease and delete every entry on it; a missing one is fine."""
        with self._lock:
            self._check_running()
            self._leases.pop(lease_id, None)
            gone = [key for key, entry in self._entries.items() if entry.lease_id == lease_id]
            for key in gone:
                del self._entries[key]
            if gone:
                self._revision += 1
        self._notify()

    def read(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, InstanceHealth]]:
        """The live entries among ``keys`` (service, instance id) with their lease ids."""
        with self._lock:
            self._check_running()
            self._expire()
            found = {}
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    found[key] = (entry.lease_id, entry.health)
            return found

    def delete_held(self, service: str, instance_id: str, lease_id: int) -> None:
        """Remove an entry only while ``lease_id`` holds it; the lease stays."""
        with self._lock:
            self._check_running()
            self._expire()
            entry = self._entries.get((service, instance_id))
            if entry is not None and entry.lease_id == lease_id:
                del self._entries[(service, instance_id)]
                self._revision += 1
        self._notify()

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

    def services(self) -> list[str]:
        """The services with at least one live entry, sorted."""
        with self._lock:
            self._check_running()
            self._expire()
            return sorted({svc for svc, _ in self._entries})

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
    # ``shared=true`` opens a :class:`SharedMemoryBackend`.
    _OPTIONS: ClassVar[Mapping[str, Option]] = {"timeout": opt_duration, "shared": opt_bool}

    def __init__(self, registry: MemoryRegistry | None = None) -> None:
        self.registry = registry if registry is not None else MemoryRegistry()

    @property
    def registry_identity(self) -> tuple[str, str]:
        """Which entries this backend writes: its registry's name (``memory://NAME``),
        or that registry object's own identity for one not made by :meth:`MemoryRegistry.named`."""
        registry = self.registry
        if MemoryRegistry._named.get(registry.name) is registry:
            return ("memory", registry.name)
        return ("memory", f"{registry.name or 'unnamed'}@{id(registry):#x}")

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> MemoryBackend:
        parsed = parse_backend_url(url, default_port=0)
        taken = take_options("memory", {**parsed.query, **options}, cls._OPTIONS)
        name = ",".join(host for host, _ in parsed.endpoints) or "default"
        kind = SharedMemoryBackend if taken.get("shared") else cls
        return kind(MemoryRegistry.named(name))

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

    async def services(self) -> Sequence[str]:
        """The services with at least one live entry, sorted."""
        return self.registry.services()

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


@dataclass(slots=True)
class _Member:
    lease: Lease
    status: HealthStatus
    listeners: list[Callable[[LivenessNews], None]]


class _SharedLease:
    """One lease of one TTL shared by many entries: renewed every ttl/3, read back once per TTL."""

    def __init__(self, registry: MemoryRegistry, ttl: float) -> None:
        self.registry = registry
        self.ttl = ttl
        self.lease_id: int | None = None  # None: not granted yet, or lost
        self.members: dict[tuple[str, str], _Member] = {}
        self.error: BackendUnavailable | None = None  # the failing renewal's error
        self.last_renewal: float | None = None
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.retry = RetryPolicy(initial=min(0.2, ttl / 6), cap=ttl / 3)

    def owns(self, lease: Lease) -> bool:
        member = self.members.get((lease.instance.service, lease.instance.id))
        return member is not None and member.lease == lease

    def tell(self, news: LivenessNews, members: Iterable[_Member] | None = None) -> None:
        for member in list(self.members.values() if members is None else members):
            for listener in list(member.listeners):
                try:
                    listener(news)
                except Exception:  # a follower's bug must not stop the renewals
                    continue

    def lose(self) -> None:
        self.lease_id = None
        self.error = None
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None
        self.tell(LivenessNews.RENEWAL)

    async def renew(self, lease_id: int) -> None:
        clock = asyncio.get_running_loop().time
        failing_since: float | None = None
        verified = clock()
        failures = 0
        while self.lease_id == lease_id:
            await asyncio.sleep(self.retry.delay(failures) if failures else self.ttl / 3)
            try:
                alive = self.registry.keepalive(lease_id, self.ttl)
            except BackendUnavailable as exc:
                failures += 1
                failing_since = clock() if failing_since is None else failing_since
                first, self.error = self.error is None, exc
                if clock() - failing_since >= self.ttl:
                    self.lose()  # as a real server would have by now
                    return
                if first:
                    self.tell(LivenessNews.RENEWAL)
                continue
            if not alive:
                self.lose()
                return
            failures, failing_since = 0, None
            self.last_renewal = time.time()
            if self.error is not None:
                self.error = None
                self.tell(LivenessNews.RENEWAL)
            if clock() - verified >= self.ttl - 1e-6:
                verified = clock()
                self.verify(lease_id)

    def verify(self, lease_id: int) -> None:
        members = dict(self.members)
        try:
            found = self.registry.read(members)
        except BackendUnavailable:
            return  # read again next TTL
        wrong = []
        for key, member in members.items():
            held = found.get(key)
            if (
                held is None
                or held[0] != lease_id
                or held[1].instance != member.lease.instance
                or held[1].status is not member.status
            ):
                wrong.append(member)
        self.tell(LivenessNews.VERIFY, wrong)


class SharedMemoryBackend(MemoryBackend):
    """``memory://NAME?shared=true``: a :class:`MemoryBackend` with the
    :class:`~registry_agent._backend.SharedLiveness` capability.

    One lease per TTL per backend object, renewed by one task every ttl/3 with
    jittered backoff, counted lost after a TTL of failed renewals or when the
    registry no longer knows it; its entries are read back in one read per TTL.
    """

    def __init__(self, registry: MemoryRegistry | None = None) -> None:
        super().__init__(registry)
        self._shared: dict[float, _SharedLease] = {}

    def _group(self, lease: Lease) -> _SharedLease | None:
        group = self._shared.get(lease.ttl)
        return group if group is not None and group.lease_id == lease.handle else None

    async def register_shared(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        ttl = float(ttl)
        group = self._shared.setdefault(ttl, _SharedLease(self.registry, ttl))
        async with group.lock:  # one grant however many members re-register at once
            if group.lease_id is None:
                group.lease_id = lease_id = self.registry.grant(ttl)
                group.last_renewal = time.time()
                group.task = asyncio.create_task(group.renew(lease_id), name=f"shared-{ttl:g}s")
            lease_id = group.lease_id
        try:
            self.registry.put(InstanceHealth(instance, status, note), ttl, lease_id)
        except LeaseLost:
            if group.lease_id == lease_id:
                group.lose()
            raise
        lease = Lease(instance, ttl, lease_id, "memory", shared=True)
        group.members[(instance.service, instance.id)] = _Member(lease, status, [])
        return lease

    def follow(self, lease: Lease, notify: Callable[[LivenessNews], None]) -> Callable[[], None]:
        group = self._shared.get(lease.ttl)
        member = group.members.get((lease.instance.service, lease.instance.id)) if group else None
        if member is None or member.lease != lease:
            return lambda: None
        member.listeners.append(notify)

        def unfollow() -> None:
            with contextlib.suppress(ValueError):
                member.listeners.remove(notify)

        return unfollow

    def last_renewal(self, lease: Lease) -> float | None:
        group = self._group(lease)
        return group.last_renewal if group is not None else None

    async def heartbeat(self, lease: Lease) -> None:
        if not lease.shared:
            return await super().heartbeat(lease)
        group = self._group(lease)
        if group is None or not group.owns(lease):
            raise LeaseLost(
                "the shared lease is gone",
                backend="memory",
                service=lease.instance.service,
                instance=lease.instance.id,
            )
        if group.error is not None:
            raise group.error
        return None

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        await super().set_status(lease, status, note)
        group = self._shared.get(lease.ttl)
        if lease.shared and group is not None and group.owns(lease):
            group.members[(lease.instance.service, lease.instance.id)].status = status

    async def deregister(self, lease: Lease) -> None:
        if not lease.shared:
            return await super().deregister(lease)
        assert isinstance(lease.handle, int)
        self.registry.delete_held(lease.instance.service, lease.instance.id, lease.handle)
        group = self._shared.get(lease.ttl)
        if group is None or not group.owns(lease):
            return None
        del group.members[(lease.instance.service, lease.instance.id)]
        if not group.members:
            await self._drop(group)
        return None

    async def _drop(self, group: _SharedLease) -> None:
        self._shared.pop(group.ttl, None)
        lease_id, group.lease_id = group.lease_id, None
        if group.task is not None:
            group.task.cancel()
        if lease_id is not None:
            self.registry.revoke(lease_id)

    async def close(self) -> None:
        for group in list(self._shared.values()):
            with contextlib.suppress(BackendUnavailable):
                await self._drop(group)
