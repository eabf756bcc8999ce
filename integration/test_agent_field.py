"""The agent process in the field: reload races, orphans, idle clients, a misbehaving network.

Each test runs `registry-agent run` against real Consul and etcd (through the
fault proxy where the network misbehaves) and reads the servers directly.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.acl import AclConsul
from integration.agent_process import Agent, listed
from registry_agent import HealthStatus
from registry_agent._agent.reaper import zombie_children
from registry_agent._urls import parse_backend_url
from registry_agent.testing.faultproxy import FaultProxy
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
    _reload_log_is_true(agent.logs(), removed=20)
    assert listed(server.url, "a") == {}
    assert listed(server.url, "b") == {}
    if isinstance(server, EtcdServer):
        assert server.leases() == set(), "a lease outlived the agent"


def _reload_log_is_true(logs: str, removed: int) -> None:
    """The reload line says what was done: no negative count, and what it started is what the stop
    deregistered (the reload swapped ``removed`` services for 20 others)."""
    assert not re.search(r"reloaded: .*-\d", logs), logs
    stopping = re.search(r"stopping: deregistering (\d+) service", logs)
    assert stopping is not None, logs
    cut = re.search(
        rf"reload interrupted by stop: (\d+) of 20 service\(s\) started, {removed} removed", logs
    )
    if cut is not None:
        assert cut.group(1) == stopping.group(1), logs
    elif "reloaded: " in logs:
        assert f"reloaded: 20 added, 0 changed, {removed} removed, 0 unchanged" in logs, logs
        assert stopping.group(1) == "20", logs
    else:
        assert "reload skipped: stopping" in logs, logs
        assert stopping.group(1) == str(removed), logs  # the old services, untouched


def test_sigterm_during_a_slow_reload_logs_what_it_did(
    server: ServerProcess,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    # The registry behind 0.3s of latency: the SIGTERM lands while the reload is at work.
    with FaultProxy("127.0.0.1", server_port(server)) as proxy:
        url = f"{server.url.split('://')[0]}://{proxy.host}:{proxy.port}"
        agent = Agent(tmp_path, url, services("a", 1, ttl="30s"))
        agents.append(agent.start())
        agent.until("/readyz", 200)
        proxy.latency(0.3)
        agent.write(services("b", 20, ttl="30s"))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(0.15)
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(40) == 0, agent.logs()
        # Each service's stop is bounded by the agent's stop timeout (10s), run concurrently.
        measured("exit after SIGTERM mid-reload", time.monotonic() - started, 10 + 10)
        proxy.heal()
    _reload_log_is_true(agent.logs(), removed=1)
    assert raw_entries(server) == set()
    if isinstance(server, EtcdServer):
        assert server.leases() == set(), "a lease outlived the agent"


def server_port(server: ServerProcess) -> int:
    ((_, port),) = parse_backend_url(server.url, default_port=0).endpoints
    return port


# -- item 7: readiness says what the registry holds ---------------------------------------


def test_readyz_follows_the_registry_through_a_stalled_network(
    server: ServerProcess,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    ttl, timeout = 3.0, 1.0
    with FaultProxy("127.0.0.1", server_port(server)) as proxy:
        url = f"{server.url.split('://')[0]}://{proxy.host}:{proxy.port}"
        agent = Agent(
            tmp_path, url, services("orders", 1, ttl=f"{ttl:g}s"), f'timeout = "{timeout:g}s"'
        )
        agents.append(agent.start())
        agent.until("/readyz", 200)
        proxy.stall()
        started = time.monotonic()
        body = agent.until("/readyz", 503, within=ttl + 10)
        took = time.monotonic() - started
        measured("readyz 503 after stall", took, ttl + 2)
        why = body["not_ready"]["orders/orders-0"]["why"]
        assert why, body
        _, status = agent.get("/status")
        (svc,) = status["services"]
        assert (svc["ready"], svc["not_ready_reason"]) == (False, why)
        metrics = agent.get("/metrics")[1]
        assert 'registry_agent_ready{instance_id="orders-0",service="orders"} 0.0' in metrics
        # Still stalled a TTL later: still not ready (never "passing" through an outage).
        time.sleep(ttl)
        assert agent.get("/readyz")[0] == 503
        proxy.heal()
        started = time.monotonic()
        agent.until("/readyz", 200, within=30)
        # Retry backoff caps at 10s; a request cut by the stall takes its timeout.
        measured("readyz 200 after heal", time.monotonic() - started, 10 + 2 * timeout + ttl)
        assert listed(server.url, "orders") == {"orders-0": HealthStatus.PASSING}
        metrics = agent.get("/metrics")[1]
        assert 'registry_agent_ready{instance_id="orders-0",service="orders"} 1.0' in metrics
        assert agent.stop() == 0


# -- item 3: no zombies when orphans are ours ------------------------------------------------


# Runs the agent as its child, as a subreaper itself: when the agent exits, what it leaves
# (zombies, orphans still running) becomes ours, and is listed in the file named first.
_SUBREAPER_PARENT = """
import json, signal, subprocess, sys
from registry_agent._agent.reaper import become_subreaper, children
assert become_subreaper()
agent = subprocess.Popen(sys.argv[2:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, frame: agent.send_signal(number))
code = agent.wait()
# Reparented to us as the agent exited, before its exit status reached us.
left = {pid: state for pid, (state, _) in children().items()}
with open(sys.argv[1], "w") as out:
    json.dump(left, out)
sys.exit(code)
"""


def test_orphans_of_command_checks_are_adopted_and_reaped(
    consul_server: ConsulServer,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    # Each run leaves one child in the check's group (killed when the command exits)
    # and one that escaped into a session of its own: both orphans, both ours.
    check = (
        '[[service.check]]\ncommand = ["sh", "-c", "sleep 0.1 & setsid sleep 0.3 & exit 0"]\n'
        'interval = "200ms"\n'
    )
    agent = Agent(tmp_path, consul_server.url, services("orders", 1, extra=check))
    left_file = tmp_path / "left.json"
    agents.append(agent.start(prefix=(sys.executable, "-c", _SUBREAPER_PARENT, str(left_file))))
    agent.until("/readyz", 200)
    time.sleep(3)
    first = zombie_children(agent.pid)
    time.sleep(3)
    second = zombie_children(agent.pid)
    _, status = agent.get("/status")
    assert status["agent"]["subreaper"] is True
    assert status["agent"]["orphans_reaped"] >= 10, status["agent"]
    # Zombies live at most two reaper scans (1s apart): none lives 3s, and at once no more
    # than two scans' worth of check runs leave (2 orphans a run, a run every 200ms).
    assert first & second == set()
    assert len(second) <= 2 * (2 * 1.0 / 0.2) + 4
    assert agent.get("/readyz")[0] == 200  # the check itself never lost its exit status
    started = time.monotonic()
    assert agent.stop() == 0
    # The exit pass waits up to its grace (1s) for orphans still running, beyond the stop.
    measured("stop with the exit reap pass", time.monotonic() - started, 10.0)
    assert "returncode 255" not in agent.logs()
    # At exit no zombie of the agent is handed on (the last check's orphans live 0.3s,
    # within the exit pass's grace: none is left running either).
    left = json.loads(left_file.read_text())
    assert left == {}, f"left by the agent at exit (pid: state): {left}"


# -- item 12: idle clients cannot starve the agent --------------------------------------------


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app() -> Iterator[int]:
    """A healthy HTTP service on loopback; yields its port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _flood(port: int, count: int, seconds: float) -> int:
    """Hold ``count`` idle connections for ``seconds``, reopening those the server closes."""
    opened = 0
    socks: list[socket.socket | None] = [None] * count
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if sock is not None:
                    try:
                        if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b"":
                            continue
                    except BlockingIOError:
                        continue  # still open, idle
                    except OSError:
                        pass
                    sock.close()
                try:
                    socks[i] = socket.create_connection(("127.0.0.1", port), timeout=1)
                    opened += 1
                except OSError:
                    socks[i] = None
            time.sleep(0.5)
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
    return opened


def test_idle_connections_cannot_starve_the_agent(
    server: ServerProcess,
    tmp_path: Path,
    agents: list[Agent],
    app: int,
    measured: Callable[[str, float, float], None],
) -> None:
    check = f'[[service.check]]\nhttp = "http://localhost:{app}/"\ninterval = "200ms"\n'
    agent = Agent(
        tmp_path, server.url, services("orders", 1, ttl="3s", extra="gate = { fall = 1 }\n" + check)
    )
    agents.append(agent.start(max_files=256))
    agent.until("/readyz", 200)
    log_lines = len(agent.logs().splitlines())
    flood_seconds = 12.0
    result: list[int] = []
    flooder = threading.Thread(
        target=lambda: result.append(_flood(agent.status_port, 500, flood_seconds))
    )
    flooder.start()
    worst_healthz = 0.0
    most_fds = 0
    try:
        time.sleep(1.0)
        while flooder.is_alive():
            started = time.monotonic()
            while agent.get("/healthz", timeout=1)[0] != 200:
                assert time.monotonic() - started < 10, "/healthz never answered"
            worst_healthz = max(worst_healthz, time.monotonic() - started)
            most_fds = max(most_fds, len(list(Path(f"/proc/{agent.pid}/fd").iterdir())))
            assert listed(server.url, "orders") == {"orders-0": HealthStatus.PASSING}
            time.sleep(0.5)
    finally:
        flooder.join()
    print(f"flood: {result} connections opened, most fds {most_fds}")
    measured("worst /healthz under flood", worst_healthz, 3.0)
    assert result[0] >= 500
    assert most_fds < 64 + 64, most_fds
    _, status = agent.get("/status")
    (svc,) = status["services"]
    assert svc["counters"]["deregistrations"] == 0, "withdrawn while healthy"
    assert svc["counters"]["registrations"] == 1
    new_lines = agent.logs().splitlines()[log_lines:]
    assert len(new_lines) <= 5, "\n".join(new_lines)
    assert agent.stop() == 0


# -- item 12: who may read the status server ---------------------------------------------------


def test_status_token_from_a_file_or_the_environment(
    consul_server: ConsulServer, tmp_path: Path, agents: list[Agent]
) -> None:
    token = "st4tus-t0ken-xyz"
    agent = Agent(tmp_path, consul_server.url, services("orders", 1))
    agent.path.write_text(
        agent.path.read_text().replace("[status]\n", '[status]\ntoken_file = "status-token"\n')
    )
    (tmp_path / "status-token").write_text(token + "\n")
    agents.append(agent.start())
    agent.until("/healthz", 200)  # liveness stays open: probes carry no secret
    auth = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 15
    while agent.get("/readyz", auth)[0] != 200:
        assert time.monotonic() < deadline, agent.logs()
        time.sleep(0.1)
    for path in ("/readyz", "/status", "/metrics"):
        code, body = agent.get(path)
        assert code == 401, (path, code)
        assert "orders" not in str(body)
        assert agent.get(path, {"Authorization": "Bearer wrong"})[0] == 401
        assert agent.get(path, auth)[0] == 200
    logs = agent.logs()
    assert "bearer token required" in logs
    assert "beyond loopback" not in logs  # 127.0.0.1: no warning (tests/test_agent_parts.py)
    assert token not in logs
    assert agent.stop() == 0
    # The environment wins over the file.
    (tmp_path / "env").mkdir()
    env_agent = Agent(tmp_path / "env", consul_server.url, services("orders", 1))
    agents.append(env_agent.start(env={"REGISTRY_AGENT_STATUS_TOKEN": "from-env"}))
    env_agent.until("/healthz", 200)
    assert env_agent.get("/status")[0] == 401
    assert env_agent.get("/status", {"Authorization": "Bearer from-env"})[0] == 200
    assert "beyond loopback" not in env_agent.logs()
    assert env_agent.stop() == 0


# -- item 2: the CLI prints one line, whatever the registry answers ------------------------------


def _cli_list(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "registry_agent", "list", "orders", "--backend", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "fault",
    ["http 500", "http 503", "http 404", "garbage", "reset", "refuse"],
)
def test_cli_list_through_a_misbehaving_network_prints_one_line(
    server: ServerProcess, fault: str
) -> None:
    scheme = server.url.split("://")[0]
    with FaultProxy("127.0.0.1", server_port(server)) as proxy:
        url = f"{scheme}://{proxy.host}:{proxy.port}?timeout=2s"
        healthy = _cli_list(url)
        assert (healthy.returncode, healthy.stdout, healthy.stderr) == (
            0,
            "no instances of orders\n",
            "",
        )
        if fault.startswith("http"):
            status = int(fault.split()[1])
            proxy.http(status, "No cluster leader" if status == 500 else "go away")
        elif fault == "garbage":
            proxy.garbage(1024)
        elif fault == "reset":
            proxy.reset_after(10)
        else:
            proxy.refuse()
        result = _cli_list(url)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("registry-agent: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    if fault == "http 500" and scheme == "consul":
        assert "No cluster leader" in result.stderr  # the server's own words


def test_as_pid_1_of_a_container_the_agent_reaps_and_stops_cleanly(
    consul_server: ConsulServer, tmp_path: Path, agents: list[Agent]
) -> None:
    # A PID namespace of its own, as in a container without an init: the agent is PID 1.
    check = (
        '[[service.check]]\ncommand = ["sh", "-c", "sleep 0.1 & setsid sleep 0.3 & exit 0"]\n'
        'interval = "200ms"\n'
    )
    agent = Agent(tmp_path, consul_server.url, services("orders", 1, extra=check))
    agents.append(agent.start(prefix=("unshare", "--pid", "--fork", "--mount-proc")))
    agent.until("/readyz", 200)
    _, status = agent.get("/status")
    assert status["agent"]["pid"] == 1
    time.sleep(3)
    first = zombie_children(agent.pid)
    time.sleep(3)
    second = zombie_children(agent.pid)
    assert first & second == set()
    assert len(second) <= 2 * (2 * 1.0 / 0.2) + 4
    _, status = agent.get("/status")
    assert status["agent"]["orphans_reaped"] >= 10
    # SIGTERM reaches PID 1's handler (the kernel drops signals PID 1 does not handle).
    os.kill(agent.pid, signal.SIGTERM)
    assert agent.proc is not None
    assert agent.proc.wait(20) == 0, agent.logs()
    assert listed(consul_server.url, "orders") == {}


def test_readyz_reports_consul_maintenance_mode(
    consul_server: ConsulServer,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    ttl = 3.0
    agent = Agent(tmp_path, consul_server.url, services("orders", 1, ttl=f"{ttl:g}s"))
    agents.append(agent.start())
    agent.until("/readyz", 200)
    consul_server.api(
        "/v1/agent/service/maintenance/orders-0?enable=true&reason=disk+swap", method="PUT"
    )
    started = time.monotonic()
    body = agent.until("/readyz", 503, within=ttl + 10)
    # Our entry is read back at least once a TTL.
    measured("readyz 503 in maintenance", time.monotonic() - started, ttl + 2)
    why = body["not_ready"]["orders/orders-0"]["why"]
    assert "critical" in why, why
    metrics = agent.get("/metrics")[1]
    assert 'registry_agent_ready{instance_id="orders-0",service="orders"} 0.0' in metrics
    consul_server.api("/v1/agent/service/maintenance/orders-0?enable=false", method="PUT")
    started = time.monotonic()
    agent.until("/readyz", 200, within=ttl + 10)
    measured("readyz 200 after maintenance", time.monotonic() - started, ttl + 2)
    assert agent.stop() == 0


# -- item 10: validated once, the same way by run, check and a reload ---------------------------


def test_run_and_reload_refuse_what_the_registry_would_reject(
    consul_server: ConsulServer, tmp_path: Path, agents: list[Agent]
) -> None:
    bad_meta = 'meta = { "app.version" = "1" }\n'
    agent = Agent(tmp_path, consul_server.url, services("orders", 2) + bad_meta)
    result = subprocess.run(
        [sys.executable, "-m", "registry_agent", "run", "-c", str(agent.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        f"registry-agent: {agent.path}: service[1]: meta.app.version: "
    )
    assert raw_entries(consul_server) == set()  # refused before anything was registered
    agent.write(services("orders", 2))
    agents.append(agent.start())
    agent.until("/readyz", 200)
    agent.write(services("orders", 3) + bad_meta)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in agent.logs():
        assert time.monotonic() < deadline, agent.logs()
        time.sleep(0.1)
    assert "service[2]: meta.app.version" in agent.logs()
    assert raw_entries(consul_server) == {"orders-0", "orders-1"}  # the running config stays
    assert agent.stop() == 0


def test_readyz_reports_a_deleted_acl_token_then_heals(
    acl: AclConsul,
    tmp_path: Path,
    agents: list[Agent],
    measured: Callable[[str, float, float], None],
) -> None:
    ttl = 3.0
    server = acl.server
    own = server.api("/v1/acl/token/self")  # the management token's view is enough to find ours
    tokens = server.api("/v1/acl/tokens")
    (ours,) = [t for t in tokens if t["AccessorID"] != own["AccessorID"] and t.get("Policies")]
    agent = Agent(tmp_path, server.url, services("orders", 1, ttl=f"{ttl:g}s"))
    agents.append(agent.start(env={"REGISTRY_AGENT_TOKEN": acl.token}))
    agent.until("/readyz", 200)
    server.api(f"/v1/acl/token/{ours['AccessorID']}", method="DELETE")
    started = time.monotonic()
    body = agent.until("/readyz", 503, within=ttl + 10)
    measured("token deleted: readyz 503", time.monotonic() - started, ttl + 2)
    why = body["not_ready"]["orders/orders-0"]["why"]
    assert "ACL not found" in why, why  # the server's words
    assert acl.token not in json.dumps(body)
    server.api(
        "/v1/acl/token",
        method="PUT",
        body={
            "AccessorID": ours["AccessorID"],
            "SecretID": acl.token,
            "Policies": [{"ID": p["ID"]} for p in ours["Policies"]],
        },
    )
    started = time.monotonic()
    agent.until("/readyz", 200, within=30)
    # Refusals are retried at the backoff cap (10s).
    measured("token back: readyz 200", time.monotonic() - started, 10 + ttl + 2)
    assert agent.stop() == 0
    assert acl.token not in agent.logs()
