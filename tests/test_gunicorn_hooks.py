"""The gunicorn hooks' own logic, with a stand-in for gunicorn's arbiter.

What is registered per listener (address, port, id, scheme, checks), the
errors naming their field, and the keeper process's protocol (start, stop,
its parent's death, SIGHUP) with the in-memory backend in the keeper.
Real gunicorn against real registries: ``integration/test_gunicorn_registration.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from gunicorn.config import Config  # type: ignore[import-untyped]

from registry_agent import ConfigError, HttpCheck, ServiceInstance, TcpCheck
from registry_agent.integrations import gunicorn as gunicorn_hooks
from registry_agent.integrations.gunicorn import (
    GunicornRegistration,
    GunicornStartError,
    registration_hooks,
)
from registry_agent.testing.servers import freeze_process, unread_input

ROOT = Path(__file__).resolve().parent.parent


class FakeListener:
    """What the arbiter's LISTENERS hold, as far as the hooks look: getsockname()."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def getsockname(self) -> Any:
        return self.name


class FakeCfg:
    def __init__(self, address: list[Any], is_ssl: bool = False) -> None:
        self.address = address
        self.is_ssl = is_ssl


class FakeServer:
    """The arbiter as the hooks see it: LISTENERS, cfg, log and the stop handlers."""

    def __init__(self, listeners: list[Any], address: list[Any] | None = None) -> None:
        self.LISTENERS = listeners
        self.cfg = FakeCfg(address or [])
        self.log = logging.getLogger("test.gunicorn")
        self.calls: list[str] = []
        #: Where gunicorn's signal handler queues the signals its loop handles.
        self.SIG_QUEUE: queue.SimpleQueue[int] = queue.SimpleQueue()
        #: Called by each handler, its answer recorded beside the handler's name.
        self.probe: Callable[[], object] = lambda: ""

    def handle_term(self) -> None:
        self.calls.append(f"term{self.probe()}")

    def handle_int(self) -> None:
        self.calls.append(f"int{self.probe()}")

    def handle_quit(self) -> None:
        self.calls.append(f"quit{self.probe()}")

    def reap_workers(self) -> None:
        # gunicorn's: waitpid(-1) takes any child's status.
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def manage_workers(self) -> None:
        self.calls.append("manage")


def _server(*names: Any) -> FakeServer:
    return FakeServer([FakeListener(name) for name in names])


def _entries(registration: GunicornRegistration, server: FakeServer) -> list[Any]:
    return registration.instances(server)


def test_the_hooks_are_what_gunicorn_accepts() -> None:
    hooks = registration_hooks("consul://127.0.0.1:8500", "orders")
    when_ready, on_reload, on_exit = hooks
    config = Config()
    config.set("when_ready", when_ready)
    config.set("on_reload", on_reload)
    config.set("on_exit", on_exit)
    assert config.when_ready == hooks.when_ready


def test_one_instance_per_listener_with_the_bound_address_and_port() -> None:
    registration = GunicornRegistration("consul://127.0.0.1:8500", "orders")
    entries = _entries(registration, _server(("127.0.0.1", 8000), ("127.0.0.2", 8001)))
    assert [(i.address, i.port, i.scheme, i.id) for i, _ in entries] == [
        ("127.0.0.1", 8000, "http", "orders-127.0.0.1-8000"),
        ("127.0.0.2", 8001, "http", "orders-127.0.0.2-8001"),
    ]
    [check] = entries[0][1]
    assert isinstance(check, TcpCheck)
    assert (check.host, check.port) == ("127.0.0.1", 8000)


def test_a_wildcard_bind_advertises_the_default_address_and_is_checked_on_loopback() -> None:
    registration = GunicornRegistration("consul://127.0.0.1:8500", "orders", health_path="/hz")
    # 0.0.0.0:8000 and [::]:8000: one address to advertise, one registration.
    entries = _entries(registration, _server(("0.0.0.0", 8000), ("::", 8000, 0, 0)))
    [(instance, [check])] = entries
    assert instance.address == ServiceInstance("orders", port=8000).address
    assert isinstance(check, HttpCheck)
    assert check.url == "http://127.0.0.1:8000/hz"
    [(_, [check6])] = _entries(registration, _server(("::", 8000, 0, 0)))
    assert isinstance(check6, HttpCheck)
    assert check6.url == "http://[::1]:8000/hz"


def test_an_explicit_address_wins_and_tls_makes_https() -> None:
    registration = GunicornRegistration(
        "consul://127.0.0.1:8500",
        "orders",
        address="10.1.2.3",
        health_path="/hz",
        tags=["a"],
        meta={"k": "v"},
        version="1.2",
    )
    server = _server(("127.0.0.1", 8443), ("0.0.0.0", 9443))
    server.cfg.is_ssl = True
    entries = _entries(registration, server)
    assert [(i.address, i.port, i.scheme) for i, _ in entries] == [
        ("10.1.2.3", 8443, "https"),
        ("10.1.2.3", 9443, "https"),
    ]
    assert all(i.tags == ("a",) and dict(i.meta) == {"k": "v"} for i, _ in entries)
    assert [c.url for _, [c] in entries] == [
        "https://127.0.0.1:8443/hz",
        "https://127.0.0.1:9443/hz",
    ]


def test_unix_sockets_are_skipped_and_reuse_port_uses_the_bind() -> None:
    registration = GunicornRegistration("consul://127.0.0.1:8500", "orders")
    entries = _entries(registration, _server("/run/app.sock", ("127.0.0.1", 8000)))
    assert [i.port for i, _ in entries] == [8000]
    with pytest.raises(GunicornStartError) as caught:
        _entries(registration, _server("/run/app.sock"))
    assert caught.value.field == "bind"
    assert isinstance(caught.value, RuntimeError)  # gunicorn prints "Error: …", no traceback
    # reuse_port: the master holds no socket, each worker binds its own.
    server = FakeServer([], address=[("127.0.0.1", 8000), "/run/app.sock"])
    assert [i.port for i, _ in _entries(registration, server)] == [8000]
    with pytest.raises(GunicornStartError, match="reuse_port") as zero:
        _entries(registration, FakeServer([], address=[("127.0.0.1", 0)]))
    assert zero.value.field == "bind"


def test_id_templates_and_check_factories() -> None:
    made: list[tuple[str, int]] = []

    def checks(host: str, port: int) -> list[TcpCheck]:
        made.append((host, port))
        return [TcpCheck(host, port, interval=1.0)]

    registration = GunicornRegistration(
        "consul://127.0.0.1:8500", "orders", id="{service}-web-{port}", checks=checks
    )
    entries = _entries(registration, _server(("0.0.0.0", 8000), ("127.0.0.1", 8001)))
    assert [i.id for i, _ in entries] == ["orders-web-8000", "orders-web-8001"]
    assert made == [("127.0.0.1", 8000), ("127.0.0.1", 8001)]
    fixed = GunicornRegistration("consul://127.0.0.1:8500", "orders", id="orders-1")
    assert [i.id for i, _ in _entries(fixed, _server(("127.0.0.1", 8000)))] == ["orders-1"]
    with pytest.raises(GunicornStartError, match="share an id") as shared:
        _entries(fixed, _server(("127.0.0.1", 8000), ("127.0.0.1", 8001)))
    assert shared.value.field == "id"
    bad = GunicornRegistration(
        "consul://127.0.0.1:8500",
        "orders",
        checks=lambda host, port: ["nope"],  # type: ignore[list-item]
    )
    with pytest.raises(GunicornStartError) as not_a_check:
        _entries(bad, _server(("127.0.0.1", 8000)))
    assert not_a_check.value.field == "checks[0]"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backend": 3}, "backend"),
        ({"backend": []}, "backend"),
        ({"service": "bad name"}, "service"),
        ({"health_path": "healthz"}, "health_path"),
        ({"check_interval": 0}, "check_interval"),
        ({"deregister_timeout": -1}, "deregister_timeout"),
        ({"start_timeout": True}, "start_timeout"),
        ({"drain_delay": -0.5}, "drain_delay"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"tll": 10}, "tll"),
        ({"ttl": 0.1}, "ttl"),
        ({"checks": ["http://x"]}, "checks[0]"),
        ({"id": 3}, "id"),
        ({"id": "{nope}"}, "id"),
        ({"address": "two words"}, "address"),
    ],
)
def test_bad_options_name_their_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"backend": "consul://127.0.0.1:8500", "service": "orders", **kwargs}
    with pytest.raises(ConfigError) as caught:
        GunicornRegistration(args.pop("backend"), args.pop("service"), **args)
    assert caught.value.field == field, caught.value


def test_no_backend_takes_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        registration_hooks(service="orders")
    assert caught.value.field == "REGISTRY_AGENT_BACKEND"
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8501")
    assert GunicornRegistration(service="orders").backend == "consul://127.0.0.1:8501"
    monkeypatch.setenv("REGISTRY_AGENT_BACKEND", "etcd://127.0.0.1:2379 consul://127.0.0.1:8500")
    assert GunicornRegistration(service="orders").backend == (
        "etcd://127.0.0.1:2379",
        "consul://127.0.0.1:8500",
    )


def test_checks_the_keeper_cannot_receive_are_refused_at_when_ready() -> None:
    check = HttpCheck("http://127.0.0.1:8000/", body=lambda body: True)
    registration = GunicornRegistration("consul://127.0.0.1:8500", "orders", checks=[check])
    with pytest.raises(GunicornStartError) as caught:
        registration.when_ready(_server(("127.0.0.1", 8000)))
    assert caught.value.field == "checks"


# The keeper process, holding the registration in the in-memory backend (its own process's).


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A listening loopback socket: what the default TCP check connects to."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, within: float) -> float:
    began = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - began < within, f"process {pid} still running"
        time.sleep(0.02)
    return time.monotonic() - began


def test_when_ready_starts_a_keeper_and_a_stop_signal_withdraws_before_gunicorn_goes_on(
    listening: socket.socket,
) -> None:
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", check_interval=0.2)
    server = FakeServer([listening])
    original = server.handle_term
    registration.when_ready(server)
    keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
    assert keeper.pid != os.getpid()
    assert psutil.Process(keeper.pid).ppid() == os.getpid()
    assert server.handle_term != original  # wrapped
    assert keeper.alive()

    # gunicorn's own handler (which closes the listeners) runs once the keeper is gone.
    server.probe = lambda: f" keeper alive={keeper.alive()}"
    server.handle_term()
    assert server.calls == ["term keeper alive=False"]
    assert server._registry_agent_keeper is None  # type: ignore[attr-defined]
    registration.on_exit(server)  # after a stop signal: nothing left to do
    server.handle_quit()  # a second signal: straight to gunicorn's handler
    assert server.calls == ["term keeper alive=False", "quit keeper alive=False"]


def test_drain_delay_waits_between_the_withdrawal_and_gunicorns_handler(
    listening: socket.socket,
) -> None:
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", drain_delay=0.3)
    server = FakeServer([listening])
    registration.when_ready(server)
    keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
    began = time.monotonic()
    server.probe = lambda: f" after {time.monotonic() - began:.1f}s alive={keeper.alive()}"
    server.handle_int()
    [call] = server.calls
    assert call.startswith("int after "), call
    assert call.endswith(" alive=False"), call
    assert float(call.split()[2].rstrip("s")) >= 0.3


def test_the_keeper_refuses_what_the_backend_refuses(listening: socket.socket) -> None:
    registration = GunicornRegistration("nosuch://127.0.0.1:1", "orders")
    with pytest.raises(GunicornStartError, match="nosuch") as caught:
        registration.when_ready(FakeServer([listening]))
    assert isinstance(caught.value, RuntimeError)


def _listening_on(server: FakeServer, listeners: list[Any]) -> FakeServer:
    """``server`` (the same object: the keeper lives on it) listening on ``listeners``."""
    server.LISTENERS = listeners
    return server


def test_a_keeper_that_dies_at_start_is_reported(
    listening: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gunicorn_hooks, "_KEEPER_MAIN", "import sys; sys.exit(3)")
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", start_timeout=20)
    began = time.monotonic()
    with pytest.raises(GunicornStartError, match="exited with code 3"):
        registration.when_ready(FakeServer([listening]))
    assert time.monotonic() - began < 10  # told at once, not at start_timeout


def test_on_reload_keeps_an_unchanged_keeper_and_replaces_a_changed_one(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeServer([listening])
    GunicornRegistration("memory://gunicorn-hooks", "orders").when_ready(server)
    first = server._registry_agent_keeper  # type: ignore[attr-defined]
    # SIGHUP re-reads the config file: a new registration object, the same settings.
    GunicornRegistration("memory://gunicorn-hooks", "orders").on_reload(server)
    assert server._registry_agent_keeper is first  # type: ignore[attr-defined]
    # Only the tags or meta changed: the same keeper updates its entries in place.
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        GunicornRegistration(
            "memory://gunicorn-hooks", "orders", tags=["v2"], meta={"zone": "b"}
        ).on_reload(server)
    assert server._registry_agent_keeper is first  # type: ignore[attr-defined]
    assert f"keeper {first.pid} updated tags/meta in place" in caplog.text
    [instance] = first.spec.instances()
    assert (instance.tags, instance.meta) == (("v2",), {"zone": "b"})
    # Anything else changed (here the checks): a new keeper.
    GunicornRegistration(
        "memory://gunicorn-hooks", "orders", tags=["v2"], meta={"zone": "b"}, check_interval=1
    ).on_reload(server)
    second = server._registry_agent_keeper  # type: ignore[attr-defined]
    assert second is not first
    assert not first.alive()
    assert second.alive()
    # A reloaded config that cannot be registered: logged, the registration kept as it was
    # (an exception from a hook would stop gunicorn).
    with caplog.at_level(logging.ERROR, logger="test.gunicorn"):
        GunicornRegistration("memory://gunicorn-hooks", "orders", id="same").on_reload(
            _listening_on(server, [listening, FakeListener(("127.0.0.1", 1))])
        )
    assert "reloaded config not registered: id: the listeners would share an id" in caplog.text
    assert server._registry_agent_keeper is second  # type: ignore[attr-defined]
    assert second.alive()
    server.handle_int()
    assert server.calls == ["int"]
    assert not second.alive()


def test_the_keeper_deregisters_and_exits_when_the_master_dies(tmp_path: Path) -> None:
    # A stand-in master: starts the keeper as when_ready does, prints its pid, dies.
    script = textwrap.dedent(
        """
        import logging, os, socket, sys
        from registry_agent.integrations.gunicorn import GunicornRegistration
        sock = socket.create_server(("127.0.0.1", 0))
        class Server:
            LISTENERS = [sock]
            class cfg:
                address = []
                is_ssl = False
            log = logging.getLogger("master")
            def handle_term(self): pass
            def handle_int(self): pass
            def handle_quit(self): pass
        server = Server()
        GunicornRegistration("memory://gone", "orders", log_level="INFO").when_ready(server)
        print(server._registry_agent_keeper.pid, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        master = subprocess.run(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert master.returncode == -signal.SIGKILL, err.read_text()
    keeper = int(master.stdout.split()[0])
    took = _wait_gone(keeper, within=10)
    print(f"keeper gone {took:.3f}s after its master")
    deadline = time.monotonic() + 10
    while "the master is gone" not in err.read_text():
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    assert "deregistered orders-" in err.read_text()


def _wait_reapable(pid: int, within: float) -> None:
    """Until ``pid`` (our child) can be reaped; not reaping it (a killed process whose
    threads still exit shows as a zombie before waitpid() reports it)."""
    deadline = time.monotonic() + within
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.01)


def _loop(server: FakeServer, until: Callable[[], bool], within: float) -> None:
    """The arbiter's loop as far as the hooks see it: reap, manage, every 50 ms."""
    deadline = time.monotonic() + within
    while not until():
        assert time.monotonic() < deadline, server.calls[-3:]
        server.reap_workers()
        server.manage_workers()
        time.sleep(0.05)


def test_a_dead_keeper_is_noticed_and_restarted_by_the_arbiters_loop(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", check_interval=0.2)
    server = FakeServer([listening])
    registration.when_ready(server)
    first = server._registry_agent_keeper  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        for round_ in range(2):  # the successor is supervised as well
            keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
            os.kill(keeper.pid, signal.SIGKILL)
            _wait_reapable(keeper.pid, within=10)
            killed = time.monotonic()
            # gunicorn's waitpid(-1) runs first: the wrapper reaps the keeper before it.
            server.reap_workers()
            assert keeper.process.returncode == -signal.SIGKILL

            def replaced(dead: Any = keeper) -> bool:
                now = server._registry_agent_keeper  # type: ignore[attr-defined]
                return bool(now is not dead and now.state == "running")

            _loop(server, replaced, within=15)
            print(f"round {round_}: restarted {time.monotonic() - killed:.3f}s after the kill")
            assert f"keeper {keeper.pid} was killed by SIGKILL" in caplog.text
    second = server._registry_agent_keeper  # type: ignore[attr-defined]
    assert second is not first
    assert second.alive()
    assert caplog.text.count("restarted, registers orders-127.0.0.1-") == 2
    assert second.failures == 2  # two deaths in a row: the backoff grew
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        server.handle_term()
    assert not second.alive()
    assert "registry-agent: withdrawn in" in caplog.text


def test_a_stop_signal_with_the_keeper_dead_deregisters_by_a_one_shot_process(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", drain_delay=0.1)
    server = FakeServer([listening])
    registration.when_ready(server)
    keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
    os.kill(keeper.pid, signal.SIGKILL)
    _wait_reapable(keeper.pid, within=10)
    server.reap_workers()
    server.manage_workers()  # noticed dead; its successor waits for the backoff
    assert server._registry_agent_keeper is keeper  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        began = time.monotonic()
        server.handle_term()
        took = time.monotonic() - began
    print(f"one-shot withdrawal and drain: {took:.3f}s")
    assert server.calls[-1] == "term"
    assert "withdrawn in" not in caplog.text  # nothing pretends the keeper withdrew
    assert (
        f"no keeper running (was killed by SIGKILL): withdrawn orders-127.0.0.1-"
        f"{listening.getsockname()[1]} by a one-shot process in " in caplog.text
    )
    assert took < 10 + registration.deregister_timeout + 1
    server.manage_workers()  # stopped: no keeper is started again
    assert server._registry_agent_keeper is None  # type: ignore[attr-defined]


def test_the_restart_backoff_doubles_with_jitter_and_never_gives_up() -> None:
    spec = gunicorn_hooks._Spec(backend="memory://x", entries=())
    keeper = gunicorn_hooks._Keeper(subprocess.Popen([sys.executable, "-c", ""]), spec, 0.0)
    keeper.process.wait(30)
    delays = []
    for _ in range(12):
        keeper.state = "running"
        keeper.started_at = 100.0
        keeper.died(101.0)
        delays.append(keeper.retry_at - 101.0)
    bounds = [min(30.0, 0.5 * 2**i) for i in range(12)]
    assert all(b / 2 <= d <= b for d, b in zip(delays, bounds, strict=True)), delays
    assert delays[-1] >= 15.0
    # A keeper that ran a minute before dying starts the backoff over.
    keeper.state = "running"
    keeper.started_at = 0.0
    keeper.died(61.0)
    assert keeper.retry_at - 61.0 <= 0.5


def _tags(keeper: Any) -> tuple[str, ...]:
    [instance] = keeper.spec.instances()
    return tuple(instance.tags)


def test_a_sighup_with_the_keeper_dead_or_starting_never_withdraws(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeServer([listening])
    GunicornRegistration("memory://gunicorn-hooks", "orders", tags=["v1"]).when_ready(server)
    keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
    os.kill(keeper.pid, signal.SIGKILL)
    _wait_reapable(keeper.pid, within=10)
    server.reap_workers()
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        server.manage_workers()  # noticed dead: waits for the backoff
        assert keeper.state == "dead"
        keeper.retry_at = time.monotonic() + 60  # a long backoff: the SIGHUP cuts it
        # SIGHUP changing only the tags, the keeper dead: no withdrawal, restarted now
        # (gunicorn's reload runs manage_workers right after on_reload) with the new tags.
        GunicornRegistration("memory://gunicorn-hooks", "orders", tags=["v2"]).on_reload(server)
        assert server._registry_agent_keeper is keeper  # type: ignore[attr-defined]
        server.manage_workers()
        successor = server._registry_agent_keeper  # type: ignore[attr-defined]
        assert successor is not keeper
        assert successor.state == "starting"
        assert _tags(successor) == ("v2",)
        # Another SIGHUP while it starts: handed to it once started, in place.
        GunicornRegistration("memory://gunicorn-hooks", "orders", tags=["v3"]).on_reload(server)
        assert server._registry_agent_keeper is successor  # type: ignore[attr-defined]
        _loop(server, lambda: _tags(successor) == ("v3",), within=20)
        # The same config, the keeper dead again: restarted now, not withdrawn.
        os.kill(successor.pid, signal.SIGKILL)
        _wait_reapable(successor.pid, within=10)
        GunicornRegistration("memory://gunicorn-hooks", "orders", tags=["v3"]).on_reload(server)
        server.manage_workers()
        third = server._registry_agent_keeper  # type: ignore[attr-defined]
        assert third is not successor
        assert _tags(third) == ("v3",)
        assert "updated tags/meta in place" in caplog.text
        assert "one-shot" not in caplog.text
        assert "withdrawn" not in caplog.text
        _loop(server, lambda: third.state == "running", within=20)
        server.handle_term()
    assert "registry-agent: withdrawn in" in caplog.text


def _kill_once_sent(pid: int, within: float = 20.0) -> None:
    """SIGKILL stopped ``pid`` once something waits in its stdin (the update was sent)."""
    deadline = time.monotonic() + within
    while unread_input(pid) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)


def test_a_sighup_update_unanswered_is_sent_again_and_a_death_during_it_is_told(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeServer([listening])
    GunicornRegistration("memory://gunicorn-hooks", "orders", deregister_timeout=1).when_ready(
        server
    )
    keeper = server._registry_agent_keeper  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        # A hung keeper: no answer within deregister_timeout + 1 s; sent again later.
        freeze_process(keeper.pid)
        began = time.monotonic()
        GunicornRegistration(
            "memory://gunicorn-hooks", "orders", deregister_timeout=1, tags=["v2"]
        ).on_reload(server)
        assert time.monotonic() - began < 5
        assert "not updated yet: no answer from the keeper within 2s; sent again in 1s" in (
            caplog.text
        )
        os.kill(keeper.pid, signal.SIGCONT)
        _loop(server, lambda: _tags(keeper) == ("v2",), within=20)
        assert server._registry_agent_keeper is keeper  # type: ignore[attr-defined]
        # The keeper dies while updating: told as such; its successor holds the new tags.
        freeze_process(keeper.pid)
        threading.Thread(target=_kill_once_sent, args=(keeper.pid,), daemon=True).start()
        GunicornRegistration(
            "memory://gunicorn-hooks", "orders", deregister_timeout=1, tags=["v3"]
        ).on_reload(server)
        assert "the keeper was killed by SIGKILL before it answered" in caplog.text
        assert keeper.state == "dead"
        server.manage_workers()
        successor = server._registry_agent_keeper  # type: ignore[attr-defined]
        assert successor is not keeper
        assert _tags(successor) == ("v3",)
        _loop(server, lambda: successor.state == "running", within=20)
    server.handle_term()
    assert not successor.alive()


def test_a_second_stop_signal_cuts_the_drain_short(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    registration = GunicornRegistration("memory://gunicorn-hooks", "orders", drain_delay=10)
    server = FakeServer([listening])
    registration.when_ready(server)

    def later() -> None:
        server.SIG_QUEUE.put_nowait(signal.SIGCHLD)  # not a stop signal: queued again
        time.sleep(0.3)
        server.SIG_QUEUE.put_nowait(signal.SIGQUIT)

    threading.Thread(target=later, daemon=True).start()
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="test.gunicorn"):
        server.handle_term()
    took = time.monotonic() - began
    print(f"SIGTERM, then SIGQUIT during the drain: handled after {took:.3f}s")
    assert took < 5
    assert server.calls == ["quit"]  # the later signal's handler: the quick stop
    assert "SIGQUIT during the drain: cut short" in caplog.text
    assert server.SIG_QUEUE.get_nowait() == signal.SIGCHLD
