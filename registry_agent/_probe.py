"""ConnectionProbe: notice at once when a registry goes away and when it comes back.

Heartbeats alone see a restart only at the next beat (ttl/3 later), and retry
backoff can push the repair further out after a long outage. A backend keeps
one long-lived request open instead (a blocking query, a watch stream) and
reports each transition, so registrars can re-check their entries the moment
the registry answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from registry_agent._retry import RetryPolicy

__all__ = ["ConnectionAware", "ConnectionProbe", "Hold"]


@runtime_checkable
class ConnectionAware(Protocol):
    """Optional backend capability: say at once when the registry goes away or comes back.

    A registrar whose backend has it re-checks its entry the moment the
    registry answers again, instead of at its next heartbeat. A backend usually
    implements it with a :class:`ConnectionProbe`::

        async def wait_connection_change(self) -> None:
            await self._probe.wait_change()
    """

    async def wait_connection_change(self) -> None:
        """Return when the registry went away, or came back after being away."""
        ...


#: ``hold(connected)``: open a long-lived request, call ``connected()`` once the
#: registry answered, and keep waiting while it is up. Return True to be called
#: again (still connected), False or raise when the connection broke.
Hold = Callable[[Callable[[], None]], Awaitable[bool]]

#: Re-opening the request after a break: soon (the registry may be back at once), jittered.
_RETRY = RetryPolicy(initial=0.1, cap=1.0)


class ConnectionProbe:
    """Runs ``hold`` in a loop; :meth:`wait_change` returns on each up/down transition.

    After a break, ``hold`` is called again with ``retry``'s jittered backoff
    (default: from 0.1 s up to 1 s), so a registry that is back is seen within a second.
    """

    def __init__(self, hold: Hold, *, retry: RetryPolicy | None = None) -> None:
        self._hold = hold
        self._retry = retry or _RETRY
        self._up: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._change: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def up(self) -> bool | None:
        """True while connected, False after a break, None before the first answer."""
        return self._up

    async def wait_change(self) -> None:
        """Return when the registry went away, or came back after being away."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._change = loop.create_future()
            self._task = loop.create_task(self._run(), name="registry connection probe")
        assert self._change is not None
        await asyncio.shield(self._change)

    def _mark(self, up: bool) -> None:
        previous, self._up = self._up, up
        if previous is None and up:
            return  # the first answer is no news
        if previous != up and self._change is not None and self._loop is not None:
            done, self._change = self._change, self._loop.create_future()
            if not done.done():
                done.set_result(None)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                still_up = await self._hold(lambda: self._mark(True))
            except asyncio.CancelledError:
                raise
            except Exception:
                still_up = False
            if still_up:
                failures = 0
                continue
            self._mark(False)
            failures += 1
            await asyncio.sleep(self._retry.delay(failures))

    async def close(self) -> None:
        """Stop probing."""
        task, self._task = self._task, None
        if task is not None and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
