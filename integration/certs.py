"""Throwaway PEM certificates for the TLS tests: a CA with a 127.0.0.1 server and a client
(``make_certs``), or a CA with a server certificate for DNS names only (``make_named_cert``:
TLS by service name, where checking the instance's address must fail)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry_agent.testing.servers import ServerTLS


@dataclass(frozen=True)
class CertFiles:
    """Paths of one CA and the certificates it signed."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def server_tls(self) -> ServerTLS:
        """What a test server serves TLS with (it verifies clients)."""
        return ServerTLS(self.ca, self.server_cert, self.server_key)

    def client_options(self) -> dict[str, str]:
        """Backend options for a client that trusts the CA and shows its certificate."""
        return {"ca_file": self.ca, "cert_file": self.client_cert, "key_file": self.client_key}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return str(path)


def _write_cert(cert: x509.Certificate, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _validity() -> dict[str, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "not_valid_before": now - datetime.timedelta(hours=1),
        "not_valid_after": now + datetime.timedelta(days=2),
    }


def _make_ca(ca_name: x509.Name) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **_validity())
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca


def make_certs(folder: Path, name: str = "test") -> CertFiles:
    """A CA and a server (127.0.0.1, ::1, localhost) and client certificate it signed."""
    folder.mkdir(parents=True, exist_ok=True)
    valid = _validity()
    ca_name = _name(f"registry-agent {name} CA")
    ca_key, ca = _make_ca(ca_name)

    def leaf(common_name: str, usages: list[x509.ObjectIdentifier]) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName("server.dc1.consul"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        cert = (
            x509.CertificateBuilder(subject_name=_name(common_name), issuer_name=ca_name, **valid)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        stem = common_name.replace(" ", "-")
        return (
            _write_cert(cert, folder / f"{stem}.pem"),
            _write_key(key, folder / f"{stem}-key.pem"),
        )

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_cert, server_key = leaf(f"{name} server", both)
    client_cert, client_key = leaf(f"{name} client", [ExtendedKeyUsageOID.CLIENT_AUTH])
    return CertFiles(
        ca=_write_cert(ca, folder / f"{name}-ca.pem"),
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
    )


@dataclass(frozen=True)
class NamedCert:
    """PEM file paths: the CA, and one server certificate for DNS names with its key."""

    ca: str
    cert: str
    key: str

    @property
    def pair(self) -> tuple[str, str]:
        """``(cert, key)``, what a TLS server (HTTP or gRPC) serves."""
        return (self.cert, self.key)

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (hostname checked)."""
        return ssl.create_default_context(cafile=self.ca)

    def ca_bytes(self) -> bytes:
        """The CA certificate, for ``grpc.ssl_channel_credentials(root_certificates=...)``."""
        return Path(self.ca).read_bytes()


def make_named_cert(folder: Path, *names: str) -> NamedCert:
    """A fresh CA and a server certificate for the DNS ``names`` only, no IP address (the
    first name is its CN)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "-".join(names)
    ca_name = _name(f"registry-agent by-name CA {stem}")
    ca_key, ca = _make_ca(ca_name)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(subject_name=_name(names[0]), issuer_name=ca_name, **_validity())
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return NamedCert(
        ca=_write_cert(ca, folder / f"{stem}-ca.pem"),
        cert=_write_cert(cert, folder / f"{stem}.pem"),
        key=_write_key(key, folder / f"{stem}-key.pem"),
    )
