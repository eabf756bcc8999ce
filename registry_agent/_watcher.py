"""AsyncWatcher: exact add/update/delete/offline/online events for one or more services."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, TypeAlias, TypeVar

from registry_agent._backend import Backend
from registry_agent._errors import (
    BackendUnavailable,
    ConfigError,
    RegistryError,
    RevisionCompacted,
)
from registry_agent._events import (
    Backlog,
    EventType,
    InstanceMap,
    MergedView,
    WatchEvent,
    changed_ids,
    diff_snapshots,
)
from registry_agent._fork import ForkGuard
from registry_agent._identity import listed_backends, open_listed
from registry_agent._models import InstanceHealth, ServiceSnapshot, _check_name
from registry_agent._registration import scrub_credentials
from registry_agent._retry import RetryPolicy
from registry_agent._urls import parse_backend_url

__all__ = ["AsyncWatcher", "Backends", "WatchedBackend", "WatcherStats", "open_backends"]

log = logging.getLogger("registry_agent.watcher")

# A failing listener is reported at most this often (seconds).
_LISTENER_REPORT_EVERY = 60.0

_REPEAT_LOG_EVERY = 30.0
_EMPTY: Mapping[str, InstanceHealth] = MappingProxyType({})

#: What a watcher or a discovery watches: one backend (a URL or a :class:`Backend`),
#: or a list of them for one merged view.
Backends: TypeAlias = str | Backend | Sequence[str | Backend] | None


@dataclass(frozen=True, slots=True)
class _Member:
    """One backend of a watch: opened here from a URL (``owned``: closed here) or given."""

    backend: Backend
    owned: bool
    label: str


@dataclass(frozen=True, slots=True)
class WatchedBackend:
    """What one backend of a watcher holds of one service, as last read."""

    service: str
    #: The backend's name in logs: its URL without credentials or options.
    backend: str
    #: Read at least once.
    synced: bool
    #: Instances it holds, and how many of them are passing.
    instances: int
    healthy: int
    #: Failed reads of this service from this backend (monotonic).
    errors: int


@dataclass(frozen=True, slots=True)
class WatcherStats:
    """A watcher's counts at one moment (:meth:`AsyncWatcher.stats`)."""

    services: tuple[str, ...]
    #: Every backend's name, in the order given (one for a single backend).
    backends: tuple[str, ...]
    #: Events of the watcher's view since it started, by ``(service, event type)``:
    #: every type of every service is present (0 until seen).
    events: Mapping[tuple[str, str], int]
    #: One per service and backend, services first.
    watched: tuple[WatchedBackend, ...]
    #: ``async for`` loops (or blocking ``for`` loops) consuming the watch now.
    consumers: int
    #: Instances whose changes the consumers have not taken yet (summed over them).
    pending: int
    #: Seconds the slowest consumer is behind (0 when all are up to date).
    lag: float
    #: Changes merged into a change a consumer had not taken yet (monotonic).
    coalesced: int


def open_backends(backend: Backends) -> tuple[_Member, ...]:
    """The backends named by ``backend``, each opened from its URL or taken as given.

    Each is named for logs as the registrar names its backends: a URL without
    credentials or options, an object by its repr (credentials masked), and
    ``(backend[i])`` added to a name that repeats. Raises :class:`ConfigError` for
    an empty list or anything but URLs and Backends (field ``backend`` or
    ``backend[i]``), the same URL or object listed twice (``backend[i]``), and an
    option a backend refuses (``backend[i]`` with several, as the registrar says it).
    The same registry spelled twice is watched twice, harmlessly: the view merges it.
    """
    given: list[str | Backend] = listed_backends(backend)
    many = len(given) > 1
    opened: list[tuple[Backend, bool, str]] = []
    for i, item in enumerate(given):
        if any(item is other or (isinstance(item, str) and item == other) for other in given[:i]):
            raise ConfigError(f"{_name(item)} is listed twice", field=f"backend[{i}]")
        if isinstance(item, str):
            opened.append((open_listed(item, f"backend[{i}]" if many else None), True, _name(item)))
        else:
            opened.append((item, False, _name(item)))
    labels = [label for _, _, label in opened]
    members = [
        # URLs that differ only in their options (an etcd format) get their place added.
        _Member(backend, owned, label if labels.count(label) == 1 else f"{label} (backend[{i}])")
        for i, (backend, owned, label) in enumerate(opened)
    ]
    return tuple(members)


def _name(item: str | Backend) -> str:
    if isinstance(item, str):
        return parse_backend_url(item, default_port=0).redacted()
    if type(item).__repr__ is object.__repr__:
        return str(getattr(type(item), "scheme", type(item).__name__))
    return scrub_credentials(repr(item))


class _Heard(enum.Enum):
    """What one member of a watch over several backends has done for a service yet."""

    NOTHING = 0
    FAILED = 1
    READ = 2


class AsyncWatcher:
    """Watches services and yields a :class:`WatchEvent` for every change.

    ``backend`` is a URL or a :class:`Backend`, or a list of them: several
    registries watched as one (see below); ``services`` a name or a list of
    names. After a disconnect or a server restart the watcher resumes (etcd:
    from the next revision; Consul: from the last index) or, when it cannot,
    lists again and diffs against what it knew: every change missed meanwhile
    yields exactly its events. Errors never end the watch: each one goes to
    ``on_error`` (always a :class:`RegistryError`) and the log (repeats
    rate-limited), then the watcher retries with ``retry``'s backoff, so a dead
    server costs no CPU.

    Every ``async for`` over the watcher is a consumer of its own: it starts
    from "nothing seen", so it first gets ``added`` (and ``offline``) for what
    exists when it starts, then every change. Several loops over one watcher
    each get every event. A consumer slower than the registry is not queued
    for: changes to one instance it has not taken yet coalesce (see
    :class:`~registry_agent._events.Backlog`), so memory stays bounded by the
    number of instances and what it gets is a legal sequence ending at the
    current state. A consumer more than ``lag_warning`` seconds behind is
    logged once (WARNING), and again when it has caught up (INFO).

    ``listener``, when given, is called for each event as it happens (on the
    event loop), in addition to any ``async for``.

    **Several backends** (a list of URLs or backends) give one merged view
    (:class:`~registry_agent._events.MergedView`): an instance held by several
    registries, in whatever format, is one entry, recognised by its
    ``address:port``; the instance shown is the one from the first backend in
    the list that holds it; it is healthy when any backend reports it passing.
    Entries of *one* registry stay distinct: two Consul services on one
    ``address:port`` are two entries (keys ``address:port`` and
    ``address:port #2``), so adding a registry never hides what another shows.
    ``added`` comes when the first registry has it, ``deleted`` when the last one
    drops it, ``updated`` when the shown instance changes (moving from one
    registry to another gives no event when both hold the same fields). Such
    an ``updated`` can change ``instance.id`` (each registry has its own id
    for the instance: a Consul id, a go-zero lease number): a consumer of a
    merged view keys what it keeps by ``address:port`` (the event's
    endpoint), not by ``instance.id``.
    Snapshots are keyed and ordered by ``address:port`` instead of the
    registry's key, and an event's ``index`` is that of the registry whose
    change caused it (indexes of different registries do not compare). Each
    backend is watched on its own: a registry that cannot be read keeps its
    last view (its instances stay) until it answers again, and a service
    counts as synced once one backend has read it and each other one has read
    it or failed once.
    """

    def __init__(
        self,
        backend: Backends,
        services: str | Iterable[str],
        *,
        retry: RetryPolicy | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        listener: Callable[[WatchEvent], None] | None = None,
        lag_warning: float = 10.0,
    ) -> None:
        names = [services] if isinstance(services, str) else list(services)
        if not names:
            raise ConfigError("expected at least one service name", field="services")
        for name in names:
            _check_name(name, "services")
        if not lag_warning > 0:
            raise ConfigError(f"expected seconds > 0, got {lag_warning!r}", field="lag_warning")
        self.services = tuple(dict.fromkeys(names))
        members = open_backends(backend)
        #: Every backend watched, in the order given (the first one's instance is shown).
        self.backends: tuple[Backend, ...] = tuple(m.backend for m in members)
        #: The first backend (the only one, unless several were given).
        self.backend: Backend = self.backends[0]
        self._members = members
        self.retry = retry or RetryPolicy(initial=0.1, cap=2.0)
        self.on_error = on_error
        self.listener = listener
        self._listener_failures = 0  # since the last report
        self._listener_reported = 0.0
        self.lag_warning = lag_warning
        self._state: dict[str, Mapping[str, InstanceHealth]] = {}
        self._index: dict[str, int] = {}
        self._synced: dict[str, asyncio.Event] = {}
        # Several backends: per service, the merged view and what each member has done yet.
        self._views: dict[str, MergedView] = {}
        self._heard: dict[str, list[_Heard]] = {}
        self._consumers: weakref.WeakSet[_Consumer] = weakref.WeakSet()
        self._tasks: list[asyncio.Task[None]] = []
        self._fork: ForkGuard | None = None
        self._closed = False
        self.errors = 0
        # Counts for stats(): every key made here, so another thread can copy them safely.
        self._events = {(s, str(t)): 0 for s in self.services for t in EventType}
        self._errors = {(s, m): 0 for s in self.services for m in range(len(members))}
        self._coalesced = 0

    def _listener_failed(self, exc: BaseException) -> None:
        """The first failure with its traceback; later ones counted, one line a minute."""
        self._listener_failures += 1
        now = time.monotonic()
        first = self._listener_reported == 0.0
        if not first and now - self._listener_reported < _LISTENER_REPORT_EVERY:
            return
        failures, self._listener_failures = self._listener_failures, 0
        self._listener_reported = now
        if first:
            log.error(
                "watch listener failed (later failures: one line a minute)",
                exc_info=exc,
                extra={"event": "listener_failed"},
            )
        else:
            log.error(
                "watch listener failed %d time(s) in the last %gs; the last: %s: %s",
                failures,
                _LISTENER_REPORT_EVERY,
                type(exc).__name__,
                exc,
                extra={"event": "listener_failed"},
            )

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def from_env(cls, services: str | Iterable[str], **kwargs: Any) -> AsyncWatcher:
        """A watcher of the backends the environment names (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``.
        ``kwargs``: the constructor's keywords."""
        return cls(None, services, **kwargs)

    async def start(self) -> AsyncWatcher:
        """Start watching in the background (iterating starts it too)."""
        if self._tasks or self._closed:
            return self
        # The watch tasks belong to this process: a fork()ed child must not touch them.
        self._fork = ForkGuard("AsyncWatcher")
        for service in self.services:
            self._synced[service] = asyncio.Event()
            if len(self._members) > 1:
                self._views[service] = MergedView(len(self._members))
                self._heard[service] = [_Heard.NOTHING] * len(self._members)
            for number in range(len(self._members)):
                self._tasks.append(
                    asyncio.create_task(
                        self._watch(service, number), name=f"watch {self._where(service, number)}"
                    )
                )
        return self

    async def close(self) -> None:
        """Stop watching; every pending ``async for`` ends.

        In a child process that inherited a started watcher through ``fork()``
        it returns at once (with a warning): the watch belongs to the parent.
        """
        if self._closed:
            return
        self._closed = True
        if self._fork is not None and self._fork.in_child("close()"):
            return
        for consumer in list(self._consumers):
            consumer.wake()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for member in self._members:
            if member.owned:
                with contextlib.suppress(Exception):
                    await member.backend.close()

    async def __aenter__(self) -> AsyncWatcher:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        """A new consumer: ``added`` for what exists now, then every change."""
        return self._subscribe()

    def _subscribe(self) -> _Consumer:
        consumer = _Consumer(self)
        if not self._closed:
            now = time.monotonic()
            for service in self.services:
                state = self._state.get(service, _EMPTY)
                for key in sorted(state):
                    consumer.backlog.changed((service, key), state[key], now)
            self._consumers.add(consumer)
        return consumer

    # -- state ----------------------------------------------------------------------

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until every service has been read once; False on timeout."""
        await self.start()
        try:
            async with asyncio.timeout(timeout):
                for event in self._synced.values():
                    await event.wait()
        except TimeoutError:
            return False
        return True

    def synced(self, service: str) -> bool:
        """True once ``service`` has been read at least once (see the class docstring
        for several backends)."""
        event = self._synced.get(service)
        return event is not None and event.is_set()

    def _read_by_all(self, service: str) -> bool:
        """Whether every backend has read ``service`` at least once."""
        heard = self._heard.get(service)
        if heard is None:
            return self.synced(service)
        return all(h is _Heard.READ for h in heard)

    def _read_by_any(self, service: str) -> bool:
        """Whether at least one backend has read ``service`` (a partial view exists)."""
        heard = self._heard.get(service)
        return self.synced(service) or (heard is not None and _Heard.READ in heard)

    def snapshot(self, service: str | None = None) -> list[InstanceHealth]:
        """The instances of ``service`` as last seen, with their health, ordered by id
        (by the registry's key for them; over several backends, by ``address:port``).

        ``service`` may be omitted when the watcher watches exactly one.
        """
        if service is None:
            if len(self.services) != 1:
                raise ConfigError("name the service: this watcher watches several", field="service")
            service = self.services[0]
        if service not in self.services:
            raise ConfigError(f"not watched: {service!r}", field="service")
        state = self._state.get(service, _EMPTY)
        return [state[key] for key in sorted(state)]

    def stats(self) -> WatcherStats:
        """The watcher's counts now (see :class:`WatcherStats`): safe to call from any
        thread (a metrics scrape), it reads what the watch loop keeps and never waits
        for the event loop or a registry."""
        watched = tuple(
            self._watched(service, number)
            for service in self.services
            for number in range(len(self._members))
        )
        consumers, pending, lag = _retried(self._consumer_counts, (0, 0, 0.0))
        return WatcherStats(
            services=self.services,
            backends=tuple(m.label for m in self._members),
            events=MappingProxyType(dict(self._events)),
            watched=watched,
            consumers=consumers,
            pending=pending,
            lag=lag,
            coalesced=self._coalesced,
        )

    def _watched(self, service: str, member: int) -> WatchedBackend:
        view = self._views.get(service)
        if view is None:
            state = self._state.get(service, _EMPTY)
            synced = self.synced(service)
        else:
            state = view.member(member)
            synced = self._heard[service][member] is _Heard.READ
        healthy = _retried(lambda: sum(1 for h in state.values() if h.healthy), 0)
        return WatchedBackend(
            service=service,
            backend=self._members[member].label,
            synced=synced,
            instances=len(state),
            healthy=healthy,
            errors=self._errors[(service, member)],
        )

    def _consumer_counts(self) -> tuple[int, int, float]:
        now = time.monotonic()
        consumers = list(self._consumers)
        backlogs = [c.backlog for c in consumers]
        return (
            len(consumers),
            sum(b.pending for b in backlogs),
            max((b.lag(now) for b in backlogs), default=0.0),
        )

    # -- the watch loop -------------------------------------------------------------

    def _where(self, service: str, member: int) -> str:
        """``service``, and which backend when there are several (for logs)."""
        if len(self._members) == 1:
            return service
        return f"{service} on {self._members[member].label}"

    async def _watch(self, service: str, member: int) -> None:
        backend = self._members[member].backend
        where = self._where(service, member)
        last: ServiceSnapshot | None = None
        failures = 0
        relists = 0
        last_log = 0.0
        while True:
            try:
                async for snapshot in backend.watch(service, since=last):
                    self._apply(service, member, snapshot)
                    last = snapshot
                    relists = 0
                    if failures:
                        log.info(
                            "watch of %s resumed after %d failure(s)",
                            where,
                            failures,
                            extra={"event": "watch_resumed", "service": service, "error": None},
                        )
                        failures = 0
            except RevisionCompacted as exc:
                # Cannot resume from our revision: list again and diff, at once
                # (backing off only if that keeps happening without a snapshot).
                log.info(
                    "watch of %s re-lists: %s",
                    where,
                    exc,
                    extra={"event": "watch_relist", "service": service, "error": str(exc)},
                )
                last = None
                relists += 1
                if relists > 1:
                    await asyncio.sleep(self.retry.delay(relists - 1))
                continue
            except Exception as exc:  # never die: report, back off, go on
                failures += 1
                self.errors += 1
                self._errors[(service, member)] += 1
                self._failed(service, member)
                error = self._as_registry_error(service, member, exc)
                now = time.monotonic()
                if failures == 1 or now - last_log >= _REPEAT_LOG_EVERY:
                    last_log = now
                    log.warning(
                        "watch of %s failed (failure %d, retrying): %s",
                        where,
                        failures,
                        error,
                        extra={"event": "watch_failed", "service": service, "error": str(error)},
                    )
                if error is not exc:
                    log.debug("unexpected watch error", exc_info=exc)
                if self.on_error is not None:
                    try:
                        self.on_error(service, error)
                    except Exception:
                        log.exception("on_error callback failed")
                await asyncio.sleep(self.retry.delay(failures))
                continue
            # A stream that ends without an error is re-opened after a pause.
            failures += 1
            await asyncio.sleep(self.retry.delay(failures))

    def _as_registry_error(self, service: str, member: int, exc: Exception) -> RegistryError:
        """``exc`` itself when it is a RegistryError, else a BackendUnavailable naming it."""
        if isinstance(exc, RegistryError):
            return exc
        scheme = getattr(self._members[member].backend, "scheme", None)
        error = BackendUnavailable(
            f"watch failed: {type(exc).__name__}: {exc}",
            service=service,
            backend=scheme if isinstance(scheme, str) else None,
        )
        error.__cause__ = exc
        return error

    def _failed(self, service: str, member: int) -> None:
        """A member failed to read ``service``: the others need not wait for it to sync."""
        heard = self._heard.get(service)
        if heard is not None and heard[member] is _Heard.NOTHING:
            heard[member] = _Heard.FAILED
            self._check_synced(service, heard)

    def _check_synced(self, service: str, heard: list[_Heard]) -> None:
        # Synced once one member has read it and each other has read it or failed:
        # a registry that is down does not hold the view back.
        if _Heard.READ in heard and _Heard.NOTHING not in heard:
            self._synced[service].set()

    def _apply(self, service: str, member: int, snapshot: ServiceSnapshot) -> None:
        old = self._state.get(service, _EMPTY)
        view = self._views.get(service)
        if view is not None:
            new: Mapping[str, InstanceHealth] = view.apply(member, snapshot.instances)
            heard = self._heard[service]
            heard[member] = _Heard.READ
            self._check_synced(service, heard)
        else:
            new = snapshot.instances
            # An InstanceMap is immutable and says which ids its update changed: keep
            # it as is and visit only those. Anything else is copied and fully diffed.
            if not isinstance(new, InstanceMap):
                new = MappingProxyType(dict(new))
            self._synced[service].set()
        if new is old:  # a member's change the merged view does not show
            return
        changed = changed_ids(old, new)
        self._state[service] = new
        self._index[service] = snapshot.index
        if not changed:
            return
        self._count_events(service, old, new, changed)
        if self.listener is not None:
            for event in diff_snapshots(old, new, snapshot.index, changed):
                try:
                    self.listener(event)
                except (Exception, SystemExit) as exc:  # the app's bug ends no watch
                    self._listener_failed(exc)
        consumers = list(self._consumers)
        if not consumers:
            return
        now = time.monotonic()
        for consumer in consumers:
            for key in changed:
                if consumer.backlog.changed((service, key), new.get(key), now):
                    self._coalesced += 1
            consumer.wake()
            self._log_lag(consumer, now)

    def _count_events(
        self,
        service: str,
        old: Mapping[str, InstanceHealth],
        new: Mapping[str, InstanceHealth],
        changed: Iterable[str],
    ) -> None:
        """Count the events of a change by type (what ``diff_snapshots`` would yield)."""
        counts = self._events
        for key in changed:
            before, after = old.get(key), new.get(key)
            if after is None:
                if before is not None:
                    counts[(service, "deleted")] += 1
            elif before is None:
                counts[(service, "added")] += 1
                if not after.healthy:
                    counts[(service, "offline")] += 1
            else:
                if before.instance != after.instance:
                    counts[(service, "updated")] += 1
                if before.healthy != after.healthy:
                    counts[(service, "online" if after.healthy else "offline")] += 1

    def _current(self, key: tuple[str, str]) -> tuple[InstanceHealth | None, int]:
        service, instance_key = key
        return self._state.get(service, _EMPTY).get(instance_key), self._index.get(service, 0)

    def _log_lag(self, consumer: _Consumer, now: float) -> None:
        change = consumer.backlog.lag_change(now, self.lag_warning)
        if change is None:
            return
        services = ",".join(self.services)
        if change:
            log.warning(
                "a consumer of the watch of %s is %.1fs behind (%d instance(s) changed since it "
                "last looked; their changes coalesce until it does)",
                services,
                consumer.backlog.lag(now),
                consumer.backlog.pending,
                extra={"event": "watch_consumer_lagging", "service": services, "error": None},
            )
        else:
            log.info(
                "a consumer of the watch of %s caught up",
                services,
                extra={"event": "watch_consumer_caught_up", "service": services, "error": None},
            )


T = TypeVar("T")


def _retried(read: Callable[[], T], fallback: T, attempts: int = 5) -> T:
    """``read()`` from another thread than the loop's: a dict or set the loop changed
    meanwhile raises RuntimeError (or StopIteration); read again, then give up."""
    for _ in range(attempts):
        try:
            return read()
        except (RuntimeError, StopIteration):
            continue
    return fallback


class _Consumer:
    """One ``async for`` over a watcher: its own backlog, woken on every change."""

    __slots__ = ("__weakref__", "_wake", "_watcher", "backlog", "closed")

    def __init__(self, watcher: AsyncWatcher) -> None:
        self._watcher = watcher
        # Keyed by (service, the key of the instance in its snapshots).
        self.backlog: Backlog[tuple[str, str]] = Backlog()
        self._wake = asyncio.Event()
        self.closed = False

    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> WatchEvent:
        watcher = self._watcher
        await watcher.start()
        while True:
            if self.closed or watcher._closed:
                raise StopAsyncIteration
            # Taken synchronously after the wait: a cancelled wait loses nothing.
            event = self.backlog.pop(watcher._current)
            watcher._log_lag(self, time.monotonic())
            if event is not None:
                return event
            self._wake.clear()
            await self._wake.wait()

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        """Stop this consumer (the watcher goes on for the others)."""
        self.close()

    def close(self) -> None:
        self.closed = True
        self._watcher._consumers.discard(self)
        self._wake.set()
