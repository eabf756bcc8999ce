"""ConnectionProbe: one transition report per change, none for the first answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from registry_agent._probe import ConnectionProbe


async def test_reports_going_away_and_coming_back() -> None:
    script = iter(["up", "down", "down", "up", "up"])
    calls = 0

    async def hold(connected: Callable[[], None]) -> bool:
        nonlocal calls
        calls += 1
        step = next(script, "up")
        await asyncio.sleep(0.01)
        if step == "down":
            raise ConnectionError("registry went away")
        connected()
        return True

    probe = ConnectionProbe(hold)
    try:
        # first answer "up": no news; then "down": a change
        await asyncio.wait_for(probe.wait_change(), 2)
        assert probe.up is False
        # "down" again is no news; "up" after it is
        await asyncio.wait_for(probe.wait_change(), 2)
        assert probe.up is True
        assert calls >= 4
        # steady "up": no change to report
        waiting = asyncio.ensure_future(probe.wait_change())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
    finally:
        await probe.close()


async def test_many_waiters_share_one_probe() -> None:
    started = 0
    release = asyncio.Event()

    async def hold(connected: Callable[[], None]) -> bool:
        nonlocal started
        started += 1
        connected()
        await release.wait()
        return False  # the connection broke

    probe = ConnectionProbe(hold)
    waiters = [asyncio.ensure_future(probe.wait_change()) for _ in range(100)]
    await asyncio.sleep(0.05)
    assert started == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert probe.up is False
    await probe.close()
