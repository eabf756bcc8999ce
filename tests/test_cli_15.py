"""The command line of issue 15: services, the environment, watch --count/--once, rate-limited
watch errors, aligned tables, check --json, init, exit codes, one-line mistakes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from registry_agent import EventType, HealthStatus, InstanceHealth, ServiceInstance, WatchEvent
from registry_agent._agent.config import load_config
from registry_agent._cli import ExitCode, _event_line, _StreamColumns, main
from registry_agent._urls import parse_backend_url
from registry_agent.testing.memory import MemoryRegistry
from registry_agent.testing.servers import free_port

ENV_NAMES = (
    "REGISTRY_AGENT_BACKEND",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "ETCDCTL_ENDPOINTS",
)


@pytest.fixture(autouse=True)
def no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own CONSUL_HTTP_ADDR must not decide what these tests read."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry() -> MemoryRegistry:
    registry = MemoryRegistry.named(f"cli15-{uuid.uuid4().hex}")
    registry.put(InstanceHealth(ServiceInstance("orders", address="10.0.0.1", port=80)), ttl=60)
    registry.put(
        InstanceHealth(
            ServiceInstance("orders", address="10.0.0.2", port=80), HealthStatus.CRITICAL
        ),
        ttl=60,
    )
    registry.put(InstanceHealth(ServiceInstance("users", address="10.0.0.3", port=81)), ttl=60)
    return registry


def shown(url: str) -> str:
    """How a table names a registry: its URL without credentials or options."""
    return parse_backend_url(url, default_port=0).redacted()


def starts(line: str) -> list[int]:
    """Where each column of a table line starts (cells hold no spaces in these tests)."""
    return [m.start() for m in re.finditer(r"\S+", line)]


def assert_aligned(lines: list[str]) -> None:
    """Every row's cells start where the header's columns start."""
    header = starts(lines[0])
    for line in lines[1:]:
        assert starts(line) == header[: len(starts(line))], (lines[0], line)


# -- services ------------------------------------------------------------------------


def test_services_lists_names_with_counts(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["services", "--backend", registry.url]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out] == [
        ["SERVICE", "INSTANCES", "HEALTHY"],
        ["orders", "2", "1"],
        ["users", "1", "1"],
    ]
    assert_aligned(out)
    assert main(["services", "--backend", registry.url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"service": "orders", "instances": 2, "healthy": 1, "backend": shown(registry.url)},
        {"service": "users", "instances": 1, "healthy": 1, "backend": shown(registry.url)},
    ]


def test_services_over_several_backends_names_the_registry(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    other = MemoryRegistry.named(f"cli15-{uuid.uuid4().hex}")
    other.put(InstanceHealth(ServiceInstance("orders", address="10.0.0.9", port=80)), ttl=60)
    assert main(["services", "--backend", registry.url, "--backend", other.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out] == [
        ["SERVICE", "REGISTRY", "INSTANCES", "HEALTHY"],
        ["orders", shown(registry.url), "2", "1"],
        ["orders", shown(other.url), "1", "1"],
        ["users", shown(registry.url), "1", "1"],
    ]
    assert_aligned(out)


def test_services_of_an_empty_registry(capsys: pytest.CaptureFixture[str]) -> None:
    empty = MemoryRegistry.named(f"cli15-{uuid.uuid4().hex}")
    assert main(["services", "--backend", empty.url]) == 0
    assert capsys.readouterr().out == "no services\n"


class _NoServices:
    """A third-party backend without the optional services()."""

    scheme = "thirdparty"

    async def close(self) -> None:
        pass


def test_services_on_a_backend_without_it_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("registry_agent._cli.open_backend", lambda url, **kw: _NoServices())
    assert main(["services", "--backend", "consul://127.0.0.1:8500"]) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "registry-agent: backend: the thirdparty backend cannot list services "
        "(it has no services() method)\n"
    )


# -- the environment ------------------------------------------------------------------


def test_backend_falls_back_to_the_environment(
    registry: MemoryRegistry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_AGENT_BACKEND", registry.url)
    assert main(["list", "users"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == [
        "users-10.0.0.3-81",
        "10.0.0.3:81",
    ]
    assert main(["services", "--json"]) == 0
    assert [json.loads(line)["service"] for line in capsys.readouterr().out.splitlines()] == [
        "orders",
        "users",
    ]
    # --backend wins over the environment.
    other = MemoryRegistry.named(f"cli15-{uuid.uuid4().hex}")
    assert main(["services", "--backend", other.url]) == 0
    assert capsys.readouterr().out == "no services\n"


def test_no_backend_anywhere_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["services"], ["list", "orders"], ["watch", "orders", "--once"]):
        assert main(argv) == ExitCode.USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert captured.err.startswith("registry-agent: ")
        assert "REGISTRY_AGENT_BACKEND" in captured.err
        assert "CONSUL_HTTP_ADDR" in captured.err


# -- watch ---------------------------------------------------------------------------


def test_watch_once_prints_the_current_instances_as_events(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert main(["watch", "orders", "users", "--backend", registry.url, "--once"]) == 0
    assert time.monotonic() - started < 5
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1:] for line in out] == [
        ["EVENT", "SERVICE", "ID", "ADDRESS", "HEALTH"],
        ["added", "orders", "orders-10.0.0.1-80", "10.0.0.1:80", "healthy"],
        ["added", "orders", "orders-10.0.0.2-80", "10.0.0.2:80", "unhealthy"],
        ["offline", "orders", "orders-10.0.0.2-80", "10.0.0.2:80", "unhealthy"],
        ["added", "users", "users-10.0.0.3-81", "10.0.0.3:81", "healthy"],
    ]
    assert_aligned(out)
    assert main(["watch", "orders", "--backend", registry.url, "--once", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["type"], e["id"], e["healthy"], e["status"]) for e in events] == [
        ("added", "orders-10.0.0.1-80", True, "passing"),
        ("added", "orders-10.0.0.2-80", False, "critical"),
        ("offline", "orders-10.0.0.2-80", False, "critical"),
    ]


def test_watch_once_on_an_unreachable_registry_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"consul://127.0.0.1:{free_port()}"
    assert main(["watch", "orders", "--backend", url, "--once", "--timeout", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("registry-agent: no registry answered within 1s: ")


@pytest.mark.timeout(30)
def test_watch_count_exits_after_n_events_and_a_deleted_row_has_no_health(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    # The current state is 3 events (2 added, 1 offline); then one added and one deleted.
    late = ServiceInstance(
        "orders", id="a-much-longer-instance-id-than-before", address="::1", port=9
    )

    def change() -> None:
        time.sleep(0.3)
        lease = registry.put(InstanceHealth(late), ttl=60)
        time.sleep(0.3)
        registry.delete("orders", late.id, lease)

    thread = threading.Thread(target=change)
    thread.start()
    try:
        assert main(["watch", "orders", "--backend", registry.url, "--count", "5"]) == 0
    finally:
        thread.join()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6  # the header and 5 events
    assert out[4].split()[1:] == ["added", "orders", late.id, "[::1]:9", "healthy"]
    assert out[5].split()[1:] == ["deleted", "orders", late.id, "[::1]:9", "-"]
    assert "unhealthy" not in out[5]
    # Every row lines up with the header; the id too long for its column pushes only the
    # address along, the health is back in its column.
    assert_aligned(out[:4])
    for line in out[4:]:
        assert len(late.id) > starts(out[0])[4] - starts(out[0])[3]
        assert [starts(line)[i] for i in (0, 1, 2, 3, 5)] == [
            starts(out[0])[i] for i in (0, 1, 2, 3, 5)
        ], (out[0], line)


def test_watch_line_of_a_deleted_instance_says_no_health() -> None:
    instance = ServiceInstance("orders", id="o1", address="10.0.0.1", port=80)
    line = _event_line(WatchEvent(EventType.DELETED, instance, healthy=False), as_json=False)
    assert line.split()[1:] == ["deleted", "orders", "o1", "10.0.0.1:80", "-"]


def _watch_dead_port(seconds: float, remind_every: float | None) -> tuple[int, str]:
    """``registry-agent watch`` on a port nobody listens on for ``seconds``, then SIGTERM."""
    patch = (
        f"import registry_agent._watcher as w; w._REPEAT_LOG_EVERY = {remind_every}; "
        if remind_every is not None
        else ""
    )
    code = (
        f"import sys; {patch}from registry_agent._cli import main; "
        f"sys.exit(main(['watch', 'orders', '--backend', 'consul://127.0.0.1:{free_port()}', "
        "'--timeout', '0.5']))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_repeated_watch_errors_are_one_line_per_episode() -> None:
    # Retries back off from 0.1 s to 2 s: about six failures in 4 s, one line.
    code, err = _watch_dead_port(4.0, None)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.match(
        r"registry-agent: watch of orders failed \(failure 1, retrying\): Consul agent at "
        r"http://127\.0\.0\.1:\d+ unreachable",
        lines[0],
    ), err


def test_a_lasting_watch_failure_is_reminded_at_the_librarys_pace() -> None:
    # The library's reminder period, shortened to 1 s: a reminder now and then, not a
    # line per retry (the failure numbers skip).
    code, err = _watch_dead_port(5.0, 1.0)
    assert code == 0, err
    numbers = [int(n) for n in re.findall(r"failed \(failure (\d+), retrying\)", err)]
    assert len(err.splitlines()) == len(numbers), err
    assert numbers[0] == 1
    assert 2 <= len(numbers) <= 5, err
    assert numbers[-1] > len(numbers), err  # some failures were not printed


# -- check --json and init -------------------------------------------------------------


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    assert main(["init", str(path), "--backend", "memory://check-json", "--port", "1"]) == 0
    capsys.readouterr()
    text = path.read_text().replace(
        'http = "http://127.0.0.1:1/healthz"', 'command = ["true"]\nname = "always"'
    )
    path.write_text(text)
    assert main(["check", "-c", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True
    assert result["ok"] is True
    assert result["failing"] == 0
    (service,) = result["services"]
    assert service["service"] == "web"
    (check,) = service["checks"]
    assert (check["name"], check["kind"], check["ok"]) == ("always", "command", True)
    assert check["latency_ms"] >= 0
    path.write_text(text.replace('command = ["true"]', 'command = ["false"]'))
    assert main(["check", "-c", str(path), "--json"]) == ExitCode.FAILED
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["failing"]) == (False, 1)
    path.write_text(text.replace("port = 1", "port = 0"))
    assert main(["check", "-c", str(path), "--json"]) == ExitCode.USAGE
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["valid"] is False
    assert result["field"] == "service[0].port"
    assert "service[0].port" in result["error"]
    assert captured.err.count("\n") == 1


def test_init_writes_a_commented_sample_the_agent_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (
        capsys.readouterr().out
        == "wrote agent.toml; check it with: registry-agent check -c agent.toml\n"
    )
    text = (tmp_path / "agent.toml").read_text()
    assert text.count("\n#") >= 5  # commented
    config = load_config(tmp_path / "agent.toml", env={})
    assert config.backend.url == "consul://127.0.0.1:8500"
    (service,) = config.services
    assert (service.instance.service, service.instance.port) == ("web", 8080)
    assert service.checks[0].kind == "http"
    # Every commented example line is valid TOML too (uncommented one at a time).
    examples = [
        line.lstrip("# ")
        for line in text.splitlines()
        if re.match(r"# (id|address|tags|meta|scheme|version|token_file) = ", line)
    ]
    assert len(examples) == 8
    for line in examples:
        tomllib.loads(line)
    # Refused when it exists, unless --force.
    (tmp_path / "agent.toml").write_text("mine")
    assert main(["init"]) == ExitCode.USAGE
    assert capsys.readouterr().err == (
        "registry-agent: agent.toml: exists; pass --force to overwrite it\n"
    )
    assert (tmp_path / "agent.toml").read_text() == "mine"
    assert main(["init", "--force", "--service", "orders", "--port", "9000"]) == 0
    (service,) = load_config(tmp_path / "agent.toml", env={}).services
    assert (service.instance.service, service.instance.port) == ("orders", 9000)


def test_init_refuses_a_bad_url_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    assert main(["init", str(path), "--backend", "consul://h:notaport"]) == ExitCode.USAGE
    assert not path.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "backend" in err
    assert "expected a port 1-65535" in err


# -- exit codes and one-line mistakes ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["list"], "list: the following arguments are required: service"),
        (["list", "orders", "--backend"], "list: argument --backend: expected one argument"),
        (["list", "a/b", "--backend", "memory://x"], "service: expected letters, digits"),
        (["list", "orders", "--backend", "ftp://h:1"], "ftp"),
        (["list", "orders", "--backend", "memory://x", "--timeout", "-1"], "expected a number > 0"),
        (["watch", "orders", "--backend", "memory://x", "--count", "x"], "expected a number > 0"),
        (["watch", "orders", "--backend", "memory://x", "--once", "--count", "2"], "not allowed"),
        (["watch", "--backend", "memory://x"], "required: service"),
        (["services", "--backend", "etcd://h:1?format=nope"], "backend.format: expected one of"),
        (["check"], "the following arguments are required: -c/--config"),
        (["check", "-c", "/nonexistent/agent.toml"], "cannot read the file"),
        (["check", "-c", "/nonexistent/agent.toml", "--json"], "cannot read the file"),
        (["run", "-c", "/nonexistent/agent.toml"], "cannot read the file"),
        (["init", "/nonexistent/dir/agent.toml"], "cannot write the file"),
        (["init", "x.toml", "--port", "70000"], "expected a port 1-65535"),
        (["init", "x.toml", "--service", "bad name"], "--service: expected letters"),
        (["run", "-c", "x", "--log-level", "loud"], "invalid choice: 'loud'"),
    ],
)
def test_every_mistake_is_one_line_and_exit_2(
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("registry-agent: "), err
    assert expected in err, err
    assert "Traceback" not in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("registry-agent ")
    assert main(["services", "--help"]) == 0
    assert "REGISTRY_AGENT_BACKEND" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "exit status: 0 ok; 1" in capsys.readouterr().out


def test_exit_codes_are_the_documented_ones() -> None:
    assert [(code.name, int(code)) for code in ExitCode] == [
        ("OK", 0),
        ("FAILED", 1),
        ("USAGE", 2),
        ("INTERRUPTED", 130),
        ("BROKEN_PIPE", 141),
    ]


# -- the reader of the output going away -------------------------------------------------


def _cli_in_a_subprocess(setup: str, argv: list[str]) -> subprocess.Popen[str]:
    """``main(argv)`` in a child whose stdout and stderr are pipes, after ``setup`` (which
    fills ``registry``, a MemoryRegistry living in that child)."""
    code = (
        "import sys, uuid\n"
        "from registry_agent import InstanceHealth, ServiceInstance\n"
        "from registry_agent._cli import main\n"
        "from registry_agent.testing.memory import MemoryRegistry\n"
        "registry = MemoryRegistry.named(f'pipe-{uuid.uuid4().hex}')\n"
        f"{setup}\n"
        f"sys.exit(main({argv!r} + ['--backend', registry.url]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_one_line_and_leave(proc: subprocess.Popen[str]) -> tuple[str, int, str]:
    """What ``… | head -1`` does: one line read, then the pipe closed."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(timeout=30)
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return first, code, err


# More output than a pipe holds (64 KiB): the command is still writing when the reader leaves.
_MANY = 3000


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("setup", "argv", "header"),
    [
        (
            f"for port in range(1, {_MANY + 1}):\n"
            "    registry.put(InstanceHealth(ServiceInstance('orders', address='10.0.0.1', "
            "port=port)), ttl=600)",
            ["list", "orders"],
            "ID",
        ),
        (
            f"for n in range({_MANY}):\n"
            "    registry.put(InstanceHealth(ServiceInstance(f'service-{n}', address='10.0.0.1', "
            "port=80)), ttl=600)",
            ["services"],
            "SERVICE",
        ),
        (
            f"for port in range(1, {_MANY + 1}):\n"
            "    registry.put(InstanceHealth(ServiceInstance('orders', address='10.0.0.1', "
            "port=port)), ttl=600)",
            ["list", "orders", "--json"],
            '{"service": "orders"',
        ),
    ],
)
def test_a_reader_going_away_ends_the_command_quietly(
    setup: str, argv: list[str], header: str
) -> None:
    first, code, err = _read_one_line_and_leave(_cli_in_a_subprocess(setup, argv))
    assert first.startswith(header), first
    assert err == ""  # was: registry-agent: unexpected BrokenPipeError: [Errno 32] Broken pipe
    assert code == 141
    assert code == ExitCode.BROKEN_PIPE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("as_json", [False, True])
def test_a_watch_waiting_for_events_notices_its_reader_going_away(as_json: bool) -> None:
    # No event comes after the current state: the watch only waits, as `tail -f` would.
    setup = (
        "registry.put(InstanceHealth(ServiceInstance('orders', address='10.0.0.1', port=80)), "
        "ttl=600)"
    )
    argv = ["watch", "orders", *(["--json"] if as_json else [])]
    proc = _cli_in_a_subprocess(setup, argv)
    started = time.monotonic()
    first, code, err = _read_one_line_and_leave(proc)
    assert first.startswith('{"type": "added"' if as_json else "TIME"), first
    assert err == ""
    assert code == ExitCode.BROKEN_PIPE
    assert time.monotonic() - started < 20


# -- watch columns ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_watch_rows_arriving_later_line_up_with_the_header(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first read: short ids and addresses. Later: a longer (ordinary) id and address,
    # a much longer id, an 'updated' and a 'deleted' event.
    longer = ServiceInstance("orders", address="192.168.100.200", port=65000)
    overflowing = ServiceInstance(
        "orders", id="an-instance-id-longer-than-its-column", address="10.0.0.9", port=9
    )

    def change() -> None:
        time.sleep(0.3)
        lease = registry.put(InstanceHealth(longer), ttl=60)
        time.sleep(0.2)
        retagged = ServiceInstance(longer.service, address=longer.address, port=65000, tags=("v2",))
        registry.put(InstanceHealth(retagged), ttl=60, lease_id=lease)
        time.sleep(0.2)
        other = registry.put(InstanceHealth(overflowing), ttl=60)
        time.sleep(0.2)
        registry.delete("orders", overflowing.id, other)

    thread = threading.Thread(target=change)
    thread.start()
    try:
        assert main(["watch", "orders", "users", "--backend", registry.url, "--count", "8"]) == 0
    finally:
        thread.join()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 9, out  # the header, 4 current, 4 later
    header = starts(out[0])
    normal = [line for line in out[1:] if overflowing.id not in line]
    assert len(normal) == 6
    for line in normal:
        assert starts(line) == header, (out[0], line)
    assert any("192.168.100.200:65000" in line for line in normal)  # wider than the first read
    assert any(line.split()[1] == "updated" for line in normal)
    # The overflowing id pushes the address only; the health is back in its column.
    assert len(overflowing.id) > header[4] - header[3]
    for line in out[1:]:
        if overflowing.id in line:
            assert [starts(line)[i] for i in (0, 1, 2, 3, 5)] == [
                header[i] for i in (0, 1, 2, 3, 5)
            ], (out[0], line)
            assert starts(line)[4] == starts(line)[3] + len(overflowing.id) + 1


def test_stream_columns_overflow_shifts_only_what_it_must() -> None:
    columns = _StreamColumns([3, 3, 3])
    assert columns.line(["a", "b", "c"]) == "a    b    c"
    assert columns.line(["aaaaaa", "b", "c"]) == "aaaaaa b  c"  # back in place at c
    assert columns.line(["aaaaaaaaaaaaa", "b", "c"]) == "aaaaaaaaaaaaa b c"  # one space at least


# -- init: credentials, stdout ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("etcd://root:s3cret-pw@127.0.0.1:2379", "password"),
        ("etcd://127.0.0.1:2379?user=root&password=s3cret-pw", "password"),
        ("consul://127.0.0.1:8500?token=s3cret-pw", "token"),
    ],
)
def test_init_refuses_a_credential_in_the_backend_url(
    url: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    for target in (str(path), "-"):
        assert main(["init", target, "--backend", url]) == ExitCode.USAGE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert captured.err.startswith("registry-agent: --backend: holds a ")
        assert "s3cret-pw" not in captured.err
        assert f"{kind}_file" in captured.err
        assert f"REGISTRY_AGENT_{kind.upper()}" in captured.err
    assert not path.exists()


def test_init_takes_a_secret_file_in_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    url = f"consul://127.0.0.1:8500?token_file={secret}"
    assert main(["init", str(path), "--backend", url]) == 0
    assert "s3cret-token" not in path.read_text()
    assert load_config(path, env={}).backend.url == url  # the file named, read at run time
    capsys.readouterr()


def test_init_dash_prints_the_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "-", "--service", "orders", "--port", "9000"]) == 0
    captured = capsys.readouterr()
    assert list(tmp_path.iterdir()) == []  # no file named "-"
    assert captured.err == ""
    assert captured.out.startswith("# agent.toml: ")
    assert "wrote" not in captured.out
    (tmp_path / "agent.toml").write_text(captured.out)
    (service,) = load_config(tmp_path / "agent.toml", env={}).services
    assert (service.instance.service, service.instance.port) == ("orders", 9000)
    # A mistake names the field, not a file "-".
    assert main(["init", "-", "--backend", "consul://h:notaport"]) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("registry-agent: backend")
    assert "expected a port 1-65535" in captured.err


# -- check: a detail on several lines ----------------------------------------------------


def test_check_table_shows_a_multi_line_detail_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.toml"
    assert main(["init", str(path), "--backend", "memory://check-lines", "--port", "1"]) == 0
    script = "printf 'first line\\nsecond\\tline\\r\\nthird\\n'; exit 3"
    text = path.read_text().replace(
        'http = "http://127.0.0.1:1/healthz"',
        f'command = {json.dumps(["sh", "-c", script])}\nname = "lines"',
    )
    path.write_text(text)
    capsys.readouterr()
    assert main(["check", "-c", str(path)]) == ExitCode.FAILED
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out  # one row, the summary
    assert out[0].startswith("FAIL ")
    assert out[0].endswith("first line ⏎ second line ⏎ third"), out[0]
    assert main(["check", "-c", str(path), "--json"]) == ExitCode.FAILED
    (check,) = json.loads(capsys.readouterr().out)["services"][0]["checks"]
    assert check["detail"] == "exit 3: first line ⏎ second line ⏎ third"  # one line everywhere
