"""etcd backend: a JSON value under ``<prefix>/<service>/<id>`` attached to a lease."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
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
    Rejected,
    RevisionCompacted,
    ServiceInstance,
    ServiceSnapshot,
)
from registry_agent._backend import error_context, running_loop
from registry_agent._probe import ConnectionProbe
from registry_agent._tls import TLSFiles
from registry_agent._urls import (
    Option,
    opt_bool,
    opt_duration,
    opt_str,
    parse_backend_url,
    take_options,
)

__all__ = ["EtcdBackend"]

log = logging.getLogger("registry_agent.etcd")
T = TypeVar("T")

# gRPC waits up to 120 s (1 s at first, x1.6) between reconnects to a server that
# went away, failing every call meanwhile: a restarted etcd would be ignored for
# seconds. Our own retries already back off, so reconnect promptly. Keepalive
# pings find a member that hangs (frozen, cut off) under an open watch stream;
# etcd refuses pings more often than every 5 s.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}

# etcd's clientv3.WithRequireLeader: a member cut off from the leader ends the
# stream instead of leaving it silent.
_REQUIRE_LEADER = ("hasleader", "true")

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


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or str(exc.code())
    return str(exc) or type(exc).__name__


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connected(client: aetcd.Client) -> aetcd.Client:
    await client.connect()
    return client


def _prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


class EtcdBackend:
    """``etcd://host:port[,host:port…]``: registers instances as leased keys in etcd.

    With several endpoints (members of one cluster) the backend talks to one at
    a time and moves to the next when a call to it fails or times out; leases
    live in the cluster, so registrations survive the move. Watches require a
    leader: a member cut off in a minority ends them, and they resume exactly
    on another member.

    Options (URL query or keywords):

    ``prefix``
        Key prefix, default ``/services``: keys are ``<prefix>/<service>/<id>``.
    ``user``, ``password``
        etcd authentication (also accepted as ``etcd://user:password@host:port``).
    ``ca_file``, ``cert_file``, ``key_file``
        TLS: the PEM CA bundle that signed the members' certificates (giving
        any of them turns TLS on), and a client certificate and key for
        ``--client-cert-auth`` clusters.
    ``tls``
        ``true`` for TLS verified against the system store (no files).
    ``timeout``
        Per-request timeout, default ``5s``.
    """

    scheme: ClassVar[str] = "etcd"
    _OPTIONS: ClassVar[Mapping[str, Option]] = {
        "prefix": opt_str,
        "user": opt_str,
        "password": opt_str,
        "timeout": opt_duration,
        "ca_file": opt_str,
        "cert_file": opt_str,
        "key_file": opt_str,
        "tls": opt_bool,
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2379,
        *,
        prefix: str = "/services",
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        endpoints: Sequence[tuple[str, int]] | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls: bool | None = None,
    ) -> None:
        if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
            raise ConfigError(
                "expected a key prefix like /services (leading '/', no trailing '/'), "
                f"got {prefix!r}",
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
        self.timeout = timeout
        self._user = user
        self._password = password
        self._client: aetcd.Client | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._cluster_id: int | None = None
        self._probe = ConnectionProbe(self._hold_connection)
        self._warned: set[bytes] = set()

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
        return f"EtcdBackend(etcd://{hosts}, prefix={self.prefix!r})"

    @property
    def host(self) -> str:
        """Host of the member in use."""
        return self.endpoints[self._current][0]

    @property
    def port(self) -> int:
        """Port of the member in use."""
        return self.endpoints[self._current][1]

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
                options=_CHANNEL_OPTIONS,
                credentials=self._credentials,
            )
        return self._client

    def _key(self, service: str, instance_id: str = "") -> bytes:
        return f"{self.prefix}/{service}/{instance_id}".encode()

    def _error(self, exc: BaseException, context: dict[str, str | None]) -> Exception:
        text = _details(exc)
        where = f"etcd at {_hostport(self.host, self.port)}"
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
        if isinstance(exc, aetcd.exceptions.UnauthenticatedError | aetcd.InvalidArgumentError):
            return Rejected(f"{where} refused the request: {text}", **context)
        if any(marker in text.lower() for marker in _TLS_MARKERS):
            return BackendUnavailable(
                f"TLS with {where} failed (check ca_file, cert_file, key_file and that the "
                f"member serves TLS): {text}",
                **context,
            )
        if not self.tls and "Socket closed" in text:
            text += " (if the member serves TLS, set ca_file or tls=true)"
        return BackendUnavailable(f"{where} failed: {text}", **context)

    async def _call(
        self,
        make: Callable[[aetcd.Client], Awaitable[T]],
        *,
        instance: ServiceInstance | None = None,
        service: str | None = None,
    ) -> T:
        """``make(client)`` on the member in use; when it is unavailable, on the next ones."""
        for attempt in range(len(self.endpoints)):
            client = self.client
            try:
                return await make(client)
            except (aetcd.ClientError, grpc.aio.AioRpcError, OSError, TimeoutError) as exc:
                error = await self._failed(exc, client, instance=instance, service=service)
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
        broken = isinstance(exc, TimeoutError | aetcd.exceptions.UnauthenticatedError) or (
            "invalid auth token" in _details(exc)
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
            with contextlib.suppress(Exception):  # already broken
                await client.close()
        return error

    def _value(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        data: dict[str, Any] = {**instance.to_dict(), "status": str(status)}
        if note:
            data["note"] = note
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    def _parse(self, service: str, key: bytes, value: bytes) -> InstanceHealth | None:
        try:
            data = json.loads(value)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            instance = ServiceInstance.from_dict(data)
            if instance.service != service:
                raise ValueError(f"service {instance.service!r} under {service!r}")
            if key != self._key(service, instance.id):
                raise ValueError(f"id {instance.id!r} does not match the key")
            status = HealthStatus(data.get("status", "passing"))
            note = data.get("note", "")
            return InstanceHealth(instance, status, note if isinstance(note, str) else "")
        except Exception as exc:  # a foreign or malformed value must not break listing
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "skipping %r: not a registry-agent instance: %s",
                    key.decode(errors="replace"),
                    exc,
                    extra={"event": "skip_foreign", "backend": "etcd", "service": service},
                )
            return None

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        lease = await self._call(lambda c: c.lease(max(1, math.ceil(ttl))), instance=instance)
        await self._call(
            lambda c: c.put(
                self._key(instance.service, instance.id),
                self._value(instance, status, note),
                lease=lease.id,
            ),
            instance=instance,
        )
        return Lease(instance, float(ttl), int(lease.id), "etcd")

    async def heartbeat(self, lease: Lease) -> None:
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

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        instance = lease.instance
        key = self._key(instance.service, instance.id)
        kv = await self._call(lambda c: c.get(key), instance=instance)
        if kv is None or kv.lease != lease.handle:
            return None
        return self._parse(instance.service, key, kv.value)

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        instance = lease.instance
        await self._call(
            lambda c: c.put(
                self._key(instance.service, instance.id),
                self._value(instance, status, note),
                lease=lease.handle,
            ),
            instance=instance,
        )

    async def deregister(self, lease: Lease) -> None:
        # Revoking the lease deletes its keys atomically; a key someone else
        # re-put under another lease is theirs and stays.
        with contextlib.suppress(LeaseLost):
            await self._call(lambda c: c.revoke_lease(lease.handle), instance=lease.instance)

    async def list(self, service: str) -> ServiceSnapshot:
        prefix = self._key(service)
        result = await self._call(lambda c: c.get_prefix(prefix), service=service)
        self._cluster_id = result.header.cluster_id
        found: dict[str, InstanceHealth] = {}
        for kv in result:
            health = self._parse(service, kv.key, kv.value)
            if health is not None:
                found[health.instance.id] = health
        return ServiceSnapshot(service, result.header.revision, MappingProxyType(found))

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        if since is None:
            since = await self.list(service)
            yield since
        state = dict(since.instances)
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
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=metadata)
        try:
            async for response in call:
                header = response.header
                if cluster_id is not None and header.cluster_id and header.cluster_id != cluster_id:
                    raise RevisionCompacted(
                        "etcd cluster changed (restarted empty?): list again",
                        compacted_revision=0,
                        **context,
                    )
                if response.created and header.revision < revision:
                    raise RevisionCompacted(
                        f"etcd is at revision {header.revision}, behind {revision}: list again",
                        compacted_revision=0,
                        **context,
                    )
                if response.compact_revision:
                    raise RevisionCompacted(
                        f"revision {revision + 1} was compacted (now {response.compact_revision})",
                        compacted_revision=response.compact_revision,
                        **context,
                    )
                if response.canceled:
                    raise BackendUnavailable(
                        f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}",
                        **context,
                    )
                if not response.events:
                    continue
                changed = False
                for event in response.events:
                    kv = event.kv
                    instance_id = kv.key[len(prefix) :].decode(errors="replace")
                    if event.type == rpc.Event.DELETE:
                        changed |= state.pop(instance_id, None) is not None
                        continue
                    health = self._parse(service, kv.key, kv.value)
                    if health is None:
                        changed |= state.pop(instance_id, None) is not None
                    elif state.get(instance_id) != health:
                        state[instance_id] = health
                        changed = True
                    revision = max(revision, kv.mod_revision)
                revision = max(revision, header.revision)
                if changed:
                    yield ServiceSnapshot(service, revision, MappingProxyType(dict(state)))
        except grpc.aio.AioRpcError as exc:
            raise await self._failed(exc, client, service=service) from exc
        finally:
            stop.set()
            call.cancel()
        raise BackendUnavailable("etcd closed the watch stream", **context)

    async def wait_connection_change(self) -> None:
        """Return when etcd went away, or came back after being away (see ConnectionProbe)."""
        await self._probe.wait_change()

    async def _hold_connection(self, connected: Callable[[], None]) -> bool:
        # A watch on a key nobody writes: it only ends when the stream breaks.
        client = self.client
        await client.connect()
        key = f"{self.prefix}/.registry-agent-probe".encode()
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key))
            await stop.wait()

        metadata = (*tuple(client.metadata or ()), _REQUIRE_LEADER)
        call = rpc.WatchStub(client.channel).Watch(requests(), metadata=metadata)
        try:
            async for response in call:
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
        finally:
            stop.set()
            call.cancel()
        return False

    async def close(self) -> None:
        await self._probe.close()
        client, self._client = self._client, None
        if client is not None and self._client_loop is running_loop():
            await client.close()
