"""ServiceInstance validation and value semantics."""

import pytest

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance


def test_defaults_give_a_stable_id() -> None:
    a = ServiceInstance("orders", address="10.0.0.5", port=8080)
    b = ServiceInstance("orders", address="10.0.0.5", port=8080)
    assert a.id == "orders-10.0.0.5-8080"
    assert a == b
    assert hash(a) == hash(b)


def test_address_defaults_to_the_default_route_not_the_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import registry_agent._models as models

    monkeypatch.setattr(models, "advertised_address", lambda: "10.9.8.7")
    instance = ServiceInstance("orders", port=80)
    assert (instance.address, instance.id) == ("10.9.8.7", "orders-10.9.8.7-80")
    # A literal is kept as given, a host name too (the user's choice).
    assert ServiceInstance("orders", address="db.example", port=80).address == "db.example"


def test_no_default_route_is_a_config_error_naming_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import registry_agent._models as models

    def no_route() -> str:
        raise ConfigError("this host has no default route", field="address")

    monkeypatch.setattr(models, "advertised_address", no_route)
    with pytest.raises(ConfigError) as caught:
        ServiceInstance("orders", port=80)
    assert caught.value.field == "address"


def test_instances_are_immutable_and_hashable() -> None:
    inst = ServiceInstance("orders", address="h", port=1, tags=["a"], meta={"k": "v"})
    assert inst.tags == ("a",)
    with pytest.raises(AttributeError):
        inst.port = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        inst.meta["k"] = "w"  # type: ignore[index]
    assert {inst: 1}[ServiceInstance("orders", address="h", port=1, tags=("a",), meta={"k": "v"})]


def test_meta_is_copied_from_the_callers_dict() -> None:
    meta = {"k": "v"}
    inst = ServiceInstance("orders", address="h", port=1, meta=meta)
    meta["k"] = "changed"
    assert inst.meta["k"] == "v"


def test_equality_covers_every_field() -> None:
    base = ServiceInstance("orders", address="h", port=1, tags=("a",), meta={"k": "v"})
    for change in (
        {"address": "g"},
        {"port": 2},
        {"tags": ("b",)},
        {"meta": {"k": "w"}},
        {"id": "other"},
    ):
        fields = {"address": "h", "port": 1, "tags": ("a",), "meta": {"k": "v"}, **change}
        assert ServiceInstance("orders", **fields) != base  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"service": ""}, "service", "non-empty"),
        ({"service": "has space"}, "service", "letters, digits"),
        ({"service": "slash/no"}, "service", "letters, digits"),
        ({"service": "ünï"}, "service", "letters, digits"),
        ({"port": 0}, "port", "1-65535"),
        ({"port": 65536}, "port", "1-65535"),
        ({"port": "80"}, "port", "integer"),
        ({"port": True}, "port", "integer"),
        ({"id": "a b"}, "id", "letters, digits"),
        ({"tags": "v1"}, "tags", "list of strings"),
        ({"tags": ["ok", 3]}, "tags[1]", "string"),
        ({"meta": {"k": 1}}, "meta.k", "string value"),
        ({"meta": {1: "v"}}, "meta", "string keys"),
        ({"meta": ["k"]}, "meta", "mapping"),
        ({"address": "a b"}, "address", "host name"),
    ],
)
def test_invalid_fields_name_the_field(
    fields: dict[str, object], field: str, expected: str
) -> None:
    args: dict[str, object] = {"service": "orders", "address": "h", "port": 80, **fields}
    with pytest.raises(ConfigError) as info:
        ServiceInstance(**args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert expected in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_round_trip_through_dict() -> None:
    inst = ServiceInstance("orders", address="h", port=1, tags=("λ",), meta={"zone": "zürich"})
    assert ServiceInstance.from_dict(inst.to_dict()) == inst


def test_from_dict_rejects_non_objects() -> None:
    with pytest.raises(ConfigError):
        ServiceInstance.from_dict([1, 2])  # type: ignore[arg-type]


def test_worst_status() -> None:
    worst = HealthStatus.worst
    assert worst([]) is HealthStatus.PASSING
    assert worst([HealthStatus.PASSING, HealthStatus.WARNING]) is HealthStatus.WARNING
    assert worst([HealthStatus.WARNING, HealthStatus.CRITICAL]) is HealthStatus.CRITICAL


def test_only_passing_is_healthy_and_note_is_not_identity() -> None:
    inst = ServiceInstance("orders", address="h", port=1)
    assert InstanceHealth(inst).healthy
    assert not InstanceHealth(inst, HealthStatus.WARNING).healthy
    assert InstanceHealth(inst, note="a") == InstanceHealth(inst, note="b")


def test_node_is_carried_but_not_identity() -> None:
    plain = ServiceInstance("orders", address="h", port=1)
    placed = ServiceInstance("orders", address="h", port=1, node="node-a")
    assert placed.node == "node-a"
    assert plain.node == ""
    # Where an entry is held is not what was registered: a registrar's own
    # instance still equals the one read back from its agent's node.
    assert placed == plain
    assert hash(placed) == hash(plain)
    assert "node" not in plain.to_dict()
    assert placed.to_dict()["node"] == "node-a"
    assert ServiceInstance.from_dict(placed.to_dict()).node == "node-a"


def test_node_must_be_a_printable_string() -> None:
    with pytest.raises(ConfigError) as info:
        ServiceInstance("orders", address="h", port=1, node="a\nb")
    assert info.value.field == "node"


def test_from_registry_reads_what_we_would_not_write() -> None:
    # An id from an IPv6 host, no port: another tool's entry, still an instance.
    inst = ServiceInstance.from_registry(
        service="orders", id="orders-[::1]:8080", address="::1", port=0, node="n1"
    )
    assert (inst.id, inst.port, inst.node, inst.tags, dict(inst.meta)) == (
        "orders-[::1]:8080",
        0,
        "n1",
        (),
        {},
    )
    with pytest.raises(ConfigError):
        ServiceInstance(service="orders", id="orders-[::1]:8080", address="::1", port=0)
    assert {inst: 1}[inst] == 1  # hashable like any instance


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"service": ""}, "service"),
        ({"id": 3}, "id"),
        ({"address": None}, "address"),
        ({"address": "a b"}, "address"),
        ({"address": "h\x00"}, "address"),
        ({"port": -1}, "port"),
        ({"port": "80"}, "port"),
        ({"tags": "v1"}, "tags"),
        ({"tags": [1]}, "tags"),
        ({"meta": {"k": 1}}, "meta"),
        ({"node": 5}, "node"),
    ],
)
def test_from_registry_still_checks_types(fields: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"service": "orders", "id": "x", "address": "h", "port": 1}
    with pytest.raises(ConfigError) as info:
        ServiceInstance.from_registry(**{**args, **fields})  # type: ignore[arg-type]
    assert info.value.field == field


def test_scheme_and_version_are_fields_of_the_instance() -> None:
    plain = ServiceInstance("orders", address="10.0.0.1", port=9000)
    grpc = ServiceInstance("orders", address="10.0.0.1", port=9000, scheme="grpc", version="v2")
    assert (plain.scheme, plain.version) == ("", "")
    assert grpc != plain
    assert grpc != ServiceInstance("orders", address="10.0.0.1", port=9000, scheme="grpc")
    assert grpc.to_dict()["scheme"] == "grpc"
    assert "scheme" not in plain.to_dict()
    assert "version" not in plain.to_dict()
    assert ServiceInstance.from_dict(grpc.to_dict()) == grpc
    read = ServiceInstance.from_registry(
        service="orders", id="x", address="h", port=1, scheme="GRPCS", version="1.0"
    )
    assert (read.scheme, read.version) == ("grpcs", "1.0")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"scheme": "GRPC"}, "scheme"),
        ({"scheme": "grpc://"}, "scheme"),
        ({"scheme": 1}, "scheme"),
        ({"version": "v 1"}, "version"),
        ({"version": "x" * 300}, "version"),
        ({"version": None}, "version"),
    ],
)
def test_bad_scheme_or_version_names_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServiceInstance("orders", address="h", port=1, **fields)  # type: ignore[arg-type]
    assert info.value.field == field


def test_from_dict_without_a_service_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        ServiceInstance.from_dict({"id": "x", "address": "h", "port": 1})
    assert info.value.field == "service"
