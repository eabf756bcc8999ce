"""Consul with ACLs (default deny) and over TLS: real agents, tokens and certificates."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.acl import AclConsul
from integration.agent_process import ONE_SERVICE, Agent
from integration.certs import CertFiles, make_certs
from registry_agent import (
    AsyncRegistrar,
    BackendUnavailable,
    ConfigError,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.servers import ConsulServer

ORDERS = ServiceInstance("orders", address="127.0.0.1", port=8080)
BILLING = ServiceInstance("billing", address="127.0.0.1", port=8081)


@pytest.fixture
def tls_consul(certs: CertFiles) -> Iterator[ConsulServer]:
    server = ConsulServer(tls=certs.server_tls())
    server.start()
    try:
        yield server
    finally:
        server.close()


# -- ACLs ----------------------------------------------------------------------------


async def test_the_right_token_registers_and_heartbeats(acl: AclConsul) -> None:
    reg = AsyncRegistrar(open_backend(acl.server.url, token=acl.token), ORDERS, ttl=3)
    await reg.start(wait_registered=10)
    try:
        await asyncio.sleep(2.5)  # a few heartbeats, each needing service:write
        assert ORDERS.id in acl.services()
        assert reg.counters.errors == 0
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
    assert ORDERS.id not in acl.services()  # deregistering is allowed too


@pytest.mark.parametrize("how", ["env", "token_file", "env_file"])
async def test_the_token_comes_from_env_or_a_file(
    acl: AclConsul, how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text(acl.token + "\n")
    options: dict[str, str] = {}
    if how == "env":
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", acl.token)
    elif how == "env_file":
        monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(path))
    else:
        options["token_file"] = str(path)
    backend = open_backend(acl.server.url, **options)
    try:
        await backend.register(ORDERS, ttl=5)
    finally:
        await backend.close()
    assert ORDERS.id in acl.services()


async def test_an_explicit_token_wins_over_the_environment(
    acl: AclConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "not-the-token")
    backend = open_backend(acl.server.url, token=acl.token)
    try:
        await backend.register(ORDERS, ttl=5)
    finally:
        await backend.close()
    assert ORDERS.id in acl.services()


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (None, "no ACL token was given"),
        ("11111111-2222-3333-4444-555555555555", "does not know this ACL token"),
    ],
)
async def test_no_or_a_wrong_token_is_permission_denied_for_the_service(
    acl: AclConsul, token: str | None, why: str
) -> None:
    backend = open_backend(acl.server.url, **({"token": token} if token else {}))
    try:
        with pytest.raises(Rejected) as caught:
            await backend.register(ORDERS, ttl=5)
    finally:
        await backend.close()
    message = str(caught.value)
    assert "permission denied for service 'orders'" in message
    assert why in message
    assert token is None or token not in message
    assert acl.services() == set()


async def test_the_token_cannot_register_outside_its_policy(acl: AclConsul) -> None:
    backend = open_backend(acl.server.url, token=acl.token)
    try:
        with pytest.raises(Rejected, match="permission denied for service 'billing'"):
            await backend.register(BILLING, ttl=5)
    finally:
        await backend.close()
    assert acl.services() == set()


async def test_a_denied_registrar_keeps_retrying_without_log_spam(
    acl: AclConsul, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry_agent")
    reg = AsyncRegistrar(
        open_backend(acl.server.url, token="00000000-0000-0000-0000-000000000000"),
        ORDERS,
        ttl=3,
        retry=RetryPolicy(initial=0.05, cap=0.2),
    )
    await reg.start()
    try:
        await asyncio.sleep(3)
        assert reg.counters.errors >= 5  # it kept trying (never gives up)
        assert ORDERS.id not in acl.services()
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(failures) <= 2, [r.getMessage() for r in failures]
    assert "permission denied for service 'orders'" in failures[0].getMessage()
    assert failures[0].levelno == logging.ERROR  # a refusal, not an outage


async def test_the_token_travels_in_a_header_never_in_a_url(
    acl: AclConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[httpx.Request] = []
    real_send = httpx.AsyncClient.send

    async def spy(self: httpx.AsyncClient, request: httpx.Request, **kwargs: object) -> object:
        sent.append(request)
        return await real_send(self, request, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx.AsyncClient, "send", spy)
    backend = open_backend(acl.server.url, token=acl.token)
    try:
        lease = await backend.register(ORDERS, ttl=5)
        await backend.heartbeat(lease)
        await backend.list("orders")
        await backend.deregister(lease)
    finally:
        await backend.close()
    assert len(sent) >= 4
    for request in sent:
        assert acl.token not in str(request.url)
        assert request.headers["X-Consul-Token"] == acl.token


# -- TLS -----------------------------------------------------------------------------


async def test_tls_with_the_ca_and_a_client_certificate(
    tls_consul: ConsulServer, certs: CertFiles
) -> None:
    reg = AsyncRegistrar(open_backend(tls_consul.url, **certs.client_options()), ORDERS, ttl=3)
    await reg.start(wait_registered=10)
    try:
        snapshot = await reg.backend.list("orders")
        assert list(snapshot.instances) == [ORDERS.id]
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


async def test_tls_files_from_consuls_own_variables(
    tls_consul: ConsulServer, certs: CertFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_CACERT", certs.ca)
    monkeypatch.setenv("CONSUL_CLIENT_CERT", certs.client_cert)
    monkeypatch.setenv("CONSUL_CLIENT_KEY", certs.client_key)
    backend = open_backend(tls_consul.url)
    try:
        assert (await backend.list("orders")).instances == {}
    finally:
        await backend.close()


async def test_a_wrong_ca_is_a_clear_tls_error_not_a_hang(
    tls_consul: ConsulServer, certs: CertFiles, tmp_path: Path
) -> None:
    wrong = make_certs(tmp_path, "wrong")
    backend = open_backend(
        tls_consul.url,
        ca_file=wrong.ca,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        timeout=5,
    )
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.list("orders")
    finally:
        await backend.close()
    assert time.monotonic() - started < 2.0
    assert "TLS with Consul agent at https://127.0.0.1" in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


async def test_no_client_certificate_is_refused_clearly(
    tls_consul: ConsulServer, certs: CertFiles
) -> None:
    backend = open_backend(tls_consul.url, ca_file=certs.ca, timeout=5)
    try:
        with pytest.raises(BackendUnavailable, match="TLS with Consul agent"):
            await backend.list("orders")
    finally:
        await backend.close()


async def test_plain_http_to_a_tls_agent_fails_fast(tls_consul: ConsulServer) -> None:
    backend = open_backend(tls_consul.url, timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(Rejected, match="serves HTTPS: set scheme=https and ca_file"):
            await backend.list("orders")
    finally:
        await backend.close()
    assert time.monotonic() - started < 2.5


def test_tls_files_are_checked_before_any_request(tmp_path: Path, certs: CertFiles) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match=r"backend\.ca_file: .* not a readable PEM CA bundle"):
        open_backend("consul://127.0.0.1:8501", ca_file=str(not_pem))
    with pytest.raises(ConfigError, match=r"backend\.ca_file: no such file: /nope"):
        open_backend("consul://127.0.0.1:8501", ca_file="/nope")
    with pytest.raises(ConfigError, match=r"backend\.key_file: cert_file and key_file go together"):
        open_backend("consul://127.0.0.1:8501", cert_file=certs.client_cert)
    with pytest.raises(ConfigError, match=r"backend\.cert_file: .* matching key"):
        open_backend(
            "consul://127.0.0.1:8501", cert_file=certs.client_cert, key_file=certs.server_key
        )
    with pytest.raises(ConfigError, match=r"backend\.scheme: TLS files were given but scheme"):
        open_backend("consul://127.0.0.1:8501?scheme=http", ca_file=certs.ca)


def test_the_agent_process_with_tls_and_a_token_file(
    tmp_path: Path, certs: CertFiles, agents: list[Agent]
) -> None:
    server = ConsulServer(
        acl_token=str(uuid.uuid4()),
        tls=certs.server_tls(),
    )
    server.start()
    try:
        acl = AclConsul(server)
        (tmp_path / "token").write_text(acl.token)
        agent = Agent(
            tmp_path,
            server.url,
            ONE_SERVICE,
            extra_backend='token_file = "token"\ncert_file = "client.pem"',
        )
        shutil.copy(certs.client_cert, tmp_path / "client.pem")
        env = {"REGISTRY_AGENT_CA_FILE": certs.ca, "REGISTRY_AGENT_KEY_FILE": certs.client_key}
        agents.append(agent.start(env=env))
        agent.until("/readyz", 200)
        assert "orders-1" in acl.services()
        assert agent.stop() == 0
        assert "orders-1" not in acl.services()
    finally:
        server.close()
