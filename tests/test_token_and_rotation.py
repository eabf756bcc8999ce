"""A Consul token that cannot be a header is a ConfigError naming where it came from (never
showing it); transport errors never quote the token; set_backends() with the same URL and
other carried credentials makes a new backend; an IPv6 agent address keeps its brackets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry_agent import (
    AsyncRegistrar,
    BackendUnavailable,
    ConfigError,
    ServiceInstance,
    backends_from_env,
    open_backend,
)

ENV_NAMES = (
    "REGISTRY_AGENT_BACKEND",
    "REGISTRY_AGENT_TOKEN",
    "REGISTRY_AGENT_TOKEN_FILE",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "ETCDCTL_ENDPOINTS",
)
URL = "consul://127.0.0.1:1"
# Fixed strings (parametrised ids hold them; xdist workers must collect the same ids).
BAD_TOKENS = {
    "line-break": "SECRETX\nabc",
    "header-injection": "SECRETX\r\nX-Evil: 1",
    "non-ascii": "SECRETX\u00e9",
    "inner-space": "SECRETX abc",
    "control": "SECRETX\x01",
}


@pytest.fixture(autouse=True)
def no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def _file(tmp_path: Path, token: str) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return str(path)


def _keyword(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    return open_backend(URL, token=token)


def _keyword_file(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    return open_backend(URL, token_file=_file(tmp_path, token))


def _consul_var(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    mp.setenv("CONSUL_HTTP_TOKEN", token)
    return open_backend(URL)


def _consul_var_file(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    mp.setenv("CONSUL_HTTP_TOKEN_FILE", _file(tmp_path, token))
    return open_backend(URL)


def _env_consul(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    return backends_from_env({"CONSUL_HTTP_ADDR": "127.0.0.1:1", "CONSUL_HTTP_TOKEN": token})


def _env_consul_file(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:1", "CONSUL_HTTP_TOKEN_FILE": _file(tmp_path, token)}
    return backends_from_env(env)


def _env_own(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    return backends_from_env({"REGISTRY_AGENT_BACKEND": URL, "REGISTRY_AGENT_TOKEN": token})


def _env_own_file(token: str, tmp_path: Path, mp: pytest.MonkeyPatch) -> Any:
    env = {"REGISTRY_AGENT_BACKEND": URL, "REGISTRY_AGENT_TOKEN_FILE": _file(tmp_path, token)}
    return backends_from_env(env)


# How the token is given, and the field the error names.
SOURCES: dict[str, tuple[Callable[[str, Path, pytest.MonkeyPatch], Any], str]] = {
    "token=": (_keyword, "backend.token"),
    "token_file=": (_keyword_file, "backend.token_file"),
    "CONSUL_HTTP_TOKEN": (_consul_var, "CONSUL_HTTP_TOKEN"),
    "CONSUL_HTTP_TOKEN_FILE": (_consul_var_file, "CONSUL_HTTP_TOKEN_FILE"),
    "env CONSUL_HTTP_TOKEN": (_env_consul, "CONSUL_HTTP_TOKEN"),
    "env CONSUL_HTTP_TOKEN_FILE": (_env_consul_file, "CONSUL_HTTP_TOKEN_FILE"),
    "REGISTRY_AGENT_TOKEN": (_env_own, "REGISTRY_AGENT_TOKEN"),
    "REGISTRY_AGENT_TOKEN_FILE": (_env_own_file, "REGISTRY_AGENT_TOKEN_FILE"),
}


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_token_that_cannot_be_a_header_is_refused_by_name(
    source: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = BAD_TOKENS[kind]
    make, field = SOURCES[source]
    with pytest.raises(ConfigError) as caught:
        make(token, tmp_path, monkeypatch)
    assert caught.value.field == field
    assert "visible ASCII" in caught.value.reason
    shown = f"{caught.value} {caught.value!r} {caught.value.__context__!r}"
    assert "SECRETX" not in shown


def test_a_token_in_the_url_query_is_refused_by_name() -> None:
    env = {"REGISTRY_AGENT_BACKEND": f"{URL}?token=SECRETX%0Aabc"}
    with pytest.raises(ConfigError) as caught:
        backends_from_env(env)
    assert caught.value.field == "REGISTRY_AGENT_BACKEND"
    assert "token" in caught.value.reason
    assert "SECRETX" not in str(caught.value)


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_good_token_is_taken_with_its_trailing_newline_stripped(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "0b6d6f0e-2c1a-4c5e-9a55-3f1e8a9d7c21"
    made = SOURCES[source][0](token + "\n", tmp_path, monkeypatch)
    if isinstance(made, list):  # backends_from_env: the URL carries it (or its file)
        made = open_backend(made[0])
    assert made._token == token


async def test_transport_errors_never_quote_the_token() -> None:
    backend: Any = open_backend("consul://[::1]:1", token="tok-SECRETX")

    async def fails(exc: Exception) -> None:
        raise exc

    header = "Illegal header value b'tok-SECRETX'"
    for error in (httpx.LocalProtocolError(header), httpx.ConnectError(header)):
        with pytest.raises(BackendUnavailable) as caught:
            await backend._call(fails(error))
        assert "SECRETX" not in str(caught.value)
        assert "***" in str(caught.value)
        # An IPv6 agent address keeps its brackets.
        assert "http://[::1]:1" in str(caught.value)
    assert repr(backend) == "ConsulBackend(http://[::1]:1)"
    await backend.close()


async def test_set_backends_with_other_carried_credentials_makes_a_new_backend() -> None:
    old = backends_from_env({"REGISTRY_AGENT_BACKEND": URL, "REGISTRY_AGENT_TOKEN": "old-token"})
    new = backends_from_env({"REGISTRY_AGENT_BACKEND": URL, "REGISTRY_AGENT_TOKEN": "new-token"})
    assert old == new  # the same text: only the carried options differ
    registrar = AsyncRegistrar(old, ServiceInstance("t11", address="127.0.0.1", port=9800))
    before: Any = registrar._lanes[0].backend
    await registrar.set_backends(new)
    after: Any = registrar._lanes[0].backend
    assert after is not before
    assert after._token == "new-token"
    # The same URL with the same carried options keeps its lane.
    same = backends_from_env({"REGISTRY_AGENT_BACKEND": URL, "REGISTRY_AGENT_TOKEN": "new-token"})
    await registrar.set_backends(same)
    assert registrar._lanes[0].backend is after
    await registrar.stop()
