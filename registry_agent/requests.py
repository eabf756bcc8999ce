"""A requests adapter that sends ``http://SERVICE/path`` to a healthy instance of SERVICE.

Needs the ``requests`` extra (``pip install 'registry-agent[requests]'``)::

    import requests
    from registry_agent import Discovery
    from registry_agent.requests import DiscoveryAdapter

    discovery = Discovery("consul://127.0.0.1:8500")
    session = requests.Session()
    adapter = DiscoveryAdapter(discovery)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.get("http://orders/api/items")

The rules are those of :class:`registry_agent.DiscoveryTransport` (the same code
decides): the scoping rule (``services``, ``others``), failover on connect failures,
opt-in retries of statuses and read timeouts for idempotent methods, outcomes
reported to ``discovery.report()``, the last real error raised, HTTPS by service name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

try:
    import requests  # noqa: F401 - the extra's presence, checked once with a clear error
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "registry_agent.requests needs the requests extra: pip install 'registry-agent[requests]'"
    ) from exc
from requests.adapters import HTTPAdapter
from requests.exceptions import (
    ConnectionError,
    ConnectTimeout,
    ProxyError,
    ReadTimeout,
    RequestException,
    SSLError,
)
from requests.models import PreparedRequest, Response
from urllib3.exceptions import MaxRetryError, ProtocolError

if not hasattr(HTTPAdapter, "build_connection_pool_key_attributes"):  # pragma: no cover
    raise ImportError(
        "registry_agent.requests needs requests 2.32.2 or later (HTTPS by service name sets "
        "urllib3's server_hostname through HTTPAdapter.build_connection_pool_key_attributes)"
    )

from registry_agent._blocking import Discovery
from registry_agent._errors import NoInstanceAvailable, RegistryError
from registry_agent._failover import ClientClosed, Failover, NoPortLeft, Outcome, Routing
from registry_agent._models import ServiceInstance
from registry_agent._policy import DiscoveryPolicy
from registry_agent._select import Strategy

__all__ = ["DiscoveryAdapter"]

# Set on the copy of a request sent to an instance: the TLS server name to check.
_SERVER_NAME = "_registry_agent_server_name"
# How often pools to instances no longer listed are looked for (and closed).
_PRUNE_EVERY = 2.0


def _outcome(exc: Exception) -> Outcome:
    """What an exception of an attempt says about the instance."""
    if isinstance(exc, ConnectTimeout | SSLError):
        return Outcome.CONNECT  # SSLError: the TLS handshake, certificate check included
    if isinstance(exc, ReadTimeout):
        return Outcome.READ_TIMEOUT
    if isinstance(exc, ProxyError):
        return Outcome.LOCAL
    if isinstance(exc, ConnectionError):
        cause = exc.args[0] if exc.args else None
        if isinstance(cause, MaxRetryError) and not isinstance(cause.reason, ProtocolError):
            return Outcome.CONNECT  # refused, unreachable (urllib3 made no request)
        return Outcome.LOST  # aborted, reset, closed without an answer
    return Outcome.LOCAL


def _host_header(netloc: str, port: int | None) -> str:
    """The ``Host`` header of a service URL: its host as written, without user info or
    the scheme's default port (as httpx sends it: the same header from both clients)."""
    host = netloc.rpartition("@")[2]
    return host.rpartition(":")[0] if port is not None else host


def _replayable(request: PreparedRequest) -> bool:
    return request.body is None or isinstance(request.body, bytes | str)


def _raise_final(exc: RequestException, failover: Failover, request: PreparedRequest) -> NoReturn:
    """Raise the attempt's own error: its class and args kept (``e.args[0].reason``
    still works), ``e.request`` the caller's request (its URL names the service), and a
    note saying how many instances were tried."""
    exc.request = request
    exc.add_note(failover.tried())
    raise exc


class DiscoveryAdapter(HTTPAdapter):
    """For ``requests.Session.mount``: routes by service name through a :class:`Discovery`.

    Mount it on ``"http://"`` and ``"https://"`` (or on a prefix such as
    ``"http://orders"``: requests matches mounts by string prefix, so the adapter
    checks the host exactly and sends other hosts as a plain :class:`HTTPAdapter`).

    ``services``: the only host names routed through discovery (None: a single-label
    host, not ``localhost``, not an IP, no port, that the registry lists).
    ``others``: ``"pass"`` sends every other URL as a plain :class:`HTTPAdapter` would,
    ``"refuse"`` fails it with :class:`requests.ConnectionError` saying why.
    ``retries``: attempts on other instances after the first (None:
    ``policy.retries``). ``policy``: the :class:`DiscoveryPolicy` for choosing and
    retrying (None: ``discovery.policy_for(service)``). Other keywords go to
    :class:`HTTPAdapter` (``pool_connections``, ``pool_maxsize``, ...).

    Service requests go straight to the instance (proxies are not used for them); the
    ``Host`` header keeps the service name; over HTTPS the certificate is checked
    against ``policy.server_name`` or the service name (SNI too).
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        services: Collection[str] | None = None,
        others: Literal["pass", "refuse"] = "pass",
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        retries: int | None = None,
        policy: DiscoveryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        self.discovery = discovery
        self._routing = Routing(discovery, services, others, strategy, retries, policy)
        # Instances requests were sent to: (scheme, address, port) -> service.
        self._routed: dict[tuple[str, str, int], str] = {}
        self._pruned = time.monotonic()
        self._prune_lock = threading.Lock()
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(  # type: ignore[override]
        self, request: PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """requests' pool key, plus the TLS server name for a request to an instance."""
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        params: dict[str, Any] = dict(host_params)
        kwargs: dict[str, Any] = dict(pool_kwargs)
        name = getattr(request, _SERVER_NAME, None)
        if name is not None and params.get("scheme") == "https":
            kwargs["server_hostname"] = name  # SNI
            if verify is not False:
                kwargs["assert_hostname"] = name  # the certificate check
        return params, kwargs

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        """Send ``request``; a service URL goes to an instance of that service."""
        url = urlsplit(request.url or "")
        try:
            port = url.port
        except ValueError:
            port = -1  # not a service URL; requests reports the bad port itself
        scope = self._routing.scope
        service, confirmed = scope.service(url.scheme, (url.hostname or ""), port)
        if service is None:
            why = scope.refusal(urlunsplit((url.scheme, url.netloc, url.path, "", "")))
            if why is not None:
                raise ConnectionError(why, request=request)
            return super().send(request, stream, timeout, verify, cert, proxies)
        if not confirmed and service not in self._routing.known:
            self._confirm(request, service)
        return self._failover(
            request,
            service,
            _host_header(url.netloc, port) or service,
            stream,
            timeout,
            verify,
            cert,
        )

    def _confirm(self, request: PreparedRequest, service: str) -> None:
        is_service = getattr(self.discovery, "is_service", None)
        if not callable(is_service):
            return
        answer: bool | RegistryError
        try:
            answer = bool(is_service(service))
        except RegistryError as exc:
            answer = exc
        why = self._routing.refusal(service, answer)
        if why is not None:  # no watch for a name nobody confirmed
            cause = answer if isinstance(answer, RegistryError) else None
            raise ConnectionError(why, request=request) from cause

    def _failover(
        self,
        request: PreparedRequest,
        service: str,
        host: str,
        stream: bool,
        timeout: Any,
        verify: bool | str,
        cert: Any,
    ) -> Response:
        routing = self._routing
        failover = routing.failover(
            service, request.method or "GET", replayable=_replayable(request)
        )
        policy = failover.policy
        held: Response | None = None  # a retried 5xx, returned when none is left
        error: RequestException | None = None  # the last attempt's error
        while True:
            try:
                instance = self.discovery.choose(
                    service, routing.strategy, **routing.choose_kwargs(failover)
                )
                if not routing.offer(failover, instance, "adapter"):
                    continue  # no port: skipped, which is no retry
            except (RegistryError, NoPortLeft, ClientClosed) as exc:
                if held is not None:
                    return self._as_sent(held, request)
                if error is not None:
                    _raise_final(error, failover, request)
                words = exc.message if isinstance(exc, NoInstanceAvailable) else str(exc)
                raise ConnectionError(f"{service}: {words}", request=request) from exc
            if held is not None:
                held.close()
                held = None
            attempt = self._to(request, instance, host, policy.tls_server_name(service))
            scheme = "https" if (request.url or "").startswith("https:") else "http"
            self._routed[(scheme, instance.address.lower(), instance.port)] = service
            try:
                response = super().send(attempt, stream, timeout, verify, cert, None)
            except RequestException as exc:
                step = routing.after(failover, instance, _outcome(exc))
                if not step.retry:
                    if step.report is None:
                        exc.request = request
                        raise
                    _raise_final(exc, failover, request)
                error = exc
                continue
            step = routing.after(failover, instance, Outcome.ANSWER, response.status_code)
            if not step.retry:
                self._prune()
                return self._as_sent(response, request)
            held, error = response, None

    def close(self) -> None:
        """Close every pool; a call still running makes no further attempt."""
        self._routing.closed = True
        super().close()

    @staticmethod
    def _as_sent(response: Response, request: PreparedRequest) -> Response:
        """As the caller sent it: redirects and ``response.url`` name the service."""
        response.url = request.url or response.url
        response.request = request
        return response

    def _prune(self) -> None:
        """Every few seconds, close the pools to instances their service no longer lists
        (deregistered, replaced): their idle sockets would linger (CLOSE-WAIT) until
        ``pool_connections`` other pools pushed them out."""
        now = time.monotonic()
        if now - self._pruned < _PRUNE_EVERY or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._pruned = now
            routed = self._routed.copy()  # other threads add to it meanwhile
            listed: dict[str, set[tuple[str, int]]] = {}
            for service in set(routed.values()):
                try:
                    found = self.discovery.instances(service, healthy_only=False)
                except Exception:  # the registry cannot say now: keep every pool
                    return
                listed[service] = {(i.address.lower(), i.port) for i in found}
            gone = {e for e, s in routed.items() if (e[1], e[2]) not in listed[s]}
            if not gone:
                return
            pools = self.poolmanager.pools
            for key in list(pools.keys()):
                endpoint = (key.key_scheme, str(key.key_host).strip("[]").lower(), key.key_port)
                if endpoint in gone:
                    pools.pop(key, None)  # closes the pool's idle connections
            for endpoint in gone:
                self._routed.pop(endpoint, None)
        finally:
            self._prune_lock.release()

    @staticmethod
    def _to(
        request: PreparedRequest, instance: ServiceInstance, host: str, server_name: str
    ) -> PreparedRequest:
        """A copy of ``request`` addressed to ``instance``, ``Host`` kept."""
        url = urlsplit(request.url or "")
        address = f"[{instance.address}]" if ":" in instance.address else instance.address
        attempt = request.copy()
        attempt.url = urlunsplit(
            (url.scheme, f"{address}:{instance.port}", url.path, url.query, url.fragment)
        )
        if "Host" not in attempt.headers:
            attempt.headers["Host"] = host
        if url.scheme == "https":
            setattr(attempt, _SERVER_NAME, server_name)
        return attempt
