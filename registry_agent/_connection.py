"""One connection watch per backend, however many registrars follow it.

A backend that is :class:`~registry_agent._probe.ConnectionAware` says when the
registry goes away or comes back. Every registrar wants to hear it (to cut a
backoff short, or to read its entry back), but 10,000 registrars each waiting
on the backend's probe cost 10,000 futures per change: the agent spent a third
of its CPU there while etcd came back. One task per (backend, event loop) waits
instead and calls every follower.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from registry_agent._probe import ConnectionAware

__all__ = ["follow_connection"]

log = logging.getLogger("registry_agent.registrar")

_RETRY_AFTER_FAILURE = 1.0


class _Watch:
    def __init__(self, backend: ConnectionAware, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.followers: set[Callable[[], None]] = set()
        self.task = loop.create_task(self._run(), name="connection watch")

    async def _run(self) -> None:
        while self.followers:
            try:
                await self.backend.wait_connection_change()
            except Exception as exc:
                log.debug("connection probe failed: %s", exc, extra={"event": "probe_failed"})
                await asyncio.sleep(_RETRY_AFTER_FAILURE)
                continue
            for follower in list(self.followers):
                try:
                    follower()
                except Exception:
                    log.exception("connection follower failed")


_watches: dict[tuple[int, int], _Watch] = {}


def follow_connection(backend: ConnectionAware, follower: Callable[[], None]) -> Callable[[], None]:
    """Call ``follower`` (on the running loop) after each connection change of ``backend``
    until the returned function is called; the watch ends with its last follower."""
    loop = asyncio.get_running_loop()
    key = (id(backend), id(loop))
    watch = _watches.get(key)
    if watch is None or watch.task.done() or watch.backend is not backend:
        watch = _watches[key] = _Watch(backend, loop)
    watch.followers.add(follower)

    def unfollow() -> None:
        watch.followers.discard(follower)
        if not watch.followers:
            watch.task.cancel()
            if _watches.get(key) is watch:
                del _watches[key]

    return unfollow
