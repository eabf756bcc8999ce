"""Discovery policy, pure: validation, filters, locality tiers, Envoy's ejection timeline
on a fake clock (growth, cap, decay, percent cap), thread-safety, bounded memory; and
choose()'s reasons in words over the in-memory registry."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest

import registry_agent
from registry_agent import (
    AsyncDiscovery,
    ConfigError,
    Discovery,
    DiscoveryPolicy,
    HealthStatus,
    InstanceHealth,
    NoInstanceAvailable,
    OutlierEjection,
    ServiceInstance,
)
from registry_agent._outliers import OutlierTracker
from registry_agent._policy import is_idempotent, locality_tiers, max_ejections, preferred
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry


def inst(n: int, *, tags: tuple[str, ...] = (), version: str = "", **meta: str) -> ServiceInstance:
    return ServiceInstance.from_registry(
        service="orders",
        address="127.0.0.1",
        port=9000 + n,
        id=f"o{n}",
        tags=tags,
        meta=meta,
        version=version,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retries": -1}, "DiscoveryPolicy.retries"),
        ({"retries": True}, "DiscoveryPolicy.retries"),
        ({"retries": 1.5}, "DiscoveryPolicy.retries"),
        ({"tags": "canary"}, "DiscoveryPolicy.tags"),
        ({"tags": ["ok", ""]}, "DiscoveryPolicy.tags"),
        ({"tags": [3]}, "DiscoveryPolicy.tags"),
        ({"meta": {"version": 2}}, "DiscoveryPolicy.meta"),
        ({"meta": [("a", "b")]}, "DiscoveryPolicy.meta"),
        ({"prefer": {"": "x"}}, "DiscoveryPolicy.prefer"),
        ({"retry_statuses": (502, 700)}, "DiscoveryPolicy.retry_statuses"),
        ({"retry_statuses": "503"}, "DiscoveryPolicy.retry_statuses"),
        ({"retry_statuses": (True,)}, "DiscoveryPolicy.retry_statuses"),
        ({"retry_read_timeouts": 1}, "DiscoveryPolicy.retry_read_timeouts"),
        ({"server_name": ""}, "DiscoveryPolicy.server_name"),
        ({"server_name": "a b"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "http://x"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "x:443"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "*.x"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "-"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "a-.b"}, "DiscoveryPolicy.server_name"),
        ({"server_name": "a" * 64}, "DiscoveryPolicy.server_name"),
        ({"server_name": ".".join(["a" * 63] * 4)}, "DiscoveryPolicy.server_name"),
        ({"server_name": 5}, "DiscoveryPolicy.server_name"),
        ({"tags": {"a": 1}}, "DiscoveryPolicy.tags"),
        ({"tags": {"a": "b"}}, "DiscoveryPolicy.tags"),
        ({"outliers": 5}, "DiscoveryPolicy.outliers"),
    ],
)
def test_a_bad_policy_is_a_config_error_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        DiscoveryPolicy(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: expected")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"consecutive_failures": 0}, "OutlierEjection.consecutive_failures"),
        ({"consecutive_failures": 2.0}, "OutlierEjection.consecutive_failures"),
        ({"base_time": 0}, "OutlierEjection.base_time"),
        ({"base_time": float("nan")}, "OutlierEjection.base_time"),
        ({"max_time": float("inf")}, "OutlierEjection.max_time"),
        ({"base_time": 10, "max_time": 5}, "OutlierEjection.max_time"),
        ({"max_ejected_percent": 101}, "OutlierEjection.max_ejected_percent"),
        ({"max_ejected_percent": -1}, "OutlierEjection.max_ejected_percent"),
        ({"max_ejected_percent": "50"}, "OutlierEjection.max_ejected_percent"),
    ],
)
def test_a_bad_ejection_rule_is_a_config_error_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        OutlierEjection(**kwargs)
    assert info.value.field == field


def test_policy_defaults_normalised_hashable_and_exported() -> None:
    policy = DiscoveryPolicy(tags=["canary", "canary"], meta={"version": "v2"})
    assert policy.tags == frozenset({"canary"})
    assert policy == DiscoveryPolicy(tags=("canary",), meta={"version": "v2"})
    assert hash(policy) == hash(DiscoveryPolicy(tags={"canary"}, meta={"version": "v2"}))
    # Locality's order matters (most important first); meta's does not.
    assert DiscoveryPolicy(prefer={"zone": "a", "dc": "1"}) != DiscoveryPolicy(
        prefer={"dc": "1", "zone": "a"}
    )
    assert DiscoveryPolicy(meta={"a": "1", "b": "2"}) == DiscoveryPolicy(meta={"b": "2", "a": "1"})
    assert DiscoveryPolicy() != "policy"
    assert DiscoveryPolicy().retries == 2
    assert DiscoveryPolicy().outliers is None
    assert OutlierEjection() == OutlierEjection(5, 30.0, 300.0, 50.0)
    assert registry_agent.DiscoveryPolicy is DiscoveryPolicy
    assert registry_agent.OutlierEjection is OutlierEjection
    with pytest.raises(AttributeError):
        policy.retries = 3  # type: ignore[misc]
    # The caller's mapping changing later changes nothing.
    meta = {"version": "v2"}
    frozen = DiscoveryPolicy(meta=meta)
    meta["version"] = "v3"
    assert frozen.meta == {"version": "v2"}
    assert DiscoveryPolicy(server_name="orders.internal").tls_server_name("orders") == (
        "orders.internal"
    )
    assert DiscoveryPolicy().tls_server_name("orders") == "orders"


def test_idempotent_methods_and_opt_in_retries() -> None:
    assert all(is_idempotent(m) for m in ("GET", "head", "OPTIONS", "PUT", "DELETE", "TRACE"))
    assert not any(is_idempotent(m) for m in ("POST", "PATCH", "CONNECT"))
    policy = DiscoveryPolicy(retry_statuses=(502, 503), retry_read_timeouts=True)
    assert policy.retries_status("GET", 503)
    assert not policy.retries_status("POST", 503)
    assert not policy.retries_status("GET", 500)
    assert policy.retries_read_timeout("PUT")
    assert not policy.retries_read_timeout("POST")
    assert not DiscoveryPolicy().retries_status("GET", 503)
    assert not DiscoveryPolicy().retries_read_timeout("GET")


# --- filters and locality ----------------------------------------------------------------


def test_matches_needs_every_tag_and_every_meta_entry() -> None:
    canary_v2 = inst(1, tags=("canary", "x"), version="v2", zone="a")
    plain_v2 = ServiceInstance.from_registry(
        service="orders",
        address="127.0.0.1",
        port=9002,
        id="o2",
        version="v1",
        meta={"version": "v2"},
    )
    policy = DiscoveryPolicy(tags=["canary"], meta={"version": "v2", "zone": "a"})
    assert policy.matches(canary_v2)  # version from the instance's own field
    assert not policy.matches(plain_v2)  # no canary tag
    assert DiscoveryPolicy(meta={"version": "v2"}).matches(plain_v2)  # meta wins over the field
    assert not DiscoveryPolicy(meta={"version": "v1"}).matches(plain_v2)
    assert not DiscoveryPolicy(meta={"zone": "b"}).matches(canary_v2)
    assert DiscoveryPolicy().matches(plain_v2)
    assert policy.describe() == "tags canary, meta version=v2,zone=a"
    assert DiscoveryPolicy().describe() == ""


def test_locality_tiers_fall_back_from_the_last_entry() -> None:
    a1 = inst(1, zone="a", datacenter="dc1")
    b1 = inst(2, zone="b", datacenter="dc1")
    b2 = inst(3, zone="b", datacenter="dc2")
    prefer = {"datacenter": "dc1", "zone": "a"}
    assert locality_tiers([a1, b1, b2], prefer) == [[a1], [a1, b1], [a1, b1, b2]]
    assert preferred([a1, b1, b2], prefer) == [a1]
    assert preferred([b1, b2], prefer) == [b1]  # same datacenter, other zone
    assert preferred([b2], prefer) == [b2]  # anything at all
    assert preferred([], prefer) == []
    assert preferred([a1, b1], {}) == [a1, b1]


def test_percent_cap() -> None:
    assert [max_ejections(n, 50) for n in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [max_ejections(n, 0) for n in range(4)] == [0, 0, 1, 1]  # one always may be
    assert [max_ejections(n, 100) for n in range(4)] == [0, 0, 1, 2]  # never all
    assert max_ejections(10, 10) == 1
    assert max_ejections(10, 30) == 3


# --- the ejection timeline ---------------------------------------------------------------


def fail(
    tracker: OutlierTracker,
    instance: ServiceInstance,
    rule: OutlierEjection,
    n: int,
    **kwargs: Any,
) -> bool:
    """Report ``n`` failures (all of them); True when one of them ejected."""
    outcomes = [tracker.report("orders", instance, False, rule, **kwargs) for _ in range(n)]
    return any(outcomes)


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=3, base_time=10, max_time=100)
    one, two = inst(1), inst(2)
    tracker.split("orders", [one, two], rule)
    assert not fail(tracker, one, rule, 2)
    tracker.report("orders", one, True, rule)  # the streak is broken
    assert not fail(tracker, one, rule, 2)
    assert tracker.ejected("orders") == []
    assert tracker.report("orders", one, False, rule)  # the third in a row
    assert tracker.ejected("orders") == [one]
    assert tracker.split("orders", [one, two], rule) == ([two], [one])
    # Outcomes while ejected change nothing (in-flight calls reporting late).
    tracker.report("orders", one, True, rule)
    assert tracker.ejected("orders") == [one]
    clock.now += 9.9
    assert tracker.ejected("orders") == [one]
    clock.now += 0.1
    assert tracker.ejected("orders") == []
    assert tracker.split("orders", [one, two], rule) == ([one, two], [])
    # Back with its failure count reset: two failures do not eject it again.
    assert tracker.state("orders", one)[0] == 0
    assert not fail(tracker, one, rule, 2)


def test_ejections_grow_by_base_time_capped_at_max_time() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=1, base_time=10, max_time=35)
    one = inst(1)
    tracker.split("orders", [one, inst(2)], rule)
    lasted = []
    for _ in range(5):
        assert tracker.report("orders", one, False, rule)
        started = clock.now
        while tracker.ejected("orders"):
            clock.now += 1
        lasted.append(clock.now - started)
    assert lasted == [10, 20, 30, 35, 35]
    assert tracker.state("orders", one)[1] == 5


def test_the_multiplier_decays_by_one_per_base_time_un_ejected() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=1, base_time=10, max_time=1000)
    one = inst(1)
    tracker.split("orders", [one, inst(2)], rule)
    for k in (1, 2, 3):
        assert tracker.report("orders", one, False, rule)
        clock.now += 10 * k  # exactly the ejection's length: back now
    assert tracker.state("orders", one)[1:] == (3, None)
    clock.now += 25  # two base times (and a half) un-ejected: k 3 -> 1
    tracker.report("orders", one, True, rule)
    assert tracker.state("orders", one)[1] == 1
    assert tracker.report("orders", one, False, rule)
    assert tracker.state("orders", one)[2] == pytest.approx(clock.now + 20)  # k = 2
    clock.now += 20 + 10 * 5  # long un-ejected: k back to 0
    tracker.report("orders", one, True, rule)
    assert tracker.state("orders", one)[1] == 0
    assert tracker.report("orders", one, False, rule)
    assert tracker.state("orders", one)[2] == pytest.approx(clock.now + 10)  # the first again


def test_the_percent_cap_and_the_only_candidate() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=1, base_time=10, max_time=100)
    pool = [inst(n) for n in range(1, 5)]
    tracker.split("orders", pool, rule)
    assert tracker.report("orders", pool[0], False, rule)
    assert tracker.report("orders", pool[1], False, rule)
    assert not tracker.report("orders", pool[2], False, rule)  # 50 % of 4: two at most
    assert tracker.ejected("orders") == pool[:2]
    # The cap is asked again at the next failure once there is room.
    clock.now += 10
    assert tracker.ejected("orders") == []
    assert tracker.report("orders", pool[2], False, rule)

    # The only candidate is never ejected.
    alone = OutlierTracker(clock)
    alone.split("orders", [pool[0]], rule)
    assert not fail(alone, pool[0], rule, 10)
    assert alone.split("orders", [pool[0]], rule) == ([pool[0]], [])

    # Two candidates: one may be, even at 0 %, never both.
    strict = OutlierEjection(consecutive_failures=1, base_time=10, max_ejected_percent=0)
    pair = OutlierTracker(clock)
    pair.split("orders", pool[:2], strict)
    assert pair.report("orders", pool[0], False, strict)
    assert not pair.report("orders", pool[1], False, strict)

    # A service that shrank: the one ejected last stays out, the others are offered again.
    shrunk = OutlierTracker(clock)
    shrunk.split("orders", pool, rule)
    assert shrunk.report("orders", pool[0], False, rule)
    clock.now += 1
    assert shrunk.report("orders", pool[1], False, rule)
    assert shrunk.split("orders", pool[:3], rule) == ([pool[0], pool[2]], [pool[1]])
    assert shrunk.split("orders", pool[:1], rule) == ([pool[0]], [])


def test_reports_before_any_choice_eject_and_the_first_choice_caps() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=1, base_time=10)
    pool = [inst(1), inst(2), inst(3)]
    # No choice yet: the candidate count is unknown, every report may eject.
    assert all(tracker.report("orders", i, False, rule) for i in pool)
    assert tracker.ejected("orders") == pool
    # The first choice applies the cap (50 % of 3: one); the latest ejected stays out.
    assert tracker.split("orders", pool, rule) == (pool[:2], pool[2:])


def test_endpoints_are_keyed_by_address_and_port_not_id() -> None:
    tracker = OutlierTracker(Clock())
    rule = OutlierEjection(consecutive_failures=2)
    first = inst(1)
    renamed = ServiceInstance.from_registry(
        service="orders", address="127.0.0.1", port=9001, id="other-id"
    )
    tracker.split("orders", [first, inst(2)], rule)
    tracker.report("orders", first, False, rule)
    assert tracker.report("orders", renamed, False, rule)
    assert tracker.split("orders", [first, inst(2)], rule)[1] == [first]


def test_threads_reporting_while_choosing() -> None:
    tracker = OutlierTracker()
    rule = OutlierEjection(consecutive_failures=3, base_time=60)
    pool = [inst(n) for n in range(10)]
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(2000):
                tracker.report("orders", pool[(n + i) % 10], (i % 7) == 0, rule)
                if i % 10 == 0:
                    usable, ejected = tracker.split("orders", pool, rule)
                    assert len(usable) + len(ejected) == 10
                    assert len(ejected) <= 5
                    tracker.ejected("orders")
        except BaseException as exc:  # pragma: no cover - shown below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert 1 <= len(tracker.ejected("orders")) <= 5  # the percent cap held throughout
    assert tracker.size == 10


def test_memory_stays_bounded() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock, forget_after=60, max_endpoints=1000)
    rule = OutlierEjection(consecutive_failures=2)
    for n in range(20_000):
        instance = ServiceInstance.from_registry(
            service=f"s{n % 50}", address=f"10.0.{n // 250}.{n % 250}", port=80, id=f"i{n}"
        )
        tracker.report(instance.service, instance, False, rule)
        assert tracker.size <= 1000
        clock.now += 0.001
    clock.now += 61
    tracker.report("orders", inst(1), True, rule)  # an insert sweeps the stale ones
    assert tracker.size == 1
    assert tracker._services.keys() == {"orders"}


# --- choose() over the in-memory registry -------------------------------------------------


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"policy-{uuid.uuid4().hex}")


def put(
    registry: MemoryRegistry, instance: ServiceInstance, status: HealthStatus = HealthStatus.PASSING
) -> None:
    registry.put(InstanceHealth(instance, status), ttl=60)


async def test_choose_filters_prefers_and_says_why(registry: MemoryRegistry) -> None:
    stable = [inst(n, version="v1", zone="a") for n in (1, 2)]
    canary = inst(3, tags=("canary",), version="v2", zone="b")
    for instance in [*stable, canary]:
        put(registry, instance)
    put(registry, inst(4, version="v2"), HealthStatus.CRITICAL)
    v2 = DiscoveryPolicy(meta={"version": "v2"})
    async with AsyncDiscovery(
        registry.url, policy=DiscoveryPolicy(prefer={"zone": "a"}), policies={"users": v2}
    ) as discovery:
        assert discovery.policy_for("users") is v2
        assert discovery.policy_for("orders") == DiscoveryPolicy(prefer={"zone": "a"})
        assert {(await discovery.choose("orders")).id for _ in range(6)} == {"o1", "o2"}
        assert (await discovery.choose("orders", policy=v2)).id == "o3"
        assert (
            await discovery.choose(
                "orders", exclude=stable, policy=DiscoveryPolicy(prefer={"zone": "a"})
            )
        ).id == "o3"  # the preferred zone spent: the rest
        wanted = DiscoveryPolicy(tags=["canary"], meta={"version": "v3"})
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("orders", policy=wanted)
        assert info.value.message == (
            "no healthy instance matching tags canary, meta version=v3 (3 healthy do not match)"
        )
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("orders", exclude=["o3"], policy=v2)
        assert info.value.message == (
            "no healthy instance matching meta version=v2 left to try (2 healthy do not match)"
        )


async def test_choose_names_ejected_and_unhealthy(registry: MemoryRegistry) -> None:
    pool = [inst(1), inst(2)]
    for instance in pool:
        put(registry, instance)
    put(registry, ServiceInstance("users", address="127.0.0.1", port=1), HealthStatus.CRITICAL)
    rule = OutlierEjection(consecutive_failures=1, base_time=60)
    policy = DiscoveryPolicy(outliers=rule)
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        await discovery.choose("orders")
        discovery.report("orders", pool[0], False)
        assert discovery.ejected("orders") == [pool[0]]
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"o2"}
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("orders", exclude=["o2"])
        assert info.value.message == "no healthy instance left to try (1 ejected as outliers)"
        # Without outliers in the policy, report() is a no-op and ejection is not applied.
        discovery.report("orders", pool[1], False, policy=DiscoveryPolicy())
        assert discovery.ejected("orders") == [pool[0]]
        assert {
            (await discovery.choose("orders", policy=DiscoveryPolicy())).id for _ in range(4)
        } == {
            "o1",
            "o2",
        }
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("users")
        assert info.value.message == "no healthy instance (1 registered, none passing)"


def test_bad_policies_are_config_errors(registry: MemoryRegistry) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncDiscovery(registry.url, policy={"tags": ["x"]})  # type: ignore[arg-type]
    assert info.value.field == "policy"
    with pytest.raises(ConfigError) as info:
        Discovery(registry.url, policies={"orders": "canary"})  # type: ignore[dict-item]
    assert info.value.field == "policies"
    discovery = AsyncDiscovery(registry.url)
    with pytest.raises(ConfigError) as info:
        discovery.report("orders", "127.0.0.1:9001", False)  # type: ignore[arg-type]
    assert info.value.field == "instance"


class CountingBackend(MemoryBackend):
    """The in-memory backend, counting its watches and service listings."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.watches = 0
        self.listings = 0

    def watch(self, service: str, **kwargs: Any) -> Any:
        self.watches += 1
        return super().watch(service, **kwargs)

    async def services(self) -> list[str]:
        self.listings += 1
        return list(await super().services())


async def test_is_service_lists_once_per_few_seconds_and_starts_no_watch(
    registry: MemoryRegistry,
) -> None:
    put(registry, inst(1))
    backend = CountingBackend(registry)
    async with AsyncDiscovery(backend) as discovery:
        assert await discovery.is_service("orders")
        assert not await discovery.is_service("example.com")
        assert not await discovery.is_service("users")
        assert backend.listings == 1  # cached
        assert backend.watches == 0
        assert discovery._watchers == {}


def test_sync_discovery_mirrors_the_async_one(registry: MemoryRegistry) -> None:
    pool = [inst(1, zone="a"), inst(2, zone="b")]
    for instance in pool:
        put(registry, instance)
    rule = OutlierEjection(consecutive_failures=2, base_time=60)
    policy = DiscoveryPolicy(prefer={"zone": "b"}, outliers=rule)
    with Discovery(registry.url, policy=policy) as discovery:
        assert discovery.policy is policy
        assert discovery.policy_for("orders") is policy
        assert discovery.choose("orders").id == "o2"
        assert discovery.choose("orders", policy=DiscoveryPolicy(prefer={"zone": "a"})).id == "o1"
        reporters = [
            threading.Thread(target=discovery.report, args=("orders", pool[1], False))
            for _ in range(2)
        ]
        for thread in reporters:
            thread.start()
        for thread in reporters:
            thread.join(10)
        assert discovery.ejected("orders") == [pool[1]]
        assert discovery.choose("orders").id == "o1"  # zone b ejected: fall back
        assert discovery.is_service("orders")
        assert not discovery.is_service("nope")


# --- issue 16 break-it fixes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["orders", "orders.internal", "xn--bcher-kva.example.", "a" * 63, "10.0.0.1", "::1"]
)
def test_a_server_name_is_a_dns_host_name_or_an_ip(name: str) -> None:
    assert DiscoveryPolicy(server_name=name).tls_server_name("orders") == name


def test_an_ejected_endpoint_that_left_holds_no_slot() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=2, base_time=10, max_ejected_percent=50)
    a, b, c = inst(1), inst(2), inst(3)
    tracker.split("orders", [a, b, c], rule)
    fail(tracker, a, rule, 2)
    assert tracker.ejected("orders", rule) == [a]
    # a moved to another port while ejected: the candidates are now a2, b, c.
    a2 = ServiceInstance.from_registry(service="orders", address="127.0.0.1", port=9011, id="o1")
    assert tracker.split("orders", [a2, b, c], rule) == ([a2, b, c], [])
    assert fail(tracker, b, rule, 2)  # a's old endpoint takes no slot of the cap (1 of 3)
    assert tracker.split("orders", [a2, b, c], rule) == ([a2, c], [b])
    # Given candidates directly (what choose() would weigh now) the same holds.
    fresh = OutlierTracker(clock)
    fail(fresh, a, rule, 2)
    assert fail(fresh, b, rule, 2, candidates=[b, c])


def test_the_cap_is_kept_per_policy() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=2, base_time=10)
    pool = [inst(n) for n in range(6)]
    default, canary = DiscoveryPolicy(outliers=rule), DiscoveryPolicy(tags=["c"], outliers=rule)
    tracker.split("orders", pool, rule, key=default)
    tracker.split("orders", pool[:1], rule, key=canary)  # one canary: a cap of 0 for it only
    assert fail(tracker, pool[3], rule, 2, key=default)
    assert tracker.split("orders", pool, rule, key=default)[1] == [pool[3]]


async def test_report_under_one_policy_ignores_another_policys_choice(
    registry: MemoryRegistry,
) -> None:
    pool = [inst(1, tags=("canary",)), *(inst(n) for n in range(2, 7))]
    for instance in pool:
        put(registry, instance)
    rule = OutlierEjection(consecutive_failures=2, base_time=60)
    policy = DiscoveryPolicy(outliers=rule)
    canary = DiscoveryPolicy(tags=["canary"], outliers=rule)
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        await discovery.choose("orders")
        assert (await discovery.choose("orders", policy=canary)).id == "o1"
        for _ in range(2):
            discovery.report("orders", pool[3], False)
        assert discovery.ejected("orders") == [pool[3]]
        assert "o4" not in {(await discovery.choose("orders")).id for _ in range(10)}
        # The only canary is never ejected under the canary policy.
        for _ in range(4):
            discovery.report("orders", pool[0], False, policy=canary)
        assert discovery.ejected("orders", policy=canary) == []
        assert (await discovery.choose("orders", policy=canary)).id == "o1"


async def test_a_deregistered_ejected_instance_frees_its_slot(registry: MemoryRegistry) -> None:
    pool = [inst(n) for n in range(1, 4)]
    for instance in pool:
        put(registry, instance)
    rule = OutlierEjection(consecutive_failures=2, base_time=60)
    async with AsyncDiscovery(registry.url, policy=DiscoveryPolicy(outliers=rule)) as discovery:
        await discovery.choose("orders")
        for _ in range(2):
            discovery.report("orders", pool[2], False)
        assert discovery.ejected("orders") == [pool[2]]
        registry.delete("orders", pool[2].id, None)
        for _ in range(100):  # the watch sees it go (in memory: at once, bounded anyway)
            if len(await discovery.instances("orders")) == 2:
                break
            await asyncio.sleep(0.01)
        assert discovery.ejected("orders") == []  # no longer a candidate: not listed
        # No choice between: report() weighs the current candidates (2: a cap of 1).
        for _ in range(2):
            discovery.report("orders", pool[0], False)
        assert discovery.ejected("orders") == [pool[0]]
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"o2"}


async def test_ejected_agrees_with_choose_before_and_after_the_first_choice(
    registry: MemoryRegistry,
) -> None:
    rule = OutlierEjection(consecutive_failures=1, base_time=60)
    policy = DiscoveryPolicy(outliers=rule)
    only = inst(1)
    put(registry, only)
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        discovery.report("orders", only, False)
        assert discovery.ejected("orders") == []  # the only one is never left out
        assert (await discovery.choose("orders")).id == "o1"
        assert discovery.ejected("orders") == []
    ten = [inst(n) for n in range(10, 20)]
    for instance in ten:
        put(registry, instance)
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        for instance in ten:
            discovery.report("orders", instance, False)
        before = discovery.ejected("orders")
        assert len(before) == 5  # 50 % of the ten reported
        offered = {(await discovery.choose("orders")).id for _ in range(30)}
        after = discovery.ejected("orders")
        assert len(after) == 5  # 50 % of 11 candidates, rounded down
        assert offered.isdisjoint(i.id for i in after)
        assert len(offered) == 11 - 5
        assert discovery.ejected("orders", policy=DiscoveryPolicy()) == []  # no outliers


BAD_POLICIES = [{"outliers": None}, "canary", OutlierEjection()]


@pytest.mark.parametrize("bad", BAD_POLICIES)
async def test_a_bad_policy_argument_is_a_config_error_before_any_watch(
    registry: MemoryRegistry, bad: object
) -> None:
    put(registry, inst(1))
    async with AsyncDiscovery(registry.url) as discovery:
        with pytest.raises(ConfigError) as info:
            await discovery.choose("orders", policy=bad)  # type: ignore[arg-type]
        assert info.value.field == "policy"
        with pytest.raises(ConfigError) as info:
            discovery.report("orders", inst(1), False, policy=bad)  # type: ignore[arg-type]
        assert info.value.field == "policy"
        with pytest.raises(ConfigError) as info:
            discovery.ejected("orders", policy=bad)  # type: ignore[arg-type]
        assert info.value.field == "policy"
        assert discovery._watchers == {}
    with Discovery(registry.url) as sync, pytest.raises(ConfigError) as info:
        sync.choose("orders", policy=bad)  # type: ignore[arg-type]
    assert info.value.field == "policy"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((None, inst(1), False), "service"),
        (("", inst(1), False), "service"),
        (("orders", inst(1), "no"), "ok"),
        (("orders", inst(1), None), "ok"),
        (("orders", inst(1), 0), "ok"),
        (("users", inst(1), False), "instance"),
        (("orders", None, False), "instance"),
    ],
)
def test_bad_report_arguments_are_config_errors(
    registry: MemoryRegistry, args: tuple[Any, ...], field: str
) -> None:
    policy = DiscoveryPolicy(outliers=OutlierEjection(consecutive_failures=1))
    with Discovery(registry.url, policy=policy) as discovery:
        with pytest.raises(ConfigError) as info:
            discovery.report(*args)
        assert info.value.field == field
        assert discovery.ejected("orders") == []
        assert discovery.ejected("users") == []


@pytest.mark.parametrize("name", [None, 5, b"x", ""])
def test_bad_names_for_is_service_and_ejected(registry: MemoryRegistry, name: Any) -> None:
    with Discovery(registry.url) as discovery:
        with pytest.raises(ConfigError) as info:
            discovery.is_service(name)
        assert info.value.field == "name"
        with pytest.raises(ConfigError) as info:
            discovery.ejected(name)
        assert info.value.field == "service"


@pytest.mark.parametrize("exclude", ["o1", b"o1", 5])
async def test_exclude_must_be_a_collection(registry: MemoryRegistry, exclude: Any) -> None:
    put(registry, inst(1))
    async with AsyncDiscovery(registry.url) as discovery:
        with pytest.raises(ConfigError) as info:
            await discovery.choose("orders", exclude=exclude)
        assert info.value.field == "exclude"
        assert (await discovery.choose("orders", exclude=["o2"])).id == "o1"


def test_at_the_bound_one_endpoint_goes_per_insert() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock, max_endpoints=2000)
    rule = OutlierEjection(consecutive_failures=3)
    pool = [
        ServiceInstance.from_registry(
            service="s", address=f"10.{n // 60000}.0.1", port=n % 60000 + 1, id=str(n)
        )
        for n in range(6000)
    ]
    kept = pool[10]
    for instance in pool[:2000]:
        tracker.report("s", instance, False, rule)
        clock.now += 0.001
    slowest = 0.0
    for instance in pool[2000:]:
        tracker.report("s", kept, True, rule)  # seen again: the least recent go first
        started = time.perf_counter()
        tracker.report("s", instance, False, rule)
        slowest = max(slowest, time.perf_counter() - started)
        assert tracker.size == 2000  # exactly one forgotten per insert, no mass trim
        clock.now += 0.001
    assert tracker.state("s", kept)[0] == 0
    assert _tracked(tracker, kept)
    assert not _tracked(tracker, pool[0])
    # No sort of them all under the lock: an insert at the bound stays cheap (generous).
    assert slowest < 0.05, slowest


def _tracked(tracker: OutlierTracker, instance: ServiceInstance) -> bool:
    return (instance.address, instance.port) in tracker._services.get(instance.service, {})


async def test_is_service_of_a_service_already_read_asks_no_registry(
    registry: MemoryRegistry,
) -> None:
    """A service discovery already serves is a service: a registry that has gone down
    since is not asked (a transport asks this before every request without services=)."""
    put(registry, inst(1))
    backend = CountingBackend(registry)
    async with AsyncDiscovery(backend, sync_timeout=1.0) as discovery:
        assert [i.id for i in await discovery.instances("orders")] == ["o1"]
        registry.stop()
        for _ in range(3):
            assert await discovery.is_service("orders")
        assert backend.listings == 0  # never listed: the watch's read answers it
        assert backend.watches == 1
        with pytest.raises(registry_agent.BackendUnavailable):  # not served: asked, fails
            await discovery.is_service("users")
        assert backend.listings == 1
        assert set(discovery._watchers) == {"orders"}


# --- choose() plans: kept while the watcher's view stays, rebuilt on every change --------


async def _watched(discovery: AsyncDiscovery, ids: set[str]) -> None:
    """Until the watcher's view of orders holds exactly ``ids`` (bounded: 5 s)."""
    watcher = discovery._watchers["orders"]
    for _ in range(500):
        if {h.instance.id for h in watcher.snapshot("orders")} == ids:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the watcher never saw {ids}")


async def test_choose_plan_is_reused_and_follows_every_change(registry: MemoryRegistry) -> None:
    put(registry, inst(1, tags=("v2",), zone="b"))
    put(registry, inst(2, tags=("v1",), zone="a"))
    rule = OutlierEjection(consecutive_failures=1, base_time=60)
    policy = DiscoveryPolicy(tags=("v2",), prefer={"zone": "a"}, outliers=rule)
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        reads = 0
        instances = discovery.instances

        async def counted(service: str, healthy_only: bool = True) -> list[ServiceInstance]:
            nonlocal reads
            reads += 1
            return await instances(service, healthy_only)

        discovery.instances = counted  # type: ignore[method-assign]
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"o1"}
        assert reads == 1  # one read for the view; the other choices reuse its plan
        # A preferred match arrives: the first choice after the watcher saw it uses it.
        put(registry, inst(3, tags=("v2",), zone="a"))
        await _watched(discovery, {"o1", "o2", "o3"})
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"o3"}
        assert reads == 2
        # Ejection and exclusion still apply on a kept plan (fallback to the next tier).
        discovery.report("orders", inst(3, tags=("v2",), zone="a"), False)
        assert (await discovery.choose("orders")).id == "o1"
        with pytest.raises(NoInstanceAvailable) as info:  # exclusion after ejection, as before
            await discovery.choose("orders", exclude=["o1"])
        assert info.value.message == (
            "no healthy instance matching tags v2 left to try"
            " (1 healthy do not match, 1 ejected as outliers)"
        )
        assert reads == 2
        # Failing its check takes it out at once; a policy object of its own has its own plan.
        put(registry, inst(1, tags=("v2",), zone="b"), HealthStatus.CRITICAL)
        await _watched(discovery, {"o1", "o2", "o3"})
        for _ in range(500):
            if not any(
                h.healthy and h.instance.id == "o1" for h in await discovery.health("orders")
            ):
                break
            await asyncio.sleep(0.01)
        assert {(await discovery.choose("orders")).id for _ in range(4)} == {"o3"}
        assert (await discovery.choose("orders", policy=DiscoveryPolicy(tags=("v1",)))).id == "o2"
        with pytest.raises(NoInstanceAvailable) as info:
            await discovery.choose("orders", exclude=["o3"])
        assert info.value.message == (
            "no healthy instance matching tags v2 left to try (1 healthy do not match)"
        )


def test_blocking_choose_reads_a_kept_plan_in_the_callers_thread(
    registry: MemoryRegistry,
) -> None:
    put(registry, inst(1))
    with Discovery(registry.url) as discovery:
        assert discovery.choose("orders").id == "o1"  # the first: through the loop thread
        hops = 0
        run = discovery._thread.run

        def counted(coro: Any, timeout: float | None) -> Any:
            nonlocal hops
            hops += 1
            return run(coro, timeout)

        discovery._thread.run = counted  # type: ignore[method-assign]
        assert {discovery.choose("orders").id for _ in range(3)} == {"o1"}
        assert hops == 0
        put(registry, inst(2))
        deadline = time.monotonic() + 5
        while len(discovery._async._watchers["orders"].snapshot("orders")) < 2:
            assert time.monotonic() < deadline, "the watcher never saw o2"
            time.sleep(0.01)
        assert {discovery.choose("orders").id for _ in range(4)} == {"o1", "o2"}
        assert hops == 1  # the view changed: one trip to the loop rebuilt the plan
        assert discovery.choose("orders", exclude=["o1"]).id == "o2"
        assert discovery.choose("orders", exclude=("o2",)).id == "o1"
    with pytest.raises(RuntimeError, match="closed"):
        discovery.choose("orders")


def test_split_skips_no_ejection_and_keeps_the_timed_recovery() -> None:
    clock = Clock()
    tracker = OutlierTracker(clock)
    rule = OutlierEjection(consecutive_failures=1, base_time=10)
    pool = [inst(n) for n in range(1, 5)]
    for instance in pool:
        tracker.report("orders", instance, True, rule)
    usable, ejected = tracker.split("orders", pool, rule)
    assert usable is pool  # nothing ejected: the input itself
    assert ejected == []
    tracker.report("orders", pool[1], False, rule)  # 10 s
    clock.now += 5
    tracker.report("orders", pool[2], False, rule)  # 10 s, ends 5 s later
    assert tracker.split("orders", pool, rule) == ([pool[0], pool[3]], [pool[1], pool[2]])
    clock.now += 5
    assert tracker.split("orders", pool, rule) == ([pool[0], pool[1], pool[3]], [pool[2]])
    clock.now += 5
    assert tracker.split("orders", pool, rule) == (pool, [])
    assert tracker.state("orders", pool[1]) == (0, 1, None)  # recovered, k decays later
    clock.now += 20
    tracker.report("orders", pool[1], False, rule)  # k decayed to 0 first: 10 s again
    assert tracker.state("orders", pool[1])[2] == clock.now + 10


async def test_kept_plan_tiers_agree_with_preferred(registry: MemoryRegistry) -> None:
    """With exclusions (and so on a kept plan), the choice is among preferred()'s tier."""
    pool = [inst(n, zone="ab"[n % 2], dc="12"[n // 2 % 2]) for n in range(1, 13)]
    for instance in pool:
        put(registry, instance)
    policy = DiscoveryPolicy(prefer={"zone": "a", "dc": "1"})
    async with AsyncDiscovery(registry.url, policy=policy) as discovery:
        await discovery.choose("orders")
        for cut in range(len(pool)):
            exclude = [i.id for i in pool[: cut + 1] if i.meta["zone"] == "a" or cut % 3 == 0]
            usable = [i for i in pool if i.id not in exclude]
            expected = {i.id for i in preferred(usable, policy.prefer)}
            assert expected
            chosen = {
                (await discovery.choose("orders", exclude=exclude)).id for _ in range(2 * len(pool))
            }
            assert chosen == expected, (exclude, chosen, expected)
