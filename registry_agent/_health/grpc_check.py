"""A check on the standard gRPC health protocol: ``grpc.health.v1.Health/Check``.

gRPC is an extra (``pip install 'registry-agent[grpc]'``): it is imported when a
:class:`GrpcCheck` is built, never when this module is.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, ClassVar

from registry_agent._errors import ConfigError
from registry_agent._health.base import HealthCheck
from registry_agent._urls import Table, as_bool, as_str

__all__ = ["GrpcCheck"]

#: What to install when gRPC is missing.
INSTALL = "pip install 'registry-agent[grpc]'"

# Codes that mean the server never answered: the channel is made anew on the next run
# (a channel that failed to connect waits out a reconnect backoff of up to two minutes).
_NO_ANSWER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"})

# In a failed call's details, words that say the TLS handshake or certificate check failed.
_TLS_WORDS = ("handshake", "verification", "certificate", "ssl")


def _grpc_modules() -> tuple[Any, Any, Any]:
    """``(grpc, health_pb2, health_pb2_grpc)``, or a :class:`ConfigError` saying what to install."""
    try:
        import grpc
        import grpc.aio
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise ConfigError(
            f"a gRPC check needs gRPC ({exc.name or 'grpc'} is not installed): {INSTALL}",
            field="grpc",
        ) from None
    return grpc, health_pb2, health_pb2_grpc


def _split_target(target: str) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` (an IPv6 host in brackets), or a ConfigError."""
    host, sep, port = target.rpartition(":") if isinstance(target, str) else ("", "", "")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        not sep
        or not bare
        or not port.isdigit()
        or not 1 <= int(port) <= 65535
        or (":" in bare and bare == host)  # an IPv6 address needs its brackets
        or any(c in bare for c in "/[]@ ")
    ):
        raise ConfigError(
            f'expected "host:port" like "127.0.0.1:50051" (IPv6 as "[::1]:50051"), got {target!r}',
            field="grpc",
        )
    return bare, int(port)


def _check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Refuse missing or unreadable PEM files, naming the field at fault."""
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise ConfigError(
            "cert_file and key_file go together (a client certificate and its key)", field=missing
        )
    for field, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"no such file: {path}", field=field)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"{ca_file} is not a readable PEM CA bundle: {exc}", field="ca_file"
            ) from None
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"{cert_file} and {key_file} are not a readable PEM certificate "
                f"and matching key: {exc}",
                field="cert_file",
            ) from None


class GrpcCheck(HealthCheck):
    """Passes when ``grpc.health.v1.Health/Check`` at ``target`` answers SERVING.

    ``target`` is ``"host:port"`` (``"[::1]:50051"`` for IPv6); ``service`` is the
    name asked about (``""``, the default, is the server's overall health).
    NOT_SERVING, UNKNOWN, a service the server does not know (NOT_FOUND), no
    connection, a TLS failure or no answer within ``timeout`` all fail, the
    detail saying which in gRPC's own words.

    ``tls=True`` speaks TLS: ``ca_file`` is the bundle that signed the server's
    certificate (the system store when omitted), ``cert_file`` and ``key_file`` a
    client certificate for servers that verify clients, and ``server_name`` the
    name the certificate is checked against (by default the host of ``target``).
    Any of these four turns TLS on by itself, as a TLS file does for a backend.

    One channel serves every run; after a run the server did not answer (refused,
    unreachable, timed out) the next run dials anew, so a restarted server is seen
    at once rather than after gRPC's reconnect backoff. :meth:`aclose` closes it.
    Needs the ``grpc`` extra: without it, building one is a :class:`ConfigError`.
    """

    kind: ClassVar[str | None] = "grpc"
    example: ClassVar[str] = 'grpc = "host:port"'

    @classmethod
    def from_table(cls, table: Table) -> GrpcCheck:
        """``grpc = "host:port"``, ``grpc_service``, ``tls``, ``ca_file``, ``cert_file``,
        ``key_file``, ``server_name``."""
        target = table.require("grpc", as_str)
        service = table.get("grpc_service", as_str, "")
        tls = table.get("tls", as_bool)
        files = {key: table.get(key, as_str) for key in ("ca_file", "cert_file", "key_file")}
        server_name = table.get("server_name", as_str)
        given = [key for key in (*files, "server_name") if key in table]
        if tls is False and given:
            raise table.error("tls", f"is false, yet {given[0]} (a TLS setting) is given")
        options = cls.common_options(table)
        with table.naming_fields():
            try:
                return cls(
                    target,
                    service=service,
                    tls=bool(tls),
                    server_name=server_name,
                    **files,
                    **options,
                )
            except ConfigError as exc:
                if exc.field == "service":  # the constructor's name for the key grpc_service
                    raise table.error("grpc_service", exc.reason) from None
                raise

    def __init__(
        self,
        target: str,
        *,
        service: str = "",
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        name: str | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self._grpc, self._health_pb2, self._health_pb2_grpc = _grpc_modules()
        _split_target(target)
        if not isinstance(service, str):
            raise ConfigError(
                f"expected a service name (a string), got {service!r}", field="service"
            )
        if not isinstance(tls, bool):
            raise ConfigError(f"expected true or false, got {tls!r}", field="tls")
        paths = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        files = {k: None if v is None else str(v) for k, v in paths.items()}
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            raise ConfigError(f"expected a host name, got {server_name!r}", field="server_name")
        tls = tls or any(v is not None for v in (*files.values(), server_name))
        _check_tls_files(files["ca_file"], files["cert_file"], files["key_file"])
        label = f"grpc {target}" + (f"/{service}" if service else "")
        super().__init__(name or label, interval=interval, timeout=timeout)
        self.target = target
        self.service = service
        self.tls = tls
        self.ca_file = files["ca_file"]
        self.cert_file = files["cert_file"]
        self.key_file = files["key_file"]
        self.server_name = server_name
        self._channel: Any = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        self._answered = True

    def _new_channel(self) -> Any:
        grpc = self._grpc
        # No proxy from the environment: probe the target itself (as HttpCheck does).
        # A subchannel of its own: a new channel must not inherit a shared subchannel's
        # reconnect backoff from the global pool (a restarted server would look down).
        options: list[tuple[str, Any]] = [
            ("grpc.enable_http_proxy", 0),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if not self.tls:
            return grpc.aio.insecure_channel(self.target, options=options)
        # Read on every new channel: certificates rotated on disk are picked up.
        ca, cert, key = (
            None if path is None else Path(path).read_bytes()
            for path in (self.ca_file, self.cert_file, self.key_file)
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    async def _channel_for_this_run(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._channel is not None and (not self._answered or self._channel_loop is not loop):
            old, self._channel = self._channel, None
            if self._channel_loop is loop:
                await old.close()
            # A channel of another (finished) loop is dropped: it cannot be awaited here.
        if self._channel is None:
            self._channel = self._new_channel()
            self._channel_loop = loop
        return self._channel

    async def probe(self) -> str:
        channel = await self._channel_for_this_run()
        stub = self._health_pb2_grpc.HealthStub(channel)
        request = self._health_pb2.HealthCheckRequest(service=self.service)
        self._answered = False  # until the server answers (a cancelled run leaves it so)
        try:
            response = await stub.Check(request, timeout=self.timeout)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code().name
            self._answered = code not in _NO_ANSWER
            raise RuntimeError(self._describe(code, exc.details() or "")) from None
        self._answered = True
        status = self._health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if status != "SERVING":
            raise RuntimeError(f"status {status}")
        return "status SERVING"

    def _describe(self, code: str, details: str) -> str:
        """A failed call in words: what gRPC said, and what it means for a health check."""
        if code == "NOT_FOUND":
            return f"service {self.service!r} unknown to the server (NOT_FOUND)"
        if code == "UNIMPLEMENTED":
            return "the server does not serve grpc.health.v1.Health (UNIMPLEMENTED)"
        if code == "DEADLINE_EXCEEDED":
            return f"no answer within {self.timeout:g}s (DEADLINE_EXCEEDED)"
        text = f"{code}: {details}" if details else code
        if self.tls and any(word in details.lower() for word in _TLS_WORDS):
            # gRPC's words do not say which name the certificate was checked against.
            host = self.server_name or _split_target(self.target)[0]
            text += f" (TLS server name {host!r})"
        return text

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and self._channel_loop is asyncio.get_running_loop():
            await channel.close()
        self._channel_loop = None
