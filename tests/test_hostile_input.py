"""Hostile input, property-tested: config files and registry values.

Config: any document either loads or raises ConfigError naming where; the CLI
exits 2 with one line, never a traceback. Registry values: whatever bytes sit
under the etcd prefix and whatever JSON Consul returns, the parsers yield only
valid instances of the service asked for, or skip; they never raise.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_agent_consul import ConsulBackend
from registry_agent_etcd import EtcdBackend

from registry_agent import ConfigError, InstanceHealth, ServiceInstance
from registry_agent._agent.config import load_config, parse_config
from registry_agent._agent.status import StatusServer, json_body
from registry_agent._cli import main

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Keys the parser knows, mixed with unknown ones, so documents get deep enough.
KEYS = st.sampled_from(
    [
        "backend", "url", "token", "token_file", "user", "password", "password_file",
        "timeout", "ca_file", "cert_file", "key_file", "status", "listen", "log", "format",
        "level", "service", "name", "id", "address", "port", "tags", "meta", "ttl",
        "heartbeat", "on_unhealthy", "gate", "fall", "rise", "deregister_critical_after",
        "check", "http", "tcp", "command", "interval", "method", "expect_status", "headers",
    ]
) | st.text(max_size=12)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.sampled_from(["consul://127.0.0.1:8500", "etcd://127.0.0.1:2379", "2s", "200-399"])
    | st.datetimes()
    | st.dates()
    | st.times()
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=30,
)
DOCUMENTS = st.dictionaries(KEYS, TOML_VALUES, max_size=6)


@SETTINGS
@given(DOCUMENTS)
def test_any_document_loads_or_raises_config_error(document: dict[str, Any]) -> None:
    error: ConfigError | None = None
    try:
        config = parse_config(document, source="fuzz.toml", env={})
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert str(error).startswith("fuzz.toml")
        assert error.reason
    else:
        assert config.services


@SETTINGS
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_file_loads_or_raises_config_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(str(path))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200))
def test_the_cli_exits_2_with_one_line_for_any_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(raw)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"registry-agent: {path}")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_huge_and_deep_config_files_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    for text in ("x = " + "[" * 100_000, "x = '" + "a" * 5_000_000 + "'", "\x00"):
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_config(path, env={})


# -- registry values ---------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["orders", "127.0.0.1", "passing", "critical", "orders-1"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    *("service", "id", "address", "port", "tags", "meta", "status", "note"),
                    *("Service", "ID", "Address", "Port", "Tags", "Meta", "Checks", "Status"),
                    *("CheckID", "Output", "Node"),
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=8,
        )
    ),
    max_leaves=40,
)
VALID = {
    "service": "orders",
    "id": "orders-1",
    "address": "127.0.0.1",
    "port": 8080,
    "tags": ["a"],
    "meta": {"k": "v"},
    "status": "passing",
}


def _assert_valid(health: InstanceHealth, service: str) -> None:
    assert isinstance(health, InstanceHealth)
    instance = health.instance
    assert instance.service == service
    assert ServiceInstance.from_dict(instance.to_dict()) == instance
    json.dumps(instance.to_dict())  # always serialisable


@pytest.fixture(scope="module")
def etcd() -> EtcdBackend:
    return EtcdBackend()


@pytest.fixture(scope="module")
def consul() -> ConsulBackend:
    return ConsulBackend()


@SETTINGS
@given(
    value=st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(sorted(VALID)), JSON, max_size=7).map(
        lambda d: json.dumps({**VALID, **d}).encode()
    ),
    key_id=st.sampled_from(["orders-1", "other", "", "orders-1/extra"]),
)
def test_any_etcd_value_parses_to_a_valid_instance_or_is_skipped(
    etcd: EtcdBackend, value: bytes, key_id: str
) -> None:
    logging.getLogger("registry_agent").disabled = True
    try:
        health = etcd._parse("orders", f"/services/orders/{key_id}".encode(), value)
    finally:
        logging.getLogger("registry_agent").disabled = False
    if health is not None:
        _assert_valid(health, "orders")
        assert key_id == health.instance.id


def test_hostile_etcd_values_are_skipped(etcd: EtcdBackend) -> None:
    key = b"/services/orders/orders-1"
    good = json.dumps(VALID).encode()
    hostile = [
        b"\xff\xfe\x00garbage",  # invalid UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        json.dumps({**VALID, "meta": {"k": "v" * 2_000_000, "n": 1}}).encode(),  # huge, bad meta
        json.dumps({**VALID, "port": 70000}).encode(),
        json.dumps({**VALID, "status": "sunny"}).encode(),
        json.dumps({**VALID, "address": "a b"}).encode(),
        json.dumps({**VALID, "address": "bad\x00host"}).encode(),
        json.dumps({**VALID, "service": "billing"}).encode(),  # under the wrong service
        json.dumps({**VALID, "tags": "not-a-list"}).encode(),
        json.dumps([VALID]).encode(),
    ]
    for value in hostile:
        assert etcd._parse("orders", key, value) is None, value[:60]
    parsed = etcd._parse("orders", key, good)
    assert parsed is not None
    _assert_valid(parsed, "orders")


@SETTINGS
@given(st.lists(JSON, max_size=5) | JSON)
def test_any_consul_answer_parses_to_valid_instances_or_is_skipped(
    consul: ConsulBackend, entries: Any
) -> None:
    logging.getLogger("registry_agent").disabled = True
    try:
        found = consul._parse_entries("orders", entries)
    except TypeError:
        # Not a list at all: the HTTP layer only hands over a JSON array.
        assert not isinstance(entries, list)
        return
    finally:
        logging.getLogger("registry_agent").disabled = False
    for instance_id, health in found.items():
        _assert_valid(health, health.instance.service)
        assert instance_id == health.instance.id


def test_hostile_consul_entries_are_skipped_and_the_rest_kept(consul: ConsulBackend) -> None:
    good = {
        "Service": {"Service": "orders", "ID": "orders-1", "Address": "127.0.0.1", "Port": 1},
        "Checks": [{"CheckID": "service:orders-1", "Status": "passing"}],
    }
    hostile: list[Any] = [
        None,
        "text",
        {"Service": None},
        {"Service": {"Service": "orders", "ID": "x", "Port": "80"}},
        {"Service": {"Service": "orders", "ID": "x", "Port": 1, "Meta": {"k": 1}}},
        {"Service": {"Service": "orders", "ID": "x", "Port": 1, "Tags": [None]}},
        {**good, "Checks": [{"CheckID": "c", "Status": "sunny"}]},
        {**good, "Checks": "all good"},
        {"Service": {"Service": "orders", "ID": "y" * 10_000, "Port": 1}},
    ]
    found = consul._parse_entries("orders", [*hostile, good])
    assert list(found) == ["orders-1"]
    _assert_valid(found["orders-1"], "orders")


@given(st.text(alphabet=string.printable, max_size=20))
def test_instance_addresses_are_printable_without_spaces(address: str) -> None:
    try:
        instance = ServiceInstance("orders", address=address, port=1, id="orders-1")
    except ConfigError:
        assert not address or any(c.isspace() or not c.isprintable() for c in address)
    else:
        assert instance.address.isprintable()
        assert not any(c.isspace() for c in instance.address)


def test_dates_in_a_config_are_errors_not_crashes() -> None:
    with pytest.raises(ConfigError, match=r"backend\.url: expected a string"):
        parse_config({"backend": {"url": datetime.date(2026, 1, 1)}}, env={})


# -- the status server ---------------------------------------------------------------

ROUTES = ["/healthz", "/readyz", "/status", "/metrics"]


async def _ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


@settings(max_examples=100, deadline=None)
@given(
    method=st.text(alphabet=string.ascii_letters, min_size=1, max_size=10).filter(
        lambda m: m not in ("GET", "HEAD")
    ),
    path=st.sampled_from(ROUTES),
)
def test_the_status_server_refuses_every_method_but_get(method: str, path: str) -> None:
    async def scenario() -> bytes:
        server = StatusServer("127.0.0.1", 0, {p: lambda: json_body(200, {}) for p in ROUTES})
        await server.start()
        try:
            return await _ask(server.port, f"{method} {path} HTTP/1.1\r\n\r\n".encode())
        finally:
            await server.close()

    reply = asyncio.run(scenario())
    assert reply.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET, HEAD" in reply


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_the_status_server_survives_any_bytes(raw: bytes) -> None:
    def handler() -> tuple[int, str, bytes]:
        return json_body(200, {})

    async def scenario() -> tuple[bytes, bytes]:
        server = StatusServer("127.0.0.1", 0, dict.fromkeys(ROUTES, handler))
        await server.start()
        try:
            junk = await _ask(server.port, raw + b"\r\n\r\n")
            good = await _ask(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
            return junk, good
        finally:
            await server.close()

    junk, good = asyncio.run(scenario())
    assert not junk.startswith(b"HTTP/1.1 5")
    assert good.startswith(b"HTTP/1.1 200 ")  # still serving


def test_the_status_server_binds_loopback_unless_told_otherwise() -> None:
    base = {"backend": {"url": "consul://127.0.0.1:8500"}, "service": [{"name": "a", "port": 1}]}
    assert parse_config(base, env={}).status_listen == ("127.0.0.1", 9750)
    told = {**base, "status": {"listen": "0.0.0.0:9750"}}
    assert parse_config(told, env={}).status_listen == ("0.0.0.0", 9750)
