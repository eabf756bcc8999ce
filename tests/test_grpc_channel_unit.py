"""registry_agent.grpc: the discovery-fed channel's logic, over the memory registry
and real grpcio server processes (integration/grpc_kit.py)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from integration.certs import make_named_cert
from integration.grpc_channel_kit import restart, started_servers
from integration.grpc_kit import CREATE, GET, SLOW, GrpcServer, unary, unary_stream
from registry_agent import (
    AsyncDiscovery,
    ConfigError,
    Discovery,
    DiscoveryPolicy,
    HealthStatus,
    InstanceHealth,
    OutlierEjection,
    ServiceInstance,
)
from registry_agent.grpc import DiscoveryChannel, NoInstanceError
from registry_agent.grpc import aio as grpc_aio
from registry_agent.grpc._common import target_of
from registry_agent.testing.memory import MemoryRegistry
from registry_agent.testing.servers import free_port


class _Reports:
    """Mixed into a real discovery class: also keeps every report it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[int, bool]] = []

    def report(
        self,
        service: str,
        instance: ServiceInstance,
        ok: bool,
        *,
        policy: DiscoveryPolicy | None = None,
    ) -> None:
        self.reports.append((instance.port, ok))
        super().report(service, instance, ok, policy=policy)  # type: ignore[misc]


class Recording(_Reports, Discovery):
    """A real Discovery that also keeps every report it is given."""


class AsyncRecording(_Reports, AsyncDiscovery):
    """A real AsyncDiscovery that also keeps every report it is given."""


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"grpc-{uuid.uuid4().hex}")


@pytest.fixture
def servers() -> Iterator[list[GrpcServer]]:
    with started_servers("a", "b", "c") as started:
        yield started


def put(registry: MemoryRegistry, port: int, service: str = "orders") -> ServiceInstance:
    instance = ServiceInstance(service, address="127.0.0.1", port=port, id=f"{service}-{port}")
    registry.put(InstanceHealth(instance, HealthStatus.PASSING), ttl=600)
    return instance


def name_of(answer: bytes) -> str:
    return answer.split(b":")[0].decode()


def names(answers: list[bytes]) -> Counter[str]:
    return Counter(a.split(b":")[0].decode() for a in answers)


def test_balances_over_every_instance(registry: MemoryRegistry, servers: list[GrpcServer]) -> None:
    for server in servers:
        put(registry, server.port)
    with Recording(registry.url) as discovery, DiscoveryChannel(discovery, "orders") as channel:
        answers = [unary(channel)(b"x", timeout=5) for _ in range(30)]
        assert names(answers) == {"a": 10, "b": 10, "c": 10}
        assert len(channel.endpoints()) == 3
        answer, call = unary(channel).with_call(b"w", 5)  # grpc's positional timeout
        assert answer == b"a:w"
        assert call.code() == grpc.StatusCode.OK
        assert all(ok for _, ok in discovery.reports)
        assert len(discovery.reports) == 31
        assert channel.state() == grpc.ChannelConnectivity.READY


def test_a_generated_stub_works_sync_and_aio(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    put(registry, servers[0].port)
    request = health_pb2.HealthCheckRequest(service="")
    with Discovery(registry.url) as discovery, DiscoveryChannel(discovery, "orders") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    async def main() -> int:
        async with (
            AsyncDiscovery(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, "orders") as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await stub.Check(request, timeout=5)
            status: int = answer.status
            return status

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.SERVING


def test_idempotent_unavailable_goes_to_another_instance(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
    with (
        Recording(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent={GET}) as channel,
    ):
        servers[0].fail_next("UNAVAILABLE", 100)
        answers = [unary(channel)(b"x", timeout=5) for _ in range(12)]
        assert names(answers)["a"] == 0
        assert len(answers) == 12
        failures = [port for port, ok in discovery.reports if not ok]
        assert failures
        assert set(failures) == {servers[0].port}
        # Create is not in the collection: the same failure is raised, not retried.
        with pytest.raises(grpc.RpcError) as info:  # round robin: a is one of the three
            [unary(channel, CREATE)(b"x", timeout=5) for _ in range(3)]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "a: failing on purpose" in info.value.details()


def test_an_application_status_is_no_failure_and_no_retry(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
    with (
        Recording(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True) as channel,
    ):
        for server in servers:
            server.fail_next("NOT_FOUND", 1)
        with pytest.raises(grpc.RpcError) as info:
            unary(channel)(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert discovery.reports == [(servers[0].port, True)]


def test_retries_are_bounded_by_the_policy(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
        server.fail_next("UNAVAILABLE", 100)
    policy = DiscoveryPolicy(retries=1)
    with (
        Recording(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True, policy=policy) as channel,
    ):
        with pytest.raises(grpc.RpcError) as info:
            unary(channel)(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failing on purpose" in info.value.details()  # the real error, not "no instance"
        assert len(discovery.reports) == 2
        assert any("2 instances tried" in note for note in info.value.__notes__)


def test_instances_running_out_raise_the_last_real_error(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    put(registry, servers[0].port)
    servers[0].fail_next("UNAVAILABLE", 5)
    with (
        Discovery(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        unary(channel)(b"x", timeout=5)
    assert "a: failing on purpose" in info.value.details()


def test_a_retry_stays_within_the_calls_deadline(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers[:2]:
        put(registry, server.port)
    servers[0].fail_next("UNAVAILABLE", 1)
    with (
        Discovery(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True) as channel,
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            unary(channel, SLOW)(b"3", timeout=1.0)  # a: UNAVAILABLE at once, b: too slow
        elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.0


def test_non_idempotent_goes_elsewhere_only_when_never_connected(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    dead = free_port()  # nothing listens: the request never leaves this process
    put(registry, dead)
    put(registry, servers[0].port)
    with (
        Recording(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders") as channel,
    ):
        answers = [unary(channel, CREATE)(b"x", timeout=5) for _ in range(4)]
        assert names(answers) == {"a": 4}
        assert (dead, False) in discovery.reports
        # Once it may have reached a server, a non-idempotent call is not retried.
        servers[0].fail_next("UNAVAILABLE", 1)
        errors: list[str] = []
        for _ in range(4):
            try:
                unary(channel, CREATE)(b"x", timeout=5)
            except grpc.RpcError as error:
                errors.append(error.details())
        assert errors == ["a: failing on purpose"]


def test_no_instance_is_unavailable_saying_why(registry: MemoryRegistry) -> None:
    with Discovery(registry.url) as discovery, DiscoveryChannel(discovery, "orders") as channel:
        with pytest.raises(grpc.RpcError) as info:
            unary(channel)(b"x", timeout=5)
        assert isinstance(info.value, NoInstanceError)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details().startswith("orders: no healthy instance")
        with pytest.raises(grpc.RpcError) as streamed:
            list(unary_stream(channel)(b"", timeout=5))
        assert streamed.value.code() == grpc.StatusCode.UNAVAILABLE

    async def main() -> grpc.aio.AioRpcError:
        async with (
            AsyncDiscovery(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, "orders") as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(channel)(b"x", timeout=5)
            return info.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("orders: no healthy instance")


def test_an_instance_gone_is_left_after_its_call_in_flight(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    instances = [put(registry, server.port) for server in servers[:2]]
    with Discovery(registry.url) as discovery, DiscoveryChannel(discovery, "orders") as channel:
        for _ in range(2):
            unary(channel)(b"x", timeout=5)  # a channel to each
        results: list[bytes] = []
        slow = threading.Thread(
            target=lambda: results.append(unary(channel, SLOW)(b"1.5", timeout=10))
        )
        slow.start()  # round robin: on a
        time.sleep(0.3)
        registry.delete(instances[0].service, instances[0].id, None)
        deadline = time.monotonic() + 5
        while len(discovery.instances("orders")) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while (instances[0].address, instances[0].port) in channel.endpoints():
            assert time.monotonic() < deadline, "the gone instance's channel was kept"
            assert names([unary(channel)(b"x", timeout=5)]) == {"b": 1}
            time.sleep(0.1)
        slow.join(10)
        assert results == [b"a:1.5"]  # the call in flight was not cut
        assert names([unary(channel)(b"y", timeout=5) for _ in range(5)]) == {"b": 5}


def test_streams_pick_one_instance_and_report(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    put(registry, servers[0].port)
    with (
        Recording(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True) as channel,
    ):
        assert list(unary_stream(channel)(b"", timeout=5)) == [b"a:0", b"a:1", b"a:2"]
        servers[0].fail_next("UNAVAILABLE", 1)
        with pytest.raises(grpc.RpcError) as info:
            list(unary_stream(channel)(b"", timeout=5))  # never retried
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 5
        while len(discovery.reports) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # done callbacks run on grpc's thread
        assert discovery.reports == [(servers[0].port, True), (servers[0].port, False)]
        future = unary(channel).future(b"f", timeout=5)
        assert future.result() == b"a:f"


def test_aio_balances_retries_and_streams(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)

    async def main() -> None:
        async with AsyncRecording(registry.url) as discovery:
            channel = grpc_aio.DiscoveryChannel(discovery, "orders", idempotent=True)
            answers = [await unary(channel)(b"x", timeout=5) for _ in range(9)]
            assert names(answers) == {"a": 3, "b": 3, "c": 3}
            servers[1].fail_next("UNAVAILABLE", 100)
            answers = [await unary(channel)(b"x", timeout=5) for _ in range(9)]
            assert names(answers)["b"] == 0
            assert len(answers) == 9
            assert {p for p, ok in discovery.reports if not ok} == {servers[1].port}
            call = unary(channel)(b"w", timeout=5)
            assert await call in (b"a:w", b"c:w")
            assert await call.code() == grpc.StatusCode.OK
            streamed = [item async for item in unary_stream(channel)(b"", timeout=5)]
            assert len(streamed) == 3
            assert len(names(streamed)) == 1
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await channel.close()

    asyncio.run(main())


def test_aio_non_idempotent_is_not_retried(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    put(registry, servers[0].port)
    put(registry, servers[1].port)
    servers[0].fail_next("UNAVAILABLE", 1)

    async def main() -> None:
        async with (
            AsyncRecording(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, "orders") as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(channel, CREATE)(b"x", timeout=5)
            assert "a: failing on purpose" in str(info.value.details())
            assert discovery.reports == [(servers[0].port, False)]

    asyncio.run(main())


def test_tls_checks_the_certificate_against_the_service_name(
    registry: MemoryRegistry, tmp_path: Path
) -> None:
    cert = make_named_cert(tmp_path, "orders")
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.ca_bytes())
    with started_servers("a", "b", tls=cert.pair) as servers, Discovery(registry.url) as discovery:
        for server in servers:
            put(registry, server.port)
        with DiscoveryChannel(discovery, "orders", credentials=credentials) as channel:
            assert names([unary(channel)(b"x", timeout=5) for _ in range(4)]) == {"a": 2, "b": 2}
        # A configured server name the certificate does not carry: the TLS error itself.
        other = DiscoveryPolicy(server_name="billing")
        with (
            DiscoveryChannel(
                discovery, "orders", credentials=credentials, policy=other, idempotent=True
            ) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            unary(channel)(b"x", timeout=5)
        assert "Hostname Verification" in info.value.details()


def test_targets_and_bad_input() -> None:
    assert target_of("127.0.0.1", 5) == "ipv4:127.0.0.1:5"
    assert target_of("::1", 5) == "ipv6:[::1]:5"
    assert target_of("orders-1.internal", 5) == "dns:///orders-1.internal:5"
    registry = MemoryRegistry.named(f"grpc-{uuid.uuid4().hex}")
    with Discovery(registry.url) as discovery:
        with pytest.raises(ConfigError) as info:
            DiscoveryChannel(discovery, "orders", idempotent="/a.B/C")
        assert info.value.field == "idempotent"
        with pytest.raises(ConfigError) as info:
            DiscoveryChannel(discovery, "orders", idempotent={"Get"})
        assert info.value.field == "idempotent"
        with pytest.raises(ConfigError) as info:
            DiscoveryChannel(discovery, "orders", strategy="fastest")
        assert info.value.field == "strategy"
        with pytest.raises(ConfigError) as info:
            DiscoveryChannel(discovery, "")
        assert info.value.field == "service"


def test_importing_registry_agent_never_imports_grpc() -> None:
    code = "import sys, registry_agent; assert 'grpc' not in sys.modules, 'grpc imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- issue 16 break-it fixes ---------------------------------------------------------


def test_a_hung_instance_is_ejected_after_its_deadlines_sync_and_aio(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    # SIGSTOP: the instance accepts connections but never answers (half-open). Each
    # DEADLINE_EXCEEDED is a failure for report(), so two in a row eject it.
    for server in servers:
        put(registry, server.port)
    hung = servers[0]
    assert hung.process is not None
    policy = DiscoveryPolicy(outliers=OutlierEjection(consecutive_failures=2, base_time=60))
    with Recording(registry.url) as discovery:
        with DiscoveryChannel(discovery, "orders", idempotent=True, policy=policy) as channel:
            for _ in range(3):
                unary(channel)(b"warm", timeout=5)  # one channel per endpoint, connected
            hung.pause()
            try:
                outcomes: Counter[str] = Counter()
                for _ in range(12):
                    try:
                        outcomes[unary(channel)(b"x", timeout=0.5).split(b":")[0].decode()] += 1
                    except grpc.RpcError as error:
                        outcomes[error.code().name] += 1
            finally:
                hung.resume()
        assert outcomes["DEADLINE_EXCEEDED"] == 2, outcomes
        assert outcomes["b"] + outcomes["c"] == 10, outcomes
        assert (hung.port, False) in discovery.reports
        assert [i.port for i in discovery.ejected("orders", policy=policy)] == [hung.port]

    async def main() -> Counter[str]:
        seen: Counter[str] = Counter()
        async with (
            AsyncRecording(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, "orders", idempotent=True, policy=policy) as ch,
        ):
            for _ in range(3):
                await unary(ch)(b"warm", timeout=5)
            assert hung.process is not None
            hung.pause()
            try:
                for _ in range(12):
                    try:
                        seen[(await unary(ch)(b"x", timeout=0.5)).split(b":")[0].decode()] += 1
                    except grpc.RpcError as error:
                        seen[error.code().name] += 1
            finally:
                hung.resume()
            assert [i.port for i in discovery.ejected("orders", policy=policy)] == [hung.port]
        return seen

    seen = asyncio.run(main())
    assert seen["DEADLINE_EXCEEDED"] == 2, seen
    assert seen["b"] + seen["c"] == 10, seen


def test_deadline_exceeded_is_retried_only_with_retry_read_timeouts(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
    timeouts = DiscoveryPolicy(retry_read_timeouts=True)
    with Recording(registry.url) as discovery:
        plain = DiscoveryChannel(discovery, "orders", idempotent=True)
        retrying = DiscoveryChannel(discovery, "orders", idempotent=True, policy=timeouts)
        once = DiscoveryChannel(discovery, "orders", idempotent=False, policy=timeouts)
        with plain, retrying, once:
            servers[0].fail_next("DEADLINE_EXCEEDED", 100)
            with pytest.raises(grpc.RpcError) as caught:
                unary(plain)(b"x", timeout=5)  # round robin starts at a
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (servers[0].port, False) in discovery.reports
            answers = [unary(retrying)(b"x", timeout=5) for _ in range(6)]
            assert set(names(answers)) == {"b", "c"}  # a's answers went elsewhere
            codes: Counter[str] = Counter()
            for _ in range(6):
                try:
                    codes[name_of(unary(once, CREATE)(b"x", timeout=5))] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1
            assert codes == {"DEADLINE_EXCEEDED": 2, "b": 2, "c": 2}  # never retried


@pytest.mark.parametrize("retries", [1, 2])
def test_wait_for_ready_does_not_wait_on_dead_instances(
    registry: MemoryRegistry, servers: list[GrpcServer], retries: int
) -> None:
    # The registry still lists the killed instances (no health check here); with two of
    # three dead a break-it run saw every third call wait out its deadline on the second
    # (and again with retries=1, where the last allowed attempt waited on a dead one).
    for server in servers:
        put(registry, server.port)
    policy = DiscoveryPolicy(retries=retries)
    with Discovery(registry.url) as discovery:
        with DiscoveryChannel(discovery, "orders", idempotent=True, policy=policy) as channel:
            for _ in range(6):
                unary(channel)(b"warm", timeout=5)
            servers[0].kill()
            servers[1].kill()
            started = time.monotonic()
            answers = [unary(channel)(b"x", timeout=3, wait_for_ready=True) for _ in range(6)]
            took = time.monotonic() - started
        assert names(answers) == {"c": 6}
        assert took < 3.0, f"6 calls took {took:.2f}s: one waited out its deadline"

    async def main() -> tuple[Counter[str], float]:
        async with (
            AsyncDiscovery(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(
                discovery, "orders", idempotent=True, policy=policy
            ) as channel,
        ):
            started = time.monotonic()
            answers = [await unary(channel)(b"x", timeout=3, wait_for_ready=True) for _ in range(6)]
            return names(answers), time.monotonic() - started

    seen, took = asyncio.run(main())
    assert seen == {"c": 6}
    assert took < 3.0, f"6 aio calls took {took:.2f}s"


def test_wait_for_ready_still_waits_when_only_that_instance_is_left(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    only = servers[0]
    put(registry, only.port)
    with Discovery(registry.url) as discovery:
        with DiscoveryChannel(discovery, "orders", idempotent=True) as channel:
            unary(channel)(b"warm", timeout=5)
            only.kill()
            with pytest.raises(grpc.RpcError):
                unary(channel)(b"x", timeout=2)  # without wait_for_ready: fails fast
            timer = threading.Timer(1.0, restart, (only,))
            timer.start()
            try:
                answer = unary(channel)(b"x", timeout=20, wait_for_ready=True)
            finally:
                timer.join()
        assert answer == b"a:x"


def test_no_connectivity_thread_per_endpoint_until_subscribed(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
    with Discovery(registry.url) as discovery:
        plain = grpc.insecure_channel(servers[0].target)  # grpc's own threads, started
        unary(plain)(b"x", timeout=5)
        plain.close()
        discovery.choose("orders")  # the watch, started
        before = {t.name for t in threading.enumerate()}
        with DiscoveryChannel(discovery, "orders", idempotent=True) as channel:
            for _ in range(9):
                unary(channel)(b"x", timeout=5)
            assert len(channel.endpoints()) == 3
            # No polling thread per endpoint (grpc names none; count what is new).
            assert len({t.name for t in threading.enumerate()} - before) == 0
            assert channel.state() == grpc.ChannelConnectivity.READY  # asked, not watched
            seen: list[grpc.ChannelConnectivity] = []
            channel.subscribe(seen.append)
            assert seen == [grpc.ChannelConnectivity.READY]
            assert len(channel._core._watching) == 3
            channel.unsubscribe(seen.append)
            assert channel._core._watching == {}


def test_multicallables_made_per_call_do_not_pile_up(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    put(registry, servers[0].port)
    with Discovery(registry.url) as discovery, DiscoveryChannel(discovery, "orders") as channel:
        made: list[weakref.ref[Any]] = []
        for _ in range(200):
            callable_ = channel.unary_unary(GET, lambda b: b, lambda b: b)
            assert callable_(b"x", timeout=5) == b"a:x"
            made.append(weakref.ref(callable_._callable.__self__))  # its Callables
            del callable_
        gc.collect()
        assert sum(ref() is not None for ref in made) == 0
        stub_like = channel.unary_unary(GET, lambda b: b, lambda b: b)
        first = stub_like._callable(channel._core.pool.acquire(discovery.choose("orders")))
        again = stub_like._callable(channel._core.pool.acquire(discovery.choose("orders")))
        assert first is again  # reused per endpoint while the multicallable lives


def test_registry_error_details_and_bad_aio_use(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    for server in servers:
        put(registry, server.port)
    canary = DiscoveryPolicy(tags=("canary",))
    with (
        Discovery(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", policy=canary) as channel,
        pytest.raises(NoInstanceError) as caught,
    ):
        unary(channel)(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "matching tags canary" in caught.value.details()
    assert "3 healthy do not match" in caught.value.details()

    with pytest.raises(ConfigError, match="interceptors"):
        grpc_aio.DiscoveryChannel(AsyncDiscovery(registry.url), "orders", interceptors=[object()])

    class Counting(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        calls = 0

        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            Counting.calls += 1
            return await continuation(details, request)

    first_loop = asyncio.new_event_loop()
    second_loop = asyncio.new_event_loop()
    discovery_ = AsyncDiscovery(registry.url)
    channel_ = grpc_aio.DiscoveryChannel(discovery_, "orders", interceptors=[Counting()])

    async def call() -> bytes:
        answer: bytes = await unary(channel_)(b"x", timeout=5)
        return answer

    try:
        assert first_loop.run_until_complete(call()) == b"a:x"
        assert Counting.calls == 1
        with pytest.raises(RuntimeError, match="one DiscoveryChannel per event loop"):
            second_loop.run_until_complete(call())
    finally:
        first_loop.run_until_complete(channel_.close())
        first_loop.run_until_complete(discovery_.close())
        first_loop.close()
        second_loop.close()


def test_a_deadline_spent_by_an_attempt_ends_with_that_attempts_error(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    # A break-it run saw the sync channel choose again after the deadline had passed and
    # say it "waited for the registry's first answer" on a service synced long before.
    for server in servers:
        put(registry, server.port)
    timeouts = DiscoveryPolicy(retry_read_timeouts=True)

    def notes(error: BaseException) -> str:
        return " ".join(getattr(error, "__notes__", []))

    with (
        Discovery(registry.url) as discovery,
        DiscoveryChannel(discovery, "orders", idempotent=True, policy=timeouts) as channel,
    ):
        for _ in range(3):
            unary(channel)(b"warm", timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            unary(channel, SLOW)(b"0.6", timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "first answer" not in caught.value.details() + notes(caught.value)
        # A tiny timeout goes to grpc as is (which answers within it on loopback).
        outcome: Any
        try:
            outcome = unary(channel)(b"x", timeout=1e-6)
        except grpc.RpcError as error:
            outcome = error
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "first answer" not in outcome.details() + notes(outcome)
        else:
            assert outcome.endswith(b":x")

    async def main() -> BaseException:
        async with (
            AsyncDiscovery(registry.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, "orders", idempotent=True, policy=timeouts) as ch,
        ):
            for _ in range(3):
                await unary(ch)(b"warm", timeout=5)
            with pytest.raises(grpc.RpcError) as caught:
                await unary(ch, SLOW)(b"0.6", timeout=0.2)
            return caught.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert "first answer" not in error.details() + notes(error)  # type: ignore[attr-defined]


def test_a_call_in_flight_when_the_aio_channel_closes_ends_with_its_own_error(
    registry: MemoryRegistry, servers: list[GrpcServer]
) -> None:
    # A break-it run: close(grace=3) while a call ran, then its server died: the retry
    # met the closed pool and the call ended in "ValueError: the discovery channel is
    # closed", its own UNAVAILABLE lost.
    for server in servers:
        put(registry, server.port)

    async def main() -> BaseException:
        async with AsyncDiscovery(registry.url) as discovery:
            channel = grpc_aio.DiscoveryChannel(discovery, "orders", idempotent=True)
            await unary(channel)(b"warm", timeout=5)
            call = asyncio.ensure_future(unary(channel, SLOW)(b"2", timeout=8))
            await asyncio.sleep(0.3)
            closing = asyncio.ensure_future(channel.close(grace=3))
            await asyncio.sleep(0.3)
            for server in servers:
                server.kill()
            try:
                await asyncio.wait_for(call, 8)
            except Exception as exc:
                error: BaseException = exc
            else:
                raise AssertionError("the call answered after its server was killed")
            await closing
            return error

    error = asyncio.run(main())
    assert isinstance(error, grpc.aio.AioRpcError), repr(error)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "instances tried" not in " ".join(getattr(error, "__notes__", []))  # no retry
