"""AsyncWatcher: exact add/update/delete/offline/online events for one or more services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

from registry_agent._backend import Backend
from registry_agent._errors import ConfigError, RegistryError, RevisionCompacted
from registry_agent._events import WatchEvent, diff_snapshots
from registry_agent._models import InstanceHealth, ServiceSnapshot, _check_name
from registry_agent._plugins import open_backend
from registry_agent._retry import RetryPolicy

__all__ = ["AsyncWatcher"]

log = logging.getLogger("registry_agent.watcher")

_REPEAT_LOG_EVERY = 30.0
_CLOSED = object()


class AsyncWatcher:
    """Watches services and yields a :class:`WatchEvent` for every change, each exactly once.

    ``backend`` is a URL or a :class:`Backend`; ``services`` a name or a list of
    names. After a disconnect or a server restart the watcher resumes (etcd:
    from the next revision; Consul: from the last index) or, when it cannot,
    lists again and diffs against what it knew: every change missed meanwhile
    yields exactly its events. Errors never end the watch: each one goes to
    ``on_error`` and the log (repeats rate-limited), then the watcher retries
    with ``retry``'s backoff, so a dead server costs no CPU.

    Iterate with ``async for``, or pass ``listener`` to be called for each
    event instead (on the event loop).
    """

    def __init__(
        self,
        backend: str | Backend,
        services: str | Iterable[str],
        *,
        retry: RetryPolicy | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        listener: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        names = [services] if isinstance(services, str) else list(services)
        if not names:
            raise ConfigError("expected at least one service name", field="services")
        for name in names:
            _check_name(name, "services")
        self.services = tuple(dict.fromkeys(names))
        self._owns_backend = isinstance(backend, str)
        self.backend: Backend = open_backend(backend) if isinstance(backend, str) else backend
        self.retry = retry or RetryPolicy(initial=0.1, cap=2.0)
        self.on_error = on_error
        self.listener = listener
        self._state: dict[str, Mapping[str, InstanceHealth]] = {}
        self._synced: dict[str, asyncio.Event] = {}
        self._queue: asyncio.Queue[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.errors = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> AsyncWatcher:
        """Start watching in the background (iterating starts it too)."""
        if self._tasks or self._closed:
            return self
        self._queue = asyncio.Queue()
        for service in self.services:
            self._synced[service] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._watch(service), name=f"watch {service}"))
        return self

    async def close(self) -> None:
        """Stop watching; a pending ``async for`` ends."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._queue is not None:
            self._queue.put_nowait(_CLOSED)
        if self._owns_backend:
            with contextlib.suppress(Exception):
                await self.backend.close()

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
        return self._events()

    async def _events(self) -> AsyncIterator[WatchEvent]:
        if self.listener is not None:
            raise RuntimeError("this watcher delivers its events to its listener")
        await self.start()
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # every iterator ends
                return
            yield item

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
        """True once ``service`` has been read at least once."""
        event = self._synced.get(service)
        return event is not None and event.is_set()

    def snapshot(self, service: str | None = None) -> list[InstanceHealth]:
        """The instances of ``service`` as last seen, with their health, ordered by id.

        ``service`` may be omitted when the watcher watches exactly one.
        """
        if service is None:
            if len(self.services) != 1:
                raise ConfigError("name the service: this watcher watches several", field="service")
            service = self.services[0]
        if service not in self.services:
            raise ConfigError(f"not watched: {service!r}", field="service")
        state = self._state.get(service, {})
        return [state[iid] for iid in sorted(state)]

    # -- the watch loop -------------------------------------------------------------

    async def _watch(self, service: str) -> None:
        last: ServiceSnapshot | None = None
        failures = 0
        last_log = 0.0
        while True:
            try:
                async for snapshot in self.backend.watch(service, since=last):
                    self._apply(service, snapshot)
                    last = snapshot
                    if failures:
                        log.info(
                            "watch of %s resumed after %d failure(s)",
                            service,
                            failures,
                            extra={"event": "watch_resumed", "service": service},
                        )
                        failures = 0
            except RevisionCompacted as exc:
                # Cannot resume from our revision: list again and diff, at once.
                log.info(
                    "watch of %s re-lists: %s",
                    service,
                    exc,
                    extra={"event": "watch_relist", "service": service},
                )
                last = None
                continue
            except Exception as exc:  # never die: report, back off, go on
                failures += 1
                self.errors += 1
                now = time.monotonic()
                if failures == 1 or now - last_log >= _REPEAT_LOG_EVERY:
                    last_log = now
                    log.warning(
                        "watch of %s failed (failure %d, retrying): %s",
                        service,
                        failures,
                        exc,
                        extra={"event": "watch_failed", "service": service, "error": str(exc)},
                    )
                if self.on_error is not None:
                    try:
                        self.on_error(service, exc)
                    except Exception:
                        log.exception("on_error callback failed")
                if not isinstance(exc, RegistryError):
                    log.debug("unexpected watch error", exc_info=exc)
                await asyncio.sleep(self.retry.delay(failures))
                continue
            # A stream that ends without an error is re-opened after a pause.
            failures += 1
            await asyncio.sleep(self.retry.delay(failures))

    def _apply(self, service: str, snapshot: ServiceSnapshot) -> None:
        old = self._state.get(service, {})
        events = diff_snapshots(old, snapshot.instances, snapshot.index)
        self._state[service] = MappingProxyType(dict(snapshot.instances))
        self._synced[service].set()
        for event in events:
            if self.listener is not None:
                try:
                    self.listener(event)
                except Exception:
                    log.exception("watch listener failed", extra={"event": "listener_failed"})
            else:
                assert self._queue is not None
                self._queue.put_nowait(event)
