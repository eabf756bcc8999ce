"""The snapshot diff: every case of the event table, exactly."""

from __future__ import annotations

from registry_agent import EventType, HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._events import diff_snapshots

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
