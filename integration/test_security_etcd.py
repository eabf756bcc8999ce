"""etcd with authentication (a role limited to a prefix) and etcd over TLS, on real members."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from registry_agent.testing.servers import EtcdServer

ORDERS = ServiceInstance("orders", address="127.0.0.1", port=8080)
BILLING = ServiceInstance("billing", address="127.0.0.1", port=8081)
USER, PASSWORD = "orders-agent", "s3cret-orders-pw"


@pytest.fixture
def auth_etcd() -> Iterator[EtcdServer]:
    """Auth on; ``orders-agent`` may read and write ``/services/orders/`` only."""
    server = EtcdServer()
    server.start()
    try:
        server.enable_auth("root-pw")
        server.add_user(USER, PASSWORD, read_write_prefix="/services/orders/")
        yield server
    finally:
        server.close()


@pytest.fixture
def tls_etcd(certs: CertFiles) -> Iterator[EtcdServer]:
    server = EtcdServer(tls=certs.server_tls())
    server.start()
    try:
        yield server
    finally:
        server.close()


# -- authentication ------------------------------------------------------------------


async def test_a_user_limited_to_its_prefix_registers_and_heals(auth_etcd: EtcdServer) -> None:
    url = f"etcd://{USER}:{PASSWORD}@127.0.0.1:{auth_etcd.client_port}"
    reg = AsyncRegistrar(
        open_backend(url, timeout=2), ORDERS, ttl=2, retry=RetryPolicy(initial=0.1, cap=0.5)
    )
    observer = open_backend(auth_etcd.url, user=USER, password=PASSWORD, timeout=2)
    await reg.start(wait_registered=10)
    try:
        assert list((await observer.list("orders")).instances) == [ORDERS.id]
        # A restart forgets every auth token (etcd keeps them in memory): both
        # clients must log in again by themselves.
        auth_etcd.restart()
        beats = reg.counters.heartbeats_ok
        started = time.monotonic()
        listed = False
        while time.monotonic() - started < 15 and not (
            listed and reg.counters.heartbeats_ok >= beats + 2
        ):
            with contextlib.suppress(BackendUnavailable):
                listed = ORDERS.id in (await observer.list("orders")).instances
            await asyncio.sleep(0.1)
        assert listed, "the observer never read the entry again"
        assert reg.counters.heartbeats_ok >= beats + 2, "heartbeats never resumed"
        # It noticed: a failed call, or (the restart above blocks this test's event
        # loop for longer than the TTL) an entry counted lost and registered again.
        assert reg.counters.errors + reg.counters.lease_losses >= 1
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()
        await observer.close()


async def test_the_user_cannot_write_outside_its_prefix(auth_etcd: EtcdServer) -> None:
    backend = open_backend(auth_etcd.url, user=USER, password=PASSWORD, timeout=2)
    try:
        with pytest.raises(Rejected) as caught:
            await backend.register(BILLING, ttl=5)
        with pytest.raises(Rejected, match="permission denied for service 'billing'"):
            await backend.list("billing")
    finally:
        await backend.close()
    message = str(caught.value)
    assert "permission denied for service 'billing'" in message
    assert "does not grant read/write on /services/billing" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("password", [None, "wrong-password"])
async def test_no_or_a_wrong_password_is_a_clear_error(
    auth_etcd: EtcdServer, password: str | None
) -> None:
    creds = {"user": USER, "password": password} if password else {}
    backend = open_backend(auth_etcd.url, timeout=2, **creds)
    try:
        with pytest.raises(Rejected) as caught:
            await backend.register(ORDERS, ttl=5)
    finally:
        await backend.close()
    message = str(caught.value)
    if password:
        assert "wrong user name or password" in message
        assert password not in message
    else:
        assert "authentication is on and no user/password was given" in message


async def test_the_password_comes_from_the_agent_config_file(
    auth_etcd: EtcdServer, tmp_path: Path
) -> None:
    from registry_agent._agent.config import load_config

    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "agent.toml").write_text(
        f"""
[backend]
url = "{auth_etcd.url}"
user = "{USER}"
password_file = "pw"

[[service]]
name = "orders"
port = 8080
"""
    )
    config = load_config(tmp_path / "agent.toml", env={})
    assert PASSWORD not in repr(config)
    backend = open_backend(config.backend.url, **config.backend.options())
    try:
        await backend.register(ORDERS, ttl=5)
        assert list((await backend.list("orders")).instances) == [ORDERS.id]
    finally:
        await backend.close()


# -- TLS -----------------------------------------------------------------------------


async def test_tls_with_the_ca_and_a_client_certificate(
    tls_etcd: EtcdServer, certs: CertFiles
) -> None:
    reg = AsyncRegistrar(open_backend(tls_etcd.url, **certs.client_options()), ORDERS, ttl=3)
    await reg.start(wait_registered=10)
    try:
        assert list((await reg.backend.list("orders")).instances) == [ORDERS.id]
    finally:
        await reg.stop(timeout=5)
        await reg.backend.close()


async def test_a_wrong_ca_is_a_clear_tls_error_not_a_hang(
    tls_etcd: EtcdServer, certs: CertFiles, tmp_path: Path
) -> None:
    wrong = make_certs(tmp_path, "wrong")
    backend = open_backend(
        tls_etcd.url,
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
    assert time.monotonic() - started < 3.0
    assert f"TLS with etcd at 127.0.0.1:{tls_etcd.client_port} failed" in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


async def test_no_client_certificate_is_refused_clearly(
    tls_etcd: EtcdServer, certs: CertFiles
) -> None:
    backend = open_backend(tls_etcd.url, ca_file=certs.ca, timeout=3)
    try:
        with pytest.raises(BackendUnavailable, match="TLS with etcd at"):
            await backend.list("orders")
    finally:
        await backend.close()


async def test_plaintext_to_a_tls_member_says_so(tls_etcd: EtcdServer) -> None:
    backend = open_backend(tls_etcd.url, timeout=3)
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match="set ca_file or tls=true"):
            await backend.list("orders")
    finally:
        await backend.close()
    assert time.monotonic() - started < 3.5


def test_tls_options_are_checked_before_any_request(tmp_path: Path, certs: CertFiles) -> None:
    with pytest.raises(ConfigError, match=r"backend\.ca_file: no such file"):
        open_backend("etcd://127.0.0.1:2379", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"backend\.tls: TLS files were given but tls is false"):
        open_backend("etcd://127.0.0.1:2379?tls=false", ca_file=certs.ca)
    with pytest.raises(ConfigError, match=r"backend\.cert_file: .* matching key"):
        open_backend(
            "etcd://127.0.0.1:2379", cert_file=certs.server_cert, key_file=certs.client_key
        )
