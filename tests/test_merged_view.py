"""Several registries at once: the pure merge (MergedView), the watcher and discovery
built on it, and the agent's ``[[backend]]`` tables, on in-memory registries (real
servers: integration/test_merged_view.py, integration/test_agent_multi_backend.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from registry_agent import (
    AsyncDiscovery,
    AsyncWatcher,
    BackendUnavailable,
    ConfigError,
    EventType,
    HealthStatus,
    InstanceHealth,
    ServiceInstance,
    WatchEvent,
)
from registry_agent._agent.config import load_config, parse_config
from registry_agent._agent.runtime import AgentRuntime, open_configured_backends
from registry_agent._events import InstanceMap, MergedView, diff_snapshots, endpoint_key
from registry_agent._models import ServiceSnapshot
from registry_agent._retry import RetryPolicy
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

P, W, C = HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL
FAST = RetryPolicy(initial=0.01, cap=0.05)


def inst(
    port: int, id: str = "", address: str = "10.0.0.1", status: HealthStatus = P, **fields: Any
) -> InstanceHealth:
    instance = ServiceInstance.from_registry(
        service="orders", id=id or f"orders-{port}", address=address, port=port, **fields
    )
    return InstanceHealth(instance, status)


def snap(*healths: InstanceHealth) -> dict[str, InstanceHealth]:
    return {h.instance.id: h for h in healths}


# -- the pure merge -----------------------------------------------------------------


def reference(
    members: Sequence[Mapping[str, InstanceHealth]],
    slots: Mapping[tuple[int, str], str] | None = None,
) -> dict[str, InstanceHealth]:
    """The merge computed from scratch, the way MergedView documents it; ``slots`` gives
    each (member, key) its merged key when a member holds several entries at one
    endpoint (see :class:`Slots`)."""
    merged: dict[str, list[InstanceHealth]] = {}
    for number, members_snapshot in enumerate(members):
        for key in sorted(members_snapshot):
            health = members_snapshot[key]
            where = (slots or {}).get((number, key)) or (
                endpoint_key(health.instance) or f"{health.instance.address} #{number} {key}"
            )
            merged.setdefault(where, []).append(health)
    out = {}
    for where, holders in merged.items():
        shown = holders[0]
        passing = next((h for h in holders if h.healthy), None)
        out[where] = (
            shown if passing is None or shown.healthy else InstanceHealth(shown.instance, P)
        )
    return out


def test_one_instance_in_two_registries_with_different_ids_is_one_entry() -> None:
    view = MergedView(2)
    view.apply(0, snap(inst(80, "consul-id")))
    state = view.apply(1, snap(inst(80, "12345")))  # go-zero: the lease id
    assert list(state) == ["10.0.0.1:80"]
    assert state["10.0.0.1:80"].instance.id == "consul-id"  # the first backend's


def test_moving_between_registries_is_silent_when_fields_agree_and_an_update_otherwise() -> None:
    view = MergedView(2)
    view.apply(0, snap(inst(80)))
    both = view.apply(1, snap(inst(80)))
    assert diff_snapshots({}, both) == [
        WatchEvent(EventType.ADDED, inst(80).instance, True, P, None, 0)
    ]
    # Same fields in both: dropping it from the first changes nothing at all.
    assert view.apply(0, {}) is both
    # Back in the first, then the second drops it: still nothing.
    assert view.apply(0, snap(inst(80))) is both
    assert view.apply(1, {}) is both
    # The second holds it under another id: the shown instance changes when the first drops it.
    view.apply(1, snap(inst(80, "kratos-id", version="v2")))
    before = view.state
    after = view.apply(0, {})
    events = diff_snapshots(before, after)
    assert [e.type for e in events] == [EventType.UPDATED]
    assert events[0].previous == inst(80).instance
    assert events[0].instance.id == "kratos-id"
    # The last one drops it: deleted.
    assert [e.type for e in diff_snapshots(after, view.apply(1, {}))] == [EventType.DELETED]


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        (P, P, P),
        (C, P, P),  # online when any says passing
        (P, C, P),
        (C, C, C),  # offline when all that hold it say not passing: the shown one's status
        (W, C, W),
        (C, None, C),
        (None, W, W),
    ],
)
def test_health_is_passing_when_any_registry_says_passing(
    first: HealthStatus | None, second: HealthStatus | None, status: HealthStatus
) -> None:
    view = MergedView(2)
    if first is not None:
        view.apply(0, snap(inst(80, "a", status=first)))
    if second is not None:
        view.apply(1, snap(inst(80, "b", status=second)))
    (health,) = view.state.values()
    assert health.status is status
    assert health.instance.id == ("a" if first is not None else "b")


def test_endpoints_compare_without_case_or_brackets_and_portless_entries_never_merge() -> None:
    view = MergedView(2)
    view.apply(0, snap(inst(80, "x", address="Host.Example"), inst(0, "p", address="h")))
    state = view.apply(1, snap(inst(80, "y", address="host.example"), inst(0, "p", address="h")))
    assert sorted(state) == ["h #0 p", "h #1 p", "host.example:80"]
    view6 = MergedView(2)
    view6.apply(0, snap(inst(80, "x", address="[::1]")))
    assert list(view6.apply(1, snap(inst(80, "y", address="::1")))) == ["::1:80"]


def test_a_changed_port_moves_the_entry() -> None:
    view = MergedView(2)
    view.apply(0, snap(inst(80, "a")))
    before = view.state
    after = view.apply(0, snap(inst(81, "a")))
    assert [(e.type, e.instance.port) for e in diff_snapshots(before, after)] == [
        (EventType.DELETED, 80),
        (EventType.ADDED, 81),
    ]


def test_two_entries_of_one_registry_at_one_endpoint_stay_two_entries() -> None:
    # Consul: d1 (weight 1) and d2 (weight 5) both on one address:port; an empty
    # second registry must not hide d2 (tester script /tmp/break14b/s5_dups.py).
    d1 = inst(80, "d1", meta={"weight": "1"})
    d2 = inst(80, "d2", status=C, meta={"weight": "5"})
    view = MergedView(2)
    view.apply(1, {})
    state = view.apply(0, snap(d2, d1))
    assert dict(state) == {"10.0.0.1:80": d1, "10.0.0.1:80 #2": d2}
    # The other registry's entry at that endpoint merges with the first key only.
    state = view.apply(1, snap(inst(80, "x")))
    assert dict(state) == {"10.0.0.1:80": d1, "10.0.0.1:80 #2": d2}
    # Deregistering d1 deletes its entry (the other registry's copy now shows)...
    before = state
    state = view.apply(0, snap(d2))
    assert [(e.type, e.instance.id) for e in diff_snapshots(before, state)] == [
        (EventType.UPDATED, "x")
    ]
    view.apply(1, {})
    assert dict(view.state) == {"10.0.0.1:80 #2": d2}
    # ...and with a single member it reads as deleted, d2 keeping its key and meta.
    alone = MergedView(1)
    alone.apply(0, snap(d1, d2))
    before = alone.state
    after = alone.apply(0, snap(d2))
    assert [(e.type, e.instance.id) for e in diff_snapshots(before, after)] == [
        (EventType.DELETED, "d1")
    ]
    assert after["10.0.0.1:80 #2"].instance.meta == {"weight": "5"}
    # An entry changed in place keeps its key; a freed key goes to the next arrival.
    after = alone.apply(0, snap(inst(80, "d2", meta={"weight": "6"})))
    assert after["10.0.0.1:80 #2"].instance.meta == {"weight": "6"}
    after = alone.apply(0, snap(inst(80, "d2", meta={"weight": "6"}), inst(80, "d3")))
    assert sorted(after) == ["10.0.0.1:80", "10.0.0.1:80 #2"]
    assert after["10.0.0.1:80"].instance.id == "d3"


class Slots:
    """A naive replay of MergedView's key assignment: an arriving entry takes its
    endpoint's first key (``E``, ``E #2``…) its member does not hold; it keeps it
    while it stays at that endpoint."""

    def __init__(self) -> None:
        self.of: dict[tuple[int, str], str] = {}

    def apply(
        self, member: int, old: Mapping[str, InstanceHealth], new: Mapping[str, InstanceHealth]
    ) -> None:
        for key in sorted(old.keys() | new.keys()):
            before, after = old.get(key), new.get(key)
            if before is not None and (
                after is None
                or endpoint_key(before.instance) != endpoint_key(after.instance)
                or (
                    endpoint_key(after.instance) is None
                    and before.instance.address != after.instance.address
                )
            ):
                self.of.pop((member, key), None)
        for key in sorted(new):
            endpoint = endpoint_key(new[key].instance)
            if (member, key) in self.of or endpoint is None:
                continue
            taken = {slot for (m, _), slot in self.of.items() if m == member}
            n = 1
            while (slot := endpoint if n == 1 else f"{endpoint} #{n}") in taken:
                n += 1
            self.of[(member, key)] = slot


def test_random_sequences_match_the_merge_from_scratch_and_diffs_touch_only_changes() -> None:
    rng = random.Random(14)
    members = 3
    view = MergedView(members)
    slots = Slots()
    current: list[dict[str, InstanceHealth]] = [{} for _ in range(members)]
    for _ in range(3000):
        member = rng.randrange(members)
        new = dict(current[member])
        for _ in range(rng.randint(1, 3)):
            key = f"k{rng.randrange(8)}"
            if rng.random() < 0.3:
                new.pop(key, None)
            else:
                new[key] = inst(
                    rng.choice([0, 80, 81, 82]),
                    key,
                    address=rng.choice(["a", "A", "b"]),
                    status=rng.choice([P, P, C]),
                    tags=rng.choice([(), ("x",)]),
                )
        slots.apply(member, current[member], new)
        current[member] = new
        # Members give plain mappings or InstanceMaps evolved from their last one.
        given: Mapping[str, InstanceHealth] = InstanceMap(new) if rng.random() < 0.5 else dict(new)
        before = view.state
        after = view.apply(member, given)
        assert dict(after) == reference(current, slots.of)
        if after is not before:
            assert after.changed_since(before) is not None  # the watcher's diff is O(changes)


def test_a_merged_view_needs_a_member() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        MergedView(0)


# -- the watcher and discovery over several in-memory registries ----------------------


@pytest.fixture
def registries() -> tuple[MemoryRegistry, MemoryRegistry]:
    tag = uuid.uuid4().hex
    return MemoryRegistry.named(f"a-{tag}"), MemoryRegistry.named(f"b-{tag}")


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def collect(events: list[WatchEvent], watcher: AsyncWatcher) -> None:
    async for event in watcher:
        events.append(event)


async def quiet(events: list[WatchEvent], seconds: float = 0.2) -> list[WatchEvent]:
    """The events that arrive in the next ``seconds`` (watch loops here react in ms)."""
    count = len(events)
    await asyncio.sleep(seconds)
    return events[count:]


async def test_watcher_over_two_registries_adds_once_and_deletes_when_the_last_drops_it(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    lease_a = a.put(inst(8080, "orders-1"), ttl=600)
    lease_b = b.put(inst(8080, "7587869934572"), ttl=600)  # another format's id
    events: list[WatchEvent] = []
    async with AsyncWatcher([a.url, b.url], "orders", retry=FAST) as watcher:
        assert watcher.backends[0] is watcher.backend
        assert len(watcher.backends) == 2
        assert await watcher.wait_synced(5)
        consumer = asyncio.create_task(collect(events, watcher))
        await wait_until(lambda: len(events) == 1)
        assert await quiet(events) == []
        assert events[0].type is EventType.ADDED
        assert events[0].instance.id == "orders-1"
        a.delete("orders", "orders-1", lease_a)
        # Shown from the second now, under its id: one update, never deleted + added.
        await wait_until(lambda: len(events) == 2)
        assert events[1].type is EventType.UPDATED
        assert events[1].instance.id == "7587869934572"
        assert [h.instance.id for h in watcher.snapshot()] == ["7587869934572"]
        b.delete("orders", "7587869934572", lease_b)
        await wait_until(lambda: len(events) == 3)
        assert events[2].type is EventType.DELETED
        assert await quiet(events) == []
        consumer.cancel()


async def test_a_registry_that_is_down_keeps_its_instances_and_health_merges(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    a.put(inst(8080, "one", status=C), ttl=600)
    b.put(inst(8080, "one"), ttl=600)
    b.put(inst(9090, "two"), ttl=600)
    errors: list[BaseException] = []
    events: list[WatchEvent] = []
    watcher = AsyncWatcher(
        [a.url, b.url], "orders", retry=FAST, on_error=lambda _, e: errors.append(e)
    )
    async with watcher:
        consumer = asyncio.create_task(collect(events, watcher))
        await wait_until(lambda: len(events) == 2)
        assert await quiet(events) == []
        assert {(e.type, e.instance.id, e.healthy) for e in events} == {
            (EventType.ADDED, "one", True),  # critical in a, passing in b: passing
            (EventType.ADDED, "two", True),
        }
        b.stop()
        await wait_until(lambda: bool(errors))
        # b is down: what it held stays, with the health it last reported.
        assert await quiet(events) == []
        assert [(h.instance.id, h.healthy) for h in watcher.snapshot()] == [
            ("one", True),
            ("two", True),
        ]
        b.start()
        b.delete("orders", "one", None)
        # Now only a holds "one", and a says critical.
        await wait_until(lambda: len(events) == 3)
        assert (events[2].type, events[2].instance.id) == (EventType.OFFLINE, "one")
        consumer.cancel()


async def test_synced_when_one_registry_answers_and_the_other_has_failed(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    a.stop()
    b.put(inst(8080), ttl=600)
    async with AsyncWatcher([a.url, b.url], "orders", retry=FAST) as watcher:
        assert await watcher.wait_synced(5)
        assert [h.instance.port for h in watcher.snapshot()] == [8080]
    # Neither answers: never synced.
    b.stop()
    async with AsyncWatcher([a.url, b.url], "orders", retry=FAST) as watcher:
        assert not await watcher.wait_synced(0.3)


async def test_slow_consumer_over_two_registries_ends_at_the_merged_state(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    leases = {(r, n): r.put(inst(9000 + n, f"o{n}"), ttl=600) for r in (a, b) for n in range(20)}
    watcher = AsyncWatcher([a.url, b.url], "orders", retry=FAST)
    known: dict[str, tuple[ServiceInstance, bool]] = {}

    def key(event: WatchEvent) -> str:
        return f"{event.instance.address}:{event.instance.port}"

    async def consume() -> None:
        async for event in watcher:
            k = key(event)
            if event.type is EventType.ADDED:
                assert k not in known, f"added twice: {event}"
                known[k] = (event.instance, True)  # offline follows when it is not passing
            elif event.type is EventType.DELETED:
                del known[k]
            elif event.type is EventType.UPDATED:
                assert known[k][0] == event.previous
                known[k] = (event.instance, known[k][1])
            else:
                assert known[k][1] is (event.type is EventType.OFFLINE), event
                known[k] = (known[k][0], event.healthy)
            await asyncio.sleep(0.002)

    def merged() -> dict[str, tuple[ServiceInstance, bool]]:
        return {
            f"{h.instance.address}:{h.instance.port}": (h.instance, h.healthy)
            for h in watcher.snapshot()
        }

    rng = random.Random(5)
    async with watcher:
        consumer = asyncio.create_task(consume())
        for i in range(600):
            registry = rng.choice((a, b))
            n = rng.randrange(20)
            if rng.random() < 0.2:
                registry.delete("orders", f"o{n}", None)
            else:
                health = inst(9000 + n, f"o{n}", meta={"v": str(i)}, status=rng.choice([P, C]))
                leases[(registry, n)] = registry.put(health, ttl=600)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await wait_until(lambda: known == merged() and merged() == _reference_of(a, b), 10)
        assert not consumer.done()
        consumer.cancel()


def _reference_of(*registries: MemoryRegistry) -> dict[str, tuple[ServiceInstance, bool]]:
    merged = reference([dict(r.snapshot("orders").instances) for r in registries])
    return {k: (h.instance, h.healthy) for k, h in merged.items()}


async def test_discovery_over_two_registries_chooses_from_the_merged_view(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    a.put(inst(8080, "one", status=C), ttl=600)
    b.put(inst(8080, "one-b"), ttl=600)
    b.put(inst(8081, "two", status=C), ttl=600)
    async with AsyncDiscovery([a.url, b.url], retry=FAST) as discovery:
        assert [i.id for i in await discovery.instances("orders")] == ["one"]
        assert [i.id for i in await discovery.instances("orders", healthy_only=False)] == [
            "one",
            "two",
        ]
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"one"}


class SilentBackend(MemoryBackend):
    """A registry behind a black hole: its watch neither answers nor fails."""

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        await asyncio.Event().wait()
        yield ServiceSnapshot(service, 0)  # pragma: no cover - never reached


async def test_discovery_waits_for_a_silent_registry_once_then_serves_the_others(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries
    a.put(inst(8080, "one"), ttl=600)
    async with AsyncDiscovery([a.url, SilentBackend(b)], sync_timeout=0.3) as discovery:
        started = time.monotonic()
        assert [i.id for i in await discovery.instances("orders")] == ["one"]
        assert 0.3 <= time.monotonic() - started < 3
        started = time.monotonic()
        assert (await discovery.choose("orders")).id == "one"
        assert time.monotonic() - started < 0.2  # waited for once, not on every call
    # Nobody answers: the first call still fails, naming the timeout.
    with pytest.raises(BackendUnavailable, match=r"any of the registries within 0\.3s"):
        async with AsyncDiscovery([SilentBackend(a), SilentBackend(b)], sync_timeout=0.3) as d:
            await d.instances("orders")


async def test_a_list_of_one_backend_is_that_backend(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, _ = registries
    a.put(inst(8080, "one"), ttl=600)
    a.put(inst(8080, "two"), ttl=600)  # not merged: one backend keeps the registry's keys
    async with AsyncWatcher([a.url], "orders", retry=FAST) as watcher:
        assert await watcher.wait_synced(5)
        assert [h.instance.id for h in watcher.snapshot()] == ["one", "two"]


@pytest.mark.parametrize(
    ("backend", "field", "words"),
    [
        ([], "backend", "empty list"),
        (["memory://x", "memory://x"], "backend[1]", "listed twice"),
    ],
)
def test_bad_backend_lists_are_refused_naming_the_entry(
    backend: list[str], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        AsyncWatcher(backend, "orders")
    assert caught.value.field == field
    assert words in str(caught.value)
    with pytest.raises(ConfigError):
        AsyncDiscovery(backend)


# -- the agent's [[backend]] tables ----------------------------------------------------

SERVICE = """
[status]
listen = "off"

[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
ttl = "2s"
"""


def agent_file(tmp_path: Path, backends: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(backends) + SERVICE)
    return path


def test_several_backend_tables_each_with_its_own_options(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    path = agent_file(
        tmp_path,
        """
        [[backend]]
        url = "consul://127.0.0.1:8500"
        token_file = "token"

        [[backend]]
        url = "etcd://127.0.0.1:2379"
        format = "go-zero"
        """,
    )
    config = load_config(path, env={})
    assert [b.url for b in config.backends] == ["consul://127.0.0.1:8500", "etcd://127.0.0.1:2379"]
    assert config.backend is config.backends[0]
    assert config.backends[0].options() == {"token": "s3cret"}
    assert config.backends[1].options() == {"format": "go-zero"}
    assert "s3cret" in config.secrets()
    consul, etcd = open_configured_backends(config)
    assert (consul.scheme, etcd.scheme) == ("consul", "etcd")
    assert "go-zero" in repr(etcd)
    # The single table is one backend, as always.
    single = parse_config({"backend": {"url": "etcd://h:1"}, "service": [{"name": "a", "port": 1}]})
    assert [b.url for b in single.backends] == ["etcd://h:1"]


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        (
            '[backend]\nurl = "consul://h:1"\n[[backend]]\nurl = "etcd://h:2"\n',
            "agent.toml:3: backend: give one [backend] table or several [[backend]] tables",
        ),
        (
            '[[backend]]\nurl = "etcd://h:2"\n[backend]\nurl = "consul://h:1"\n',
            "agent.toml:3: backend: give one [backend] table or several [[backend]] tables",
        ),
        (
            'backend = { url = "consul://h:1" }\n[[backend]]\nurl = "etcd://h:2"\n',
            "agent.toml:2: backend: give one [backend] table or several [[backend]] tables",
        ),
        (
            '[[backend]]\nurl = "consul://h:1"\n[[backend]]\nurl = "etcd://h:2"\nnope = 1\n',
            "agent.toml: backend[1].nope: unknown option(s) 'nope'",
        ),
        (
            '[[backend]]\nurl = "consul://h:1"\n[[backend]]\nurl = "consul://h:1"\n',
            "agent.toml: backend[1].url: the same registry as backend[0]",
        ),
        (
            '[[backend]]\nurl = "consul://h:1"\n[[backend]]\nurl = "zk://h:2"\n',
            "agent.toml: backend[1].url: no backend for scheme 'zk'",
        ),
        (
            '[[backend]]\nurl = "consul://h:1"\n[[backend]]\nformat = "kratos"\n',
            "agent.toml: backend[1].url: is required",
        ),
        ("backend = []\n", "agent.toml: backend: expected at least one [[backend]] table"),
    ],
)
def test_backend_table_errors_name_the_file_and_the_key(
    tmp_path: Path, backends: str, message: str
) -> None:
    path = agent_file(tmp_path, backends)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{tmp_path}/{message}"), str(caught.value)


@pytest.mark.parametrize(
    "variable", ["REGISTRY_AGENT_BACKEND", "REGISTRY_AGENT_TOKEN", "REGISTRY_AGENT_CA_FILE"]
)
def test_backend_environment_overrides_are_refused_beside_backend_tables(
    tmp_path: Path, variable: str
) -> None:
    path = agent_file(
        tmp_path, '[[backend]]\nurl = "consul://h:1"\n[[backend]]\nurl = "etcd://h:2"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={variable: "x"})
    assert f"{variable} sets a key of the single [backend] table" in str(caught.value)
    assert "[[backend]]" in str(caught.value)
    # Settings that are not the backend's still apply.
    config = load_config(path, env={"REGISTRY_AGENT_LOG_LEVEL": "debug"})
    assert config.log_level == "debug"


async def test_the_agent_registers_in_every_backend_and_stays_ready_while_one_is_down(
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex
    first, second = MemoryRegistry.named(f"agent-a-{tag}"), MemoryRegistry.named(f"agent-b-{tag}")
    path = agent_file(
        tmp_path, f'[[backend]]\nurl = "{first.url}"\n[[backend]]\nurl = "{second.url}"\n'
    )
    runtime = AgentRuntime(load_config(path, env={}))
    runtime._turn = asyncio.Lock()
    runtime.backends = open_configured_backends(runtime.config)
    try:
        for service in runtime.config.services:
            await runtime._start_service(service)
        await wait_until(
            lambda: all(r.snapshot("orders").instances for r in (first, second)), within=5
        )
        await wait_until(lambda: runtime._readyz()[0] == 200)
        status = runtime.status()
        assert status["agent"]["backends"] == [first.url + ":0", second.url + ":0"]
        (service,) = status["services"]
        assert [(b["name"], b["registered"]) for b in service["backends"]] == [
            (f"{first.url}:0", True),
            (f"{second.url}:0", True),
        ]
        metrics = runtime.metrics.render().decode()
        for registry in (first, second):
            labels = f'backend="{registry.url}:0",instance_id="orders-1",service="orders"'
            assert f"registry_agent_backend_ready{{{labels}}} 1.0" in metrics
        assert 'registry_agent_ready{instance_id="orders-1",service="orders"} 1.0' in metrics

        # The second registry down for longer than the TTL: still ready on the first.
        second.stop()
        await wait_until(lambda: not runtime.snapshots()["orders/orders-1"].backends[1].registered)
        code, _, body = runtime._readyz()
        assert code == 200, body
        metrics = runtime.metrics.render().decode()
        labels = f'backend="{second.url}:0",instance_id="orders-1",service="orders"'
        assert f"registry_agent_backend_registered{{{labels}}} 0.0" in metrics
        assert 'registry_agent_ready{instance_id="orders-1",service="orders"} 1.0' in metrics

        # Both down: not ready, and /readyz says why for each.
        first.stop()
        await wait_until(lambda: runtime._readyz()[0] == 503)
        reasons = json.loads(runtime._readyz()[2])["not_ready"]["orders/orders-1"]["backends"]
        assert list(reasons) == [f"{first.url}:0", f"{second.url}:0"]
        assert all(reasons.values())
        first.start()
        second.start()
        await wait_until(lambda: runtime._readyz()[0] == 200)
    finally:
        await runtime.shutdown()
    assert not first.snapshot("orders").instances
    assert not second.snapshot("orders").instances


async def test_a_reload_adds_and_drops_backends_keeping_the_unchanged_ones(
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex
    first, second = MemoryRegistry.named(f"reload-a-{tag}"), MemoryRegistry.named(f"reload-b-{tag}")
    one = f'[[backend]]\nurl = "{first.url}"\n'
    two = f'[[backend]]\nurl = "{second.url}"\n'
    path = agent_file(tmp_path, one)
    runtime = AgentRuntime(load_config(path, env={}))
    runtime._turn = asyncio.Lock()
    runtime.backends = open_configured_backends(runtime.config)
    kept = runtime.backends[0]

    def holds(registry: MemoryRegistry) -> bool:
        return bool(registry.snapshot("orders").instances)

    try:
        for service in runtime.config.services:
            await runtime._start_service(service)
        await wait_until(lambda: holds(first))
        # A second registry added: registered there too, the first backend object kept.
        path.write_text(one + two + SERVICE)
        await runtime.reload()
        assert runtime.backends[0] is kept
        assert len(runtime.backends) == 2
        await wait_until(lambda: holds(first) and holds(second))
        # The first dropped: its entry removed, the second keeps the service.
        path.write_text(two + SERVICE)
        await runtime.reload()
        assert runtime.backends[0] is not kept
        await wait_until(lambda: not holds(first) and holds(second))
        assert runtime.reloads == 2
        # A file the reload refuses changes nothing.
        path.write_text(two + two + SERVICE)
        await runtime.reload()
        assert runtime.reloads == 2
        assert holds(second)
    finally:
        await runtime.shutdown()
    assert not holds(second)


def test_members_are_named_without_credentials(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    a, b = registries

    class Named(MemoryBackend):
        def __repr__(self) -> str:
            return "Named(memory://user:secret@somewhere)"

    watcher = AsyncWatcher(
        ["etcd://alice:pw@127.0.0.1:1?format=kratos", "etcd://127.0.0.1:1", Named(a), b.url],
        "orders",
    )
    assert [m.label for m in watcher._members] == [
        "etcd://127.0.0.1:1 (backend[0])",
        "etcd://127.0.0.1:1 (backend[1])",
        "Named(memory://***@somewhere)",
        f"{b.url}:0",
    ]
    assert "pw" not in watcher._where("orders", 0)


async def test_two_instances_of_one_registry_on_one_endpoint_survive_an_empty_second(
    registries: tuple[MemoryRegistry, MemoryRegistry],
) -> None:
    # /tmp/break14b/s5_dups.py: Consul d1 (weight 1) and d2 (weight 5) on 10.0.0.7:7000;
    # adding an empty etcd hid d2, and deregistering d1 read as updated (shown as d2).
    a, b = registries
    lease_1 = a.put(inst(7000, "d1", address="10.0.0.7", meta={"weight": "1"}), ttl=600)
    a.put(inst(7000, "d2", address="10.0.0.7", meta={"weight": "5"}), ttl=600)
    events: list[WatchEvent] = []
    async with AsyncWatcher([a.url, b.url], "orders", retry=FAST) as watcher:
        assert await watcher.wait_synced(5)
        consumer = asyncio.create_task(collect(events, watcher))
        await wait_until(lambda: len(events) == 2)
        assert [h.instance.meta["weight"] for h in watcher.snapshot()] == ["1", "5"]
        a.delete("orders", "d1", lease_1)
        await wait_until(lambda: len(events) == 3)
        assert (events[2].type, events[2].instance.id) == (EventType.DELETED, "d1")
        assert await quiet(events) == []
        assert [h.instance.id for h in watcher.snapshot()] == ["d2"]
        consumer.cancel()
    discovery = AsyncDiscovery([a.url, b.url], retry=FAST)
    try:
        a.put(inst(7000, "d3", address="10.0.0.7"), ttl=600)
        assert sorted(i.id for i in await discovery.instances("orders")) == ["d2", "d3"]
    finally:
        await discovery.close()
