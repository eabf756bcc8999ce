"""Selection strategies, the discovery cache, the blocking Watcher, and the httpx transports."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from registry_agent import (
    AsyncDiscovery,
    AsyncDiscoveryTransport,
    BackendUnavailable,
    ConfigError,
    Discovery,
    DiscoveryTransport,
    EventType,
    HealthStatus,
    InstanceHealth,
    NoInstanceAvailable,
    ServiceInstance,
    Watcher,
)
from registry_agent._select import Selector, weight_of
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.memory import MemoryRegistry
from registry_agent.testing.servers import free_port


def inst(n: int, **meta: str) -> ServiceInstance:
    # As read from a registry: a peer's meta weight may be any text ("-2", "heavy").
    return ServiceInstance.from_registry(
        service="orders", address="127.0.0.1", port=9000 + n, id=f"o{n}", meta=meta
    )


def test_round_robin_cycles_in_order() -> None:
    selector = Selector()
    pool = [inst(1), inst(2), inst(3)]
    assert [selector.pick("orders", pool, "round_robin").id for _ in range(6)] == [  # type: ignore[union-attr]
        "o1",
        "o2",
        "o3",
        "o1",
        "o2",
        "o3",
    ]
    assert selector.pick("orders", [], "round_robin") is None


def test_random_and_weighted_follow_their_odds() -> None:
    selector = Selector(random.Random(1))
    pool = [inst(1, weight="1"), inst(2, weight="3"), inst(3, weight="0")]
    weighted = Counter(selector.pick("orders", pool, "weighted").id for _ in range(4000))  # type: ignore[union-attr]
    assert weighted["o3"] == 0
    assert 2.5 < weighted["o2"] / weighted["o1"] < 3.5
    uniform = Counter(selector.pick("orders", pool, "random").id for _ in range(3000))  # type: ignore[union-attr]
    assert all(900 < uniform[k] < 1100 for k in ("o1", "o2", "o3"))
    assert selector.pick("orders", [inst(1, weight="0")], "weighted") is None


def test_weight_parsing() -> None:
    assert weight_of(inst(1)) == 1
    assert weight_of(inst(1, weight="5")) == 5
    assert weight_of(inst(1, weight="-2")) == 0
    assert weight_of(inst(1, weight="heavy")) == 1
    # A peer's entry may say anything: beyond a float's range it broke the weighted
    # choice (OverflowError); the cap is Consul's own.
    huge = [inst(1, weight="1" + "0" * 400), inst(2, weight="9" * 308), inst(3)]
    assert weight_of(huge[0]) == weight_of(huge[1]) == 65535
    selector = Selector(random.Random(2))
    chosen = Counter(selector.pick("orders", huge, "weighted").id for _ in range(200))  # type: ignore[union-attr]
    assert chosen["o1"] + chosen["o2"] > 190  # o3 weighs 1 against 65535 twice


def test_unknown_strategy() -> None:
    with pytest.raises(ConfigError) as info:
        Selector().pick("orders", [inst(1)], "fastest")
    assert info.value.field == "strategy"


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"disc-{uuid.uuid4().hex}")


def put(
    registry: MemoryRegistry, instance: ServiceInstance, status: HealthStatus = HealthStatus.PASSING
) -> int:
    return registry.put(InstanceHealth(instance, status), ttl=60)


async def test_discovery_cache_stays_fresh(registry: MemoryRegistry) -> None:
    put(registry, inst(1))
    put(registry, inst(2), HealthStatus.CRITICAL)
    async with AsyncDiscovery(registry.url) as discovery:
        assert await discovery.instances("orders") == [inst(1)]
        assert await discovery.instances("orders", healthy_only=False) == [inst(1), inst(2)]
        put(registry, inst(3))
        for _ in range(50):
            if len(await discovery.instances("orders")) == 2:
                break
            await asyncio.sleep(0.01)
        assert await discovery.instances("orders") == [inst(1), inst(3)]
        assert (await discovery.choose("orders", exclude={"o1"})).id == "o3"
        with pytest.raises(NoInstanceAvailable):
            await discovery.choose("orders", exclude={"o1", "o3"})
        assert await discovery.instances("users") == []


async def test_keep_last_nonempty(registry: MemoryRegistry) -> None:
    put(registry, inst(1))
    async with (
        AsyncDiscovery(registry.url, keep_last_nonempty=True) as keeping,
        AsyncDiscovery(registry.url) as plain,
    ):
        assert await keeping.instances("orders") == [inst(1)]
        assert await plain.instances("orders") == [inst(1)]
        registry.wipe()
        for _ in range(50):
            if not await plain.instances("orders"):
                break
            await asyncio.sleep(0.01)
        assert await plain.instances("orders") == []  # an empty list is a fact
        assert await keeping.instances("orders") == [inst(1)]  # unless asked otherwise


async def test_discovery_without_a_registry_says_so(registry: MemoryRegistry) -> None:
    registry.stop()
    errors: list[tuple[str, BaseException]] = []
    async with AsyncDiscovery(
        registry.url, sync_timeout=0.3, on_error=lambda s, e: errors.append((s, e))
    ) as discovery:
        with pytest.raises(BackendUnavailable) as info:
            await discovery.instances("orders")
    # The registry's own words, not only "no answer".
    assert info.value.message == (
        "no answer from the registry within 0.3s; "
        f"last error: memory registry {registry.name!r} is stopped"
    )
    assert (info.value.service, info.value.backend) == ("orders", "memory")
    assert errors  # the caller's on_error still sees each one
    assert {service for service, _ in errors} == {"orders"}


async def test_a_first_read_that_times_out_carries_consuls_own_words() -> None:
    # Real Consul client code against a server answering every request with a 500.
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        proxy.http(500, "rpc error: No cluster leader")
        url = f"consul://{proxy.host}:{proxy.port}?timeout=2s"
        started = time.monotonic()
        async with AsyncDiscovery(url, sync_timeout=1.0) as discovery:
            with pytest.raises(BackendUnavailable) as info:
                await discovery.instances("orders")
        took = time.monotonic() - started
    print(f"first read against a 500: raised after {took:.2f}s: {info.value}")
    assert info.value.message.startswith("no answer from the registry within 1s; last error: ")
    assert "500" in info.value.message
    assert "rpc error: No cluster leader" in info.value.message
    assert info.value.backend == "consul"
    assert took < 1.0 + 5


def portless(n: int) -> ServiceInstance:
    """An entry another tool registered without a port, as read back from the registry."""
    return ServiceInstance.from_registry(service="orders", id=f"p{n}", address="10.0.0.9", port=0)


async def test_instances_without_a_port_are_listed_but_never_chosen(
    registry: MemoryRegistry,
) -> None:
    put(registry, portless(1))
    put(registry, inst(2))
    put(registry, portless(3))
    async with AsyncDiscovery(registry.url) as discovery:
        # Ordered by id.
        every = await discovery.instances("orders", healthy_only=False)
        assert every == [inst(2), portless(1), portless(3)]
        assert [h.instance.id for h in await discovery.health("orders")] == ["o2", "p1", "p3"]
        for strategy in ("round_robin", "random", "weighted"):
            chosen = {(await discovery.choose("orders", strategy)).id for _ in range(30)}
            assert chosen == {"o2"}, strategy
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("orders", exclude={"o2"})
        assert info.value.message == "no healthy instance left to try with a port (2 without one)"


def test_blocking_watcher_ends_promptly_on_close(registry: MemoryRegistry) -> None:
    put(registry, inst(1))
    watcher = Watcher(registry.url, "orders")
    got: list[EventType] = []

    def consume() -> None:
        got.extend(event.type for event in watcher)

    thread = threading.Thread(target=consume)
    thread.start()
    assert watcher.wait_synced(2)
    assert [h.instance for h in watcher.snapshot()] == [inst(1)]
    time.sleep(0.1)
    started = time.monotonic()
    watcher.close()
    thread.join(2)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1
    assert got == [EventType.ADDED]


def test_blocking_watcher_several_services(registry: MemoryRegistry) -> None:
    put(registry, inst(1))
    registry.put(InstanceHealth(ServiceInstance("users", address="h", port=1)), ttl=60)
    with Watcher(registry.url, ["orders", "users"]) as watcher:
        events = iter(watcher)
        services = sorted(next(events).service for _ in range(2))
        assert services == ["orders", "users"]
        with pytest.raises(ConfigError):
            watcher.snapshot()
        assert len(watcher.snapshot("users")) == 1


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.server.server_address[1]} {self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[list[int]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [s.server_address[1] for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def register_web(registry: MemoryRegistry, ports: list[int]) -> list[ServiceInstance]:
    instances = [
        ServiceInstance("orders", address="127.0.0.1", port=p, id=f"web{i}")
        for i, p in enumerate(ports)
    ]
    for instance in instances:
        put(registry, instance)
    return instances


def test_transport_routes_and_retries_on_connect_failure(
    registry: MemoryRegistry, web: list[int]
) -> None:
    dead = ServiceInstance("orders", address="127.0.0.1", port=free_port(), id="web-dead")
    put(registry, dead)
    register_web(registry, web)
    with (
        Discovery(registry.url) as discovery,
        httpx.Client(transport=DiscoveryTransport(discovery, retries=2)) as client,
    ):
        answers = [client.get("http://orders/hello").text for _ in range(9)]
    ports = Counter(int(a.split()[0]) for a in answers)
    assert set(ports) == set(web)  # every request succeeded, none on the dead one
    assert all(a.split()[1] == "orders" for a in answers)  # Host keeps the service name


def test_transport_passes_explicit_ports_through(registry: MemoryRegistry, web: list[int]) -> None:
    with (
        Discovery(registry.url) as discovery,
        httpx.Client(transport=DiscoveryTransport(discovery)) as client,
    ):
        assert client.get(f"http://127.0.0.1:{web[0]}/").text.startswith(str(web[0]))


def test_transport_without_instances_is_a_connect_error(registry: MemoryRegistry) -> None:
    with (
        Discovery(registry.url) as discovery,
        httpx.Client(transport=DiscoveryTransport(discovery)) as client,
        pytest.raises(httpx.ConnectError, match="orders: no healthy instance"),
    ):
        client.get("http://orders/")


def test_transport_gives_up_after_its_retries(registry: MemoryRegistry) -> None:
    for n in range(4):
        put(registry, ServiceInstance("orders", address="127.0.0.1", port=free_port(), id=f"d{n}"))
    with (
        Discovery(registry.url) as discovery,
        httpx.Client(transport=DiscoveryTransport(discovery, retries=1)) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("http://orders/")


async def test_async_transport(registry: MemoryRegistry, web: list[int]) -> None:
    dead = ServiceInstance("orders", address="127.0.0.1", port=free_port(), id="web-dead")
    put(registry, dead)
    register_web(registry, web)
    async with (
        AsyncDiscovery(registry.url) as discovery,
        httpx.AsyncClient(transport=AsyncDiscoveryTransport(discovery)) as client,
    ):
        answers = [(await client.get("http://orders/")).text for _ in range(6)]
    assert {int(a.split()[0]) for a in answers} == set(web)


async def test_choose_excludes_ids_or_exact_instances(registry: MemoryRegistry) -> None:
    for n in (1, 2):
        put(registry, inst(n))
    async with AsyncDiscovery(registry.url) as discovery:
        assert (await discovery.choose("orders", exclude={"o1"})).id == "o2"
        assert (await discovery.choose("orders", exclude=[inst(2)])).id == "o1"
        other = ServiceInstance("orders", address="10.9.9.9", port=9002, id="o2")
        assert (await discovery.choose("orders", "random", exclude=[inst(1), other])).id == "o2"


class _SameIdOnTwoNodes:
    """A chooser holding two instances that share an id on two nodes (Consul allows it)."""

    def __init__(self, pool: list[ServiceInstance]) -> None:
        self.pool = pool
        self.asked: list[tuple[object, ...]] = []

    def choose(
        self, service: str, strategy: object = "round_robin", *, exclude: tuple[object, ...] = ()
    ) -> ServiceInstance:
        self.asked.append(exclude)
        left = [i for i in self.pool if i.id not in exclude and i not in exclude]
        if not left:
            raise NoInstanceAvailable("no healthy instance left to try", service=service)
        return left[0]


def test_transport_retries_an_instance_sharing_the_dead_ones_id(web: list[int]) -> None:
    dead = ServiceInstance("orders", address="127.0.0.1", port=free_port(), id="orders-8080")
    live = ServiceInstance("orders", address="127.0.0.1", port=web[0], id="orders-8080")
    chooser = _SameIdOnTwoNodes([dead, live])
    with httpx.Client(transport=DiscoveryTransport(chooser, retries=1)) as client:  # type: ignore[arg-type]
        assert client.get("http://orders/").text.split()[0] == str(web[0])
    assert chooser.asked == [(), (dead,)]  # the retry excluded that instance, not its id


def test_transports_skip_instances_without_a_port(registry: MemoryRegistry, web: list[int]) -> None:
    put(registry, portless(1))
    live = ServiceInstance("orders", address="127.0.0.1", port=web[0], id="o2")
    put(registry, live)
    with (
        Discovery(registry.url) as discovery,
        httpx.Client(transport=DiscoveryTransport(discovery)) as client,
    ):
        assert {client.get("http://orders/").text.split()[0] for _ in range(6)} == {str(web[0])}
    # A chooser that offers one anyway: skipped, and skipping is no retry.
    chooser = _SameIdOnTwoNodes([portless(1), portless(2), live])
    with httpx.Client(transport=DiscoveryTransport(chooser, retries=0)) as client:
        assert client.get("http://orders/").text.split()[0] == str(web[0])
    assert chooser.asked == [(), (portless(1),), (portless(1), portless(2))]


class _Stubborn:
    """A chooser that ignores ``exclude`` and always offers the same portless entry."""

    def choose(self, *args: object, **kwargs: object) -> ServiceInstance:
        return portless(1)

    async def achoose(self, *args: object, **kwargs: object) -> ServiceInstance:
        return portless(1)


def test_transport_never_connects_to_a_portless_instance() -> None:
    with (
        httpx.Client(transport=DiscoveryTransport(_Stubborn())) as client,
        pytest.raises(httpx.ConnectError, match="no healthy instance with a port"),
    ):
        client.get("http://orders/")


async def test_async_transport_never_connects_to_a_portless_instance() -> None:
    stubborn = _Stubborn()
    stubborn.choose = stubborn.achoose  # type: ignore[method-assign,assignment]
    transport = AsyncDiscoveryTransport(stubborn)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError, match="p1 has none"):
            await client.get("http://orders/")
