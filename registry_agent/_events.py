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
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance

__all__ = ["Backlog", "EventType", "WatchEvent", "diff_snapshots"]


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
    old: Mapping[str, InstanceHealth], new: Mapping[str, InstanceHealth], index: int = 0
) -> list[WatchEvent]:
    """The events that turn ``old`` into ``new`` (both keyed by instance id)."""
    events: list[WatchEvent] = []
    for iid in sorted(old.keys() | new.keys()):
        before, after = old.get(iid), new.get(iid)
        if after is None:
            assert before is not None
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

    def changed(self, key: K, current: InstanceHealth | None, now: float) -> None:
        """Note that instance ``key`` is now ``current`` (None: gone) as of ``now``."""
        if self._seen.get(key) == current:
            self._dirty.pop(key, None)
        else:
            self._dirty.setdefault(key, now)

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
