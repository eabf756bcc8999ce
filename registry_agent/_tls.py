"""Client TLS settings shared by the backends: files checked once, up front."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from registry_agent._errors import ConfigError

__all__ = ["TLSFiles"]


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for a TLS connection to the registry.

    ``ca_file`` is the bundle that signed the server's certificate (the system
    store when omitted); ``cert_file`` and ``key_file`` are the client
    certificate and its key, for servers that verify clients.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ConfigError(
                "cert_file and key_file go together (a client certificate and its key)",
                field=f"backend.{missing}",
            )
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"no such file: {path}", field=f"backend.{name}")

    @property
    def enabled(self) -> bool:
        """True when any file was given."""
        return any((self.ca_file, self.cert_file, self.key_file))

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context; errors name the file at fault."""
        context = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(
                    f"{self.ca_file} is not a readable PEM CA bundle: {exc}",
                    field="backend.ca_file",
                ) from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(
                    f"{self.cert_file} and {self.key_file} are not a readable PEM certificate "
                    f"and matching key: {exc}",
                    field="backend.cert_file",
                ) from None
        return context

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) bytes, after the same checks as :meth:`ssl_context`."""
        self.ssl_context()
        return tuple(  # type: ignore[return-value]
            Path(p).read_bytes() if p is not None else None
            for p in (self.ca_file, self.key_file, self.cert_file)
        )
