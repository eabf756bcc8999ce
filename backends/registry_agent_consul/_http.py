"""An httpx.AsyncClient adapter on py-consul's ``base.HTTPClient`` extension point.

Why not py-consul's own ``consul.aio``: it pulls aiohttp; and its ``std``
client uses requests, whose calls cannot be cancelled. httpx gives us one
async stack (shared with HTTP health checks) and prompt cancellation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from consul import base

from registry_agent._urls import parse_duration

_WAIT_PARAM = re.compile(r"^\d+(?:\.\d+)?(?:ms|s|m|h)?$")


class HttpxConsulClient(base.HTTPClient):  # type: ignore[misc]
    """Sends py-consul's requests with httpx; blocking queries get a longer read timeout."""

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str,
        cert: Any,
        *,
        timeout: float,
    ) -> None:
        super().__init__(host, port, scheme, verify, cert)
        self.timeout = timeout
        self._quick: httpx.AsyncClient | None = None
        self._blocking: httpx.AsyncClient | None = None

    def _http(self, blocking: bool) -> httpx.AsyncClient:
        # Two pools, created on first use inside the running loop (never across
        # fork()): short calls share a few connections (httpcore scans every idle
        # connection on each request, so a big pool costs CPU), while each
        # blocking query holds a connection of its own for up to `wait`.
        if blocking:
            if self._blocking is None:
                self._blocking = self._new_client(httpx.Limits(max_connections=None))
            return self._blocking
        if self._quick is None:
            self._quick = self._new_client(
                httpx.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=30.0)
            )
        return self._quick

    def _new_client(self, limits: httpx.Limits) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.timeout,
            verify=self.verify,
            cert=self.cert,
            limits=limits,
            trust_env=False,
        )

    def _timeout_for(self, params: Sequence[tuple[str, Any]] | None) -> httpx.Timeout | None:
        """The timeout of a blocking query (None for a short call)."""
        wait = dict(params or ()).get("wait")
        if isinstance(wait, str) and _WAIT_PARAM.match(wait):
            # Consul adds up to wait/16 of jitter to a blocking query.
            read = parse_duration(wait, field="wait") * 17 / 16 + self.timeout
            return httpx.Timeout(self.timeout, read=read)
        return None

    async def _request(
        self,
        callback: Callable[[base.Response], Any],
        method: str,
        path: str,
        params: Sequence[tuple[str, Any]] | None,
        data: str | bytes | None,
        headers: dict[str, str] | None,
    ) -> Any:
        blocking = self._timeout_for(params)
        response = await self._http(blocking is not None).request(
            method,
            self.uri(path, list(params) if params else None),
            content=data or None,
            headers=headers,
            timeout=blocking or httpx.Timeout(self.timeout, pool=self.timeout),
        )
        return callback(base.Response(response.status_code, response.headers, response.text))

    def get(
        self,
        callback: Callable[[base.Response], Any],
        path: str,
        params: Sequence[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        return self._request(callback, "GET", path, params, None, headers)

    def put(
        self,
        callback: Callable[[base.Response], Any],
        path: str,
        params: Sequence[tuple[str, Any]] | None = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._request(callback, "PUT", path, params, data, headers)

    def delete(
        self,
        callback: Callable[[base.Response], Any],
        path: str,
        params: Sequence[tuple[str, Any]] | None = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._request(callback, "DELETE", path, params, data, headers)

    def post(
        self,
        callback: Callable[[base.Response], Any],
        path: str,
        params: Sequence[tuple[str, Any]] | None = None,
        data: str = "",
        headers: dict[str, str] | None = None,
    ) -> Any:
        return self._request(callback, "POST", path, params, data, headers)

    async def close(self) -> None:
        clients = [c for c in (self._quick, self._blocking) if c is not None]
        self._quick = self._blocking = None
        for client in clients:
            await client.aclose()


class AsyncConsul(base.Consul):  # type: ignore[misc]
    """py-consul's API object, wired to :class:`HttpxConsulClient`."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        self._timeout = timeout
        super().__init__(**kwargs)

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> HttpxConsulClient:
        return HttpxConsulClient(host, port, scheme, verify, cert, timeout=self._timeout)
