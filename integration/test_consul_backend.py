"""Consul-specific behaviour on a real Consul agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from registry_agent_consul import ConsulBackend

from registry_agent import HealthStatus, ServiceInstance, open_backend
from registry_agent.testing.servers import ConsulServer


@pytest.fixture
async def backend(consul_server: ConsulServer) -> AsyncIterator[ConsulBackend]:
    backend = open_backend(consul_server.url, timeout=2, wait="2s")
    assert isinstance(backend, ConsulBackend)
    yield backend
    await backend.close()


async def test_registers_a_ttl_check_named_after_the_instance(
    consul_server: ConsulServer, backend: ConsulBackend
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    lease = await backend.register(inst, ttl=7.5)
    assert lease.handle == f"service:{inst.id}"
    async with httpx.AsyncClient(base_url=consul_server.http) as http:
        checks = (await http.get("/v1/agent/checks")).json()
    check = checks[f"service:{inst.id}"]
    assert check["ServiceID"] == inst.id
    assert check["Status"] == "passing"
    assert check["Type"] == "ttl"
    health = checks[f"service:{inst.id}:health"]
    assert health["ServiceID"] == inst.id
    assert health["Status"] == "passing"


async def test_health_lives_on_its_own_check_and_heartbeats_leave_it_alone(
    consul_server: ConsulServer, backend: ConsulBackend
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    lease = await backend.register(inst, ttl=30)
    await backend.set_status(lease, HealthStatus.CRITICAL, "db unreachable")
    await backend.heartbeat(lease)
    async with httpx.AsyncClient(base_url=consul_server.http) as http:
        checks = (await http.get("/v1/agent/checks")).json()
    # Liveness (the check Consul reaps by) stays passing while we heartbeat.
    assert checks[f"service:{inst.id}"]["Status"] == "passing"
    assert checks[f"service:{inst.id}:health"]["Status"] == "critical"
    assert checks[f"service:{inst.id}:health"]["Output"] == "db unreachable"
    for found in ((await backend.list("orders")).instances[inst.id], await backend.lookup(lease)):
        assert found is not None
        assert found.status is HealthStatus.CRITICAL
        assert found.note == "db unreachable"
    # Either check missing is a lost registration: register again.
    async with httpx.AsyncClient(base_url=consul_server.http) as http:
        reply = await http.put(f"/v1/agent/check/deregister/service:{inst.id}:health")
        assert reply.status_code == 200
    assert await backend.lookup(lease) is None


async def test_a_failing_node_check_makes_every_instance_critical(
    consul_server: ConsulServer, backend: ConsulBackend
) -> None:
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080)
    await backend.register(inst, ttl=30)
    async with httpx.AsyncClient(base_url=consul_server.http) as http:
        response = await http.put(
            "/v1/agent/check/register",
            json={"Name": "disk", "ID": "disk", "TTL": "30s", "Status": "critical"},
        )
        assert response.status_code == 200
    health = (await backend.list("orders")).instances[inst.id]
    assert health.status is HealthStatus.CRITICAL
    assert not health.healthy


async def test_every_entry_consul_accepts_is_read(
    consul_server: ConsulServer, backend: ConsulBackend, caplog: pytest.LogCaptureFixture
) -> None:
    ours = ServiceInstance("orders", address="127.0.0.1", port=8080)
    await backend.register(ours, ttl=30)
    foreign = [
        {"Name": "orders", "ID": "orders with spaces"},  # no port, an id we would not write
        {"Name": "orders", "ID": "orders-[::1]:8080", "Address": "::1", "Port": 8080},
    ]
    async with httpx.AsyncClient(base_url=consul_server.http) as http:
        for body in foreign:
            response = await http.put("/v1/agent/service/register", json=body)
            assert response.status_code == 200, response.text
    with caplog.at_level(logging.WARNING, logger="registry_agent.consul"):
        snapshot = await backend.list("orders")
    assert set(snapshot.instances) == {ours.id, "orders with spaces", "orders-[::1]:8080"}
    assert snapshot.instances[ours.id].instance == ours
    portless = snapshot.instances["orders with spaces"].instance
    assert portless.port == 0
    assert portless.address == "127.0.0.1"  # the node's address, as Consul's DNS does
    assert snapshot.instances["orders-[::1]:8080"].instance.address == "::1"
    nodes = {h.instance.node for h in snapshot.instances.values()}
    assert len(nodes) == 1  # every instance carries its node
    assert "" not in nodes
    assert not [r for r in caplog.records if "not a valid instance" in r.getMessage()]


async def test_resuming_with_an_index_from_before_a_restart_does_not_block(
    consul_server: ConsulServer,
) -> None:
    # A long `wait`: without the reset, resuming would block for a minute.
    backend = open_backend(consul_server.url, timeout=2, wait="60s")
    try:
        for port in range(8000, 8020):
            await backend.register(ServiceInstance("orders", address="h", port=port), ttl=60)
        before = await backend.list("orders")
        consul_server.restart(wipe=True)
        survivor = ServiceInstance("orders", address="h", port=9999)
        await backend.register(survivor, ttl=60)
        stream = aiter(backend.watch("orders", since=before))
        snapshot = await asyncio.wait_for(anext(stream), timeout=5)
        await stream.aclose()  # type: ignore[attr-defined]
        assert set(snapshot.instances) == {survivor.id}
    finally:
        await backend.close()


async def test_an_idle_blocking_query_does_not_spin(
    consul_server: ConsulServer, backend: ConsulBackend
) -> None:
    requests = 0
    http = backend.api.http
    original = http._request

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal requests
        requests += 1
        return await original(*args, **kwargs)

    http._request = counting
    stream = aiter(backend.watch("idle"))
    await asyncio.wait_for(anext(stream), timeout=5)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(3.0)  # wait=2s
    assert not pending.done()
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await stream.aclose()  # type: ignore[attr-defined]
    # three blocking queries (catalog, checks, node checks), each per 2 s wait: one
    # blocking query and one re-read without blocking; a spin would be hundreds
    assert 1 <= requests <= 18


async def test_an_ipv6_agent_address_is_reached(consul_server: ConsulServer) -> None:
    """consul://[::1]:port: py-consul writes its base URL without brackets by itself."""
    from registry_agent.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", consul_server.http_port, host="::1") as proxy:
        backend = open_backend(f"consul://[::1]:{proxy.port}", timeout=3)
        try:
            inst = ServiceInstance("v6", address="::1", port=8080)
            lease = await backend.register(inst, ttl=10)
            assert [h.instance for h in (await backend.list("v6")).instances.values()] == [inst]
            await backend.deregister(lease)
        finally:
            await backend.close()
