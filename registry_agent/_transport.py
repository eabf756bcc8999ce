"""httpx transports that send ``http://SERVICE/path`` to a healthy instance of SERVICE.

Which URLs go through discovery (the scoping rule): with ``services=[...]``, exactly
those host names (no port in the URL); every other URL passes through untouched
(``others="pass"``, the default) or fails saying why (``others="refuse"``). Without
``services``, an http/https URL with no port whose host is a single label (no dot),
not ``localhost`` and not an IP literal is a service candidate: the registry must
list it (``discovery.is_service``, asked before any watch starts), else the request
fails naming ``services=``; every other URL passes through.

Failover (the rules of :mod:`registry_agent._failover`, shared with the requests
adapter): a connect failure goes to another instance, at most ``retries`` more times
(instances are told apart by address, not only by id: on Consul two nodes may hold
the same id); statuses in ``policy.retry_statuses`` and read timeouts (opt-in) are
retried for idempotent methods only; a retried 5xx is closed before the next attempt
and the last one is returned, not raised. When instances run out, the last attempt's
own error is raised, saying how many instances were tried. Every outcome is reported
to ``discovery.report()`` (outlier ejection). The ``Host`` header keeps the service
name; for ``https://SERVICE/`` the TLS server name (SNI and the certificate check) is
``policy.server_name`` or the service name. An instance without a port (``port`` 0,
read from another tool's entry) is never a target: it is skipped, and that is no retry.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Collection
from typing import Any, Literal, NoReturn, Protocol

import httpx

from registry_agent._errors import NoInstanceAvailable, RegistryError
from registry_agent._failover import ClientClosed, Failover, NoPortLeft, Outcome, Routing
from registry_agent._models import ServiceInstance
from registry_agent._policy import DiscoveryPolicy
from registry_agent._select import Strategy

__all__ = ["AsyncDiscoveryTransport", "DiscoveryTransport"]


class _Chooser(Protocol):
    def choose(
        self,
        service: str,
        strategy: str | Strategy = ...,
        *,
        exclude: tuple[ServiceInstance, ...] = ...,
    ) -> ServiceInstance: ...


class _AsyncChooser(Protocol):
    async def choose(
        self,
        service: str,
        strategy: str | Strategy = ...,
        *,
        exclude: tuple[ServiceInstance, ...] = ...,
    ) -> ServiceInstance: ...


def _outcome(exc: Exception) -> Outcome:
    """What an exception of an attempt says about the instance."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Outcome.CONNECT
    if isinstance(exc, httpx.ReadTimeout):
        return Outcome.READ_TIMEOUT
    if isinstance(
        exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | httpx.WriteTimeout
    ):
        return Outcome.LOST
    return Outcome.LOCAL


def _replayable(request: httpx.Request) -> bool:
    """True when the request body can be sent again (bytes, not a one-shot stream)."""
    return isinstance(request.stream, httpx.ByteStream)


def _route(request: httpx.Request, instance: ServiceInstance, server_name: str) -> None:
    tls = request.url.scheme == "https"
    request.url = request.url.copy_with(host=instance.address, port=instance.port)
    extensions = {**request.extensions, "registry_agent_instance": instance.id}
    if tls and "sni_hostname" not in extensions:
        extensions["sni_hostname"] = server_name
    request.extensions = extensions


_TIMEOUT_WORDS: dict[type[Exception], str] = {
    httpx.ConnectTimeout: "timed out connecting",
    httpx.ReadTimeout: "timed out waiting for the response",
    httpx.WriteTimeout: "timed out sending the request",
    httpx.PoolTimeout: "timed out waiting for a connection from the pool",
}


def _words(exc: BaseException) -> str:
    """What went wrong, in words, the same from the sync and async transports: a
    timeout's own words; else the system's reason (``[Errno 111] Connection refused``)
    where the message lacks it (anyio says "All connection attempts failed", or
    nothing); else ``str(exc)``; else the first message down the cause chain; else the
    class name. An ``ssl.SSLError``'s number is OpenSSL's, not the system's: its text
    stands."""
    for kind, words in _TIMEOUT_WORDS.items():
        if isinstance(exc, kind):
            return f"{type(exc).__name__}: {words}"
    chain: list[BaseException] = []
    seen = exc.__cause__ or exc.__context__
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    code = next(
        (
            e.errno
            for e in chain
            if isinstance(e, OSError) and not isinstance(e, ssl.SSLError) and (e.errno or 0) > 0
        ),
        None,
    )
    if code is not None and f"[Errno {code}]" not in text:
        return f"[Errno {code}] {os.strerror(code)}"
    if text:
        return text
    return next((str(e) for e in chain if str(e)), type(exc).__name__)


def _raise_final(exc: Exception, failover: Failover, request: httpx.Request) -> NoReturn:
    """Raise the attempt's own error (its class, its words), saying how many instances
    were tried; ``request`` carries the URL the caller sent."""
    message = f"{_words(exc)} ({failover.tried()})"
    if isinstance(exc, httpx.TransportError):
        try:
            again = type(exc)(message, request=request)
        except TypeError:
            pass
        else:
            raise again from exc
    exc.add_note(failover.tried())
    raise exc


def _registry_error(request: httpx.Request, service: str, exc: Exception) -> httpx.ConnectError:
    """A registry's answer (no instance, the registry unreachable, ...) as the connect
    error an httpx caller expects, in the registry's words."""
    words = exc.message if isinstance(exc, NoInstanceAvailable) else str(exc)
    return httpx.ConnectError(f"{service}: {words}", request=request)


_INSTANCE_HTTPS = (
    "{url}: an https:// service URL needs transport= to be a callable that makes a "
    "transport (e.g. transport=lambda: httpx.{cls}(verify=ctx)), not a transport instance: "
    "one instance pools connections by address and port, so a connection verified for one "
    "service name could carry requests for another name or for a plain address"
)


class _Base:
    """What the sync and async transports share: arguments, scoping, decisions."""

    def __init__(
        self,
        discovery: Any,
        services: Collection[str] | None,
        others: Literal["pass", "refuse"],
        strategy: str | Strategy,
        retries: int | None,
        policy: DiscoveryPolicy | None,
    ) -> None:
        self.discovery = discovery
        self._routing = Routing(discovery, services, others, strategy, retries, policy)

    def _target(self, request: httpx.Request) -> tuple[str | None, bool]:
        """The service a request names (None: none) and whether it is confirmed;
        raises for a URL refused by ``others="refuse"``."""
        url = request.url
        # The raw host: lower case, IDNA in ASCII (what requests looks up too).
        host = url.raw_host.decode("ascii", "replace")
        scope = self._routing.scope
        service, confirmed = scope.service(url.scheme, host, url.port)
        if service is None:
            why = scope.refusal(str(url.copy_with(query=None, fragment=None)))
            if why is not None:
                raise httpx.ConnectError(why, request=request)
            return None, True
        return service, confirmed or service in self._routing.known

    def _confirmed(
        self, request: httpx.Request, service: str, answer: bool | RegistryError
    ) -> None:
        """Raise unless ``is_service``'s answer confirmed ``service`` (no watch for a
        name nobody confirmed)."""
        why = self._routing.refusal(service, answer)
        if why is not None:
            cause = answer if isinstance(answer, RegistryError) else None
            raise httpx.ConnectError(why, request=request) from cause

    def _check_tls(self, request: httpx.Request, made: bool, cls: str) -> None:
        """Refuse an https:// service URL when ``transport=`` was an instance."""
        if request.url.scheme == "https" and not made:
            url = str(request.url.copy_with(query=None, fragment=None))
            raise httpx.ConnectError(_INSTANCE_HTTPS.format(url=url, cls=cls), request=request)

    def _failover(self, request: httpx.Request, service: str) -> Failover:
        return self._routing.failover(service, request.method, replayable=_replayable(request))


class DiscoveryTransport(_Base, httpx.BaseTransport):
    """For ``httpx.Client``: routes by service name through a blocking :class:`Discovery`.

    ``services``: the only host names routed through discovery (None: the
    single-label rule, each name confirmed by the registry before its first watch).
    ``others``: ``"pass"`` sends every other URL out untouched through
    ``transport``, ``"refuse"`` fails it with a :class:`httpx.ConnectError` saying why.
    ``retries``: attempts on other instances after the first (None:
    ``policy.retries``). ``policy``: the :class:`DiscoveryPolicy` for choosing and
    retrying (None: ``discovery.policy_for(service)``). ``transport``: the inner
    transport that sends (default ``httpx.HTTPTransport()``), or a callable that makes
    one (e.g. ``lambda: httpx.HTTPTransport(verify=ctx)``).

    HTTPS by name: each TLS server name gets a transport of its own from the callable
    (the default makes ``httpx.HTTPTransport()``), so a connection verified for one
    name never carries a request for another name or for a plain address (httpx pools
    connections by address and port). With a transport *instance* an ``https://``
    service URL is refused (:class:`httpx.ConnectError` telling to pass a callable);
    the instance serves ``http://`` service URLs and every URL passed through.

    Errors are httpx's: a registry error (no instance, the registry unreachable) is an
    :class:`httpx.ConnectError` in the registry's words, chained; a failed attempt
    keeps its class and words; ``exc.request.url`` is the URL the caller sent. A
    single-label host the registry cannot confirm (it does not answer) fails at once
    and starts no watch. Hosts are looked up in lower case (IDNA names in ASCII form);
    the default port (``http://orders:80/``) counts as no port.
    """

    def __init__(
        self,
        discovery: _Chooser,
        *,
        services: Collection[str] | None = None,
        others: Literal["pass", "refuse"] = "pass",
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        retries: int | None = None,
        policy: DiscoveryPolicy | None = None,
        transport: httpx.BaseTransport | Callable[[], httpx.BaseTransport] | None = None,
    ) -> None:
        super().__init__(discovery, services, others, strategy, retries, policy)
        make = httpx.HTTPTransport if transport is None else transport
        self._make = None if isinstance(make, httpx.BaseTransport) else make
        self.transport: httpx.BaseTransport = (
            make if isinstance(make, httpx.BaseTransport) else make()
        )
        self._tls: dict[str, httpx.BaseTransport] = {}

    def _inner(self, request: httpx.Request) -> httpx.BaseTransport:
        """The transport for a request routed to an instance (one per TLS server name)."""
        name = request.extensions.get("sni_hostname")
        if request.url.scheme != "https" or self._make is None or not isinstance(name, str):
            return self.transport
        inner = self._tls.get(name)
        if inner is None:
            made = self._make()
            inner = self._tls.setdefault(name, made)  # one per name, even across threads
            if inner is not made:
                made.close()
        return inner

    def _confirm(self, request: httpx.Request, service: str) -> None:
        is_service = getattr(self.discovery, "is_service", None)
        if not callable(is_service):
            return
        answer: bool | RegistryError
        try:
            answer = bool(is_service(service))
        except RegistryError as exc:
            answer = exc
        self._confirmed(request, service, answer)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        service, confirmed = self._target(request)
        if service is None:
            return self.transport.handle_request(request)
        self._check_tls(request, self._make is not None, "HTTPTransport")
        if not confirmed:
            self._confirm(request, service)
        url = request.url
        try:
            return self._send(request, service)
        finally:
            request.url = url  # as the caller sent it: errors and redirects name the service

    def _send(self, request: httpx.Request, service: str) -> httpx.Response:
        failover = self._failover(request, service)
        held: httpx.Response | None = None  # a retried 5xx, returned when none is left
        error: Exception | None = None  # the last attempt's error
        while True:
            try:
                instance = self.discovery.choose(
                    service, self._routing.strategy, **self._routing.choose_kwargs(failover)
                )
                if not self._routing.offer(failover, instance, "transport"):
                    continue  # no port: skipped, which is no retry
            except (RegistryError, NoPortLeft, ClientClosed) as exc:
                if held is not None:
                    return held
                if error is not None:
                    _raise_final(error, failover, request)
                raise _registry_error(request, service, exc) from exc
            if held is not None:
                held.close()
                held = None
            _route(request, instance, failover.policy.tls_server_name(service))
            try:
                response = self._inner(request).handle_request(request)
            except Exception as exc:
                step = self._routing.after(failover, instance, _outcome(exc))
                if not step.retry:
                    if step.report is None:
                        raise
                    _raise_final(exc, failover, request)
                error = exc
                continue
            step = self._routing.after(failover, instance, Outcome.ANSWER, response.status_code)
            if not step.retry:
                return response
            held, error = response, None

    def close(self) -> None:
        self._routing.closed = True
        for inner in (self.transport, *self._tls.values()):
            inner.close()


class AsyncDiscoveryTransport(_Base, httpx.AsyncBaseTransport):
    """For ``httpx.AsyncClient``: routes by service name through :class:`AsyncDiscovery`.

    The same keywords and rules as :class:`DiscoveryTransport` (``transport``: an
    async transport or a callable making one; default ``httpx.AsyncHTTPTransport()``).
    """

    def __init__(
        self,
        discovery: _AsyncChooser,
        *,
        services: Collection[str] | None = None,
        others: Literal["pass", "refuse"] = "pass",
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        retries: int | None = None,
        policy: DiscoveryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | Callable[[], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        super().__init__(discovery, services, others, strategy, retries, policy)
        make = httpx.AsyncHTTPTransport if transport is None else transport
        self._make = None if isinstance(make, httpx.AsyncBaseTransport) else make
        self.transport: httpx.AsyncBaseTransport = (
            make if isinstance(make, httpx.AsyncBaseTransport) else make()
        )
        self._tls: dict[str, httpx.AsyncBaseTransport] = {}

    def _inner(self, request: httpx.Request) -> httpx.AsyncBaseTransport:
        """The transport for a request routed to an instance (one per TLS server name)."""
        name = request.extensions.get("sni_hostname")
        if request.url.scheme != "https" or self._make is None or not isinstance(name, str):
            return self.transport
        inner = self._tls.get(name)
        if inner is None:
            inner = self._tls[name] = self._make()
        return inner

    async def _confirm(self, request: httpx.Request, service: str) -> None:
        is_service = getattr(self.discovery, "is_service", None)
        if not callable(is_service):
            return
        answer: bool | RegistryError
        try:
            answer = bool(await is_service(service))
        except RegistryError as exc:
            answer = exc
        self._confirmed(request, service, answer)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service, confirmed = self._target(request)
        if service is None:
            return await self.transport.handle_async_request(request)
        self._check_tls(request, self._make is not None, "AsyncHTTPTransport")
        if not confirmed:
            await self._confirm(request, service)
        url = request.url
        try:
            return await self._send(request, service)
        finally:
            request.url = url  # as the caller sent it: errors and redirects name the service

    async def _send(self, request: httpx.Request, service: str) -> httpx.Response:
        failover = self._failover(request, service)
        held: httpx.Response | None = None  # a retried 5xx, returned when none is left
        error: Exception | None = None  # the last attempt's error
        while True:
            try:
                instance = await self.discovery.choose(
                    service, self._routing.strategy, **self._routing.choose_kwargs(failover)
                )
                if not self._routing.offer(failover, instance, "transport"):
                    continue  # no port: skipped, which is no retry
            except (RegistryError, NoPortLeft, ClientClosed) as exc:
                if held is not None:
                    return held
                if error is not None:
                    _raise_final(error, failover, request)
                raise _registry_error(request, service, exc) from exc
            if held is not None:
                await held.aclose()
                held = None
            _route(request, instance, failover.policy.tls_server_name(service))
            try:
                response = await self._inner(request).handle_async_request(request)
            except Exception as exc:
                step = self._routing.after(failover, instance, _outcome(exc))
                if not step.retry:
                    if step.report is None:
                        raise
                    _raise_final(exc, failover, request)
                error = exc
                continue
            step = self._routing.after(failover, instance, Outcome.ANSWER, response.status_code)
            if not step.retry:
                return response
            held, error = response, None

    async def aclose(self) -> None:
        self._routing.closed = True
        for inner in (self.transport, *self._tls.values()):
            await inner.aclose()
