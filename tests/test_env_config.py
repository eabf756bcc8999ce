"""Config from the environment: backends_from_env, backend=None / from_env, load_registrars.

Every variable is mapped (or refused) by name; precedence; errors name the
variable; secrets never appear in a URL's text, a repr, a status, an event or a
log line. No registry is needed: backends are built, not connected, and the
redaction tests point at a closed loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registry_agent_consul import ConsulBackend
from registry_agent_etcd import EtcdBackend

from integration.certs import CertFiles, make_certs
from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    AsyncWatcher,
    ConfigError,
    Discovery,
    EnvBackendURL,
    Registrar,
    RegistrarEvent,
    RegistrarEventKind,
    ServiceInstance,
    Watcher,
    _env,
    backends_from_env,
    load_registrars,
    open_backend,
)
from registry_agent._env import backend_tables_from_env, carried_options
from registry_agent._urls import parse_backend_url
from registry_agent.testing.memory import MemoryBackend

INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
# Fixed (not random): parametrised test ids hold it, and xdist workers must collect the same ids.
SECRET = "s3cret-5f1c0d9e7b2a4e8c9d0a1b2c3d4e5f60"


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CONSUL_", "ETCDCTL_", "REGISTRY_AGENT_")):
            monkeypatch.delenv(name)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """os.environ without any Consul, etcd or registry-agent variable."""
    _clean(monkeypatch)
    return monkeypatch


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("env-certs"))


def _error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        backends_from_env(env)
    assert info.value.source == "environment"
    return info.value


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- REGISTRY_AGENT_BACKEND -----------------------------------------------------------


def test_one_url_is_returned_as_given() -> None:
    assert backends_from_env({"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500"}) == [
        "consul://127.0.0.1:8500"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "consul://127.0.0.1:8500 etcd://10.0.0.1:2379,10.0.0.2:2379",
        "consul://127.0.0.1:8500,etcd://10.0.0.1:2379,10.0.0.2:2379",
        " consul://127.0.0.1:8500 ,\n etcd://10.0.0.1:2379,10.0.0.2:2379 , ",
    ],
)
def test_several_urls_split_on_whitespace_or_a_comma_before_a_scheme(text: str) -> None:
    # The comma inside etcd's host list stays in its URL.
    assert backends_from_env({"REGISTRY_AGENT_BACKEND": text}) == [
        "consul://127.0.0.1:8500",
        "etcd://10.0.0.1:2379,10.0.0.2:2379",
    ]


def test_a_bad_url_among_several_is_named_by_its_place() -> None:
    error = _error({"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500 etcd://x:notaport"})
    assert error.field == "REGISTRY_AGENT_BACKEND[1]"
    assert "notaport" in str(error)


def test_an_unknown_scheme_names_the_installed_backends() -> None:
    error = _error({"REGISTRY_AGENT_BACKEND": "zookeeper://127.0.0.1:2181"})
    assert error.field == "REGISTRY_AGENT_BACKEND"
    assert "consul" in error.reason
    assert "etcd" in error.reason


def test_an_option_the_backend_refuses_names_the_variable_and_the_option() -> None:
    error = _error({"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500?wait=1ms"})
    assert str(error).startswith("environment: REGISTRY_AGENT_BACKEND: wait: ")


def test_the_agents_backend_options_apply_to_one_url(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    env = {
        "REGISTRY_AGENT_BACKEND": "etcd://127.0.0.1:2379",
        "REGISTRY_AGENT_USER": "app",
        "REGISTRY_AGENT_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    (url,) = backends_from_env(env)
    assert url == "etcd://127.0.0.1:2379?user=app"
    assert isinstance(url, EnvBackendURL)
    assert url.options == {"password": SECRET}
    backend = open_backend(url)
    assert isinstance(backend, EtcdBackend)
    assert (backend._user, backend._password) == ("app", SECRET)


def test_the_agents_token_goes_beside_the_url() -> None:
    env = {"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500", "REGISTRY_AGENT_TOKEN": SECRET}
    (url,) = backends_from_env(env)
    assert SECRET not in url
    assert SECRET not in repr(url)
    backend = open_backend(url)
    assert isinstance(backend, ConsulBackend)
    assert backend._token == SECRET


def test_the_agents_options_with_several_urls_are_refused() -> None:
    error = _error(
        {
            "REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500 etcd://127.0.0.1:2379",
            "REGISTRY_AGENT_TOKEN": SECRET,
        }
    )
    assert error.field == "REGISTRY_AGENT_TOKEN"
    assert "names 2" in error.reason
    assert SECRET not in str(error)


def test_token_and_token_file_together_are_refused() -> None:
    error = _error(
        {
            "REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500",
            "REGISTRY_AGENT_TOKEN": SECRET,
            "REGISTRY_AGENT_TOKEN_FILE": "/nonexistent",
        }
    )
    assert error.field == "REGISTRY_AGENT_TOKEN_FILE"


def test_an_option_both_in_the_query_and_a_variable_is_refused() -> None:
    error = _error(
        {
            "REGISTRY_AGENT_BACKEND": "etcd://127.0.0.1:2379?user=a",
            "REGISTRY_AGENT_USER": "b",
        }
    )
    assert error.field == "REGISTRY_AGENT_USER"
    assert "also given in the URL" in error.reason


# -- precedence ----------------------------------------------------------------------


def test_registry_agent_backend_wins_over_consul_and_etcd() -> None:
    env = {
        "REGISTRY_AGENT_BACKEND": "memory://env-wins",
        "CONSUL_HTTP_ADDR": "127.0.0.1:8500",
        "ETCDCTL_ENDPOINTS": "127.0.0.1:2379",
    }
    assert backends_from_env(env) == ["memory://env-wins"]


def test_consul_and_etcd_both_set_is_an_error_naming_both() -> None:
    error = _error({"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "ETCDCTL_ENDPOINTS": "127.0.0.1:2379"})
    assert "CONSUL_HTTP_ADDR" in error.reason
    assert "ETCDCTL_ENDPOINTS" in error.reason
    assert error.field == "REGISTRY_AGENT_BACKEND"


def test_nothing_set_names_every_alternative() -> None:
    error = _error({"CONSUL_HTTP_TOKEN": SECRET, "REGISTRY_AGENT_BACKEND": "  "})
    for name in ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS"):
        assert name in str(error)
    assert SECRET not in str(error)


def test_the_process_environment_is_the_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ETCDCTL_ENDPOINTS", "127.0.0.1:2379")
    assert backends_from_env() == ["etcd://127.0.0.1:2379"]


# -- Consul's variables ------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"CONSUL_HTTP_ADDR": "127.0.0.1:8500"}, "consul://127.0.0.1:8500"),
        ({"CONSUL_HTTP_ADDR": "10.1.2.3"}, "consul://10.1.2.3"),
        ({"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500/"}, "consul://127.0.0.1:8500?scheme=http"),
        ({"CONSUL_HTTP_ADDR": "HTTPS://[::1]:8501"}, "consul://[::1]:8501?scheme=https"),
        (
            {"CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_HTTP_SSL": "true"},
            "consul://127.0.0.1:8501?scheme=https",
        ),
        (
            {"CONSUL_HTTP_ADDR": "https://127.0.0.1:8501", "CONSUL_HTTP_SSL": "false"},
            "consul://127.0.0.1:8501?scheme=https",
        ),
        (
            {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_SSL_VERIFY": "true"},
            "consul://127.0.0.1:8500",
        ),
        (
            {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN_FILE": "/run/t"},
            "consul://127.0.0.1:8500?token_file=%2Frun%2Ft",
        ),
    ],
)
def test_consul_addr_and_scheme(env: dict[str, str], url: str, tmp_path: Path) -> None:
    if "CONSUL_HTTP_TOKEN_FILE" in env:
        (tmp_path / "t").write_text(SECRET)
        env = {**env, "CONSUL_HTTP_TOKEN_FILE": "/run/t"}
        # The backend reads the file when built: give it one that exists.
        with pytest.raises(ConfigError) as info:
            backends_from_env(env)
        assert info.value.field == "CONSUL_HTTP_TOKEN_FILE"  # the variable holding it
        assert "/run/t" in info.value.reason
        env["CONSUL_HTTP_TOKEN_FILE"] = str(tmp_path / "t")
        url = url.replace("%2Frun%2Ft", str(tmp_path / "t").replace("/", "%2F"))
        (got,) = backends_from_env(env)
        assert got == url
        backend = open_backend(got)
        assert isinstance(backend, ConsulBackend)
        assert backend._token == SECRET
        return
    assert backends_from_env(env) == [url]


def test_consul_token_travels_beside_the_url_and_wins_over_the_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("from-the-file")
    env = {
        "CONSUL_HTTP_ADDR": "127.0.0.1:8500",
        "CONSUL_HTTP_TOKEN": SECRET,
        "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "t"),
    }
    (url,) = backends_from_env(env)
    assert url == "consul://127.0.0.1:8500"
    assert SECRET not in f"{url} {url!r} {[url]}"
    backend = open_backend(url)
    assert isinstance(backend, ConsulBackend)
    assert backend._token == SECRET
    assert SECRET not in repr(backend)


def test_an_explicit_keyword_wins_over_what_the_url_carries() -> None:
    (url,) = backends_from_env({"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN": "x"})
    backend = open_backend(url, token=SECRET)
    assert isinstance(backend, ConsulBackend)
    assert backend._token == SECRET


def test_consul_tls_files(certs: CertFiles) -> None:
    env = {
        "CONSUL_HTTP_ADDR": "127.0.0.1:8501",
        "CONSUL_CACERT": certs.ca,
        "CONSUL_CLIENT_CERT": certs.client_cert,
        "CONSUL_CLIENT_KEY": certs.client_key,
    }
    (url,) = backends_from_env(env)
    backend = open_backend(url)
    assert isinstance(backend, ConsulBackend)
    assert backend._scheme == "https"  # a TLS file turns https on, as the backend's own option
    assert (backend._tls.ca_file, backend._tls.cert_file, backend._tls.key_file) == (
        certs.ca,
        certs.client_cert,
        certs.client_key,
    )


def test_a_missing_consul_ca_file_is_an_error_naming_its_variable(tmp_path: Path) -> None:
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_CACERT": str(tmp_path / "nope.pem")}
    error = _error(env)
    assert error.field == "CONSUL_CACERT"
    assert "nope.pem" in error.reason


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("CONSUL_NAMESPACE", "team-a", "namespaces"),
        ("CONSUL_PARTITION", "p1", "partitions"),
        ("CONSUL_HTTP_AUTH", "u:p", "basic auth"),
        ("CONSUL_CAPATH", "/etc/ssl/certs", "CONSUL_CACERT"),
        ("CONSUL_TLS_SERVER_NAME", "consul.internal", "server name"),
        ("CONSUL_HTTP_SSL_VERIFY", "false", "not supported"),
        ("CONSUL_HTTP_SSL", "maybe", "expected true or false"),
    ],
)
def test_consul_settings_the_backend_cannot_honour_are_refused(
    name: str, value: str, words: str
) -> None:
    error = _error({"CONSUL_HTTP_ADDR": "127.0.0.1:8500", name: value})
    assert error.field == name
    assert words in error.reason
    if name == "CONSUL_HTTP_AUTH":
        assert "u:p" not in str(error)


@pytest.mark.parametrize("addr", ["unix:///var/run/consul.sock", "127.0.0.1:8500/v1", "ftp://x:1"])
def test_a_consul_addr_that_is_not_host_port_is_refused(addr: str) -> None:
    error = _error({"CONSUL_HTTP_ADDR": addr})
    assert error.field == "CONSUL_HTTP_ADDR"
    assert "host:port" in error.reason


def test_consul_variables_other_than_the_clients_are_left_alone() -> None:
    # The official image's agent variables, say: not the client's business.
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_BIND_INTERFACE": "eth0"}
    assert backends_from_env(env) == ["consul://127.0.0.1:8500"]


# -- etcd's variables --------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "url"),
    [
        ("127.0.0.1:2379", "etcd://127.0.0.1:2379"),
        ("http://10.0.0.1:2379,http://10.0.0.2:2379", "etcd://10.0.0.1:2379,10.0.0.2:2379"),
        (" 10.0.0.1:2379 , 10.0.0.2:2379, ", "etcd://10.0.0.1:2379,10.0.0.2:2379"),
        (
            "https://10.0.0.1:2379,https://10.0.0.2:2379",
            "etcd://10.0.0.1:2379,10.0.0.2:2379?tls=true",
        ),
    ],
)
def test_etcd_endpoints(endpoints: str, url: str) -> None:
    assert backends_from_env({"ETCDCTL_ENDPOINTS": endpoints}) == [url]


def test_etcd_endpoints_of_two_schemes_are_refused() -> None:
    error = _error({"ETCDCTL_ENDPOINTS": "http://10.0.0.1:2379,https://10.0.0.2:2379"})
    assert error.field == "ETCDCTL_ENDPOINTS"
    assert "one scheme" in error.reason


@pytest.mark.parametrize("endpoints", [",", "unix:///tmp/etcd.sock", "10.0.0.1:2379,10.0.0.1:2379"])
def test_bad_etcd_endpoints_are_refused(endpoints: str) -> None:
    assert _error({"ETCDCTL_ENDPOINTS": endpoints}).field == "ETCDCTL_ENDPOINTS"


@pytest.mark.parametrize(
    "credentials",
    [
        {"ETCDCTL_USER": f"app:{SECRET}"},
        {"ETCDCTL_USER": "app", "ETCDCTL_PASSWORD": SECRET},
    ],
)
def test_etcd_user_and_password(credentials: dict[str, str]) -> None:
    (url,) = backends_from_env({"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", **credentials})
    assert url == "etcd://127.0.0.1:2379?user=app"
    assert SECRET not in f"{url} {url!r}"
    backend = open_backend(url)
    assert isinstance(backend, EtcdBackend)
    assert (backend._user, backend._password) == ("app", SECRET)
    assert SECRET not in repr(backend)


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({"ETCDCTL_USER": "app:x", "ETCDCTL_PASSWORD": SECRET}, "ETCDCTL_PASSWORD"),
        ({"ETCDCTL_PASSWORD": SECRET}, "ETCDCTL_PASSWORD"),
        ({"ETCDCTL_USER": ":x"}, "ETCDCTL_USER"),
    ],
)
def test_etcd_credentials_that_do_not_fit_are_refused(
    credentials: dict[str, str], field: str
) -> None:
    error = _error({"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", **credentials})
    assert error.field == field
    assert SECRET not in str(error)


def test_etcd_tls_files(certs: CertFiles) -> None:
    env = {
        "ETCDCTL_ENDPOINTS": "https://127.0.0.1:2379",
        "ETCDCTL_CACERT": certs.ca,
        "ETCDCTL_CERT": certs.client_cert,
        "ETCDCTL_KEY": certs.client_key,
    }
    (url,) = backends_from_env(env)
    assert "tls=true" not in url  # the CA given is the trust, not the system store
    backend = open_backend(url)
    assert isinstance(backend, EtcdBackend)
    assert backend.tls
    assert backend._credentials is not None
    assert parse_backend_url(url).query == {
        "ca_file": certs.ca,
        "cert_file": certs.client_cert,
        "key_file": certs.client_key,
    }


@pytest.mark.parametrize(
    ("extra", "query"),
    [
        ({"ETCDCTL_INSECURE_TRANSPORT": "false"}, "tls=true"),
        ({"ETCDCTL_INSECURE_TRANSPORT": "true"}, ""),
        ({"ETCDCTL_INSECURE_SKIP_TLS_VERIFY": "false"}, ""),
        ({"ETCDCTL_COMMAND_TIMEOUT": "2s"}, "timeout=2s"),
        (
            {"ETCDCTL_KEEPALIVE_TIME": "10s", "ETCDCTL_KEEPALIVE_TIMEOUT": "3s"},
            "keepalive_time=10s",
        ),
        ({"ETCDCTL_API": "3", "ETCDCTL_WRITE_OUT": "json", "ETCDCTL_HEX": "false"}, ""),
    ],
)
def test_etcd_settings_the_backend_takes(extra: dict[str, str], query: str) -> None:
    (url,) = backends_from_env({"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", **extra})
    assert query in url if query else "?" not in url
    backend = open_backend(url)
    assert isinstance(backend, EtcdBackend)
    if "ETCDCTL_COMMAND_TIMEOUT" in extra:
        assert backend.timeout == 2.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ETCDCTL_INSECURE_SKIP_TLS_VERIFY", "true"),
        ("ETCDCTL_DISCOVERY_SRV", "example.com"),
        ("ETCDCTL_DIAL_TIMEOUT", "2s"),
        ("ETCDCTL_API", "2"),
        ("ETCDCTL_INSECURE_TRANSPORT", "perhaps"),
        ("ETCDCTL_COMMAND_TIMEOUT", "soon"),
    ],
)
def test_etcd_settings_the_backend_cannot_honour_are_refused(name: str, value: str) -> None:
    error = _error({"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", name: value})
    assert error.field == name  # the variable holding the bad value


def test_an_env_url_pickles_with_what_it_carries() -> None:
    (url,) = backends_from_env({"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN": SECRET})
    again = pickle.loads(pickle.dumps(url))
    assert isinstance(again, EnvBackendURL)
    assert (str(again), again.options) == (str(url), {"token": SECRET})
    plain = url + ""
    assert type(plain) is str  # a derived string carries nothing


# -- secrets written in REGISTRY_AGENT_BACKEND's URLs ----------------------------------

# Two halves of a secret: an error that showed either half would show part of it.
_HEAD, _TAIL = "hd7c41e09b2f", "tl93ab5d0e68"  # fixed, as SECRET


@pytest.mark.parametrize(
    ("text", "urls", "carried"),
    [
        (
            f"consul://127.0.0.1:8500?token={SECRET}",
            ["consul://127.0.0.1:8500"],
            [{"token": SECRET}],
        ),
        (
            f"consul://127.0.0.1:8500?dc=dc1&token={SECRET}&wait=5s",
            ["consul://127.0.0.1:8500?dc=dc1&wait=5s"],
            [{"token": SECRET}],
        ),
        (
            f"etcd://root:{SECRET}@127.0.0.1:2379",
            ["etcd://127.0.0.1:2379?user=root"],
            [{"password": SECRET}],
        ),
        (
            f"etcd://root:{SECRET}@10.0.0.1:2379,10.0.0.2:2379?prefix=/s",
            ["etcd://10.0.0.1:2379,10.0.0.2:2379?prefix=/s&user=root"],
            [{"password": SECRET}],
        ),
        (
            f"etcd://127.0.0.1:2379?user=root&password={SECRET}",
            ["etcd://127.0.0.1:2379?user=root"],
            [{"password": SECRET}],
        ),
        (  # percent-encoded: the backend gets it decoded, as from the URL itself
            f"etcd://root:{_HEAD}%2F%40%20{_TAIL}@127.0.0.1:2379",
            ["etcd://127.0.0.1:2379?user=root"],
            [{"password": f"{_HEAD}/@ {_TAIL}"}],
        ),
        (  # every URL of the list
            f"consul://127.0.0.1:8500?token={SECRET} etcd://root:{SECRET}2@127.0.0.1:2379",
            ["consul://127.0.0.1:8500", "etcd://127.0.0.1:2379?user=root"],
            [{"token": SECRET}, {"password": SECRET + "2"}],
        ),
    ],
)
def test_a_secret_written_in_the_url_moves_beside_its_text(
    text: str, urls: list[str], carried: list[dict[str, str]]
) -> None:
    found = backends_from_env({"REGISTRY_AGENT_BACKEND": text})
    assert found == urls
    assert [carried_options(url) for url in found] == carried
    for url, options in zip(found, carried, strict=True):
        assert SECRET not in f"{url} {url!r}"
        assert _HEAD not in f"{url} {url!r}"
        backend = open_backend(url)  # the backend still gets the secret
        if "token" in options:
            assert isinstance(backend, ConsulBackend)
            assert backend._token == options["token"]
        else:
            assert isinstance(backend, EtcdBackend)
            assert (backend._user, backend._password) == ("root", options["password"])
    tables = backend_tables_from_env({"REGISTRY_AGENT_BACKEND": text})
    assert (tables if isinstance(tables, list) else [tables]) == [
        {"url": url, **options} for url, options in zip(urls, carried, strict=True)
    ]


@pytest.mark.parametrize(
    "text",
    [
        # a space, '#', '?', '&' unencoded in a password: the URL does not parse
        f"consul://:{_HEAD}&x=1#frag?y=z%20 {_TAIL}@127.0.0.1:8500",
        f"etcd://root:{_HEAD} {_TAIL}@127.0.0.1:2379",
        f"etcd://root:{_HEAD}#{_TAIL}@127.0.0.1:2379",
        f"etcd://root:{_HEAD}?{_TAIL}@127.0.0.1:2379",
        f"etcd://root:12/{_HEAD}{_TAIL}@127.0.0.1:2379",  # '/': the rest read as a path
        f"etcd://root:{_HEAD}{_TAIL}@127.0.0.1:2379 etcd://x:notaport",
        f"consul://127.0.0.1:8500?token={_HEAD} {_TAIL}",
        f"{_HEAD}{_TAIL}@127.0.0.1:8500",
    ],
)
def test_a_url_that_does_not_parse_never_shows_its_secret(text: str) -> None:
    error = _error({"REGISTRY_AGENT_BACKEND": text})
    assert error.field is not None
    assert error.field.startswith("REGISTRY_AGENT_BACKEND")
    shown = f"{error} {error!r} {error.__cause__!r} {error.__context__!r}"
    assert _HEAD not in shown, shown
    assert _TAIL not in shown, shown


def test_a_parse_error_beside_a_password_still_says_what_is_wrong() -> None:
    error = _error({"REGISTRY_AGENT_BACKEND": f"etcd://root:{SECRET}@127.0.0.1:notaport"})
    assert "notaport" in error.reason
    assert SECRET not in str(error)


def test_a_consul_url_with_user_info_is_refused_without_showing_it() -> None:
    # Consul has no user:password: its token silently dropped would register anonymously.
    error = _error({"REGISTRY_AGENT_BACKEND": f"consul://:{SECRET}@127.0.0.1:8500"})
    assert error.field == "REGISTRY_AGENT_BACKEND"
    assert "password" in error.reason
    assert SECRET not in str(error)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        (
            {"REGISTRY_AGENT_BACKEND": f"etcd://root:{SECRET}@127.0.0.1:2379?user=other"},
            "REGISTRY_AGENT_BACKEND",
        ),
        (
            {"REGISTRY_AGENT_BACKEND": f"etcd://root:{SECRET}@127.0.0.1:2379?password=x"},
            "REGISTRY_AGENT_BACKEND",
        ),
        (
            {
                "REGISTRY_AGENT_BACKEND": f"etcd://root:{SECRET}@127.0.0.1:2379",
                "REGISTRY_AGENT_PASSWORD": "x",
            },
            "REGISTRY_AGENT_PASSWORD",
        ),
        (
            {
                "REGISTRY_AGENT_BACKEND": f"consul://127.0.0.1:8500?token={SECRET}",
                "REGISTRY_AGENT_TOKEN": "x",
            },
            "REGISTRY_AGENT_TOKEN",
        ),
    ],
)
def test_a_secret_given_twice_is_refused(env: dict[str, str], field: str) -> None:
    error = _error(env)
    assert error.field == field
    assert SECRET not in str(error)


def test_consul_http_addr_with_user_info_is_not_echoed() -> None:
    error = _error({"CONSUL_HTTP_ADDR": f"user:{SECRET}@127.0.0.1:8500"})
    assert error.field == "CONSUL_HTTP_ADDR"
    assert "127.0.0.1:8500" in error.reason
    assert SECRET not in str(error)


# -- errors name the variable that holds the bad value ----------------------------------


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ETCDCTL_COMMAND_TIMEOUT": "banana"}, "ETCDCTL_COMMAND_TIMEOUT"),
        ({"ETCDCTL_KEEPALIVE_TIME": "banana"}, "ETCDCTL_KEEPALIVE_TIME"),
        ({"ETCDCTL_KEEPALIVE_TIMEOUT": "banana"}, "ETCDCTL_KEEPALIVE_TIMEOUT"),
        ({"ETCDCTL_KEEPALIVE_TIMEOUT": "1ms"}, "ETCDCTL_KEEPALIVE_TIMEOUT"),
        ({"ETCDCTL_CACERT": "/nonexistent/ca.pem"}, "ETCDCTL_CACERT"),
        ({"CONSUL_CACERT": "/nonexistent/ca.pem"}, "CONSUL_CACERT"),
        ({"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/token"}, "CONSUL_HTTP_TOKEN_FILE"),
        ({"REGISTRY_AGENT_CA_FILE": "/nonexistent/ca.pem"}, "REGISTRY_AGENT_CA_FILE"),
        ({"REGISTRY_AGENT_TOKEN_FILE": "/nonexistent/token"}, "REGISTRY_AGENT_TOKEN_FILE"),
    ],
)
def test_an_error_names_the_variable_holding_the_bad_value(env: dict[str, str], field: str) -> None:
    where = field.partition("_")[0]
    base = {
        "ETCDCTL": {"ETCDCTL_ENDPOINTS": "127.0.0.1:2379"},
        "CONSUL": {"CONSUL_HTTP_ADDR": "127.0.0.1:8500"},
        "REGISTRY": {"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500"},
    }[where]
    error = _error({**base, **env})
    assert error.field == field
    assert not error.reason.startswith(("timeout:", "ca_file:", "token_file:"))


def test_an_option_in_the_url_itself_still_names_the_url_and_option() -> None:
    error = _error(
        {"REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500?ca_file=/nonexistent/ca.pem"}
    )
    assert error.field == "REGISTRY_AGENT_BACKEND"
    assert error.reason.startswith("ca_file: ")


def test_etcdctls_default_keepalive_is_raised_to_etcds_floor_once_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from registry_agent_etcd._backend import KEEPALIVE_TIME_FLOOR

    assert KEEPALIVE_TIME_FLOOR == _env.ETCD_KEEPALIVE_FLOOR
    value = f"{1000 + uuid.uuid4().int % 3000}ms"  # under 5s, not said before
    env = {"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", "ETCDCTL_KEEPALIVE_TIME": value}
    with caplog.at_level(logging.INFO, logger="registry_agent"):
        (url,) = backends_from_env(env)
        assert backends_from_env(env) == [url]
    assert "keepalive_time=5s" in url
    backend = open_backend(url)
    assert isinstance(backend, EtcdBackend)
    assert backend.keepalive_time == _env.ETCD_KEEPALIVE_FLOOR
    said = [r for r in caplog.records if "ETCDCTL_KEEPALIVE_TIME" in r.getMessage()]
    assert len(said) == 1, said  # once, not on every read
    assert said[0].levelno == logging.INFO
    assert value in said[0].getMessage()
    assert "--grpc-keepalive-min-time" in said[0].getMessage()


@pytest.mark.parametrize("value", ["5s", "30s"])
def test_an_etcdctl_keepalive_at_or_above_the_floor_is_kept(value: str) -> None:
    env = {"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", "ETCDCTL_KEEPALIVE_TIME": value}
    (url,) = backends_from_env(env)
    assert f"keepalive_time={value}" in url


# -- backend=None and the from_env constructors ---------------------------------------


def test_no_backend_given_reads_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    name = f"env-{uuid.uuid4().hex}"
    clean_env.setenv("REGISTRY_AGENT_BACKEND", f"memory://{name} memory://{name}-2")
    made: list[Any] = [
        AsyncRegistrar(None, INSTANCE),
        AsyncRegistrar.from_env(INSTANCE, ttl=3),
        AsyncWatcher(None, "orders"),
        AsyncWatcher.from_env("orders"),
        AsyncDiscovery(None),
        AsyncDiscovery.from_env(),
    ]
    for item in made:
        assert len(item.backends) == 2
        assert all(isinstance(backend, MemoryBackend) for backend in item.backends)
    assert made[1].ttl == 3


def test_the_blocking_from_env_constructors(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    clean_env.setenv("CONSUL_HTTP_TOKEN", SECRET)
    registrar = Registrar.from_env(INSTANCE)
    watcher = Watcher.from_env("orders")
    discovery = Discovery.from_env()
    try:
        backends = [registrar._async.backend, watcher._async.backends[0], discovery._async.backend]
        for backend in backends:
            assert isinstance(backend, ConsulBackend)
            assert backend._token == SECRET
        assert SECRET not in repr(registrar) + repr(watcher)
    finally:
        watcher.close()
        discovery.close()


def test_no_backend_and_nothing_in_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    for make in (
        lambda: AsyncRegistrar(None, INSTANCE),
        lambda: Registrar.from_env(INSTANCE),
        lambda: AsyncWatcher.from_env("orders"),
        lambda: Discovery.from_env(),
    ):
        with pytest.raises(ConfigError, match="REGISTRY_AGENT_BACKEND") as info:
            make()
        assert "CONSUL_HTTP_ADDR" in str(info.value)
        assert "ETCDCTL_ENDPOINTS" in str(info.value)


def test_the_registrar_owns_and_closes_backends_from_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("REGISTRY_AGENT_BACKEND", f"memory://env-{uuid.uuid4().hex}")

    async def run() -> bool:
        registrar = AsyncRegistrar.from_env(INSTANCE, ttl=1)
        await registrar.start(wait_registered=5)
        registered = registrar.registered
        await registrar.stop()
        assert all(lane.owned for lane in registrar._lanes)
        return registered

    assert asyncio.run(run())


# -- secrets never shown -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["consul", "etcd"])
async def test_a_secret_from_the_environment_is_never_shown(
    kind: str, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = _closed_port()
    if kind == "consul":
        clean_env.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{port}")
        clean_env.setenv("CONSUL_HTTP_TOKEN", SECRET)
    else:
        clean_env.setenv("ETCDCTL_ENDPOINTS", f"127.0.0.1:{port}")
        clean_env.setenv("ETCDCTL_USER", f"app:{SECRET}")
    caplog.set_level(logging.DEBUG)
    events: list[RegistrarEvent] = []
    failed = asyncio.Event()

    def seen(event: RegistrarEvent) -> None:
        events.append(event)
        if event.kind is RegistrarEventKind.BACKEND_UNAVAILABLE:
            failed.set()

    registrar = AsyncRegistrar.from_env(INSTANCE, ttl=1, on_event=seen)
    await registrar.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(failed.wait(), 10)  # the first failure comes within the TTL
    status = registrar.status()
    shown = " ".join([repr(registrar), repr(status), repr(events), caplog.text])
    await registrar.stop(timeout=2)
    assert any(e.kind is RegistrarEventKind.BACKEND_UNAVAILABLE for e in events), events
    assert f"127.0.0.1:{port}" in shown  # the backend is named...
    assert SECRET not in shown  # ...its secret is not


# -- load_registrars -----------------------------------------------------------------

SERVICES = """
[[service]]
name = "orders"
address = "127.0.0.1"
port = 8080
ttl = 5
meta = { team = "a" }
[service.gate]
rise = 1

[[service.check]]
tcp = "127.0.0.1:8080"
interval = "2s"

[[service]]
name = "billing"
address = "127.0.0.1"
port = 8081
"""


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_loader_builds_a_registrar_per_service_like_the_agent(tmp_path: Path) -> None:
    name = f"load-{uuid.uuid4().hex}"
    path = _file(tmp_path, f'[backend]\nurl = "memory://{name}"\n' + SERVICES)
    registrars = load_registrars(path, env={})
    assert [type(r) for r in registrars] == [AsyncRegistrar, AsyncRegistrar]
    orders, billing = registrars
    assert orders.instance.service == "orders"
    assert orders.instance.meta == {"team": "a"}
    assert orders.ttl == 5
    assert orders.gate.rise == 1
    assert [c.name for c in orders.checks] == ["tcp 127.0.0.1:8080"]
    assert orders.checks[0].interval == 2.0
    assert billing.instance.port == 8081
    assert billing.checks == []
    assert orders.backend is not billing.backend  # each owns its own
    assert all(lane.owned for r in registrars for lane in r._lanes)


def test_the_loaders_blocking_registrars_register(tmp_path: Path) -> None:
    name = f"load-{uuid.uuid4().hex}"
    path = _file(
        tmp_path, f'[backend]\nurl = "memory://{name}"\n' + SERVICES.split("[[service.check]]")[0]
    )
    (registrar,) = load_registrars(path, blocking=True, env={})
    assert isinstance(registrar, Registrar)
    with registrar:
        assert registrar.wait_registered(5)


def test_without_a_backend_table_the_loader_takes_the_environment(tmp_path: Path) -> None:
    name = f"load-{uuid.uuid4().hex}"
    path = _file(tmp_path, SERVICES)
    env = {"REGISTRY_AGENT_BACKEND": f"memory://{name}, memory://{name}-b"}
    for registrar in load_registrars(path, env=env):
        assert len(registrar.backends) == 2


def test_the_loader_carries_secrets_from_the_environment_beside_the_url(tmp_path: Path) -> None:
    path = _file(tmp_path, SERVICES)
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN": SECRET}
    orders, _ = load_registrars(path, env=env)
    backend = orders.backend
    assert isinstance(backend, ConsulBackend)
    assert backend._token == SECRET
    assert SECRET not in repr(orders) + repr(orders.status())


def test_the_loader_reads_the_files_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(SECRET)
    text = '[backend]\nurl = "consul://127.0.0.1:8500"\ntoken_file = "token"\n' + SERVICES
    orders, _ = load_registrars(_file(tmp_path, text), env={})
    assert isinstance(orders.backend, ConsulBackend)
    assert orders.backend._token == SECRET


def test_the_agents_overrides_apply_to_the_files_backend(tmp_path: Path) -> None:
    name = f"load-{uuid.uuid4().hex}"
    text = '[backend]\nurl = "consul://127.0.0.1:8500"\n' + SERVICES
    env = {"REGISTRY_AGENT_BACKEND": f"memory://{name}", "CONSUL_HTTP_ADDR": "10.9.9.9:8500"}
    orders, _ = load_registrars(_file(tmp_path, text), env=env)
    assert isinstance(orders.backend, MemoryBackend)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (SERVICES, {}, "agent.toml: backend: no [backend] table, and none in the environment"),
        (
            '[backend]\nurl = "memory://x"\n' + SERVICES.replace("8081", '"many"'),
            {},
            "agent.toml: service[1].port: ",
        ),
        (
            '[backend]\nurl = "consul://127.0.0.1:8500"\nwait = "1ms"\n' + SERVICES,
            {},
            "agent.toml: backend.wait: ",
        ),
        (
            '[backend]\nurl = "consul://127.0.0.1:8500"\n'
            + SERVICES.replace('team = "a"', '"consul-x" = "a"'),
            {},
            "agent.toml: service[0]",
        ),
        (SERVICES, {"ETCDCTL_ENDPOINTS": "127.0.0.1:2379", "ETCDCTL_API": "2"}, "environment: "),
        ("[[service]\n", {}, "agent.toml:1: invalid TOML"),
    ],
)
def test_loader_errors_name_the_file_and_field(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_registrars(_file(tmp_path, text), env=env)
    assert str(info.value).startswith(str(tmp_path / expected) if expected[0] == "a" else expected)


async def test_the_loader_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    name = f"load-{uuid.uuid4().hex}"
    path = _file(
        tmp_path, f'[backend]\nurl = "memory://{name}"\n' + SERVICES.split("[[service.check]]")[0]
    )
    (registrar,) = load_registrars(path, env={})
    await registrar.start(wait_registered=5)
    try:
        assert registrar.registered
    finally:
        await registrar.stop()


@pytest.fixture(autouse=True)
def _no_leaked_env() -> Iterator[None]:
    before = {k: v for k, v in os.environ.items() if k.startswith(("CONSUL_", "ETCDCTL_"))}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(("CONSUL_", "ETCDCTL_"))}
    assert before == after
