"""A watch of one Consul service whose cost follows the changes, not the instances.

Three blocking queries run side by side, each resuming from its own index:

- ``/v1/catalog/service/<service>``: membership, addresses, tags, meta;
- ``/v1/health/checks/<service>``: the status of every check of the service
  (a sixth of ``/v1/health/service``'s body: no node and service records);
- ``/v1/health/state/any`` filtered to node checks that are not passing
  (``serfHealth`` of a cut-off host, node maintenance): node checks are not in
  the service's checks. In a healthy datacenter its answer is empty.

Their answers are combined by :class:`~registry_agent_consul._decode.ServiceView`;
a snapshot is yielded whenever the combination changed. When the checks show an
instance come or go before the (larger, slower) catalog answer does, a catalog
read filtered to those few instances (a probe) settles it first. Needs Consul
1.5 or later (``filter``).

A backend runs at most ``DIRECT_MAX`` blocking queries on connections of their
own; beyond that (hundreds of services watched), a blocking query is emulated
by the backend's hub from two shared change signals and short reads (``_hub``).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry_agent import BackendUnavailable, ServiceSnapshot
from registry_agent_consul._decode import (
    Decoded,
    Preferred,
    ServiceView,
    Warn,
    decode_catalog,
    decode_checks,
)
from registry_agent_consul._http import ConsulHTTPError
from registry_agent_consul._hub import ANY, hub_of

if TYPE_CHECKING:
    from registry_agent_consul._backend import ConsulBackend

__all__ = ["NODE_CHECKS_FILTER", "watch_service"]

# A pause longer than this between two queries may hide an agent restart.
RESUME_GAP = 1.0
# A blocking query that returned without a change sooner than this did not block.
_NO_BLOCK = 0.01
_SPIN_PAUSE = 0.05
NODE_CHECKS_FILTER = 'ServiceID == "" and Status != "passing"'
# Most instances one probe (a filtered catalog read) asks about; more: the full catalog.
PROBE_MAX = 16


@dataclass
class _Query:
    """One of the watch's blocking queries and where it stands."""

    kind: str
    path: str
    params: list[tuple[str, str]]
    decode: Callable[[str], Decoded]
    index: int = 0  # resume from here (0: read without blocking)
    sent: int = 0  # the index the request in flight blocks on (0: none)
    last: int = 0  # the X-Consul-Index of the last answer
    received: float = field(default=-1e9)  # monotonic time of the last answer
    asked: int = -1  # sequence number when the request in flight was sent
    pause: float = 0.0  # wait this long before the next request (never spin)
    task: asyncio.Task[tuple[int, Decoded, float]] | None = None


async def _fetch(
    backend: ConsulBackend, service: str, query: _Query, index: int
) -> tuple[int, Decoded, float]:
    """One read; returns (X-Consul-Index, decoded answer, seconds it took).

    A blocking read (``index`` above 0) runs on a connection of its own while the
    backend has a direct slot free, else it is emulated by the hub (see ``_hub``).
    """
    if query.pause:
        await asyncio.sleep(query.pause)
    hub = hub_of(backend)
    started = time.monotonic()
    if index <= 0:
        raw_index, body = await hub.get(query.path, query.params, 0, service=service)
    elif hub.take_slot():
        answered = False
        try:
            raw_index, body = await hub.get(query.path, query.params, index, service=service)
            answered = True
        finally:
            hub.release_slot(answered=answered)
    else:
        signal, key = (
            (hub.catalog, ANY)
            if query.kind in ("catalog", "probe")
            else (hub.checks, "" if query.kind == "nodes" else service)
        )
        raw_index, body = await hub.emulate(signal, key, query.path, query.params, index, service)
    try:
        # (a body that is not a JSON array raises a ValueError: BackendUnavailable)
        decoded = query.decode(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        answer = ConsulHTTPError(200, {}, body, str(exc))
        raise backend._http_error(answer, None, service, False) from exc
    try:
        new_index = int(raw_index or "")
    except ValueError:
        raise BackendUnavailable(
            f"Consul sent an invalid X-Consul-Index {raw_index!r} for {query.path}",
            backend="consul",
            service=service,
        ) from None
    return new_index, decoded, time.monotonic() - started


class _Watch:
    """The state of one ``watch()``: its queries, the combined view, a sequence counter."""

    def __init__(self, backend: ConsulBackend, service: str, view: ServiceView) -> None:
        self.backend = backend
        self.service = service
        self.view = view
        self.seq = 0
        quoted = urllib.parse.quote(service, safe="")
        self.catalog = _Query("catalog", f"/v1/catalog/service/{quoted}", [], decode_catalog)
        self.checks = _Query("checks", f"/v1/health/checks/{quoted}", [], decode_checks)
        self.nodes = _Query(
            "nodes", "/v1/health/state/any", [("filter", NODE_CHECKS_FILTER)], decode_checks
        )
        self.queries = (self.catalog, self.checks, self.nodes)
        # A catalog read of a few instances only, when the checks show one came or went.
        self.probe = _Query("probe", self.catalog.path, [], decode_catalog)
        self.probing: list[tuple[str, str]] = []

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def start(self, query: _Query, *, blocking: bool = True) -> None:
        """Send ``query`` (blocking on its index unless it may be stale, see below)."""
        # An index is only meaningful to the agent incarnation that issued it: after
        # a restart it may be ahead of the new agent's, and a blocking query would
        # then wait out the whole `wait`. So the index is re-read without blocking
        # whenever the agent may have changed under us: after a blocking query that
        # returned without a change, and after a pause on our side (frozen, slow
        # consumer).
        gap = time.monotonic() - query.received
        index = query.index if blocking and gap < RESUME_GAP else 0
        query.asked, query.sent = self.tick(), index
        query.task = asyncio.create_task(
            _fetch(self.backend, self.service, query, index),
            name=f"consul watch {self.service}: {query.kind}",
        )

    def restart(self, query: _Query) -> None:
        """Read ``query`` again now, without blocking: its answer in flight may be too old."""
        if query.task is not None:
            if query.sent == 0:
                # A short read is in flight: let it end (settle() asks again if it is
                # too old). Cancelled short reads wore out the 8-connection pool of
                # short calls under a burst of catalog changes: the watch stalled 5 s.
                return
            query.task.cancel()
        query.pause = 0.0
        self.start(query, blocking=False)

    def take(self, query: _Query, result: tuple[int, Decoded, float]) -> None:
        """Apply one answer to the view and decide how the next request waits."""
        new_index, decoded, took = result
        asked, query.task = query.asked, None
        if query is self.probe:
            self.view.set_probe(decoded, self.probing, asked, self.tick())
            return
        query.received = time.monotonic()
        blocked, query.last = query.sent > 0, new_index
        if query is self.catalog:
            self.view.set_catalog(decoded, self.tick(), asked)
        elif query is self.checks:
            self.view.set_checks(decoded, asked, self.tick())
        else:
            self.view.set_node_checks(decoded, asked, self.tick())
        query.pause = 0.0
        if new_index < query.index or new_index <= 0:
            query.index = 0  # the index went backwards (a new agent): re-read without blocking
        elif blocked and new_index == query.index:
            query.index = 0  # returned without a change: re-read once without blocking
            if took < _NO_BLOCK:
                query.pause = _SPIN_PAUSE  # it did not even block: never spin
        else:
            query.index = new_index

    def settle(self) -> None:
        """Probe, or re-read now, what an instance held back waits for."""
        if self.probe.task is None:
            keys = self.view.probe_keys(PROBE_MAX)
            if keys:
                self.probing = keys
                either = " or ".join(f'(Node == "{n}" and ServiceID == "{i}")' for n, i in keys)
                self.probe.params = [("filter", either)]
                self.start(self.probe, blocking=False)
        for query, after in zip(self.queries, self.view.waiting(), strict=True):
            if after is not None and query.asked < after:
                self.restart(query)

    async def first(self) -> None:
        """The first picture: the catalog, then checks and node checks asked after it."""
        self.start(self.catalog, blocking=False)
        assert self.catalog.task is not None
        self.take(self.catalog, await self.catalog.task)
        for query in (self.checks, self.nodes):
            self.start(query, blocking=False)
        await self.next()
        while not self.view.ready:
            await self.next()

    async def next(self) -> None:
        """Wait for at least one answer and apply every answer that has arrived."""
        for query in self.queries:
            if query.task is None:
                self.start(query)
        tasks = {q.task: q for q in (*self.queries, self.probe) if q.task is not None}
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The catalog first: the checks answer then knows which entries it covers.
        for query in sorted((tasks[t] for t in done), key=lambda q: q is not self.catalog):
            task = query.task
            assert task is not None
            self.take(query, task.result())
        self.settle()

    def close(self) -> None:
        for query in (*self.queries, self.probe):
            task, query.task = query.task, None
            if task is None:
                continue
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: an error already raised is not logged again
            else:
                task.cancel()


async def watch_service(
    backend: ConsulBackend,
    service: str,
    *,
    since: ServiceSnapshot | None,
    local_node: Callable[[], Awaitable[str | None]],
    preferred: Preferred,
    warn: Warn,
) -> AsyncGenerator[ServiceSnapshot, None]:
    """Snapshots of ``service``: the current one (unless equal to ``since``), then each change."""
    node = await local_node()
    view = ServiceView(
        service,
        local_node=node,
        preferred=preferred,
        warn=warn,
        endpoint_scheme=backend.endpoint_scheme,
    )
    watch = _Watch(backend, service, view)
    resumed: Mapping[str, Any] | None = since.instances if since is not None else None
    last = None
    try:
        await watch.first()
        while True:
            found = view.snapshot()  # the same map as before when nothing changed
            if found is not last:
                last = found
                if resumed is None or found != resumed:
                    index = max(q.last for q in watch.queries)
                    yield ServiceSnapshot(service, index, found)
                resumed = None
            await watch.next()
    finally:
        watch.close()
