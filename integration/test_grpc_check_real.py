"""Issue 16 item 1: GrpcCheck against real grpcio servers, gating real registrations.

One grpcio server process (integration/grpc_kit.py) whose standard health servicer
is turned SERVING / NOT_SERVING / UNKNOWN / forgotten, killed and started again;
registrations on real Consul and etcd through AsyncRegistrar, the blocking
Registrar (its loop on a thread of its own) and the agent process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from integration.agent_process import Agent, listed
from integration.certs import CertFiles, make_certs
from integration.grpc_kit import GrpcServer
from registry_agent import (
    AsyncRegistrar,
    Backend,
    GrpcCheck,
    HealthStatus,
    Registrar,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ServerProcess, freeze_process

Measured = Callable[[str, float, float], None]
RETRY = RetryPolicy(initial=0.1, cap=1.0)
INTERVAL = 0.2
FALL = 2
RISE = 1
TTL = 3.0
MARGIN = 3.0  # scheduling slack on a busy 2-core machine, plus a registry round trip
WITHDRAW_BOUND = INTERVAL * FALL + MARGIN
RETURN_BOUND = INTERVAL * RISE + MARGIN


def _kill(server: GrpcServer) -> None:
    """Kill the server and close its stdout pipe (the kit's kill leaves it to the collector,
    and a second start() on the same object would drop it unclosed: a ResourceWarning)."""
    server.kill()
    if server.process is not None and server.process.stdout is not None:
        server.process.stdout.close()


@pytest.fixture
def grpc_server() -> Iterator[GrpcServer]:
    server = GrpcServer("orders").start()
    try:
        yield server
    finally:
        _kill(server)


async def _until(what: str, condition: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``condition()`` holds, polled every 50 ms; fails after ``within``."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:.1f}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _until_sync(what: str, condition: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:.1f}s")
        time.sleep(0.05)
    return time.monotonic() - started


async def test_each_health_status_and_failure_is_a_result_in_grpcs_words(
    grpc_server: GrpcServer, measured: Measured
) -> None:
    overall = GrpcCheck(grpc_server.target, timeout=2.0)
    named = GrpcCheck(grpc_server.target, service="orders", timeout=2.0)
    unknown = GrpcCheck(grpc_server.target, service="billing", timeout=2.0)
    try:
        for check in (overall, named):
            result = await check.run()
            assert (result.ok, result.detail) == (True, "status SERVING")
        channel = overall._channel
        threads = threading.active_count()
        for _ in range(5):
            assert (await overall.run()).ok
        assert overall._channel is channel, "one channel serves every run"
        assert threading.active_count() <= threads, "no thread per run"

        result = await unknown.run()
        assert (result.ok, result.detail) == (
            False,
            "service 'billing' unknown to the server (NOT_FOUND)",
        )
        for status in ("NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"):
            grpc_server.set_health(status)
            result = await overall.run()
            assert (result.ok, result.detail) == (False, f"status {status}")
            assert (await named.run()).ok, "only the overall health changed"
        grpc_server.set_health("SERVING")
        assert (await overall.run()).ok
        grpc_server.set_health("FORGET", service="orders")
        result = await named.run()
        assert (result.ok, result.detail) == (
            False,
            "service 'orders' unknown to the server (NOT_FOUND)",
        )

        _kill(grpc_server)
        result = await overall.run()
        assert not result.ok
        if "Stream removed (Socket closed)" in result.detail:
            # The run met the killed server's connection closing: the next one dials.
            result = await overall.run()
            assert not result.ok
        assert result.detail.startswith("UNAVAILABLE: "), result.detail
        assert "Connection refused" in result.detail, result.detail
        assert result.latency < overall.timeout
        grpc_server.start()  # same port
        started = time.monotonic()
        result = await overall.run()
        # The failed channel is replaced: no reconnect backoff between the restart and a pass.
        assert (result.ok, result.detail) == (True, "status SERVING")
        measured("first run after restart", time.monotonic() - started, 1.0)
        assert overall._channel is not channel
    finally:
        for check in (overall, named, unknown):
            await check.aclose()
    assert overall._channel is None


def test_one_check_run_from_two_event_loops_in_turn(grpc_server: GrpcServer) -> None:
    # A channel belongs to the loop that made it: a run on another loop makes its own.
    check = GrpcCheck(grpc_server.target, timeout=2.0)
    first = asyncio.run(check.run())
    channel = check._channel

    async def second_loop() -> tuple[bool, str, bool]:
        try:
            result = await check.run()
            return result.ok, result.detail, check._channel is not channel
        finally:
            await check.aclose()

    assert (first.ok, first.detail) == (True, "status SERVING")
    assert asyncio.run(second_loop()) == (True, "status SERVING", True)


async def test_tls_ca_client_certificate_and_server_name(certs: CertFiles, tmp_path: Path) -> None:
    server = GrpcServer("secure", tls=(certs.server_cert, certs.server_key)).start()
    other_ca = make_certs(tmp_path / "other", "other").ca
    checks = {
        "ca": GrpcCheck(server.target, tls=True, ca_file=certs.ca),
        # The kit's server does not ask for a client certificate: this shows one is
        # loaded and presented without harm, not that a server verifying clients accepts it.
        "client cert": GrpcCheck(
            server.target,
            tls=True,
            ca_file=certs.ca,
            cert_file=certs.client_cert,
            key_file=certs.client_key,
        ),
        "localhost": GrpcCheck(server.target, tls=True, ca_file=certs.ca, server_name="localhost"),
        "wrong name": GrpcCheck(server.target, tls=True, ca_file=certs.ca, server_name="orders"),
        "wrong ca": GrpcCheck(server.target, tls=True, ca_file=other_ca),
        "plain text": GrpcCheck(server.target),
    }
    try:
        results = {name: await check.run() for name, check in checks.items()}
    finally:
        _kill(server)
        for check in checks.values():
            await check.aclose()
    for name in ("ca", "client cert", "localhost"):
        assert (results[name].ok, results[name].detail) == (True, "status SERVING"), name
    for name in ("wrong name", "wrong ca", "plain text"):
        assert not results[name].ok, name
        assert results[name].detail.startswith("UNAVAILABLE: "), results[name].detail
    assert "handshake" in results["wrong ca"].detail.lower(), results["wrong ca"].detail
    assert "Hostname Verification Check failed" in results["wrong name"].detail
    assert results["wrong name"].detail.endswith("(TLS server name 'orders')")
    assert results["wrong ca"].detail.endswith("(TLS server name '127.0.0.1')")


async def _status(observer: Backend, instance: ServiceInstance) -> HealthStatus | None:
    health = (await observer.list(instance.service)).instances.get(instance.id)
    return None if health is None else health.status


async def test_async_registrar_gated_by_grpc_health(
    server: ServerProcess, grpc_server: GrpcServer, measured: Measured
) -> None:
    instance = ServiceInstance("orders", address="127.0.0.1", port=grpc_server.port)
    registrar = AsyncRegistrar(
        open_backend(server.url, timeout=1),
        instance,
        checks=[GrpcCheck(grpc_server.target, interval=INTERVAL, timeout=1.0)],
        ttl=TTL,
        retry=RETRY,
        rise=RISE,
        fall=FALL,
    )
    observer = open_backend(server.url, timeout=1)

    async def status_is(expected: HealthStatus | None) -> bool:
        return await _status(observer, instance) is expected

    try:
        await registrar.start(wait_registered=10)
        assert await _status(observer, instance) is HealthStatus.PASSING
        grpc_server.set_health("NOT_SERVING")
        took = await _until("withdrawn", lambda: status_is(None), WITHDRAW_BOUND)
        measured("NOT_SERVING -> withdrawn", took, WITHDRAW_BOUND)
        (result,) = registrar.status()["checks"].values()
        assert result["detail"] == "status NOT_SERVING"
        grpc_server.set_health("SERVING")
        took = await _until("back", lambda: status_is(HealthStatus.PASSING), RETURN_BOUND)
        measured("SERVING -> registered", took, RETURN_BOUND)
        _kill(grpc_server)
        took = await _until("withdrawn", lambda: status_is(None), WITHDRAW_BOUND)
        measured("server killed -> withdrawn", took, WITHDRAW_BOUND)
        (result,) = registrar.status()["checks"].values()
        assert "Connection refused" in result["detail"], result
        grpc_server.start()
        took = await _until("back", lambda: status_is(HealthStatus.PASSING), RETURN_BOUND)
        measured("restarted -> registered", took, RETURN_BOUND)
    finally:
        await registrar.stop(timeout=5)
        await registrar.backend.close()
    assert await _status(observer, instance) is None
    await observer.close()


def test_blocking_registrar_gated_by_grpc_health_goes_critical(
    server: ServerProcess, grpc_server: GrpcServer, measured: Measured
) -> None:
    # The blocking Registrar runs its loop on a thread of its own: the check's channel
    # is made and used there.
    instance = ServiceInstance("orders", address="127.0.0.1", port=grpc_server.port)
    registrar = Registrar(
        server.url,
        instance,
        checks=[GrpcCheck(grpc_server.target, interval=INTERVAL, timeout=1.0)],
        ttl=TTL,
        retry=RETRY,
        rise=RISE,
        fall=FALL,
        on_unhealthy="critical",
    )

    def status() -> HealthStatus | None:
        return listed(server.url, "orders").get(instance.id)

    try:
        registrar.start(wait_registered=10)
        assert status() is HealthStatus.PASSING
        grpc_server.set_health("NOT_SERVING")
        took = _until_sync("critical", lambda: status() is HealthStatus.CRITICAL, WITHDRAW_BOUND)
        measured("NOT_SERVING -> critical", took, WITHDRAW_BOUND)
        grpc_server.set_health("SERVING")
        took = _until_sync("passing", lambda: status() is HealthStatus.PASSING, RETURN_BOUND)
        measured("SERVING -> passing", took, RETURN_BOUND)
    finally:
        registrar.stop(timeout=5)
    assert status() is None


AGENT_SERVICE = """
[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = {port}
ttl = "3s"
gate = {{ fall = {fall}, rise = {rise} }}

[[service.check]]
grpc = "{target}"
grpc_service = "orders"
interval = "{interval}s"
timeout = "1s"
"""


def test_agent_process_with_a_grpc_check(
    server: ServerProcess,
    grpc_server: GrpcServer,
    tmp_path: Path,
    agents: list[Agent],
    measured: Measured,
) -> None:
    services = AGENT_SERVICE.format(
        port=grpc_server.port, target=grpc_server.target, fall=FALL, rise=RISE, interval=INTERVAL
    )
    agent = Agent(tmp_path, server.url, services)
    agents.append(agent.start())
    agent.until("/readyz", 200)
    assert listed(server.url, "orders") == {"orders-1": HealthStatus.PASSING}
    (svc,) = agent.until("/status", 200)["services"]
    assert svc["checks"][f"grpc {grpc_server.target}/orders"]["detail"] == "status SERVING"
    grpc_server.set_health("NOT_SERVING", service="orders")
    took = _until_sync("withdrawn", lambda: listed(server.url, "orders") == {}, WITHDRAW_BOUND)
    measured("agent: NOT_SERVING -> withdrawn", took, WITHDRAW_BOUND)
    body = agent.until("/readyz", 503)
    check = body["not_ready"]["orders/orders-1"]
    assert "status NOT_SERVING" in str(check), check
    grpc_server.set_health("SERVING", service="orders")
    took = _until_sync(
        "back", lambda: listed(server.url, "orders") == {"orders-1": HealthStatus.PASSING}, 10
    )
    measured("agent: SERVING -> registered", took, RETURN_BOUND)
    assert agent.stop() == 0
    assert listed(server.url, "orders") == {}


async def test_concurrent_runs_of_one_check_all_pass(grpc_server: GrpcServer) -> None:
    # One check shared by two registrars runs twice at once: neither run may close the
    # channel the other is using (that cancelled it and withdrew a healthy instance).
    check = GrpcCheck(grpc_server.target, timeout=2.0)
    try:
        for _ in range(20):
            results = await asyncio.gather(*(check.run() for _ in range(3)))
            assert [(r.ok, r.detail) for r in results] == [(True, "status SERVING")] * 3
        # A run cut short by its caller (unanswered) does not disturb one in flight.
        slow = asyncio.ensure_future(check.run())
        cut = asyncio.ensure_future(check.run())
        await asyncio.sleep(0)
        cut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cut
        assert (await slow).ok
        assert (await check.run()).ok
    finally:
        await check.aclose()


def _client_sockets_to(port: int) -> int:
    """Sockets on this machine whose remote end is 127.0.0.1:port (all states)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote = line.split()[2]  # hex address:port
        if int(remote.rpartition(":")[2], 16) == port:
            count += 1
    return count


async def test_a_stalled_server_costs_one_socket_per_check() -> None:
    # A server that accepts but never answers (SIGSTOPped): every run times out, yet the
    # check keeps using the connection it has instead of dialling anew (each new dial
    # left a connecting socket behind for ~20 s: hundreds of fds for an agent).
    server = GrpcServer("stalled").start()
    assert server.process is not None
    pid = server.process.pid
    check = GrpcCheck(server.target, timeout=0.2)
    try:
        assert (await check.run()).ok
        freeze_process(pid)
        peak = 0
        for _ in range(30):
            result = await check.run()
            assert not result.ok
            peak = max(peak, _client_sockets_to(server.port))
        assert peak <= 2, f"{peak} sockets to the stalled server after 30 runs"
        os.kill(pid, signal.SIGCONT)
        recovered = False
        for _ in range(20):  # the held connection answers once the server runs again
            if (await check.run()).ok:
                recovered = True
                break
            await asyncio.sleep(0.1)
        assert recovered, "the check passes again once the server is resumed"
    finally:
        os.kill(pid, signal.SIGCONT)
        await check.aclose()
        _kill(server)


async def test_ambiguous_connection_failures_and_garbage_answers_say_what_to_check(
    certs: CertFiles, tmp_path: Path
) -> None:
    other = make_certs(tmp_path / "other", "other")
    server = GrpcServer("mtls", tls=(certs.server_cert, certs.server_key), client_ca=certs.ca)
    server.start()
    checks = {
        "plain": GrpcCheck(server.target),
        "no cert": GrpcCheck(server.target, ca_file=certs.ca),
        "foreign cert": GrpcCheck(
            server.target, ca_file=certs.ca, cert_file=other.client_cert, key_file=other.client_key
        ),
        "good": GrpcCheck(
            server.target, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
        ),
    }
    try:
        results = {name: await check.run() for name, check in checks.items()}
    finally:
        _kill(server)
        for check in checks.values():
            await check.aclose()
    assert (results["good"].ok, results["good"].detail) == (True, "status SERVING")
    assert results["plain"].detail.endswith("(is the server TLS? then set tls = true)")
    for name in ("no cert", "foreign cert"):
        assert results[name].detail.startswith("UNAVAILABLE: "), results[name].detail
        assert results[name].detail.endswith(
            "(does the server require a client certificate signed by a CA it trusts?)"
        ), results[name].detail

    import grpc

    def garbage(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"\xff\xff\xff\xff"  # not a HealthCheckResponse

    odd = grpc.aio.server()
    odd.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(garbage)}
            ),
        )
    )
    port = odd.add_insecure_port("127.0.0.1:0")
    await odd.start()
    check = GrpcCheck(f"127.0.0.1:{port}", timeout=2.0)
    try:
        result = await check.run()
    finally:
        await check.aclose()
        await odd.stop(None)
    assert (result.ok, result.detail) == (
        False,
        "the server's answer is not a grpc.health.v1.HealthCheckResponse "
        "(does it serve the standard health protocol?)",
    )
