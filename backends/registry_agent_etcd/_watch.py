"""etcd watch responses applied to a service's snapshot: the cost follows the change.

Each response carries its own events (a PUT or DELETE per key, in revision
order); only those keys are parsed and only those ids change in the next
:class:`~registry_agent._events.InstanceMap`, which records them for the watcher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aetcd import rpc

from registry_agent import BackendUnavailable, InstanceHealth, RegistryError, RevisionCompacted
from registry_agent.backend import InstanceMap

__all__ = ["apply_watch_events", "response_error"]


def apply_watch_events(
    state: InstanceMap,
    prefix: bytes,
    events: Iterable[Any],
    parse: Callable[[bytes, bytes], InstanceHealth | None],
) -> InstanceMap:
    """``state`` after a watch response's ``events`` (``state`` itself when none changes it).

    ``prefix`` is the service's key prefix (ids follow it); ``parse(key, value)``
    reads one value, None for a value that is not ours (it counts as gone).
    A key changed twice in one response ends at its last event.
    """
    changes: dict[str, InstanceHealth | None] = {}
    for event in events:
        key = event.kv.key
        if not key.startswith(prefix):  # not ours to watch; etcd sends none such
            continue
        instance_id = key[len(prefix) :].decode(errors="replace")
        if event.type == rpc.Event.DELETE:
            changes[instance_id] = None
        else:
            changes[instance_id] = parse(key, event.kv.value)
    return state.evolve(changes)


def response_error(
    response: Any, *, revision: int, cluster_id: int | None, context: dict[str, str | None]
) -> RegistryError | None:
    """Why a watch resumed after ``revision`` cannot go on with this response, or None.

    :class:`RevisionCompacted` (list again and diff) when etcd is another cluster
    (restarted empty), is behind our revision, or compacted it away;
    :class:`BackendUnavailable` when etcd cancelled the watch.
    """
    header = response.header
    if cluster_id is not None and header.cluster_id and header.cluster_id != cluster_id:
        return RevisionCompacted(
            "etcd cluster changed (restarted empty?): list again",
            compacted_revision=0,
            **context,
        )
    if response.created and header.revision < revision:
        return RevisionCompacted(
            f"etcd is at revision {header.revision}, behind {revision}: list again",
            compacted_revision=0,
            **context,
        )
    if response.compact_revision:
        return RevisionCompacted(
            f"revision {revision + 1} was compacted (now {response.compact_revision})",
            compacted_revision=response.compact_revision,
            **context,
        )
    if response.canceled:
        return BackendUnavailable(
            f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}",
            **context,
        )
    return None
