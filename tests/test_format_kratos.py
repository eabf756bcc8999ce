"""format=kratos golden bytes, both ways, no server.

The expected values are what go-kratos/kratos writes (read at v3.0.0, commit
668db92c; the same since v2.1.0 but for TLS endpoints, see the module):
``contrib/registry/etcd/service.go`` ``marshal`` is ``json.Marshal`` of
``registry/registry.go`` ``ServiceInstance`` (id, name, version, metadata,
endpoints; no omitempty), endpoints from ``internal/endpoint/endpoint.go``
``NewEndpoint`` (``url.URL{Scheme, Host}.String()``, host from
``net.JoinHostPort``). They were checked against Go 1.19.8's encoding/json and
net/url run on a struct with kratos's field tags; Go 1.22 and later (kratos v3
needs Go 1.25) write ``\\b``/``\\f`` where 1.19 wrote ``\\u0008``/``\\u000c``.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from registry_agent_etcd import EtcdBackend
from registry_agent_etcd._format_kratos import KratosFormat, endpoint_url, parse_endpoint

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance, open_backend

PASSING = HealthStatus.PASSING
FMT = KratosFormat()

# (what we register, the bytes kratos's marshal writes for it)
GOLDEN = [
    (
        ServiceInstance(
            "orders",
            address="10.0.0.1",
            port=9000,
            scheme="grpc",
            version="v1.2.3",
            meta={"zone": "eu-1", "app": "shop"},
        ),
        b'{"id":"orders-10.0.0.1-9000","name":"orders","version":"v1.2.3",'
        b'"metadata":{"app":"shop","zone":"eu-1"},"endpoints":["grpc://10.0.0.1:9000"]}',
    ),
    (  # IPv6 bracketed (net.JoinHostPort); no meta: a nil map, as a kratos app without Metadata
        ServiceInstance("orders", address="::1", port=8080, id="orders-1", scheme="http"),
        b'{"id":"orders-1","name":"orders","version":"","metadata":null,'
        b'"endpoints":["http://[::1]:8080"]}',
    ),
    (  # an IPv6 zone: url.URL.String() escapes % in the host as %25
        ServiceInstance("orders", address="fe80::1%eth0", port=443, id="o-2", scheme="https"),
        b'{"id":"o-2","name":"orders","version":"","metadata":null,'
        b'"endpoints":["https://[fe80::1%25eth0]:443"]}',
    ),
    (  # HTML escapes, U+2028/9, controls, raw UTF-8, keys sorted bytewise; non-ASCII host %XX
        ServiceInstance(
            "orders",
            address="bücher.example",
            port=1,
            id="o",
            scheme="grpcs",
            meta={
                "q": "a<b>&c",
                "zü": "zürich ☃",
                "ctl": 'a"b\\c\n\t\r\x01\x7f\u2028\u2029',
                "Z": "upper",
                "é": "e",
            },
        ),
        '{"id":"o","name":"orders","version":"","metadata":{"Z":"upper",'
        '"ctl":"a\\"b\\\\c\\n\\t\\r\\u0001\x7f\\u2028\\u2029","q":"a\\u003cb\\u003e\\u0026c",'
        '"zü":"zürich ☃","é":"e"},"endpoints":["grpcs://b%C3%BCcher.example:1"]}'.encode(),
    ),
    (  # Go 1.22+: \b and \f short
        ServiceInstance("orders", address="h", port=1, id="o", scheme="grpc", meta={"bf": "\b\f"}),
        b'{"id":"o","name":"orders","version":"","metadata":{"bf":"\\b\\f"},'
        b'"endpoints":["grpc://h:1"]}',
    ),
]


@pytest.mark.parametrize(("instance", "value"), GOLDEN)
def test_encode_is_what_kratos_writes(instance: ServiceInstance, value: bytes) -> None:
    assert FMT.entry_id(instance) == instance.id
    assert FMT.encode(instance, PASSING, "") == value


@pytest.mark.parametrize(("instance", "value"), GOLDEN)
def test_kratos_bytes_decode_to_the_instance(instance: ServiceInstance, value: bytes) -> None:
    assert FMT.decode("orders", instance.id, value) == InstanceHealth(instance, PASSING)


def test_what_is_lost() -> None:
    """Tags are dropped; an empty scheme is written (and read back) as http; note/status too."""
    ours = ServiceInstance("orders", address="10.0.0.1", port=80, tags=("a", "b"), meta={"k": "v"})
    value = FMT.encode(ours, PASSING, "a note")
    assert json.loads(value)["endpoints"] == ["http://10.0.0.1:80"]
    assert b"a note" not in value
    assert b'"a"' not in value
    read = FMT.decode("orders", ours.id, value)
    assert read.instance.tags == ()
    assert read.instance.scheme == "http"
    assert read.instance.meta == {"k": "v"}
    assert read.status is PASSING
    assert KratosFormat.carries_health is False


# A kratos app serving HTTP and gRPC (app.go buildInstance: one endpoint per server,
# in the order of kratos.Server(...)); id a uuid, no version, no metadata.
KRATOS_APP = (
    b'{"id":"5e5a0bd6-8f3a-11ee-b9d1-0242ac120002","name":"orders","version":"",'
    b'"metadata":null,"endpoints":["http://10.0.0.7:8000","grpc://10.0.0.7:9000"]}'
)
APP_ID = "5e5a0bd6-8f3a-11ee-b9d1-0242ac120002"


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (None, ("http", 8000)),  # the first endpoint
        ("grpc", ("grpc", 9000)),
        ("GRPC", ("grpc", 9000)),  # Go lower-cases URL schemes: so do we
        ("http", ("http", 8000)),
        ("grpcs", ("http", 8000)),  # none of that scheme: the first, which says it is http
    ],
)
def test_scheme_option_chooses_the_endpoint(scheme: str | None, expected: tuple[str, int]) -> None:
    read = KratosFormat(scheme=scheme).decode("orders", APP_ID, KRATOS_APP).instance
    assert (read.scheme, read.port) == expected
    assert read.address == "10.0.0.7"
    assert read.id == APP_ID
    assert read.meta == {}


def test_legacy_is_secure_query_reads_as_tls() -> None:
    """kratos v2.1.0-v2.3.0 marked TLS with ?isSecure=true (internal/endpoint NewEndpoint)."""
    value = (
        b'{"id":"a","name":"orders","version":"v2","metadata":{},'
        b'"endpoints":["http://10.0.0.7:8000?isSecure=true","grpc://10.0.0.7:9000?isSecure=1"]}'
    )
    read = KratosFormat(scheme="grpcs").decode("orders", "a", value).instance
    assert (read.scheme, read.port, read.version) == ("grpcs", 9000, "v2")
    assert KratosFormat().decode("orders", "a", value).instance.scheme == "https"
    plain = value.replace(b"=1", b"=false")
    assert KratosFormat(scheme="grpc").decode("orders", "a", plain).instance.scheme == "grpc"


def test_go_decoder_rules() -> None:
    """json.Unmarshal: case-insensitive field names, the last one wins, null changes
    nothing, unknown fields ignored, invalid UTF-8 becomes U+FFFD, a null map value is ""."""
    value = (
        b'{"ID":"x","id":"a","Name":"orders","version":null,"extra":[1,{}],'
        b'"metadata":{"k":null,"bad":"\xff"},"Endpoints":["grpc://h:1"]}'
    )
    read = FMT.decode("orders", "a", value).instance
    assert read.id == "a"
    assert read.version == ""
    assert read.meta == {"k": "", "bad": "\ufffd"}
    old_go = (
        b'{"id":"o","name":"orders","metadata":{"bf":"\\u0008\\u000c"},"endpoints":["grpc://h:1"]}'
    )
    assert FMT.decode("orders", "o", old_go).instance.meta == {"bf": "\b\f"}


def test_endpoint_parsing_follows_go_url_parse() -> None:
    assert parse_endpoint("GRPC://u:p@H:1/x?y#z") == ("grpc", "H", 1)
    assert parse_endpoint("https://b%C3%BCcher.example:1") == ("https", "bücher.example", 1)
    assert parse_endpoint("grpc://[::1]:9000") == ("grpc", "::1", 9000)
    assert parse_endpoint("grpc://h") == ("grpc", "h", 0)  # no port: 0, as our model says
    assert parse_endpoint("grpc://h:") == ("grpc", "h", 0)
    instance = ServiceInstance("orders", address="2001:db8::7", port=50051, scheme="grpcs")
    assert endpoint_url(instance) == "grpcs://[2001:db8::7]:50051"


FOREIGN = [
    (b"\xff\xfe not json", "Expecting value"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (b"null", "expected a JSON object"),  # kratos's own reader dereferences nil here
    (b'"orders"', "expected a JSON object"),
    (b'{"id":5,"name":"orders","endpoints":["grpc://h:1"]}', "id: expected a string"),
    (b'{"id":"a","name":"users","endpoints":["grpc://h:1"]}', "name 'users' under 'orders'"),
    (b'{"id":"other","name":"orders","endpoints":["grpc://h:1"]}', "does not match the key"),
    (b'{"id":"a","name":"orders","metadata":[],"endpoints":["grpc://h:1"]}', "metadata"),
    (b'{"id":"a","name":"orders","metadata":{"k":1},"endpoints":["grpc://h:1"]}', "metadata.k"),
    (b'{"id":"a","name":"orders","endpoints":"grpc://h:1"}', "endpoints"),
    (b'{"id":"a","name":"orders","endpoints":{}}', "endpoints"),
    (b'{"id":"a","name":"orders","endpoints":[]}', "no endpoints"),
    (b'{"id":"a","name":"orders"}', "no endpoints"),
    (b'{"id":"a","name":"orders","endpoints":[5]}', "expected URL strings"),
    (b'{"id":"a","name":"orders","endpoints":["10.0.0.1:9000"]}', "has no scheme"),
    (b'{"id":"a","name":"orders","endpoints":["grpc:h:1"]}', "has no host"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h:x"]}', "bad port"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h:99999"]}', "out of range"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h:\xc2\xb2"]}', "bad port"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://[::1:9"]}', "missing ']'"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://[::1]x"]}', "bad port"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h%41:1"]}', "escaped ASCII"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h%4:1"]}', "bad escape"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h h:1"]}', "invalid character"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://h\\n:1"]}', "control character"),
    (b'{"id":"a","name":"orders","endpoints":["grpc://:1"]}', "address"),
    (b'{"id":"","name":"orders","endpoints":["grpc://h:1"]}', "does not match"),
]


@pytest.mark.parametrize(("value", "words"), FOREIGN)
def test_foreign_values_raise_a_clear_value_error(value: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        FMT.decode("orders", "a", value)


def test_a_bad_endpoint_after_the_chosen_one_is_never_read() -> None:
    """Like ParseEndpoint: endpoints are parsed in order up to the chosen one."""
    value = b'{"id":"a","name":"orders","endpoints":["grpc://h:1","::bad::"]}'
    assert FMT.decode("orders", "a", value).instance.port == 1
    with pytest.raises(ValueError, match="no scheme"):
        KratosFormat(scheme="http").decode("orders", "a", value)


@pytest.mark.parametrize("scheme", ["", "1grpc", "grpc://", "g rpc", "grpc\n", 5])
def test_a_bad_scheme_option_names_the_field(scheme: object) -> None:
    with pytest.raises(ConfigError) as caught:
        KratosFormat(scheme=scheme)  # type: ignore[arg-type]
    assert caught.value.field == "backend.scheme"


def test_backend_options() -> None:
    backend = open_backend("etcd://127.0.0.1:2379?format=kratos&scheme=grpc")
    assert isinstance(backend, EtcdBackend)
    assert isinstance(backend.format, KratosFormat)
    assert backend.format.scheme == "grpc"
    instance = ServiceInstance("orders", address="h", port=1, id="i-1")
    assert backend._key_of(instance) == b"/microservices/orders/i-1"
    with pytest.raises(ConfigError) as caught:
        backend.validate_options(ttl=10, deregister_critical_after=None, on_unhealthy="critical")
    assert caught.value.field == "on_unhealthy"
    assert "format=kratos" in str(caught.value)
    plain = open_backend("etcd://127.0.0.1:2379?format=kratos&prefix=/team/ms")
    assert isinstance(plain, EtcdBackend)
    assert isinstance(plain.format, KratosFormat)
    assert plain.format.scheme is None
    assert plain._key_of(instance) == b"/team/ms/orders/i-1"


_text = st.text(st.characters(codec="utf-8"), max_size=12)
_label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)


@given(
    address=st.one_of(
        st.ip_addresses().filter(lambda ip: not ip.is_unspecified).map(str),
        _label.map(lambda s: s + ".example"),
    ),
    port=st.integers(1, 65535),
    scheme=st.sampled_from(["http", "https", "grpc", "grpcs", "ws"]),
    version=st.text(string.ascii_letters + string.digits + ".-+<>&", max_size=10),
    meta=st.dictionaries(_text.filter(bool), _text, max_size=4),
)
def test_round_trip_and_plain_json(
    address: str, port: int, scheme: str, version: str, meta: dict[str, str]
) -> None:
    """What we write reads back as the instance (less its tags) and is valid JSON of
    kratos's fields, in struct order."""
    ours = ServiceInstance(
        "orders", address=address, port=port, scheme=scheme, version=version, meta=meta
    )
    value = FMT.encode(ours, PASSING, "")
    assert FMT.decode("orders", ours.id, value) == InstanceHealth(ours, PASSING)
    data = json.loads(value)
    assert list(data) == ["id", "name", "version", "metadata", "endpoints"]
    assert (data["metadata"] or {}) == meta
    assert data["version"] == version
    assert b"<" not in value
    assert b">" not in value
    assert b"&" not in value


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_unspecified_address_is_refused(address: str) -> None:
    instance = ServiceInstance("orders", address=address, port=9000, id="a", scheme="grpc")
    with pytest.raises(ConfigError) as caught:
        EtcdBackend(format="kratos").validate(instance)
    assert caught.value.field == "address"
    assert "kratos servers publish their own IP" in str(caught.value)
