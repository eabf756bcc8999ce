"""The agent process with two [[backend]] tables: real Consul 1.8 and etcd 3.5 at once."""

from __future__ import annotations

import base64
import json
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from integration.agent_process import ONE_SERVICE, Agent, listed
from integration.peer_kit import etcdctl
from registry_agent import HealthStatus, Watcher
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
        labels = f'backend="{url}",instance_id="orders-1",service="orders"'
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
    consul_labels = f'backend="{consul}",instance_id="orders-1",service="orders"'
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


def revisions(etcd_server: EtcdServer, prefix: str) -> dict[str, int]:
    """Every key under ``prefix`` with its create_revision, as etcdctl reads them."""
    answer = json.loads(etcdctl(etcd_server, "get", "--prefix", prefix, "-w", "json"))
    return {
        base64.b64decode(kv["key"]).decode(): int(kv["create_revision"])
        for kv in answer.get("kvs", [])
    }


def test_sighup_adding_and_removing_a_backend_leaves_the_kept_ones_untouched(
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    consul, etcd = consul_server.url, etcd_server.url
    kratos = f"{etcd}?format=kratos"  # the same etcd, another format and prefix
    agent = MultiAgent(tmp_path, [consul, etcd], ONE_SERVICE)
    agents.append(agent.start())
    agent.until("/readyz", 200)
    deadline = time.monotonic() + 10
    while listed(consul, "orders") != PASSING or listed(etcd, "orders") != PASSING:
        assert time.monotonic() < deadline, agent.logs()
        time.sleep(0.1)
    ours = revisions(etcd_server, "/services/orders/")
    assert len(ours) == 1, ours

    # One watcher per kept registry: a blink in either one (deleted, then added) shows.
    seen: list[tuple[str, str, str]] = []
    watchers = [Watcher(url, "orders") for url in (consul, etcd)]

    def follow(url: str, watcher: Watcher) -> None:
        for event in watcher:
            seen.append((url, event.type.value, event.instance.id))

    threads = [
        threading.Thread(target=follow, args=(url, w), daemon=True)
        for url, w in zip((consul, etcd), watchers, strict=True)
    ]
    try:
        for watcher, thread in zip(watchers, threads, strict=True):
            thread.start()
            assert watcher.wait_synced(10)
        deadline = time.monotonic() + 10
        while len(seen) < 2:  # each one's initial "added"
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        assert sorted(seen) == sorted([(consul, "added", "orders-1"), (etcd, "added", "orders-1")])
        seen.clear()

        def reload_to(urls: list[str], reloads: int) -> float:
            agent.urls = urls
            agent.write(ONE_SERVICE)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            sent = time.monotonic()
            while agent.until("/status", 200)["agent"]["reloads"] != reloads:
                assert time.monotonic() - sent < 15, agent.logs()
                time.sleep(0.05)
            return sent

        # SIGHUP adding a third table: the new one gets the entry at once.
        sent = reload_to([consul, etcd, kratos], 1)
        while listed(kratos, "orders") != PASSING:
            assert time.monotonic() - sent < TTL + 5, agent.logs()
            time.sleep(0.1)
        measured("added backend holds the entry after SIGHUP", time.monotonic() - sent, TTL + 5)
        assert len(revisions(etcd_server, "/microservices/orders/")) == 1
        time.sleep(TTL)  # a TTL for any late blink to show
        assert seen == [], seen
        assert revisions(etcd_server, "/services/orders/") == ours  # never re-created
        assert listed(consul, "orders") == PASSING
        assert listed(etcd, "orders") == PASSING
        metrics = agent.until("/metrics", 200)
        consul_labels = f'backend="{consul}",instance_id="orders-1",service="orders"'
        assert f"registry_agent_backend_registrations_total{{{consul_labels}}} 1.0" in metrics
        shown = agent.until("/status", 200)["services"][0]["backends"]
        assert [b["registered"] for b in shown] == [True, True, True]

        # SIGHUP removing it: removed there, the kept ones untouched.
        sent = reload_to([consul, etcd], 2)
        assert revisions(etcd_server, "/microservices/orders/") == {}  # deregistered in the reload
        measured("removed backend emptied by the SIGHUP", time.monotonic() - sent, 15)
        time.sleep(TTL)
        assert seen == [], seen
        assert revisions(etcd_server, "/services/orders/") == ours
        assert listed(consul, "orders") == PASSING
        assert f"registry_agent_backend_registrations_total{{{consul_labels}}} 1.0" in agent.until(
            "/metrics", 200
        )
        assert backends_of(agent) == {consul: (True, True), etcd: (True, True)}
        assert agent.logs().count("0 added, 0 changed, 0 removed, 1 unchanged") == 2
    finally:
        for watcher in watchers:
            watcher.close()
        for thread in threads:
            thread.join(10)
    assert agent.stop() == 0
    assert listed(consul, "orders") == {}
    assert listed(etcd, "orders") == {}
