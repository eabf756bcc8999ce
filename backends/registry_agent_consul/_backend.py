"""Consul backend: an agent service with a TTL check ``service:<id>``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import consul
import consul.callback
import httpx

from registry_agent import (
    BackendUnavailable,
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Lease,
    LeaseLost,
    Rejected,
    ServiceInstance,
    ServiceSnapshot,
)
from registry_agent._backend import error_context, running_loop
from registry_agent._probe import ConnectionProbe
from registry_agent._tls import TLSFiles
from registry_agent._urls import (
    Option,
    opt_choice,
    opt_duration,
    opt_str,
    parse_backend_url,
    read_secret_file,
    take_options,
)
from registry_agent_consul._http import AsyncConsul

__all__ = ["ConsulBackend"]

log = logging.getLogger("registry_agent.consul")
T = TypeVar("T")

_LOST_MARKERS = ("does not have associated TTL", "Unknown check", "Unknown service")
# A pause longer than this between two queries may hide an agent restart.
_RESUME_GAP = 1.0
# Consul never reaps a critical service sooner than this.
_MIN_DEREGISTER_AFTER = 60.0


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _check_id(instance_id: str) -> str:
    return f"service:{instance_id}"


def _token(token: str | None, token_file: str | None) -> str | None:
    """The ACL token: explicit, else from its file, else Consul's own variables."""
    if token is not None and token_file is not None:
        raise ConfigError("give token or token_file, not both", field="backend.token_file")
    if token is None and token_file is None:
        token = os.environ.get("CONSUL_HTTP_TOKEN") or None
        token_file = None if token else os.environ.get("CONSUL_HTTP_TOKEN_FILE") or None
    if token_file is not None:
        token = read_secret_file(token_file, field="backend.token_file")
    return token or None


class ConsulBackend:
    """``consul://host:port``: registers in a Consul agent (normally this host's).

    Options (URL query or keywords):

    ``token``, ``token_file``
        ACL token (or a file holding it), sent as the ``X-Consul-Token`` header,
        never in a URL. Defaults to ``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_TOKEN_FILE``
        from the environment, as Consul's own CLI; an explicit one wins.
    ``dc``
        Datacenter for reads (defaults to the agent's).
    ``scheme``
        ``http`` or ``https``; ``https`` when a TLS file is given, else ``http``.
    ``ca_file``, ``cert_file``, ``key_file``
        PEM CA bundle that signed the agent's certificate (default: the system
        store), and a client certificate and key for agents that verify clients
        (``verify_incoming``). Default to ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``,
        ``CONSUL_CLIENT_KEY``.
    ``timeout``
        Per-request timeout, default ``5s``.
    ``wait``
        Longest a blocking query waits before it is re-issued, default ``60s``.
    ``deregister_critical_after``
        Consul removes a service critical this long, default ``90s``; Consul's
        floor is 1 minute and its reaper runs about every 30 seconds.
    """

    scheme: ClassVar[str] = "consul"
    _OPTIONS: ClassVar[Mapping[str, Option]] = {
        "token": opt_str,
        "token_file": opt_str,
        "dc": opt_str,
        "scheme": opt_choice("http", "https"),
        "timeout": opt_duration,
        "wait": opt_duration,
        "deregister_critical_after": opt_duration,
        "ca_file": opt_str,
        "cert_file": opt_str,
        "key_file": opt_str,
    }

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        token: str | None = None,
        token_file: str | None = None,
        dc: str | None = None,
        scheme: str | None = None,
        timeout: float = 5.0,
        wait: float = 60.0,
        deregister_critical_after: float = 90.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if deregister_critical_after < _MIN_DEREGISTER_AFTER:
            raise ConfigError(
                f"Consul's floor is 60s, got {deregister_critical_after:g}s",
                field="backend.deregister_critical_after",
            )
        self.host = host
        self.port = port
        self.dc = dc
        self.timeout = timeout
        self.wait = wait
        self.deregister_critical_after = deregister_critical_after
        self._token = _token(token, token_file)
        env = os.environ
        self._tls = TLSFiles(
            ca_file or env.get("CONSUL_CACERT") or None,
            cert_file or env.get("CONSUL_CLIENT_CERT") or None,
            key_file or env.get("CONSUL_CLIENT_KEY") or None,
        )
        self._scheme = scheme or ("https" if self._tls.enabled else "http")
        if self._scheme == "http" and self._tls.enabled:
            raise ConfigError(
                "TLS files were given but scheme is http: use scheme=https (or leave it out)",
                field="backend.scheme",
            )
        self._verify: ssl.SSLContext | bool = (
            self._tls.ssl_context() if self._scheme == "https" else True
        )
        self._api: AsyncConsul | None = None
        self._api_loop: asyncio.AbstractEventLoop | None = None
        # Status last set per check, so a heartbeat renews the TTL without changing it.
        self._status: dict[str, tuple[HealthStatus, str]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._probe = ConnectionProbe(self._hold_connection)

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> ConsulBackend:
        """Build from ``consul://host:port?token=…&dc=…``."""
        parsed = parse_backend_url(url, default_port=8500)
        if len(parsed.endpoints) != 1:
            raise ConfigError(
                f"expected exactly one host:port (the local Consul agent) in {parsed.redacted()}",
                field="backend",
            )
        ((host, port),) = parsed.endpoints
        return cls(host, port, **take_options("consul", options, cls._OPTIONS))

    def __repr__(self) -> str:
        return f"ConsulBackend({self._scheme}://{self.host}:{self.port})"

    @property
    def api(self) -> AsyncConsul:
        """py-consul's API object (created on first use, in the running process and loop)."""
        loop = running_loop()
        if self._api is not None and self._api_loop is not loop:
            # Used from another event loop (asyncio.run twice): the old pool is unusable there.
            self._api = None
        if self._api is None:
            self._api_loop = loop
            api = AsyncConsul(
                host=self.host,
                port=self.port,
                scheme=self._scheme,
                dc=self.dc,
                verify=self._verify,
                timeout=self.timeout,
            )
            # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; we don't.
            api.token = self._token
            self._api = api
        return self._api

    async def _call(
        self,
        call: Awaitable[T],
        *,
        instance: ServiceInstance | None = None,
        service: str | None = None,
    ) -> T:
        context = error_context("consul", instance=instance, service=service)
        try:
            return await call
        except (httpx.TimeoutException, httpx.TransportError, OSError) as exc:
            where = f"Consul agent at {self._scheme}://{self.host}:{self.port}"
            if isinstance(exc, ssl.SSLError) or "SSL" in str(exc):
                raise BackendUnavailable(
                    f"TLS with {where} failed (check ca_file, cert_file, key_file and that "
                    f"the agent serves HTTPS on this port): {exc}",
                    **context,
                ) from exc
            raise BackendUnavailable(f"{where} unreachable: {exc!r}", **context) from exc
        except consul.ACLPermissionDenied as exc:
            raise Rejected(self._denied(str(exc), instance, service), **context) from exc
        except consul.NotFound as exc:
            raise LeaseLost(f"not found: {exc}", **context) from exc
        except consul.ConsulException as exc:
            text = str(exc)
            if any(marker in text for marker in _LOST_MARKERS):
                raise LeaseLost(f"TTL check lost: {text}", **context) from exc
            if "HTTP request to an HTTPS server" in text:
                raise Rejected(
                    f"the Consul agent at {self.host}:{self.port} serves HTTPS: set "
                    "scheme=https and ca_file (or CONSUL_CACERT)",
                    **context,
                ) from exc
            if text[:1] == "4" or isinstance(
                exc, consul.base.ACLDisabled | consul.exceptions.ClientError
            ):
                raise Rejected(f"Consul refused the request: {text}", **context) from exc
            raise BackendUnavailable(f"Consul error: {text}", **context) from exc

    def _denied(self, text: str, instance: ServiceInstance | None, service: str | None) -> str:
        subject = instance.service if instance is not None else service
        what = f"permission denied for service {subject!r}" if subject else "permission denied"
        if "ACL not found" in text:
            why = "Consul does not know this ACL token (wrong, expired or deleted)"
        elif self._token is None:
            why = "no ACL token was given (token, token_file or CONSUL_HTTP_TOKEN)"
        else:
            why = "the ACL token's policy does not allow it"
        return f"{what}: {why} [Consul: {text.strip() or '403'}]"

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        reap_after = deregister_critical_after or self.deregister_critical_after
        if reap_after < _MIN_DEREGISTER_AFTER:
            raise ConfigError(
                f"Consul's floor is 60s, got {reap_after:g}s", field="deregister_critical_after"
            )
        check_id = _check_id(instance.id)
        check = {
            "CheckID": check_id,
            "Name": f"registry-agent TTL for {instance.id}",
            "TTL": _go_duration(ttl),
            "Status": str(status),
            "Notes": "renewed by registry-agent",
            "DeregisterCriticalServiceAfter": _go_duration(reap_after),
        }
        await self._call(
            self.api.agent.service.register(
                instance.service,
                service_id=instance.id,
                address=instance.address,
                port=instance.port,
                tags=list(instance.tags),
                meta=dict(instance.meta),
                check=check,
                replace_existing_checks=True,
            ),
            instance=instance,
        )
        lease = Lease(instance, float(ttl), check_id, "consul")
        self._status[check_id] = (status, note)
        if note:  # Consul takes no output at registration; set it with the status
            await self._update_check(lease, status, note)
        return lease

    async def _update_check(self, lease: Lease, status: HealthStatus, note: str) -> None:
        check_id = str(lease.handle)
        checks = self.api.agent.check
        update = {
            HealthStatus.PASSING: checks.ttl_pass,
            HealthStatus.WARNING: checks.ttl_warn,
            HealthStatus.CRITICAL: checks.ttl_fail,
        }[status]
        ok = await self._call(update(check_id, notes=note or None), instance=lease.instance)
        if ok is False:  # py-consul answers False on 404
            raise LeaseLost(
                f"TTL check {check_id} not found",
                backend="consul",
                service=lease.instance.service,
                instance=lease.instance.id,
            )

    async def heartbeat(self, lease: Lease) -> None:
        status, note = self._status.get(str(lease.handle), (HealthStatus.PASSING, ""))
        await self._update_check(lease, status, note)

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        await self._update_check(lease, status, note)
        self._status[str(lease.handle)] = (status, note)

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        instance = lease.instance

        def parse(response: Any) -> Any:
            # 200 passing, 429 warning, 503 critical, 404 unknown: all carry JSON.
            if response.code not in (200, 404, 429, 503):
                consul.callback.CB._status(response)
                raise consul.ConsulException(f"{response.code} {response.body}")
            return json.loads(response.body) if response.code != 404 else None

        path = f"/v1/agent/health/service/id/{urllib.parse.quote(instance.id, safe='')}"
        data = await self._call(
            self.api.http.get(
                parse, path, params=[("format", "json")], headers=self.api.prepare_headers()
            ),
            instance=instance,
        )
        if not data or not data.get("Service"):
            return None
        ours = [c for c in data.get("Checks") or () if c.get("CheckID") == lease.handle]
        entry = {"Service": data["Service"], "Checks": ours}
        if not ours:
            return None  # the service is there but our TTL check is not: register again
        return self._parse_entries(instance.service, [entry]).get(instance.id)

    async def deregister(self, lease: Lease) -> None:
        self._status.pop(str(lease.handle), None)
        with contextlib.suppress(LeaseLost):  # already gone: deregistering is idempotent
            await self._call(
                self.api.agent.service.deregister(lease.instance.id), instance=lease.instance
            )

    def _parse_entries(self, service: str, entries: Any) -> dict[str, InstanceHealth]:
        found: dict[str, InstanceHealth] = {}
        for entry in entries or ():
            try:
                svc = entry["Service"]
                node = entry.get("Node") or {}
                instance = ServiceInstance(
                    service=svc["Service"],
                    id=svc["ID"],
                    address=svc.get("Address") or node.get("Address") or "",
                    port=svc.get("Port"),
                    tags=tuple(svc.get("Tags") or ()),
                    meta=svc.get("Meta") or {},
                )
                checks = entry.get("Checks") or ()
                status = HealthStatus.worst(HealthStatus(c["Status"]) for c in checks)
                ours = [c for c in checks if c.get("CheckID") == _check_id(instance.id)]
                worst = [c for c in checks if c["Status"] == status] if checks else []
                note = str(((ours or worst or [{}])[0]).get("Output") or "")
            except Exception as exc:  # a foreign or malformed entry must not break listing
                key = (
                    service,
                    str(entry.get("Service", {}).get("ID", "?"))
                    if isinstance(entry, dict) and isinstance(entry.get("Service"), dict)
                    else "?",
                )
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning(
                        "skipping an entry of service %r that is not a valid instance: %s",
                        service,
                        exc,
                        extra={"event": "skip_foreign", "backend": "consul", "service": service},
                    )
                continue
            found[instance.id] = InstanceHealth(instance, status, note)
        return found

    async def _health(self, service: str, index: int) -> tuple[int, dict[str, InstanceHealth]]:
        kwargs: dict[str, Any] = {"dc": self.dc} if self.dc else {}
        if index > 0:
            kwargs.update(index=str(index), wait=_go_duration(self.wait))
        raw_index, entries = await self._call(
            self.api.health.service(service, **kwargs), service=service
        )
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise BackendUnavailable(
                f"Consul sent an invalid X-Consul-Index {raw_index!r}",
                backend="consul",
                service=service,
            ) from None
        return new_index, self._parse_entries(service, entries)

    async def list(self, service: str) -> ServiceSnapshot:
        index, found = await self._health(service, 0)
        return ServiceSnapshot(service, index, MappingProxyType(found))

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        # An index is only meaningful to the agent incarnation that issued it: after
        # a restart (wiped or not) it may be ahead of the new agent's, and a blocking
        # query would then wait out the whole `wait`. So the index is re-read without
        # blocking whenever the agent may have changed under us: when resuming,
        # after a blocking query that returned without a change (wait expired, or
        # the agent shut down), and after a pause on our side (frozen, slow consumer).
        last = dict(since.instances) if since is not None else None
        index = 0
        received = time.monotonic()
        while True:
            gap = time.monotonic() - received
            blocking = index > 0 and gap < _RESUME_GAP
            started = time.monotonic()
            new_index, found = await self._health(service, index if blocking else 0)
            received = time.monotonic()
            if last is None or found != last:
                last = found
                yield ServiceSnapshot(service, new_index, MappingProxyType(found))
                index = max(new_index, 0)
            elif blocking and new_index == index:
                index = 0  # returned without a change: re-read once without blocking
                if received - started < 0.01:
                    await asyncio.sleep(0.05)  # it did not even block: never spin
            else:
                index = max(new_index, 0)

    async def wait_connection_change(self) -> None:
        """Return when the agent went away, or came back after being away (see ConnectionProbe)."""
        await self._probe.wait_change()

    async def _hold_connection(self, connected: Callable[[], None]) -> bool:
        # A hash-based blocking query on one of our own services (only needs read
        # access to it): it ends early when the agent goes away.
        # Any one of our checks will do; picked without copying them all (1,000s).
        check_id = next(iter(self._status), None)
        if check_id is None:
            await self.api.status.leader()
            connected()
            await asyncio.sleep(1.0)
            return True
        service_id = check_id.removeprefix("service:")
        path = f"/v1/agent/service/{urllib.parse.quote(service_id, safe='')}"
        content_hash = ""
        while check_id in self._status:
            params = [("hash", content_hash), ("wait", "30s")] if content_hash else []
            started = time.monotonic()
            code, new_hash = await self.api.http.get(
                lambda r: (r.code, r.headers.get("X-Consul-ContentHash", "")),
                path,
                params=params,
                headers=self.api.prepare_headers(),
            )
            connected()
            if code != 200 or (new_hash == content_hash and time.monotonic() - started < 0.05):
                await asyncio.sleep(1.0)  # our entry is gone, or no blocking here: poll gently
                return True
            content_hash = new_hash
        return True

    async def close(self) -> None:
        await self._probe.close()
        api, self._api = self._api, None
        if api is not None and self._api_loop is running_loop():
            await api.http.close()
