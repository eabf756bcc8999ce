"""Discovery policy on real Consul and etcd: tag and meta filters, zone preference with
fallback when the preferred zone goes critical or away, outlier ejection and its timed
recovery, the sync and async discoveries agreeing, is_service() starting no watch."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    Backend,
    BackendUnavailable,
    CallableCheck,
    Discovery,
    DiscoveryPolicy,
    NoInstanceAvailable,
    OutlierEjection,
    RegistryError,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent._urls import parse_backend_url
from registry_agent.testing import FaultProxy
from registry_agent.testing.servers import ServerProcess, free_port

from .test_healing import Measured

TTL = 3.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
INTERVAL = 0.2  # the health checks' interval
CHECK_TIMEOUT = 1.0
FALL = 1
# A check failing -> the entry critical or gone -> the watch seeing it: the check's interval
# and timeout times fall, plus a registry write and a watch round trip (generous).
WITHDRAWN = INTERVAL * FALL + CHECK_TIMEOUT + 4.0


def service_name() -> str:
    return f"orders-{uuid.uuid4().hex[:8]}"


async def until(predicate: Callable[[], Awaitable[bool]], bound: float, what: str) -> float:
    """Seconds until ``predicate()`` holds, polled every 50 ms; fails past ``bound``."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < bound, f"{what}: not within {bound:g}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class Fleet:
    """Registrars for instances of one service, each with a check the test turns."""

    def __init__(self, server: ServerProcess, service: str) -> None:
        self.server = server
        self.service = service
        self.healthy: dict[str, bool] = {}
        self.registrars: dict[str, AsyncRegistrar] = {}

    async def add(
        self,
        name: str,
        *,
        tags: tuple[str, ...] = (),
        on_unhealthy: str = "critical",
        **meta: str,
    ) -> ServiceInstance:
        instance = ServiceInstance(
            self.service,
            address="127.0.0.1",
            port=free_port(),
            id=f"{self.service}-{name}",
            tags=tags,
            meta=meta,
        )
        self.healthy[instance.id] = True
        registrar = AsyncRegistrar(
            f"{self.server.url}?timeout=2",
            instance,
            checks=[
                CallableCheck(
                    lambda: self.healthy[instance.id],
                    interval=INTERVAL,
                    timeout=CHECK_TIMEOUT,
                    name="turned",
                )
            ],
            ttl=TTL,
            retry=RETRY,
            fall=FALL,
            rise=1,
            on_unhealthy=on_unhealthy,
        )
        self.registrars[instance.id] = registrar
        await registrar.start(wait_registered=10)
        return instance

    async def close(self) -> None:
        await asyncio.gather(*(r.stop(timeout=5) for r in self.registrars.values()))


@pytest.fixture
async def fleet(server: ServerProcess) -> AsyncIterator[Fleet]:
    fleet = Fleet(server, service_name())
    yield fleet
    await fleet.close()


async def ids(discovery: AsyncDiscovery, service: str, n: int, **kwargs: Any) -> list[str]:
    return [(await discovery.choose(service, **kwargs)).id for _ in range(n)]


async def test_filters_and_zone_preference_with_fallback(
    server: ServerProcess, fleet: Fleet, measured: Measured
) -> None:
    service = fleet.service
    canary = await fleet.add("a1", tags=("canary",), zone="a", version="v2")
    stable_a = await fleet.add("a2", on_unhealthy="deregister", zone="a", version="v1")
    stable_b = await fleet.add("b1", zone="b", version="v1")
    policy = DiscoveryPolicy(prefer={"zone": "a"})
    v1 = DiscoveryPolicy(meta={"version": "v1"}, prefer={"zone": "a"})
    tagged = DiscoveryPolicy(tags=["canary"])
    sync = Discovery(server.url, policy=policy)
    try:
        async with AsyncDiscovery(server.url, policy=policy) as discovery:
            await until(lambda: _count(discovery, service, 3), 10, "three instances seen")
            # Zone a preferred: b1 is never chosen while a1 and a2 pass.
            assert set(await ids(discovery, service, 6)) == {canary.id, stable_a.id}
            assert set(await ids(discovery, service, 4, policy=v1)) == {stable_a.id}
            assert set(await ids(discovery, service, 4, policy=tagged)) == {canary.id}
            with pytest.raises(NoInstanceAvailable) as info:
                await discovery.choose(service, policy=DiscoveryPolicy(meta={"version": "v3"}))
            assert info.value.message == (
                "no healthy instance matching meta version=v3 (3 healthy do not match)"
            )
            # The blocking discovery gives the same answers, in the same order.
            got_sync = [sync.choose(service).id for _ in range(6)]
            assert got_sync == await _fresh_ids(server, policy, service, 6)
            assert {sync.choose(service, policy=v1).id for _ in range(4)} == {stable_a.id}
            assert {sync.choose(service, policy=tagged).id for _ in range(4)} == {canary.id}

            # Zone a fails: a1 turns critical, a2 goes away; the choice falls back to b.
            fleet.healthy[canary.id] = fleet.healthy[stable_a.id] = False
            took = await until(
                lambda: _only(discovery, service, {stable_b.id}), WITHDRAWN, "fallback to b"
            )
            measured("fallback to zone b", took, WITHDRAWN)
            assert await discovery.instances(service) == [stable_b]
            # The blocking discovery has a watch of its own: it may see the change later.
            await until(
                lambda: _sync_only(sync, service, {stable_b.id}), WITHDRAWN, "sync fallback to b"
            )
            assert {sync.choose(service).id for _ in range(4)} == {stable_b.id}
            with pytest.raises(NoInstanceAvailable) as info:
                await discovery.choose(service, policy=tagged)
            assert info.value.message.startswith(
                "no healthy instance matching tags canary (1 healthy do not match"
            )

            # Zone a back: preferred again.
            fleet.healthy[canary.id] = fleet.healthy[stable_a.id] = True
            took = await until(
                lambda: _only(discovery, service, {canary.id, stable_a.id}),
                WITHDRAWN,
                "zone a preferred again",
            )
            measured("zone a preferred again", took, WITHDRAWN)
    finally:
        sync.close()


async def _count(discovery: AsyncDiscovery, service: str, n: int) -> bool:
    return len(await discovery.instances(service)) == n


async def _only(discovery: AsyncDiscovery, service: str, wanted: set[str]) -> bool:
    try:
        return set(await ids(discovery, service, 2 * len(wanted) + 2)) == wanted
    except NoInstanceAvailable:
        return False


async def _sync_only(discovery: Discovery, service: str, wanted: set[str]) -> bool:
    def chosen() -> set[str]:
        return {discovery.choose(service).id for _ in range(2 * len(wanted) + 2)}

    try:
        return await asyncio.to_thread(chosen) == wanted
    except NoInstanceAvailable:
        return False


async def _fresh_ids(
    server: ServerProcess, policy: DiscoveryPolicy, service: str, n: int
) -> list[str]:
    """What a fresh AsyncDiscovery answers (round robin from the start, as a fresh sync one)."""
    async with AsyncDiscovery(server.url, policy=policy) as fresh:
        return await ids(fresh, service, n)


async def test_ejection_and_timed_recovery(
    server: ServerProcess, fleet: Fleet, measured: Measured
) -> None:
    service = fleet.service
    pool = [await fleet.add(f"i{n}") for n in range(3)]
    rule = OutlierEjection(consecutive_failures=3, base_time=0.5, max_time=2.0)
    policy = DiscoveryPolicy(outliers=rule)
    bad = pool[1]
    sync = Discovery(server.url, policy=policy)
    try:
        async with AsyncDiscovery(server.url, policy=policy) as discovery:
            await until(lambda: _count(discovery, service, 3), 10, "three instances seen")
            # ejected() agrees with choose(): before its first choice the blocking
            # discovery knows only the endpoints reported (one: never left out).
            await asyncio.to_thread(sync.choose, service)
            for nth in (1, 2):
                # Failures from caller threads, as a blocking client reports them.
                await asyncio.to_thread(_fail, sync, service, bad, 2)
                assert sync.ejected(service) == []
                sync.report(service, bad, False)
                assert sync.ejected(service) == [bad]
                # The async discovery keeps its own count: the same outcomes eject there too.
                for _ in range(3):
                    discovery.report(service, bad, False)
                ejected_at = time.monotonic()
                assert discovery.ejected(service) == [bad]
                # The nth ejection in a row lasts base_time * nth (the multiplier has had
                # no base_time un-ejected to decay between the two).
                assert discovery._outliers.state(service, bad)[1] == nth
                assert bad.id not in await ids(discovery, service, 6)
                assert bad.id not in {sync.choose(service).id for _ in range(6)}
                lasts = rule.duration(nth)
                await until(lambda: _back(discovery, service, bad), lasts + 2.0, "back")
                took = time.monotonic() - ejected_at
                assert took >= lasts - 0.05
                measured(f"ejection {nth} ({lasts:g}s) to back", took, lasts + 1.0)
                # The blocking one was ejected a moment earlier: back already.
                assert sync.ejected(service) == []
                assert bad.id in {sync.choose(service).id for _ in range(6)}
            # A success resets the streak: two failures, a success, two failures: not ejected.
            discovery.report(service, bad, False)
            discovery.report(service, bad, False)
            discovery.report(service, bad, True)
            discovery.report(service, bad, False)
            discovery.report(service, bad, False)
            assert discovery.ejected(service) == []
    finally:
        sync.close()


def _fail(sync: Discovery, service: str, instance: ServiceInstance, n: int) -> None:
    threads = [
        threading.Thread(target=sync.report, args=(service, instance, False)) for _ in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)


async def _back(discovery: AsyncDiscovery, service: str, instance: ServiceInstance) -> bool:
    return discovery.ejected(service) == [] and instance.id in await ids(discovery, service, 3)


class _CountedWatches:
    """Counts the watches a real backend starts (its own watch() does the work)."""

    def __init__(self, backend: Backend) -> None:
        self.count = 0
        original = backend.watch

        def watch(service: str, **kwargs: Any) -> Any:
            self.count += 1
            return original(service, **kwargs)

        backend.watch = watch  # type: ignore[method-assign]


async def test_is_service_starts_no_watch(server: ServerProcess, fleet: Fleet) -> None:
    service = fleet.service
    await fleet.add("x1", zone="a")
    backend = open_backend(server.url, timeout=2)
    watches = _CountedWatches(backend)
    try:
        async with AsyncDiscovery(backend) as discovery:
            await until(lambda: discovery.is_service(service), 5, "listed")
            assert not await discovery.is_service("example-com")
            assert not await discovery.is_service("example.com")
            assert (watches.count, len(discovery._watchers)) == (0, 0)
            await discovery.choose(service)  # a choice does watch: the counter sees it
            assert (watches.count, len(discovery._watchers)) == (1, 1)
    finally:
        await backend.close()
    with Discovery(server.url) as sync:
        # The blocking discovery's own backend (it lives on its loop thread).
        sync_watches = _CountedWatches(sync._async.backend)
        assert sync.is_service(service)
        assert not sync.is_service("example-com")
        assert (sync_watches.count, len(sync._async._watchers)) == (0, 0)
        sync.choose(service)
        assert (sync_watches.count, len(sync._async._watchers)) == (1, 1)


async def test_is_service_raises_the_registry_error(server: ServerProcess) -> None:
    dead = f"{server.name}://127.0.0.1:{free_port()}?timeout=1"
    async with AsyncDiscovery(dead, sync_timeout=2) as discovery:
        started = time.monotonic()
        with pytest.raises(RegistryError):
            await discovery.is_service("orders")
        assert time.monotonic() - started < 2 + 1.5
        assert discovery._watchers == {}


async def test_a_deregistered_ejected_instance_frees_its_slot(
    server: ServerProcess, fleet: Fleet, measured: Measured
) -> None:
    """Issue 16 break-it: an ejected endpoint that left the registry held a slot of the
    percent cap, so a live failing instance could not be ejected."""
    service = fleet.service
    pool = [await fleet.add(f"d{n}") for n in range(3)]
    rule = OutlierEjection(consecutive_failures=3, base_time=60, max_time=60)
    policy = DiscoveryPolicy(outliers=rule)
    sync = Discovery(server.url, policy=policy)
    try:
        async with AsyncDiscovery(server.url, policy=policy) as discovery:
            await until(lambda: _count(discovery, service, 3), 10, "three instances seen")
            await asyncio.to_thread(lambda: _wait_sync(sync, service, 3))
            for client in (discovery, sync):
                for _ in range(3):
                    client.report(service, pool[2], False)
                assert client.ejected(service) == [pool[2]]
            await fleet.registrars[pool[2].id].stop(timeout=5)
            took = await until(lambda: _count(discovery, service, 2), WITHDRAWN, "gone")
            measured("deregistered instance gone from the watch", took, WITHDRAWN)
            await asyncio.to_thread(lambda: _wait_sync(sync, service, 2))
            for client in (discovery, sync):
                assert client.ejected(service) == []  # no candidate any more: not listed
                # No choice in between: report() weighs the current two (a cap of one).
                for _ in range(3):
                    client.report(service, pool[0], False)
                assert client.ejected(service) == [pool[0]]
            assert set(await ids(discovery, service, 4)) == {pool[1].id}
            assert {sync.choose(service).id for _ in range(4)} == {pool[1].id}
    finally:
        sync.close()


def _wait_sync(sync: Discovery, service: str, n: int) -> None:
    deadline = time.monotonic() + WITHDRAWN
    while len(sync.instances(service)) != n:
        assert time.monotonic() < deadline, f"{n} instances not seen within {WITHDRAWN:g}s"
        time.sleep(0.05)


async def test_is_service_shares_one_read_and_caches_a_failure(
    server: ServerProcess, fleet: Fleet
) -> None:
    """Issue 16 break-it: concurrent is_service() calls against a silent registry were
    serialised (5 calls took 5 x sync_timeout) and a refused one was read thousands of
    times a second."""
    service = fleet.service
    await fleet.add("s1")
    bound = 1.0  # sync_timeout
    ((_, port),) = parse_backend_url(server.url, default_port=0).endpoints
    with FaultProxy("127.0.0.1", port) as proxy:
        url = f"{server.name}://{proxy.host}:{proxy.port}"
        async with AsyncDiscovery(url, sync_timeout=bound) as discovery:
            reads = _CountedReads(discovery.backend)
            assert await discovery.is_service(service)
            proxy.blackhole()
            await asyncio.sleep(3.2)  # past the names' cache
            started = time.monotonic()
            results = await asyncio.gather(
                *(discovery.is_service(service) for _ in range(5)), return_exceptions=True
            )
            took = time.monotonic() - started
            assert all(isinstance(r, BackendUnavailable) for r in results), results
            assert took < bound + 1.0, took  # one shared read, not five in a row
            assert reads.count == 2
            # The failure is repeated for a second without asking again...
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await discovery.is_service(service)
            assert time.monotonic() - started < 0.2
            assert reads.count == 2
            # ... then the registry is asked again.
            await asyncio.sleep(1.1)
            proxy.refuse()
            with pytest.raises(RegistryError):
                await discovery.is_service(service)
            assert reads.count == 3
            # Hammered for two seconds while refused: about one read a second.
            started = time.monotonic()
            calls = 0
            while time.monotonic() - started < 2.0:
                with pytest.raises(RegistryError):
                    await discovery.is_service(service)
                calls += 1
                await asyncio.sleep(0)
            assert calls > 100
            assert reads.count <= 3 + 3, reads.count
            assert discovery._watchers == {}
        proxy.blackhole()
        with Discovery(url, sync_timeout=bound) as sync:
            outcomes: list[BaseException | bool] = []

            def ask() -> None:
                try:
                    outcomes.append(sync.is_service(service))
                except Exception as exc:
                    outcomes.append(exc)

            started = time.monotonic()
            threads = [threading.Thread(target=ask) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(bound + 5)
            took = time.monotonic() - started
            assert len(outcomes) == 4
            # The registry's own timeout, never the loop thread's "no answer".
            assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
            assert took < bound + 1.5, took


class _CountedReads:
    """Counts a real backend's services() reads (its own services() does the work)."""

    def __init__(self, backend: Backend) -> None:
        self.count = 0
        original = backend.services  # type: ignore[attr-defined]

        async def services() -> Any:
            self.count += 1
            return await original()

        backend.services = services  # type: ignore[attr-defined]
