"""etcd format=go-micro against the bytes go-micro itself writes (no server).

Peer source read: micro/go-micro v6.10.0 and v5.30.0 (``registry/etcd``), go-micro/plugins
v4 (``v4/registry/etcd``), micro/go-micro v3.7.0 (``plugins/registry/etcd``) and v2.9.1
(``registry/etcd``); the layout is the same in all of them:

- ``registry/etcd/etcd.go`` ``nodePath``: ``path.Join("/micro/registry/", name, id)``
  with ``/`` replaced by ``-`` in both; ``registerNode`` puts ``encode(service)`` =
  ``json.Marshal`` of a ``registry.Service`` holding the one node, with a lease.
- ``registry/registry.go``: ``Service{name, version, metadata, endpoints, nodes}``,
  ``Node{metadata, id, address}`` (v4.10.2 and later; ``id, address, metadata``
  before), ``Endpoint{request, response, metadata, name}``, ``Value{name, type,
  values}``; no ``omitempty``.
- ``server/rpc_server.go`` ``Register``/``newNodeMetedata``/``getEndpoints``: node
  metadata ``broker``, ``protocol: mucp``, ``registry``, ``server``, ``transport``;
  service metadata nil; ``server/server.go`` ``DefaultVersion = "latest"``.
- Go's ``encoding/json``: struct fields in declaration order, map keys sorted,
  ``<``, ``>``, ``&``, U+2028/9 escaped as ``\\u003c``…, no spaces, other
  non-ASCII as UTF-8, invalid UTF-8 as ``\\ufffd``; ``Unmarshal`` matches struct
  fields ignoring case.

Every expected value below is written out by hand from those rules, not by our encoder,
and was checked against ``json.Marshal`` of go-micro v6.10.0's registry structs with
go1.19.8 (the GOLDEN values and RPC_SERVER byte for byte; ``Unmarshal``: keys ignoring
case with the last one winning, invalid UTF-8 as U+FFFD, ``null`` giving no service).
"""

from __future__ import annotations

import json

import pytest
from registry_agent_etcd import EtcdBackend
from registry_agent_etcd._format_gomicro import GoMicroFormat, go_json
from registry_agent_etcd._formats import load_format

from registry_agent import (
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Rejected,
    ServiceInstance,
    open_backend,
)

FMT = GoMicroFormat()
PASSING = HealthStatus.PASSING


def go_micro_key(name: str, node_id: str) -> bytes:
    """go-micro's nodePath(name, id) (registry/etcd/etcd.go)."""
    return f"/micro/registry/{name.replace('/', '-')}/{node_id.replace('/', '-')}".encode()


def our_key(instance: ServiceInstance) -> bytes:
    return EtcdBackend(format="go-micro")._key_of(instance)


def seen(instance: ServiceInstance) -> InstanceHealth:
    return InstanceHealth(instance, PASSING)


# -- the format and its options ---------------------------------------------------------


def test_loaded_by_name_with_go_micros_prefix_and_no_health() -> None:
    fmt = load_format("go-micro")
    assert isinstance(fmt, GoMicroFormat)
    assert (fmt.name, fmt.default_prefix, fmt.carries_health) == (
        "go-micro",
        "/micro/registry",
        False,
    )
    backend = open_backend("etcd://127.0.0.1:2379?format=go-micro")
    assert isinstance(backend, EtcdBackend)
    assert backend.prefix == "/micro/registry"
    assert isinstance(backend.format, GoMicroFormat)


def test_critical_is_refused_as_an_option_and_as_a_status() -> None:
    backend = EtcdBackend(format="go-micro")
    backend.validate_options(ttl=10, deregister_critical_after=None, on_unhealthy="deregister")
    with pytest.raises(ConfigError) as caught:
        backend.validate_options(ttl=10, deregister_critical_after=None, on_unhealthy="critical")
    assert caught.value.field == "on_unhealthy"
    assert "format=go-micro carries presence, not health" in str(caught.value)
    instance = ServiceInstance("orders", address="10.0.0.5", port=8080)
    with pytest.raises(Rejected, match="format=go-micro carries presence"):
        backend._value(instance, HealthStatus.CRITICAL, "down")


# -- writing: the exact bytes ------------------------------------------------------------

GOLDEN = [
    pytest.param(
        ServiceInstance(
            "orders",
            address="10.0.0.5",
            port=8080,
            id="orders-1",
            meta={"zone": "eu-1"},
            scheme="grpc",
            version="1.2.0",
        ),
        b"/micro/registry/orders/orders-1",
        b'{"name":"orders","version":"1.2.0","metadata":null,"endpoints":[],'
        b'"nodes":[{"metadata":{"protocol":"grpc","zone":"eu-1"},'
        b'"id":"orders-1","address":"10.0.0.5:8080"}]}',
        id="grpc-with-version",
    ),
    pytest.param(
        # No version: go-micro's server.DefaultVersion; no scheme: no protocol; an
        # empty meta is an empty map (go-micro's servers never write a nil one).
        ServiceInstance("orders", address="orders.internal", port=80, id="o2"),
        b"/micro/registry/orders/o2",
        b'{"name":"orders","version":"latest","metadata":null,"endpoints":[],'
        b'"nodes":[{"metadata":{},"id":"o2","address":"orders.internal:80"}]}',
        id="bare",
    ),
    pytest.param(
        ServiceInstance("orders.v2", address="2001:db8::1", port=9090, scheme="http"),
        b"/micro/registry/orders.v2/orders.v2-2001_db8__1-9090",
        b'{"name":"orders.v2","version":"latest","metadata":null,"endpoints":[],'
        b'"nodes":[{"metadata":{"protocol":"http"},"id":"orders.v2-2001_db8__1-9090",'
        b'"address":"[2001:db8::1]:9090"}]}',
        id="ipv6-bracketed",
    ),
    pytest.param(
        # Map keys sorted by their UTF-8 bytes: "a" < "z" < "é" < "東".
        ServiceInstance(
            "orders",
            address="10.0.0.5",
            port=8080,
            id="u",
            meta={"東": "京", "é": "zürich", "z": "ß", "a": "ü"},
        ),
        b"/micro/registry/orders/u",
        '{"name":"orders","version":"latest","metadata":null,"endpoints":[],'
        '"nodes":[{"metadata":{"a":"ü","z":"ß","é":"zürich","東":"京"},'
        '"id":"u","address":"10.0.0.5:8080"}]}'.encode(),
        id="unicode-sorted",
    ),
    pytest.param(
        # Go escapes <, > and & (HTML-safe), U+2028/U+2029, control characters;
        # the quote and the backslash as \" and \\; keys too.
        ServiceInstance(
            "orders",
            address="10.0.0.5",
            port=8080,
            id="h",
            meta={
                "<k>": "a&b",
                "html": '<a href="x">&amp;</a>',
                "lines": "1\n2\t3\r\x01\u2028\u2029\x7f",
                "path": "C:\\x",
            },
            version="1.0&<2>",
        ),
        b"/micro/registry/orders/h",
        b'{"name":"orders","version":"1.0\\u0026\\u003c2\\u003e","metadata":null,'
        b'"endpoints":[],"nodes":[{"metadata":{"\\u003ck\\u003e":"a\\u0026b",'
        b'"html":"\\u003ca href=\\"x\\"\\u003e\\u0026amp;\\u003c/a\\u003e",'
        b'"lines":"1\\n2\\t3\\r\\u0001\\u2028\\u2029\x7f","path":"C:\\\\x"},'
        b'"id":"h","address":"10.0.0.5:8080"}]}',
        id="go-escaping",
    ),
    pytest.param(
        # Tags are lost (a meta key "protocol" is refused: test_meta_protocol_is_refused).
        ServiceInstance(
            "orders",
            address="10.0.0.5",
            port=8080,
            id="t",
            tags=("blue", "canary"),
            scheme="grpcs",
        ),
        b"/micro/registry/orders/t",
        b'{"name":"orders","version":"latest","metadata":null,"endpoints":[],'
        b'"nodes":[{"metadata":{"protocol":"grpcs"},"id":"t","address":"10.0.0.5:8080"}]}',
        id="tags-lost",
    ),
]


@pytest.mark.parametrize(("instance", "key", "value"), GOLDEN)
def test_we_write_the_key_and_bytes_go_micro_writes(
    instance: ServiceInstance, key: bytes, value: bytes
) -> None:
    assert our_key(instance) == key == go_micro_key(instance.service, instance.id)
    assert FMT.encode(instance, PASSING, "a note is lost") == value
    # and what we wrote is valid JSON
    json.loads(value)


@pytest.mark.parametrize(("instance", "key", "value"), GOLDEN)
def test_the_peers_bytes_read_back_as_the_instance(
    instance: ServiceInstance, key: bytes, value: bytes
) -> None:
    entry_id = key.rsplit(b"/", 1)[1].decode()
    got = FMT.decode(instance.service, entry_id, value)
    lost_tags = ServiceInstance.from_registry(
        service=instance.service,
        id=instance.id,
        address=instance.address,
        port=instance.port,
        meta={k: v for k, v in instance.meta.items() if k != "protocol"}
        if instance.scheme
        else instance.meta,
        scheme=instance.scheme,
        version=instance.version,
    )
    assert got == seen(lost_tags)


def test_an_instance_without_tags_round_trips_exactly() -> None:
    for version in ("", "2.0.1"):
        for scheme in ("", "http", "https", "grpc", "grpcs", "mucp"):
            instance = ServiceInstance(
                "orders",
                address="::1",
                port=1,
                meta={"zone": "eu", "weight": "10"},
                scheme=scheme,
                version=version,
            )
            back = FMT.decode("orders", FMT.entry_id(instance), FMT.encode(instance, PASSING, ""))
            assert back == seen(instance)


def test_an_address_already_in_brackets_is_not_bracketed_twice() -> None:
    instance = ServiceInstance("orders", address="[::1]", port=80, id="b")
    assert b'"address":"[::1]:80"' in FMT.encode(instance, PASSING, "")


def test_go_json_replaces_a_lone_surrogate_as_go_does_invalid_utf8() -> None:
    assert go_json({"a": "x\ud800y"}) == b'{"a":"x\\ufffdy"}'
    # Go 1.22+ writes \b and \f short, like Python.
    assert go_json({"a": "\b\f"}) == b'{"a":"\\b\\f"}'


# -- reading what go-micro servers write ------------------------------------------------

# A go-micro v5/v6 rpc server "helloworld" with one handler method, as
# server/rpc_server.go Register and registry/etcd registerNode write it (Endpoint:
# request, response, metadata, name; Value: name, type, values).
RPC_SERVER = (
    b'{"name":"helloworld","version":"latest","metadata":null,"endpoints":[{"request":'
    b'{"name":"Request","type":"Request","values":[{"name":"name","type":"string",'
    b'"values":null}]},"response":{"name":"Response","type":"Response","values":'
    b'[{"name":"msg","type":"string","values":null}]},"metadata":{},"name":'
    b'"Helloworld.Call"}],"nodes":[{"metadata":{"broker":"http","protocol":"mucp",'
    b'"registry":"etcd","server":"mucp","transport":"http"},"id":'
    b'"helloworld-6f1b6a2e-3c8e-4b8a-9a53-5d7a8e0c1f22","address":"192.168.1.7:39581"}]}'
)


def test_a_go_micro_rpc_server_reads_as_an_instance() -> None:
    node_id = "helloworld-6f1b6a2e-3c8e-4b8a-9a53-5d7a8e0c1f22"
    got = FMT.decode("helloworld", node_id, RPC_SERVER)
    assert got == seen(
        ServiceInstance.from_registry(
            service="helloworld",
            id=node_id,
            address="192.168.1.7",
            port=39581,
            meta={"broker": "http", "registry": "etcd", "server": "mucp", "transport": "http"},
            scheme="mucp",
        )
    )


def test_a_grpc_server_with_a_version_and_service_metadata() -> None:
    value = (
        b'{"name":"greeter","version":"v3","metadata":{"owner":"team-a"},"endpoints":null,'
        b'"nodes":[{"metadata":{"protocol":"grpc","zone":"eu"},"id":"greeter-1",'
        b'"address":"[fe80::1]:8080"}]}'
    )
    got = FMT.decode("greeter", "greeter-1", value)
    # The service metadata is not read: go-micro's clients read the node's.
    assert got == seen(
        ServiceInstance.from_registry(
            service="greeter",
            id="greeter-1",
            address="fe80::1",
            port=8080,
            meta={"zone": "eu"},
            scheme="grpc",
            version="v3",
        )
    )


def test_older_field_orders_and_the_port_field_before_v1_8() -> None:
    # v4.10.1 and older: Node{id, address, metadata}.
    v3 = (
        b'{"name":"orders","version":"latest","metadata":null,"endpoints":[],'
        b'"nodes":[{"id":"o1","address":"10.0.0.5:8080","metadata":{"protocol":"mucp"}}]}'
    )
    # v1.7 and older: Node{id, address, port, metadata} with a bare host.
    v1 = (
        b'{"name":"orders","version":"1.0","metadata":null,"endpoints":[],'
        b'"nodes":[{"id":"o1","address":"10.0.0.5","port":8080,"metadata":null}]}'
    )
    expected = ServiceInstance.from_registry(
        service="orders", id="o1", address="10.0.0.5", port=8080, scheme="mucp"
    )
    assert FMT.decode("orders", "o1", v3) == seen(expected)
    assert FMT.decode("orders", "o1", v1).instance == ServiceInstance.from_registry(
        service="orders", id="o1", address="10.0.0.5", port=8080, version="1.0"
    )


def test_keys_match_ignoring_case_like_gos_unmarshal() -> None:
    value = b'{"Name":"orders","VERSION":"2","Nodes":[{"Id":"o1","Address":"h:1"}]}'
    assert FMT.decode("orders", "o1", value).instance == ServiceInstance.from_registry(
        service="orders", id="o1", address="h", port=1, version="2"
    )


def test_of_several_nodes_the_one_named_by_the_key_is_read() -> None:
    value = (
        b'{"name":"orders","version":"latest","metadata":null,"endpoints":[],"nodes":['
        b'{"metadata":{},"id":"a","address":"10.0.0.1:1"},'
        b'{"metadata":{"k":"v"},"id":"b","address":"10.0.0.2:2"}]}'
    )
    got = FMT.decode("orders", "b", value).instance
    assert (got.id, got.address, got.port, dict(got.meta)) == ("b", "10.0.0.2", 2, {"k": "v"})


def test_slashes_in_names_and_ids_are_dashes_in_the_key() -> None:
    # go-micro writes the name and id as given, the key with '-' (nodePath).
    value = (
        b'{"name":"team/orders","version":"latest","metadata":null,"endpoints":[],'
        b'"nodes":[{"metadata":{},"id":"node/1","address":"10.0.0.1:1"}]}'
    )
    assert go_micro_key("team/orders", "node/1") == b"/micro/registry/team-orders/node-1"
    got = FMT.decode("team-orders", "node-1", value).instance
    assert (got.service, got.id) == ("team-orders", "node-1")


def test_a_node_without_a_port_is_port_zero() -> None:
    # go-micro writes a bare host for a queue name (internal/util/net HostPort).
    value = b'{"name":"q","nodes":[{"metadata":null,"id":"n","address":"[::1]"}]}'
    got = FMT.decode("q", "n", value).instance
    assert (got.address, got.port) == ("::1", 0)


def test_invalid_utf8_reads_as_the_replacement_character() -> None:
    value = b'{"name":"q","nodes":[{"metadata":{"k":"a\xffb"},"id":"n","address":"h:1"}]}'
    assert dict(FMT.decode("q", "n", value).instance.meta) == {"k": "a\ufffdb"}


# -- foreign and broken values: a clear ValueError ----------------------------------------

BAD = [
    (b"\xff\xfe not json", "expected go-micro's service JSON"),
    (b"10.0.0.5:8080", "expected go-micro's service JSON"),
    (b"null", "expected go-micro's service JSON object, got None"),
    (b"[1, 2]", "expected go-micro's service JSON object"),
    (b'{"name":"users","nodes":[]}', "service.name 'users' under 'orders'"),
    (b'{"name":"orders"}', "service.nodes: expected a list of nodes, got None"),
    (b'{"name":"orders","nodes":{}}', "service.nodes: expected a list of nodes"),
    (b'{"name":"orders","nodes":[]}', "no node has the key's id 'o1'"),
    (b'{"name":"orders","nodes":[1]}', r"service.nodes\[0\]: expected an object"),
    (
        b'{"name":"orders","nodes":[{"id":"other","address":"h:1"}]}',
        "no node has the key's id 'o1'",
    ),
    (b'{"name":"orders","nodes":[{"id":"o1"}]}', r"nodes\[0\].address: expected host:port"),
    (b'{"name":"orders","nodes":[{"id":"o1","address":7}]}', r"nodes\[0\].address: expected a"),
    (b'{"name":5,"nodes":[]}', "service.name: expected a string, got 5"),
    (b'{"service":"orders","id":"o1"}', "service.name: expected the service's name, got none"),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"h:99999"}]}',
        "expected a port 0-65535",
    ),
    (b'{"name":"orders","nodes":[{"id":"o1","address":"h:x"}]}', "expected a port 0-65535"),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"http://h:80"}]}',
        "expected host:port as the node address",
    ),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"[::1:80"}]}',
        r"expected \[ipv6\]:port",
    ),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"h","port":"80"}]}',
        "expected the node's port as an integer",
    ),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"h:1","metadata":{"k":1}}]}',
        r"nodes\[0\].metadata.k: expected a string, got 1",
    ),
    (
        b'{"name":"orders","nodes":[{"id":"o1","address":"h:1","metadata":["k"]}]}',
        r"nodes\[0\].metadata: expected an object of strings",
    ),
]


@pytest.mark.parametrize(("value", "message"), BAD)
def test_a_foreign_value_is_a_clear_value_error(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FMT.decode("orders", "o1", value)


def test_the_backend_skips_a_foreign_value() -> None:
    backend = EtcdBackend(format="go-micro")
    key = b"/micro/registry/orders/o1"
    assert backend._parse("orders", key, b"[]") is None
    assert backend._parse("orders", key, b'{"name":"orders","nodes":[]}') is None
    good = b'{"name":"orders","nodes":[{"id":"o1","address":"h:1"}]}'
    parsed = backend._parse("orders", key, good)
    assert parsed is not None
    assert parsed.instance.address == "h"


def test_meta_protocol_is_refused() -> None:
    # Written, the scheme overwrote it ('mucp' read back as grpc, meta {}): the Consul
    # go-micro flavor refuses it with these words, and so does the etcd format, through
    # the backend's validate() as well.
    instance = ServiceInstance(
        "orders", address="10.0.0.5", port=8080, scheme="grpc", meta={"protocol": "mucp"}
    )
    for call in (
        lambda: FMT.encode(instance, PASSING, ""),
        lambda: EtcdBackend(format="go-micro").validate(instance),
    ):
        with pytest.raises(Rejected, match=r"^meta\.protocol: go-micro's 'protocol' metadata"):
            call()


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "0:0:0:0:0:0:0:0", "[::]"])
def test_unspecified_address_is_refused(address: str) -> None:
    instance = ServiceInstance("orders", address=address, port=8080, id="a")
    with pytest.raises(ConfigError) as caught:
        EtcdBackend(format="go-micro").validate(instance)
    assert caught.value.field == "address"
    assert "every interface" in str(caught.value)
