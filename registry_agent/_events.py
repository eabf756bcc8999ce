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
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance

__all__ = ["EventType", "WatchEvent", "diff_snapshots"]


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
