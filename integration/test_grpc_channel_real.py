"""registry_agent.grpc on real Consul and etcd with real grpcio servers (integration/grpc_kit.py):
three instances registered by registrars with a TCP check, one SIGKILLed under load,
started again, ejected as an outlier and let back in, and TLS by service name."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from integration.certs import make_named_cert
from integration.grpc_channel_kit import restart, started_servers
from integration.grpc_kit import CREATE, GET, GrpcServer, unary
from registry_agent import (
    AsyncDiscovery,
    Discovery,
    DiscoveryPolicy,
    OutlierEjection,
    Registrar,
    ServiceInstance,
    TcpCheck,
)
from registry_agent.grpc import DiscoveryChannel
from registry_agent.grpc import aio as grpc_aio
from registry_agent.testing.servers import ServerProcess

Measure = Callable[[str, float, float], None]

CHECK_INTERVAL = 0.5
# A killed instance leaves the registry within about one check (fall=1) plus the
# registry's propagation; generous bounds for a loaded 2-core machine.
LEAVE_BOUND = 10 * CHECK_INTERVAL + 5.0
BACK_BOUND = 10 * CHECK_INTERVAL + 5.0
CALLS = 400  # per load loop, and at most LOOP_SECONDS
LOOP_SECONDS = 30.0


def register(stack: ExitStack, url: str, service: str, server: GrpcServer) -> Registrar:
    instance = ServiceInstance(
        service, address="127.0.0.1", port=server.port, id=f"{service}-{server.name}"
    )
    check = TcpCheck("127.0.0.1", server.port, interval=CHECK_INTERVAL, timeout=CHECK_INTERVAL)
    registrar = Registrar(url, instance, checks=[check], fall=1, rise=1, ttl=5)
    registrar.start(wait_registered=20)
    stack.callback(registrar.stop)
    return registrar


@pytest.fixture
def fleet(server: ServerProcess) -> Iterator[tuple[str, list[GrpcServer]]]:
    """Three grpc servers registered as one fresh service; (service, servers)."""
    service = f"orders-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        servers = stack.enter_context(started_servers("a", "b", "c"))
        for grpc_server in servers:
            register(stack, server.url, service, grpc_server)
        yield service, servers


def name_of(answer: bytes) -> str:
    return answer.split(b":")[0].decode()


def wait_for(condition: Callable[[], bool], bound: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < bound, f"{what}: not within {bound:.1f}s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_sync_kill_one_of_three_fails_no_call_and_it_is_used_again(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]], measured: Measure
) -> None:
    service, servers = fleet
    with (
        Discovery(server.url) as discovery,
        DiscoveryChannel(discovery, service, idempotent=True) as channel,
    ):
        get = unary(channel)
        wait_for(lambda: len(discovery.instances(service)) == 3, 10, "three instances seen")
        seen: Counter[str] = Counter()
        failures: list[grpc.RpcError] = []
        started = time.monotonic()
        killed_at = left_at = 0.0
        for i in range(CALLS):
            if time.monotonic() - started > LOOP_SECONDS:
                break
            if i == 60:
                servers[1].kill()
                killed_at = time.monotonic()
            try:
                seen[name_of(get(f"{i}".encode(), timeout=5))] += 1
            except grpc.RpcError as error:
                failures.append(error)
            if killed_at and not left_at and len(discovery.instances(service)) == 2:
                left_at = time.monotonic()
            time.sleep(0.01)
        assert killed_at, "the loop ended before the kill"
        assert failures == []
        assert seen["a"] > 40
        assert seen["c"] > 40
        assert 10 <= seen["b"] <= 40
        assert left_at, "the killed instance stayed listed through the loop"
        measured("killed instance left", left_at - killed_at, LEAVE_BOUND)
        # Its channel is closed once it has left (checked on calls, at most every 0.5 s).
        gone = ("127.0.0.1", servers[1].port)
        wait_for(
            lambda: bool(get(b"x", timeout=5)) and gone not in channel.endpoints(), 5, "closed"
        )

        restart(servers[1])  # the same port again
        restarted = time.monotonic()
        back = wait_for(
            lambda: name_of(get(b"again", timeout=5)) == "b", BACK_BOUND, "restarted used again"
        )
        measured("restarted instance used", back, BACK_BOUND)
        assert time.monotonic() - restarted < BACK_BOUND
        spread = Counter(name_of(get(b"x", timeout=5)) for _ in range(60))
        assert all(spread[n] >= 12 for n in "abc"), spread  # balanced again

        # A new instance: used within a bound of its start.
        with ExitStack() as stack:
            (fourth,) = stack.enter_context(started_servers("d"))
            added = time.monotonic()
            register(stack, server.url, service, fourth)
            wait_for(lambda: name_of(get(b"new", timeout=5)) == "d", BACK_BOUND, "new instance")
            measured("new instance used", time.monotonic() - added, BACK_BOUND)
            spread = Counter(name_of(get(b"x", timeout=5)) for _ in range(80))
            assert all(spread[n] >= 12 for n in "abcd"), spread


def test_aio_kill_one_of_three_fails_no_call(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]], measured: Measure
) -> None:
    service, servers = fleet

    async def main() -> tuple[Counter[str], list[BaseException], float]:
        async with (
            AsyncDiscovery(server.url) as discovery,
            grpc_aio.DiscoveryChannel(discovery, service, idempotent={GET}) as channel,
        ):
            get = unary(channel)
            deadline = time.monotonic() + 10
            while len(await discovery.instances(service)) != 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            seen: Counter[str] = Counter()
            failures: list[BaseException] = []
            started = time.monotonic()
            killed_at = left_at = 0.0
            for i in range(CALLS):
                if time.monotonic() - started > LOOP_SECONDS:
                    break
                if i == 60:
                    servers[0].kill()
                    killed_at = time.monotonic()
                try:
                    seen[name_of(await get(f"{i}".encode(), timeout=5))] += 1
                except grpc.RpcError as error:
                    failures.append(error)
                if killed_at and not left_at and len(await discovery.instances(service)) == 2:
                    left_at = time.monotonic()
                await asyncio.sleep(0.01)
            assert killed_at, "the loop ended before the kill"
            assert left_at, "the killed instance stayed listed through the loop"
            return seen, failures, left_at - killed_at

    seen, failures, left = asyncio.run(main())
    assert failures == []
    assert seen["b"] > 40
    assert seen["c"] > 40
    assert 10 <= seen["a"] <= 40
    measured("killed instance left (aio)", left, LEAVE_BOUND)


def test_outlier_ejected_then_let_back_in(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]], measured: Measure
) -> None:
    service, servers = fleet
    base_time = 1.0
    policy = DiscoveryPolicy(
        outliers=OutlierEjection(consecutive_failures=3, base_time=base_time), retries=2
    )
    with (
        Discovery(server.url, policy=policy) as discovery,
        DiscoveryChannel(discovery, service, idempotent=True) as channel,
    ):
        get = unary(channel)
        wait_for(lambda: len(discovery.instances(service)) == 3, 10, "three instances seen")
        servers[0].fail_next("UNAVAILABLE", 3)
        for i in range(30):  # a fails 3 times in a row (each retried elsewhere): ejected
            assert name_of(get(f"{i}".encode(), timeout=5)) in "bc"
            if discovery.ejected(service):
                break
        ejected_at = time.monotonic()
        assert [i.port for i in discovery.ejected(service)] == [servers[0].port]
        during: Counter[str] = Counter()
        while time.monotonic() - ejected_at < base_time * 0.8:
            during[name_of(get(b"x", timeout=5))] += 1
            time.sleep(0.01)
        assert during["a"] == 0
        assert during["b"] > 0
        assert during["c"] > 0
        bound = base_time + 3.0
        back = wait_for(lambda: name_of(get(b"y", timeout=5)) == "a", bound, "a let back in")
        measured("ejected instance back", time.monotonic() - ejected_at, bound)
        assert back >= 0
        assert time.monotonic() - ejected_at >= base_time * 0.8
        assert discovery.ejected(service) == []


def test_non_idempotent_call_is_not_retried(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]]
) -> None:
    service, servers = fleet
    with (
        Discovery(server.url) as discovery,
        DiscoveryChannel(discovery, service, idempotent={GET}) as channel,
    ):
        wait_for(lambda: len(discovery.instances(service)) == 3, 10, "three instances seen")
        servers[2].fail_next("UNAVAILABLE", 1)
        failures: list[grpc.RpcError] = []
        answers: Counter[str] = Counter()
        for _ in range(6):
            try:
                answers[name_of(unary(channel, CREATE)(b"x", timeout=5))] += 1
            except grpc.RpcError as error:
                failures.append(error)
        assert len(failures) == 1
        assert failures[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "c: failing on purpose" in failures[0].details()
        assert answers == {"a": 2, "b": 2, "c": 1}


def test_tls_by_service_name(server: ServerProcess, tmp_path: Path) -> None:
    service = f"orders-{uuid.uuid4().hex[:8]}"
    cert = make_named_cert(tmp_path, service)  # DNS name only: no IP address in it
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.ca_bytes())
    with ExitStack() as stack:
        servers = stack.enter_context(started_servers("a", "b", "c", tls=cert.pair))
        for grpc_server in servers:
            register(stack, server.url, service, grpc_server)
        with (
            Discovery(server.url) as discovery,
            DiscoveryChannel(discovery, service, credentials=credentials) as channel,
        ):
            wait_for(lambda: len(discovery.instances(service)) == 3, 10, "three instances seen")
            spread = Counter(name_of(unary(channel)(b"x", timeout=5)) for _ in range(30))
            assert spread == {"a": 10, "b": 10, "c": 10}
        # The same certificate checked against the address (a static target) fails.
        with (
            grpc.secure_channel(servers[0].target, credentials) as plain,
            pytest.raises(grpc.RpcError) as info,
        ):
            unary(plain)(b"x", timeout=5)
        assert "Hostname Verification" in info.value.details()


def test_a_hung_instance_is_ejected_and_calls_succeed(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]]
) -> None:
    # SIGSTOP: the process keeps its listening socket (the registry's TCP check still
    # passes: it stays listed) but answers nothing. DEADLINE_EXCEEDED counts as a
    # failure, so the outlier rule ejects it after two and the calls succeed again.
    service, servers = fleet
    hung = servers[0]
    assert hung.process is not None
    policy = DiscoveryPolicy(outliers=OutlierEjection(consecutive_failures=2, base_time=60))
    with (
        Discovery(server.url) as discovery,
        DiscoveryChannel(discovery, service, idempotent=True, policy=policy) as channel,
    ):
        wait_for(lambda: len(discovery.instances(service)) == 3, 10, "three instances seen")
        for _ in range(3):
            unary(channel)(b"warm", timeout=5)
        hung.pause()
        try:
            seen: Counter[str] = Counter()
            for _ in range(15):
                try:
                    seen[name_of(unary(channel)(b"x", timeout=0.5))] += 1
                except grpc.RpcError as error:
                    seen[error.code().name] += 1
            still_listed = len(discovery.instances(service))
            ejected = [i.port for i in discovery.ejected(service, policy=policy)]
        finally:
            hung.resume()
    assert still_listed == 3, "the hung instance left the registry: not the case under test"
    assert seen["DEADLINE_EXCEEDED"] == 2, seen
    assert seen["b"] + seen["c"] == 13
    assert ejected == [hung.port]


def test_a_calls_deadline_bounds_the_wait_for_the_registry(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]]
) -> None:
    service, _ = fleet
    server.pause()  # before the first read of the service: the registry stays silent
    try:
        with (
            Discovery(server.url, sync_timeout=5) as discovery,
            DiscoveryChannel(discovery, service, idempotent=True) as channel,
        ):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                unary(channel)(b"x", timeout=1)
            took = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "registry's first answer" in caught.value.details()
        assert took < 2.0, f"timeout=1 took {took:.2f}s"

        async def main() -> tuple[grpc.StatusCode, float]:
            async with (
                AsyncDiscovery(server.url, sync_timeout=5) as discovery,
                grpc_aio.DiscoveryChannel(discovery, service, idempotent=True) as channel,
            ):
                started = time.monotonic()
                try:
                    await unary(channel)(b"x", timeout=1)
                except grpc.RpcError as error:
                    return error.code(), time.monotonic() - started
                raise AssertionError("a call answered while the registry was paused")

        code, took = asyncio.run(main())
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < 2.0, f"aio timeout=1 took {took:.2f}s"
    finally:
        server.resume()


def test_a_registry_error_is_an_unavailable_rpc_error(
    server: ServerProcess, fleet: tuple[str, list[GrpcServer]]
) -> None:
    service, _ = fleet
    url = server.url
    server.stop()  # refused: every read of the service fails
    with (
        Discovery(url, sync_timeout=2) as discovery,
        DiscoveryChannel(discovery, service, idempotent=True) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        unary(channel)(b"x", timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith(f"{service}: ")
    assert "no answer from the registry" in caught.value.details()

    async def main() -> grpc.RpcError:
        async with (
            AsyncDiscovery(url, sync_timeout=2) as discovery,
            grpc_aio.DiscoveryChannel(discovery, service, idempotent=True) as channel,
        ):
            try:
                await unary(channel)(b"x", timeout=20)
            except grpc.RpcError as error:
                return error
            raise AssertionError("a call answered with the registry stopped")

    error = asyncio.run(main())
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no answer from the registry" in str(error.details())
