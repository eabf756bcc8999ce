"""The agent process with two [[backend]] tables: real Consul 1.8 and etcd 3.5 at once."""

from __future__ import annotations

import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from integration.agent_process import ONE_SERVICE, Agent, listed
from registry_agent import HealthStatus
from registry_agent.testing.servers import ConsulServer, EtcdServer

# ONE_SERVICE's ttl: the registrar renews every TTL / 3 and an entry lasts TTL.
TTL = 3.0
PASSING = {"orders-1": HealthStatus.PASSING}


class MultiAgent(Agent):
    """An agent whose file has one [[backend]] table per URL."""

    def __init__(self, tmp_path: Path, urls: list[str], services: str) -> None:
        self.urls = urls
        super().__init__(tmp_path, urls[0], services)

    def write(self, services: str) -> None:
        tables = "".join(f'[[backend]]\nurl = "{url}"\n\n' for url in self.urls)
        self.path.write_text(
            f'{tables}[status]\nlisten = "127.0.0.1:{self.status_port}"\n'
            + textwrap.dedent(services)
        )


def backends_of(agent: Agent) -> dict[str, tuple[bool, bool]]:
    """Per backend of the one service: (registered, ready), as /status says."""
    code, status = agent.get("/status")
    assert code == 200, status
    (service,) = status["services"]
    return {b["name"]: (b["registered"], b["ready"]) for b in service["backends"]}


def test_agent_keeps_a_service_in_consul_and_etcd_each_on_its_own(
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    consul, etcd = consul_server.url, etcd_server.url
    agent = MultiAgent(tmp_path, [consul, etcd], ONE_SERVICE)
    agents.append(agent.start())
    agent.until("/readyz", 200)
    deadline = time.monotonic() + 10
    while listed(consul, "orders") != PASSING or listed(etcd, "orders") != PASSING:
        assert time.monotonic() < deadline, agent.logs()
        time.sleep(0.1)
    assert backends_of(agent) == {consul: (True, True), etcd: (True, True)}
    status = agent.until("/status", 200)
    assert status["agent"]["backends"] == [consul, etcd]
    metrics = agent.until("/metrics", 200)
    for url in (consul, etcd):
        labels = f'backend="{url}",instance="orders-1",service="orders"'
        assert f"registry_agent_backend_registered{{{labels}}} 1.0" in metrics
        assert f"registry_agent_backend_registrations_total{{{labels}}} 1.0" in metrics

    # etcd stopped for longer than the TTL: Consul keeps the entry passing, /readyz stays ready.
    etcd_server.stop()
    stopped = time.monotonic()
    while backends_of(agent)[etcd] != (False, False):
        assert time.monotonic() - stopped < TTL + 5, backends_of(agent)
        assert agent.get("/readyz")[0] == 200, agent.get("/readyz")
        time.sleep(0.1)
    measured("etcd entry seen lost", time.monotonic() - stopped, TTL + 5)
    for _ in range(10):  # and it stays so
        assert agent.get("/readyz")[0] == 200, agent.get("/readyz")
        time.sleep(0.1)
    assert listed(consul, "orders") == PASSING
    assert backends_of(agent)[consul] == (True, True)

    # etcd back: the entry is put back there (its key may have outlived the stop: etcd
    # keeps leases across a restart), Consul's untouched.
    etcd_server.start()
    back = time.monotonic()
    while backends_of(agent)[etcd] != (True, True):
        assert time.monotonic() - back < 15, agent.logs()
        time.sleep(0.1)
    measured("etcd entry healed", time.monotonic() - back, 15)
    assert listed(etcd, "orders") == PASSING
    metrics = agent.until("/metrics", 200)
    consul_labels = f'backend="{consul}",instance="orders-1",service="orders"'
    assert f"registry_agent_backend_registrations_total{{{consul_labels}}} 1.0" in metrics

    # SIGHUP with the same file: both kept, nothing registered again.
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while agent.until("/status", 200)["agent"]["reloads"] != 1:
        assert time.monotonic() < deadline, agent.logs()
        time.sleep(0.1)
    assert listed(consul, "orders") == PASSING
    assert listed(etcd, "orders") == PASSING
    assert backends_of(agent) == {consul: (True, True), etcd: (True, True)}
    assert f"registry_agent_backend_registrations_total{{{consul_labels}}} 1.0" in agent.until(
        "/metrics", 200
    )

    # SIGTERM: removed from both.
    assert agent.stop() == 0
    assert listed(consul, "orders") == {}
    assert listed(etcd, "orders") == {}
