"""Consul backend: an agent service with a TTL check ``service:<id>``."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import re
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import consul
import consul.callback
import httpx

from registry_agent import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    HealthStatus,
    InstanceHealth,
    Lease,
    LeaseLost,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    ServiceSnapshot,
    Throttled,
)
from registry_agent.backend import (
    REAP_CEILING,
    ConnectionProbe,
    LivenessNews,
    Option,
    TLSFiles,
    error_context,
    opt_choice,
    opt_duration,
    opt_str,
    parse_backend_url,
    read_secret_file,
    registry_address,
    running_loop,
    take_options,
)
from registry_agent_consul._flavors import (
    FLAVORS,
    read_instance,
    read_written,
    validate_flavor,
    write_entry,
    written_weight,
)
from registry_agent_consul._heartbeat import (
    HEARTBEAT_NAME,
    HeartbeatCalls,
    HeartbeatGroup,
    Member,
    alias_id,
    health_id,
)
from registry_agent_consul._http import (
    AsyncConsul,
    ConsulHTTPError,
    handles_errors,
)

__all__ = ["ConsulBackend"]

_ENDPOINT_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")


def _check_agent_scheme(scheme: object) -> None:
    """Refuse a ``scheme`` that is not how we talk to the agent, pointing a service's
    scheme (``grpc``…) to ``endpoint_scheme``."""
    if scheme is None or scheme in ("http", "https"):
        return
    hint = (
        f"; to read a kratos entry's endpoint of that scheme, use endpoint_scheme={scheme}"
        if isinstance(scheme, str) and _ENDPOINT_SCHEME.fullmatch(scheme)
        else ""
    )
    raise ConfigError(
        f"expected one of http, https (how we talk to the Consul agent), got {scheme!r}{hint}",
        field="backend.scheme",
    )


log = logging.getLogger("registry_agent.consul")
T = TypeVar("T")

_LOST_MARKERS = ("does not have associated TTL", "Unknown check", "Unknown service")
# A pause longer than this between two queries may hide an agent restart.
# Consul never reaps a critical service sooner than this.
_MIN_DEREGISTER_AFTER = 60.0
# Consul's own limits on service meta (structs.validateMetaPair, Consul 1.8).
_META_MAX_KEYS = 64
_META_KEY_MAX = 128
_META_VALUE_MAX = 512
#: The largest native weight Consul takes: ``Weights.Passing`` is also the DNS SRV
#: weight, a 16-bit field (Consul 1.8 answers 400 "Invalid Weights: DNS Weight must
#: be between 0 and 65535" to anything larger, on every write).
_WEIGHT_MAX = 65535
_META_RESERVED = "consul-"
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# The health check is a TTL check only so we can set it; it must never expire.
_HEALTH_TTL = "100000h"
# Bounds of our own options: a blocking query shorter than this is a poll loop,
# Consul caps `wait` at 10 minutes.
_MIN_WAIT, _MAX_WAIT = 1.0, 600.0
_MIN_TIMEOUT = 0.1
_EXCERPT = 300
# Requests for shared entries in flight per backend (a burst after a wipe, a big start):
# the short-call pool's size. More only queue in the pool, and the local agent's CPU is
# the limit (1,000 registrations on a busy 2-core host: 1 in flight 6.7 s, 8: 12.0 s,
# 32: 14.1 s, 64: 12.6 s with 1.9x our CPU).
_SHARED_IN_FLIGHT = 8
# A refused heartbeat service is asked again after this long (the token may change).
_DENIED_RETRY = 60.0
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's error retrieved (each awaiter gets it; none may be left)."""
    if not future.cancelled():
        future.exception()


def _go_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _check_id(instance_id: str) -> str:
    return f"service:{instance_id}"


def _health_id(instance_id: str) -> str:
    return f"service:{instance_id}:health"


def _check_note(check: Mapping[str, Any]) -> str:
    """What a check says: its ``Output``, else ``"Name: Notes"``.

    Consul's maintenance check has an empty ``Output``; the operator's reason
    is in its ``Notes`` (``{"Name": "Service Maintenance Mode", "Notes": "disk swap"}``).
    """
    output = str(check.get("Output") or "")
    if output:
        return output
    name, notes = str(check.get("Name") or ""), str(check.get("Notes") or "")
    if name and notes:
        return f"{name}: {notes}"
    return name or notes


def _excerpt(body: str) -> str:
    """The server's words, short and on one line."""
    text = " ".join(body.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


# What an ACL token may hold: visible ASCII (Consul's are UUIDs). Anything else cannot
# travel as the X-Consul-Token header (httpx refuses a line break, cannot encode the rest).
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")


def _token(token: str | None, token_file: str | None) -> str | None:
    """The ACL token: explicit, else from its file, else Consul's own variables
    (surrounding whitespace removed).

    A token that is not visible ASCII is a :class:`ConfigError` naming where it came
    from (``backend.token``, ``backend.token_file``, ``CONSUL_HTTP_TOKEN``,
    ``CONSUL_HTTP_TOKEN_FILE``), never showing it."""
    if token is not None and token_file is not None:
        raise ConfigError("give token or token_file, not both", field="backend.token_file")
    field, source = "backend.token", None
    if token is None and token_file is None:
        field, source = "CONSUL_HTTP_TOKEN", "environment"
        token = os.environ.get("CONSUL_HTTP_TOKEN") or None
        token_file = None if token else os.environ.get("CONSUL_HTTP_TOKEN_FILE") or None
        if token_file is not None:
            token = read_secret_file(token_file, field="CONSUL_HTTP_TOKEN_FILE")
            field = "CONSUL_HTTP_TOKEN_FILE"
    elif token_file is not None:
        token = read_secret_file(token_file, field="backend.token_file")
        field = "backend.token_file"
    token = token.strip() if token is not None else None  # as a file's (a pasted newline)
    if token and not _TOKEN_TEXT.fullmatch(token):
        held = "the file holds" if field.lower().endswith("_file") else "it holds"
        raise ConfigError(
            f"{held} a character an ACL token cannot have (a line break, a space, a "
            "control or a non-ASCII character); expected visible ASCII only, as Consul's "
            "tokens (the value is not shown)",
            field=field,
            source=source,
        )
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
        Bound of each short request (register, heartbeat, lookup, …), whole
        request included; default ``5s``, at least ``100ms``.
    ``wait``
        Longest a blocking query (list changes for ``watch``) waits before it is
        re-issued, default ``10s`` (1s to 10m). It also bounds how long a dead
        connection (silent, no FIN/RST) can hold a watch: a blocking query with
        no answer after ``wait * 17/16 + min(timeout, 3s)`` (Consul adds up to
        wait/16 of jitter) is given up and retried, 13.6 s with the defaults.
    ``flavor``
        How instances are written, for the fleet that reads them: ``registry-agent``
        (default: ``version`` and ``scheme`` as meta keys), ``kratos`` (tag
        ``version=<v>``, a tagged address ``<scheme>`` holding the URL),
        ``go-micro`` (its encoded metadata and version tags first) or ``spring``
        (meta ``secure``, a DNS-safe service name). Reading understands every
        flavor, whatever this option (see ``_flavors``).
    ``endpoint_scheme``
        Of a kratos entry's endpoints (its ``TaggedAddresses`` holding URLs,
        e.g. ``http://10.5.0.1:8000`` and ``grpc://10.5.0.1:9000``), read the
        one with this scheme (``grpc``, ``grpcs``, ``http``, ``https``…) as the
        instance's address, port and scheme; an entry with none of that scheme
        reads as without the option (the endpoint on its Address/Port). Reading
        only (list, lookup, watch); not Consul's own ``scheme``, which is the
        agent's ``http``/``https``.
    ``deregister_critical_after``
        Consul removes a service whose liveness check is critical this long
        (the process stopped heartbeating), default ``90s``; Consul's floor is
        1 minute and its reaper runs about every 30 seconds. An instance held
        critical by its health checks is never reaped while we run: its status
        lives on a second check, ``service:<id>:health``, without reaping.

    Errors: unreachable, timed out, not HTTP, 5xx, or a body that is not what
    the API returns: :class:`BackendUnavailable`; 429 and 503 (outside the
    health endpoint's own use of them): :class:`Throttled` with the
    ``Retry-After`` seconds; 401/403 and other 4xx: :class:`Rejected`; our
    check gone: :class:`LeaseLost`. Each carries Consul's own words.

    Instances are read as Consul holds them (any id, port 0 when none) and
    carry their ``node``: ids are unique per agent only. Snapshot keys are the
    id; when several nodes hold one id, one keeps the plain id (the node of
    the agent we talk to, else the first node by name) and the others are
    keyed ``node/id``. (The agent's node name needs ``agent:read``; without
    it, the first node by name keeps the plain id.)

    Shared liveness (:meth:`register_shared`): one heartbeat service per TTL
    and backend object, ``registry-agent-heartbeat`` (ID
    ``registry-agent-heartbeat-<host>-<pid>-<ttl>s-<random>``, tag and meta
    ``host``/``pid``/``ttl``), whose TTL check one ``check/pass`` renews every
    ttl/3; each service carries an alias check ``service:<id>`` of it (with
    ``DeregisterCriticalServiceAfter``) and a health check only while not
    plainly passing. It needs ``service:write`` on ``registry-agent-heartbeat``;
    a token without it falls back to a TTL check per registration (warned once).
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
        "flavor": opt_choice(*FLAVORS),
        "endpoint_scheme": opt_str,
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
        wait: float = 10.0,
        deregister_critical_after: float = 90.0,
        flavor: str = "registry-agent",
        endpoint_scheme: str = "",
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if deregister_critical_after < _MIN_DEREGISTER_AFTER:
            raise ConfigError(
                f"Consul's floor is 60s, got {deregister_critical_after:g}s",
                field="backend.deregister_critical_after",
            )
        if deregister_critical_after > REAP_CEILING:  # as for the registration option
            raise ConfigError(
                f"must be at most {REAP_CEILING:.0f}s (a year), "
                f"got {deregister_critical_after:.0f}s",
                field="backend.deregister_critical_after",
            )
        if not _MIN_WAIT <= wait <= _MAX_WAIT:
            raise ConfigError(
                f"expected {_MIN_WAIT:g}s to {_MAX_WAIT:g}s, got {wait:g}s", field="backend.wait"
            )
        if not timeout >= _MIN_TIMEOUT:
            raise ConfigError(
                f"expected at least {_MIN_TIMEOUT:g}s, got {timeout:g}s", field="backend.timeout"
            )
        if flavor not in FLAVORS:
            raise ConfigError(
                f"expected one of {', '.join(FLAVORS)}, got {flavor!r}", field="backend.flavor"
            )
        self.host = host
        self.port = port
        if endpoint_scheme and not _ENDPOINT_SCHEME.fullmatch(endpoint_scheme):
            raise ConfigError(
                f"expected a URL scheme in lower case (grpc, grpcs, http, https…), "
                f"got {endpoint_scheme!r}",
                field="backend.endpoint_scheme",
            )
        self.flavor = flavor
        self.endpoint_scheme = endpoint_scheme
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
        _check_agent_scheme(scheme)
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
        self._node_asking: tuple[AsyncConsul, asyncio.Future[None]] | None = None
        self._api_loop: asyncio.AbstractEventLoop | None = None
        # Status last set per check, so a heartbeat renews the TTL without changing it.
        self._status: dict[str, tuple[HealthStatus, str]] = {}
        # Reaping delay per registration (its liveness check), so update() writes it again.
        self._reap: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()
        self._throttled = False  # logged once per episode of 429/503 answers
        # Name of the node of the agent we talk to (keys of snapshots), when known.
        self._node: str | None = None
        self._node_asked: AsyncConsul | None = None
        self._probe = ConnectionProbe(self._hold_connection)
        # Shared liveness: one heartbeat group per TTL, and a bound on writes in flight.
        self._group_map: dict[float, HeartbeatGroup] = {}
        self._groups_pid = os.getpid()
        self._groups_loop: asyncio.AbstractEventLoop | None = None
        # TTL -> time.monotonic() until which the heartbeat service is known to be denied.
        self._refused: dict[float, float] = {}
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None

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
        _check_agent_scheme(options.get("scheme"))
        return cls(host, port, **take_options("consul", options, cls._OPTIONS))

    def __repr__(self) -> str:
        return f"ConsulBackend({self._scheme}://{self._hostport})"

    @property
    def _hostport(self) -> str:
        """``host:port`` as a URL spells it (an IPv6 literal in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _scrubbed(self, text: str) -> str:
        """``text`` (a transport's or Consul's words) with the ACL token shown as ``***``."""
        token = self._token
        if not token:
            return text
        for form in (token, repr(token)[1:-1]):
            text = text.replace(form, "***")
        return text

    @property
    def registry_identity(self) -> tuple[str, str]:
        """Which entries this backend writes, for refusing the same registry twice: the
        agent's ``host:port`` (as :func:`registry_address` spells it, no DNS). Service
        IDs are unique per agent, so the flavor, ``dc`` (registration goes to the local
        agent whatever it is), token and TLS settings are not part of it."""
        return ("consul", registry_address(self.host, self.port))

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
        missing_is_lost: bool = False,
    ) -> T:
        """Await one py-consul call, mapping every failure into our error tree.

        ``missing_is_lost``: a 404 means our check or service is gone (LeaseLost),
        not a request Consul refused.
        """
        context = error_context("consul", instance=instance, service=service)
        where = f"Consul agent at {self._scheme}://{self._hostport}"
        try:
            result = await call
        except httpx.ProtocolError as exc:
            said = self._scrubbed(str(exc))
            raise BackendUnavailable(
                f"{where} answered something that is not HTTP: {said}", **context
            ) from exc
        except (httpx.HTTPError, OSError) as exc:
            if isinstance(exc, ssl.SSLError) or "SSL" in str(exc):
                raise BackendUnavailable(
                    f"TLS with {where} failed (check ca_file, cert_file, key_file and that "
                    f"the agent serves HTTPS on this port): {self._scrubbed(str(exc))}",
                    **context,
                ) from exc
            said = self._scrubbed(repr(exc))
            raise BackendUnavailable(f"{where} unreachable: {said}", **context) from exc
        except ConsulHTTPError as exc:
            raise self._http_error(exc, instance, service, missing_is_lost) from exc
        except consul.ConsulException as exc:  # raised by py-consul before any request
            said = self._scrubbed(str(exc))
            raise Rejected(f"Consul client refused the request: {said}", **context) from exc
        self._throttled = False
        return result

    def _http_error(
        self,
        exc: ConsulHTTPError,
        instance: ServiceInstance | None,
        service: str | None,
        missing_is_lost: bool,
    ) -> BackendError:
        """The error of our tree for an HTTP answer we cannot use, with Consul's own words."""
        context = error_context("consul", instance=instance, service=service)
        code, text = exc.code, self._scrubbed(_excerpt(exc.body))
        said = f"Consul answered {code}: {text}" if text else f"Consul answered {code}"
        if code < 400:  # a success status whose body py-consul could not read
            return BackendUnavailable(
                f"Consul answered {code} with a body that is not what its API returns "
                f"({self._scrubbed(str(exc))}): {text!r}",
                **context,
            )
        if code in (429, 503):
            retry_after = _retry_after(exc.headers.get("Retry-After"))
            if not self._throttled:
                self._throttled = True
                # DEBUG: the registrar (or watcher) owns the user-facing line.
                log.debug(
                    "Consul is shedding load (%s%s); backing off",
                    said,
                    f", retry after {retry_after:g}s" if retry_after is not None else "",
                    extra={"event": "throttled", "backend": "consul", **context},
                )
            return Throttled(said, retry_after=retry_after, **context)
        if any(marker in exc.body for marker in _LOST_MARKERS) or (code == 404 and missing_is_lost):
            return LeaseLost(f"our check is gone: {said}", **context)
        if code in (401, 403):
            return Rejected(self._denied(exc.body, instance, service), **context)
        if "HTTP request to an HTTPS server" in exc.body:
            return Rejected(
                f"the Consul agent at {self._hostport} serves HTTPS: set "
                "scheme=https and ca_file (or CONSUL_CACERT)",
                **context,
            )
        if code < 500:
            return Rejected(f"Consul refused the request: {said}", **context)
        return BackendUnavailable(said, **context)

    def _denied(self, text: str, instance: ServiceInstance | None, service: str | None) -> str:
        subject = instance.service if instance is not None else service
        what = f"permission denied for service {subject!r}" if subject else "permission denied"
        if "ACL not found" in text:
            why = "Consul does not know this ACL token (wrong, expired or deleted)"
        elif self._token is None:
            why = "no ACL token was given (token, token_file or CONSUL_HTTP_TOKEN)"
        else:
            why = "the ACL token's policy does not allow it"
        return f"{what}: {why} [Consul: {self._scrubbed(text.strip()) or '403'}]"

    def validate_options(self, *, ttl: float, deregister_critical_after: float | None) -> None:
        """Raise :class:`ConfigError` for registration options Consul would refuse:
        ``deregister_critical_after`` (or this backend's own) below Consul's 60 s floor."""
        self._reap_after(deregister_critical_after)

    def _reap_after(self, deregister_critical_after: float | None) -> float:
        reap_after = deregister_critical_after or self.deregister_critical_after
        if reap_after < _MIN_DEREGISTER_AFTER:
            raise ConfigError(
                f"Consul's floor is 60s, got {reap_after:g}s", field="deregister_critical_after"
            )
        return reap_after

    def validate(self, instance: ServiceInstance) -> None:
        """Raise :class:`Rejected` for what Consul would refuse to register.

        Consul's rules for service meta: at most 64 keys; keys of letters, digits,
        ``-`` and ``_``, at most 128 characters, not starting with ``consul-``;
        values at most 512 characters (counted in UTF-8 bytes, as Consul does);
        and what the backend's ``flavor`` cannot carry (``_flavors.validate_flavor``).
        The meta checked is the one written (with the flavor's own keys).
        """
        context = error_context("consul", instance=instance)
        validate_flavor(instance, self.flavor)
        weight = written_weight(instance)
        if weight is not None and weight > _WEIGHT_MAX:
            raise Rejected(
                f"meta.weight: Consul takes weights up to {_WEIGHT_MAX}, got {weight}", **context
            )
        meta = write_entry(instance, self.flavor)["Meta"]
        if len(meta) > _META_MAX_KEYS:
            raise Rejected(
                f"meta: Consul takes at most {_META_MAX_KEYS} keys, got {len(meta)}", **context
            )
        for key, value in meta.items():
            if not _META_KEY.match(key):
                raise Rejected(
                    f"meta.{key}: Consul takes only letters, digits, '-' and '_' in a meta "
                    f"key, got {key!r}",
                    **context,
                )
            if len(key.encode()) > _META_KEY_MAX:
                raise Rejected(
                    f"meta.{key[:40]}…: Consul takes meta keys of at most {_META_KEY_MAX} "
                    f"characters, got {len(key.encode())}",
                    **context,
                )
            if key.startswith(_META_RESERVED):
                raise Rejected(
                    f"meta.{key}: the prefix {_META_RESERVED!r} is reserved by Consul, got {key!r}",
                    **context,
                )
            if len(value.encode()) > _META_VALUE_MAX:
                raise Rejected(
                    f"meta.{key}: Consul takes meta values of at most {_META_VALUE_MAX} "
                    f"characters, got {len(value.encode())}: {value[:40]!r}…",
                    **context,
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
        """Register ``instance`` with two checks: liveness (TTL, reaped) and health.

        The liveness check ``service:<id>`` is renewed passing by every heartbeat
        and carries ``DeregisterCriticalServiceAfter``: a process that stops
        heartbeating is reaped. Health (``service:<id>:health``) carries the
        status and note of :meth:`set_status`, with no reaping: an instance held
        critical stays registered (and critical) while we run.
        """
        self.validate(instance)
        reap_after = self._reap_after(deregister_critical_after)
        check_id = _check_id(instance.id)
        liveness = {
            "CheckID": check_id,
            "Name": f"registry-agent TTL for {instance.id}",
            "TTL": _go_duration(ttl),
            "Status": str(HealthStatus.PASSING),
            "Notes": "liveness: renewed by registry-agent while it runs",
            "DeregisterCriticalServiceAfter": _go_duration(reap_after),
        }
        health = {
            "CheckID": _health_id(instance.id),
            "Name": f"registry-agent health of {instance.id}",
            "TTL": _HEALTH_TTL,  # never expires in practice: set by set_status only
            "Status": str(status),
            "Notes": "health: set by registry-agent from its checks",
        }
        body = {**write_entry(instance, self.flavor), "Checks": [liveness, health]}
        await self._put("/v1/agent/service/register", body, instance, replace=True)
        lease = Lease(instance, float(ttl), check_id, "consul")
        self._status[check_id] = (status, note)
        self._reap[check_id] = reap_after
        # Consul takes no output at registration, and restores a TTL check after a
        # restart as critical unless it was updated once: set the status now.
        await self._update_check(lease, _health_id(instance.id), status, note)
        return lease

    async def update(
        self,
        lease: Lease,
        instance: ServiceInstance,
        *,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
    ) -> Lease:
        """Write ``instance`` (the same id, new tags or meta) over ``lease``'s entry in
        place: a register of the same id (Consul keeps its checks' statuses), on the
        same liveness (shared or its own) and reaping delay.

        The entry is read first: when it is gone (deregistered by someone else), a
        :class:`LeaseLost`, so the registrar registers it again and counts a lease
        loss and a re-registration, as its next read-back would have (a register
        alone would put it back unnoticed).
        """
        self.validate(instance)
        if await self.lookup(lease) is None:
            raise LeaseLost(
                f"our entry {instance.id!r} is gone from the Consul agent (deregistered "
                "by someone else?): registering it again",
                **error_context("consul", instance=instance),
            )
        register = self.register_shared if lease.shared else self.register
        return await register(
            instance,
            ttl=lease.ttl,
            status=status,
            note=note,
            deregister_critical_after=self._reap.get(str(lease.handle)),
        )

    async def _update_check(
        self, lease: Lease, check_id: str, status: HealthStatus, note: str
    ) -> None:
        checks = self.api.agent.check
        update = {
            HealthStatus.PASSING: checks.ttl_pass,
            HealthStatus.WARNING: checks.ttl_warn,
            HealthStatus.CRITICAL: checks.ttl_fail,
        }[status]
        await self._call(
            update(check_id, notes=note or None), instance=lease.instance, missing_is_lost=True
        )

    async def heartbeat(self, lease: Lease) -> None:
        """Renew the liveness check (always passing: health lives on its own check).

        A shared lease is answered from memory: LeaseLost when its heartbeat was
        lost, the renewal's own error while renewals fail.
        """
        if lease.shared:
            group = self._groups.get(lease.ttl)
            if group is None:
                raise LeaseLost(
                    "this registration's shared heartbeat was removed (deregistered or closed)",
                    **error_context("consul", instance=lease.instance),
                )
            group.check(lease)
            return
        await self._update_check(lease, str(lease.handle), HealthStatus.PASSING, "")

    async def set_status(self, lease: Lease, status: HealthStatus, note: str = "") -> None:
        """Set the health check's status and note (liveness is left to heartbeats)."""
        if lease.shared:
            async with self._writes():
                await self._set_shared_status(lease, status, note)
        else:
            await self._update_check(lease, _health_id(lease.instance.id), status, note)
        self._status[str(lease.handle)] = (status, note)

    async def lookup(self, lease: Lease) -> InstanceHealth | None:
        """Our entry on this agent with the worst status of its checks; None without ours."""
        instance = lease.instance

        @handles_errors
        def parse(response: Any) -> Any:
            # 200 passing, 429 warning, 503 critical, 404 unknown: all carry JSON.
            if response.code == 404:
                return None
            data = None
            if response.code in (200, 429, 503):
                with contextlib.suppress(ValueError):
                    data = json.loads(response.body)
            if not isinstance(data, dict):  # not Consul's health answer: a proxy, throttling
                reason = "not JSON" if response.code == 200 else f"HTTP {response.code}"
                raise ConsulHTTPError(response.code, response.headers, response.body, reason)
            return data

        path = f"/v1/agent/health/service/id/{urllib.parse.quote(instance.id, safe='')}"
        # Shared entries are looked up in bursts (told VERIFY together): bounded too.
        async with self._writes() if lease.shared else contextlib.nullcontext():
            data = await self._call(
                self.api.http.get(
                    parse, path, params=[("format", "json")], headers=self.api.prepare_headers()
                ),
                instance=instance,
            )
        if not data or not isinstance(data.get("Service"), dict):
            return None
        checks = [c for c in data.get("Checks") or () if isinstance(c, dict)]
        ids = {c.get("CheckID") for c in checks}
        if lease.handle not in ids or (
            self._health_written(lease) and _health_id(instance.id) not in ids
        ):
            return None  # the service is there but one of our checks is not: register again
        if lease.shared and self._alias_stuck(lease, checks):
            return None  # registering the service again restarts its alias check
        node = next((c.get("Node") for c in checks if c.get("CheckID") == lease.handle), None)
        entry = {"Service": data["Service"], "Checks": checks, "Node": {"Node": node or ""}}
        found = self._parse_entry(instance.service, entry)
        if found is None:
            return None
        # What we wrote reads back as itself only in its normalised form (a flavor's
        # version tag, a meta key lifted into a field): when the entry holds what we
        # wrote, it is our instance, or the registrar would register again forever.
        if found.instance == read_written(write_entry(instance, self.flavor)):
            ours = ServiceInstance.from_registry(
                service=instance.service,
                id=instance.id,
                address=instance.address,
                port=instance.port,
                tags=instance.tags,
                meta=instance.meta,
                node=found.instance.node,
                scheme=instance.scheme,
                version=instance.version,
            )
            return InstanceHealth(ours, found.status, found.note)
        return found

    async def deregister(self, lease: Lease) -> None:
        """Remove the service; the last shared one of its TTL also removes the heartbeat."""
        self._status.pop(str(lease.handle), None)
        self._reap.pop(str(lease.handle), None)
        if not lease.shared:
            await self._deregister_service(lease)
            return
        group = self._groups.get(lease.ttl)
        member = group.members.get(lease.instance.id) if group is not None else None
        if group is None or member is None or member.lease != lease:
            async with self._writes():
                await self._deregister_service(lease)
            if group is not None and member is None:
                # A retry of a deregistration that failed after leaving: the heartbeat
                # goes if this was the last member (else it would be renewed for none).
                await self._close_if_empty(group)
            return
        group.leave(lease.instance)
        group.leaving += 1
        try:
            async with self._writes():
                await self._deregister_service(lease)
        finally:
            group.leaving -= 1
        await self._close_if_empty(group)

    async def _close_if_empty(self, group: HeartbeatGroup) -> None:
        # The heartbeat goes last, once no removal is in flight: until its service
        # is gone, an entry that aliased it would show critical for a moment.
        if not group.members and not group.leaving and self._groups.get(group.ttl) is group:
            del self._groups[group.ttl]
            await group.close()

    async def _deregister_service(self, lease: Lease) -> None:
        with contextlib.suppress(LeaseLost):  # already gone: deregistering is idempotent
            await self._call(
                self.api.agent.service.deregister(lease.instance.id),
                instance=lease.instance,
                missing_is_lost=True,
            )

    # -- shared liveness (SharedLiveness) --

    async def register_shared(
        self,
        instance: ServiceInstance,
        *,
        ttl: float,
        status: HealthStatus = HealthStatus.PASSING,
        note: str = "",
        deregister_critical_after: float | None = None,
    ) -> Lease:
        """Register ``instance`` on the heartbeat service of ``ttl`` (registered first if needed).

        The service carries an alias check ``service:<id>`` of the heartbeat
        (with ``DeregisterCriticalServiceAfter``: a dead process's services are
        reaped) and, only while it is not plainly passing, a health check
        ``service:<id>:health`` with the status and note (never reaped).
        """
        self.validate(instance)
        reap_after = self._reap_after(deregister_critical_after)
        if self._refused.get(float(ttl), 0.0) > time.monotonic():
            return await self.register(
                instance, ttl=ttl, status=status, note=note, deregister_critical_after=reap_after
            )
        group = self._group(float(ttl))
        async with self._writes():
            try:
                generation = await group.ensure()
            except Rejected as exc:
                # A token without service:write on the heartbeat service (written
                # before it existed): keep working, one check per registration.
                told = float(ttl) in self._refused
                self._refused[float(ttl)] = time.monotonic() + _DENIED_RETRY
                lease = await self.register(
                    instance,
                    ttl=ttl,
                    status=status,
                    note=note,
                    deregister_critical_after=reap_after,
                )
                if not told:  # (a token refused everything: the registrar says so)
                    log.warning(
                        "Consul refused the shared heartbeat service %r (%s): registering "
                        "with a TTL check per registration instead; grant service:write on "
                        "%r for one heartbeat per process",
                        HEARTBEAT_NAME,
                        exc,
                        HEARTBEAT_NAME,
                        extra={"event": "heartbeat_denied", "backend": "consul"},
                    )
                return lease
            check = alias_id(instance.id)
            lease = Lease(instance, float(ttl), check, "consul", shared=True)
            member = Member(lease, generation, status, note, time.monotonic())
            checks: list[dict[str, Any]] = [
                {
                    "CheckID": check,
                    "Name": f"registry-agent liveness of {instance.id}",
                    "AliasService": group.service_id,
                    "Status": str(HealthStatus.PASSING),
                    # No Notes: the catalog repeats every check in each health answer.
                    "DeregisterCriticalServiceAfter": _go_duration(reap_after),
                }
            ]
            if member.has_health:
                # Registered at another status, so the update below that sets the
                # note is a status change: Consul syncs an output-only change to
                # the catalog only after check_update_interval (5 min).
                first = HealthStatus.WARNING if status is HealthStatus.CRITICAL else None
                checks.append(self._health_check(instance, first or HealthStatus.CRITICAL))
            payload = write_entry(instance, self.flavor)
            member.payload = payload
            body = {**payload, "Checks": checks}
            await self._put("/v1/agent/service/register", body, instance, replace=True)
            if member.has_health:  # Consul takes no output at registration
                await self._update_check(lease, health_id(instance.id), status, note)
        if group.generation != generation or self._groups.get(float(ttl)) is not group:
            raise BackendUnavailable(
                "the shared heartbeat was lost while registering: registering again",
                **error_context("consul", instance=instance),
            )
        group.join(member)
        self._status[check] = (status, note)
        self._reap[check] = reap_after
        return lease

    def follow(self, lease: Lease, notify: Callable[[LivenessNews], None]) -> Callable[[], None]:
        """Call ``notify`` with news about shared ``lease`` until unfollowed or deregistered."""
        group = self._groups.get(lease.ttl) if lease.shared else None
        if group is None:
            return lambda: None
        return group.follow(lease.instance.id, notify)

    def _alias_stuck(self, lease: Lease, checks: list[dict[str, Any]]) -> bool:
        """Our alias check critical although its heartbeat was just renewed: after a
        restart that kept its data, Consul 1.8 left some aliases critical for about a
        minute (seen for 1 to 11 of 100 services)."""
        alias = next((c for c in checks if c.get("CheckID") == lease.handle), None)
        renewed = self.last_renewal(lease)
        return (
            alias is not None
            and alias.get("Status") == "critical"
            and renewed is not None
            and time.time() - renewed < lease.ttl / 2
        )

    def last_renewal(self, lease: Lease) -> float | None:
        """time.time() of the heartbeat's last renewal covering shared ``lease``."""
        group = self._groups.get(lease.ttl) if lease.shared else None
        return group.last_renewal if group is not None else None

    @property
    def _groups(self) -> dict[float, HeartbeatGroup]:
        """This process's and loop's heartbeat groups by TTL."""
        pid, loop = os.getpid(), running_loop()
        if pid != self._groups_pid or (loop is not None and self._groups_loop not in (None, loop)):
            # Inherited through fork() or left on another loop: not ours to renew or remove.
            self._group_map, self._groups_pid, self._groups_loop = {}, pid, None
        if self._groups_loop is None:
            self._groups_loop = loop
        return self._group_map

    def _group(self, ttl: float) -> HeartbeatGroup:
        group = self._groups.get(ttl)
        if group is None:
            host = _UNSAFE_ID.sub("-", socket.gethostname())[:64]
            service_id = f"{HEARTBEAT_NAME}-{host}-{os.getpid()}-{ttl:g}s-{secrets.token_hex(4)}"
            calls = HeartbeatCalls(
                register=lambda sid: self._register_heartbeat(sid, ttl),
                renew=self._renew_heartbeat,
                deregister=self._deregister_heartbeat,
                read_back=self._read_back,
            )
            group = HeartbeatGroup(
                calls, ttl=ttl, service_id=service_id, retry=RetryPolicy(initial=0.1, cap=ttl / 3)
            )
            self._groups[ttl] = group
        return group

    def _writes(self) -> asyncio.Semaphore:
        """The bound on requests for shared entries in flight (one semaphore per event loop)."""
        loop = running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(_SHARED_IN_FLIGHT), loop
        return self._slots

    def _health_written(self, lease: Lease) -> bool:
        """Whether ``lease``'s entry carries a health check of its own (always, unless shared)."""
        if not lease.shared:
            return True
        group = self._groups.get(lease.ttl)
        member = group.members.get(lease.instance.id) if group is not None else None
        return member is None or member.has_health

    def _health_check(self, instance: ServiceInstance, status: HealthStatus) -> dict[str, Any]:
        return {
            "CheckID": health_id(instance.id),
            "Name": f"registry-agent health of {instance.id}",
            "TTL": _HEALTH_TTL,  # never expires in practice: set by set_status only
            "Status": str(status),
            "Notes": "health: set by registry-agent from its checks",
        }

    async def _set_shared_status(self, lease: Lease, status: HealthStatus, note: str) -> None:
        """Add, update or remove the health check: a passing entry carries none."""
        group = self._groups.get(lease.ttl)
        member = group.members.get(lease.instance.id) if group is not None else None
        if member is None:
            raise LeaseLost(
                "this shared registration is no longer held (deregistered or lost)",
                **error_context("consul", instance=lease.instance),
            )
        instance, check = lease.instance, health_id(lease.instance.id)
        wanted = status is not HealthStatus.PASSING or bool(note)
        if wanted and not member.has_health:
            # Registered passing (what the entry shows now), so the update below is a
            # status change and Consul syncs its note to the catalog at once.
            first = HealthStatus.PASSING if status is not HealthStatus.PASSING else None
            body = {
                **self._health_check(instance, first or HealthStatus.WARNING),
                "ServiceID": instance.id,
            }
            body["ID"] = body.pop("CheckID")
            await self._put("/v1/agent/check/register", body, instance, missing_is_lost=True)
        if wanted:
            await self._update_check(lease, check, status, note)
        elif member.has_health:
            with contextlib.suppress(LeaseLost):  # gone already: what we wanted
                await self._put(
                    f"/v1/agent/check/deregister/{check}",  # py-consul quotes the path
                    None,
                    instance,
                    missing_is_lost=True,
                )
        member.status, member.note, member.written_at = status, note, time.monotonic()

    async def _put(
        self,
        path: str,
        body: Any,
        instance: ServiceInstance | None,
        *,
        replace: bool = False,
        missing_is_lost: bool = False,
    ) -> None:
        params = [("replace-existing-checks", "true")] if replace else None
        await self._call(
            self.api.http.put(
                lambda r: None,
                path,
                params=params,
                data=json.dumps(body) if body is not None else "",
                headers=self.api.prepare_headers(),
            ),
            instance=instance,
            missing_is_lost=missing_is_lost,
        )

    async def _register_heartbeat(self, service_id: str, ttl: float) -> None:
        host = socket.gethostname()
        body = {
            "Name": HEARTBEAT_NAME,
            "ID": service_id,
            "Tags": [HEARTBEAT_NAME],
            "Meta": {"host": host[:_META_VALUE_MAX], "pid": str(os.getpid()), "ttl": f"{ttl:g}s"},
            "Check": {
                "CheckID": alias_id(service_id),
                "Name": f"registry-agent heartbeat of pid {os.getpid()} on {host}",
                "TTL": _go_duration(ttl),
                "Status": str(HealthStatus.PASSING),
                "Notes": "renewed by registry-agent while its process runs; the services "
                "it registered alias this check",
                "DeregisterCriticalServiceAfter": _go_duration(self.deregister_critical_after),
            },
        }
        await self._put("/v1/agent/service/register", body, None, replace=True)
        # Registering again keeps a check's old status (critical after an outage):
        # pass it now, so entries registered on it next are read back passing.
        await self._renew_heartbeat(service_id)

    async def _renew_heartbeat(self, service_id: str) -> None:
        check = alias_id(service_id)  # raw: py-consul quotes the path (keeping ':')
        await self._put(f"/v1/agent/check/pass/{check}", None, None, missing_is_lost=True)

    async def _deregister_heartbeat(self, service_id: str) -> None:
        with contextlib.suppress(LeaseLost):
            await self._put(
                f"/v1/agent/service/deregister/{service_id}",
                None,
                None,
                missing_is_lost=True,
            )

    async def _read_back(self) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """The agent's services and checks by id: one verification's two reads."""

        def decode(response: Any) -> Mapping[str, Any]:
            data = json.loads(response.body)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            return data

        headers = self.api.prepare_headers()
        http = self.api.http
        services = await self._call(http.get(decode, "/v1/agent/services", headers=headers))
        checks = await self._call(http.get(decode, "/v1/agent/checks", headers=headers))
        return services, checks

    def _parse_entries(self, service: str, entries: Any) -> dict[str, InstanceHealth]:
        """Every readable entry, keyed by id; an id held by several nodes: ``node/id`` but one.

        The one keeping the plain id is this agent's node's, else the first node by name.
        """
        found: dict[str, InstanceHealth] = {}
        seen: set[str] = set()
        parsed = [self._parse_entry(service, entry) for entry in entries or ()]
        local = self._node
        # This agent's entries first: they keep the plain id.
        for health in sorted(
            (h for h in parsed if h is not None),
            key=lambda h: (h.instance.node != local, h.instance.node, h.instance.id),
        ):
            inst = health.instance
            key = inst.id if inst.id not in seen or not inst.node else f"{inst.node}/{inst.id}"
            seen.add(inst.id)
            found[key] = health
        return found

    def _parse_entry(self, service: str, entry: Any) -> InstanceHealth | None:
        try:
            svc = entry["Service"]
            node = entry.get("Node") or {}
            port = svc.get("Port") or 0
            instance = read_instance(
                service=svc["Service"],
                id=svc["ID"],
                address=svc.get("Address") or node.get("Address") or "",
                port=port,
                tags=svc.get("Tags") or (),
                meta=svc.get("Meta") or {},
                tagged_addresses=svc.get("TaggedAddresses") or {},
                node=node.get("Node") or "",
                endpoint_scheme=self.endpoint_scheme,
                weights=svc.get("Weights"),
            )
            checks = [
                c
                for c in entry.get("Checks") or ()
                if c.get("ServiceID") in ("", None) or c.get("ServiceID") == instance.id
            ]
            status = HealthStatus.worst(HealthStatus(c["Status"]) for c in checks)
            preferred = (_health_id(instance.id), _check_id(instance.id))
            worst = sorted(
                (c for c in checks if c["Status"] == status),
                key=lambda c: (
                    preferred.index(c.get("CheckID"))
                    if c.get("CheckID") in preferred
                    else len(preferred)
                ),
            )
            note = _check_note((worst or [{}])[0])
        except Exception as exc:  # a malformed entry must not break listing
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
            return None
        return InstanceHealth(instance, status, note)

    async def _local_node(self) -> None:
        """Learn the name of the node of the agent we talk to, once per API object."""
        api = self.api  # created first: a fresh API object means a new question
        if self._node is not None or self._node_asked is api:
            return
        # One question at a time: a thousand watches starting at once ask once.
        asking = self._node_asking
        if asking is None or asking[0] is not api or asking[1].done():
            asking = (api, asyncio.ensure_future(self._ask_local_node(api)))
            asking[1].add_done_callback(_retrieved)
            self._node_asking = asking
        await asyncio.shield(asking[1])

    async def _ask_local_node(self, api: AsyncConsul) -> None:
        try:
            # py-consul's agent.self() sends no token: ask with ours.
            data = await self._call(
                api.http.get(
                    lambda r: json.loads(r.body),
                    "/v1/agent/self",
                    headers=api.prepare_headers(),
                )
            )
        except (Rejected, LeaseLost):  # no agent:read: keys fall back to the first node
            data = None
        # (unreachable: raised, the read it comes before would fail the same way)
        self._node_asked = api
        config = data.get("Config") if isinstance(data, dict) else None
        name = config.get("NodeName") if isinstance(config, dict) else None
        if isinstance(name, str) and name:
            self._node = name

    async def _health(self, service: str, index: int) -> tuple[int, dict[str, InstanceHealth]]:
        await self._local_node()
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
        if not isinstance(entries, list):
            raise BackendUnavailable(
                f"Consul answered a health query with something that is not a list: "
                f"{_excerpt(repr(entries))}",
                backend="consul",
                service=service,
            )
        return new_index, self._parse_entries(service, entries)

    async def list(self, service: str) -> ServiceSnapshot:
        index, found = await self._health(service, 0)
        return ServiceSnapshot(service, index, MappingProxyType(found))

    async def services(self) -> Sequence[str]:
        """The names in the catalog (one request), sorted, without our heartbeat services."""
        kwargs: dict[str, Any] = {"dc": self.dc} if self.dc else {}
        _, names = await self._call(self.api.catalog.services(**kwargs))
        if not isinstance(names, dict):
            raise BackendUnavailable(
                "Consul answered the catalog's services with something that is not an "
                f"object: {_excerpt(repr(names))}",
                backend="consul",
            )
        return sorted(str(name) for name in names if name != HEARTBEAT_NAME)

    async def watch(
        self, service: str, *, since: ServiceSnapshot | None = None
    ) -> AsyncIterator[ServiceSnapshot]:
        """Snapshots from three blocking queries (catalog, checks, node checks): see ``_watch``."""
        # Imported here: the watch modules are this method's own.
        from registry_agent_consul._decode import skip_warning
        from registry_agent_consul._watch import watch_service

        async def local_node() -> str | None:
            await self._local_node()
            return self._node

        snapshots = watch_service(
            self,
            service,
            since=since,
            local_node=local_node,
            preferred=lambda instance_id: (_health_id(instance_id), _check_id(instance_id)),
            warn=skip_warning(service, self._warned),
        )
        async with contextlib.aclosing(snapshots):
            async for snapshot in snapshots:
                yield snapshot

    async def wait_connection_change(self) -> None:
        """Return when the agent went away, or came back after being away (see ConnectionProbe)."""
        await self._probe.wait_change()
        for group in list(self._groups.values()):
            group.renew_now()  # a restarted agent restores TTL checks critical

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
            params = (
                [("hash", content_hash), ("wait", _go_duration(self.wait))] if content_hash else []
            )
            started = time.monotonic()
            code, new_hash = await self.api.http.get(
                handles_errors(lambda r: (r.code, r.headers.get("X-Consul-ContentHash", ""))),
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
        """Release connections and remove the heartbeat services (shared entries turn critical)."""
        groups = list(self._groups.values())
        self._group_map = {}
        if groups and self._api_loop is running_loop():
            with contextlib.suppress(BackendError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(*(group.close() for group in groups))
        for group in groups:
            await group.close(deregister=False)  # cancelled above, or on another loop
        await self._probe.close()
        api, self._api = self._api, None
        if api is not None and self._api_loop is running_loop():
            if api.registry_agent_hub is not None:
                await api.registry_agent_hub.close()
            await api.http.close()
