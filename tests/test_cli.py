"""The command line: output and exit codes."""

import json
import time
import uuid
from typing import ClassVar

import pytest

from registry_agent import (
    BackendUnavailable,
    EventType,
    HealthStatus,
    InstanceHealth,
    ServiceInstance,
    WatchEvent,
)
from registry_agent._cli import _event_line, main
from registry_agent.testing.memory import MemoryRegistry
from registry_agent.testing.servers import free_port


@pytest.fixture
def registry() -> MemoryRegistry:
    registry = MemoryRegistry.named(f"cli-{uuid.uuid4().hex}")
    registry.put(InstanceHealth(ServiceInstance("orders", address="10.0.0.1", port=80)), ttl=60)
    registry.put(
        InstanceHealth(
            ServiceInstance("orders", address="10.0.0.2", port=80, tags=("v2",)),
            HealthStatus.CRITICAL,
        ),
        ttl=60,
    )
    return registry


def test_list_table(registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "orders", "--backend", registry.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "ADDRESS", "STATUS", "TAGS"]
    assert out[1].split() == ["orders-10.0.0.1-80", "10.0.0.1:80", "passing"]
    assert out[2].split() == ["orders-10.0.0.2-80", "10.0.0.2:80", "critical", "v2"]


def test_list_table_shows_nodes_when_known(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    on_b = ServiceInstance("orders", id="orders-8080", address="10.0.0.3", port=8080, node="b")
    registry.put(InstanceHealth(on_b), ttl=60)
    assert main(["list", "orders", "--backend", registry.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "NODE", "ADDRESS", "STATUS", "TAGS"]
    assert out[1].split() == ["orders-10.0.0.1-80", "-", "10.0.0.1:80", "passing"]
    assert out[2].split() == ["orders-10.0.0.2-80", "-", "10.0.0.2:80", "critical", "v2"]
    assert out[3].split() == ["orders-8080", "b", "10.0.0.3:8080", "passing"]
    assert main(["list", "orders", "--backend", registry.url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("node") for r in rows] == [None, None, "b"]


def test_list_shows_scheme_and_version_when_known(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    grpc = ServiceInstance("orders", address="10.0.0.4", port=9000, scheme="grpc", version="v2")
    registry.put(InstanceHealth(grpc), ttl=60)
    assert main(["list", "orders", "--backend", registry.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "ADDRESS", "VERSION", "STATUS", "TAGS"]
    assert out[1].split() == ["orders-10.0.0.1-80", "10.0.0.1:80", "-", "passing"]
    assert out[3].split() == ["orders-10.0.0.4-9000", "grpc://10.0.0.4:9000", "v2", "passing"]
    assert main(["list", "orders", "--backend", registry.url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (rows[2]["scheme"], rows[2]["version"]) == ("grpc", "v2")
    assert "scheme" not in rows[0]


def test_list_brackets_ipv6_addresses(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.put(
        InstanceHealth(ServiceInstance("orders", id="v6", address="::1", port=9000)), ttl=60
    )
    foreign = ServiceInstance.from_registry(
        service="orders", id="w-noport", address="fe80::1", port=0
    )
    registry.put(InstanceHealth(foreign), ttl=60)
    assert main(["list", "orders", "--backend", registry.url]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["v6"][1] == "[::1]:9000"  # "::1:9000" would read as another address
    assert rows["w-noport"][1] == "fe80::1"  # no port (another tool's entry): the address alone
    assert rows["orders-10.0.0.1-80"][1] == "10.0.0.1:80"


def test_watch_lines_bracket_ipv6_addresses() -> None:
    instance = ServiceInstance("orders", id="v6", address="2001:db8::7", port=9000)
    line = _event_line(WatchEvent(EventType.ADDED, instance, healthy=True), as_json=False)
    assert line.split()[1:] == ["added", "orders", "v6", "[2001:db8::7]:9000", "healthy"]


def test_list_json(registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "orders", "--backend", registry.url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["healthy"]) for r in rows] == [
        ("orders-10.0.0.1-80", True),
        ("orders-10.0.0.2-80", False),
    ]


def test_list_empty(registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "users", "--backend", registry.url]) == 0
    assert capsys.readouterr().out == "no instances of users\n"


def test_bad_url_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "orders", "--backend", "consul://h:notaport"]) == 2
    err = capsys.readouterr().err
    assert "backend: expected a port 1-65535" in err
    assert "Traceback" not in err


def test_unreachable_registry_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"consul://127.0.0.1:{free_port()}"
    assert main(["list", "orders", "--backend", url, "--timeout", "1"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    assert capsys.readouterr().out.split() == ["consul", "etcd", "memory"]


class _Broken:
    """A backend whose client library fails in a way nobody mapped."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def list(self, service: str) -> None:
        raise self.exc

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            AttributeError("module 'consul' has no attribute 'ConsulException'"),
            "registry-agent: unexpected AttributeError: module 'consul' has no attribute "
            "'ConsulException'",
        ),
        (
            BackendUnavailable("HTTP 500: No cluster leader\n", backend="consul"),
            "registry-agent: HTTP 500: No cluster leader (backend=consul)",
        ),
        (ValueError(""), "registry-agent: unexpected ValueError: ValueError"),
    ],
)
def test_any_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    expected: str,
) -> None:
    monkeypatch.setattr("registry_agent._cli.open_backend", lambda url, **kw: _Broken(exc))
    assert main(["list", "orders", "--backend", "consul://127.0.0.1:8500"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == expected + "\n"


def test_a_failure_never_echoes_the_url_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "s3cr3t-t0ken"
    password = "pa55w0rd-x"
    url = f"etcd://alice:{password}@127.0.0.1:2379?token={secret}&password={password}"
    monkeypatch.setattr(
        "registry_agent._cli.open_backend",
        lambda url, **kw: _Broken(RuntimeError(f"GET {url} failed")),
    )
    assert main(["list", "orders", "--backend", url]) == 1
    err = capsys.readouterr().err
    assert secret not in err
    assert password not in err
    assert err.count("\n") == 1
    assert "token=***" in err
    assert "alice:***@" in err


def test_a_watch_that_fails_prints_one_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Failing:
        services = ("orders",)
        _index: ClassVar[dict[str, int]] = {}

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def wait_synced(self, timeout: float | None = None) -> bool:
            return True

        def snapshot(self, service: str | None = None) -> list[InstanceHealth]:
            return []

        def __aiter__(self) -> "Failing":
            return self

        async def __anext__(self) -> None:
            raise KeyError("no such index")

        async def close(self) -> None:
            pass

    monkeypatch.setattr("registry_agent._cli.AsyncWatcher", Failing)
    monkeypatch.setattr("registry_agent._cli.open_backend", lambda url, **kw: _Broken(ValueError()))
    assert main(["watch", "orders", "--backend", "consul://127.0.0.1:8500", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "registry-agent: unexpected KeyError: 'no such index'\n"


def test_watch_json_is_the_events_own_shape_stamped() -> None:
    instance = ServiceInstance("orders", id="o1", address="10.0.0.1", port=80, tags=("v1",))
    event = WatchEvent(EventType.ADDED, instance, healthy=True, index=7)
    line = json.loads(_event_line(event, as_json=True))
    stamp = line.pop("ts")
    assert abs(stamp - time.time()) < 60
    assert line == event.to_dict()
    assert (line["type"], line["id"], line["tags"], line["index"]) == ("added", "o1", ["v1"], 7)


def test_list_over_several_backends_is_one_merged_view(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    other = MemoryRegistry.named(f"cli-{uuid.uuid4().hex}")
    # The same endpoint under another id (as a peer's format would hold it), and a new one.
    other.put(InstanceHealth(ServiceInstance("orders", id="o-1", address="10.0.0.1", port=80)), 60)
    other.put(InstanceHealth(ServiceInstance("orders", address="10.0.0.9", port=80)), ttl=60)
    args = ["list", "orders", "--backend", registry.url, "--backend", other.url]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "ADDRESS", "STATUS", "TAGS"]
    assert [line.split()[1] for line in out[1:]] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"]
    assert out[1].split()[0] == "orders-10.0.0.1-80"  # shown from the first backend listed


def test_a_bad_backend_among_several_is_named_by_its_place(
    registry: MemoryRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["list", "orders", "--backend", registry.url, "--backend", "etcd://h:1?format=nope"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("registry-agent: backend[1].format: expected one of")
