"""etcd backend: a value under ``[<prefix>/]<service>/<id>`` attached to a lease, in a format."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, TypeVar

import aetcd
import aetcd.watcher
import grpc
from aetcd import rpc

from registry_agent import (
    BackendUnavailable,
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Lease,
    LeaseLost,
    RegistryError,
    Rejected,
    ServiceInstance,
    ServiceSnapshot,
    Throttled,
)
from registry_agent.backend import (
    ConnectionProbe,
    InstanceMap,
    LivenessNews,
    Option,
    TLSFiles,
    error_context,
    opt_bool,
    opt_duration,
    opt_str,
    parse_backend_url,
    registry_address,
    running_loop,
    take_options,
)
from registry_agent_etcd._formats import EtcdFormat, health_error, load_format
from registry_agent_etcd._liveness import LeaseGroup
from registry_agent_etcd._watch import apply_watch_events, response_error

__all__ = ["EtcdBackend"]

log = logging.getLogger("registry_agent.etcd")
T = TypeVar("T")

# gRPC waits up to 120 s (1 s at first, x1.6) between reconnects to a server that
# went away, failing every call meanwhile: a restarted etcd would be ignored for
# seconds. Our own retries already back off, so reconnect promptly (but gRPC
# also takes min_reconnect_backoff as the least time a connection attempt gets:
# set per backend to its timeout, or any link slower than 100 ms never connects).
# No pings
# without a call: etcd (PermitWithoutStream=false) answers them with GOAWAY.
# Like etcd's own client, accept replies of any size (a big list is not an error).
_CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.max_receive_message_length": -1,
    # gRPC shares connections between channels to the same target by default:
    # a fresh channel after a dead connection would get that dead connection back.
    "grpc.use_local_subchannel_pool": 1,
}

#: etcd's --grpc-keepalive-min-time default: pinged more often, it sends GOAWAY.
KEEPALIVE_TIME_FLOOR = 5.0
KEEPALIVE_TIMEOUT_FLOOR = 0.5
#: etcd's --max-request-bytes default (1.5 MiB).
MAX_REQUEST_BYTES = 1536 * 1024
# A put request's bytes beyond its key and value: field tags, lengths, lease id.
_PUT_OVERHEAD = 32


def _keepalive_options(time: float, timeout: float) -> dict[str, int]:
    """Keepalive pings that find a member hanging (frozen, cut off) under an open stream.

    grpcio (1.5x+) waits for a keepalive ping's ack ``grpc.http2.ping_timeout_ms``
    (default 60 s), not ``grpc.keepalive_timeout_ms``: without it a blackholed
    watch stays silent for time + 60 s.
    """
    return {
        "grpc.keepalive_time_ms": round(time * 1000),
        "grpc.keepalive_timeout_ms": round(timeout * 1000),
        "grpc.http2.ping_timeout_ms": round(timeout * 1000),
    }


# etcd's clientv3.WithRequireLeader: a member cut off from the leader ends the
# stream instead of leaving it silent.
_REQUIRE_LEADER = ("hasleader", "true")

# What no retry of the same request can fix (etcd's "invalid auth token" is
# UNAUTHENTICATED too: it is recognised first, and logging in again heals it).
_REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

# gRPC's words for an HTTP error status on a gRPC call.
_HTTP_THROTTLED = re.compile(r"\bstatus:? (429|503)\b")

_TLS_MARKERS = ("ssl", "handshake", "certificate", "tls", "tsi_")


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client, over TLS when given credentials (aetcd itself only dials plaintext)."""

    _is_connecting: bool

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = _hostport(self._host, self._port)
            options = list(self._options.items())
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except grpc.aio.AioRpcError as exc:
                    aetcd.exceptions._handle_exception(exc)
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    """The gRPC error behind ``exc`` (aetcd re-raises them as its own, ``from`` the original)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, grpc.aio.AioRpcError):
            return error
    return None


def _details(exc: BaseException) -> str:
    """The server's own words (gRPC details) when there are some."""
    rpc_error = _rpc_error(exc)
    if rpc_error is not None:
        return rpc_error.details() or str(rpc_error.code())
    return str(exc) or type(exc).__name__


def _opt_size(name: str, value: Any) -> int:
    """An option holding a whole number of bytes."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool | float) or size <= 0:
        raise ConfigError(
            f"expected a whole number of bytes above zero, got {value!r}", field=f"backend.{name}"
        )
    return size


def _closed_under_us() -> bool:
    """Whether a CancelledError came from grpc, not from our task being cancelled.

    grpc.aio raises CancelledError in every call of a channel being closed
    (another call on it failed and dropped it): that is a failed call.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


_CLOSED = "the connection was closed under the call (another call on it failed)"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _revoke(client: aetcd.Client, *, lease_id: int) -> None:
    await client.revoke_lease(lease_id)


async def _connected(client: aetcd.Client) -> aetcd.Client:
    await client.connect()
    return client


def _prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


def _own(error: RegistryError, instance: ServiceInstance) -> RegistryError:
    """A shared call's error (one for many callers) as this caller's own, naming its instance."""
    try:
        own = copy.copy(error)
    except Exception:  # an error that cannot be copied is raised as it is
        return error
    own.service, own.instance = instance.service, instance.id
    return own


async def _delete_if_leased(client: aetcd.Client, *, key: bytes, lease_id: int) -> Any:
    """Delete ``key`` only while it is still on ``lease_id`` (not someone else's re-put)."""
    compare = rpc.Compare(key=key, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL)
    compare.lease = lease_id
    delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
    await client.connect()
    return await client.kvstub.Txn(
        rpc.TxnRequest(compare=[compare], success=[delete]),
        timeout=client._timeout,
        metadata=client.metadata,
    )


class EtcdBackend:
    """``etcd://host:port[,host:port…]``: registers instances as leased keys in etcd.

    With several endpoints (members of one cluster) the backend talks to one at
    a time and moves to the next when a call to it fails or times out; leases
    live in the cluster, so registrations survive the move. Watches require a
    leader: a member cut off in a minority ends them, and they resume exactly
    on another member.

    Options (URL query or keywords):

    ``format``
        The key layout and value encoding, written and read: ``registry-agent``
        (default: JSON with health), ``go-zero``, ``kratos`` or ``go-micro`` (the
        peers' own layouts, presence only: see the README's "Mixed fleets").
    ``prefix``
        Key prefix: keys are ``<prefix>/<service>/<id>``. Default per format:
        ``/services``, go-zero none (keys ``<service>/<id>``), kratos
        ``/microservices``, go-micro ``/micro/registry``.
    ``scheme``
        format=kratos only: of an instance's endpoints, read the first with this
        scheme (``grpc``); default the first endpoint.
    ``user``, ``password``
        etcd authentication (also accepted as ``etcd://user:password@host:port``).
    ``ca_file``, ``cert_file``, ``key_file``
        TLS: the PEM CA bundle that signed the members' certificates (giving
        any of them turns TLS on), and a client certificate and key for
        ``--client-cert-auth`` clusters.
    ``tls``
        ``true`` for TLS verified against the system store (no files).
    ``timeout``
        Per-request timeout, default ``5s``: no call waits longer on a member
        (a stalled connection included).
    ``keepalive_time``, ``keepalive_timeout``
        Under an open watch, ping the member after ``keepalive_time`` of silence
        (default and minimum ``5s``, etcd's ``--grpc-keepalive-min-time``) and
        drop the connection when no answer comes within ``keepalive_timeout``
        (default ``2s``): a frozen member or a dead connection ends a watch
        within their sum plus a second.
    ``max_request_bytes``
        The cluster's ``--max-request-bytes`` (default 1.5 MiB): a registration
        bigger than this is refused before it is sent (:meth:`validate`).
    """

    scheme: ClassVar[str] = "etcd"
    _OPTIONS: ClassVar[Mapping[str, Option]] = {
        "format": opt_str,
        "scheme": opt_str,
        "prefix": opt_str,
        "user": opt_str,
        "password": opt_str,
        "timeout": opt_duration,
        "ca_file": opt_str,
        "cert_file": opt_str,
        "key_file": opt_str,
        "tls": opt_bool,
        "keepalive_time": opt_duration,
        "keepalive_timeout": opt_duration,
        "max_request_bytes": _opt_size,
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2379,
        *,
        format: str = "registry-agent",
        scheme: str | None = None,
        prefix: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        endpoints: Sequence[tuple[str, int]] | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls: bool | None = None,
        keepalive_time: float = KEEPALIVE_TIME_FLOOR,
        keepalive_timeout: float = 2.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        if keepalive_time < KEEPALIVE_TIME_FLOOR:
            raise ConfigError(
                f"expected at least {KEEPALIVE_TIME_FLOOR:g}s (etcd refuses pings more often "
                f"than --grpc-keepalive-min-time, 5s by default), got {keepalive_time:g}s",
                field="backend.keepalive_time",
            )
        if keepalive_timeout < KEEPALIVE_TIMEOUT_FLOOR:
            raise ConfigError(
                f"expected at least {KEEPALIVE_TIMEOUT_FLOOR:g}s, got {keepalive_timeout:g}s",
                field="backend.keepalive_timeout",
            )
        if max_request_bytes < 1024:
            raise ConfigError(
                f"expected at least 1024 bytes, got {max_request_bytes}",
                field="backend.max_request_bytes",
            )
        if scheme is not None and format != "kratos":
            raise ConfigError(
                f"scheme chooses among a kratos instance's endpoints: it needs format=kratos, "
                f"not format={format}",
                field="backend.scheme",
            )
        #: How entries are laid out and encoded (option ``format``).
        self.format: EtcdFormat = (
            load_format(format, scheme=scheme) if scheme is not None else load_format(format)
        )
        if prefix is None:
            prefix = self.format.default_prefix
        if prefix and (
            not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/") or "//" in prefix
        ):
            raise ConfigError(
                "expected a key prefix like /services (leading '/', no trailing '/'), "
                f"or empty, got {prefix!r}",
                field="backend.prefix",
            )
        if (user is None) != (password is None):
            raise ConfigError("user and password go together", field="backend.user")
        self.endpoints = tuple(endpoints) if endpoints else ((host, port),)
        self._current = 0
        tls_files = TLSFiles(ca_file, cert_file, key_file)
        if tls is False and tls_files.enabled:
            raise ConfigError("TLS files were given but tls is false", field="backend.tls")
        self.tls = tls_files.enabled if tls is None else tls
        self._credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            ca, key, cert = tls_files.pem()
            self._credentials = grpc.ssl_channel_credentials(ca, key, cert)
        self.prefix = prefix.rstrip("/")
        # "" gives go-zero's keys "<service>/<id>"; "/" keeps "/<service>/<id>".
        self._root = f"{self.prefix}/" if prefix else ""
        self.timeout = timeout
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.max_request_bytes = max_request_bytes
        self._options = (
            _CHANNEL_OPTIONS
            | {"grpc.min_reconnect_backoff_ms": max(1000, int(timeout * 1000))}
            | _keepalive_options(keepalive_time, keepalive_timeout)
        )
        self._user = user
        self._password = password
        self._client: aetcd.Client | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._cluster_id: int | None = None
        self._probe = ConnectionProbe(self._hold_connection)
        self._warned: set[bytes] = set()
        #: Leases of failed registrations, to revoke: id -> (expiry, instance).
        self._orphans: dict[int, tuple[float, ServiceInstance | None]] = {}
        #: The shared lease of each TTL (whole seconds): see register_shared.
        self._groups: dict[int, LeaseGroup] = {}
        #: The lease of a closed group whose revoke failed, by the key of the last
        #: member (its deregister raised): a retry of that deregister revokes it.
        self._unrevoked: dict[bytes, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: Whether the last call got an answer from etcd.
        self._answering = False

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> EtcdBackend:
        """Build from ``etcd://[user:password@]host:port?prefix=/services``."""
        parsed = parse_backend_url(url, default_port=2379)
        if not parsed.endpoints:
            raise ConfigError(
                f"expected host:port[,host:port…] in {parsed.redacted()}", field="backend"
            )
        if len(set(parsed.endpoints)) != len(parsed.endpoints):
            raise ConfigError(
                f"an endpoint is listed twice in {parsed.redacted()}", field="backend"
            )
        given = dict(options)
        if parsed.username is not None:
            if "user" in given:
                raise ConfigError("user given both in the URL and as an option", field="backend")
            given["user"] = parsed.username
            if parsed.password is not None:
                given["password"] = parsed.password
        return cls(endpoints=parsed.endpoints, **take_options("etcd", given, cls._OPTIONS))

    def __repr__(self) -> str:
        hosts = ",".join(_hostport(h, p) for h, p in self.endpoints)
        fmt = "" if self.format.name == "registry-agent" else f", format={self.format.name!r}"
        return f"EtcdBackend(etcd://{hosts}, prefix={self.prefix!r}{fmt})"

    @property
    def host(self) -> str:
        """Host of the member in use."""
        return self.endpoints[self._current][0]

    @property
    def port(self) -> int:
        """Port of the member in use."""
        return self.endpoints[self._current][1]

    @property
    def registry_identity(self) -> tuple[str, tuple[str, ...], str]:
        """Which entries this backend writes, for refusing the same registry twice: the
        cluster (its endpoints in any order, hosts as :func:`registry_address` spells
        them, no DNS) and the key root (the prefix, a format's default included). Two
        formats under one prefix write the same keys, so the format is not part of it;
        credentials, TLS and timeouts do not change where entries go."""
        hosts = sorted({registry_address(host, port) for host, port in self.endpoints})
        return ("etcd", tuple(hosts), self._root)

    @property
    def client(self) -> aetcd.Client:
        """aetcd's client (created on first use, in the running process and loop)."""
        loop = running_loop()
        if self._client is not None and self._client_loop is not loop:
            # Used from another event loop (asyncio.run twice): its channel is unusable there.
            self._client = None
        if self._client is None:
            self._client_loop = loop
            self._client = _Client(
                host=self.host,
                port=self.port,
                username=self._user,
                password=self._password,
                timeout=self.timeout,
                options=self._options,
                credentials=self._credentials,
            )
        return self._client

    def _key(self, service: str, entry_id: str = "") -> bytes:
        return f"{self._root}{service}/{entry_id}".encode()

    def _key_of(self, instance: ServiceInstance) -> bytes:
        return self._key(instance.service, self.format.entry_id(instance))

    def _error(self, exc: BaseException, context: dict[str, str | None]) -> Exception:
        """Our error for whatever the client raised, with the server's words in it."""
        if isinstance(exc, RegistryError):
            return exc
        where = f"etcd at {_hostport(self.host, self.port)}"
        if isinstance(exc, TimeoutError):
            return BackendUnavailable(f"{where}: no answer within {self.timeout:g}s", **context)
        text = _details(exc)
        rpc_error = _rpc_error(exc)
        code = rpc_error.code() if rpc_error is not None else None
        if code is None and not isinstance(exc, aetcd.ClientError | OSError):
            # AttributeError on a garbled reply, grpc.aio.UsageError, InvalidStateError…:
            # a client-side surprise is still a failed call, worth retrying.
            return BackendUnavailable(
                f"{where} failed: unexpected {type(exc).__name__} in the etcd client: {text}",
                **context,
            )
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            if "larger than max" in text:  # beyond etcd's --max-request-bytes + gRPC overhead
                return Rejected(f"{where} refused a request this large [{text}]", **context)
            return Throttled(f"{where} is shedding load [{text}]", retry_after=None, **context)
        if _HTTP_THROTTLED.search(text):  # an HTTP/2 proxy in front of etcd said 429/503
            return Throttled(f"{where} is shedding load [{text}]", retry_after=None, **context)
        if "request is too large" in text:
            return Rejected(
                f"{where} refused a request this large (its --max-request-bytes) [{text}]",
                **context,
            )
        if "lease not found" in text:
            return LeaseLost(f"lease lost: {text}", **context)
        if "invalid auth token" in text:  # expired (etcd --auth-token-ttl): log in again
            return BackendUnavailable(f"{where}: auth token expired, logging in again", **context)
        if "user name is empty" in text:
            return Rejected(
                f"{where}: authentication is on and no user/password was given [{text}]",
                **context,
            )
        if "authentication failed" in text:
            return Rejected(f"{where}: wrong user name or password [{text}]", **context)
        if "permission denied" in text:
            subject = context.get("service")
            what = f"permission denied for service {subject!r}" if subject else "permission denied"
            return Rejected(
                f"{what}: the etcd user's role does not grant read/write on "
                f"{self.prefix}/{subject or ''} [{text}]",
                **context,
            )
        if code in _REJECTED_CODES or isinstance(
            exc, aetcd.exceptions.UnauthenticatedError | aetcd.InvalidArgumentError
        ):
            return Rejected(f"{where} refused the request: {text}", **context)
        if any(marker in text.lower() for marker in _TLS_MARKERS):
            return BackendUnavailable(
                f"TLS with {where} failed (check ca_file, cert_file, key_file and that the "
                f"member serves TLS): {text}",
                **context,
            )
        if not self.tls and "Socket closed" in text:
            text += " (if the member serves TLS, set ca_file or tls=true)"
        if "http1.x server" in text:
            text += " (an HTTP/1 server answered: is this etcd's client port?)"
        return BackendUnavailable(f"{where} failed: {text}", **context)

    async def _call(
        self,
        make: Callable[[aetcd.Client], Awaitable[T]],
        *,
        instance: ServiceInstance | None = None,
        service: str | None = None,
    ) -> T:
        """``make(client)`` on the member in use; when it is unavailable, on the next ones."""
        error: Exception
        for attempt in range(len(self.endpoints)):
            client = self.client
            try:
                # Every RPC carries the timeout as its deadline; this also bounds
                # what aetcd does around it (connecting, waiting for another connect).
                async with asyncio.timeout(self.timeout + 1.0):
                    result = await make(client)
                self._answering = True
                return result
            except asyncio.CancelledError:
                self._answering = False
                if not _closed_under_us():
                    raise
                error = BackendUnavailable(
                    f"etcd at {_hostport(self.host, self.port)}: {_CLOSED}",
                    **error_context("etcd", instance=instance, service=service),
                )
                if attempt == len(self.endpoints) - 1:
                    raise error from None
            except Exception as exc:
                error = await self._failed(exc, client, instance=instance, service=service)
                self._answering = isinstance(error, Rejected | LeaseLost)
                if not isinstance(error, BackendUnavailable) or attempt == len(self.endpoints) - 1:
                    raise error from exc
        raise AssertionError("unreachable")

    async def _failed(
        self,
        exc: BaseException,
        client: Any,
        *,
        instance: ServiceInstance | None = None,
        service: str | None = None,
    ) -> Exception:
        """Map a failure to our errors; drop a broken client and move to the next member."""
        error = self._error(exc, error_context("etcd", instance=instance, service=service))
        unavailable = isinstance(error, BackendUnavailable)
        # aetcd keeps a half-open client after a failed connect (auth, timeout), and
        # an expired auth token stays in its metadata: start afresh next time.
        # A call that timed out may sit on a dead connection (blackholed, half-open)
        # that the channel would keep until keepalive gives up: dial afresh.
        rpc_error = _rpc_error(exc)
        broken = (
            isinstance(exc, TimeoutError | aetcd.exceptions.UnauthenticatedError)
            or "invalid auth token" in _details(exc)
            or (rpc_error is not None and rpc_error.code() is grpc.StatusCode.DEADLINE_EXCEEDED)
            or (unavailable and rpc_error is None)  # a client-side surprise: start afresh
        )
        failover = unavailable and len(self.endpoints) > 1
        # Only the first failure of a client moves on: its other calls fail with it.
        if (broken or failover) and client is self._client and client is not None:
            self._client = None
            if failover:
                self._current = (self._current + 1) % len(self.endpoints)
                log.info(
                    "etcd member %s:%s failed; moving to %s:%s",
                    *self.endpoints[self._current - 1],
                    self.host,
                    self.port,
                    extra={"event": "failover", "backend": "etcd", "service": service},
                )
            await self._close_client(client)
        return error

    def _value(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        if status is not HealthStatus.PASSING and not self.format.carries_health:
            raise Rejected(health_error(self.format), **error_context("etcd", instance=instance))
        return self.format.encode(instance, status, note)

    def _parse(self, service: str, key: bytes, value: bytes) -> InstanceHealth | None:
        prefix = self._key(service)
        try:
            if not key.startswith(prefix) or b"/" in key[len(prefix) :]:
                raise ValueError("not a key of this service")
            return self.format.decode(service, key[len(prefix) :].decode(), value)
        except Exception as exc:  # a foreign or malformed value must not break listing
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "skipping %r: not a %s instance: %s",
                    key.decode(errors="replace"),
                    self.format.name,
                    exc,
                    extra={"event": "skip_foreign", "backend": "etcd", "service": service},
                )
            return None

    def validate_options(
        self,
        *,
        ttl: float,
        deregister_critical_after: float | None,
        on_unhealthy: str = "deregister",
    ) -> None:
        """Refuse ``on_unhealthy="critical"`` with a format that carries no health."""
        del ttl, deregister_critical_after
        if str(on_unhealthy) == "critical" and not self.format.carries_health:
            raise ConfigError(health_error(self.format), field="on_unhealthy")

    def validate(self, instance: ServiceInstance) -> None:
        """Raise :class:`Rejected` when etcd would refuse to store ``instance``.

        etcd refuses a request above its ``--max-request-bytes`` (option
        ``max_request_bytes``, 1.5 MiB by default), whatever the retries.
        """
        # The largest value we may write (a presence-only format writes no status).
        status = HealthStatus.CRITICAL if self.format.carries_health else HealthStatus.PASSING
        self._check_size(instance, self._value(instance, status, ""))

    def _check_size(self, instance: ServiceInstance, value: bytes) -> None:
        key = self._key_of(instance)
        size = len(key) + len(value) + _PUT_OVERHEAD
        if size > self.max_request_bytes:
            raise Rejected(
                f"the etcd entry of {instance.id!r} would be {size} bytes (key {len(key)}, "
                f"value {len(value)}), above etcd's request limit of {self.max_request_bytes} "
                "bytes (option max_request_bytes, the cluster's --max-request-bytes): "
                "shrink its meta or tags",
                **error_context("etcd", instance=instance),
            )

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        value = self._value(instance, status, note)
        self._check_size(instance, value)
        key = self._key_of(instance)
        seconds = max(1, math.ceil(ttl))
        # We choose the lease id: when a grant's answer is lost (it may have
        # landed all the same) or the put fails, we know which lease to revoke.
        lease_id = secrets.randbits(62) + 1
        try:
            await self._call(lambda c: c.lease(seconds, lease_id), instance=instance)
            await self._call(lambda c: c.put(key, value, lease=lease_id), instance=instance)
        except BaseException as exc:
            # (A duplicate id, once in 2**62, is someone else's lease: not ours to revoke.)
            if not isinstance(exc.__cause__, aetcd.exceptions.DuplicateLeaseError):
                self._orphans[lease_id] = (time.monotonic() + seconds, instance)
                self._sweep()
            raise
        if self._orphans:
            self._sweep()
        return Lease(instance, float(ttl), lease_id, "etcd")

    def _orphan(self, lease_id: int, seconds: float) -> None:
        """Revoke ``lease_id`` in the background (it expires by itself within ``seconds``)."""
        self._orphans[lease_id] = (time.monotonic() + seconds, None)
        self._sweep()

    def _group(self, ttl: float) -> LeaseGroup:
        seconds = max(1, math.ceil(ttl))
        group = self._groups.get(seconds)
        if group is None or group.loop is not running_loop():
            group = self._groups[seconds] = LeaseGroup(self, seconds)
        return group

    def _shared(self, lease: Lease) -> tuple[LeaseGroup, bytes, int]:
        """The group, key and lease id behind a lease from :meth:`register_shared`."""
        instance = lease.instance
        key = self._key_of(instance)
        group = self._groups.get(max(1, math.ceil(lease.ttl)))
        if group is None or not isinstance(lease.handle, int):
            raise LeaseLost(
                "shared lease not held by this backend (deregistered or closed)",
                **error_context("etcd", instance=instance),
            )
        return group, key, lease.handle

    async def register_shared(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        """Put ``instance`` on the shared lease of ``ttl`` (granted first if needed).

        The lease is renewed on one keepalive stream for all entries of that
        TTL, and puts of concurrent calls share transactions (see SharedLiveness).
        """
        value = self._value(instance, status, note)
        self._check_size(instance, value)
        key = self._key_of(instance)
        group = self._group(ttl)
        group.pending += 1
        try:
            lease_id = await group.ensure_lease()
            if group.claim(key, value, lease_id):  # put back already by the group
                return Lease(instance, float(ttl), lease_id, "etcd", shared=True)
            member = group.join(key, instance, value)
            try:
                member.revision = await group.put(key, value, lease_id)
            except BaseException:
                if group.members.get(key) is member:
                    group.members.pop(key)
                raise
            member.lease_id = lease_id
            if group.live_lease() != lease_id:  # lost while the put was in flight
                raise group.lost or LeaseLost("shared lease lost", backend="etcd")
        except RegistryError as exc:
            raise _own(exc, instance) from exc
        finally:
            group.pending -= 1
        if self._orphans:
            self._sweep()
        return Lease(instance, float(ttl), lease_id, "etcd", shared=True)

    def follow(self, lease: Lease, notify: Callable[[LivenessNews], None]) -> Callable[[], None]:
        """Call ``notify`` with news of ``lease``'s shared lease and entry (SharedLiveness)."""
        group, key, _ = self._shared(lease)
        return group.follow(key, notify)

    def last_renewal(self, lease: Lease) -> float | None:
        """``time.time()`` of the last renewal of ``lease``'s shared lease that etcd answered."""
        group = self._groups.get(max(1, math.ceil(lease.ttl)))
        if group is None or group.lease_id != lease.handle:
            return None
        return group.last_renewal()

    def _sweep(self) -> None:
        """Revoke the leases of failed registrations in the background, one sweep at a time."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._revoke_orphans(), name="etcd lease sweeper")

    async def _revoke_orphans(self) -> None:
        for lease_id, (expires, instance) in list(self._orphans.items()):
            if expires > time.monotonic():
                try:
                    await self._call(partial(_revoke, lease_id=lease_id), instance=instance)
                except LeaseLost:
                    pass  # never granted, or gone already
                except RegistryError as exc:
                    # Tried again after the next registration; it expires with its TTL anyway.
                    log.debug("lease %x of a failed registration kept for now: %s", lease_id, exc)
                    return
            self._orphans.pop(lease_id, None)

    async def heartbeat(self, lease: Lease) -> None:
        if lease.shared:  # from memory: the group renews
            group, key, lease_id = self._shared(lease)
            try:
                group.check(lease_id, key)
            except RegistryError as exc:
                raise _own(exc, lease.instance) from None
            return
        reply = await self._call(lambda c: c.refresh_lease(lease.handle), instance=lease.instance)
        if reply is None or reply.TTL <= 0:
            raise LeaseLost(
                f"lease {lease.handle:x} expired or not found"
                if isinstance(lease.handle, int)
                else "lease not found",
                backend="etcd",
                service=lease.instance.service,
                instance=lease.instance.id,
            )
        if self._orphans:  # etcd answers again: revoke what failed meanwhile
            self._sweep()

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        instance = lease.instance
        key = self._key_of(instance)
        kv = await self._call(lambda c: c.get(key), instance=instance)
        if kv is None or kv.lease != lease.handle:
            return None
        found = self._parse(instance.service, key, kv.value)
        if found is not None and kv.value == self.format.encode(instance, found.status, found.note):
            # What we wrote, whatever the format keeps of it (go-zero: host:port only).
            return InstanceHealth(instance, found.status, found.note)
        return found

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        instance = lease.instance
        value = self._value(instance, status, note)
        self._check_size(instance, value)
        if lease.shared:
            group, key, lease_id = self._shared(lease)
            member = group.members.get(key)
            try:
                group.check(lease_id, key)
                if member is None:
                    raise LeaseLost("deregistered", backend="etcd")
                revision = await group.put(key, value, lease_id)
            except RegistryError as exc:
                raise _own(exc, instance) from exc
            if group.members.get(key) is member:
                member.value, member.revision = value, revision
            return
        await self._call(
            lambda c: c.put(self._key_of(instance), value, lease=lease.handle),
            instance=instance,
        )

    async def update(
        self,
        lease: Lease,
        instance: ServiceInstance,
        *,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
    ) -> Lease:
        """Write ``instance`` (same id: same key, new tags or meta) on ``lease``'s own
        lease: one put, so a watcher sees one change and never a gap. LeaseLost when
        the lease is gone (etcd refuses a put on it): the registrar registers again."""
        value = self._value(instance, status, note)
        self._check_size(instance, value)
        if lease.shared:
            # The same key on the group's lease: the group's put, its member rewritten.
            return await self.register_shared(instance, ttl=lease.ttl, status=status, note=note)
        key = self._key_of(instance)
        await self._call(lambda c: c.put(key, value, lease=lease.handle), instance=instance)
        return Lease(instance, lease.ttl, lease.handle, "etcd")

    async def deregister(self, lease: Lease) -> None:
        """Revoke the lease: its keys go with it; a lease already gone is no error.

        A key someone else re-put under another lease is theirs and stays; a
        lease whose key was deleted is still revoked (no orphan for a TTL).
        A shared lease: delete only this key (while it is on our lease); the last
        entry of the group revokes the group's lease.
        """
        if lease.shared:
            await self._deregister_shared(lease)
            return
        try:
            await self._call(lambda c: c.revoke_lease(lease.handle), instance=lease.instance)
        except LeaseLost:
            pass
        except BackendUnavailable:
            # Revoked by the sweeper once etcd answers again, unless it expires first.
            if isinstance(lease.handle, int):
                self._orphans[lease.handle] = (time.monotonic() + lease.ttl, lease.instance)
            raise
        else:
            if self._orphans:
                self._sweep()

    async def _deregister_shared(self, lease: Lease) -> None:
        instance = lease.instance
        try:
            group, key, lease_id = self._shared(lease)
        except LeaseLost:
            # The whole group is gone already (closed); if this entry was its last and
            # the lease's revoke failed then, revoke it now (the entry goes with it).
            await self._revoke_left_behind(self._key_of(instance), instance)
            return
        member = group.members.get(key)
        if member is not None and member.adopted and member.lease_id is not None:
            # Put back by the group on its new lease, unclaimed: that entry goes.
            lease_id = member.lease_id
        if member is not None and member.lease_id in (lease_id, None):
            group.forget(key)
        deleted = False
        try:
            await self._call(
                partial(_delete_if_leased, key=key, lease_id=lease_id), instance=instance
            )
            deleted = True
        except LeaseLost:
            deleted = True
        finally:
            if not group.members and not group.pending and self._groups.get(group.seconds) is group:
                # The last one: its lease goes too (in the background if etcd does not answer).
                del self._groups[group.seconds]
                group_lease = group.lease_id
                await group.close(revoke=True)
                if not deleted and group_lease is not None and group_lease in self._orphans:
                    self._unrevoked[key] = group_lease
                    raise BackendUnavailable(
                        f"the shared lease {group_lease:x} of the last entry was not revoked",
                        **error_context("etcd", instance=instance),
                    )

    async def _revoke_left_behind(self, key: bytes, instance: ServiceInstance) -> None:
        """Revoke the lease a last member's failed deregistration left (see _unrevoked)."""
        lease_id = self._unrevoked.pop(key, None)
        if lease_id is None or lease_id not in self._orphans:
            return
        try:
            await self._call(partial(_revoke, lease_id=lease_id), instance=instance)
        except LeaseLost:
            pass
        except BaseException:
            self._unrevoked[key] = lease_id
            raise
        self._orphans.pop(lease_id, None)

    async def list(self, service: str) -> ServiceSnapshot:
        prefix = self._key(service)
        result = await self._call(lambda c: c.get_prefix(prefix), service=service)
        self._cluster_id = result.header.cluster_id
        found: dict[str, InstanceHealth] = {}
        for kv in result:
            health = self._parse(service, kv.key, kv.value)
            if health is not None:  # keyed like watch(): by the key's last segment
                found[kv.key[len(prefix) :].decode(errors="replace")] = health
        return ServiceSnapshot(service, result.header.revision, InstanceMap(found))

    async def services(self) -> Sequence[str]:
        """The services with at least one entry this backend's format reads, sorted.

        One read of every key under the prefix (a format without a prefix: the whole
        keyspace); keys ``<service>/<id>`` whose value does not decode are left out
        without a warning (they are not instances in this format).
        """
        root = self._root.encode()
        # An empty root is the whole keyspace: from "\0" to the end ("\0" as range end).
        start, end = (root, _prefix_end(root)) if root else (b"\0", b"\0")
        result = await self._call(lambda c: c.get_range(start, end))
        names: set[str] = set()
        for kv in result:
            service, slash, entry_id = kv.key[len(root) :].decode(errors="replace").rpartition("/")
            if not slash or not service or not entry_id or service in names:
                continue
            try:
                self.format.decode(service, entry_id, kv.value)
            except Exception:  # a foreign or malformed value: not an instance here
                continue
            names.add(service)
        return sorted(names)

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        if since is None:
            since = await self.list(service)
            yield since
        state = InstanceMap.of(since.instances)
        revision = since.index
        cluster_id = self._cluster_id
        prefix = self._key(service)
        client = await self._call(_connected, service=service)
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix,
                range_end=_prefix_end(prefix),
                start_revision=revision + 1,
                progress_notify=True,
            )
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield create
            await stop.wait()

        metadata = (*tuple(client.metadata or ()), _REQUIRE_LEADER)
        context: dict[str, str | None] = {"backend": "etcd", "service": service, "instance": None}
        parse = partial(self._parse, service)
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=metadata)
        try:
            async for response in self._responses(call):
                error = response_error(
                    response, revision=revision, cluster_id=cluster_id, context=context
                )
                if error is not None:
                    raise error
                if not response.events:
                    continue
                revision = max(revision, response.header.revision)
                new = apply_watch_events(state, prefix, response.events, parse)
                if new is not state:
                    state = new
                    yield ServiceSnapshot(service, revision, state)
        except RegistryError:
            raise
        except asyncio.CancelledError:
            if not _closed_under_us():
                raise
            raise BackendUnavailable(f"etcd watch ended: {_CLOSED}", **context) from None
        except Exception as exc:
            raise await self._failed(exc, client, service=service) from exc
        finally:
            stop.set()
            call.cancel()
        raise BackendUnavailable("etcd closed the watch stream", **context)

    async def _responses(self, call: Any) -> AsyncIterator[Any]:
        """A watch stream's responses; the first (``created``) must come within the timeout.

        Once created, keepalive pings bound the silence of a dead connection;
        before, a connection that stalls (accepted, never answered) would hang.
        """
        stream = aiter(call)
        try:
            async with asyncio.timeout(self.timeout):
                first = await anext(stream)
        except StopAsyncIteration:
            return
        yield first
        async for response in stream:
            yield response

    async def wait_connection_change(self) -> None:
        """Return when etcd went away, or came back after being away (see ConnectionProbe)."""
        await self._probe.wait_change()

    async def _hold_connection(self, connected: Callable[[], None]) -> bool:
        # A watch on a key nobody writes: it only ends when the stream breaks
        # (keepalive pings notice a dead connection or a frozen member).
        client = await self._call(_connected)
        key = f"{self.prefix}/.registry-agent-probe".encode()
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key))
            await stop.wait()

        metadata = (*tuple(client.metadata or ()), _REQUIRE_LEADER)
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=metadata)
        try:
            async for response in self._responses(call):
                if response.canceled and "permission denied" in response.cancel_reason:
                    # A role limited to some services: etcd answered, so it is up.
                    # Poll gently instead of holding a watch.
                    connected()
                    await asyncio.sleep(1.0)
                    return True
                if response.created:
                    connected()
                if response.canceled:
                    return False
        except asyncio.CancelledError:
            if not _closed_under_us():
                raise
        finally:
            stop.set()
            call.cancel()
        return False

    async def _close_client(self, client: aetcd.Client) -> None:
        # Closing cancels the channel's calls; bounded in case the channel is wedged.
        channel = getattr(client, "channel", None)
        with contextlib.suppress(Exception):  # already broken
            async with asyncio.timeout(self.timeout):
                await client.close()
        # aetcd shuts its watcher down before the channel, which can hang on a
        # wedged connection: the channel and its sockets are closed whatever happened.
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        """Stop the connection probe and close the channel (bounded by ``timeout``).

        Shared leases are revoked (their entries go with them) while etcd answers.
        """
        await self._probe.close()
        groups, self._groups = list(self._groups.values()), {}
        for group in groups:
            if group.loop is running_loop():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.timeout):
                        # (Its renewals tell whether etcd answers, whatever other calls met.)
                        await group.close(revoke=self._answering or group.error is None)
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and not sweeper.done() and sweeper.get_loop() is running_loop():
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        # A last try, only while etcd answers: close() must not wait on a dead one.
        if self._orphans and self._answering and self._client_loop is running_loop():
            with contextlib.suppress(TimeoutError):  # a last try, bounded
                async with asyncio.timeout(self.timeout):
                    await self._revoke_orphans()
        client, self._client = self._client, None
        if client is not None and self._client_loop is running_loop():
            await self._close_client(client)
