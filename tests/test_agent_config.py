"""agent.toml: every error names the file and the field; secrets never show."""

from __future__ import annotations

import contextlib
import datetime
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from registry_agent import ConfigError, HttpCheck, open_backend
from registry_agent._agent.config import AgentConfig, load_config, parse_config
from registry_agent._agent.runtime import open_configured_backend
from registry_agent._cli import main

GOOD = """
[backend]
url = "consul://127.0.0.1:8500"

[status]
listen = "127.0.0.1:9750"

[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
tags = ["v1"]
meta = { version = "1.4.2" }
ttl = "10s"
on_unhealthy = "critical"
gate = { fall = 4, rise = 1 }

[[service.check]]
http = "http://127.0.0.1:8080/healthz"
interval = "2s"
timeout = "500ms"
expect_status = "200-299"

[[service.check]]
tcp = "127.0.0.1:8080"

[[service]]
name = "users"
port = 8081
scheme = "grpc"
version = "v2.0.1"

[[service.check]]
command = ["true"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    orders, users = config.services
    assert orders.instance.id == "orders-1"
    assert dict(orders.instance.meta) == {"version": "1.4.2"}
    assert (users.instance.scheme, users.instance.version) == ("grpc", "v2.0.1")
    assert (orders.instance.scheme, orders.instance.version) == ("", "")
    options = orders.options
    assert (options.ttl, options.fall, options.rise, str(options.on_unhealthy)) == (
        10,
        4,
        1,
        "critical",
    )
    http, tcp = orders.checks
    built = http.build()
    assert isinstance(built, HttpCheck)
    assert (http.kind, built.interval, built.timeout, built.expect_status) == (
        "http",
        2,
        0.5,
        range(200, 300),
    )
    assert (tcp.kind, tcp.target) == ("tcp", "127.0.0.1:8080")
    assert http.build().name == "http http://127.0.0.1:8080/healthz"
    assert tcp.build().name == "tcp 127.0.0.1:8080"
    assert users.checks[0].build().name == "command true"
    assert config.status_listen == ("127.0.0.1", 9750)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('interval = "2s"', 'interval = "soon"'),
            'service[0].check[0].interval: expected a duration like "2s"',
        ),
        (("port = 8081", "port = 0"), "service[1].port: expected an integer 1-65535"),
        (("port = 8081", 'port = "8081"'), "service[1].port: expected a whole number"),
        (('name = "users"', 'name = "us ers"'), "service[1].name: expected letters"),
        (('ttl = "10s"', 'ttl = "10s"\ncolour = "red"'), "service[0]: unknown key(s) colour"),
        (('interval = "2s"', 'intervall = "2s"'), "service[0].check[0]: unknown key(s) intervall"),
        (('listen = "127.0.0.1:9750"', 'listen = "9750"'), 'status.listen: expected "host:port"'),
        (
            ('on_unhealthy = "critical"', 'on_unhealthy = "panic"'),
            'service[0].on_unhealthy: expected "deregister" or "critical"',
        ),
        (("gate = { fall = 4, rise = 1 }", "gate = { fall = 0 }"), "service[0].gate.fall"),
        (
            ('tcp = "127.0.0.1:8080"', 'tcp = "localhost"'),
            'service[0].check[1].tcp: expected "host:port"',
        ),
        (
            ('command = ["true"]', 'command = "true"'),
            "service[1].check[0].command: expected a list",
        ),
        (
            ('tcp = "127.0.0.1:8080"', 'tcp = "127.0.0.1:8080"\nhttp = "http://x/"'),
            "service[0].check[1]: expected exactly one of",
        ),
        (
            ('url = "consul://127.0.0.1:8500"', 'url = "consul:/oops"'),
            "backend.url: expected a URL",
        ),
        (('id = "orders-1"', 'id = "users-127.0.0.1-8081"\nname2 = 1'), "unknown key(s) name2"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_toml_syntax_errors_give_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("port = 8080", "port = = 8080"))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    line = GOOD.splitlines().index("port = 8080") + 1
    assert str(info.value).startswith(f"{path}:{line}: invalid TOML")


def test_duplicate_ids_and_missing_pieces(tmp_path: Path) -> None:
    dup = GOOD + '\n[[service]]\nname = "orders"\nid = "orders-1"\nport = 1\n'
    with pytest.raises(ConfigError, match=r"service\[2\]\.id: same id as service\[0\]"):
        load_config(write(tmp_path, dup), env={})
    with pytest.raises(ConfigError, match="backend: is required"):
        parse_config({"service": [{"name": "a", "port": 1}]}, env={})
    with pytest.raises(ConfigError, match=r"service: expected at least one \[\[service\]\]"):
        parse_config({"backend": {"url": "consul://h:1"}}, env={})


def test_environment_overrides_and_unknown_variables(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_config(
        path,
        env={
            "REGISTRY_AGENT_BACKEND": "etcd://127.0.0.1:2379",
            "REGISTRY_AGENT_STATUS_LISTEN": "off",
            "REGISTRY_AGENT_LOG_FORMAT": "json",
            "REGISTRY_AGENT_SERVERS_BIN": "/opt/bin",  # a tool's variable, not a setting
        },
    )
    assert config.backend.url == "etcd://127.0.0.1:2379"
    assert config.status_listen is None
    assert config.log_format == "json"
    assert load_config(path, env={"REGISTRY_AGENT_LOG_LEVEL": "WARNING"}).log_level == "warning"
    with pytest.raises(ConfigError, match=r"unknown environment variable.*REGISTRY_AGENT_BACKNED"):
        load_config(path, env={"REGISTRY_AGENT_BACKNED": "etcd://h:1"})
    # A bad value from the environment names the variable, not the file's key (a
    # break-it run saw "agent.toml: log.level: …" for a file with no such key).
    for name, value, words in (
        ("REGISTRY_AGENT_LOG_LEVEL", "LOUD", "expected one of debug"),
        ("REGISTRY_AGENT_STATUS_LISTEN", "nope", 'expected "host:port"'),
        ("REGISTRY_AGENT_CA_FILE", str(tmp_path / "none.pem"), "no such file"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(path, env={name: value})
        assert str(info.value).startswith(f"environment: {name}: {words}"), info.value


def test_secrets_from_env_or_file_never_in_repr(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-secret\n")
    path = write(
        tmp_path,
        GOOD.replace(
            'url = "consul://127.0.0.1:8500"',
            'url = "consul://127.0.0.1:8500"\ntoken_file = "token"',
        ),
    )
    config = load_config(path, env={})
    assert config.backend.options()["token"] == "file-secret"
    assert "file-secret" not in repr(config)
    assert "file-secret" in config.secrets()
    env = load_config(path, env={"REGISTRY_AGENT_TOKEN": "env-secret"})
    assert env.backend.options()["token"] == "env-secret"  # the environment wins over the file
    assert env.backend.options()["token"] == "env-secret"
    assert "env-secret" not in repr(env)
    missing = write(
        tmp_path,
        GOOD.replace(
            'url = "consul://127.0.0.1:8500"',
            'url = "consul://127.0.0.1:8500"\ntoken_file = "nope"',
        ),
    )
    with pytest.raises(ConfigError, match=r"backend\.token_file: cannot read"):
        load_config(missing, env={})


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(
        tmp_path,
        GOOD.replace(
            'http = "http://127.0.0.1:8080/healthz"', 'command = ["true"]\nname = "always"'
        )
        .replace('expect_status = "200-299"', "")
        .replace('tcp = "127.0.0.1:8080"', 'command = ["sh", "-c", "exit 0"]'),
    )
    assert main(["check", "-c", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid; 2 service(s), 0 check(s) failing" in out
    bad = write(
        tmp_path,
        GOOD.replace('command = ["true"]', 'command = ["false"]')
        .replace('http = "http://127.0.0.1:8080/healthz"', 'command = ["true"]\nname = "x"')
        .replace('expect_status = "200-299"', "")
        .replace('tcp = "127.0.0.1:8080"', 'command = ["true"]'),
    )
    assert main(["check", "-c", str(bad)]) == 1
    assert "FAIL users-" in capsys.readouterr().out
    invalid = write(tmp_path, GOOD.replace("port = 8081", "port = -1"))
    assert main(["check", "-c", str(invalid)]) == 2
    err = capsys.readouterr().err
    assert "service[1].port" in err
    assert "Traceback" not in err


def test_tls_files_resolve_from_the_config_folder_and_rotation_changes_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.pem").write_bytes(_ca_pem("first CA"))
    text = GOOD.replace(
        'url = "consul://127.0.0.1:8500"', 'url = "consul://127.0.0.1:8500"\nca_file = "ca.pem"'
    )
    path = write(tmp_path, text)
    first = load_config(path, env={})
    assert first.backend.options()["ca_file"] == str(tmp_path / "ca.pem")
    assert load_config(path, env={}).backend == first.backend  # same files: nothing to redo
    (tmp_path / "ca.pem").write_bytes(_ca_pem("rotated CA"))
    assert load_config(path, env={}).backend != first.backend  # a reload reconnects
    (tmp_path / "other.pem").write_bytes(_ca_pem("other CA"))
    env = load_config(path, env={"REGISTRY_AGENT_CA_FILE": str(tmp_path / "other.pem")})
    assert env.backend.options()["ca_file"] == str(tmp_path / "other.pem")  # the environment wins


def _ca_pem(name: str) -> bytes:
    """A self-signed CA certificate in PEM: the backend reads it when the file is loaded."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_tls_file_that_is_not_pem_is_refused_when_the_file_is_loaded(tmp_path: Path) -> None:
    # The backend checks its own options (here: its CA bundle) at load time, named by field.
    (tmp_path / "ca.pem").write_text("not a certificate")
    text = GOOD.replace(
        'url = "consul://127.0.0.1:8500"', 'url = "consul://127.0.0.1:8500"\nca_file = "ca.pem"'
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: backend.ca_file: ")
    assert "not a readable PEM CA bundle" in str(info.value)


def test_a_missing_tls_file_names_the_field(tmp_path: Path) -> None:
    text = GOOD.replace(
        'url = "consul://127.0.0.1:8500"', 'url = "consul://127.0.0.1:8500"\ncert_file = "c.pem"'
    )
    with pytest.raises(ConfigError, match=r"backend\.cert_file: no such file: .*c\.pem"):
        load_config(write(tmp_path, text), env={})


def test_ttl_has_a_floor_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('ttl = "10s"', 'ttl = "1ms"'))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: service[0].ttl: must be at least 1s (etcd leases are whole seconds), got 0.001s"
    )
    assert load_config(write(tmp_path, GOOD.replace('ttl = "10s"', 'ttl = "1s"')), env={})
    assert load_config(write(tmp_path, GOOD.replace('ttl = "10s"', 'ttl = "24h"')), env={})
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace('ttl = "10s"', "ttl = 10000000000")), env={})
    assert str(info.value).endswith(
        "service[0].ttl: must be at most 86400s (a day), got 10000000000s"
    )


def test_check_refuses_what_run_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A token means nothing to etcd: `run` refuses it when it opens the backend, so must `check`.
    path = write(
        tmp_path,
        GOOD.replace(
            'url = "consul://127.0.0.1:8500"', 'url = "etcd://127.0.0.1:2379"\ntoken = "t0k"'
        )
        .replace('http = "http://127.0.0.1:8080/healthz"', 'command = ["true"]\nname = "x"')
        .replace('expect_status = "200-299"', ""),
    )
    assert main(["check", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"registry-agent: {path}: backend.token: unknown option(s) 'token' for etcd://"
    )
    assert "t0k" not in captured.err
    assert captured.err.count("\n") == 1
    assert (
        main(["check", "-c", str(write(tmp_path, GOOD.replace('ttl = "10s"', 'ttl = "0.5s"')))])
        == 2
    )
    assert "service[0].ttl: must be at least 1s" in capsys.readouterr().err


def test_status_token_from_file_or_environment(tmp_path: Path) -> None:
    (tmp_path / "st").write_text("file-status-token\n")
    path = write(tmp_path, GOOD.replace("[status]\n", '[status]\ntoken_file = "st"\n'))
    config = load_config(path, env={})
    assert config.status_token == "file-status-token"
    assert "file-status-token" not in repr(config)
    assert "file-status-token" in config.secrets()
    env = load_config(path, env={"REGISTRY_AGENT_STATUS_TOKEN": "env-status-token"})
    assert env.status_token == "env-status-token"  # the environment wins over the file
    assert load_config(write(tmp_path, GOOD), env={}).status_token is None
    both = GOOD.replace("[status]\n", '[status]\ntoken = "a"\ntoken_file = "st"\n')
    with pytest.raises(ConfigError, match=r"status\.token_file: give token or token_file"):
        load_config(write(tmp_path, both), env={})
    with pytest.raises(ConfigError, match=r"status\.token: is empty"):
        load_config(write(tmp_path, GOOD.replace("[status]\n", '[status]\ntoken = " "\n')), env={})


def test_http_check_credentials_are_secrets_and_never_in_names(tmp_path: Path) -> None:
    text = GOOD.replace(
        'http = "http://127.0.0.1:8080/healthz"',
        'http = "http://probe:pa%24%24word@127.0.0.1:8080/healthz"\n'
        'headers = { Authorization = "Bearer hdr-secret", Accept = "text/plain" }',
    )
    config = load_config(write(tmp_path, text), env={})
    secrets = config.secrets()
    assert {"pa%24%24word", "pa$$word", "Bearer hdr-secret"} <= set(secrets)
    assert "text/plain" not in secrets
    check = config.services[0].checks[0]
    name = check.build().name
    assert "pa$$word" not in name
    assert "pa%24%24word" not in name
    assert name.endswith("@127.0.0.1:8080/healthz")
    assert "pa$$word" not in repr(config)
    assert "hdr-secret" not in repr(config)


def test_command_check_env(tmp_path: Path) -> None:
    text = GOOD.replace(
        'command = ["true"]', 'command = ["true"]\nenv = { PGHOST = "db", LEVEL = "2" }'
    )
    config = load_config(write(tmp_path, text), env={})
    check = config.services[1].checks[0]
    assert check.build().env == {"PGHOST": "db", "LEVEL": "2"}  # type: ignore[attr-defined]
    bad = GOOD.replace('command = ["true"]', 'command = ["true"]\nenv = { PGPORT = 5432 }')
    with pytest.raises(
        ConfigError, match=r"service\[1\]\.check\[0\]\.env\.PGPORT: expected a string"
    ):
        load_config(write(tmp_path, bad), env={})
    http_env = GOOD.replace('tcp = "127.0.0.1:8080"', 'tcp = "127.0.0.1:8080"\nenv = { A = "b" }')
    with pytest.raises(ConfigError, match=r"service\[0\]\.check\[1\]: unknown key\(s\) env"):
        load_config(write(tmp_path, http_env), env={})


def test_heartbeat_floor_and_deregister_critical_after_left_to_the_backend(tmp_path: Path) -> None:
    fast = GOOD.replace('ttl = "10s"', 'ttl = "10s"\nheartbeat = "100ms"')
    with pytest.raises(ConfigError, match=r"service\[0\]\.heartbeat: must be at least 0\.25s"):
        load_config(write(tmp_path, fast), env={})
    config = load_config(write(tmp_path, GOOD), env={})
    # Not given: the backend's own setting applies (consul://…?deregister_critical_after=5m).
    assert config.services[0].options.deregister_critical_after is None
    given = GOOD.replace('ttl = "10s"', 'ttl = "10s"\nderegister_critical_after = "5m"')
    assert (
        load_config(write(tmp_path, given), env={}).services[0].options.deregister_critical_after
        == 300
    )


def test_check_refuses_what_the_backend_would_reject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Consul refuses a meta key with a dot: refused here, naming the service, before any request.
    text = (
        GOOD.replace('meta = { version = "1.4.2" }', 'meta = { "app.version" = "1.4.2" }')
        .replace('http = "http://127.0.0.1:8080/healthz"', 'command = ["true"]\nname = "x"')
        .replace('expect_status = "200-299"', "")
    )
    path = write(tmp_path, text)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"registry-agent: {path}: service[0]: meta.app.version: ")
    assert err.count("\n") == 1


BARE = """
[backend]
url = "{url}"
{extra}
[status]
listen = "off"

[[service]]
name = "orders"
port = 8080
"""


def _timeout_of(config: AgentConfig) -> float:
    """The call timeout of the backend ``run`` would open (opened, never connected)."""
    timeout: float = getattr(open_configured_backend(config), "timeout")  # noqa: B009
    return timeout


@pytest.mark.parametrize("scheme", ["consul", "etcd"])
def test_a_timeout_in_the_url_is_honoured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    # The README: options go in the query string or as keys; only both at once is an error.
    in_url = write(tmp_path, BARE.format(url=f"{scheme}://127.0.0.1:1?timeout=2s", extra=""))
    config = load_config(in_url, env={})
    assert "timeout" not in config.backend.options()  # the URL's own is the one sent
    assert _timeout_of(config) == 2.0
    assert main(["check", "-c", str(in_url)]) == 0
    assert "valid; 1 service(s)" in capsys.readouterr().out
    as_key = write(tmp_path, BARE.format(url=f"{scheme}://127.0.0.1:1", extra='timeout = "3s"'))
    assert _timeout_of(load_config(as_key, env={})) == 3.0
    neither = write(tmp_path, BARE.format(url=f"{scheme}://127.0.0.1:1", extra=""))
    assert _timeout_of(load_config(neither, env={})) == 5.0  # the backend's default
    both = write(
        tmp_path, BARE.format(url=f"{scheme}://127.0.0.1:1?timeout=2s", extra='timeout = "3s"')
    )
    assert main(["check", "-c", str(both)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"registry-agent: {both}: backend.timeout: also given in url (?timeout=); "
        "keep one of the two\n"
    )


def test_a_token_file_and_a_token_in_the_url_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("file-token\n")
    path = write(
        tmp_path,
        BARE.format(url="consul://127.0.0.1:1?token=url-token", extra='token_file = "tok"'),
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == "backend.token_file"
    assert "url-token" not in str(info.value)
    assert "file-token" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "field", "words"),
    [
        ("consul://127.0.0.1:1?deregister_critical_after=5s", "deregister_critical_after", "60s"),
        ("consul://127.0.0.1:1?wait=0s", "wait", "above zero"),
        ("consul://127.0.0.1:1?timeout=soon", "timeout", "duration"),
        ("etcd://127.0.0.1:1?keepalive_time=0s", "keepalive_time", "above zero"),
        ("etcd://127.0.0.1:1?max_request_bytes=-1", "max_request_bytes", "bytes"),
    ],
)
def test_a_bad_backend_option_names_its_field_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, field: str, words: str
) -> None:
    path = write(tmp_path, BARE.format(url=url, extra=""))
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"registry-agent: {path}: backend.{field}: "), err
    assert words in err
    assert "backend.backend" not in err
    assert err.count("\n") == 1
    # The library names the same field (no agent file around it).
    with pytest.raises(ConfigError) as info:
        open_backend(url)
    assert info.value.field == f"backend.{field}"


def test_backend_options_pass_through_and_the_backend_decides(tmp_path: Path) -> None:
    # No option is known to the agent: each backend's own list decides, at load time.
    etcd = load_config(
        write(
            tmp_path,
            BARE.format(url="etcd://127.0.0.1:1", extra='prefix = "/reg"\nkeepalive_time = "6s"'),
        ),
        env={},
    )
    assert etcd.backend.options() == {"prefix": "/reg", "keepalive_time": "6s"}
    consul = write(tmp_path, BARE.format(url="consul://127.0.0.1:1", extra='prefix = "/reg"'))
    with pytest.raises(ConfigError) as info:
        load_config(consul, env={})
    assert str(info.value).startswith(f"{consul}: backend.prefix: unknown option(s) 'prefix'")
    # The user of an etcd backend means nothing to Consul: refused, not dropped.
    with pytest.raises(ConfigError, match=r"^environment: REGISTRY_AGENT_USER: unknown option"):
        load_config(
            write(tmp_path, BARE.format(url="consul://127.0.0.1:1", extra="")),
            env={"REGISTRY_AGENT_USER": "alice"},
        )
    (tmp_path / "pw").write_text("etcd-secret\n")
    with_password = load_config(
        write(
            tmp_path,
            BARE.format(url="etcd://127.0.0.1:1", extra='user = "alice"\npassword_file = "pw"'),
        ),
        env={},
    )
    assert with_password.backend.options()["password"] == "etcd-secret"
    assert "etcd-secret" in with_password.secrets()
    assert "etcd-secret" not in repr(with_password)


def test_an_unknown_scheme_is_a_config_error_naming_the_url(tmp_path: Path) -> None:
    path = write(tmp_path, BARE.format(url="zookeeper://127.0.0.1:1", extra=""))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: backend.url: no backend for scheme 'zookeeper'")


def test_deregister_critical_after_floor_is_the_backends(tmp_path: Path) -> None:
    # The agent restates no backend's floor: etcd has none and takes any duration.
    text = BARE.format(url="etcd://127.0.0.1:1", extra="") + 'deregister_critical_after = "5s"\n'
    assert (
        load_config(write(tmp_path, text), env={}).services[0].options.deregister_critical_after
        == 5
    )


def test_consuls_reaping_floor_is_checked_when_the_file_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The Consul backend's own rule (validate_options), refused by `check` before anything runs.
    text = BARE.format(url="consul://127.0.0.1:1", extra="") + 'deregister_critical_after = "30s"\n'
    path = write(tmp_path, text)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"registry-agent: {path}: service[0].deregister_critical_after: "), err
    assert "Consul's floor is 60s, got 30s" in err


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ('http = "ftp://x/"', "service[0].check[0].http: expected an http:// or https:// URL"),
        ('tcp = "127.0.0.1:70000"', "service[0].check[0].tcp: expected a port 1-65535"),
        ('tcp = "h:1"\ninterval = "1ms"', "service[0].check[0].interval: must be at least 0.01s"),
        ('tcp = "h:1"\ntimeout = "1ms"', "service[0].check[0].timeout: must be at least 0.01s"),
        ('command = ["true"]\nenv = { "A=B" = "x" }', "service[0].check[0].env: expected a table"),
        ("command = []", "service[0].check[0].command: expected a list of strings like"),
        ('http = "http://x/"\nmethod = "PUT"', "service[0].check[0].method: expected one of GET"),
        ('http = "http://x/"\nexpect_status = "2xx"', "service[0].check[0].expect_status"),
        ('tcp = "h:1"\nheaders = {}', "service[0].check[0]: unknown key(s) headers"),
        ('nope = "x"', 'service[0].check[0]: expected exactly one of http = "http://…"'),
    ],
)
def test_each_check_kind_reads_its_table_errors_naming_the_field(
    tmp_path: Path, check: str, expected: str
) -> None:
    text = BARE.format(url="etcd://127.0.0.1:1", extra="") + f"\n[[service.check]]\n{check}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_a_new_check_kind_needs_no_change_to_the_config_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry_agent._health import checks
    from registry_agent._health.base import HealthCheck
    from registry_agent._urls import Table, as_str

    class DnsCheck(HealthCheck):
        kind = "dns"
        example = 'dns = "name"'

        @classmethod
        def from_table(cls, table: Table) -> HealthCheck:
            host = table.require("dns", as_str)
            return cls(f"dns {host}", **cls.common_options(table))

    monkeypatch.setattr(checks, "CHECK_KINDS", {**checks.CHECK_KINDS, "dns": DnsCheck})
    monkeypatch.setattr("registry_agent._plugins.CHECK_KINDS", checks.CHECK_KINDS)
    text = BARE.format(url="etcd://127.0.0.1:1", extra="") + (
        '\n[[service.check]]\ndns = "db.internal"\ninterval = "3s"\n'
    )
    (check,) = load_config(write(tmp_path, text), env={}).services[0].checks
    built = check.build()
    assert (check.kind, built.name, built.interval) == ("dns", "dns db.internal", 3.0)
    bad = text.replace('interval = "3s"', 'colour = "red"')
    with pytest.raises(ConfigError, match=r"service\[0\]\.check\[0\]: unknown key\(s\) colour"):
        load_config(write(tmp_path, bad), env={})


def test_two_checks_with_one_name_are_refused_by_run_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Check names are unique per registrar; the registrar says so, named by service.
    text = BARE.format(url="memory://dup-names", extra="") + (
        '\n[[service.check]]\ncommand = ["true"]\n\n[[service.check]]\ncommand = ["true"]\n'
    )
    path = write(tmp_path, text)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"registry-agent: {path}: service[0].checks: ")
    assert "unique" in err


def test_registration_options_are_the_registrars_own(tmp_path: Path) -> None:
    from registry_agent._options import RegistrationOptions

    config = load_config(write(tmp_path, GOOD), env={})
    assert config.services[1].options == RegistrationOptions()  # nothing given: its defaults
    for change, expected in [
        ("gate = { fall = 4, rise = 1 }", "gate = { rise = 0 }"),
        ('ttl = "10s"', 'ttl = "3s"\nheartbeat = "2s"'),
        ('ttl = "10s"', 'ttl = "10s"\nretry = 1'),
    ]:
        path = write(tmp_path, GOOD.replace(change, expected))
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        field = {
            "gate = { rise = 0 }": "service[0].gate.rise",
            'ttl = "3s"\nheartbeat = "2s"': "service[0].heartbeat",
            'ttl = "10s"\nretry = 1': "service[0]",
        }[expected]
        assert info.value.field == field, info.value
        assert str(info.value).startswith(f"{path}: {field}: ")


@pytest.mark.parametrize(
    ("line", "field"),
    [('scheme = "gRPC://"', "service[0].scheme"), ('version = "1 2"', "service[0].version")],
)
def test_a_bad_scheme_or_version_names_the_service_field(
    tmp_path: Path, line: str, field: str
) -> None:
    text = f"""
    [backend]
    url = "consul://127.0.0.1:8500"

    [[service]]
    name = "orders"
    port = 8080
    {line}
    """
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert caught.value.field is not None
    assert caught.value.field.endswith(field)


# -- what is read as the config file -----------------------------------------------------


def _load_all_ways(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The error each config reader gives for ``path`` (load_config, load_registrars,
    ``registry-agent check``), in a worker thread bounded in time: an unbounded read
    of /dev/zero or a FIFO's open would hang here."""
    import concurrent.futures

    from registry_agent import load_registrars

    def errors() -> list[str]:
        said: list[str] = []
        for reader in (load_config, load_registrars):
            with pytest.raises(ConfigError) as caught:
                reader(path)
            said.append(str(caught.value))
        assert main(["check", "-c", str(path)]) == 2
        said.append(capsys.readouterr().err)
        return said

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(errors).result(timeout=20)
    finally:
        pool.shutdown(wait=False)


def test_a_device_a_fifo_or_a_folder_is_not_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import time

    fifo = tmp_path / "agent.fifo"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo, tmp_path):
        started = time.monotonic()
        try:
            said = _load_all_ways(path, capsys)
        finally:
            if path == fifo:  # a writer releases a reader that would block (no fix)
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert time.monotonic() - started < 10, path
        for text in said:
            assert f"{path}: not a regular file" in text, text


def test_a_config_file_over_1_mib_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = textwrap.dedent(GOOD).encode()
    limit = 1024 * 1024
    path = tmp_path / "agent.toml"
    path.write_bytes(body + b"#" * (limit - len(body) - 1) + b"\n")  # exactly 1 MiB: read
    assert load_config(path, env={}).services[0].instance.id == "orders-1"
    path.write_bytes(body + b"#" * (limit - len(body)) + b"\n")  # one byte more
    for text in _load_all_ways(path, capsys):
        assert f"{path}: too large: a config file is at most {limit} bytes" in text, text
