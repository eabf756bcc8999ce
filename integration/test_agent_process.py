"""The real agent process (registry-agent run) against real Consul and etcd."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from integration.agent_process import ONE_SERVICE, Agent, listed
from registry_agent import HealthStatus, ServiceInstance, open_backend
from registry_agent.testing.servers import ConsulServer, ServerProcess, free_port

SECRET = "tok-5ecret-do-not-print"


def health_file_check(tmp_path: Path) -> tuple[Path, str]:
    """A command check that passes while a file exists."""
    flag = tmp_path / "healthy"
    flag.touch()
    return flag, f'command = ["test", "-e", "{flag}"]\ninterval = "200ms"'


ORDERS = (
    ONE_SERVICE
    + """gate = {{ fall = 2, rise = 1 }}
[[service.check]]
{check}
"""
)


def test_registration_readyz_and_metrics(
    server: ServerProcess,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    flag, check = health_file_check(tmp_path)
    agent = Agent(tmp_path, server.url, ORDERS.format(check=check))
    agents.append(agent.start())
    agent.until("/healthz", 200)
    agent.until("/readyz", 200)
    assert listed(server.url, "orders") == {"orders-1": HealthStatus.PASSING}
    status = agent.until("/status", 200)
    (svc,) = status["services"]
    assert (svc["state"], svc["registered"], svc["registry_status"]) == (
        "registered",
        True,
        "passing",
    )
    (check_status,) = svc["checks"].values()
    assert check_status["ok"] is True
    assert check_status["latency"] > 0
    metrics = agent.until("/metrics", 200)
    assert (
        'registry_agent_registrations_total{instance_id="orders-1",service="orders"} 1.0' in metrics
    )
    assert (
        'registry_agent_service_state{instance_id="orders-1",service="orders",'
        'state="registered"} 1.0' in metrics
    )
    assert "registry_agent_check_latency_seconds_bucket{" in metrics
    assert (
        'registry_agent_heartbeats_total{instance_id="orders-1",result="ok",service="orders"}'
        in metrics
    )
    # Health breaks: withdrawn, /readyz says why.
    flag.unlink()
    started = time.monotonic()
    body = agent.until("/readyz", 503)
    measured("readyz 503 after health broke", time.monotonic() - started, 0.2 * 2 + 2)
    assert body["not_ready"]["orders/orders-1"]["state"] == "withdrawn"
    assert listed(server.url, "orders") == {}
    flag.touch()
    agent.until("/readyz", 200)
    assert agent.stop() == 0


def test_sigterm_deregisters_and_exits_0(
    server: ServerProcess, tmp_path: Path, agents: list[Agent]
) -> None:
    _, check = health_file_check(tmp_path)
    agent = Agent(tmp_path, server.url, ORDERS.format(check=check))
    agents.append(agent.start())
    agent.until("/readyz", 200)
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert listed(server.url, "orders") == {}
    assert "deregistered" in agent.logs()


TWO = """
[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
ttl = "3s"

[[service]]
name = "users"
id = "users-1"
address = "127.0.0.1"
port = 8081
ttl = "3s"
"""


def test_a_timeout_in_the_backend_url_is_honoured(
    server: ServerProcess, tmp_path: Path, agents: list[Agent]
) -> None:
    # Options go in the URL or as keys of [backend]: ?timeout= with no key is no conflict.
    agent = Agent(tmp_path, f"{server.url}?timeout=2s", ONE_SERVICE)
    agents.append(agent.start())
    agent.until("/readyz", 200)
    assert listed(server.url, "orders") == {"orders-1": HealthStatus.PASSING}
    assert agent.stop() == 0
    assert listed(server.url, "orders") == {}
    assert "given both" not in agent.logs()


def test_sighup_reload_touches_only_what_changed(
    server: ServerProcess, tmp_path: Path, agents: list[Agent]
) -> None:
    agent = Agent(tmp_path, server.url, TWO)
    agents.append(agent.start())
    agent.until("/readyz", 200)
    # users removed, orders unchanged, billing added.
    agent.write(
        TWO.split('[[service]]\nname = "users"')[0]
        + """
[[service]]
name = "billing"
address = "127.0.0.1"
port = 8082
ttl = "3s"
"""
    )
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and listed(server.url, "billing") == {}:
        time.sleep(0.1)
    assert listed(server.url, "billing") == {"billing-127.0.0.1-8082": HealthStatus.PASSING}
    assert listed(server.url, "users") == {}
    assert listed(server.url, "orders") == {"orders-1": HealthStatus.PASSING}
    status = agent.until("/status", 200)
    orders = next(s for s in status["services"] if s["service"] == "orders")
    assert orders["counters"]["registrations"] == 1  # never re-registered by the reload
    assert status["agent"]["reloads"] == 1
    assert "reloaded: 1 added, 0 changed, 1 removed, 1 unchanged" in agent.logs()
    # A broken file on reload is refused; the running config stays.
    agent.path.write_text(agent.path.read_text().replace("port = 8082", 'port = "x"'))
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert "reload refused" in agent.logs()
    assert listed(server.url, "billing") == {"billing-127.0.0.1-8082": HealthStatus.PASSING}
    assert agent.stop() == 0


def test_invalid_config_exits_2_and_registers_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    agent = Agent(tmp_path, server.url, ORDERS.format(check='http = "http://x/"\ninterval = "2x"'))
    result = subprocess.run(
        [sys.executable, "-m", "registry_agent", "run", "-c", str(agent.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"registry-agent: {agent.path}: service[0].check[0].interval: "
        'expected a duration like "2s" or "500ms", got \'2x\''
    )
    assert listed(server.url, "orders") == {}


def test_the_backend_refuses_an_option_of_another_backend_before_anything_runs(
    server: ServerProcess, tmp_path: Path
) -> None:
    # The agent knows no backend's options: each backend checks its own when the file loads.
    other = {"consul": 'prefix = "/reg"', "etcd": 'dc = "dc1"'}[server.url.partition(":")[0]]
    agent = Agent(tmp_path, server.url, ORDERS.format(check='tcp = "127.0.0.1:1"'), other)
    result = subprocess.run(
        [sys.executable, "-m", "registry_agent", "run", "-c", str(agent.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    key = other.partition(" ")[0]
    assert result.stderr.startswith(
        f"registry-agent: {agent.path}: backend.{key}: unknown option(s) '{key}'"
    ), result.stderr
    assert result.stderr.count("\n") == 1
    assert listed(server.url, "orders") == {}


def test_secrets_never_appear_in_logs_or_status(
    consul_server: ConsulServer, tmp_path: Path, agents: list[Agent]
) -> None:
    # Consul without ACLs accepts any token: the agent runs normally with it.
    agent = Agent(
        tmp_path,
        consul_server.url,
        ORDERS.format(check='tcp = "127.0.0.1:1"'),
        extra_backend=f'token = "{SECRET}"',
    )
    agents.append(agent.start("--log-format", "json", "--log-level", "debug"))
    agent.until("/readyz", 503)  # the check fails: not ready, with the reason
    status = json.dumps(agent.until("/status", 200))
    consul_server.stop()  # errors now carry backend details
    time.sleep(1.5)
    consul_server.start()
    assert agent.stop() == 0
    logs = agent.logs()
    assert logs.strip()
    assert all(json.loads(line) for line in logs.strip().splitlines())
    for text in (logs, status):
        assert SECRET not in text


def test_unreachable_registry_is_not_a_config_error(tmp_path: Path, agents: list[Agent]) -> None:
    agent = Agent(tmp_path, f"consul://127.0.0.1:{free_port()}", TWO)
    agents.append(agent.start())
    body = agent.until("/readyz", 503)
    deadline = time.monotonic() + 15  # an answer may time out on a loaded machine: ask again
    while time.monotonic() < deadline and "unreachable" not in json.dumps(body):
        time.sleep(0.2)
        _, body = agent.get("/readyz")
    assert body is not None, "the status server never answered"
    assert "unreachable" in body["not_ready"]["orders/orders-1"]["why"], body
    assert agent.proc is not None
    assert agent.proc.poll() is None  # still running, still trying
    assert agent.stop() == 0


def test_watch_json_for_a_scripted_sequence(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "watch.out"
    with open(out, "wb") as sink:
        watch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "registry_agent",
                "watch",
                "orders",
                "--backend",
                server.url,
                "--json",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        async def script() -> None:
            backend = open_backend(server.url)
            inst = ServiceInstance(
                "orders",
                address="127.0.0.1",
                port=8080,
                id="orders-1",
                tags=("v1",),
                meta={"zone": "zürich"},
            )
            await asyncio.sleep(1.5)  # let the watcher take its first (empty) read
            lease = await backend.register(inst, ttl=30)
            await asyncio.sleep(0.3)
            await backend.set_status(lease, HealthStatus.CRITICAL)
            await asyncio.sleep(0.3)
            await backend.set_status(lease, HealthStatus.PASSING)
            await asyncio.sleep(0.3)
            await backend.deregister(lease)
            await asyncio.sleep(0.8)
            await backend.close()

        asyncio.run(script())
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["type"], e["healthy"]) for e in lines] == [
        ("added", True),
        ("offline", False),
        ("online", True),
        ("deleted", False),
    ]
    first = lines[0]
    # WatchEvent.to_dict()'s shape (node: where the registry has one), stamped.
    assert set(first) - {"node"} == {
        "type",
        "service",
        "id",
        "address",
        "port",
        "healthy",
        "status",
        "index",
        "tags",
        "meta",
        "ts",
    }
    assert [e["status"] for e in lines] == ["passing", "critical", "passing", None]
    assert (first["service"], first["id"], first["port"], first["tags"], first["meta"]) == (
        "orders",
        "orders-1",
        8080,
        ["v1"],
        {"zone": "zürich"},
    )
