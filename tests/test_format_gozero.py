"""etcd format=go-zero against the bytes go-zero itself writes (no server).

Peer source read: zeromicro/go-zero v1.10.3 (and v1.0.0 … v1.10.0, identical here):

- ``core/discov/clients.go`` ``makeEtcdKey``: ``fmt.Sprintf("%s%c%d", key, '/', id)``.
- ``core/discov/publisher.go`` ``Publisher.register``: ``id`` is ``WithId``'s when > 0,
  else the lease id; ``Put(fullKey, value, WithLease(lease))`` with the value as given.
- ``zrpc/internal/rpcpubserver.go`` ``NewRpcPubServer``/``figureOutListenOn``: the
  value is ``ListenOn``; ``0.0.0.0:8080`` becomes ``$POD_IP:8080``; any other host
  (``[::1]`` included: its first ``:``-field is ``[``) is kept verbatim.
- ``core/discov/internal/registry.go`` ``cluster.load``: readers range over ``<key>/``
  and use the values; ``zrpc/resolver/internal/discovbuilder.go`` dials each value.
"""

from __future__ import annotations

import hashlib

import pytest
from registry_agent_etcd import EtcdBackend
from registry_agent_etcd._format_gozero import GoZeroFormat, entry_number, split_hostport
from registry_agent_etcd._formats import load_format

from registry_agent import (
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Rejected,
    ServiceInstance,
    open_backend,
)

FMT = GoZeroFormat()
PASSING = HealthStatus.PASSING


def go_key(key: str, id: int) -> bytes:
    """go-zero's makeEtcdKey(key, id): ``%s%c%d`` with '/' (core/discov/clients.go)."""
    return b"%s/%d" % (key.encode(), id)


def our_key(instance: ServiceInstance) -> bytes:
    return EtcdBackend(format="go-zero")._key_of(instance)


def gozero(service: str, id: str, address: str, port: int) -> InstanceHealth:
    """What a go-zero reader sees: an endpoint and nothing else."""
    instance = ServiceInstance.from_registry(service=service, id=id, address=address, port=port)
    return InstanceHealth(instance, HealthStatus.PASSING)


# -- the format and its options ---------------------------------------------------------


def test_loaded_by_name_with_no_prefix_and_no_health() -> None:
    fmt = load_format("go-zero")
    assert isinstance(fmt, GoZeroFormat)
    assert (fmt.name, fmt.default_prefix, fmt.carries_health) == ("go-zero", "", False)
    backend = open_backend("etcd://127.0.0.1:2379?format=go-zero")
    assert isinstance(backend, EtcdBackend)
    assert backend.prefix == ""
    assert "format='go-zero'" in repr(backend)


# -- our bytes == go-zero's bytes ----------------------------------------------------------


def test_entry_id_is_a_stable_positive_63_bit_decimal_from_the_instance_id() -> None:
    inst = ServiceInstance("orders.rpc", address="10.0.0.5", port=8080)
    assert inst.id == "orders.rpc-10.0.0.5-8080"
    # sha256("orders.rpc-10.0.0.5-8080") starts cbcdf71c281b1759; top bit cleared.
    top = int(hashlib.sha256(inst.id.encode()).hexdigest()[:16], 16) & ~(1 << 63)
    assert top == 0x4BCDF71C281B1759 == 5462293623374288729
    assert FMT.entry_id(inst) == "5462293623374288729"
    assert entry_number(inst.id) == 5462293623374288729
    # What a go-zero publisher configured with WithId(5462293623374288729) writes.
    assert our_key(inst) == go_key("orders.rpc", 5462293623374288729)
    assert our_key(inst) == b"orders.rpc/5462293623374288729"
    assert FMT.encode(inst, PASSING, "") == b"10.0.0.5:8080"


def test_entry_id_depends_only_on_the_instance_id() -> None:
    a = ServiceInstance("orders.rpc", address="10.0.0.5", port=8080, id="a")
    moved = ServiceInstance("orders.rpc", address="10.0.0.6", port=9090, id="a", tags=("x",))
    other = ServiceInstance("orders.rpc", address="10.0.0.5", port=8080, id="b")
    assert FMT.entry_id(a) == FMT.entry_id(moved) != FMT.entry_id(other)
    for i in range(500):  # WithId needs id > 0 (publisher.go: `if p.id > 0`); int64 range
        number = int(FMT.entry_id(ServiceInstance("s", address="h", port=1, id=f"i{i}")))
        assert 0 < number < 2**63


def test_ipv6_is_bracketed_like_a_listen_on_address() -> None:
    inst = ServiceInstance("orders.rpc", address="::1", port=8080)
    assert FMT.encode(inst, PASSING, "") == b"[::1]:8080"
    zoned = ServiceInstance("orders.rpc", address="fe80::1%eth0", port=50051, id="z")
    assert FMT.encode(zoned, PASSING, "") == b"[fe80::1%eth0]:50051"


def test_a_host_name_is_kept_as_is() -> None:
    inst = ServiceInstance("user.rpc", address="user-rpc.svc.cluster.local", port=9000)
    assert FMT.encode(inst, PASSING, "") == b"user-rpc.svc.cluster.local:9000"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"meta": {"zone": "zürich", "owner": "李"}},
        {"meta": {"q": "<a href='x'>&amp;</a>"}},
        {"tags": ("primary", "<&>")},
        {"scheme": "grpcs", "version": "v1.2.3"},
    ],
    ids=["empty-meta", "unicode-meta", "html-meta", "tags", "scheme-version"],
)
def test_everything_but_the_address_is_lost(extra: dict[str, object]) -> None:
    inst = ServiceInstance("orders.rpc", address="10.0.0.5", port=8080, id="o1", **extra)  # type: ignore[arg-type]
    assert FMT.encode(inst, PASSING, "a note") == b"10.0.0.5:8080"
    assert FMT.decode("orders.rpc", FMT.entry_id(inst), FMT.encode(inst, PASSING, "")) == (
        gozero("orders.rpc", FMT.entry_id(inst), "10.0.0.5", 8080)
    )


@pytest.mark.parametrize("address", ["[::1]", "a/b", "zürich.example", "host:80", "::zz", "{json}"])
def test_an_address_go_zero_cannot_dial_is_refused_naming_the_field(address: str) -> None:
    inst = ServiceInstance("orders.rpc", address=address, port=8080, id="x")
    with pytest.raises(ConfigError) as info:
        FMT.encode(inst, PASSING, "")
    assert info.value.field == "address"
    assert "format=go-zero" in str(info.value)


def test_the_backend_refuses_what_it_cannot_say_before_sending() -> None:
    backend = EtcdBackend(format="go-zero")
    with pytest.raises(Rejected, match="carries presence, not health"):
        backend._value(ServiceInstance("s", address="h", port=1), HealthStatus.CRITICAL, "")
    with pytest.raises(ConfigError) as info:
        backend.validate_options(ttl=10, deregister_critical_after=None, on_unhealthy="critical")
    assert info.value.field == "on_unhealthy"


def test_the_backend_validates_a_registrable_instance() -> None:
    backend = EtcdBackend(format="go-zero")
    backend.validate(ServiceInstance("orders.rpc", address="10.0.0.5", port=8080))
    backend.validate_options(ttl=10, deregister_critical_after=None, on_unhealthy="deregister")
    with pytest.raises(ConfigError) as info:
        backend.validate(ServiceInstance("orders.rpc", address="a/b", port=8080, id="x"))
    assert info.value.field == "address"


# -- go-zero's bytes -> the instance we mean ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "address", "port"),
    [
        # NewPublisher(hosts, "orders.rpc", "10.0.0.5:8080") with lease 0x694d8d4a1c2e7a04
        (go_key("orders.rpc", 0x694D8D4A1C2E7A04), b"10.0.0.5:8080", "10.0.0.5", 8080),
        # zrpc ListenOn "0.0.0.0:8080", POD_IP=10.1.2.3, Etcd.ID 42 (v1.5.1+)
        (go_key("orders.rpc", 42), b"10.1.2.3:8080", "10.1.2.3", 8080),
        # ListenOn "[::1]:8080": kept verbatim by figureOutListenOn
        (go_key("orders.rpc", 7), b"[::1]:8080", "::1", 8080),
        (go_key("orders.rpc", 8), b"[2001:db8::5]:50051", "2001:db8::5", 50051),
        # ListenOn "user-rpc:9000" (a compose service name)
        (go_key("orders.rpc", 9), b"user-rpc:9000", "user-rpc", 9000),
        # ListenOn "[10.0.0.5]:8080": kept verbatim, and Go's net.SplitHostPort reads it
        (go_key("orders.rpc", 10), b"[10.0.0.5]:8080", "10.0.0.5", 8080),
    ],
)
def test_go_zero_values_decode_to_the_endpoint(
    key: bytes, value: bytes, address: str, port: int
) -> None:
    service, _, entry_id = key.decode().partition("/")
    assert FMT.decode(service, entry_id, value) == gozero(service, entry_id, address, port)
    got = FMT.decode(service, entry_id, value).instance
    assert (got.tags, dict(got.meta), got.scheme, got.version) == ((), {}, "", "")


def test_lease_id_key_decodes_with_that_id() -> None:
    key = go_key("orders.rpc", 7587869323591185412)
    assert key == b"orders.rpc/7587869323591185412"
    got = FMT.decode("orders.rpc", "7587869323591185412", b"10.0.0.5:8080")
    assert got.instance.id == "7587869323591185412"
    assert got.status is HealthStatus.PASSING
    assert got.note == ""


def test_round_trip_keeps_what_go_zero_keeps() -> None:
    for address, port in [("10.0.0.5", 1), ("::1", 65535), ("fe80::1%eth0", 80), ("h_1", 2)]:
        inst = ServiceInstance("orders.rpc", address=address, port=port, id="i", meta={"k": "v"})
        entry_id = FMT.entry_id(inst)
        assert FMT.decode("orders.rpc", entry_id, FMT.encode(inst, PASSING, "")) == (
            gozero("orders.rpc", entry_id, address, port)
        )


# -- foreign and broken values: a ValueError saying why, never a crash ----------------------


FOREIGN = [
    b"",
    b"10.0.0.5",  # no port
    b"10.0.0.5:",
    b":8080",  # zrpc replaces an empty host before writing; nothing to dial
    b"10.0.0.5:0",
    b"10.0.0.5:65536",
    b"10.0.0.5:80a",
    b"10.0.0.5:+80",
    b"10.0.0.5:\xd9\xa8",  # an Arabic-Indic digit
    b"::1:8080",  # IPv6 without brackets
    b"[::1]",
    b"[::1]8080",
    b"[]:8080",
    b"[zz::1]:8080",
    b"http://10.0.0.5:8080",
    b"10.0.0.5:8080\n",
    b" 10.0.0.5:8080",
    b"h\xc3\xbcst:8080",  # "hüst:8080"
    b"\xff\xfe",
    b'{"service":"orders.rpc","id":"a","address":"h","port":1,"status":"passing"}',
    b'{"id":"1","name":"orders","version":"v1","metadata":{},"endpoints":["grpc://h:1"]}',
    b'{"name":"orders","nodes":[{"id":"n","address":"h:1","metadata":{}}]}',
]


@pytest.mark.parametrize("value", FOREIGN)
def test_foreign_values_are_a_clear_value_error(value: bytes) -> None:
    with pytest.raises(ValueError, match=r"expected") as info:
        FMT.decode("orders.rpc", "1", value)
    assert "Traceback" not in str(info.value)


def test_an_empty_entry_id_is_refused() -> None:
    with pytest.raises(ValueError, match="id"):
        FMT.decode("orders.rpc", "", b"10.0.0.5:8080")


def test_split_hostport_reads_like_go() -> None:
    assert split_hostport("h:1") == ("h", 1)
    assert split_hostport("[::ffff:10.0.0.5]:443") == ("::ffff:10.0.0.5", 443)
    with pytest.raises(ValueError, match="brackets"):
        split_hostport("fe80::1:80")


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "::%eth0"])
def test_unspecified_address_is_refused(address: str) -> None:
    # zeromicro/go-zero zrpc/internal/rpcpubserver.go figureOutListenOn (since 0452dba):
    # go-zero publishes POD_IP or the internal IP in place of 0.0.0.0.
    instance = ServiceInstance("orders.rpc", address=address, port=8080, id="1")
    with pytest.raises(ConfigError) as caught:
        EtcdBackend(format="go-zero").validate(instance)
    assert caught.value.field == "address"
    assert "replaces 0.0.0.0 by POD_IP" in str(caught.value)
    # Any other address, even one ending like it, is written.
    other = ServiceInstance("orders.rpc", address="10.0.0.0", port=8080, id="1")
    assert FMT.encode(other, HealthStatus.PASSING, "") == b"10.0.0.0:8080"


def test_two_keys_holding_one_value_stay_two_entries() -> None:
    # go-zero's container lists the value once; we keep each key (its own publisher and
    # lease): removing one must not remove the endpoint the other still publishes.
    one = FMT.decode("orders.rpc", "1", b"10.0.0.5:8080")
    two = FMT.decode("orders.rpc", "2", b"10.0.0.5:8080")
    assert one.instance.id != two.instance.id
    assert (one.instance.address, one.instance.port) == (two.instance.address, 8080)
