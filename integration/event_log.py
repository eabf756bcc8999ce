"""A watcher's events as they arrive, for tests that wait on them and time them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from registry_agent import AsyncWatcher, EventType, WatchEvent


class EventLog(list[WatchEvent]):
    """Collects ``watcher``'s events in a background task (``async with``), each with its time.

    Leaving the block stops collecting and closes the watcher.
    """

    def __init__(self, watcher: AsyncWatcher) -> None:
        super().__init__()
        self.watcher = watcher
        self._at: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _collect(self) -> None:
        async for event in self.watcher:
            self._at[id(event)] = time.monotonic()
            self.append(event)

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self.watcher.close()

    def at(self, event: WatchEvent) -> float:
        """When ``event`` arrived (monotonic seconds)."""
        return self._at[id(event)]

    def of(self, instance_id: str) -> list[EventType]:
        """The kinds of events seen for one instance, in order."""
        return [e.type for e in self if e.instance.id == instance_id]

    async def wait_for(
        self,
        what: Callable[[WatchEvent], bool] | tuple[EventType, str],
        within: float = 20.0,
    ) -> WatchEvent:
        """The first event matching ``what`` (a test, or a (kind, instance id) pair)."""
        if isinstance(what, tuple):
            kind, instance_id = what

            def matches(event: WatchEvent) -> bool:
                return event.type is kind and event.instance.id == instance_id

        else:
            matches = what
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = next((e for e in self if matches(e)), None)
            if found is not None:
                return found
            await asyncio.sleep(0.02)
        pytest.fail(f"no such event within {within}s: {[(e.type, e.instance.id) for e in self]}")
