"""GrpcCheck without a gRPC server: construction, the agent's ``grpc =`` table, errors, no extra.

What it says about real servers (each status, TLS, gating registrations) is in
integration/test_grpc_check_real.py.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from pathlib import Path

import pytest

from registry_agent import ConfigError, GrpcCheck
from registry_agent._agent.config import load_config
from registry_agent._cli import main
from registry_agent._health.checks import CHECK_KINDS
from registry_agent.testing.servers import free_port

BARE = """
[backend]
url = "etcd://127.0.0.1:1"

[status]
listen = "off"

[[service]]
name = "orders"
port = 8080

[[service.check]]
"""

PEM_CA = """-----BEGIN CERTIFICATE-----
not a certificate
-----END CERTIFICATE-----
"""


def _config(tmp_path: Path, check: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(BARE + check + "\n")
    return path


def _error(tmp_path: Path, check: str) -> str:
    path = _config(tmp_path, check)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    return text.removeprefix(f"{path}: ")


def test_the_grpc_key_builds_a_grpc_check_with_every_option(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(_real_pem(tmp_path))
    config = load_config(
        _config(
            tmp_path,
            f'grpc = "127.0.0.1:50051"\ngrpc_service = "orders"\ntls = true\n'
            f'ca_file = "{ca}"\nserver_name = "orders.internal"\n'
            f'interval = "3s"\ntimeout = "500ms"',
        ),
        env={},
    )
    (check_config,) = config.services[0].checks
    assert check_config.kind == "grpc"
    assert check_config.name == "grpc 127.0.0.1:50051/orders"
    check = check_config.build()
    assert isinstance(check, GrpcCheck)
    assert (check.target, check.service, check.tls) == ("127.0.0.1:50051", "orders", True)
    assert (check.ca_file, check.server_name) == (str(ca), "orders.internal")
    assert (check.interval, check.timeout) == (3.0, 0.5)
    assert CHECK_KINDS["grpc"] is GrpcCheck


def test_a_tls_setting_turns_tls_on(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(_real_pem(tmp_path))
    assert GrpcCheck("h:1", ca_file=ca).tls
    assert GrpcCheck("h:1", server_name="orders").tls
    config = load_config(_config(tmp_path, f'grpc = "h:1"\nca_file = "{ca}"'), env={})
    check = config.services[0].checks[0].build()
    assert isinstance(check, GrpcCheck)
    assert (check.tls, check.ca_file) == (True, str(ca))
    assert not GrpcCheck("h:1").tls


def test_relative_tls_files_are_relative_to_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_text(_real_pem(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(_config(tmp_path, 'grpc = "h:1"\nca_file = "tls/ca.pem"'), env={})
    (check_config,) = config.services[0].checks
    check = check_config.build()  # as the agent builds it, later, wherever it runs
    assert isinstance(check, GrpcCheck)
    assert check.ca_file == str(tmp_path / "tls" / "ca.pem")
    text = _error(tmp_path, 'grpc = "h:1"\nca_file = "tls/nope.pem"')
    assert text.startswith(f"service[0].check[0].ca_file: no such file: {tmp_path}/tls/nope.pem")


def test_defaults_and_names() -> None:
    check = GrpcCheck("127.0.0.1:50051")
    assert (check.name, check.service, check.tls, check.interval, check.timeout) == (
        "grpc 127.0.0.1:50051",
        "",
        False,
        5.0,
        2.0,
    )
    assert GrpcCheck("[::1]:50051", service="users").name == "grpc [::1]:50051/users"
    assert GrpcCheck("localhost:1", name="health").name == "health"
    assert repr(GrpcCheck("localhost:1", interval=1)) == "GrpcCheck('grpc localhost:1', interval=1)"


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ('grpc = "127.0.0.1"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "127.0.0.1:0"', "service[0].check[0].grpc: expected a port 1-65535"),
        ('grpc = "127.0.0.1:70000"', "service[0].check[0].grpc: expected a port 1-65535"),
        # Digits of other scripts are digits to str.isdigit(), not to a port.
        ('grpc = "127.0.0.1:²"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "127.0.0.1:\u0665\u0660"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "127.0.0.1:\uff10\uff18\uff10"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "[127.0.0.1]:80"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "[localhost]:80"', 'service[0].check[0].grpc: expected "host:port"'),
        ('tcp = "127.0.0.1:²"', 'service[0].check[0].tcp: expected "host:port"'),
        ('tcp = "127.0.0.1:\u0665\u0660"', 'service[0].check[0].tcp: expected "host:port"'),
        ('tcp = "[127.0.0.1]:80"', 'service[0].check[0].tcp: expected "host:port"'),
        ('tcp = "::1:80"', 'service[0].check[0].tcp: expected "host:port"'),
        ('grpc = "h:1"\ntimeout = 1e10', "service[0].check[0].timeout: must be at most 86400s"),
        ('grpc = "h:1"\ninterval = 100000', "service[0].check[0].interval: must be at most 86400s"),
        ('grpc = "h:1"\nserver_name = "a b"', "service[0].check[0].server_name: expected a host"),
        ('grpc = "h:1"\nname = ""', "service[0].check[0].name: is empty"),
        ('tcp = "h:1"\nname = " "', "service[0].check[0].name: is empty"),
        ('grpc = "h:1"\nca_file = ""', "service[0].check[0].ca_file: is empty"),
        (
            'grpc = "h:1"\ncert_file = ""\nkey_file = "/x"',
            "service[0].check[0].cert_file: is empty",
        ),
        ('grpc = "::1:50051"', 'service[0].check[0].grpc: expected "host:port"'),
        ('grpc = "http://h:1"', 'service[0].check[0].grpc: expected "host:port"'),
        ("grpc = 50051", "service[0].check[0].grpc: expected a string"),
        ('grpc = "h:1"\ngrpc_service = 3', "service[0].check[0].grpc_service: expected a string"),
        ('grpc = "h:1"\ntls = "maybe"', "service[0].check[0].tls: expected true or false"),
        ('grpc = "h:1"\nservice = "x"', "service[0].check[0]: unknown key(s) service"),
        ('grpc = "h:1"\nmethod = "GET"', "service[0].check[0]: unknown key(s) method"),
        ('grpc = "h:1"\ninterval = "1ms"', "service[0].check[0].interval: must be at least"),
        ('grpc = "h:1"\ntls = true\nca_file = "/nope.pem"', "service[0].check[0].ca_file: no such"),
        (
            'grpc = "h:1"\ntls = false\nca_file = "/x"',
            "service[0].check[0].tls: is false, yet ca_file",
        ),
        ('grpc = "h:1"\ntls = false\nserver_name = "x"', "service[0].check[0].tls: is false, yet"),
        ('grpc = "h:1"\nca_file = "/nope.pem"', "service[0].check[0].ca_file: no such file"),
        ('grpc = "h:1"\ntls = true\nserver_name = ""', "service[0].check[0].server_name: expected"),
        ('grpc = "h:1"\ntls = true\ncert_file = "/etc/hostname"', "service[0].check[0]: cert_file"),
        ('grpc = "h:1"\ntcp = "h:1"', "service[0].check[0]: expected exactly one of"),
    ],
)
def test_bad_tables_are_errors_naming_the_field(tmp_path: Path, check: str, expected: str) -> None:
    assert _error(tmp_path, check).startswith(expected)


def test_good_targets_of_both_kinds(tmp_path: Path) -> None:
    assert GrpcCheck("[::1]:50051").target == "[::1]:50051"
    assert GrpcCheck("my-host.example:65535").target == "my-host.example:65535"
    for target, host, port in (("[::1]:5432", "::1", 5432), ("db.local:1", "db.local", 1)):
        config = load_config(_config(tmp_path, f'tcp = "{target}"'), env={})
        check = config.services[0].checks[0].build()
        assert (check.host, check.port) == (host, port)  # type: ignore[attr-defined]


def test_credentials_in_a_target_are_refused_with_the_password_masked(tmp_path: Path) -> None:
    for key in ("grpc", "tcp"):
        text = _error(tmp_path, f'{key} = "user:s3cret@127.0.0.1:1"')
        assert text.startswith(f"service[0].check[0].{key}: credentials (user:password@) are "), (
            text
        )
        assert "s3cret" not in text
        assert "user:***@127.0.0.1:1" in text
    with pytest.raises(ConfigError) as info:
        GrpcCheck("s3cret@127.0.0.1:1")
    assert info.value.field == "grpc"
    assert "s3cret" not in str(info.value)
    assert "***@127.0.0.1:1" in str(info.value)


def test_tls_false_with_a_tls_setting_is_refused_in_python_as_in_toml(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(_real_pem(tmp_path))
    for kwargs in ({"ca_file": ca}, {"server_name": "orders"}):
        with pytest.raises(ConfigError) as info:
            GrpcCheck("h:1", tls=False, **kwargs)  # type: ignore[arg-type]
        assert info.value.field == "tls"
        assert "(a TLS setting) is given" in str(info.value)
        assert GrpcCheck("h:1", **kwargs).tls is True  # type: ignore[arg-type]
        assert GrpcCheck("h:1", tls=True, **kwargs).tls is True  # type: ignore[arg-type]
    assert GrpcCheck("h:1").tls is False
    assert GrpcCheck("h:1", tls=False).tls is False


def test_bad_values_in_python_name_the_field() -> None:
    cases = [
        ({"target": "127.0.0.1:²"}, "grpc"),
        ({"target": "[127.0.0.1]:80"}, "grpc"),
        ({"target": "h:1", "timeout": 1e10}, "check grpc h:1: timeout"),
        ({"target": "h:1", "interval": 1e10}, "check grpc h:1: interval"),
        ({"target": "h:1", "server_name": "a b"}, "server_name"),
        ({"target": "h:1", "server_name": "-bad.example"}, "server_name"),
        ({"target": "h:1", "name": ""}, "name"),
        ({"target": "h:1", "ca_file": ""}, "ca_file"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            GrpcCheck(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field, (kwargs, info.value)
    assert GrpcCheck("h:1", server_name="::1").server_name == "::1"
    assert GrpcCheck("h:1", timeout=86400, interval=86400).timeout == 86400


def test_the_agent_silences_grpc_cores_own_log_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    path = _config(tmp_path, f'grpc = "127.0.0.1:{free_port()}"')
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    main(["check", "-c", str(path)])
    assert os.environ["GRPC_VERBOSITY"] == "NONE"
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    main(["check", "-c", str(path)])
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG", "a value of the user's own is kept"


def test_files_that_are_not_pem_are_errors_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(PEM_CA)
    text = _error(tmp_path, f'grpc = "h:1"\ntls = true\nca_file = "{bad}"')
    assert text.startswith(f"service[0].check[0].ca_file: {bad} is not a readable PEM CA bundle")
    text = _error(tmp_path, f'grpc = "h:1"\ntls = true\ncert_file = "{bad}"\nkey_file = "{bad}"')
    assert text.startswith(f"service[0].check[0].cert_file: {bad} and {bad} are not a readable")
    with pytest.raises(ConfigError) as info:
        GrpcCheck("h:1", tls=True, key_file=bad)
    assert info.value.field == "cert_file"
    assert "cert_file and key_file go together" in str(info.value)


def test_the_message_for_unknown_kinds_lists_grpc(tmp_path: Path) -> None:
    assert 'grpc = "host:port"' in _error(tmp_path, 'nope = "x"')


def test_without_the_extra_building_one_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import grpc` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(ConfigError) as info:
        GrpcCheck("127.0.0.1:50051")
    assert "pip install 'registry-agent[grpc]'" in str(info.value)
    assert info.value.field == "grpc"
    text = _error(tmp_path, 'grpc = "127.0.0.1:50051"')
    assert text.startswith("service[0].check[0].grpc: a gRPC check needs gRPC")
    assert text.endswith("pip install 'registry-agent[grpc]'")
    # The rest of the package does not need it.
    assert load_config(_config(tmp_path, 'tcp = "127.0.0.1:1"'), env={}).services


def test_a_refused_connection_fails_fast_in_grpcs_words_and_starts_no_thread() -> None:
    async def main() -> None:
        port = free_port()
        check = GrpcCheck(f"127.0.0.1:{port}", interval=0.05, timeout=1.0)
        first = await check.run()  # gRPC's own threads (if any) start with the first channel
        before = threading.active_count()
        results = [await check.run() for _ in range(10)]
        await check.aclose()
        assert threading.active_count() <= before
        for result in (first, *results):
            assert not result.ok
            assert result.detail.startswith("UNAVAILABLE: "), result.detail
            assert "Connection refused" in result.detail, result.detail
            assert result.latency < 1.0

    asyncio.run(main())


def test_a_server_that_never_speaks_is_a_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never answered
        port = listener.getsockname()[1]

        async def main() -> None:
            check = GrpcCheck(f"127.0.0.1:{port}", timeout=0.3)
            try:
                result = await check.run()
            finally:
                await check.aclose()
            assert not result.ok
            assert result.detail in (
                "no answer within 0.3s (DEADLINE_EXCEEDED)",
                "timed out after 0.3s",
            ), result.detail
            assert 0.25 < result.latency < 2.0

        asyncio.run(main())


def test_cli_check_prints_the_grpc_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    path = _config(tmp_path, f'grpc = "127.0.0.1:{port}"\ngrpc_service = "orders"')
    code = main(["check", "-c", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(line for line in out.splitlines() if "grpc 127.0.0.1" in line)
    assert line.startswith("FAIL orders-"), line
    assert f" grpc 127.0.0.1:{port}/orders " in line, line
    assert "UNAVAILABLE" in line, line
    assert "Connection refused" in line, line


def _real_pem(tmp_path: Path) -> str:
    from integration.certs import make_certs

    return Path(make_certs(tmp_path / "certs").ca).read_text()


def test_a_server_without_the_health_service_says_so() -> None:
    import grpc

    async def main() -> None:
        server = grpc.aio.server()  # a real gRPC server, in process, serving nothing
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        check = GrpcCheck(f"127.0.0.1:{port}", timeout=2.0)
        try:
            result = await check.run()
        finally:
            await check.aclose()
            await server.stop(None)
        assert (result.ok, result.detail) == (
            False,
            "the server does not serve grpc.health.v1.Health (UNIMPLEMENTED)",
        )

    asyncio.run(main())


def test_a_reload_that_fails_unexpectedly_is_refused_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Any error of the new file (a ValueError of a check's parser was one) keeps the running
    # config and says so, instead of "Task exception was never retrieved".
    import registry_agent._agent.runtime as runtime_module
    from registry_agent._agent.runtime import AgentRuntime

    runtime = AgentRuntime(load_config(_config(tmp_path, 'tcp = "127.0.0.1:1"'), env={}))

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("invalid literal for int() with base 10: '²'")

    monkeypatch.setattr(runtime_module, "load_config", broken)
    with caplog.at_level("ERROR", logger="registry_agent"):
        asyncio.run(runtime._reload_in_turn())
    record = next(r for r in caplog.records if r.getMessage().startswith("reload refused"))
    expected = "unexpected ValueError: invalid literal for int() with base 10: '²'"
    assert record.getMessage().endswith(expected)
    assert record.__dict__["error"] == expected
    assert runtime.reloads == 0
