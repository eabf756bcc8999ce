"""etcd watch responses applied to a snapshot, without a server: each response's own events
change only their ids (O(changes)), and a response the watch cannot go on with is an error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aetcd import rpc
from registry_agent_etcd import EtcdBackend
from registry_agent_etcd._watch import apply_watch_events, response_error

from registry_agent import (
    BackendUnavailable,
    HealthStatus,
    InstanceHealth,
    RevisionCompacted,
    ServiceInstance,
)
from registry_agent._events import InstanceMap, changed_ids, diff_snapshots

backend = EtcdBackend()
PREFIX = backend._key("orders")  # what the backend watches for service "orders"
CONTEXT: dict[str, str | None] = {"backend": "etcd", "service": "orders", "instance": None}


def parse(key: bytes, value: bytes) -> InstanceHealth | None:
    return backend._parse("orders", key, value)


def inst(n: int, port: int = 80) -> ServiceInstance:
    return ServiceInstance("orders", address="10.0.0.1", port=port, id=f"i{n}")


def value(instance: ServiceInstance, status: str = "passing") -> bytes:
    return json.dumps({**instance.to_dict(), "status": status}).encode()


def put(n: int, port: int = 80, status: str = "passing") -> Any:
    kv = rpc.KeyValue(key=PREFIX + f"i{n}".encode(), value=value(inst(n, port), status))
    return rpc.Event(type=rpc.Event.PUT, kv=kv)


def delete(n: int) -> Any:
    return rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=PREFIX + f"i{n}".encode()))


def start(count: int) -> InstanceMap:
    return InstanceMap(
        {f"i{n}": InstanceHealth(inst(n), HealthStatus.PASSING) for n in range(count)}
    )


def test_the_key_prefix_is_the_service_directory() -> None:
    assert PREFIX.endswith(b"/orders/")
    assert backend._key("orders", "i1") == PREFIX + b"i1"


def test_puts_and_deletes_change_only_their_ids() -> None:
    state = start(5000)
    new = apply_watch_events(
        state, PREFIX, [put(3, status="critical"), delete(4), put(9000)], parse
    )
    assert new.changed_since(state) == {"i3", "i4", "i9000"}
    assert len(state) == 5000  # the old snapshot is untouched
    assert state["i3"].healthy
    assert "i4" in state
    assert not new["i3"].healthy
    assert "i4" not in new
    assert new["i9000"].instance == inst(9000)
    assert len(new) == 5000
    events = diff_snapshots(state, new, 7, changed_ids(state, new))
    assert [(str(e.type), e.instance.id) for e in events] == [
        ("offline", "i3"),
        ("deleted", "i4"),
        ("added", "i9000"),
    ]


def test_a_key_changed_twice_in_one_response_ends_at_its_last_event() -> None:
    state = start(10)
    assert apply_watch_events(state, PREFIX, [delete(1), put(1, port=81)], parse)[
        "i1"
    ].instance == (inst(1, port=81))
    assert "i2" not in apply_watch_events(state, PREFIX, [put(2, port=81), delete(2)], parse)
    # Added and removed again within the response: nothing changed.
    assert apply_watch_events(state, PREFIX, [put(50), delete(50)], parse) is state


def test_nothing_changed_gives_the_same_snapshot() -> None:
    state = start(10)
    assert apply_watch_events(state, PREFIX, [put(1), delete(77)], parse) is state


def test_a_foreign_value_counts_as_gone_and_never_breaks_the_watch() -> None:
    state = start(10)
    junk = rpc.Event(type=rpc.Event.PUT, kv=rpc.KeyValue(key=PREFIX + b"i1", value=b"{not json"))
    other = rpc.Event(
        type=rpc.Event.PUT, kv=rpc.KeyValue(key=PREFIX + b"i2", value=value(inst(3)))
    )  # the value names another id than its key
    new = apply_watch_events(state, PREFIX, [junk, other], parse)
    assert new.changed_since(state) == {"i1", "i2"}
    assert "i1" not in new
    assert "i2" not in new


def test_parses_only_the_changed_values() -> None:
    parsed: list[bytes] = []

    def counting(key: bytes, raw: bytes) -> InstanceHealth | None:
        parsed.append(key)
        return parse(key, raw)

    apply_watch_events(start(50_000), PREFIX, [put(1, status="critical"), delete(2)], counting)
    assert parsed == [PREFIX + b"i1"]


def response(**fields: Any) -> Any:
    header = rpc.ResponseHeader(
        revision=fields.pop("revision", 100), cluster_id=fields.pop("cluster", 7)
    )
    return rpc.WatchResponse(header=header, **fields)


def test_a_response_the_watch_can_go_on_with() -> None:
    assert (
        response_error(response(created=True), revision=90, cluster_id=7, context=CONTEXT) is None
    )
    assert (
        response_error(response(events=[put(1)]), revision=90, cluster_id=None, context=CONTEXT)
        is None
    )


@pytest.mark.parametrize(
    ("fields", "kind", "words"),
    [
        ({"cluster": 8}, RevisionCompacted, "cluster changed"),
        ({"created": True, "revision": 80}, RevisionCompacted, "behind 90"),
        ({"compact_revision": 95}, RevisionCompacted, "revision 91 was compacted"),
        ({"canceled": True, "cancel_reason": "too slow"}, BackendUnavailable, "too slow"),
    ],
)
def test_a_response_that_ends_the_watch(fields: dict[str, Any], kind: type, words: str) -> None:
    error = response_error(response(**fields), revision=90, cluster_id=7, context=CONTEXT)
    assert isinstance(error, kind)
    assert words in str(error)
    assert error.service == "orders"
