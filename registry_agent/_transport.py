"""httpx transports that send ``http://SERVICE/path`` to a healthy instance of SERVICE.

A URL with an explicit port is not a service name and passes through
unchanged. On a connect failure the request goes to another instance, at
most ``retries`` more times (instances are told apart by address, not only
by id: on Consul two nodes may hold the same id); the ``Host`` header keeps
the service name. An instance without a port (``port`` 0, read from another
tool's entry) is never a target: it is skipped, and that is no retry.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from registry_agent._errors import NoInstanceAvailable
from registry_agent._models import ServiceInstance
from registry_agent._select import Strategy

__all__ = ["AsyncDiscoveryTransport", "DiscoveryTransport"]

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)


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


def _is_service_url(request: httpx.Request) -> bool:
    return request.url.port is None and request.url.scheme in ("http", "https")


def _route(request: httpx.Request, instance: ServiceInstance) -> None:
    request.url = request.url.copy_with(host=instance.address, port=instance.port)
    request.extensions = {**request.extensions, "registry_agent_instance": instance.id}


def _no_instance(
    request: httpx.Request, service: str, exc: NoInstanceAvailable
) -> httpx.ConnectError:
    return httpx.ConnectError(f"{service}: {exc.message}", request=request)


def _portless(
    request: httpx.Request,
    service: str,
    instance: ServiceInstance,
    tried: tuple[ServiceInstance, ...],
) -> tuple[ServiceInstance, ...]:
    """``tried`` plus ``instance``, which has no port to connect to (another tool's entry).

    Raises when the chooser offers it again despite ``exclude``: nothing else is left.
    """
    if instance in tried:
        raise httpx.ConnectError(
            f"{service}: no healthy instance with a port ({instance.id} has none)", request=request
        )
    return (*tried, instance)


class DiscoveryTransport(httpx.BaseTransport):
    """For ``httpx.Client``: routes by service name through a blocking :class:`Discovery`."""

    def __init__(
        self,
        discovery: _Chooser,
        *,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.discovery = discovery
        self.strategy = strategy
        self.retries = retries
        self.transport = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_service_url(request):
            return self.transport.handle_request(request)
        service = request.url.host
        tried: tuple[ServiceInstance, ...] = ()
        skipped = 0  # instances without a port in ``tried``
        while True:
            try:
                instance = self.discovery.choose(service, self.strategy, exclude=tried)
            except NoInstanceAvailable as exc:
                raise _no_instance(request, service, exc) from exc
            if not instance.port:
                # Never a target; skipping it is no retry.
                tried = _portless(request, service, instance, tried)
                skipped += 1
                continue
            _route(request, instance)
            try:
                return self.transport.handle_request(request)
            except _RETRYABLE:
                tried += (instance,)
                if len(tried) - skipped > self.retries:
                    raise

    def close(self) -> None:
        self.transport.close()


class AsyncDiscoveryTransport(httpx.AsyncBaseTransport):
    """For ``httpx.AsyncClient``: routes by service name through :class:`AsyncDiscovery`."""

    def __init__(
        self,
        discovery: _AsyncChooser,
        *,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.discovery = discovery
        self.strategy = strategy
        self.retries = retries
        self.transport = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_service_url(request):
            return await self.transport.handle_async_request(request)
        service = request.url.host
        tried: tuple[ServiceInstance, ...] = ()
        skipped = 0  # instances without a port in ``tried``
        while True:
            try:
                instance = await self.discovery.choose(service, self.strategy, exclude=tried)
            except NoInstanceAvailable as exc:
                raise _no_instance(request, service, exc) from exc
            if not instance.port:
                # Never a target; skipping it is no retry.
                tried = _portless(request, service, instance, tried)
                skipped += 1
                continue
            _route(request, instance)
            try:
                return await self.transport.handle_async_request(request)
            except _RETRYABLE:
                tried += (instance,)
                if len(tried) - skipped > self.retries:
                    raise

    async def aclose(self) -> None:
        await self.transport.aclose()
