"""Discovery's use of the last-known-good store (logic, on the in-memory registry): saved on
change only, never written back while stale, recovery without a call, failures that do not
stop discovery. Real registries: integration/test_last_known_good_real.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from registry_agent import (
    AsyncDiscovery,
    BackendUnavailable,
    ConfigError,
    Discovery,
    HealthStatus,
    InstanceHealth,
    NoInstanceAvailable,
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


# --- issue 16 break-it fixes ----------------------------------------------------------------


def save_now(directory: Path, instances: Sequence[InstanceHealth], **kwargs: float) -> None:
    LastKnownGoodStore(directory).save("orders", instances, **kwargs)


async def test_concurrent_first_calls_share_one_load_one_warning_one_recovery(
    registry: MemoryRegistry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    save_now(tmp_path, [InstanceHealth(inst(1), HealthStatus.PASSING)])
    loads: list[str] = []
    original = LastKnownGoodStore.load

    def counting(self: LastKnownGoodStore, service: str) -> object:
        loads.append(service)
        return original(self, service)

    monkeypatch.setattr(LastKnownGoodStore, "load", counting)
    registry.stop()
    caplog.set_level(logging.WARNING, logger="registry_agent")
    d = AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY)
    results = await asyncio.gather(*(d.instances("orders") for _ in range(20)))
    assert results == [[inst(1)]] * 20
    assert loads == ["orders"]
    serving = [r for r in caplog.records if "from the last known good" in r.getMessage()]
    assert len(serving) == 1
    recoveries = [t for t in asyncio.all_tasks() if t.get_name() == "last known good orders"]
    assert len(recoveries) == 1
    await d.close()
    assert recoveries[0].done()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("last known good")]


async def test_max_age_is_checked_while_serving_stale(
    registry: MemoryRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    max_age = 0.5
    save_now(tmp_path, [InstanceHealth(inst(1), HealthStatus.PASSING)])
    registry.stop()
    caplog.set_level(logging.INFO, logger="registry_agent")
    async with AsyncDiscovery(
        registry.url, last_known_good=tmp_path, last_known_good_max_age=max_age, retry=RETRY
    ) as d:
        assert await d.instances("orders") == [inst(1)]
        assert d.stale("orders")
        await asyncio.sleep(max_age + 0.1)
        for _ in range(3):  # raised at once each time, logged once
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="older than last_known_good_max_age"):
                await d.choose("orders")
            assert time.monotonic() - started < d.sync_timeout / 2
        assert not d.stale("orders")
        ended = [r for r in caplog.records if "no longer served" in r.getMessage()]
        assert [r.levelno for r in ended] == [logging.WARNING]
        registry.start()
        put(registry, 2)
        await until(lambda: d._watchers["orders"]._read_by_any("orders"))
        assert await d.instances("orders") == [inst(2)]  # fresh again


async def test_an_empty_saved_set_is_not_served_and_the_registry_error_is_raised(
    registry: MemoryRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_now(tmp_path, [])
    registry.stop()
    caplog.set_level(logging.WARNING, logger="registry_agent")
    async with AsyncDiscovery(
        registry.url, last_known_good=tmp_path, sync_timeout=0.3, retry=RETRY
    ) as d:
        for _ in range(2):
            with pytest.raises(BackendUnavailable, match="is stopped"):
                await d.choose("orders")
        assert not d.stale("orders")
    said = [r for r in caplog.records if "holds no instance" in r.getMessage()]
    assert len(said) == 1


async def test_none_left_in_a_stale_set_says_it_is_stale_and_why(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    save_now(tmp_path, [InstanceHealth(inst(1), HealthStatus.CRITICAL)])
    registry.stop()
    async with AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY) as d:
        with pytest.raises(NoInstanceAvailable) as caught:
            await d.choose("orders")
        assert d.stale("orders")
    message = str(caught.value)
    assert "(1 registered, none passing; stale: last known good from " in message
    assert "Z; the registry is unreachable: memory registry" in message


async def test_is_service_answers_from_the_file_and_the_stale_set_without_the_registry(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    save_now(tmp_path, [InstanceHealth(inst(1), HealthStatus.PASSING)])
    registry.stop()
    async with AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY) as d:
        assert await d.is_service("orders")  # its file: no registry asked, no watch
        assert d._watchers == {}
        assert d._names_failed == {}
        await d.instances("orders")
        assert d.stale("orders")
        assert await d.is_service("orders")
        assert d._names_failed == {}
        with pytest.raises(BackendUnavailable):  # no file, not served: the registry fails
            await d.is_service("payments")


async def test_a_load_that_hangs_is_bounded_by_sync_timeout(
    registry: MemoryRegistry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file system that never answers (a hung network mount) costs sync_timeout, once."""
    release = threading.Event()

    def hung(self: LastKnownGoodStore, service: str) -> None:
        release.wait(BOUND * 2)

    monkeypatch.setattr(LastKnownGoodStore, "load", hung)
    registry.stop()
    sync_timeout = 0.5
    caplog.set_level(logging.WARNING, logger="registry_agent")
    try:
        async with AsyncDiscovery(
            registry.url, last_known_good=tmp_path, sync_timeout=sync_timeout, retry=RETRY
        ) as d:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="is stopped"):
                await d.instances("orders")
            assert time.monotonic() - started < sync_timeout + 1.0
            assert not d.stale("orders")
        assert "took longer than 0.5s" in caplog.text
    finally:
        release.set()


async def test_a_closed_discovery_raises_and_starts_nothing(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    put(registry, 1)
    d = AsyncDiscovery(registry.url, last_known_good=tmp_path, retry=RETRY)
    chosen = await d.choose("orders")
    await d.close()
    for call in (d.instances("orders"), d.health("orders"), d.choose("orders")):
        with pytest.raises(RuntimeError, match="the discovery is closed"):
            await call
    with pytest.raises(RuntimeError, match="the discovery is closed"):
        await d.is_service("orders")
    d.report("orders", chosen, False)  # a call that ended after close(): ignored
    assert d._watchers == {}


def test_a_closed_blocking_discovery_raises_and_starts_no_thread(
    registry: MemoryRegistry,
) -> None:
    put(registry, 1)
    d = Discovery(registry.url, retry=RETRY)
    assert d.choose("orders") == inst(1)
    d.close()
    names = {t.name for t in threading.enumerate()}
    for call in (
        lambda: d.choose("orders"),
        lambda: d.instances("orders"),
        lambda: d.health("orders"),
        lambda: d.is_service("orders"),
        # What a channel does: submit to the loop thread directly.
        lambda: d._thread.submit(d._async.choose("orders")),
    ):
        with pytest.raises(RuntimeError, match="the discovery is closed"):
            call()
    assert {t.name for t in threading.enumerate()} <= names
    assert "registry-agent discovery" not in {t.name for t in threading.enumerate()}
