"""Consul flavors, golden both ways: the payloads each peer's own code registers, read by
``read_instance``; what ``write_entry`` writes, read by each peer's own rules.

Peers (read with the library tools; versions say where the shape is the same):

- go-kratos/kratos contrib/registry/consul/client.go, v2.4.0 to v3.0.0 (668db92c2):
  ``Client.Register`` and ``defaultResolver``.
- go-micro/plugins v4/registry/consul/consul.go (v2 to v5, 6026888): ``Register``,
  ``GetService``; the tag codec is ``_gomicro``'s (its own golden tests).
- spring-cloud/spring-cloud-consul v3.1.0 to v5.0.2 (f008a118):
  ``ConsulAutoRegistration.registration``/``getMetadata``/``normalizeForDns``,
  ``ConsulServiceInstance.getSecure``, ``ConsulServerUtils.findHost``.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from registry_agent_consul import ConsulBackend
from registry_agent_consul._decode import CatalogEntry, ServiceView, TaggedAddress, decode_catalog
from registry_agent_consul._flavors import (
    FLAVORS,
    read_instance,
    read_written,
    validate_flavor,
    write_entry,
)
from registry_agent_consul._heartbeat import Member, ReadBack, alias_id, entry_differs

from registry_agent import (
    ConfigError,
    HealthStatus,
    Lease,
    Rejected,
    ServiceInstance,
    open_backend,
)
from registry_agent._agent.config import load_config
from registry_agent._agent.runtime import open_configured_backend
from registry_agent._cli import main

# What Consul's agent adds to a service registered with an IPv4 address (agent.go
# addServiceInternal, Consul 1.5+): a reader must skip them.
CONSUL_OWN = {
    "lan_ipv4": {"Address": "10.0.0.5", "Port": 8000},
    "wan_ipv4": {"Address": "10.0.0.5", "Port": 8000},
}


def read(payload: Mapping[str, Any], *, tagged: Mapping[str, Any] | None = None) -> ServiceInstance:
    """``read_instance`` of a service as Consul holds it (Meta/Tags null when empty)."""
    return read_instance(
        service=payload["Name"],
        id=payload["ID"],
        address=payload.get("Address") or "",
        port=payload.get("Port") or 0,
        tags=payload.get("Tags") or (),
        meta=payload.get("Meta") or {},
        tagged_addresses={**(payload.get("TaggedAddresses") or {}), **(tagged or {})},
        node="node-1",
    )


# -- kratos ---------------------------------------------------------------------------


def kratos_register(
    *,
    id: str,
    name: str,
    version: str,
    metadata: dict[str, str],
    endpoints: list[str],
    tags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The AgentServiceRegistration kratos's ``Client.Register`` sends (without checks):
    tag ``version=<v>`` then the client's tags (v2.9.0+); a tagged address per URL
    scheme holding the URL and its port; Address/Port from the first endpoint."""
    tagged = {}
    for endpoint in endpoints:
        url = urllib.parse.urlsplit(endpoint)
        tagged[url.scheme] = {"Address": endpoint, "Port": url.port}
    first = urllib.parse.urlsplit(endpoints[0])
    return {
        "ID": id,
        "Name": name,
        "Tags": [f"version={version}", *tags],
        "Address": first.hostname,
        "Port": first.port,
        "TaggedAddresses": tagged,
        "Meta": metadata,
    }


def kratos_resolve(service: Mapping[str, Any]) -> dict[str, Any]:
    """kratos ``defaultResolver`` over one ``Service`` of a health entry: version from
    the (last) ``version=`` tag, endpoints from tagged addresses but Consul's four,
    else ``http://Address:Port``; Metadata is Meta."""
    version = ""
    for tag in service.get("Tags") or ():
        key, sep, value = tag.partition("=")
        if sep and key == "version":
            version = value
    skip = {"lan_ipv4", "wan_ipv4", "lan_ipv6", "wan_ipv6"}
    endpoints = [
        a["Address"] for k, a in (service.get("TaggedAddresses") or {}).items() if k not in skip
    ]
    if not endpoints and service.get("Address") and service.get("Port"):
        endpoints = [f"http://{service['Address']}:{service['Port']}"]
    return {
        "id": service["ID"],
        "name": service["Service"],
        "version": version,
        "metadata": service.get("Meta") or {},
        "endpoints": sorted(endpoints),
    }


def as_held(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A registration as Consul's agent then holds it (``Service``, its own tagged addresses)."""
    held = {**payload, "Service": payload["Name"]}
    held["TaggedAddresses"] = {
        **(payload.get("TaggedAddresses") or {}),
        "lan_ipv4": {"Address": payload["Address"], "Port": payload["Port"]},
        "wan_ipv4": {"Address": payload["Address"], "Port": payload["Port"]},
    }
    return held


def test_kratos_http_and_grpc_service_reads_as_its_first_endpoint() -> None:
    payload = kratos_register(
        id="6f9a1c2e",
        name="helloworld",
        version="v1.0.0",
        metadata={"region": "eu"},
        endpoints=["http://10.0.0.5:8000", "grpc://10.0.0.5:9000"],
    )
    assert payload == {
        "ID": "6f9a1c2e",
        "Name": "helloworld",
        "Tags": ["version=v1.0.0"],
        "Address": "10.0.0.5",
        "Port": 8000,
        "TaggedAddresses": {
            "http": {"Address": "http://10.0.0.5:8000", "Port": 8000},
            "grpc": {"Address": "grpc://10.0.0.5:9000", "Port": 9000},
        },
        "Meta": {"region": "eu"},
    }
    instance = read(payload, tagged=CONSUL_OWN)
    assert instance == ServiceInstance.from_registry(
        service="helloworld",
        id="6f9a1c2e",
        address="10.0.0.5",
        port=8000,
        meta={"region": "eu"},
        scheme="http",
        version="v1.0.0",
    )
    assert instance.node == "node-1"


def test_kratos_grpc_first_reads_as_grpc() -> None:
    payload = kratos_register(
        id="a1",
        name="helloworld",
        version="v2",
        metadata={},
        endpoints=["grpc://10.0.0.5:9000", "http://10.0.0.5:8000"],
        tags=("canary",),
    )
    instance = read(payload, tagged=CONSUL_OWN)
    assert (instance.scheme, instance.port, instance.version) == ("grpc", 9000, "v2")
    assert instance.tags == ("canary",)


def test_kratos_endpoint_not_on_the_service_address_first_by_scheme_name() -> None:
    payload = kratos_register(
        id="a1", name="s", version="", metadata={}, endpoints=["https://10.0.0.9:8443"]
    )
    payload["TaggedAddresses"]["grpcs"] = {"Address": "grpcs://10.0.0.8:9443", "Port": 9443}
    payload["Address"], payload["Port"] = "10.0.0.1", 1  # neither endpoint
    instance = read(payload)
    assert (instance.scheme, instance.address, instance.port) == ("grpcs", "10.0.0.8", 9443)
    assert instance.version == ""
    assert instance.tags == ()  # "version=" taken out


def test_kratos_ipv6_endpoint_and_odd_tagged_addresses() -> None:
    payload = kratos_register(
        id="a1", name="s", version="1", metadata={}, endpoints=["grpc://[fd00::5]:9000"]
    )
    assert payload["Address"] == "fd00::5"
    odd = {
        "lan": {"Address": "grpc://10.9.9.9:1", "Port": 1},  # Consul's own key: skipped
        "custom": {"Address": "not a url", "Port": 5},  # not an endpoint: skipped
        "bad": {"Address": "http://[::1", "Port": 5},  # unparseable: skipped
    }
    instance = read(payload, tagged=odd)
    assert (instance.scheme, instance.address, instance.port) == ("grpc", "fd00::5", 9000)


def test_kratos_last_version_tag_wins_and_odd_ones_stay_tags() -> None:
    payload = {
        "ID": "a",
        "Name": "s",
        "Address": "h",
        "Port": 1,
        "Tags": ["version=1", "x", "version=2", "version=with space"],
        "TaggedAddresses": {"grpc": {"Address": "grpc://h:1", "Port": 1}},
    }
    instance = read(payload)
    assert instance.version == "2"
    assert instance.tags == ("x", "version=with space")


def test_version_tags_of_an_entry_kratos_did_not_write_stay_tags() -> None:
    """kratos always writes its endpoints as URLs in TaggedAddresses: without one, a
    'version=' tag is someone's plain tag (ours, with no scheme or version set)."""
    payload = {"ID": "a", "Name": "s", "Address": "h", "Port": 1, "Tags": ["version=2024.1"]}
    instance = read(payload)
    assert (instance.version, instance.tags) == ("", ("version=2024.1",))
    ours = ServiceInstance("s", address="h", port=1, tags=("version=2024.1", "team"))
    assert read_written(write_entry(ours)) == ours


def test_kratos_write_is_what_kratos_register_sends() -> None:
    instance = ServiceInstance(
        "helloworld",
        id="6f9a1c2e",
        address="10.0.0.5",
        port=9000,
        scheme="grpc",
        version="v1.0.0",
        meta={"region": "eu"},
        tags=("canary",),
    )
    expected = kratos_register(
        id="6f9a1c2e",
        name="helloworld",
        version="v1.0.0",
        metadata={"region": "eu"},
        endpoints=["grpc://10.0.0.5:9000"],
        tags=("canary",),
    )
    assert write_entry(instance, "kratos") == expected
    # kratos reads it back as the instance meant.
    assert kratos_resolve(as_held(expected)) == {
        "id": "6f9a1c2e",
        "name": "helloworld",
        "version": "v1.0.0",
        "metadata": {"region": "eu"},
        "endpoints": ["grpc://10.0.0.5:9000"],
    }
    assert read_written(expected) == instance


def test_kratos_write_without_scheme_or_version() -> None:
    instance = ServiceInstance("s", address="fd00::1", port=80)
    payload = write_entry(instance, "kratos")
    assert payload["Tags"] == ["version="]  # kratos writes it even when empty
    # A kratos server always has an endpoint URL: no scheme said is http, as kratos reads it.
    assert payload["TaggedAddresses"] == {"http": {"Address": "http://[fd00::1]:80", "Port": 80}}
    assert kratos_resolve(as_held(payload))["endpoints"] == ["http://[fd00::1]:80"]
    grpc = write_entry(dataclasses.replace(instance, scheme="grpc"), "kratos")
    assert grpc["TaggedAddresses"] == {"grpc": {"Address": "grpc://[fd00::1]:80", "Port": 80}}
    assert read_written(payload) == dataclasses.replace(instance, scheme="http")


def test_kratos_refuses_a_version_tag() -> None:
    instance = ServiceInstance("s", address="h", port=1, tags=("version=3",))
    with pytest.raises(Rejected, match=r"tags: 'version=3'.*set the instance's version"):
        validate_flavor(instance, "kratos")
    validate_flavor(instance, "registry-agent")  # ours: read back as the version (lookup copes)


# -- go-micro -------------------------------------------------------------------------

# Made by Go 1.19's compress/zlib + encoding/hex as go-micro's encode() does
# (go-micro/plugins v4/registry/consul/encoding.go): {"region":"eu"},
# {"protocol":"grpc"}, version 1.0.1.
MICRO_REGION = "t-789caa562a4a4dcfcccf53b2524a2d55aa05040000ffff2a2c0519"
MICRO_PROTOCOL = "t-789caa562a28ca2fc94fcecf51b2524a2f2a4856aa05040000ffff468306d9"
MICRO_VERSION = "v-789c32d433d03304040000ffff02cf00ef"


def micro_view(service: Mapping[str, Any]) -> dict[str, Any]:
    """go-micro v4 ``GetService``: ``decodeVersion`` (the first ``v-``/``v=`` tag),
    ``decodeMetadata`` (``t`` tags of the first one's form), Address:Port."""
    version = None
    metadata: dict[str, str] = {}
    form = ""
    for tag in service.get("Tags") or ():
        if version is None and len(tag) >= 2 and tag[0] == "v" and tag[1] in "-=":
            version = tag[2:] if tag[1] == "=" else zlib.decompress(bytes.fromhex(tag[2:])).decode()
        if tag[:1] == "t":
            form = form or tag[1]
            if tag[1] == form:
                raw = tag[2:].encode() if form == "=" else zlib.decompress(bytes.fromhex(tag[2:]))
                metadata.update(json.loads(raw))
    return {
        "version": version or "",
        "metadata": metadata,
        "address": f"{service['Address']}:{service['Port']}",
    }


def test_go_micro_v4_grpc_service_reads_with_version_scheme_and_meta() -> None:
    payload = {  # Register of a go-micro v4 gRPC server: node metadata in tags and Meta
        "ID": "greeter-5f1e",
        "Name": "greeter",
        "Tags": [MICRO_REGION, MICRO_PROTOCOL, MICRO_VERSION],
        "Address": "10.0.0.9",
        "Port": 50051,
        "Meta": {"region": "eu", "protocol": "grpc"},
    }
    instance = read(payload)
    assert instance == ServiceInstance.from_registry(
        service="greeter",
        id="greeter-5f1e",
        address="10.0.0.9",
        port=50051,
        meta={"region": "eu"},
        scheme="grpc",
        version="1.0.1",
    )
    v2 = read({**payload, "Meta": None})  # plugins v2/v3 write no Meta: the same instance
    assert v2 == instance


def test_go_micro_write_reads_back_through_go_micro_and_us() -> None:
    instance = ServiceInstance(
        "greeter",
        address="10.0.0.9",
        port=50051,
        scheme="grpc",
        version="2.1.0",
        meta={"team": "a"},
        tags=("blue",),
    )
    payload = write_entry(instance, "go-micro")
    assert payload["Tags"][-1] == "blue"  # go-micro's tags first: decodeMetadata reads them
    assert all(tag[:2] in ("t-", "v-") for tag in payload["Tags"][:-1])
    assert payload["Meta"] == {"team": "a", "protocol": "grpc"}
    assert micro_view(as_held(payload)) == {
        "version": "2.1.0",
        "metadata": {"team": "a", "protocol": "grpc"},
        "address": "10.0.0.9:50051",
    }
    assert read_written(payload) == instance


@pytest.mark.parametrize("tag", ["t", "e", "v-1", "t=x", "e-00"])
def test_go_micro_refuses_tags_its_decoder_crashes_on_or_misreads(tag: str) -> None:
    instance = ServiceInstance("greeter", address="h", port=1, tags=("ok", tag))
    with pytest.raises(Rejected, match=r"^tags\[1\]: ") as caught:
        validate_flavor(instance, "go-micro")
    assert repr(tag) in str(caught.value) or tag[:2] in str(caught.value)
    validate_flavor(dataclasses.replace(instance, tags=("ok",)), "go-micro")


# -- Spring ---------------------------------------------------------------------------


def spring_register(name: str, port: int, scheme: str, metadata: dict[str, str]) -> dict[str, Any]:
    """The NewService ``ConsulAutoRegistration.registration`` builds: id and name through
    ``normalizeForDns``, the tags, meta = metadata (+ zone, group) + ``secure``."""
    return {
        "ID": f"{name}-{port}",
        "Name": name,
        "Tags": [],
        "Address": "10.0.0.7",
        "Port": port,
        "Meta": {**metadata, "secure": str(scheme.lower() == "https").lower()},
    }


def spring_instance(service: Mapping[str, Any], node_address: str = "10.0.0.1") -> dict[str, Any]:
    """``ConsulServiceInstance``: secure = Boolean.parseBoolean(meta.secure); host from
    ``findHost`` (service Address, else the node's); the URI Spring builds from them."""
    meta = service.get("Meta") or {}
    secure = str(meta.get("secure", "")).lower() == "true"
    host = service.get("Address") or node_address
    return {
        "id": service["ID"],
        "uri": f"{'https' if secure else 'http'}://{host}:{service.get('Port') or 0}",
        "metadata": meta,
    }


def test_spring_secure_service_reads_as_https() -> None:
    payload = spring_register("orders-api", 8443, "https", {"zone": "a"})
    assert payload["Meta"] == {"zone": "a", "secure": "true"}
    instance = read(payload)
    assert (instance.scheme, instance.port, dict(instance.meta)) == ("https", 8443, {"zone": "a"})
    plain = read(spring_register("orders-api", 8080, "http", {}))
    assert (plain.scheme, dict(plain.meta)) == ("", {})  # secure=false: http, said by no field
    shouting = read({**payload, "Meta": {"secure": "TRUE"}})  # Boolean.parseBoolean
    assert shouting.scheme == "https"
    odd = read({**payload, "Meta": {"secure": "yes"}})  # not a boolean: left as meta
    assert (odd.scheme, dict(odd.meta)) == ("", {"secure": "yes"})


@pytest.mark.parametrize("scheme", ["https", "http", "", "grpc"])
def test_spring_write_reads_back_through_spring_and_us(scheme: str) -> None:
    instance = ServiceInstance(
        "orders-api", address="10.0.0.7", port=8443, scheme=scheme, version="1.4", meta={"z": "a"}
    )
    payload = write_entry(instance, "spring")
    secure = "true" if scheme == "https" else "false"
    expected_meta = {"z": "a", "registry-agent-version": "1.4", "secure": secure}
    if scheme:
        expected_meta["registry-agent-scheme"] = scheme
    assert payload["Meta"] == expected_meta
    seen = spring_instance(as_held(payload))
    assert seen["uri"] == f"{'https' if scheme == 'https' else 'http'}://10.0.0.7:8443"
    assert read_written(payload) == instance


@pytest.mark.parametrize(
    "name", ["orders_api", "orders.api", "-orders", "orders-", "1orders", "orders--api"]
)
def test_spring_refuses_a_name_normalize_for_dns_would_change(name: str) -> None:
    instance = ServiceInstance(name, address="h", port=1)
    with pytest.raises(Rejected, match=r"^service name '[^']*': Spring Cloud Consul takes "):
        validate_flavor(instance, "spring")
    validate_flavor(instance, "registry-agent")


def test_spring_refuses_a_contradicting_secure() -> None:
    instance = ServiceInstance("orders", address="h", port=1, meta={"secure": "true"})
    with pytest.raises(Rejected, match=r"^meta.secure: 'true' contradicts the scheme"):
        validate_flavor(instance, "spring")
    validate_flavor(dataclasses.replace(instance, scheme="https"), "spring")


# -- ours and the rules every flavor shares --------------------------------------------


def test_ours_writes_version_and_scheme_as_meta_only_when_set() -> None:
    bare = ServiceInstance("orders", address="10.0.0.1", port=80, tags=("a",), meta={"m": "1"})
    assert write_entry(bare) == {
        "Name": "orders",
        "ID": "orders-10.0.0.1-80",
        "Address": "10.0.0.1",
        "Port": 80,
        "Tags": ["a"],
        "Meta": {"m": "1"},
    }
    full = dataclasses.replace(bare, scheme="grpcs", version="2.0")
    assert write_entry(full)["Meta"] == {
        "m": "1",
        "registry-agent-version": "2.0",
        "registry-agent-scheme": "grpcs",
    }
    assert read_written(write_entry(full)) == full
    assert read_written(write_entry(bare)) == bare


def test_a_meta_version_of_the_callers_own_round_trips_as_meta() -> None:
    instance = ServiceInstance("orders", address="h", port=1, meta={"version": "7"})
    payload = write_entry(instance)
    assert payload["Meta"] == {"version": "7"}  # written as is
    back = read_written(payload)
    assert (back.version, dict(back.meta)) == ("", {"version": "7"})
    assert back == instance


@pytest.mark.parametrize("flavor", FLAVORS)
def test_meta_keys_holding_the_fields_are_refused_in_every_flavor(flavor: str) -> None:
    for key in ("registry-agent-version", "registry-agent-scheme"):
        instance = ServiceInstance("orders", address="h", port=1, meta={key: "x"})
        with pytest.raises(Rejected, match=rf"^meta.{key}: this key holds the instance's"):
            validate_flavor(instance, flavor)


def test_meta_values_that_are_not_a_scheme_or_version_stay_meta() -> None:
    payload = {
        "ID": "a",
        "Name": "s",
        "Address": "h",
        "Port": 1,
        "Meta": {"registry-agent-scheme": "not a scheme", "registry-agent-version": "has space"},
    }
    instance = read(payload)
    assert (instance.scheme, instance.version) == ("", "")
    assert dict(instance.meta) == payload["Meta"]


def test_backend_option_flavor() -> None:
    kratos = open_backend("consul://127.0.0.1:8500?flavor=kratos")
    assert isinstance(kratos, ConsulBackend)
    assert kratos.flavor == "kratos"
    assert ConsulBackend.from_url("consul://127.0.0.1:8500", {}).flavor == "registry-agent"
    assert ConsulBackend.from_url("consul://h", {"flavor": "go-micro"}).flavor == "go-micro"
    with pytest.raises(ConfigError) as caught:
        open_backend("consul://127.0.0.1:8500?flavor=dubbo")
    assert "flavor" in str(caught.value)
    assert "kratos" in str(caught.value)
    backend = ConsulBackend(flavor="spring")
    with pytest.raises(Rejected, match=r"^service name 'orders_api': "):
        backend.validate(ServiceInstance("orders_api", address="h", port=1))


# -- the watch's decoding reads with the same rules ------------------------------------


def test_watch_decoding_reads_kratos_tagged_addresses() -> None:
    payload = kratos_register(
        id="k1", name="hello", version="v3", metadata={}, endpoints=["grpc://10.0.0.5:9000"]
    )
    body = (
        b'[{"Node":"n1","Address":"10.0.0.1","ServiceID":"k1","ServiceName":"hello",'
        b'"ServiceAddress":"10.0.0.5","ServicePort":9000,"ServiceTags":["version=v3"],'
        b'"ServiceMeta":{},"ServiceTaggedAddresses":{"grpc":{"Address":"grpc://10.0.0.5:9000",'
        b'"Port":9000},"lan_ipv4":{"Address":"10.0.0.5","Port":9000}}}]'
    )
    (entry,) = decode_catalog(body).entries
    assert isinstance(entry, CatalogEntry)
    assert entry.ServiceTaggedAddresses == {
        "grpc": TaggedAddress("grpc://10.0.0.5:9000", 9000),
        "lan_ipv4": TaggedAddress("10.0.0.5", 9000),
    }
    view = ServiceView("hello", local_node=None, preferred=lambda _: (), warn=lambda *_: None)
    instance = view._instance(entry)
    assert instance == read(payload)
    assert instance is not None
    assert (instance.scheme, instance.version) == ("grpc", "v3")


AGENT = """
[backend]
url = "consul://127.0.0.1:1"
{extra}
[status]
listen = "off"

[[service]]
name = "{name}"
port = 8080
"""


@pytest.mark.parametrize("where", ["key", "url"])
def test_agent_backend_flavor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    def config(flavor: str, name: str = "orders") -> Path:
        text = AGENT.format(extra=f'flavor = "{flavor}"', name=name)
        if where == "url":
            text = AGENT.format(extra="", name=name).replace(":1", f":1?flavor={flavor}")
        path = tmp_path / "agent.toml"
        path.write_text(text)
        return path

    backend = open_configured_backend(load_config(config("kratos"), env={}))
    assert isinstance(backend, ConsulBackend)
    assert backend.flavor == "kratos"
    assert main(["check", "-c", str(config("dubbo"))]) == 2
    assert "flavor" in capsys.readouterr().err
    assert main(["check", "-c", str(config("spring", name="orders_api"))]) != 0
    err = capsys.readouterr().err
    assert "service[0]: service name 'orders_api': Spring Cloud Consul takes" in err
    assert err.count("service:") == 0  # the field is named once


def test_kratos_endpoint_host_keeps_its_case() -> None:
    instance = ServiceInstance("s", address="Orders-1.Example", port=9000, scheme="grpc")
    payload = write_entry(instance, "kratos")
    assert payload["TaggedAddresses"]["grpc"]["Address"] == "grpc://Orders-1.Example:9000"
    assert read_written(payload) == instance


def test_shared_verification_compares_the_written_payload() -> None:
    instance = ServiceInstance("s", address="10.0.0.5", port=9000, scheme="grpc", version="1")
    payload = write_entry(instance, "kratos")
    lease = Lease(instance, 3.0, alias_id(instance.id), "consul", shared=True)
    member = Member(lease, 1, HealthStatus.PASSING, "", 0.0, payload=payload)
    alias = {"CheckID": alias_id(instance.id), "ServiceID": instance.id, "Status": "passing"}
    beat = {"CheckID": "beat", "ServiceID": "hb", "Status": "passing"}
    checks = {alias_id(instance.id): alias, "beat": beat}

    def differs(service: Mapping[str, Any]) -> bool:
        read = ReadBack.of({instance.id: service}, checks)
        return entry_differs(member, "beat", read, "passing")

    held = {**as_held(payload), "Meta": payload["Meta"] or None}
    assert not differs(held)  # Consul's own lan_ipv4/wan_ipv4 beside ours
    assert differs({**held, "Tags": ["version=2"]})
    assert differs({**held, "TaggedAddresses": CONSUL_OWN})  # ours gone
    moved = {"grpc": {"Address": "grpc://10.0.0.6:9000", "Port": 9000}}
    assert differs({**held, "TaggedAddresses": {**CONSUL_OWN, **moved}})
    # The instance's own tags (no kratos version tag) are not what was written.
    assert differs({**held, "Tags": list(instance.tags)})


# -- go-micro mode needs go-micro data (issue 14: a lone 'v=2' lost Meta) --------------


@pytest.mark.parametrize(
    "tags", [["v=2"], ["t=blue"], ["e=prod"], ["e-1"], ["v=2", "t=null"], ["version=2024.1"]]
)
def test_default_flavor_with_go_micro_like_plain_tags_round_trips(tags: list[str]) -> None:
    instance = ServiceInstance(
        "tricky2", address="10.0.1.1", port=80, scheme="grpc", version="1.0",
        meta={"zone": "a"}, tags=tuple(tags),
    )  # fmt: skip
    assert read_written(write_entry(instance)) == instance


def test_go_micro_mode_reads_consul_meta_with_the_tags_winning() -> None:
    tag = "t-" + zlib.compress(b'{"region":"eu"}').hex()
    instance = read(
        {
            "ID": "g1",
            "Name": "greeter",
            "Tags": [tag, "v=3", "blue"],
            "Address": "10.0.0.9",
            "Port": 1,
            "Meta": {"region": "us", "registry-agent-scheme": "grpc", "owner": "x"},
        }
    )
    assert (instance.scheme, instance.version, instance.tags) == ("grpc", "3", ("blue",))
    assert instance.meta == {"region": "eu", "owner": "x"}
    # The 2015 form: a 't={json object}' tag is go-micro data, its 'v=' the version.
    old = read({"ID": "o", "Name": "s", "Tags": ['t={"a":"b"}', "v=7"], "Address": "h"})
    assert (old.version, old.meta, old.tags) == ("7", {"a": "b"}, ())


# -- endpoint_scheme: which of a kratos entry's endpoints to read ----------------------


def read_with(payload: Mapping[str, Any], endpoint_scheme: str) -> ServiceInstance:
    held = as_held(payload)
    return read_instance(
        service=held["Name"],
        id=held["ID"],
        address=held["Address"],
        port=held["Port"],
        tags=held["Tags"],
        meta=held["Meta"],
        tagged_addresses=held["TaggedAddresses"],
        endpoint_scheme=endpoint_scheme,
    )


def test_endpoint_scheme_reads_the_kratos_endpoint_of_that_scheme() -> None:
    payload = kratos_register(
        id="k2", name="hello", version="v1", metadata={},
        endpoints=["http://10.5.0.1:8000", "grpc://10.5.0.1:9000"],
    )  # fmt: skip
    grpc = read_with(payload, "grpc")
    assert (grpc.scheme, grpc.address, grpc.port) == ("grpc", "10.5.0.1", 9000)
    http = read_with(payload, "http")
    assert (http.scheme, http.address, http.port) == ("http", "10.5.0.1", 8000)
    # No endpoint of that scheme: the one on Address/Port, as without the option.
    assert read_with(payload, "grpcs") == read_with(payload, "") == http
    # The watch's decoding reads with the backend's option too.
    body = json.dumps(
        [
            {
                "Node": "n1", "Address": "10.0.0.1", "ServiceID": "k2", "ServiceName": "hello",
                "ServiceAddress": "10.5.0.1", "ServicePort": 8000,
                "ServiceTags": ["version=v1"], "ServiceMeta": {},
                "ServiceTaggedAddresses": payload["TaggedAddresses"],
            }
        ]
    ).encode()  # fmt: skip
    (entry,) = decode_catalog(body).entries
    assert isinstance(entry, CatalogEntry)
    view = ServiceView(
        "hello", local_node=None, preferred=lambda _: (), warn=lambda *_: None,
        endpoint_scheme="grpc",
    )  # fmt: skip
    watched = view._instance(entry)
    assert watched is not None
    assert (watched.scheme, watched.port) == ("grpc", 9000)


def test_backend_option_endpoint_scheme() -> None:
    backend = open_backend("consul://127.0.0.1:8500?endpoint_scheme=grpc")
    assert isinstance(backend, ConsulBackend)
    assert backend.endpoint_scheme == "grpc"
    assert ConsulBackend().endpoint_scheme == ""
    for bad in ("GRPC", "grpc://", "1x"):
        with pytest.raises(ConfigError) as caught:
            ConsulBackend(endpoint_scheme=bad)
        assert caught.value.field == "backend.endpoint_scheme"
    for make in (
        lambda: open_backend("consul://127.0.0.1:8500?scheme=grpc"),
        lambda: ConsulBackend(scheme="grpc"),
    ):
        with pytest.raises(ConfigError) as refused:  # Consul's scheme is the agent's
            make()
        assert refused.value.field == "backend.scheme"
        assert "use endpoint_scheme=grpc" in str(refused.value)


def test_legacy_kratos_is_secure_reads_as_the_tls_scheme() -> None:
    # go-kratos/kratos v2.1.0-v2.3.0 wrote TLS endpoints as grpc://…?isSecure=true;
    # the etcd kratos format reads them as grpcs (parse_endpoint): Consul the same.
    payload = kratos_register(
        id="k3", name="hello", version="v1", metadata={},
        endpoints=["grpc://10.5.0.1:9000?isSecure=true"],
    )  # fmt: skip
    assert read_with(payload, "").scheme == "grpcs"
    assert read_with(payload, "grpcs").port == 9000
    plain = kratos_register(
        id="k4", name="hello", version="v1", metadata={},
        endpoints=["grpc://10.5.0.1:9000?isSecure=false"],
    )  # fmt: skip
    assert read_with(plain, "").scheme == "grpc"
