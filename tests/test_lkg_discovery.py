"""Discovery's use of the last-known-good store (logic, on the in-memory registry): saved on
change only, never written back while stale, recovery without a call, failures that do not
stop discovery. Real registries: integration/test_last_known_good_real.py."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from registry_agent import (
    AsyncDiscovery,
    ConfigError,
    Discovery,
    HealthStatus,
    InstanceHealth,
    RetryPolicy,
    ServiceInstance,
)
from registry_agent._lkg import LastKnownGoodStore
from registry_agent.testing.memory import MemoryRegistry

RETRY = RetryPolicy(initial=0.02, cap=0.1)
BOUND = 5.0  # generous: these settle in tens of milliseconds


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"lkg-{uuid.uuid4().hex}")


def inst(n: int) -> ServiceInstance:
    return ServiceInstance("orders", address="127.0.0.1", port=9000 + n, id=f"o{n}")


def put(registry: MemoryRegistry, n: int, status: HealthStatus = HealthStatus.PASSING) -> None:
    registry.put(InstanceHealth(inst(n), status), ttl=60)


@pytest.fixture
def saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of instances of each save, as it happens."""
    done: list[int] = []
    original = LastKnownGoodStore.save

    def counting(
        self: LastKnownGoodStore,
        service: str,
        instances: Sequence[InstanceHealth],
        *,
        now: float | None = None,
    ) -> Path:
        done.append(len(instances))
        return original(self, service, instances, now=now)

    monkeypatch.setattr(LastKnownGoodStore, "save", counting)
    return done


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_saved_when_the_set_changes_not_on_every_call(
    registry: MemoryRegistry, tmp_path: Path, saves: list[int]
) -> None:
    put(registry, 1)
    async with AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY) as d:
        for _ in range(50):
            assert await d.instances("orders") == [inst(1)]
        await until(lambda: saves == [1])
        put(registry, 2)
        for _ in range(200):
            if len(await d.instances("orders")) == 2:
                break
            await asyncio.sleep(0.01)
        await until(lambda: saves == [1, 2])
        put(registry, 2, HealthStatus.CRITICAL)  # health is part of the set
        for _ in range(200):
            if len(await d.instances("orders")) == 1:
                break
            await asyncio.sleep(0.01)
        await until(lambda: saves == [1, 2, 2])
        for _ in range(50):
            await d.health("orders")
        await asyncio.sleep(0.1)
    assert saves == [1, 2, 2]
    saved = LastKnownGoodStore(tmp_path).load("orders")
    assert saved is not None
    assert [h.status for h in saved.instances] == [HealthStatus.PASSING, HealthStatus.CRITICAL]


async def test_stale_set_is_never_written_back_and_recovers_without_a_call(
    registry: MemoryRegistry,
    tmp_path: Path,
    saves: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry_agent")
    put(registry, 1)
    async with AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY) as d:
        await d.instances("orders")
    assert saves == [1]
    first = LastKnownGoodStore(tmp_path).load("orders")
    assert first is not None
    registry.stop()
    async with AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY) as cold:
        assert await cold.instances("orders") == [inst(1)]
        assert cold.stale("orders")
        assert not cold.stale("payments")  # never asked
        await asyncio.sleep(0.3)  # retries fail meanwhile
        assert cold.stale("orders")
        assert saves == [1]  # the stale set is not saved again (its time would lie)
        registry.start()
        await until(lambda: not cold.stale("orders"))  # no call needed
        await until(lambda: "answered for orders" in caplog.text)
        assert await cold.instances("orders") == [inst(1)]
    # The registry confirmed the set: saved again, so its time says when it was last known good.
    assert saves == [1, 1]
    again = LastKnownGoodStore(tmp_path).load("orders")
    assert again is not None
    assert again.saved_at > first.saved_at
    infos = [r for r in caplog.records if "answered for orders" in r.getMessage()]
    assert [r.levelno for r in infos] == [logging.INFO]


async def test_no_file_keeps_the_usual_wait_and_error(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    registry.stop()
    async with AsyncDiscovery(
        registry.url, last_known_good=tmp_path, sync_timeout=0.3, retry=RETRY
    ) as d:
        with pytest.raises(Exception, match=r"no answer from the registry within 0\.3s"):
            await d.instances("orders")
        assert not d.stale("orders")


async def test_a_directory_that_cannot_be_made_is_a_warning_not_an_error(
    registry: MemoryRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    put(registry, 1)
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        async with AsyncDiscovery(registry.url, last_known_good=blocker / "sub", retry=RETRY) as d:
            assert await d.instances("orders") == [inst(1)]
            await until(lambda: "not saved (discovery goes on)" in caplog.text)
            assert await d.instances("orders") == [inst(1)]


def test_blocking_discovery_takes_the_same_keywords(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    put(registry, 1)
    with Discovery(registry.url, last_known_good=tmp_path, retry=RETRY) as d:
        assert d.instances("orders") == [inst(1)]
        assert not d.stale("orders")
    registry.stop()
    with Discovery(registry.url, last_known_good=tmp_path, retry=RETRY) as cold:
        assert cold.choose("orders") == inst(1)
        assert cold.stale("orders")


def test_max_age_without_a_directory_is_a_config_error(registry: MemoryRegistry) -> None:
    with pytest.raises(ConfigError) as caught:
        AsyncDiscovery(registry.url, last_known_good_max_age=60)
    assert caught.value.field == "last_known_good_max_age"
    with pytest.raises(ConfigError) as caught:
        Discovery(registry.url, last_known_good=42)  # type: ignore[arg-type]
    assert caught.value.field == "last_known_good"
