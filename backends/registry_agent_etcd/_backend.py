"""etcd backend: a JSON value under ``<prefix>/<service>/<id>`` attached to a lease."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import aetcd
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
from registry_agent._urls import Option, opt_duration, opt_str, parse_backend_url, take_options

__all__ = ["EtcdBackend"]

log = logging.getLogger("registry_agent.etcd")
T = TypeVar("T")

# gRPC waits up to 120 s (1 s at first, x1.6) between reconnects to a server that
# went away, failing every call meanwhile: a restarted etcd would be ignored for
# seconds. Our own retries already back off, so reconnect promptly.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

# etcd's clientv3.WithRequireLeader: a member cut off from the leader ends the
# stream instead of leaving it silent.
_REQUIRE_LEADER = ("hasleader", "true")


def _prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


class EtcdBackend:
    """``etcd://host:port``: registers instances as leased keys in etcd.

    Options (URL query or keywords):

    ``prefix``
        Key prefix, default ``/services``: keys are ``<prefix>/<service>/<id>``.
    ``user``, ``password``
        etcd authentication (also accepted as ``etcd://user:password@host:port``).
    ``timeout``
        Per-request timeout, default ``5s``.
    """

    scheme: ClassVar[str] = "etcd"
    _OPTIONS: ClassVar[Mapping[str, Option]] = {
        "prefix": opt_str,
        "user": opt_str,
        "password": opt_str,
        "timeout": opt_duration,
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
    ) -> None:
        if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
            raise ConfigError(
                "expected a key prefix like /services (leading '/', no trailing '/'), "
                f"got {prefix!r}",
                field="backend.prefix",
            )
        if (user is None) != (password is None):
            raise ConfigError("user and password go together", field="backend.user")
        self.host = host
        self.port = port
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
        if len(parsed.endpoints) != 1:
            raise ConfigError(
                f"expected exactly one host:port in {parsed.redacted()}", field="backend"
            )
        ((host, port),) = parsed.endpoints
        given = dict(options)
        if parsed.username is not None:
            if "user" in given:
                raise ConfigError("user given both in the URL and as an option", field="backend")
            given["user"] = parsed.username
            if parsed.password is not None:
                given["password"] = parsed.password
        return cls(host, port, **take_options("etcd", given, cls._OPTIONS))

    def __repr__(self) -> str:
        return f"EtcdBackend(etcd://{self.host}:{self.port}, prefix={self.prefix!r})"

    @property
    def client(self) -> aetcd.Client:
        """aetcd's client (created on first use, in the running process and loop)."""
        loop = running_loop()
        if self._client is not None and self._client_loop is not loop:
            # Used from another event loop (asyncio.run twice): its channel is unusable there.
            self._client = None
        if self._client is None:
            self._client_loop = loop
            self._client = aetcd.Client(
                host=self.host,
                port=self.port,
                username=self._user,
                password=self._password,
                timeout=self.timeout,
                options=_CHANNEL_OPTIONS,
            )
        return self._client

    def _key(self, service: str, instance_id: str = "") -> bytes:
        return f"{self.prefix}/{service}/{instance_id}".encode()

    def _error(self, exc: BaseException, context: dict[str, str | None]) -> Exception:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, grpc.aio.AioRpcError):
            text = exc.details() or str(exc.code())
        if "lease not found" in text:
            return LeaseLost(f"lease lost: {text}", **context)
        if (
            isinstance(exc, aetcd.exceptions.UnauthenticatedError)
            or "permission denied" in text
            or "authentication failed" in text
            or "invalid auth token" in text
        ):
            return Rejected(f"etcd refused the request: {text}", **context)
        if isinstance(exc, aetcd.exceptions.InvalidArgumentError):
            return Rejected(f"etcd refused the request: {text}", **context)
        return BackendUnavailable(f"etcd at {self.host}:{self.port} failed: {text}", **context)

    async def _call(
        self,
        call: Awaitable[T],
        *,
        instance: ServiceInstance | None = None,
        service: str | None = None,
    ) -> T:
        context = error_context("etcd", instance=instance, service=service)
        try:
            return await call
        except (aetcd.ClientError, grpc.aio.AioRpcError, OSError, TimeoutError) as exc:
            await self._drop_client_if_broken(exc)
            raise self._error(exc, context) from exc

    async def _drop_client_if_broken(self, exc: BaseException) -> None:
        # aetcd keeps a half-open client after a failed connect (auth, timeout):
        # start afresh next time.
        if isinstance(exc, TimeoutError | aetcd.exceptions.UnauthenticatedError):
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):  # already broken
                    await client.close()

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
        lease = await self._call(self.client.lease(max(1, math.ceil(ttl))), instance=instance)
        await self._call(
            self.client.put(
                self._key(instance.service, instance.id),
                self._value(instance, status, note),
                lease=lease.id,
            ),
            instance=instance,
        )
        return Lease(instance, float(ttl), int(lease.id), "etcd")

    async def heartbeat(self, lease: Lease) -> None:
        reply = await self._call(self.client.refresh_lease(lease.handle), instance=lease.instance)
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
        kv = await self._call(self.client.get(key), instance=instance)
        if kv is None or kv.lease != lease.handle:
            return None
        return self._parse(instance.service, key, kv.value)

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        instance = lease.instance
        await self._call(
            self.client.put(
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
            await self._call(self.client.revoke_lease(lease.handle), instance=lease.instance)

    async def list(self, service: str) -> ServiceSnapshot:
        prefix = self._key(service)
        result = await self._call(self.client.get_prefix(prefix), service=service)
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
        client = self.client
        await self._call(client.connect(), service=service)
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
            raise self._error(exc, context) from exc
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
