"""Watch events and the pure diff that derives them from two snapshots.

Which events a client gets, case by case (every backend agrees):

=====================================  ==========================================
change                                 events, in this order
=====================================  ==========================================
new id, passing                        ``added`` (healthy=True)
new id, not passing                    ``added`` (healthy=False), then ``offline``
id gone (deregistered, expired)        ``deleted`` (healthy=False)
address/port/tags/meta changed         ``updated`` (``previous`` holds the old instance)
passing -> not passing                 ``offline``
not passing -> passing                 ``online``
fields and health changed together     ``updated``, then ``offline``/``online``
=====================================  ==========================================

The first snapshot of a watch is a diff against nothing: ``added`` (and
``offline``) for every instance. Events of one diff are ordered by instance id.

A consumer slower than the registry does not queue events: its
:class:`Backlog` keeps what it has seen and which instances changed since, and
derives each event when the consumer asks for it. Changes to one instance
meanwhile coalesce into the events from what the consumer saw to what is
current, so memory is bounded by the number of instances and the sequence the
consumer sees stays legal (per instance, each event follows from the previous
one it saw) and ends at the current state.

A backend that knows which instances a change touched (etcd: the watch
response's own events) yields snapshots whose ``instances`` is an
:class:`InstanceMap`: an immutable mapping whose update copies only a small
part of it and records the ids it changed, so the watcher's work per change
follows the size of the change, not of the service (:func:`changed_ids`).

A watch over several registries shows one merged view (:class:`MergedView`):
one entry per endpoint, however many registries hold it.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import (
    Callable,
    Hashable,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    ValuesView,
)
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance

__all__ = [
    "Backlog",
    "EventType",
    "InstanceMap",
    "MergedView",
    "WatchEvent",
    "changed_ids",
    "diff_snapshots",
    "endpoint_key",
]


class EventType(enum.StrEnum):
    """What happened to an instance."""

    ADDED = "added"
    UPDATED = "updated"
    DELETED = "deleted"
    OFFLINE = "offline"
    ONLINE = "online"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of one instance, with its health after the change.

    ``index`` is the registry index (Consul) or revision (etcd) it was seen at.
    """

    type: EventType
    instance: ServiceInstance
    healthy: bool
    status: HealthStatus | None = None
    previous: ServiceInstance | None = None
    index: int = 0

    @property
    def service(self) -> str:
        """The instance's service name."""
        return self.instance.service

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: type, the instance fields, healthy, status, index."""
        return {
            "type": str(self.type),
            **self.instance.to_dict(),
            "healthy": self.healthy,
            "status": str(self.status) if self.status else None,
            "index": self.index,
        }


def diff_snapshots(
    old: Mapping[str, InstanceHealth],
    new: Mapping[str, InstanceHealth],
    index: int = 0,
    ids: Iterable[str] | None = None,
) -> list[WatchEvent]:
    """The events that turn ``old`` into ``new`` (both keyed by instance id).

    ``ids``, when given, are the only ids that may differ (see :func:`changed_ids`):
    only those are visited.
    """
    events: list[WatchEvent] = []
    for iid in sorted(old.keys() | new.keys() if ids is None else ids):
        before, after = old.get(iid), new.get(iid)
        if after is None:
            if before is None:
                continue
            events.append(WatchEvent(EventType.DELETED, before.instance, False, None, None, index))
            continue
        healthy, status = after.healthy, after.status
        if before is None:
            events.append(WatchEvent(EventType.ADDED, after.instance, healthy, status, None, index))
            if not healthy:
                events.append(
                    WatchEvent(EventType.OFFLINE, after.instance, False, status, None, index)
                )
            continue
        if before.instance != after.instance:
            events.append(
                WatchEvent(
                    EventType.UPDATED, after.instance, healthy, status, before.instance, index
                )
            )
        if before.healthy != healthy:
            kind = EventType.ONLINE if healthy else EventType.OFFLINE
            events.append(WatchEvent(kind, after.instance, healthy, status, None, index))
    return events


T = TypeVar("T")


class InstanceMap(Mapping[str, InstanceHealth]):
    """An immutable mapping of instance id to health that knows what its last update changed.

    :meth:`evolve` returns a new map and leaves this one as it was; it copies only
    the buckets the changed ids fall in (about √n entries each, and the tuple of
    √n buckets), so an update of a few ids costs microseconds even for 100,000
    instances. The new map remembers which ids differ from the map it was made
    from (never the map itself: old snapshots are not kept alive).
    """

    __slots__ = ("_base", "_buckets", "_changed", "_len", "_mask", "_token")

    def __init__(self, items: Mapping[str, InstanceHealth] | None = None) -> None:
        entries = dict(items or {})
        self._fill(entries)
        # Who this map is, and which map it was evolved from, without keeping that alive.
        self._token = object()
        self._base: object = None
        self._changed: frozenset[str] = frozenset()

    def _fill(self, entries: dict[str, InstanceHealth]) -> None:
        # About √n buckets of about √n entries: an update copies O(√n) references.
        count = 1 << max(0, math.ceil(math.log2(max(1, len(entries))) / 2))
        self._mask = count - 1
        buckets: list[dict[str, InstanceHealth]] = [{} for _ in range(count)]
        for key, value in entries.items():
            buckets[hash(key) & self._mask][key] = value
        self._buckets: tuple[dict[str, InstanceHealth], ...] = tuple(buckets)
        self._len = len(entries)

    @classmethod
    def of(cls, items: Mapping[str, InstanceHealth]) -> InstanceMap:
        """``items`` itself when it is an InstanceMap, else a new one holding a copy."""
        return items if isinstance(items, InstanceMap) else cls(items)

    def __getitem__(self, key: str) -> InstanceHealth:
        return self._buckets[hash(key) & self._mask][key]

    @overload
    def get(self, key: str, /) -> InstanceHealth | None: ...
    @overload
    def get(self, key: str, default: InstanceHealth | T, /) -> InstanceHealth | T: ...
    def get(self, key: str, default: object = None, /) -> object:
        return self._buckets[hash(key) & self._mask].get(key, default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._buckets[hash(key) & self._mask]

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._buckets)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"InstanceMap({dict(self.items())!r})"

    def items(self) -> _ItemsView:
        return _ItemsView(self)

    def values(self) -> _ValuesView:
        return _ValuesView(self)

    @property
    def changed(self) -> frozenset[str]:
        """The ids whose health differs from the map this one was evolved from."""
        return self._changed

    def changed_since(self, other: Mapping[str, InstanceHealth]) -> frozenset[str] | None:
        """The ids that differ from ``other``, when this map was evolved from it; else None."""
        if self._base is not None and self._base is getattr(other, "_token", None):
            return self._changed
        return None

    def evolve(self, changes: Mapping[str, InstanceHealth | None]) -> InstanceMap:
        """A new map with ``changes`` applied (None removes an id); ``self`` when none changes."""
        touched: dict[int, dict[str, InstanceHealth]] = {}
        changed: set[str] = set()
        size = self._len
        for key, value in changes.items():
            slot = hash(key) & self._mask
            bucket = touched.get(slot)
            if bucket is None:
                current = self._buckets[slot]
                if current.get(key) == value:
                    continue
                bucket = touched[slot] = dict(current)
            before = bucket.get(key)
            if before == value:
                continue
            if value is None:
                del bucket[key]
                size -= 1
            else:
                bucket[key] = value
                size += before is None
            changed.add(key)
        if not changed:
            return self
        new = type(self).__new__(type(self))
        buckets = list(self._buckets)
        for slot, bucket in touched.items():
            buckets[slot] = bucket
        new._buckets, new._mask, new._len = tuple(buckets), self._mask, size
        limit = (self._mask + 1) ** 2
        if size > 4 * limit or 16 * size < limit:  # far from √n buckets: rebuild (amortised)
            new._fill(dict(itertools.chain.from_iterable(b.items() for b in buckets)))
        new._token = object()
        new._base = self._token
        new._changed = frozenset(changed)
        return new


K = TypeVar("K", bound=Hashable)


class Backlog(Generic[K]):
    """One consumer's view of a watch: what it has seen, and which instances changed since.

    The watcher reports every change with :meth:`changed` (``key`` names one
    instance of one service, ``current`` is its state now, None once gone); the
    consumer takes its next event with :meth:`pop`, which diffs what it saw of
    the oldest changed instance against that instance's state at that moment.
    Changes pending for one instance coalesce, and a change undone before the
    consumer got to it disappears: memory is bounded by the number of instances
    seen and current, however slow the consumer. I/O-free; the caller
    provides the clock.
    """

    __slots__ = ("_dirty", "_lagging", "_ready", "_seen")

    def __init__(self) -> None:
        self._seen: dict[K, InstanceHealth] = {}
        # key -> when it first changed since the consumer last saw it; oldest first.
        self._dirty: OrderedDict[K, float] = OrderedDict()
        # The second event of one instance's diff (added+offline, updated+online).
        self._ready: deque[WatchEvent] = deque()
        self._lagging = False

    def changed(self, key: K, current: InstanceHealth | None, now: float) -> bool:
        """Note that instance ``key`` is now ``current`` (None: gone) as of ``now``.

        True when the change coalesced: it merged with (or undid) a change of
        that instance the consumer had not taken yet."""
        pending = key in self._dirty
        if self._seen.get(key) == current:
            self._dirty.pop(key, None)
        else:
            self._dirty.setdefault(key, now)
        return pending

    def pop(self, current: Callable[[K], tuple[InstanceHealth | None, int]]) -> WatchEvent | None:
        """The consumer's next event, or None when it is up to date.

        ``current(key)`` gives an instance's state now and the index it was read at.
        """
        if self._ready:
            return self._ready.popleft()
        while self._dirty:
            key, _ = self._dirty.popitem(last=False)
            after, index = current(key)
            before = self._seen.pop(key, None)
            if after is not None:
                self._seen[key] = after
            events = diff_snapshots(
                {} if before is None else {"": before}, {} if after is None else {"": after}, index
            )
            if events:
                self._ready.extend(events[1:])
                return events[0]
        return None

    @property
    def pending(self) -> int:
        """How many instances have changes the consumer has not seen yet."""
        return len(self._dirty) + len(self._ready)

    def lag(self, now: float) -> float:
        """Seconds since the oldest change the consumer has not seen yet (0 when up to date)."""
        if not self._dirty:
            return 0.0
        return max(0.0, now - next(iter(self._dirty.values())))

    def lag_change(self, now: float, threshold: float) -> bool | None:
        """Once per episode: True when the consumer falls ``threshold`` seconds behind,
        False when it has caught up again, None otherwise."""
        if self._lagging:
            if not self._dirty and not self._ready:
                self._lagging = False
                return False
        elif self._dirty and self.lag(now) >= threshold:
            self._lagging = True
            return True
        return None


class _ItemsView(ItemsView[str, InstanceHealth]):
    __slots__ = ()
    _mapping: InstanceMap

    def __iter__(self) -> Iterator[tuple[str, InstanceHealth]]:
        return itertools.chain.from_iterable(b.items() for b in self._mapping._buckets)


class _ValuesView(ValuesView[InstanceHealth]):
    __slots__ = ()
    _mapping: InstanceMap

    def __iter__(self) -> Iterator[InstanceHealth]:
        return itertools.chain.from_iterable(b.values() for b in self._mapping._buckets)


def changed_ids(old: Mapping[str, InstanceHealth], new: Mapping[str, InstanceHealth]) -> list[str]:
    """The ids whose health differs between ``old`` and ``new``, in order.

    O(changes) when ``new`` was evolved from ``old`` (an :class:`InstanceMap`
    update), a full comparison otherwise (a re-list, or a backend that yields
    plain mappings).
    """
    if isinstance(new, InstanceMap):
        hint = new.changed_since(old)
        if hint is not None:
            return sorted(hint)
    return [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def endpoint_key(instance: ServiceInstance) -> str | None:
    """What identifies ``instance`` across registries: ``address:port`` (the address in
    lower case, without brackets); None without a port (nothing to connect to, so
    nothing to recognise it by)."""
    if not instance.port:
        return None
    return f"{instance.address.strip('[]').lower()}:{instance.port}"


class MergedView:
    """The instances of one service over several registries, merged by endpoint. I/O-free.

    Each registry (a *member*, numbered in the order the caller lists them)
    reports its snapshots with :meth:`apply`; :attr:`state` is the merged view,
    an :class:`InstanceMap` keyed by endpoint (:func:`endpoint_key`), evolved
    from the previous one so the watcher's diff costs only what changed.

    - **Identity**: one entry per ``address:port``, whatever its id in each
      registry (go-zero keeps none, kratos and Consul ids need not agree). The
      entries of *one* registry stay distinct: when a member holds several
      entries at one endpoint (two Consul services on one ``address:port``),
      the first takes the endpoint's key and each further one its own key
      (``"<address:port> #2"``, ``#3``…), each merging with at most one entry
      of every other member. A key, once given to an entry, stays its key
      until that entry leaves its member's snapshot, so removing one of them
      reads as ``deleted``, and adding an empty registry never changes what
      another one shows. An entry without a port is never merged: it is keyed
      by its member and its key in that member's snapshots.
    - **Which instance is shown**: the one from the first member (in list order)
      that holds the merged key. When that member drops it, the next one's
      instance is shown (an ``updated`` event when it differs, nothing when it
      is the same): an ``updated`` event can therefore change ``instance.id``
      (the shown registry's id), so consumers key by the event's key.
    - **Health**: passing when any member holding it reports it passing;
      otherwise the shown entry's status.
    - **Members that cannot be read** keep their last snapshot: only a snapshot
      from a member changes what it holds.

    Memory: each member's last snapshot (shared, not copied) and two index
    entries per held entry.
    """

    __slots__ = ("_assigned", "_holders", "_members", "state")

    def __init__(self, members: int) -> None:
        if members < 1:
            raise ValueError("a merged view needs at least one member")
        empty: Mapping[str, InstanceHealth] = {}
        self._members: list[Mapping[str, InstanceHealth]] = [empty] * members
        # merged key -> member -> the one snapshot key of that member holding it.
        self._holders: dict[str, dict[int, str]] = {}
        # member -> snapshot key -> its merged key (kept while the entry lives).
        self._assigned: list[dict[str, str]] = [{} for _ in range(members)]
        self.state: InstanceMap = InstanceMap()

    def member(self, member: int) -> Mapping[str, InstanceHealth]:
        """The last snapshot ``member`` reported (empty before its first)."""
        return self._members[member]

    def apply(self, member: int, instances: Mapping[str, InstanceHealth]) -> InstanceMap:
        """Take ``member``'s new snapshot; returns the new :attr:`state` (the same object
        when the merged view does not change)."""
        old = self._members[member]
        self._members[member] = instances
        assigned = self._assigned[member]
        touched: set[str] = set()
        arrived: list[str] = []
        # Releases first, so a key freed here can go to an entry arriving in the same snapshot.
        for key in changed_ids(old, instances):
            before, after = old.get(key), instances.get(key)
            if before is not None:
                merged = assigned[key]
                touched.add(merged)
                if after is not None and _same_endpoint(before.instance, after.instance):
                    continue  # the same entry, changed in place: it keeps its key
                del assigned[key]
                holders = self._holders[merged]
                del holders[member]
                if not holders:
                    del self._holders[merged]
            if after is not None:
                arrived.append(key)
        for key in arrived:
            merged = self._place(member, key, instances[key].instance)
            assigned[key] = merged
            touched.add(merged)
        if touched:
            self.state = self.state.evolve({key: self._merged(key) for key in touched})
        return self.state

    def _place(self, member: int, key: str, instance: ServiceInstance) -> str:
        """Give ``member``'s entry ``key`` a merged key: the endpoint's first key this
        member does not hold yet."""
        endpoint = endpoint_key(instance)
        if endpoint is None:
            # A space is in no address: these keys never meet an endpoint's.
            merged = f"{instance.address} #{member} {key}"
        else:
            merged, n = endpoint, 1
            while member in self._holders.get(merged, ()):
                n += 1
                merged = f"{endpoint} #{n}"
        self._holders.setdefault(merged, {})[member] = key
        return merged

    def _merged(self, merged: str) -> InstanceHealth | None:
        holders = self._holders.get(merged)
        if not holders:
            return None
        shown: InstanceHealth | None = None
        for member in sorted(holders):
            health = self._members[member][holders[member]]
            if shown is None:
                shown = health
                if health.healthy:
                    return health
            elif health.healthy:
                return InstanceHealth(shown.instance, health.status, health.note)
        return shown


def _same_endpoint(a: ServiceInstance, b: ServiceInstance) -> bool:
    """Whether two versions of one entry stay at one merged key: the same endpoint
    (an entry without a port is keyed by its address)."""
    ea, eb = endpoint_key(a), endpoint_key(b)
    return ea == eb if ea is not None or eb is not None else a.address == b.address
