"""A check on the standard gRPC health protocol: ``grpc.health.v1.Health/Check``.

gRPC is an extra (``pip install 'registry-agent[grpc]'``): it is imported when a
:class:`GrpcCheck` is built, never when this module is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from pathlib import Path
from typing import Any, ClassVar

from registry_agent._errors import ConfigError
from registry_agent._health.base import MASK, HealthCheck
from registry_agent._urls import Table, as_bool, as_str

__all__ = ["GrpcCheck", "split_host_port"]

#: What to install when gRPC is missing.
INSTALL = "pip install 'registry-agent[grpc]'"

# Codes that mean the server never answered: the channel is made anew on the next run
# (a channel that failed to connect waits out a reconnect backoff of up to two minutes).
_NO_ANSWER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"})

# In a failed call's details, words that say the TLS handshake or certificate check failed.
_TLS_WORDS = ("handshake", "verification", "certificate", "ssl")


# Words of a connection the server closed before answering: TLS or a client certificate?
_AMBIGUOUS = ("socket closed", "connection reset", "end of file", "eof")


class _Channel:
    """A channel and what the runs on it know: who uses it, whether it was answered."""

    __slots__ = ("answered", "channel", "loop", "retired", "users")

    def __init__(self, channel: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.users = 0  # runs in flight on it: it is closed when the last one ends
        self.answered = True
        self.retired = False


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


def split_host_port(target: object, field: str, example: str) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"``, or a :class:`ConfigError` naming ``field``.

    The port is ASCII digits, 1-65535; brackets go around an IPv6 address and
    nothing else. Credentials (``user:pass@``) are refused with the password masked.
    """
    expected = (
        f'expected "host:port" like "{example}" (IPv6 as "[::1]:{example.rpartition(":")[2]}")'
    )
    if not isinstance(target, str):
        raise ConfigError(f"{expected}, got {target!r}", field=field)
    userinfo, at, _ = target.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        shown = target.replace(userinfo, f"{user}:{MASK}" if colon else MASK, 1)
        raise ConfigError(
            f"credentials (user:password@) are not supported in a {field} target, got {shown!r}",
            field=field,
        )
    host, sep, port = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if (
        not sep
        or not bare
        or not (port.isascii() and port.isdigit())
        or (":" in bare) != bracketed  # brackets around an IPv6 address, and only there
        or any(c in bare for c in "/[]@ ")
        or not bare.isprintable()
    ):
        raise ConfigError(f"{expected}, got {target!r}", field=field)
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"expected a port 1-65535, got {target!r}", field=field)
    return bare, int(port)


def _split_target(target: str) -> tuple[str, int]:
    """``(host, port)`` of a gRPC target, or a ConfigError naming ``grpc``."""
    return split_host_port(target, "grpc", "127.0.0.1:50051")


# A DNS host name (labels of letters, digits and hyphens) or an IP address.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)


def _valid_server_name(name: object) -> bool:
    if not isinstance(name, str) or not name:
        return False
    if _HOST_NAME.fullmatch(name):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _check_tls_files(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """Refuse missing or unreadable PEM files, naming the field at fault."""
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise ConfigError(
            "cert_file and key_file go together (a client certificate and its key)", field=missing
        )
    for field, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path is not None and not path.strip():
            raise ConfigError("is empty: expected the path of a PEM file", field=field)
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
    Any of these four turns TLS on by itself, as a TLS file does for a backend;
    ``tls=False`` with any of them is a :class:`ConfigError` (``tls=None``, the
    default, means "TLS when a TLS setting is given"). Credentials in ``target``
    are not supported (refused, the password masked in the message).

    One channel serves every run, concurrent runs included. After a run the server
    did not answer, the next run dials anew only if the channel has failed (refused,
    unreachable: a restarted server is seen at once rather than after gRPC's
    reconnect backoff); a channel still connecting or connected to a server that
    stalls is kept, so a stalled server costs one socket per check, not one per run.
    :meth:`aclose` closes it. Needs the ``grpc`` extra: without it, building one is
    a :class:`ConfigError`.
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
                    tls=tls,
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
        tls: bool | None = None,
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
        if tls is not None and not isinstance(tls, bool):
            raise ConfigError(f"expected true or false, got {tls!r}", field="tls")
        paths = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        files = {k: None if v is None else str(v) for k, v in paths.items()}
        if server_name is not None and not _valid_server_name(server_name):
            raise ConfigError(
                f"expected a host name like api.example.com, got {server_name!r}",
                field="server_name",
            )
        given = [k for k, v in (*files.items(), ("server_name", server_name)) if v is not None]
        if tls is False and given:
            raise ConfigError(f"is False, yet {given[0]} (a TLS setting) is given", field="tls")
        _check_tls_files(files["ca_file"], files["cert_file"], files["key_file"])
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"expected a non-empty name, got {name!r}", field="name")
        label = f"grpc {target}" + (f"/{service}" if service else "")
        super().__init__(name or label, interval=interval, timeout=timeout)
        tls = bool(tls) or bool(given)
        self.target = target
        self.service = service
        self.tls = tls
        self.ca_file = files["ca_file"]
        self.cert_file = files["cert_file"]
        self.key_file = files["key_file"]
        self.server_name = server_name
        self._current: _Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def _channel(self) -> Any:
        """The channel the next run uses, if any (for tests)."""
        return None if self._current is None else self._current.channel

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

    def _must_redial(self, current: _Channel, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this run needs a new channel rather than ``current``."""
        if current.loop is not loop:
            return True  # a channel of another (finished) loop cannot be used here
        if current.answered:
            return False
        # The last run was not answered. A channel still connecting (a server that
        # accepted but stalls) or connected is kept: dialling anew would leave its
        # socket behind and pile up one more per run. A failed channel waits out a
        # reconnect backoff of up to two minutes: a new one sees a restarted server at once.
        state = current.channel.get_state(try_to_connect=False)
        connectivity = self._grpc.ChannelConnectivity
        return state not in (connectivity.CONNECTING, connectivity.READY)

    def _retire(self, old: _Channel) -> None:
        """Close ``old`` once no run uses it (a run of another loop: dropped)."""
        old.retired = True
        if old.users == 0 and old.loop is asyncio.get_running_loop():
            task = asyncio.get_running_loop().create_task(old.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def probe(self) -> str:
        loop = asyncio.get_running_loop()
        current = self._current
        if current is None or self._must_redial(current, loop):
            if current is not None:
                self._retire(current)
            current = self._current = _Channel(self._new_channel(), loop)
        current.users += 1
        answered = False  # a cancelled run leaves it so
        try:
            stub = self._health_pb2_grpc.HealthStub(current.channel)
            request = self._health_pb2.HealthCheckRequest(service=self.service)
            try:
                response = await stub.Check(request, timeout=self.timeout)
            except self._grpc.aio.AioRpcError as exc:
                code = exc.code().name
                answered = code not in _NO_ANSWER
                raise RuntimeError(self._describe(code, exc.details() or "")) from None
            answered = True
        finally:
            current.users -= 1
            current.answered = answered  # this channel's last finished run
            if current.retired:
                self._retire(current)
        if not isinstance(response, self._health_pb2.HealthCheckResponse):
            raise RuntimeError(
                "the server's answer is not a grpc.health.v1.HealthCheckResponse "
                "(does it serve the standard health protocol?)"
            )
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
        lowered = details.lower()
        if self.tls and any(word in lowered for word in _TLS_WORDS):
            # gRPC's words do not say which name the certificate was checked against.
            host = self.server_name or _split_target(self.target)[0]
            text += f" (TLS server name {host!r})"
        elif code == "UNAVAILABLE" and any(word in lowered for word in _AMBIGUOUS):
            # A TLS server closes a plain client's connection, and a server that verifies
            # clients closes one without (or with a foreign) certificate, in the same words.
            text += (
                " (does the server require a client certificate signed by a CA it trusts?)"
                if self.tls
                else " (is the server TLS? then set tls = true)"
            )
        return text

    async def aclose(self) -> None:
        current, self._current = self._current, None
        if current is not None and current.loop is asyncio.get_running_loop():
            await current.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
