"""Issue 12, registrar side, on real Consul and etcd: truthful state, throttles, rejections.

- an outage longer than the TTL: ``registered``/``ready`` turn False within
  TTL + heartbeat, and True again once the registry is back;
- Consul maintenance mode: the registry-side health of our entry is read back
  and reported (critical, not ready, with the reason);
- 429 with ``Retry-After``, 503 and 500 through the fault proxy: back ≤ 2 s
  after they end;
- ``stop()`` through a proxy answering 500, garbage or nothing never raises and
  returns within its timeout;
- a registration the registry refuses fails ``start(wait_registered=…)`` at once;
- repairing a deleted etcd key revokes the lease it replaces (no orphan).

Bounds derive from the configuration plus a margin for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator

import aetcd
import httpx
import pytest

from integration.acl import AclConsul
from registry_agent import (
    AsyncRegistrar,
    Backend,
    BackendUnavailable,
    HealthStatus,
    RegistrarEvent,
    RegistrarEventKind,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

TTL = 2.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
TIMEOUT = 1.0  # each backend call
MARGIN = 2.0  # scheduling slack on a busy 2-core machine
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
Measured = Callable[[str, float, float], None]


@pytest.fixture
async def observer(server: ServerProcess) -> AsyncIterator[Backend]:
    """A second client, straight to the server: what discovery sees."""
    backend = open_backend(server.url, timeout=TIMEOUT)
    yield backend
    await backend.close()


async def status_in(observer: Backend) -> HealthStatus | None:
    try:
        health = (await observer.list(INSTANCE.service)).instances.get(INSTANCE.id)
    except BackendUnavailable:
        return None
    return None if health is None else health.status


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``condition()`` holds, polled every 20 ms; fails after ``within``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:.1f}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def registrar(url: str, events: list[RegistrarEvent] | None = None) -> AsyncRegistrar:
    return AsyncRegistrar(
        open_backend(url, timeout=TIMEOUT),
        INSTANCE,
        ttl=TTL,
        retry=RETRY,
        on_event=None if events is None else events.append,
    )


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[FaultProxy]:
    port = server.http_port if isinstance(server, ConsulServer) else server.client_port
    with FaultProxy("127.0.0.1", port) as proxy:
        yield proxy


def through(server: ServerProcess, proxy: FaultProxy) -> str:
    scheme = "consul" if isinstance(server, ConsulServer) else "etcd"
    return f"{scheme}://{proxy.host}:{proxy.port}"


async def test_outage_longer_than_the_ttl_is_reported_truthfully(
    server: ServerProcess, observer: Backend, measured: Measured
) -> None:
    events: list[RegistrarEvent] = []
    reg = registrar(server.url, events)
    await reg.start(wait_registered=10)
    try:
        assert reg.status()["ready"] is True
        server.stop()
        took = await until(lambda: not reg.registered, TTL + MARGIN + 5, "registered turned False")
        measured("registered False in outage", took, TTL + reg.heartbeat_interval + MARGIN)
        # The last renewal came at most one heartbeat before the outage.
        assert took >= TTL - reg.heartbeat_interval - 0.1
        status = reg.status()
        assert status["registered"] is False
        assert status["registry_status"] is None
        assert status["ready"] is False
        # Any of these is the truth: renewals failed for a TTL, the registry is unreachable,
        # or (when a verify ran first) its refused connection in the client's own words.
        reason = status["not_ready_reason"]
        truths = ("no heartbeat succeeded", "unreachable", "Connection refused")
        assert any(truth in reason for truth in truths), reason
        assert RegistrarEventKind.LEASE_LOST in [e.kind for e in events]
        server.start()
        took = await until(lambda: reg.ready, 10 + MARGIN, "ready again")
        measured("ready again once back", took, RETRY.cap + reg.heartbeat_interval + MARGIN)
        assert await status_in(observer) is HealthStatus.PASSING
        assert reg.status()["registry_status"] == "passing"
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


@pytest.mark.parametrize("fault", ["blackhole", "stall"])
async def test_shared_liveness_cut_off_is_not_ready_within_the_ttl(
    server: ServerProcess, proxy: FaultProxy, measured: Measured, fault: str
) -> None:
    # A break-it run (the agent's default, shared liveness, ttl 3 s): behind a
    # blackhole, registered and /readyz stayed True 3-5 s past the TTL, while the
    # shared renewal or the new lease's grant waited out a 5 s call timeout (etcd had
    # dropped the key 4.8 s before /readyz said so).
    timeout = 5.0  # a call timeout longer than the TTL, as the backends' default
    backend = open_backend(through(server, proxy), timeout=timeout)
    reg = AsyncRegistrar(backend, INSTANCE, ttl=TTL, retry=RETRY, shared_liveness=True)
    await reg.start(wait_registered=10)
    try:
        await until(lambda: reg.status()["last_heartbeat"] is not None, 5, "a renewal")
        await asyncio.sleep(TTL / 2)
        getattr(proxy, fault)()
        cut = time.time()
        renewed = reg.status()["last_heartbeat"]  # the last renewal: none answers after the cut
        await until(lambda: not reg.registered, TTL + timeout + MARGIN, "registered False")
        took = time.time() - renewed
        measured("shared: not registered after last renewal", took, TTL + MARGIN)
        assert took >= TTL - 0.1, took  # and not before the TTL ran out
        status = reg.status()
        assert status["ready"] is False
        assert status["not_ready_reason"].startswith("entry lost ("), status
        assert time.time() - cut < TTL + MARGIN
        proxy.heal()
        await until(lambda: reg.ready, 10 + timeout + MARGIN, "ready again")
    finally:
        proxy.heal()
        await reg.stop(timeout=5)
        await backend.close()


async def test_consul_maintenance_mode_is_read_back(
    consul_server: ConsulServer, measured: Measured, caplog: pytest.LogCaptureFixture
) -> None:
    reg = registrar(consul_server.url)
    await reg.start(wait_registered=10)
    path = f"/v1/agent/service/maintenance/{urllib.parse.quote(INSTANCE.id, safe='')}"
    try:
        async with httpx.AsyncClient(base_url=consul_server.http) as http:
            with caplog.at_level(logging.INFO, logger="registry_agent.registrar"):
                answer = await http.put(path, params={"enable": "true", "reason": "disk swap"})
                assert answer.status_code == 200
                took = await until(lambda: not reg.ready, reg.verify_interval + MARGIN, "not ready")
                measured("maintenance seen", took, reg.verify_interval + MARGIN)
                status = reg.status()
                assert status["registered"] is True  # still there: not "lost"
                assert status["registry_status"] == "critical"
                reason = status["not_ready_reason"]
                assert reason.startswith("the registry holds our entry as critical")
                writes = reg.counters.heartbeats_ok
                await asyncio.sleep(reg.verify_interval * 2)
                assert reg.ready is False  # no rewrite loop hides it
                assert reg.counters.heartbeats_ok > writes  # liveness goes on meanwhile
                answer = await http.put(path, params={"enable": "false"})
                assert answer.status_code == 200
                took = await until(lambda: reg.ready, reg.verify_interval + MARGIN, "ready")
                measured("maintenance end seen", took, reg.verify_interval + MARGIN)
        warned = [r for r in caplog.records if "although we set it passing" in r.getMessage()]
        assert len(warned) == 1
        # The operator's reason is reported (Consul puts it in the check's Notes).
        assert "disk swap" in reason
        assert "disk swap" in status["registry_note"]
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


@pytest.mark.parametrize(
    ("status", "body", "retry_after"),
    [(429, "slow down", 1.0), (503, "overloaded", None), (500, "No cluster leader", None)],
)
async def test_answering_registry_is_back_within_2s_of_the_end(
    consul_server: ConsulServer,
    measured: Measured,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: str,
    retry_after: float | None,
) -> None:
    """A registry that answers (429, 5xx) is up: no growing backoff while it does."""
    retry = RetryPolicy(initial=0.2, cap=10.0)  # the default cap: answers must not reach it
    with FaultProxy("127.0.0.1", consul_server.http_port) as proxy:
        reg = AsyncRegistrar(
            open_backend(f"consul://{proxy.host}:{proxy.port}", timeout=TIMEOUT),
            INSTANCE,
            ttl=TTL,
            retry=retry,
        )
        await reg.start(wait_registered=10)
        try:
            with caplog.at_level(logging.WARNING, logger="registry_agent.registrar"):
                headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                proxy.http(status, body, headers)
                answered = time.monotonic()
                took = await until(lambda: not reg.registered, TTL + MARGIN + 5, "lost")
                bound = TTL + reg.heartbeat_interval + MARGIN
                measured(f"{status}: entry counted lost", took, bound)
                await asyncio.sleep(3 * TTL)  # long enough for a growing backoff to reach 3.2 s
                errors = reg.counters.errors
                lasted = time.monotonic() - answered
                # At least one try per Retry-After (or 1 s cap), and no spin.
                every = retry_after or retry.answered_cap
                assert errors <= lasted / (every * (1 - retry.jitter)) + 4
                proxy.heal()
                took = await until(lambda: reg.registered, 10 + MARGIN, "registered again")
            measured(f"back after {status} ends", took, 2.0)
            ours = [
                r.getMessage()
                for r in caplog.records
                if r.name == "registry_agent.registrar" and r.levelno == logging.WARNING
            ]
            failed = [line for line in ours if " failed: " in line]
            assert len(failed) == 1  # once per episode, not once per try
            assert body in failed[0]  # the server's words
        finally:
            await reg.stop(timeout=5)
            await reg.backend.close()


@pytest.mark.parametrize("fault", ["http 500", "garbage", "blackhole", "refuse"])
async def test_stop_never_raises_through_a_misbehaving_network(
    server: ServerProcess, proxy: FaultProxy, measured: Measured, fault: str
) -> None:
    reg = registrar(through(server, proxy))
    await reg.start(wait_registered=10)
    if fault == "http 500":
        proxy.http(500, "No cluster leader")
    elif fault == "garbage":
        proxy.garbage(1024)
    elif fault == "blackhole":
        proxy.blackhole()
    else:
        proxy.refuse()
    await asyncio.sleep(0.5)  # let a heartbeat meet it
    timeout = 3.0
    started = time.monotonic()
    try:
        await reg.stop(timeout=timeout)  # must not raise
        measured(f"stop() through {fault}", time.monotonic() - started, timeout + 0.5)
        assert reg.status()["ready"] is False
        last_error = reg.status()["last_error"]
        assert last_error is not None  # the deregistration cannot have gone through
        assert "unexpected" not in last_error  # mapped by the backend, not wrapped by us
    finally:
        proxy.heal()
        await reg.backend.close()


async def test_a_refused_registration_fails_start_at_once(
    acl: AclConsul, measured: Measured, caplog: pytest.LogCaptureFixture
) -> None:
    billing = ServiceInstance("billing", address="127.0.0.1", port=8081)  # not in the token
    reg = AsyncRegistrar(
        open_backend(acl.server.url, token=acl.token, timeout=TIMEOUT), billing, ttl=TTL
    )
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="registry_agent.registrar"),
        pytest.raises(Rejected) as info,
    ):
        await reg.start(wait_registered=30)
    measured("Rejected raised by start()", time.monotonic() - started, TIMEOUT + MARGIN)
    assert "ermission denied" in str(info.value)  # the server's words
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "billing" not in acl.services()
    await reg.backend.close()


async def test_a_repaired_etcd_key_leaves_no_orphan_lease(
    etcd_server: EtcdServer, measured: Measured
) -> None:
    reg = registrar(etcd_server.url)
    await reg.start(wait_registered=10)
    try:
        assert reg._lease is not None
        old = reg._lease.handle
        assert isinstance(old, int)
        async with aetcd.Client(host="127.0.0.1", port=etcd_server.client_port) as client:
            assert (await client.get_lease_info(old)).TTL > 0
            assert await client.delete(f"/services/{INSTANCE.service}/{INSTANCE.id}".encode())
            took = await until(
                lambda: reg.counters.reregistrations == 1 and reg.registered,
                reg.verify_interval + MARGIN,
                "repaired",
            )
            measured("repaired", took, reg.verify_interval + RETRY.cap + MARGIN)
            assert reg._lease is not None
            assert reg._lease.handle != old
            assert (await client.get_lease_info(old)).TTL == -1  # revoked, not left for a TTL
            kv = await client.get(f"/services/{INSTANCE.service}/{INSTANCE.id}".encode())
            assert kv is not None
            assert kv.lease == reg._lease.handle
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


async def test_a_deleted_acl_token_is_reported_then_healed(
    acl: AclConsul, measured: Measured
) -> None:
    server = acl.server
    async with httpx.AsyncClient(base_url=server.http) as http:
        own = await http.get("/v1/acl/token/self", headers={"X-Consul-Token": acl.token})
        token = own.json()
    reg = AsyncRegistrar(
        open_backend(server.url, token=acl.token, timeout=TIMEOUT),
        INSTANCE,
        ttl=TTL,
        retry=RETRY,
    )
    await reg.start(wait_registered=10)
    try:
        server.api(f"/v1/acl/token/{token['AccessorID']}", method="DELETE")
        took = await until(lambda: not reg.registered, TTL + MARGIN + 5, "lost")
        measured("token deleted: counted lost", took, TTL + reg.heartbeat_interval + MARGIN)
        status = reg.status()
        assert status["ready"] is False
        assert "ACL not found" in (status["last_error"] or "")  # the server's words
        # The operator gives the token back: healed at the next slow retry.
        server.api(
            "/v1/acl/token",
            method="PUT",
            body={
                "AccessorID": token["AccessorID"],
                "SecretID": acl.token,
                "Policies": [{"ID": p["ID"]} for p in token["Policies"]],
            },
        )
        took = await until(lambda: reg.ready, 10 + MARGIN, "ready again")
        measured("token back: ready again", took, RETRY.cap + reg.heartbeat_interval + MARGIN)
        assert "orders-127.0.0.1-8080" in acl.services()
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


async def test_a_changed_etcd_password_is_reported_then_healed(measured: Measured) -> None:
    user, password = "orders-agent", "s3cret-orders-pw"
    server = EtcdServer()
    server.start()
    try:
        server.enable_auth("root-pw")
        server.add_user(user, password, read_write_prefix="/services/orders/")
        reg = AsyncRegistrar(
            open_backend(server.url, user=user, password=password, timeout=TIMEOUT),
            INSTANCE,
            ttl=TTL,
            retry=RETRY,
        )
        await reg.start(wait_registered=10)
        try:
            # etcd drops the user's auth tokens with the change: the client logs in again.
            server.api("/v3/auth/user/changepw", {"name": user, "password": "rotated-pw"})
            took = await until(lambda: not reg.ready, TTL + MARGIN + 5, "not ready")
            measured("password changed: not ready", took, TTL + reg.heartbeat_interval + MARGIN)
            # The first failure may be "auth token expired, logging in again"; the login
            # that follows says what is wrong.
            await until(
                lambda: "authentication failed" in (reg.status()["last_error"] or "").lower(),
                RETRY.cap + MARGIN,
                "the server's words in last_error",
            )
            status = reg.status()
            assert status["registered"] is False
            assert "authentication failed" in (status["last_error"] or "").lower()
            assert password not in str(status)
            server.api("/v3/auth/user/changepw", {"name": user, "password": password})
            took = await until(lambda: reg.ready, 10 + MARGIN, "ready again")
            bound = RETRY.cap + reg.heartbeat_interval + MARGIN
            measured("password back: ready again", took, bound)
        finally:
            await reg.stop(timeout=5)
            await reg.backend.close()
    finally:
        server.close()
