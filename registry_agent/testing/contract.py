"""The backend and watcher contracts: the guarantees every backend gives, as pytest suites.

Subclass :class:`BackendContract` in a test module and provide a ``server``
fixture returning a :class:`ServerControl` (a real server for real backends)::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def server(self):
            with MyServer() as server:
                yield server

The suite needs pytest and pytest-asyncio (``asyncio_mode = "auto"``).
Timing bounds derive from :attr:`BackendContract.ttl`; they are generous
limits, not measurements (those live in ``bench/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Protocol

import pytest

from registry_agent import (
    AsyncWatcher,
    Backend,
    BackendUnavailable,
    EventType,
    HealthStatus,
    LeaseLost,
    RetryPolicy,
    ServiceInstance,
    ServiceSnapshot,
    WatchEvent,
    open_backend,
)
from registry_agent.backend import ConnectionAware

__all__ = [
    "BackendContract",
    "ConnectionAwareContract",
    "ServerControl",
    "WatcherContract",
    "eventually",
]


class ServerControl(Protocol):
    """What the contract needs to drive a registry server."""

    @property
    def url(self) -> str:
        """The backend URL, e.g. ``etcd://127.0.0.1:2379``."""
        ...

    def stop(self) -> None:
        """Take the server down, keeping its data."""
        ...

    def start(self) -> None:
        """Bring it back; returns once it serves requests."""
        ...

    def restart(self, *, wipe: bool = False) -> None:
        """Stop and start; ``wipe=True`` loses every registration and lease."""
        ...

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open, nothing answers."""
        ...

    def resume(self) -> None:
        """Unfreeze after :meth:`pause`."""
        ...


async def eventually(
    predicate: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.05
) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails after ``within``."""
    started = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within:.1f}s")
        await asyncio.sleep(interval)


class _ContractFixtures:
    """What both contracts share: settings, the server and backend fixtures, instances."""

    #: TTL used by the tests, seconds (etcd grants at least 2).
    ttl: ClassVar[float] = 2.0
    #: Per-request timeout given to the backend, seconds.
    timeout: ClassVar[float] = 2.0
    #: Extra options for ``open_backend``.
    backend_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def server(self) -> ServerControl:
        raise NotImplementedError("provide a `server` fixture returning a ServerControl")

    @pytest.fixture
    async def backend(self, server: ServerControl) -> AsyncIterator[Backend]:
        backend = open_backend(server.url, timeout=self.timeout, **self.backend_options)
        yield backend
        await backend.close()

    @pytest.fixture
    def service(self) -> str:
        return f"svc-{uuid.uuid4().hex[:8]}"

    def instance(self, service: str, n: int = 1, **fields: Any) -> ServiceInstance:
        fields.setdefault("address", "127.0.0.1")
        fields.setdefault("port", 9000 + n)
        return ServiceInstance(service, id=f"{service}-{n}", **fields)


class ConnectionAwareContract(_ContractFixtures):
    """For backends with the optional :class:`~registry_agent.backend.ConnectionAware`
    capability: ``wait_connection_change`` returns soon after the registry goes away,
    and again soon after it is back (registrars then re-check at once)."""

    async def test_it_declares_the_capability(self, backend: Backend) -> None:
        assert isinstance(backend, ConnectionAware)

    async def test_it_notices_the_registry_going_and_coming_back(
        self, backend: Backend, server: ServerControl
    ) -> None:
        assert isinstance(backend, ConnectionAware)
        bound = self.timeout + 5.0
        change = asyncio.ensure_future(backend.wait_connection_change())
        await asyncio.sleep(0.5)  # the probe holds its request open
        assert not change.done(), "a change reported while nothing changed"
        started = time.monotonic()
        server.stop()
        try:
            async with asyncio.timeout(bound):
                await change
            went = time.monotonic() - started
            change = asyncio.ensure_future(backend.wait_connection_change())
            started = time.monotonic()
        finally:
            server.start()
        async with asyncio.timeout(bound):
            await change
        back = time.monotonic() - started
        assert went < bound, f"the registry's stop noticed after {went:.1f}s"
        assert back < bound, f"the registry's return noticed after {back:.1f}s"


class BackendContract(_ContractFixtures):
    """Tests every backend must pass. Provide the ``server`` fixture."""

    @staticmethod
    async def status_of(backend: Backend, service: str, instance_id: str) -> HealthStatus | None:
        snapshot = await backend.list(service)
        health = snapshot.instances.get(instance_id)
        return None if health is None else health.status

    # -- registration ----------------------------------------------------------

    async def test_register_is_listed_and_passing(self, backend: Backend, service: str) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=self.ttl)
        assert lease.instance == inst
        snapshot = await backend.list(service)
        assert set(snapshot.instances) == {inst.id}
        assert snapshot.instances[inst.id].instance == inst
        assert snapshot.instances[inst.id].healthy
        assert snapshot.healthy() == [inst]

    async def test_register_critical_is_listed_not_passing(
        self, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        await backend.register(inst, ttl=self.ttl, status=HealthStatus.CRITICAL, note="not ready")
        snapshot = await backend.list(service)
        assert snapshot.instances[inst.id].status is HealthStatus.CRITICAL
        assert snapshot.healthy() == []

    async def test_list_holds_only_that_service(self, backend: Backend, service: str) -> None:
        mine = self.instance(service, 1)
        other = self.instance(f"{service}-x", 2)
        await backend.register(mine, ttl=self.ttl)
        await backend.register(other, ttl=self.ttl)
        assert set((await backend.list(service)).instances) == {mine.id}
        assert set((await backend.list(f"{service}-x")).instances) == {other.id}
        assert (await backend.list(f"{service}-none")).instances == {}

    async def test_register_again_replaces_the_entry(self, backend: Backend, service: str) -> None:
        await backend.register(self.instance(service, port=9001), ttl=self.ttl)
        newer = self.instance(service, port=9555, tags=("v2",))
        await backend.register(newer, ttl=self.ttl)
        snapshot = await backend.list(service)
        assert [h.instance for h in snapshot.instances.values()] == [newer]

    async def test_meta_and_tags_round_trip_exactly(self, backend: Backend, service: str) -> None:
        inst = self.instance(
            service,
            tags=("v1", "λ-ünïcode", "with space", "a=b"),
            meta={"version": "1.4.2", "zone": "zürich ✓", "empty": "", "json": '{"a": [1]}'},
        )
        await backend.register(inst, ttl=self.ttl)
        listed = (await backend.list(service)).instances[inst.id].instance
        assert listed == inst
        assert listed.tags == inst.tags
        assert dict(listed.meta) == dict(inst.meta)

    async def test_lookup_reads_our_own_entry(self, backend: Backend, service: str) -> None:
        inst = self.instance(service, meta={"zone": "zürich"})
        lease = await backend.register(inst, ttl=10 * self.ttl)
        found = await backend.lookup(lease)
        assert found is not None
        assert (found.instance, found.status) == (inst, HealthStatus.PASSING)
        await backend.set_status(lease, HealthStatus.CRITICAL, "down")
        found = await backend.lookup(lease)
        assert found is not None
        assert found.status is HealthStatus.CRITICAL
        await backend.deregister(lease)
        assert await backend.lookup(lease) is None

    async def test_lookup_after_the_server_restarts_empty_is_none(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        lease = await backend.register(self.instance(service), ttl=10 * self.ttl)
        server.restart(wipe=True)

        async def gone() -> bool:
            with contextlib.suppress(BackendUnavailable):
                return await backend.lookup(lease) is None
            return False

        await eventually(gone, within=5 * self.timeout, interval=0.2)

    # Connections left in a closed loop can only be dropped; Python warns when it
    # collects them (in dev mode). Collect them here, inside this test's filter.
    @pytest.mark.filterwarnings("ignore::ResourceWarning")
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_usable_from_one_event_loop_after_another(
        self, server: ServerControl, service: str
    ) -> None:
        # Scripts call asyncio.run() more than once with the same backend.
        backend = open_backend(server.url, timeout=self.timeout, **self.backend_options)
        lease = asyncio.run(backend.register(self.instance(service), ttl=10 * self.ttl))
        snapshot = asyncio.run(backend.list(service))
        assert set(snapshot.instances) == {lease.instance.id}
        asyncio.run(backend.deregister(lease))
        asyncio.run(backend.close())
        assert asyncio.run(open_backend(server.url).list(service)).instances == {}
        del backend
        gc.collect()

    # -- heartbeats and TTL ----------------------------------------------------------

    async def test_heartbeats_keep_it_alive_past_three_ttls(
        self, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=self.ttl)
        deadline = time.monotonic() + 3.5 * self.ttl
        while time.monotonic() < deadline:
            await asyncio.sleep(self.ttl / 3)
            await backend.heartbeat(lease)
            assert await self.status_of(backend, service, inst.id) is HealthStatus.PASSING

    async def test_without_heartbeat_it_expires_within_ttl(
        self, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        await backend.register(inst, ttl=self.ttl)
        await asyncio.sleep(self.ttl / 2)
        assert await self.status_of(backend, service, inst.id) is HealthStatus.PASSING

        async def expired() -> bool:
            return await self.status_of(backend, service, inst.id) in (None, HealthStatus.CRITICAL)

        # Consul turns the TTL check critical; etcd and memory drop the key. The slack
        # covers a server's expiry timer running late on a loaded machine (seen: > 1 s).
        await eventually(expired, within=self.ttl / 2 + 2.0)

    async def test_heartbeat_keeps_the_status_it_had(self, backend: Backend, service: str) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=self.ttl)
        await backend.set_status(lease, HealthStatus.CRITICAL, "draining")
        await backend.heartbeat(lease)
        assert await self.status_of(backend, service, inst.id) is HealthStatus.CRITICAL

    async def test_set_status_critical_then_passing(self, backend: Backend, service: str) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=self.ttl)
        await backend.set_status(lease, HealthStatus.CRITICAL, "db down")
        snapshot = await backend.list(service)
        assert snapshot.instances[inst.id].status is HealthStatus.CRITICAL
        assert snapshot.instances[inst.id].instance == inst
        await backend.set_status(lease, HealthStatus.PASSING)
        assert await self.status_of(backend, service, inst.id) is HealthStatus.PASSING

    # -- deregistration ------------------------------------------------------------------

    async def test_deregister_removes_it_and_twice_is_fine(
        self, backend: Backend, service: str
    ) -> None:
        keep = self.instance(service, 1)
        drop = self.instance(service, 2)
        await backend.register(keep, ttl=self.ttl)
        lease = await backend.register(drop, ttl=self.ttl)
        await backend.deregister(lease)
        assert set((await backend.list(service)).instances) == {keep.id}
        await backend.deregister(lease)
        assert set((await backend.list(service)).instances) == {keep.id}

    # -- server failures --------------------------------------------------------------------

    async def test_lease_lost_after_server_restarts_empty(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=10 * self.ttl)
        await backend.heartbeat(lease)
        server.restart(wipe=True)

        lost: list[LeaseLost] = []

        async def heartbeat_raises_lease_lost() -> bool:
            try:
                await backend.heartbeat(lease)
            except LeaseLost as exc:
                lost.append(exc)
                return True
            except BackendUnavailable:
                return False  # the client is still reconnecting
            return False

        await eventually(heartbeat_raises_lease_lost, within=5 * self.timeout, interval=0.2)
        assert (lost[0].service, lost[0].instance) == (service, inst.id)
        with pytest.raises(LeaseLost):
            await backend.set_status(lease, HealthStatus.CRITICAL)
        assert (await backend.list(service)).instances == {}
        # Registering again is the cure.
        lease = await backend.register(inst, ttl=self.ttl)
        await backend.heartbeat(lease)
        assert await self.status_of(backend, service, inst.id) is HealthStatus.PASSING

    async def test_server_down_raises_unavailable_within_timeout(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=10 * self.ttl)
        server.stop()
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: backend.list(service),
            lambda: backend.heartbeat(lease),
            lambda: backend.set_status(lease, HealthStatus.CRITICAL),
            lambda: backend.register(self.instance(service, 2), ttl=self.ttl),
            lambda: backend.deregister(lease),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await asyncio.wait_for(call(), timeout=self.timeout + 2.0)
            assert time.monotonic() - started <= self.timeout + 1.0
        server.start()

        async def back() -> bool:
            with contextlib.suppress(BackendUnavailable):
                await backend.list(service)
                return True
            return False

        await eventually(back, within=5 * self.timeout, interval=0.2)

    async def test_frozen_server_raises_unavailable_within_timeout(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        inst = self.instance(service)
        lease = await backend.register(inst, ttl=10 * self.ttl)
        server.pause()
        try:
            for call in (lambda: backend.heartbeat(lease), lambda: backend.list(service)):
                started = time.monotonic()
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(call(), timeout=self.timeout + 5.0)
                assert time.monotonic() - started <= self.timeout + 1.0
        finally:
            server.resume()

        async def answers() -> bool:
            with contextlib.suppress(BackendUnavailable):
                await backend.heartbeat(lease)
                return True
            return False

        await eventually(answers, within=5 * self.timeout, interval=0.2)
        assert await self.status_of(backend, service, inst.id) is HealthStatus.PASSING

    # -- change stream -------------------------------------------------------------------------

    async def test_watch_reports_each_change(self, backend: Backend, service: str) -> None:
        seen: asyncio.Queue[ServiceSnapshot] = asyncio.Queue()

        async def consume() -> None:
            async for snapshot in backend.watch(service):
                await seen.put(snapshot)

        async def next_state() -> dict[str, HealthStatus]:
            snapshot = await asyncio.wait_for(seen.get(), timeout=5.0)
            return {iid: h.status for iid, h in snapshot.instances.items()}

        task = asyncio.create_task(consume())
        try:
            assert await next_state() == {}
            inst = self.instance(service)
            lease = await backend.register(inst, ttl=10 * self.ttl)
            assert await next_state() == {inst.id: HealthStatus.PASSING}
            await backend.set_status(lease, HealthStatus.CRITICAL, "failing")
            assert await next_state() == {inst.id: HealthStatus.CRITICAL}
            await backend.set_status(lease, HealthStatus.PASSING)
            assert await next_state() == {inst.id: HealthStatus.PASSING}
            moved = self.instance(service, port=9777)
            await backend.register(moved, ttl=10 * self.ttl)
            snapshot = await asyncio.wait_for(seen.get(), timeout=5.0)
            assert snapshot.instances[inst.id].instance.port == 9777
            lease = await backend.register(moved, ttl=10 * self.ttl)
            await backend.deregister(lease)
            # Re-registering an identical entry is no change; the deregistration is.
            assert await next_state() == {}
            assert seen.empty()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_watch_reports_ttl_expiry(self, backend: Backend, service: str) -> None:
        inst = self.instance(service)
        await backend.register(inst, ttl=self.ttl)
        stream = aiter(backend.watch(service))
        try:
            first = await asyncio.wait_for(anext(stream), timeout=5.0)
            assert first.instances[inst.id].healthy
            second = await asyncio.wait_for(anext(stream), timeout=self.ttl + 2.0)
            assert inst.id not in second.instances or not second.instances[inst.id].healthy
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def test_watch_resumes_after_a_snapshot(self, backend: Backend, service: str) -> None:
        a = self.instance(service, 1)
        await backend.register(a, ttl=10 * self.ttl)
        before = await backend.list(service)
        b = self.instance(service, 2)
        await backend.register(b, ttl=10 * self.ttl)
        stream = aiter(backend.watch(service, since=before))
        try:
            resumed = await asyncio.wait_for(anext(stream), timeout=5.0)
            assert set(resumed.instances) == {a.id, b.id}
            assert resumed.index >= before.index
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def test_watch_ends_with_unavailable_when_server_stops(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        stream = aiter(backend.watch(service))
        try:
            await asyncio.wait_for(anext(stream), timeout=5.0)
            server.stop()
            with pytest.raises(BackendUnavailable):
                await asyncio.wait_for(anext(stream), timeout=self.timeout + 5.0)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            server.start()


class WatcherContract(_ContractFixtures):
    """Exact watch events on a backend: provide the ``server`` fixture.

    ``expiry_event`` is what a TTL running out looks like: ``deleted`` where the
    registry drops the entry (etcd, memory), ``offline`` where it keeps it
    critical (Consul).
    """

    expiry_event: ClassVar[EventType] = EventType.DELETED

    @pytest.fixture
    async def watcher(self, server: ServerControl, service: str) -> AsyncIterator[AsyncWatcher]:
        backend = open_backend(server.url, timeout=self.timeout, **self.backend_options)
        watcher = AsyncWatcher(backend, service, retry=RetryPolicy(initial=0.05, cap=0.5))
        yield watcher
        await watcher.close()
        await backend.close()

    @staticmethod
    async def take(
        events: AsyncIterator[WatchEvent], count: int, within: float = 5.0
    ) -> list[tuple[EventType, str, bool]]:
        """The next ``count`` events as (type, id, healthy)."""
        got = []
        for _ in range(count):
            event = await asyncio.wait_for(anext(events), within)
            got.append((event.type, event.instance.id, event.healthy))
        return got

    @staticmethod
    async def nothing_more(events: AsyncIterator[WatchEvent], within: float = 1.0) -> None:
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(anext(events), within)
            pytest.fail(f"unexpected event {extra}")

    async def test_first_snapshot_adds_what_exists(
        self, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        a, b = self.instance(service, 1), self.instance(service, 2)
        await backend.register(a, ttl=10 * self.ttl)
        await backend.register(b, ttl=10 * self.ttl, status=HealthStatus.CRITICAL)
        events = aiter(watcher)
        assert await self.take(events, 3) == [
            (EventType.ADDED, a.id, True),
            (EventType.ADDED, b.id, False),
            (EventType.OFFLINE, b.id, False),
        ]
        assert [h.instance for h in watcher.snapshot()] == [a, b]
        await self.nothing_more(events)

    async def test_each_event_type_from_its_real_trigger(
        self, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        events = aiter(watcher)
        assert await watcher.wait_synced(5)
        inst = self.instance(service, meta={"version": "1"})
        lease = await backend.register(inst, ttl=10 * self.ttl)
        assert await self.take(events, 1) == [(EventType.ADDED, inst.id, True)]
        changed = self.instance(service, meta={"version": "2"})
        lease = await backend.register(changed, ttl=10 * self.ttl)
        event = await asyncio.wait_for(anext(events), 5)
        assert (event.type, event.instance, event.previous) == (EventType.UPDATED, changed, inst)
        await backend.set_status(lease, HealthStatus.CRITICAL, "failing")
        assert await self.take(events, 1) == [(EventType.OFFLINE, inst.id, False)]
        await backend.set_status(lease, HealthStatus.PASSING)
        assert await self.take(events, 1) == [(EventType.ONLINE, inst.id, True)]
        await backend.deregister(lease)
        assert await self.take(events, 1) == [(EventType.DELETED, inst.id, False)]
        await self.nothing_more(events)

    async def test_ttl_expiry_of_the_last_instance_is_reported(
        self, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        inst = self.instance(service)
        registered = time.monotonic()
        await backend.register(inst, ttl=self.ttl)
        events = aiter(watcher)
        assert await self.take(events, 1) == [(EventType.ADDED, inst.id, True)]
        assert await self.take(events, 1, within=self.ttl + 5) == [
            (self.expiry_event, inst.id, False)
        ]
        # etcd checks leases twice a second; a busy machine adds its own delay.
        assert time.monotonic() - registered <= self.ttl + 3.0
        assert not [h for h in watcher.snapshot() if h.healthy]

    async def test_last_instance_going_offline_is_reported(
        self, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        a, b = self.instance(service, 1), self.instance(service, 2)
        lease_a = await backend.register(a, ttl=10 * self.ttl)
        lease_b = await backend.register(b, ttl=10 * self.ttl)
        events = aiter(watcher)
        assert len(await self.take(events, 2)) == 2
        await backend.set_status(lease_a, HealthStatus.CRITICAL)
        await backend.set_status(lease_b, HealthStatus.CRITICAL)
        assert await self.take(events, 2) == [
            (EventType.OFFLINE, a.id, False),
            (EventType.OFFLINE, b.id, False),
        ]
        await backend.deregister(lease_a)
        await backend.deregister(lease_b)
        assert await self.take(events, 2) == [
            (EventType.DELETED, a.id, False),
            (EventType.DELETED, b.id, False),
        ]
        assert watcher.snapshot() == []

    async def test_server_restarted_empty_yields_deleted_then_added(
        self, server: ServerControl, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        a, b = self.instance(service, 1), self.instance(service, 2)
        await backend.register(a, ttl=10 * self.ttl)
        await backend.register(b, ttl=10 * self.ttl)
        events = aiter(watcher)
        assert len(await self.take(events, 2)) == 2
        server.restart(wipe=True)
        assert await self.take(events, 2, within=15) == [
            (EventType.DELETED, a.id, False),
            (EventType.DELETED, b.id, False),
        ]
        await self._register_when_up(backend, a)
        assert await self.take(events, 1, within=10) == [(EventType.ADDED, a.id, True)]
        await self.nothing_more(events)

    async def test_changes_across_a_restart_with_data_yield_exactly_their_events(
        self, server: ServerControl, backend: Backend, watcher: AsyncWatcher, service: str
    ) -> None:
        keep, drop = self.instance(service, 1), self.instance(service, 2)
        keep_lease = await backend.register(keep, ttl=30 * self.ttl)
        lease = await backend.register(drop, ttl=30 * self.ttl)
        # A heartbeat is what makes Consul persist a TTL check's state across restarts.
        await backend.heartbeat(keep_lease)
        await backend.heartbeat(lease)
        events = aiter(watcher)
        assert len(await self.take(events, 2)) == 2
        server.stop()
        await asyncio.sleep(0.5)  # the watcher notices the outage
        server.start()
        # Changes made before the watcher is back must each come through once.
        new = self.instance(service, 3)
        try:
            await backend.deregister(lease)
            await backend.register(new, ttl=30 * self.ttl)
        except LeaseLost:
            pytest.fail("the registry kept no data across its restart")
        got = await self.take(events, 2, within=15)
        assert sorted(got) == sorted(
            [(EventType.DELETED, drop.id, False), (EventType.ADDED, new.id, True)]
        )
        await self.nothing_more(events, within=1.5)
        assert [h.instance.id for h in watcher.snapshot()] == [keep.id, new.id]

    async def test_no_cpu_spin_while_the_server_is_down(
        self, server: ServerControl, backend: Backend, service: str
    ) -> None:
        errors: list[BaseException] = []
        watcher = AsyncWatcher(
            open_backend(server.url, timeout=self.timeout, **self.backend_options),
            service,
            on_error=lambda svc, exc: errors.append(exc),
        )
        await watcher.start()
        assert await watcher.wait_synced(5)
        server.stop()
        try:
            cpu = time.process_time()
            await asyncio.sleep(5.0)
            used = time.process_time() - cpu
        finally:
            server.start()
        assert errors, "the outage was reported through on_error"
        assert all(isinstance(e, BackendUnavailable) for e in errors)
        assert used < 0.5, f"the watcher used {used:.2f}s of CPU during a 5s outage"
        await self._register_when_up(backend, self.instance(service))
        await asyncio.sleep(0.1)
        for _ in range(100):
            if watcher.snapshot():
                break
            await asyncio.sleep(0.1)
        assert [h.instance.id for h in watcher.snapshot()] == [self.instance(service).id]
        await watcher.close()

    async def _register_when_up(self, backend: Backend, inst: ServiceInstance) -> None:
        for _ in range(100):
            try:
                await backend.register(inst, ttl=10 * self.ttl)
                return
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        pytest.fail("the server did not come back")
