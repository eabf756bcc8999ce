"""Consul flavors on a real Consul: peers' entries read by list(), AsyncWatcher and
Discovery; what each flavor writes read back by the peer's own rules; registrars of
every flavor (own check and shared liveness) stay registered without a re-register
loop, and heal after a deregistration.

Peers' shapes, from their source:

- go-kratos/kratos contrib/registry/consul/client.go v2.9.2/v3.0.0 (668db92c2):
  ``Client.Register`` (tag ``version=<v>``, a tagged address per URL scheme holding
  the URL, Address/Port of the first endpoint) and ``defaultResolver``.
- go-micro/plugins v4/registry/consul/consul.go and encoding.go (6026888):
  ``Register`` (tags: ``t-`` metadata pairs, ``e-`` endpoints, ``v-`` version, each
  zlib+hex; Meta the node metadata) and ``GetService`` (``decodeVersion``,
  ``decodeMetadata``: the first tag format found).
- spring-cloud-consul v5.0.2 (f008a118) ``ConsulAutoRegistration`` (meta ``secure``)
  and ``ConsulServiceInstance.getSecure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from registry_agent_consul import ConsulBackend

from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    AsyncWatcher,
    RetryPolicy,
    ServiceInstance,
)
from registry_agent.testing.servers import ConsulServer

Measured = Callable[[str, float, float], None]
TTL = 2.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)

# Golden go-micro v4 tags, made by Go 1.19's compress/zlib + encoding/hex as
# go-micro's encode() does: {"region":"eu"}, {"protocol":"grpc"} and version 1.0.1.
MICRO_REGION = "t-789caa562a4a4dcfcccf53b2524a2d55aa05040000ffff2a2c0519"
MICRO_PROTOCOL = "t-789caa562a28ca2fc94fcecf51b2524a2f2a4856aa05040000ffff468306d9"
MICRO_VERSION = "v-789c32d433d03304040000ffff02cf00ef"

# As each peer's own code registers (checks left out: health passing).
KRATOS = {  # endpoints grpc://127.0.0.1:9000 then http://127.0.0.1:8000, version v1.0.0
    "ID": "kratos-7f3a",
    "Name": "hello-kratos",
    "Tags": ["version=v1.0.0"],
    "Address": "127.0.0.1",
    "Port": 9000,
    "TaggedAddresses": {
        "grpc": {"Address": "grpc://127.0.0.1:9000", "Port": 9000},
        "http": {"Address": "http://127.0.0.1:8000", "Port": 8000},
    },
    "Meta": {"region": "eu"},
}
MICRO = {  # node greeter-5f1e at 127.0.0.1:50051, metadata region/protocol, version 1.0.1
    "ID": "greeter-5f1e",
    "Name": "greeter",
    "Tags": [MICRO_REGION, MICRO_PROTOCOL, MICRO_VERSION],
    "Address": "127.0.0.1",
    "Port": 50051,
    "Meta": {"region": "eu", "protocol": "grpc"},
}
SPRING = {  # spring.application.name=orders-api, server.port=8443, scheme https
    "ID": "orders-api-8443",
    "Name": "orders-api",
    "Tags": [],
    "Address": "127.0.0.1",
    "Port": 8443,
    "Meta": {"zone": "a", "secure": "true"},
}


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulServer]:
    """One `consul agent -dev` for the module (no test restarts or wipes it)."""
    server = ConsulServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.asynccontextmanager
async def http(server: ConsulServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as client:
        yield client


async def wait_for(what: str, predicate: Callable[[], Any], bound: float) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > bound:
            pytest.fail(f"{what}: not within {bound:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def expected_peers() -> dict[str, ServiceInstance]:
    """What each peer's entry stands for."""
    return {
        "hello-kratos": ServiceInstance.from_registry(
            service="hello-kratos",
            id="kratos-7f3a",
            address="127.0.0.1",
            port=9000,
            meta={"region": "eu"},
            scheme="grpc",
            version="v1.0.0",
        ),
        "orders-api": ServiceInstance.from_registry(
            service="orders-api",
            id="orders-api-8443",
            address="127.0.0.1",
            port=8443,
            meta={"zone": "a"},
            scheme="https",
        ),
    }


async def test_peer_entries_read_by_list_watcher_and_discovery(consul: ConsulServer) -> None:
    async with http(consul) as client:
        for payload in (KRATOS, MICRO, SPRING):
            answer = await client.put("/v1/agent/service/register", json=payload)
            assert answer.status_code == 200, answer.text
    backend = ConsulBackend("127.0.0.1", consul.http_port, timeout=2)
    services = ("hello-kratos", "greeter", "orders-api")
    try:
        listed = {s: list((await backend.list(s)).instances.values()) for s in services}
        async with AsyncWatcher(backend, services) as watcher:
            assert await watcher.wait_synced(10)
            watched = {s: watcher.snapshot(s) for s in services}
        discovery = AsyncDiscovery(backend)
        try:
            found = {s: await discovery.instances(s) for s in services}
        finally:
            await discovery.close()
    finally:
        await backend.close()
    for name, instance in expected_peers().items():
        assert [h.instance for h in listed[name]] == [instance], name
        assert [h.instance for h in watched[name]] == [instance], name
        assert found[name] == [instance], name
        for seen in (listed[name][0].instance, watched[name][0].instance, found[name][0]):
            assert (seen.scheme, seen.version, seen.node) == (
                instance.scheme,
                instance.version,
                consul.node,
            )
    # go-micro: its encoded tags decoded into version, scheme and meta, and taken out of
    # the tags (Consul's Meta, the same map in plugins v4+, joined under them).
    micro = ServiceInstance.from_registry(
        service="greeter",
        id="greeter-5f1e",
        address="127.0.0.1",
        port=50051,
        meta={"region": "eu"},  # protocol=grpc is the scheme
        scheme="grpc",
        version="1.0.1",
    )
    assert [h.instance for h in listed["greeter"]] == [micro]
    assert [h.instance for h in watched["greeter"]] == [micro]
    assert found["greeter"] == [micro]


# -- the peers' readers, from their source ---------------------------------------------


def kratos_view(service: dict[str, Any]) -> dict[str, Any]:
    """kratos ``defaultResolver``: the last ``version=`` tag, endpoints from tagged
    addresses but Consul's lan/wan ipv4/ipv6, else ``http://Address:Port``."""
    version = ""
    for tag in service.get("Tags") or ():
        key, sep, value = tag.partition("=")
        if sep and key == "version":
            version = value
    skip = {"lan_ipv4", "wan_ipv4", "lan_ipv6", "wan_ipv6"}
    tagged = service.get("TaggedAddresses") or {}
    endpoints = sorted(a["Address"] for k, a in tagged.items() if k not in skip)
    if not endpoints and service.get("Address") and service.get("Port"):
        endpoints = [f"http://{service['Address']}:{service['Port']}"]
    return {"version": version, "metadata": service.get("Meta") or {}, "endpoints": endpoints}


def _micro_decode(hexed: str) -> bytes:
    return zlib.decompress(bytes.fromhex(hexed))


def micro_view(service: dict[str, Any]) -> dict[str, Any]:
    """go-micro v4 ``GetService``: ``decodeVersion`` (first ``v-``/``v=`` tag) and
    ``decodeMetadata`` (``t-``/``t=`` tags of the first format seen); node address
    Address:Port."""
    version = None
    metadata: dict[str, str] = {}
    form = ""
    for tag in service.get("Tags") or ():
        if version is None and len(tag) >= 2 and tag[0] == "v" and tag[1] in "-=":
            version = tag[2:] if tag[1] == "=" else _micro_decode(tag[2:]).decode()
        if tag[:1] == "t" and len(tag) >= 2 and (not form or tag[1] == form):
            raw = tag[2:].encode() if tag[1] == "=" else _micro_decode(tag[2:])
            with contextlib.suppress(ValueError):
                metadata.update(json.loads(raw))
            form = tag[1]
    return {
        "version": version or "",
        "metadata": metadata,
        "address": f"{service['Address']}:{service['Port']}",
    }


def spring_view(service: dict[str, Any]) -> dict[str, Any]:
    """``ConsulServiceInstance``: secure from meta ``secure`` (Boolean.parseBoolean)."""
    meta = service.get("Meta") or {}
    secure = str(meta.get("secure", "")).lower() == "true"
    return {"uri": f"{'https' if secure else 'http'}://{service['Address']}:{service['Port']}"}


FLAVORS = ("registry-agent", "kratos", "go-micro", "spring")
SCHEMES = {"registry-agent": "http", "kratos": "grpc", "go-micro": "grpc", "spring": "https"}


def meant(flavor: str) -> ServiceInstance:
    """An instance each flavor carries whole: it reads back as itself."""
    return ServiceInstance(
        f"fl-{flavor}",
        address="127.0.0.1",
        port=7000 + FLAVORS.index(flavor),
        scheme=SCHEMES[flavor],
        version="2.1.0",
        meta={"team": "a"},
    )


def lossy(flavor: str, shared: bool) -> ServiceInstance:
    """An instance that reads back otherwise than it was given (Spring's ``secure``
    taken out, whoever wrote it): only lookup()'s normalised comparison keeps its
    registrar from registering it again and again."""
    meta = {
        "registry-agent": {"team": "a", "secure": "false"},  # Spring's: taken out when read
        "kratos": {"team": "a", "secure": "false"},  # likewise
        "go-micro": {"team": "a", "secure": "false"},  # likewise
        "spring": {"team": "a", "secure": "true"},  # taken out (the scheme says it)
    }[flavor]
    # An entry of ours keeps a 'version=' tag as a tag (it carries our meta keys).
    tags = ("version=2.1.0",) if flavor == "registry-agent" else ()
    scheme = SCHEMES[flavor]
    return ServiceInstance(
        f"fl-{flavor}-{'shared' if shared else 'own'}",
        address="127.0.0.1",
        port=7100 + 10 * FLAVORS.index(flavor) + int(shared),
        scheme=scheme,
        version="2.1.0",
        tags=tags,
        meta=meta,
    )


def check_peer_view(flavor: str, instance: ServiceInstance, service: dict[str, Any]) -> None:
    """What the peer of ``flavor`` makes of our entry is what ``instance`` says."""
    version = instance.version or instance.meta.get("version", "")
    if flavor == "kratos":
        assert kratos_view(service) == {
            "version": version,
            "metadata": dict(instance.meta),
            "endpoints": [f"grpc://127.0.0.1:{instance.port}"],
        }
    elif flavor == "go-micro":
        view = micro_view(service)
        assert view["version"] == instance.version
        assert view["metadata"] == {**instance.meta, "protocol": "grpc"}
        assert view["address"] == f"127.0.0.1:{instance.port}"
    elif flavor == "spring":
        assert spring_view(service) == {"uri": f"https://127.0.0.1:{instance.port}"}
    else:
        assert service["Meta"] == {
            **instance.meta,
            "registry-agent-version": version,
            "registry-agent-scheme": "http",
        }


async def test_what_each_flavor_writes_reads_back_as_meant(consul: ConsulServer) -> None:
    backends = {
        f: ConsulBackend("127.0.0.1", consul.http_port, timeout=2, flavor=f) for f in FLAVORS
    }
    observer = ConsulBackend("127.0.0.1", consul.http_port, timeout=2)
    try:
        leases = [await backends[f].register(meant(f), ttl=60) for f in FLAVORS]
        async with http(consul) as client:
            for flavor in FLAVORS:
                instance = meant(flavor)
                answer = await client.get(f"/v1/health/service/{instance.service}")
                (entry,) = answer.json()
                check_peer_view(flavor, instance, entry["Service"])
                (ours,) = (await observer.list(instance.service)).instances.values()
                assert ours.instance == instance, flavor
                assert (ours.instance.scheme, ours.instance.version) == (SCHEMES[flavor], "2.1.0")
        for lease in leases:
            found = await backends[lease.instance.service.removeprefix("fl-")].lookup(lease)
            assert found is not None
            assert found.instance == lease.instance
            assert found.instance.node == consul.node
    finally:
        for backend in (*backends.values(), observer):
            await backend.close()


async def test_registrars_of_every_flavor_stay_registered_and_heal(
    consul: ConsulServer, measured: Measured
) -> None:
    regs: dict[tuple[str, bool], AsyncRegistrar] = {}
    for flavor in FLAVORS:
        for shared in (False, True):
            backend = ConsulBackend(
                "127.0.0.1",
                consul.http_port,
                timeout=2,
                flavor=flavor,
                deregister_critical_after=60,
            )
            regs[flavor, shared] = AsyncRegistrar(
                backend, lossy(flavor, shared), ttl=TTL, retry=RETRY, shared_liveness=shared
            )
    observer = ConsulBackend("127.0.0.1", consul.http_port, timeout=2)

    async def held(reg: AsyncRegistrar) -> list[ServiceInstance]:
        found = (await observer.list(reg.instance.service)).instances.values()
        return [h.instance for h in found]

    try:
        await asyncio.gather(*(reg.start(wait_registered=10) for reg in regs.values()))
        async with http(consul) as client:
            for (flavor, _shared), reg in regs.items():
                answer = await client.get(f"/v1/health/service/{reg.instance.service}")
                (entry,) = answer.json()
                check_peer_view(flavor, reg.instance, entry["Service"])
                (read,) = await held(reg)
                assert read != reg.instance  # what makes a naive comparison loop
            # Three verifications later, nothing was registered twice (no loop).
            await asyncio.sleep(3 * TTL + 0.5)
            for key, reg in regs.items():
                assert reg.ready, key
                assert reg.counters.registrations == 1, (key, reg.counters)
                assert reg.counters.reregistrations == 0, (key, reg.counters)
                assert reg.counters.errors == 0, (key, reg.counters)
                assert reg.counters.verifications >= 2, (key, reg.counters)
                if key[1]:
                    # The heartbeat group's read-backs (one per TTL, each counted for every
                    # entry) and a read of its own only when one finds the entry differs
                    # from the payload written: never, here (one more per TTL if it
                    # compared the instance's own tags and meta; 1 allowed for a race).
                    assert reg.counters.verifications <= 3 + 1 + 1, (key, reg.counters)
            # Someone deregisters every entry: each registrar puts its own back.
            started = time.monotonic()
            for reg in regs.values():
                answer = await client.put(f"/v1/agent/service/deregister/{reg.instance.id}")
                assert answer.status_code == 200

            async def all_back() -> bool:
                for reg in regs.values():
                    if len(await held(reg)) != 1:
                        return False
                return all(r.counters.reregistrations >= 1 for r in regs.values())

            # Verification every TTL (shared: the heartbeat group's read-back), then
            # a retry backoff of at most RETRY.cap: 3 TTLs and 5 s are generous.
            bound = 3 * TTL + 5
            await wait_for("every flavor registered again", all_back, bound)
            measured("flavors healed", time.monotonic() - started, bound)
            for (flavor, _shared), reg in regs.items():
                answer = await client.get(f"/v1/health/service/{reg.instance.service}")
                (entry,) = answer.json()
                check_peer_view(flavor, reg.instance, entry["Service"])
            # And once healed, no loop either.
            counts = {key: reg.counters.reregistrations for key, reg in regs.items()}
            await asyncio.sleep(2 * TTL)
            assert {key: reg.counters.reregistrations for key, reg in regs.items()} == counts
            assert all(reg.ready for reg in regs.values())
    finally:
        await observer.close()
        for reg in regs.values():
            await reg.stop(timeout=5)
            await reg.backend.close()


# -- issue 14 fixes, on a real Consul ---------------------------------------------------

KRATOS_TWO = {  # kratos with endpoints http://10.5.0.1:8000 (first) and grpc://10.5.0.1:9000
    "ID": "kratos-two",
    "Name": "hello-two",
    "Tags": ["version=v2.0.0"],
    "Address": "10.5.0.1",
    "Port": 8000,
    "TaggedAddresses": {
        "http": {"Address": "http://10.5.0.1:8000", "Port": 8000},
        "grpc": {"Address": "grpc://10.5.0.1:9000", "Port": 9000},
    },
    "Meta": {},
}
KRATOS_LEGACY = {  # kratos v2.1.0-v2.3.0: a TLS gRPC server wrote grpc://…?isSecure=true
    "ID": "kratos-legacy",
    "Name": "hello-legacy",
    "Tags": ["version=v2.2.0"],
    "Address": "10.5.0.2",
    "Port": 9000,
    "TaggedAddresses": {"grpc": {"Address": "grpc://10.5.0.2:9000?isSecure=true", "Port": 9000}},
    "Meta": {},
}


async def test_endpoint_scheme_legacy_tls_and_plain_go_micro_like_tags(
    consul: ConsulServer,
) -> None:
    async with http(consul) as client:
        for payload in (KRATOS_TWO, KRATOS_LEGACY):
            answer = await client.put("/v1/agent/service/register", json=payload)
            assert answer.status_code == 200, answer.text
    default = ConsulBackend("127.0.0.1", consul.http_port, timeout=2)
    grpc = ConsulBackend.from_url(
        f"consul://127.0.0.1:{consul.http_port}", {"endpoint_scheme": "grpc", "timeout": "2s"}
    )
    # A default-flavor instance whose plain tag looks like go-micro's old version tag.
    tricky = ServiceInstance(
        "tricky", address="10.0.1.3", port=80, scheme="grpc", version="1.0",
        meta={"zone": "a"}, tags=("v=2",),
    )  # fmt: skip
    lease = await default.register(tricky, ttl=30)
    try:
        (two,) = (await default.list("hello-two")).instances.values()
        assert (two.instance.scheme, two.instance.port) == ("http", 8000)
        (two,) = (await grpc.list("hello-two")).instances.values()
        assert (two.instance.scheme, two.instance.address, two.instance.port) == (
            "grpc",
            "10.5.0.1",
            9000,
        )
        assert two.instance.version == "v2.0.0"
        # The watch (Watcher, Discovery) reads with the same option.
        async with AsyncWatcher(grpc, ["hello-two"]) as watcher:
            assert await watcher.wait_synced(10)
            (watched,) = watcher.snapshot("hello-two")
            assert (watched.instance.scheme, watched.instance.port) == ("grpc", 9000)
        (legacy,) = (await default.list("hello-legacy")).instances.values()
        assert (legacy.instance.scheme, legacy.instance.port) == ("grpcs", 9000)
        (found,) = (await default.list("tricky")).instances.values()
        assert found.instance == tricky
        looked = await default.lookup(lease)  # the registrar's check: no re-register loop
        assert looked is not None
        assert looked.instance == tricky
    finally:
        await default.deregister(lease)
        await grpc.close()
        await default.close()
