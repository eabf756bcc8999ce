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
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use, inside the running loop (never across fork()).
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                verify=self.verify,
                cert=self.cert,
                limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=30.0),
                trust_env=False,
            )
        return self._client

    def _timeout_for(self, params: Sequence[tuple[str, Any]] | None) -> httpx.Timeout:
        wait = dict(params or ()).get("wait")
        if isinstance(wait, str) and _WAIT_PARAM.match(wait):
            # Consul adds up to wait/16 of jitter to a blocking query.
            read = parse_duration(wait, field="wait") * 17 / 16 + self.timeout
            return httpx.Timeout(self.timeout, read=read)
        return httpx.Timeout(self.timeout)

    async def _request(
        self,
        callback: Callable[[base.Response], Any],
        method: str,
        path: str,
        params: Sequence[tuple[str, Any]] | None,
        data: str | bytes | None,
        headers: dict[str, str] | None,
    ) -> Any:
        response = await self._http().request(
            method,
            self.uri(path, list(params) if params else None),
            content=data or None,
            headers=headers,
            timeout=self._timeout_for(params),
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
        if self._client is not None:
            client, self._client = self._client, None
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
