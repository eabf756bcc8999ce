"""Last known good on disk, on real Consul and etcd: saved while the registry answers, served
stale (quickly) by a new discovery while it is down, replaced by fresh data when it is back."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from integration.acl import AclConsul
from registry_agent import (
    AsyncDiscovery,
    BackendUnavailable,
    Discovery,
    DiscoveryPolicy,
    NoInstanceAvailable,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent._lkg import LastKnownGoodStore
from registry_agent.testing.servers import ServerProcess

Measured = Callable[[str, float, float], None]

SYNC_TIMEOUT = 10.0
RETRY = RetryPolicy(initial=0.05, cap=0.5)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine
# A refused connection fails the first read at once; then a poll (20 ms) and a file read.
# Asserted well under sync_timeout: serving stale must not wait for it.
STALE_BOUND = SYNC_TIMEOUT / 5
# Back to fresh: the server's start is done before the clock starts; then the watch's next
# retry (at most RETRY.cap apart) and one read.
FRESH_BOUND = RETRY.cap + MARGIN + 1.0
TTL = 120.0  # longer than the test: entries stay passing without heartbeats
TOKEN = "lkg-token-that-must-never-be-written"
STALE_NOTE = "stale: last known good from "


def orders(port: int) -> ServiceInstance:
    return ServiceInstance(
        "orders", address="127.0.0.1", port=port, tags=("v2",), meta={"zone": "eu-1a"}
    )


async def register(server: ServerProcess, instances: Iterable[ServiceInstance]) -> None:
    await register_at(server.url, instances)


async def register_at(url: str, instances: Iterable[ServiceInstance]) -> None:
    writer = open_backend(url, timeout=2)
    try:
        for instance in instances:
            await writer.register(instance, ttl=TTL)
    finally:
        await writer.close()


def discovery_url(server: ServerProcess) -> str:
    # Consul takes a token in the URL (a dev agent without ACLs ignores it): it must not
    # reach the file. etcd's credentials would need auth on; its URL is used as it is.
    return f"{server.url}?token={TOKEN}" if server.name == "consul" else server.url


def lines(caplog: pytest.LogCaptureFixture, level: int, words: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == level and words in r.getMessage()
    ]


def check_saved(directory: Path, ports: set[int]) -> None:
    store = LastKnownGoodStore(directory)
    saved = store.load("orders")
    assert saved is not None
    assert {h.instance.port for h in saved.instances} == ports
    assert all(h.healthy for h in saved.instances)
    empty = store.load("payments")  # read fine, and empty: a fact, saved as such
    assert empty is not None
    assert empty.instances == ()
    for path in directory.iterdir():
        assert TOKEN not in path.read_text()
        assert str(path.stat().st_mode & 0o777) == str(0o600)
    assert directory.stat().st_mode & 0o777 == 0o700


async def wait_for(condition: Callable[[], bool], bound: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < bound, f"not within {bound:.1f}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_async_discovery_serves_last_known_good_while_registry_is_down(
    server: ServerProcess,
    tmp_path: Path,
    measured: Measured,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry_agent")
    directory = tmp_path / "cache" / "discovery"
    first = {orders(9101), orders(9102)}
    await register(server, first)

    def discovery() -> AsyncDiscovery:
        return AsyncDiscovery(
            discovery_url(server), last_known_good=directory, sync_timeout=SYNC_TIMEOUT, retry=RETRY
        )

    # 1. The registry answers: discovery serves and saves (an empty service too).
    async with discovery() as live:
        assert set(await live.instances("orders")) == first
        assert await live.instances("payments") == []
        assert not live.stale("orders")
    check_saved(directory, {9101, 9102})

    # 2. The registry is down: a new discovery serves the saved set at once, marked stale.
    server.stop()
    started = time.monotonic()
    async with discovery() as cold:
        served = await cold.health("orders")
        measured("stale set served (refused)", time.monotonic() - started, STALE_BOUND)
        assert {h.instance for h in served} == first
        assert cold.stale("orders")
        assert all(h.note.startswith(STALE_NOTE) and h.note.endswith("Z") for h in served)
        assert (await cold.choose("orders")).port in {9101, 9102}
        # None left while stale: the error says the set is stale and why.
        with pytest.raises(
            NoInstanceAvailable,
            match=r"matching tags absent \(2 healthy do not match; stale: last known good "
            r"from \S+Z; the registry is unreachable: .+\)",
        ):
            await cold.choose("orders", policy=DiscoveryPolicy(tags=("absent",)))
        for _ in range(5):
            await cold.instances("orders")
        # An empty saved set is not served stale (it would hide the outage behind "no
        # instance"): the registry's own error is raised instead, and said in the log.
        with pytest.raises(BackendUnavailable, match="no answer from the registry"):
            await cold.choose("payments")
        assert not cold.stale("payments")
        assert len(lines(caplog, logging.WARNING, "payments not used: it holds no instance")) == 1
        assert len(lines(caplog, logging.WARNING, "serving 2 instance(s) from the last")) == 1

        # Too old for a max age: not used (said in the log), the first read fails as before.
        async with AsyncDiscovery(
            discovery_url(server),
            last_known_good=directory,
            last_known_good_max_age=0.001,
            sync_timeout=1.0,
            retry=RETRY,
        ) as strict:
            with pytest.raises(BackendUnavailable):
                await strict.health("orders")
            assert not strict.stale("orders")
        assert len(lines(caplog, logging.WARNING, "last_known_good_max_age=0.001s")) == 1

        # 3. The registry is back: fresh data replaces the stale set, one INFO line.
        server.start()  # returns once the server answers
        back = time.monotonic()
        await register(server, [orders(9103)])
        await wait_for(lambda: not cold.stale("orders"), FRESH_BOUND)
        measured("fresh after registry start", time.monotonic() - back, FRESH_BOUND)
        deadline = time.monotonic() + FRESH_BOUND
        while 9103 not in {i.port for i in await cold.instances("orders")}:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        fresh = await cold.health("orders")
        assert not any(h.note.startswith(STALE_NOTE) for h in fresh)
        assert len(lines(caplog, logging.INFO, "answered for orders: ")) == 1
        assert len(lines(caplog, logging.WARNING, "serving 2 instance(s) from the last")) == 1
    # The fresh set was saved (the closing discovery waits for a save in progress).
    saved = LastKnownGoodStore(directory).load("orders")
    assert saved is not None
    assert 9103 in {h.instance.port for h in saved.instances}


def test_blocking_discovery_serves_last_known_good_while_registry_is_down(
    server: ServerProcess,
    tmp_path: Path,
    measured: Measured,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry_agent")
    directory = tmp_path / "lkg"
    first = {orders(9201), orders(9202), orders(9203)}
    asyncio.run(register(server, first))

    with Discovery(
        discovery_url(server),
        last_known_good=str(directory),
        sync_timeout=SYNC_TIMEOUT,
        retry=RETRY,
    ) as live:
        assert set(live.instances("orders")) == first
        assert live.instances("payments") == []
        assert not live.stale("orders")
    check_saved(directory, {9201, 9202, 9203})

    server.stop()
    started = time.monotonic()
    with Discovery(
        discovery_url(server),
        last_known_good=str(directory),
        sync_timeout=SYNC_TIMEOUT,
        retry=RETRY,
    ) as cold:
        chosen = cold.choose("orders")
        measured("stale choice (blocking)", time.monotonic() - started, STALE_BOUND)
        assert chosen.port in {9201, 9202, 9203}
        assert cold.stale("orders")
        assert all(h.note.startswith(STALE_NOTE) for h in cold.health("orders"))

        server.start()  # returns once the server answers
        back = time.monotonic()
        asyncio.run(register(server, [orders(9204)]))
        while cold.stale("orders"):
            assert time.monotonic() - back < FRESH_BOUND, "still stale"
            time.sleep(0.02)
        measured("fresh after start (blocking)", time.monotonic() - back, FRESH_BOUND)
        while 9204 not in {i.port for i in cold.instances("orders")}:
            assert time.monotonic() - back < 2 * FRESH_BOUND, "new instance not seen"
            time.sleep(0.05)
        assert not any(h.note.startswith(STALE_NOTE) for h in cold.health("orders"))
    assert len(lines(caplog, logging.WARNING, "serving 3 instance(s) from the last")) == 1
    assert len(lines(caplog, logging.INFO, "answered for orders: ")) == 1


async def test_paused_registry_times_out_into_the_stale_set(
    server: ServerProcess, tmp_path: Path, measured: Measured
) -> None:
    """A registry that neither answers nor refuses: the set is served once the read times out
    (the backend's timeout), well before sync_timeout."""
    timeout = 1.0
    await register(server, [orders(9301)])
    async with AsyncDiscovery(server.url, last_known_good=tmp_path, retry=RETRY) as live:
        assert [i.port for i in await live.instances("orders")] == [9301]
    server.pause()
    try:
        backend = open_backend(server.url, timeout=timeout)
        started = time.monotonic()
        async with AsyncDiscovery(
            backend, last_known_good=tmp_path, sync_timeout=SYNC_TIMEOUT, retry=RETRY
        ) as cold:
            served = await cold.instances("orders")
            took = time.monotonic() - started
            assert [i.port for i in served] == [9301]
            assert cold.stale("orders")
        await backend.close()
        # The read times out after the backend's timeout: no need to wait for sync_timeout.
        measured("stale set served (paused)", took, timeout + MARGIN)
    finally:
        server.resume()


async def test_stale_only_once_every_backend_failed(
    consul_server: ServerProcess,
    etcd_server: ServerProcess,
    tmp_path: Path,
    measured: Measured,
) -> None:
    """Over two registries: one down is no reason for the file (the other answers); both
    down (refused) serve it at once."""
    await register(consul_server, [orders(9401)])
    await register(etcd_server, [orders(9402)])
    urls = [consul_server.url, etcd_server.url]
    async with AsyncDiscovery(urls, last_known_good=tmp_path, retry=RETRY) as live:
        assert {i.port for i in await live.instances("orders")} == {9401, 9402}

    etcd_server.stop()
    async with AsyncDiscovery(
        urls, last_known_good=tmp_path, sync_timeout=SYNC_TIMEOUT, retry=RETRY
    ) as half:
        assert {i.port for i in await half.instances("orders")} == {9401}  # fresh, not saved
        assert not half.stale("orders")

    consul_server.stop()
    started = time.monotonic()
    async with AsyncDiscovery(
        urls, last_known_good=tmp_path, sync_timeout=SYNC_TIMEOUT, retry=RETRY
    ) as cold:
        served = await cold.instances("orders")
        measured("stale set served (2 refused)", time.monotonic() - started, STALE_BOUND)
        # The last set saved: the one consul alone gave (etcd down then): what was served.
        assert {i.port for i in served} == {9401}
        assert cold.stale("orders")


async def test_a_refused_token_is_not_an_outage_the_file_is_not_served(
    acl: AclConsul, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong ACL token (Consul answers 403) is a configuration error, not an outage:
    the saved set is not served; the registry's own words are raised as without a file."""
    good = f"{acl.server.url}?token={acl.token}"
    await register_at(good, [orders(9501)])
    async with AsyncDiscovery(good, last_known_good=tmp_path, retry=RETRY) as live:
        assert [i.port for i in await live.instances("orders")] == [9501]
    assert LastKnownGoodStore(tmp_path).load("orders") is not None
    caplog.set_level(logging.INFO, logger="registry_agent")
    sync_timeout = 1.0
    async with AsyncDiscovery(
        f"{acl.server.url}?token=wrong-{uuid.uuid4()}",
        last_known_good=tmp_path,
        sync_timeout=sync_timeout,
        retry=RETRY,
    ) as denied:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="permission denied for service 'orders'"):
            await denied.instances("orders")
        assert time.monotonic() - started < sync_timeout + MARGIN
        assert not denied.stale("orders")
        with pytest.raises(BackendUnavailable, match="permission denied"):
            await denied.choose("orders")
    assert not lines(caplog, logging.WARNING, "from the last known good")
    assert not lines(caplog, logging.WARNING, "registry unreachable")


async def test_is_service_of_a_served_service_asks_no_silent_registry(
    server: ServerProcess, tmp_path: Path, measured: Measured
) -> None:
    """A paused registry (no services=, as a transport asks): is_service() of a service
    served stale, or with a file, or already read, answers at once instead of waiting
    sync_timeout for the registry's list of services each time."""
    sync_timeout = 2.0
    await register(server, [orders(9601)])
    async with AsyncDiscovery(server.url, last_known_good=tmp_path, retry=RETRY) as live:
        assert [i.port for i in await live.instances("orders")] == [9601]
    server.pause()
    try:
        backend = open_backend(server.url, timeout=1.0)
        async with AsyncDiscovery(
            backend, last_known_good=tmp_path, sync_timeout=sync_timeout, retry=RETRY
        ) as cold:
            started = time.monotonic()
            assert await cold.is_service("orders")  # its file: no watch, no registry asked
            measured("is_service, file only (paused)", time.monotonic() - started, MARGIN / 2)
            assert "orders" not in cold._watchers
            assert [i.port for i in await cold.instances("orders")] == [9601]
            assert cold.stale("orders")
            for _ in range(5):
                started = time.monotonic()
                assert await cold.is_service("orders")
                took = time.monotonic() - started
                assert took < sync_timeout / 4
            measured("is_service, served stale (paused)", took, sync_timeout / 4)
            with pytest.raises(BackendUnavailable):  # unknown name: the registry is asked
                await cold.is_service("payments")
            assert "payments" not in cold._watchers
        await backend.close()
    finally:
        server.resume()
