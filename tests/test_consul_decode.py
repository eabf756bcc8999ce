"""The Consul watch's typed decoding and combination, on answers recorded from Consul 1.8.7.

``tests/data/consul_watch/`` holds what a real ``consul agent -dev`` (1.8.7)
answered for service ``orders``: three instances registered by us (orders-1
held critical "disk full"), ``no-checks`` registered without any check,
``bad-address`` (address ``a b c``), and a node check ``disk`` in warning.
``checks_after.json`` is the checks answer after orders-2 was set warning "slow".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from registry_agent_consul._decode import (
    CatalogEntry,
    Check,
    Decoded,
    ServiceView,
    TaggedAddress,
    decode_catalog,
    decode_checks,
)

from registry_agent import HealthStatus

DATA = Path(__file__).parent / "data" / "consul_watch"
NODE = json.loads((DATA / "catalog.json").read_text())[0]["Node"]


def body(name: str) -> str:
    return (DATA / f"{name}.json").read_text()


def preferred(instance_id: str) -> Sequence[str]:
    return (f"service:{instance_id}:health", f"service:{instance_id}")


class View:
    """A ServiceView with a sequence counter and the warnings it gave."""

    def __init__(self, local_node: str | None = None) -> None:
        self.warned: list[tuple[str, str]] = []
        self.seq = 0
        self.view = ServiceView(
            "orders",
            local_node=local_node,
            preferred=preferred,
            warn=lambda instance_id, why: self.warned.append((instance_id, str(why))),
        )

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def load(self, catalog: str, checks: str, nodes: str) -> None:
        """As the watch starts: the catalog first, then checks and node checks asked after it."""
        self.view.set_catalog(decode_catalog(catalog), self.tick())
        self.view.set_checks(decode_checks(checks), self.tick())
        self.view.set_node_checks(decode_checks(nodes), self.tick())


def test_typed_decode_reads_only_our_fields() -> None:
    catalog = decode_catalog(body("catalog"))
    assert catalog.bad == []
    assert all(type(e) is CatalogEntry for e in catalog.entries)
    entry = next(e for e in catalog.entries if e.ServiceID == "orders-0")
    assert entry == CatalogEntry(
        Node=NODE,
        Address="127.0.0.1",
        ServiceID="orders-0",
        ServiceName="orders",
        ServiceAddress="127.0.0.1",
        ServicePort=8000,
        ServiceTags=("v1",),
        ServiceMeta={"zone": "a"},
        ServiceTaggedAddresses={
            "lan_ipv4": TaggedAddress("127.0.0.1", 8000),
            "wan_ipv4": TaggedAddress("127.0.0.1", 8000),
        },
        ServiceWeights={"Passing": 1, "Warning": 1},  # Consul's native weights (the default)
    )
    checks = decode_checks(body("checks"))
    assert len(checks.entries) == 6
    assert all(type(c) is Check for c in checks.entries)
    held = next(c for c in checks.entries if c.CheckID == "service:orders-1:health")
    assert (held.Status, held.Output, held.ServiceID) == ("critical", "disk full", "orders-1")


def test_snapshot_of_recorded_answers() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    found = v.view.snapshot()
    assert sorted(found) == ["no-checks", "orders-0", "orders-1", "orders-2"]
    assert found["orders-0"].status is HealthStatus.PASSING
    held = found["orders-1"]
    assert (held.status, held.note) == (HealthStatus.CRITICAL, "disk full")
    # Registered without an address or checks: the node's address, passing.
    plain = found["no-checks"]
    assert (plain.instance.address, plain.instance.port) == ("127.0.0.1", 0)
    assert plain.status is HealthStatus.PASSING
    assert found["orders-0"].instance.node == NODE
    assert found["orders-0"].instance.meta == {"zone": "a"}
    # "a b c" is no address: skipped, and said so.
    assert [i for i, _ in v.warned] == ["bad-address"]


def test_a_node_check_that_is_not_passing_takes_every_instance_of_its_node_offline() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), body("node_checks"))
    found = v.view.snapshot()
    assert found["orders-0"].status is HealthStatus.WARNING
    assert found["orders-0"].note == "disk"  # the node check's name: it has no output
    assert found["no-checks"].status is HealthStatus.WARNING
    assert found["orders-1"].status is HealthStatus.CRITICAL  # the worst wins
    # The node check clears: as it was until a catalog read asked after that says the
    # node's entries are still there (not a node being deregistered), then online.
    v.view.set_node_checks(decode_checks("[]"), v.tick())
    assert v.view.snapshot()["orders-0"].status is HealthStatus.WARNING
    catalog_after = v.view.waiting()[0]
    assert catalog_after is not None  # the watch re-reads the catalog at once
    asked = v.tick()
    assert asked > catalog_after
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick(), asked)
    assert v.view.snapshot()["orders-0"].status is HealthStatus.PASSING


def test_unchanged_entries_are_the_same_objects() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    before = v.view.snapshot()
    v.view.set_checks(decode_checks(body("checks_after")), v.tick())
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick())  # the same catalog, decoded anew
    after = v.view.snapshot()
    assert after.keys() == before.keys()
    changed = [k for k in after if after[k] is not before[k]]
    assert changed == ["orders-2"]
    assert (after["orders-2"].status, after["orders-2"].note) == (HealthStatus.WARNING, "slow")
    assert after["orders-2"].instance is before["orders-2"].instance
    assert after == {**before, "orders-2": after["orders-2"]}
    assert after.changed == {"orders-2"}  # what the watcher visits: O(changes)
    assert v.view.snapshot() is after  # nothing new: the same map


def test_a_changed_catalog_entry_is_a_new_instance_and_the_rest_are_kept() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    before = v.view.snapshot()
    entries = json.loads(body("catalog"))
    for entry in entries:
        if entry["ServiceID"] == "orders-0":
            entry["ServiceMeta"] = {"zone": "b"}
    assert v.view.set_catalog(decode_catalog(json.dumps(entries)), v.tick())
    after = v.view.snapshot()
    assert after["orders-0"].instance.meta == {"zone": "b"}
    assert [k for k in after if after[k] is not before[k]] == ["orders-0"]
    # The same catalog again: nothing changed.
    assert not v.view.set_catalog(decode_catalog(json.dumps(entries)), v.tick())


def test_an_entry_is_held_back_until_checks_asked_after_it_arrive() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    entries = json.loads(body("catalog"))
    new = {**entries[2], "ServiceID": "orders-9", "ServicePort": 8009}
    # The checks request in flight was sent before the catalog answer with orders-9 came.
    asked = v.tick()
    v.view.set_catalog(decode_catalog(json.dumps([*entries, new])), v.tick())
    v.view.set_checks(decode_checks(body("checks")), asked)
    assert "orders-9" not in v.view.snapshot()
    _, checks_after, nodes_after = v.view.waiting()
    assert checks_after is not None
    assert checks_after > asked
    assert nodes_after is None  # its node is known
    # Its checks arrive (registered with the entry): shown with them.
    checks = json.loads(body("checks"))
    mine = {**checks[0], "ServiceID": "orders-9", "CheckID": "service:orders-9"}
    mine["Status"] = "critical"
    v.view.set_checks(decode_checks(json.dumps([*checks, mine])), asked)
    assert v.view.snapshot()["orders-9"].status is HealthStatus.CRITICAL
    assert v.view.waiting() == (None, None, None)
    # Or none: only an answer asked after the entry was seen says it has none.
    eight = {**new, "ServiceID": "orders-8"}
    asked = v.tick()
    v.view.set_catalog(decode_catalog(json.dumps([*entries, new, eight])), v.tick())
    v.view.set_checks(decode_checks(json.dumps([*checks, mine])), asked)
    assert "orders-8" not in v.view.snapshot()
    v.view.set_checks(decode_checks(json.dumps([*checks, mine])), v.tick())
    assert v.view.snapshot()["orders-8"].status is HealthStatus.PASSING
    assert v.view.waiting() == (None, None, None)


def test_a_deregistration_whose_checks_vanish_first_never_shows_as_passing() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    before = v.view.snapshot()
    # orders-1 (critical) is deregistered: the checks answer comes before the catalog's.
    asked = v.tick()
    checks = [c for c in json.loads(body("checks")) if c["ServiceID"] != "orders-1"]
    v.view.set_checks(decode_checks(json.dumps(checks)), v.tick(), v.tick())
    assert v.view.snapshot()["orders-1"] is before["orders-1"]  # as it was
    assert v.view.waiting()[0] is not None  # until a catalog read (or a probe) settles it
    entries = [e for e in json.loads(body("catalog")) if e["ServiceID"] != "orders-1"]
    v.view.set_catalog(decode_catalog(json.dumps(entries)), v.tick(), asked)
    assert "orders-1" not in v.view.snapshot()
    # Only its checks removed (it stays listed): shown without checks once a catalog
    # read asked after the checks vanished still lists it.
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    assert v.view.snapshot()["orders-1"].status is HealthStatus.CRITICAL
    asked = v.tick()
    v.view.set_checks(decode_checks(json.dumps(checks)), v.tick(), v.tick())
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick(), asked)  # asked before
    assert v.view.snapshot()["orders-1"].status is HealthStatus.CRITICAL
    asked = v.tick()
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick(), asked)
    assert v.view.snapshot()["orders-1"].status is HealthStatus.PASSING


def test_an_instance_on_a_new_node_waits_for_node_checks_asked_after_it() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    entries = json.loads(body("catalog"))
    other = {**entries[2], "Node": "far", "ServiceID": "orders-7"}
    asked = v.tick()
    v.view.set_catalog(decode_catalog(json.dumps([*entries, other])), v.tick())
    v.view.set_checks(decode_checks(body("checks")), v.tick())
    assert "orders-7" not in v.view.snapshot()
    assert v.view.waiting()[2] is not None
    v.view.set_node_checks(decode_checks("[]"), asked)  # too old
    assert "orders-7" not in v.view.snapshot()
    serf = {"Node": "far", "CheckID": "serfHealth", "Name": "Serf Health Status"}
    serf |= {"Status": "critical", "Output": "Agent not live or unreachable"}
    v.view.set_node_checks(decode_checks(json.dumps([serf])), v.tick())
    far = v.view.snapshot()["orders-7"]
    assert (far.status, far.note) == (HealthStatus.CRITICAL, "Agent not live or unreachable")


def test_garbage_entries_are_skipped_and_the_rest_kept() -> None:
    entries = json.loads(body("catalog"))
    hostile: list[object] = [
        None,
        "text",
        {**entries[2], "ServiceID": "port-text", "ServicePort": "80"},
        {**entries[2], "ServiceID": "meta-int", "ServiceMeta": {"k": 1}},
        {**entries[2], "ServiceID": "tag-none", "ServiceTags": [None]},
        {**entries[2], "ServiceID": "y" * 10_000},
    ]
    decoded = decode_catalog(json.dumps([*hostile, *entries]))
    assert len(decoded.entries) == len(entries) + 1  # the long id has Consul's types
    assert {sid for _, sid in decoded.bad} == {"?", "port-text", "meta-int", "tag-none"}
    checks = json.loads(body("checks"))
    bad_check = {**checks[0], "Status": 3}  # orders-0's liveness, unreadable
    sunny = {**checks[2], "Status": "sunny"}  # orders-1's, a status Consul does not have
    v = View()
    v.view.set_catalog(decoded, v.tick())
    v.view.set_checks(decode_checks(json.dumps([*checks, bad_check, sunny])), v.tick())
    v.view.set_node_checks(decode_checks("[]"), v.tick())
    found = v.view.snapshot()
    # A 10,000-character id is still an instance as Consul holds it (with no checks).
    assert sorted(found) == ["no-checks", "orders-2", "y" * 10_000]
    for key, health in found.items():
        assert health.instance.id == key
    warned = {i for i, _ in v.warned}
    assert {"port-text", "meta-int", "tag-none", "orders-0", "orders-1", "bad-address"} <= warned


def test_an_answer_that_is_not_a_list_is_an_error() -> None:
    for text in ("{}", "not json", '"text"', ""):
        with pytest.raises(msgspec.DecodeError):
            decode_catalog(text)
        # A ValueError: what the HTTP layer maps to BackendUnavailable.
        with pytest.raises(ValueError):  # noqa: PT011
            decode_checks(text)


def test_an_id_on_several_nodes_keeps_the_plain_id_on_the_local_node() -> None:
    entries = json.loads(body("catalog"))
    twin = {**entries[2], "Node": "a-first"}
    for local, plain in ((None, "a-first"), (NODE, NODE)):
        v = View(local_node=local)
        v.view.set_catalog(decode_catalog(json.dumps([*entries, twin])), v.tick())
        twin_check = {**json.loads(body("checks"))[0], "Node": "a-first"}
        twin_check["ServiceID"] = twin["ServiceID"]
        v.view.set_checks(decode_checks(json.dumps([twin_check])), v.tick())
        v.view.set_node_checks(Decoded([], []), v.tick())
        found = v.view.snapshot()
        sid = twin["ServiceID"]
        other = "a-first" if plain == NODE else NODE
        assert found[sid].instance.node == plain
        assert found[f"{other}/{sid}"].instance.node == other


def test_a_probe_shows_a_new_instance_before_the_full_catalog_answer() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    entries, checks = json.loads(body("catalog")), json.loads(body("checks"))
    new = {**entries[2], "ServiceID": "orders-9", "ServicePort": 8009}
    mine = {**checks[0], "ServiceID": "orders-9", "CheckID": "service:orders-9"}
    stale = v.tick()  # a full catalog read in flight, asked before orders-9 came
    v.view.set_checks(decode_checks(json.dumps([*checks, mine])), v.tick(), v.tick())
    assert "orders-9" not in v.view.snapshot()
    keys = v.view.probe_keys(16)
    assert keys == [(NODE, "orders-9")]
    assert v.view.probe_keys(16) == []  # asked once
    asked = v.tick()
    v.view.set_probe(decode_catalog(json.dumps([new])), keys, asked, v.tick())
    shown = v.view.snapshot()["orders-9"]
    assert (shown.instance.port, shown.status) == (8009, HealthStatus.PASSING)
    # The full answer asked before the probe's came does not undo it; a later one agrees.
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick(), stale)
    assert v.view.snapshot()["orders-9"] is shown
    asked = v.tick()
    v.view.set_catalog(decode_catalog(json.dumps([*entries, new])), v.tick(), asked)
    assert v.view.snapshot()["orders-9"] is shown


def test_a_probe_shows_a_deregistration_before_the_full_catalog_answer() -> None:
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    v.view.snapshot()
    stale = v.tick()
    checks = [c for c in json.loads(body("checks")) if c["ServiceID"] != "orders-1"]
    v.view.set_checks(decode_checks(json.dumps(checks)), v.tick(), v.tick())
    assert "orders-1" in v.view.snapshot()  # as it was: maybe only its checks went
    keys = v.view.probe_keys(16)
    assert keys == [(NODE, "orders-1")]
    v.view.set_probe(decode_catalog("[]"), keys, v.tick(), v.tick())
    assert "orders-1" not in v.view.snapshot()
    v.view.set_catalog(decode_catalog(body("catalog")), v.tick(), stale)  # still lists it
    assert "orders-1" not in v.view.snapshot()
    # Too many to probe: left to the full catalog answer.
    v = View()
    v.load(body("catalog"), body("checks"), "[]")
    v.view.set_checks(decode_checks("[]"), v.tick(), v.tick())
    assert v.view.probe_keys(2) == []
    assert len(v.view.probe_keys(16)) == 3
