"""Many watches on one Consul agent without one connection per blocking query.

Consul caps the HTTP connections one client address may hold open
(``limits.http_max_conns_per_client``, 200 by default) and resets every
connection beyond it, from any process on that address. Worse, Consul 1.8 keeps
serving a blocking query whose client hung up until its ``wait`` ends: the
connection stays counted (CLOSE_WAIT on the agent's side) for up to ``wait``.

So a backend runs at most :data:`DIRECT_MAX` blocking queries on connections of
their own (a cancelled one keeps its slot until Consul would have answered it).
A blocking query beyond that is emulated: it waits on one of two shared blocking
queries (change signals), then reads without blocking, until the answer's index
moved (it does not end unchanged after ``wait``: the signals notice an agent gone):

- ``/v1/catalog/services``: its index moves with every catalog write, so every
  waiting catalog read is woken (one short read each);
- ``/v1/health/state/any``: every check with its ``ModifyIndex``, so only the
  services whose checks changed are woken (and node-check reads on a node check
  change); identical reads woken by the same change share one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from consul import base

from registry_agent import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from registry_agent_consul._backend import ConsulBackend

__all__ = ["DIRECT_MAX", "Hub", "hub_of"]

# Blocking queries one backend runs on connections of their own: well below
# Consul's 200 per client address, which other processes on this host share.
DIRECT_MAX = 48
# Short reads of watches at a time (of the 8 short-call connections: the rest stay free
# for registrations), and the longest one waits for its turn.
READS_MAX = 6
QUEUE_BOUND = 60.0
_ERROR_PAUSE = 1.0
_SPIN_PAUSE = 0.05
ANY = "*"  # the catalog signal's only key

Read = tuple[str | None, str]  # (X-Consul-Index, body)


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _catalog_prints(index: int, body: str) -> dict[Hashable, object]:
    return {ANY: index}


def _check_prints(index: int, body: str) -> dict[Hashable, object]:
    """Per service name (``""``: node checks), the set of its checks and their versions."""
    checks = json.loads(body)
    if not isinstance(checks, list):
        raise ValueError("not a JSON array")
    found: dict[Hashable, set[tuple[object, ...]]] = {}
    for check in checks:
        if not isinstance(check, dict):
            continue
        key = check.get("ServiceName") or "" if check.get("ServiceID") else ""
        found.setdefault(key, set()).add(
            (check.get("Node"), check.get("CheckID"), check.get("ModifyIndex"), check.get("Status"))
        )
    return {key: frozenset(value) for key, value in found.items()}


class Signal:
    """One shared blocking query; wakes the waiters whose key's fingerprint moved."""

    def __init__(
        self,
        hub: Hub,
        path: str,
        prints: Callable[[int, str], dict[Hashable, object]],
    ) -> None:
        self.hub = hub
        self.path = path
        self.prints_of = prints
        self.prints: dict[Hashable, object] = {}
        self.generation = 0  # counts answers that moved some fingerprint
        self.error: BackendError | None = None
        self.users = 0
        self.ready = asyncio.Event()  # a first answer (or an error) is in
        self.events: dict[Hashable, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    def _wake(self, keys: Any) -> None:
        for key in list(keys):
            event = self.events.pop(key, None)
            if event is not None:
                event.set()

    async def mark(self, key: Hashable) -> tuple[object, int]:
        """The current fingerprint of ``key`` and generation (starts the query if needed)."""
        if self.task is None or self.task.done():
            self.ready.clear()
            self.error = None
            self.task = asyncio.create_task(self._run(), name=f"consul signal {self.path}")
        await self.ready.wait()
        if self.error is not None:
            raise self.error
        return self.prints.get(key), self.generation

    async def wait(self, key: Hashable, mark: object, timeout: float) -> None:
        """Return when ``key``'s fingerprint is no longer ``mark``, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.prints.get(key) == mark:
            if self.error is not None:
                raise self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.task is None or self.task.done():
                return
            event = self.events.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await event.wait()

    async def _run(self) -> None:
        index = 0
        pause = 0.0
        try:
            while self.users > 0:
                if pause:
                    await asyncio.sleep(pause)
                started = time.monotonic()
                try:
                    raw, body = await self.hub.get(self.path, [], index, queued=False)
                    new_index = int(raw or "")
                    prints = self.prints_of(new_index, body)
                except ValueError:
                    self.error = BackendUnavailable(
                        f"Consul sent an answer to {self.path} that is not the expected JSON",
                        backend="consul",
                    )
                except BackendError as exc:
                    self.error = exc
                else:
                    self.error = None
                    took, blocked = time.monotonic() - started, index > 0
                    moved = {
                        key
                        for key in prints.keys() | self.prints.keys()
                        if prints.get(key) != self.prints.get(key)
                    }
                    self.prints = prints
                    if moved:
                        self.generation += 1
                    self.ready.set()
                    self._wake(moved & self.events.keys())
                    pause = 0.0
                    if new_index < index or new_index <= 0:
                        index = 0
                    elif blocked and new_index == index:
                        index = 0
                        pause = _SPIN_PAUSE if took < 0.01 else 0.0
                    else:
                        index = new_index
                    continue
                # An error: every waiter hears it (its watch retries as after any error).
                self.ready.set()
                self._wake(list(self.events))
                index, pause = 0, _ERROR_PAUSE
        finally:
            self._wake(list(self.events))
            self.ready.set()


class Hub:
    """Per backend (and event loop): the direct slots, the two signals, shared reads."""

    def __init__(self, backend: ConsulBackend) -> None:
        self.backend = backend
        self.direct = 0
        self.catalog = Signal(self, "/v1/catalog/services", _catalog_prints)
        self.checks = Signal(self, "/v1/health/state/any", _check_prints)
        self._reads = asyncio.Semaphore(READS_MAX)
        self._shared: dict[Hashable, tuple[int, asyncio.Task[Read]]] = {}
        # Per read: the index it last answered and the signal's fingerprint before it.
        self._seen: dict[Hashable, tuple[str | None, object]] = {}

    async def get(
        self,
        path: str,
        params: list[tuple[str, str]],
        index: int,
        *,
        service: str | None = None,
        queued: bool = True,
    ) -> Read:
        """One GET: (X-Consul-Index, body); blocks on ``index`` when it is above 0."""
        backend = self.backend
        params = list(params)
        if backend.dc:
            params.append(("dc", backend.dc))
        if index > 0:
            params += [("index", str(index)), ("wait", _go_duration(backend.wait))]

        def read(response: base.Response) -> Read:
            return response.headers.get("X-Consul-Index"), response.body

        api = backend.api
        if index > 0 or not queued:
            result: Read = await backend._call(
                api.http.get(read, path, params=params, headers=api.prepare_headers()),
                service=service,
            )
            return result
        # Short reads of watches take turns (FIFO) on a few of the short-call connections:
        # a thousand watches starting at once would otherwise spend their timeout waiting
        # for a connection, and registrations (TTL renewals) behind them.
        try:
            async with asyncio.timeout(QUEUE_BOUND):
                await self._reads.acquire()
        except TimeoutError:
            raise BackendUnavailable(
                f"no turn to read {path} from the Consul agent within {QUEUE_BOUND:g}s "
                f"({READS_MAX} reads at a time, all slow or hung)",
                backend="consul",
                service=service,
            ) from None
        try:
            result = await backend._call(
                api.http.get(read, path, params=params, headers=api.prepare_headers()),
                service=service,
            )
        finally:
            self._reads.release()
        return result

    def take_slot(self) -> bool:
        """A direct slot for one blocking query, if one is free."""
        if self.direct >= DIRECT_MAX:
            return False
        self.direct += 1
        return True

    def release_slot(self, *, answered: bool) -> None:
        """Give a slot back: now if Consul answered, else when Consul would have answered."""
        if answered:
            self.direct -= 1
            return
        # Consul keeps serving a blocking query its client left until its wait ends.
        later = self.backend.wait * 17 / 16 + 1.0
        asyncio.get_running_loop().call_later(later, self._release_later)

    def _release_later(self) -> None:
        self.direct -= 1

    async def shared_read(
        self,
        path: str,
        params: list[tuple[str, str]],
        generation: int,
        service: str,
    ) -> Read:
        """A read without blocking, shared with an identical one sent at ``generation`` or later."""
        key = (path, tuple(params))
        found = self._shared.get(key)
        if found is None or found[0] < generation or found[1].done():
            task = asyncio.create_task(self.get(path, params, 0, service=service))
            found = (generation, task)
            self._shared[key] = found
            task.add_done_callback(functools.partial(self._forget, key))
        return await asyncio.shield(found[1])

    def _forget(self, key: Hashable, task: asyncio.Task[Read]) -> None:
        found = self._shared.get(key)
        if found is not None and found[1] is task:
            del self._shared[key]
        if not task.cancelled():
            task.exception()  # retrieved: every sharer got it

    async def emulate(
        self,
        signal: Signal,
        key: Hashable,
        path: str,
        params: list[tuple[str, str]],
        index: int,
        service: str,
    ) -> Read:
        """What a blocking query on ``index`` answers once the index moved.

        It does not end after ``wait`` unchanged: the signal's own blocking query
        notices an agent gone or restarted (an error, or every fingerprint moves).
        """
        read_key = (path, tuple(params))
        signal.users += 1
        try:
            mark, generation = await signal.mark(key)
            if self._seen.get(read_key) != (str(index), mark):
                raw, body = await self.shared_read(path, params, generation, service)
                self._seen[read_key] = (raw, mark)
                if raw != str(index):
                    return raw, body
            while True:
                await signal.wait(key, mark, self.backend.wait)
                mark, generation = await signal.mark(key)
                if self._seen.get(read_key) == (str(index), mark):
                    continue  # nothing moved for this read (or a sharer read it already)
                raw, body = await self.shared_read(path, params, generation, service)
                self._seen[read_key] = (raw, mark)
                if raw != str(index):
                    return raw, body
        finally:
            signal.users -= 1

    async def close(self) -> None:
        """Stop the signals (their waiters return)."""
        for signal in (self.catalog, self.checks):
            task, signal.task = signal.task, None
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, BackendError):
                    await task


def hub_of(backend: ConsulBackend) -> Hub:
    """The backend's hub for its current API object (a new one with a new API object)."""
    api = backend.api
    hub: Hub | None = api.registry_agent_hub
    if hub is None:
        hub = Hub(backend)
        api.registry_agent_hub = hub
    return hub
