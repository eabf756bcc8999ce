"""Blocking check code on a daemon thread of its own, one run at a time.

Not the loop's default executor: a hung call there starves everyone else who
needs a thread (``getaddrinfo`` for a neighbour's ``localhost`` URL) and is
joined by ``asyncio.run`` and at interpreter exit, so the process never ends.
Here a hung call holds one daemon thread that nothing ever joins, and the
next call fails at once instead of stacking another thread behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from registry_agent._health.base import raised

__all__ = ["SoloThread", "StillRunning"]


class StillRunning(RuntimeError):
    """The previous call has not returned yet; no new thread was started."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"previous run still running after {seconds:.1f}s")
        self.seconds = seconds


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        # The caller gave up (timeout, cancellation): drop the late outcome.
        if ok and inspect.iscoroutine(value):
            value.close()
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class SoloThread:
    """Runs a blocking callable on a fresh daemon thread, at most one call in flight.

    Callers that overlap a call still awaited (one check object shared by two
    registrars) share its outcome. Once every caller has given up on a call,
    new calls fail with :class:`StillRunning` until it returns.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._since: float | None = None  # when the call in flight started
        self._current: asyncio.Future[Any] | None = None
        self._waiters = 0

    @property
    def busy(self) -> bool:
        """True while a call (perhaps abandoned by its callers) is still running."""
        return self._since is not None

    async def call(self, func: Callable[[], Any]) -> Any:
        """Return ``func()``'s result or raise its exception; :class:`StillRunning` if hung.

        Cancelling the caller abandons the call: its thread finishes on its own
        and nothing waits for it.
        """
        loop = asyncio.get_running_loop()
        current = self._current
        if current is not None and not current.done() and current.get_loop() is loop:
            return await self._outcome(current)
        with self._lock:
            if self._since is not None:
                raise StillRunning(time.monotonic() - self._since)
            self._since = time.monotonic()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()

        def target() -> None:
            ok, value = True, None
            try:
                value = context.run(func)
            except Exception as exc:
                ok, value = False, exc
            except BaseException as exc:
                # SystemExit or KeyboardInterrupt from a check must not end the loop.
                ok, value = False, RuntimeError(raised(exc))
            finally:
                with self._lock:
                    self._since = None
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, future, ok, value)

        thread = threading.Thread(target=target, name=f"check {self.name}", daemon=True)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._since = None
            raise
        self._current = future
        return await self._outcome(future)

    async def _outcome(self, future: asyncio.Future[Any]) -> Any:
        self._waiters += 1
        try:
            return await asyncio.shield(future)
        finally:
            self._waiters -= 1
            if self._waiters == 0 and not future.done():
                future.cancel()  # abandoned: its late outcome is dropped
