"""The agent process in the field: reload races, orphans, idle clients, a misbehaving network.

Each test runs `registry-agent run` against real Consul and etcd (through the
fault proxy where the network misbehaves) and reads the servers directly.
"""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.agent_process import Agent, listed
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess


def services(prefix: str, count: int, ttl: str = "10s", extra: str = "") -> str:
    return "".join(
        f"""
[[service]]
name = "{prefix}"
id = "{prefix}-{i}"
address = "127.0.0.1"
port = {9000 + i}
ttl = "{ttl}"
{extra}"""
        for i in range(count)
    )


def raw_entries(server: ServerProcess) -> set[str]:
    """Every service id the server holds (Consul) or key under /services/ (etcd), read directly."""
    if isinstance(server, ConsulServer):
        held = server.api("/v1/agent/services")
        return {sid for sid, svc in held.items() if svc["Service"] in ("a", "b", "orders")}
    assert isinstance(server, EtcdServer)
    prefix = b"/services/"
    reply = server.api(
        "/v3/kv/range",
        {
            "key": base64.b64encode(prefix).decode(),
            "range_end": base64.b64encode(prefix[:-1] + b"0").decode(),
            "keys_only": True,
        },
    )
    return {base64.b64decode(kv["key"]).decode() for kv in reply.get("kvs", [])}


def etcd_leases(server: EtcdServer) -> list[str]:
    return [lease["ID"] for lease in server.api("/v3/lease/leases").get("leases", [])]


def wait_for(
    what: str, probe: Callable[[], bool], within: float, agent: Agent | None = None
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if probe():
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {within:g}s" + (f"\n{agent.logs()}" if agent else ""))


# -- item 4: a stop during a reload ------------------------------------------------------


@pytest.mark.parametrize("delay_ms", [0, 10, 25, 50])
def test_sigterm_during_a_reload_leaves_nothing_registered(
    server: ServerProcess, tmp_path: Path, agents: list[Agent], delay_ms: int
) -> None:
    agent = Agent(tmp_path, server.url, services("a", 20))
    agents.append(agent.start())
    wait_for("20 services registered", lambda: len(raw_entries(server)) == 20, 20, agent)
    agent.write(services("b", 20))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(delay_ms / 1000)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0, agent.logs()
    # Read at once: a leftover would still be there (ttl 10s), passing.
    left = raw_entries(server)
    assert left == set(), f"left registered after SIGTERM {delay_ms} ms after SIGHUP: {left}"
    assert listed(server.url, "a") == {}
    assert listed(server.url, "b") == {}
    if isinstance(server, EtcdServer):
        assert etcd_leases(server) == [], "a lease outlived the agent"
