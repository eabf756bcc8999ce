"""stop() retries a deregistration that failed in a way a retry can fix, until its deadline.

On real Consul and etcd behind a FaultProxy: a registry that fails for 0.4 s when
stop() begins (Consul: 503; etcd: connections refused) has our entry removed soon
after it heals, well before the TTL, own lease or shared liveness (the last
registration also removes the shared heartbeat service / revokes the shared lease);
a registry down for the whole stop: stop() returns within its timeout and logs
WARNING "not deregistered".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import pytest

from registry_agent import AsyncRegistrar, Backend, ServiceInstance, open_backend
from registry_agent._retry import RetryPolicy
from registry_agent.testing.fault_contract import consul_ids, etcd_ids, proxied_url, target_of
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

TTL = 10.0
OUTAGE = 0.4
STOP_TIMEOUT = 5.0


def _ids(server: ServerProcess, service: str) -> list[str]:
    if isinstance(server, ConsulServer):
        return consul_ids(server, service)
    assert isinstance(server, EtcdServer)
    return etcd_ids(server, service)


def _fail(server: ServerProcess, proxy: FaultProxy) -> None:
    if isinstance(server, ConsulServer):
        proxy.http(503, "Service Unavailable")
    else:  # gRPC: an HTTP/1.1 answer is garbage to it; refuse instead
        proxy.refuse()


def _leftovers(server: ServerProcess) -> list[str]:
    """A shared heartbeat service (Consul) or lease (etcd) still in the registry."""
    if isinstance(server, ConsulServer):
        return list(server.api("/v1/agent/services"))
    assert isinstance(server, EtcdServer)
    return [str(lease) for lease in server.leases()]


def _registrar(
    server: ServerProcess, proxy: FaultProxy, *, shared: bool, backend: Backend | None = None
) -> AsyncRegistrar:
    service = f"stop-{uuid.uuid4().hex[:8]}"
    instance = ServiceInstance(service=service, id=f"{service}-1", address="127.0.0.1", port=9)
    return AsyncRegistrar(
        backend or proxied_url(server.url, proxy) + "?timeout=2",
        instance,
        ttl=TTL,
        shared_liveness=shared,
        retry=RetryPolicy(initial=0.1, cap=2.0),
    )


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
async def test_a_brief_outage_at_stop_is_retried(server: ServerProcess, shared: bool) -> None:
    with FaultProxy(*target_of(server.url)) as proxy:
        # Shared liveness as the agent has it: a backend the registrar does not own (and
        # so does not close: the shared heartbeat / lease must go with the last member).
        backend = open_backend(proxied_url(server.url, proxy), timeout=2.0) if shared else None
        registrar = _registrar(server, proxy, shared=shared, backend=backend)
        service = registrar.instance.service
        await registrar.start(wait_registered=10.0)
        assert _ids(server, service) == [registrar.instance.id]
        _fail(server, proxy)
        healed = threading.Timer(OUTAGE, proxy.heal)
        began = time.monotonic()
        healed.start()
        try:
            await registrar.stop(timeout=STOP_TIMEOUT)
        finally:
            healed.join()
        took = time.monotonic() - began
        # Gone at once, well before the TTL (it stayed a whole TTL before the fix).
        assert _ids(server, service) == []
        assert took < STOP_TIMEOUT, f"stop() took {took:.2f}s"
        assert took < TTL / 2
        assert registrar.status()["last_error"] is None
        if backend is not None:  # the last member took the shared heartbeat / lease with it
            assert _leftovers(server) == []
            await backend.close()


async def test_a_registry_down_for_the_whole_stop(
    server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 2.0
    with FaultProxy(*target_of(server.url)) as proxy:
        registrar = _registrar(server, proxy, shared=False)
        await registrar.start(wait_registered=10.0)
        _fail(server, proxy)
        began = time.monotonic()
        with caplog.at_level(logging.DEBUG, logger="registry_agent"):
            await registrar.stop(timeout=timeout)
        took = time.monotonic() - began
        proxy.heal()
    assert took < timeout + 0.3, f"stop() took {took:.2f}s"
    tries = [r for r in caplog.records if getattr(r, "event", "") == "deregister_failed"]
    assert len(tries) >= 2, "retried within the stop budget"
    warnings = [r for r in caplog.records if "not deregistered" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert not [r for r in caplog.records if getattr(r, "event", "") == "deregistered"]
    assert registrar.status()["last_error"]
    # The entry was left for its TTL: still there.
    assert _ids(server, registrar.instance.service) == [registrar.instance.id]


async def test_a_cancelled_stop_runs_to_its_end_and_a_later_stop_waits_for_it(
    server: ServerProcess,
) -> None:
    # A break-it run: stop() cut by an ASGI server's shutdown timeout, then stop() again:
    # the second returned at once, and the connection probe and the backend (etcd: its
    # gRPC streams) ran on for good, one set per registrar.
    with FaultProxy(*target_of(server.url)) as proxy:
        registrar = _registrar(server, proxy, shared=False)
        service = registrar.instance.service
        await registrar.start(wait_registered=10.0)
        before = asyncio.all_tasks()
        proxy.latency(0.3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(registrar.stop(timeout=STOP_TIMEOUT), 0.05)
        await registrar.stop(timeout=STOP_TIMEOUT)
        assert _ids(server, service) == []
        current = asyncio.current_task()
        # Everything the registrar ran has ended (a moment for cancelled callbacks).
        for _ in range(40):
            left = {t for t in asyncio.all_tasks() - before if t is not current}
            left |= {t for t in before if t is not current and not t.done()}
            if not left:
                break
            await asyncio.sleep(0.05)
        assert not left, [t.get_name() for t in left]
