"""The snapshot diff (every case of the event table, exactly) and the coalescing backlog."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry_agent import EventType, HealthStatus, InstanceHealth, ServiceInstance, WatchEvent
from registry_agent._events import Backlog, InstanceMap, changed_ids, diff_snapshots

A = ServiceInstance("orders", address="10.0.0.1", port=80, id="a")
A2 = ServiceInstance("orders", address="10.0.0.1", port=80, id="a", meta={"v": "2"})
B = ServiceInstance("orders", address="10.0.0.2", port=80, id="b")
P, C, W = HealthStatus.PASSING, HealthStatus.CRITICAL, HealthStatus.WARNING


def snap(*entries: tuple[ServiceInstance, HealthStatus]) -> dict[str, InstanceHealth]:
    return {inst.id: InstanceHealth(inst, status) for inst, status in entries}


def kinds(
    old: dict[str, InstanceHealth], new: dict[str, InstanceHealth]
) -> list[tuple[str, str, bool]]:
    return [(str(e.type), e.instance.id, e.healthy) for e in diff_snapshots(old, new)]


def test_nothing_changed() -> None:
    assert kinds(snap((A, P)), snap((A, P))) == []
    assert kinds({}, {}) == []


def test_added_passing_and_not_passing() -> None:
    assert kinds({}, snap((A, P))) == [("added", "a", True)]
    assert kinds({}, snap((A, C))) == [("added", "a", False), ("offline", "a", False)]
    assert kinds({}, snap((A, W))) == [("added", "a", False), ("offline", "a", False)]


def test_deleted_carries_the_old_instance() -> None:
    events = diff_snapshots(snap((A, P)), {}, index=7)
    assert [(e.type, e.instance, e.healthy, e.index) for e in events] == [
        (EventType.DELETED, A, False, 7)
    ]


def test_updated_carries_the_previous_instance() -> None:
    (event,) = diff_snapshots(snap((A, P)), snap((A2, P)))
    assert (event.type, event.instance, event.previous, event.healthy) == (
        EventType.UPDATED,
        A2,
        A,
        True,
    )


def test_offline_and_online() -> None:
    assert kinds(snap((A, P)), snap((A, C))) == [("offline", "a", False)]
    assert kinds(snap((A, C)), snap((A, P))) == [("online", "a", True)]
    assert kinds(snap((A, C)), snap((A, W))) == []  # still not passing: no event


def test_fields_and_health_together_give_updated_then_health() -> None:
    assert kinds(snap((A, P)), snap((A2, C))) == [("updated", "a", False), ("offline", "a", False)]
    assert kinds(snap((A, C)), snap((A2, P))) == [("updated", "a", True), ("online", "a", True)]


def test_the_last_instance_going_offline_or_away_is_reported() -> None:
    assert kinds(snap((A, P)), snap((A, C))) == [("offline", "a", False)]
    assert kinds(snap((A, P)), {}) == [("deleted", "a", False)]


def test_many_changes_are_ordered_by_id() -> None:
    old = snap((A, P), (B, P))
    new = snap((A, C))
    assert kinds(old, new) == [("offline", "a", False), ("deleted", "b", False)]


def test_event_to_dict() -> None:
    (event,) = diff_snapshots({}, snap((A, P)), index=3)
    assert event.to_dict() == {
        "type": "added",
        "service": "orders",
        "id": "a",
        "address": "10.0.0.1",
        "port": 80,
        "tags": [],
        "meta": {},
        "healthy": True,
        "status": "passing",
        "index": 3,
    }
    assert event.service == "orders"


# -- the backlog: one consumer's coalesced view -------------------------------------

Key = tuple[str, str]


class Feed:
    """A watcher in miniature: the current snapshot, and the backlogs it reports changes to."""

    def __init__(self) -> None:
        self.state: dict[str, InstanceHealth] = {}
        self.index = 0
        self.clock = 0.0

    def publish(self, new: dict[str, InstanceHealth], *backlogs: Backlog[Key]) -> None:
        self.index += 1
        old, self.state = self.state, dict(new)
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                for backlog in backlogs:
                    backlog.changed(("orders", key), new.get(key), self.clock)

    def current(self, key: Key) -> tuple[InstanceHealth | None, int]:
        return self.state.get(key[1]), self.index

    def take(self, backlog: Backlog[Key], count: int | None = None) -> list[WatchEvent]:
        got: list[WatchEvent] = []
        while count is None or len(got) < count:
            event = backlog.pop(self.current)
            if event is None:
                break
            got.append(event)
        return got


class Replay:
    """What a consumer knows after its events; fails on any event illegal where it comes."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[ServiceInstance, bool]] = {}
        self.expect_health: str | None = None  # an id whose online/offline must come next

    def apply(self, event: WatchEvent) -> None:
        iid = event.instance.id
        if self.expect_health is not None:
            assert iid == self.expect_health, f"{event} instead of its health event"
            assert event.type in (EventType.ONLINE, EventType.OFFLINE), event
            self.expect_health = None
        before = self.known.get(iid)
        if event.type is EventType.ADDED:
            assert before is None, f"added twice: {event}"
            self.known[iid] = (event.instance, True)
            if not event.healthy:
                self.expect_health = iid
            return
        assert before is not None, f"{event.type} for an instance never added: {event}"
        instance, online = before
        if event.type is EventType.DELETED:
            assert event.instance == instance
            del self.known[iid]
        elif event.type is EventType.UPDATED:
            assert event.previous == instance, event
            assert event.instance != instance, event
            self.known[iid] = (event.instance, online)
            if event.healthy != online:  # the health after the update: its event comes next
                self.expect_health = iid
            return
        else:
            assert event.instance == instance
            assert online is (event.type is EventType.OFFLINE), f"{event} when online={online}"
            self.known[iid] = (instance, not online)
        assert event.healthy == self.known.get(iid, (None, False))[1]

    def state(self) -> dict[str, tuple[ServiceInstance, bool]]:
        assert self.expect_health is None
        return self.known


def test_backlog_of_a_fast_consumer_gives_the_diff() -> None:
    feed, backlog = Feed(), Backlog[Key]()
    feed.publish(snap((A, P), (B, C)), backlog)
    assert [(e.type, e.instance.id) for e in feed.take(backlog)] == [
        (EventType.ADDED, "a"),
        (EventType.ADDED, "b"),
        (EventType.OFFLINE, "b"),
    ]
    feed.publish(snap((A2, C), (B, C)), backlog)
    (updated, offline) = feed.take(backlog)
    assert (updated.type, updated.previous, offline.type, offline.index) == (
        EventType.UPDATED,
        A,
        EventType.OFFLINE,
        2,
    )
    assert backlog.pop(feed.current) is None


def test_backlog_coalesces_what_the_consumer_has_not_taken() -> None:
    feed, backlog = Feed(), Backlog[Key]()
    feed.publish(snap((A, P)), backlog)
    assert len(feed.take(backlog)) == 1
    for _ in range(1000):  # flapping, then back where the consumer last looked
        feed.publish(snap((A, C)), backlog)
        feed.publish(snap((A2, P)), backlog)
        feed.publish(snap((A, P)), backlog)
    assert backlog.pending == 0
    assert feed.take(backlog) == []
    feed.publish(snap((A2, C)), backlog)
    feed.publish(snap((A2, C), (B, P)), backlog)
    feed.publish(snap((B, C)), backlog)
    assert backlog.pending == 2
    assert [(str(e.type), e.instance.id) for e in feed.take(backlog)] == [
        ("deleted", "a"),  # the oldest change first
        ("added", "b"),
        ("offline", "b"),
    ]


def test_backlog_forgets_an_instance_added_and_gone_before_it_looked() -> None:
    feed, backlog = Feed(), Backlog[Key]()
    for n in range(500):
        churn = ServiceInstance("orders", address="10.0.0.9", port=80, id=f"c{n}")
        feed.publish(snap((churn, P)), backlog)
        feed.publish({}, backlog)
    assert backlog.pending == 0
    assert feed.take(backlog) == []


def test_backlog_lag_is_reported_once_per_episode() -> None:
    feed, backlog = Feed(), Backlog[Key]()
    feed.publish(snap((A, P)), backlog)
    assert backlog.lag_change(feed.clock + 4.9, 5.0) is None
    assert backlog.lag(feed.clock + 4.9) == pytest.approx(4.9)
    assert backlog.lag_change(feed.clock + 5.0, 5.0) is True
    feed.clock += 6
    feed.publish(snap((A, C)), backlog)
    assert backlog.lag_change(feed.clock + 60, 5.0) is None  # still the same episode
    feed.take(backlog, 1)  # "added"; "offline" still waits
    assert backlog.lag_change(feed.clock + 60, 5.0) is None
    feed.take(backlog)
    assert backlog.lag_change(feed.clock + 60, 5.0) is False
    assert backlog.lag_change(feed.clock + 60, 5.0) is None
    assert backlog.lag(feed.clock) == 0.0


VARIANTS = [
    ServiceInstance("orders", address="10.0.0.1", port=80, id=f"i{n}", meta={"v": str(v)})
    for n in range(4)
    for v in range(3)
]

snapshots = st.lists(
    st.dictionaries(
        st.sampled_from([f"node{n}/i{n}" for n in range(4)]),
        st.tuples(st.integers(0, 2), st.sampled_from([P, C, W])),
        max_size=4,
    ),
    min_size=1,
    max_size=30,
)


def as_snapshot(spec: dict[str, tuple[int, HealthStatus]]) -> dict[str, InstanceHealth]:
    out = {}
    for key, (version, status) in spec.items():
        n = int(key.rsplit("i", 1)[1])
        out[key] = InstanceHealth(VARIANTS[n * 3 + version], status)
    return out


@settings(max_examples=400, deadline=None)
@given(snapshots, st.lists(st.integers(0, 4), min_size=30, max_size=30), st.data())
def test_any_consumer_speed_sees_a_legal_sequence_ending_at_the_last_snapshot(
    specs: list[dict[str, tuple[int, HealthStatus]]], speeds: list[int], data: st.DataObject
) -> None:
    feed = Feed()
    fast, slow, late = Backlog[Key](), Backlog[Key](), Backlog[Key]()
    seen = {"fast": Replay(), "slow": Replay(), "late": Replay()}
    late_from = data.draw(st.integers(0, len(specs) - 1), label="late consumer starts at")
    for step, spec in enumerate(specs):
        if step == late_from:  # a consumer starting mid-way: "nothing seen" + what exists
            for key, health in sorted(feed.state.items()):
                late.changed(("orders", key), health, feed.clock)
        feed.publish(as_snapshot(spec), fast, slow, *((late,) if step >= late_from else ()))
        for event in feed.take(fast):
            seen["fast"].apply(event)
        for event in feed.take(slow, speeds[step]):
            seen["slow"].apply(event)
        assert slow.pending <= 8  # bounded by instances seen + current, whatever the lag
    for name, backlog in (("slow", slow), ("late", late)):
        for event in feed.take(backlog):
            seen[name].apply(event)
    final = {h.instance.id: (h.instance, h.healthy) for h in feed.state.values()}
    for name, replay in seen.items():
        assert replay.state() == final, name


def test_fast_consumer_gets_exactly_the_events_of_each_diff() -> None:
    feed, backlog = Feed(), Backlog[Key]()
    history = [snap((A, P)), snap((A2, C), (B, P)), snap((A2, P)), snap((A, W), (B, C)), {}]
    previous: dict[str, InstanceHealth] = {}
    for new in history:
        feed.publish(new, backlog)
        expected = [(e.type, e.instance, e.previous) for e in diff_snapshots(previous, new)]
        assert [(e.type, e.instance, e.previous) for e in feed.take(backlog)] == expected
        previous = new


# -- InstanceMap: an immutable map whose update records which ids it changed ----------


def health(n: int, status: HealthStatus = P, v: int = 0) -> InstanceHealth:
    inst = ServiceInstance("orders", address="10.0.0.1", port=80, id=f"i{n}", meta={"v": str(v)})
    return InstanceHealth(inst, status)


def test_instance_map_reads_like_the_dict_it_holds() -> None:
    entries = {f"i{n}": health(n) for n in range(300)}
    m = InstanceMap(entries)
    assert m == entries
    assert len(m) == 300
    assert dict(m) == entries
    assert dict(m.items()) == entries
    assert sorted(m) == sorted(entries)
    assert list(m.values()).count(entries["i7"]) == 1
    assert m["i7"] is entries["i7"]
    assert m.get("nope") is None
    assert "i7" in m
    assert 7 not in m
    with pytest.raises(KeyError):
        m["nope"]
    assert InstanceMap() == {}
    assert InstanceMap.of(m) is m


def test_evolve_leaves_the_old_map_as_it_was_and_names_what_changed() -> None:
    old = InstanceMap({f"i{n}": health(n) for n in range(1000)})
    new = old.evolve({"i1": None, "i2": health(2, C), "i3": health(3), "x": health(5000)})
    assert len(old) == 1000
    assert old["i1"] == health(1)
    assert old["i2"].healthy
    assert "x" not in old
    assert len(new) == 1000
    assert "i1" not in new
    assert not new["i2"].healthy
    assert "x" in new
    assert new.changed == {"i1", "i2", "x"}  # i3 was put unchanged
    assert new.changed_since(old) == {"i1", "i2", "x"}
    assert changed_ids(old, new) == ["i1", "i2", "x"]
    assert new.changed_since(InstanceMap(old)) is None  # equal content, another map
    assert old.evolve({"i3": health(3), "gone": None}) is old  # nothing changes


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 80), st.sampled_from([None, P, C])), max_size=12),
        max_size=40,
    )
)
def test_evolve_agrees_with_a_dict_and_its_full_diff(steps: list[list[tuple[int, Any]]]) -> None:
    plain: dict[str, InstanceHealth] = {}
    m = InstanceMap()
    for step in steps:
        changes = {f"i{n}": None if s is None else health(n, s) for n, s in step}
        before, before_plain = m, dict(plain)
        for key, value in changes.items():
            if value is None:
                plain.pop(key, None)
            else:
                plain[key] = value
        m = m.evolve(changes)
        assert m == plain
        assert len(m) == len(plain)
        assert sorted(m) == sorted(plain)
        full = [
            k
            for k in sorted(before_plain.keys() | plain.keys())
            if before_plain.get(k) != plain.get(k)
        ]
        assert changed_ids(before, m) == full
        assert diff_snapshots(before, m, 3, changed_ids(before, m)) == diff_snapshots(
            before_plain, plain, 3
        )


def test_an_update_copies_a_small_part_of_a_big_map() -> None:
    m = InstanceMap({f"i{n}": health(n) for n in range(50_000)})
    new = m.evolve({"i9": health(9, C)})
    shared = sum(a is b for a, b in zip(m._buckets, new._buckets, strict=True))
    assert len(m._buckets) >= 128
    assert shared == len(m._buckets) - 1
    assert max(len(b) for b in m._buckets) < 50_000 // 16
