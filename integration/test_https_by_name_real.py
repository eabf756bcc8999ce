"""HTTPS by service name on real Consul and etcd: TLS instances on 127.0.0.1 whose
certificate names the service ``orders`` only (no IP address), verified against the
service name (or policy.server_name) by httpx sync and async and by requests; a TLS
failure is raised as the TLS error in its own words."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from integration.certs import NamedCert, make_named_cert
from integration.http_service_kit import HttpService, services, wait_for
from registry_agent import (
    AsyncDiscovery,
    AsyncDiscoveryTransport,
    Discovery,
    DiscoveryPolicy,
    DiscoveryTransport,
)
from registry_agent.requests import DiscoveryAdapter
from registry_agent.testing.servers import ServerProcess


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> NamedCert:
    return make_named_cert(tmp_path_factory.mktemp("https-by-name"), "orders")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> NamedCert:
    """Another CA (that never signed the instances' certificate)."""
    return make_named_cert(tmp_path_factory.mktemp("stranger"), "orders")


@pytest.fixture
def tls_orders(server: ServerProcess, cert: NamedCert) -> Iterator[list[HttpService]]:
    """Two TLS instances registered as ``orders`` and as ``shop`` (same certificate)."""
    with services(2, tls=cert.pair) as inst:
        for s in inst:
            s.register(server.url)
            s.register(server.url, name="shop")
        yield inst


def healthy(discovery: Discovery, count: int) -> None:
    wait_for(
        lambda: all(len(discovery.instances(n)) == count for n in ("orders", "shop")),
        15,
        f"{count} healthy",
    )


def test_httpx_verifies_against_the_service_name(
    server: ServerProcess, cert: NamedCert, tls_orders: list[HttpService]
) -> None:
    with Discovery(server.url) as discovery:
        healthy(discovery, 2)
        # A callable: one pool per TLS server name (and one for plain addresses).
        transport = DiscoveryTransport(
            discovery, transport=lambda: httpx.HTTPTransport(verify=cert.client_context())
        )
        with httpx.Client(transport=transport, timeout=5) as c:
            answers = [c.get("https://orders/x") for _ in range(4)]
            assert {a.status_code for a in answers} == {200}
            assert {int(a.text.split()[0]) for a in answers} == {s.port for s in tls_orders}
            assert {a.text.split()[1] for a in answers} == {"orders"}  # Host kept
            # The same instances by address: no IP in the certificate, so no.
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                c.get(f"https://127.0.0.1:{tls_orders[0].port}/")
            # Another service on those instances: its name is not in the certificate ...
            with pytest.raises(httpx.ConnectError) as caught:
                c.get("https://shop/")
        message = str(caught.value)
        assert "certificate verify failed" in message
        assert "shop" in message  # "Hostname mismatch, certificate is not valid for 'shop'"
        assert "2 instances of shop tried" in message
        assert "no healthy instance" not in message
        # ... unless the policy names the certificate's name.
        policy = DiscoveryPolicy(server_name="orders")
        transport = DiscoveryTransport(
            discovery,
            policy=policy,
            transport=lambda: httpx.HTTPTransport(verify=cert.client_context()),
        )
        with httpx.Client(transport=transport, timeout=5) as c:
            answer = c.get("https://shop/")
            assert answer.status_code == 200
            assert answer.text.split()[1] == "shop"


def test_httpx_with_an_untrusted_ca_raises_the_tls_error(
    server: ServerProcess, stranger: NamedCert, tls_orders: list[HttpService]
) -> None:
    with Discovery(server.url) as discovery:
        healthy(discovery, 2)
        inner = lambda: httpx.HTTPTransport(verify=stranger.client_context())  # noqa: E731
        with (
            httpx.Client(transport=DiscoveryTransport(discovery, transport=inner), timeout=5) as c,
            pytest.raises(httpx.ConnectError) as caught,
        ):
            c.get("https://orders/")
        message = str(caught.value)
        assert "CERTIFICATE_VERIFY_FAILED" in message
        assert "2 instances of orders tried" in message
        assert "no healthy instance" not in message
        # ssl.SSLError's errno is OpenSSL's: "([Errno 1] Operation not permitted)" was
        # appended to every TLS failure as if it were the system's reason.
        assert "Errno" not in message, message


async def test_async_httpx_verifies_against_the_service_name(
    server: ServerProcess, cert: NamedCert, tls_orders: list[HttpService]
) -> None:
    async with AsyncDiscovery(server.url) as discovery:
        for _ in range(300):
            if len(await discovery.instances("orders")) == 2:
                break
            await asyncio.sleep(0.05)
        transport = AsyncDiscoveryTransport(
            discovery, transport=lambda: httpx.AsyncHTTPTransport(verify=cert.client_context())
        )
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            answers = [await client.get("https://orders/") for _ in range(4)]
            assert {int(a.text.split()[0]) for a in answers} == {s.port for s in tls_orders}
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await client.get("https://shop/")
        wrong = AsyncDiscoveryTransport(
            discovery,
            policy=DiscoveryPolicy(server_name="billing"),
            transport=lambda: httpx.AsyncHTTPTransport(verify=cert.client_context()),
        )
        async with httpx.AsyncClient(transport=wrong, timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match=r"not valid for 'billing'") as caught:
                await client.get("https://orders/")
            assert "no healthy instance" not in str(caught.value)


def test_requests_verifies_against_the_service_name(
    server: ServerProcess, cert: NamedCert, stranger: NamedCert, tls_orders: list[HttpService]
) -> None:
    with Discovery(server.url) as discovery:
        healthy(discovery, 2)
        session = requests.Session()
        session.trust_env = False
        session.mount("https://", DiscoveryAdapter(discovery))
        with session:
            answers = [session.get("https://orders/", verify=cert.ca, timeout=5) for _ in range(4)]
            assert {int(a.text.split()[0]) for a in answers} == {s.port for s in tls_orders}
            assert {a.text.split()[1] for a in answers} == {"orders"}
            with pytest.raises(requests.exceptions.SSLError) as caught:
                session.get("https://shop/", verify=cert.ca, timeout=5)
            message = str(caught.value)
            # urllib3 checks the name itself: its words; the class and args are requests'
            assert "hostname 'shop' doesn't match 'orders'" in message
            assert caught.value.__notes__ == ["2 instances of shop tried"]
            assert caught.value.request is not None
            assert caught.value.request.url == "https://shop/"
            assert "no healthy instance" not in message
            with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
                session.get("https://orders/", verify=stranger.ca, timeout=5)
        named = requests.Session()
        named.trust_env = False
        named.mount(
            "https://", DiscoveryAdapter(discovery, policy=DiscoveryPolicy(server_name="orders"))
        )
        with named:
            answer = named.get("https://shop/", verify=cert.ca, timeout=5)
            assert answer.status_code == 200
            assert answer.text.split()[1] == "shop"


def test_the_certificate_names_the_service_only(cert: NamedCert) -> None:
    from cryptography import x509

    loaded = x509.load_pem_x509_certificate(Path(cert.cert).read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["orders"]
    assert names.get_values_for_type(x509.IPAddress) == []


def test_a_transport_instance_refuses_https_service_urls(
    server: ServerProcess, cert: NamedCert, tls_orders: list[HttpService]
) -> None:
    """One transport instance pools by address: it could carry a connection verified
    for ``orders`` to ``https://shop/`` or a plain address. So it serves no https://
    service URL (a clear error), and a plain address is verified against itself."""
    with Discovery(server.url) as discovery:
        healthy(discovery, 2)
        inner = httpx.HTTPTransport(verify=cert.client_context())
        with httpx.Client(transport=DiscoveryTransport(discovery, transport=inner)) as c:
            for url in ("https://orders/", "https://shop/", "https://orders/"):
                with pytest.raises(httpx.ConnectError, match="needs transport= to be a callable"):
                    c.get(url)
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                c.get(f"https://127.0.0.1:{tls_orders[0].port}/")
        assert set(discovery._async._watchers) == {"orders", "shop"}  # healthy()'s only


async def test_an_async_transport_instance_refuses_https_service_urls(
    server: ServerProcess, cert: NamedCert, tls_orders: list[HttpService]
) -> None:
    async with AsyncDiscovery(server.url) as discovery:
        inner = httpx.AsyncHTTPTransport(verify=cert.client_context())
        transport = AsyncDiscoveryTransport(discovery, transport=inner)
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match=r"lambda: httpx.AsyncHTTPTransport"):
                await client.get("https://orders/")
        assert discovery._watchers == {}
