"""An httpx.AsyncClient adapter on py-consul's ``base.HTTPClient`` extension point.

Why not py-consul's own ``consul.aio``: it pulls aiohttp; and its ``std``
client uses requests, whose calls cannot be cancelled. httpx gives us one
async stack (shared with HTTP health checks) and prompt cancellation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from consul import base
from consul.exceptions import ConsulException

from registry_agent.backend import parse_duration

_WAIT_PARAM = re.compile(r"^\d+(?:\.\d+)?(?:ms|s|m|h)?$")
# Slack on top of a blocking query's wait (+ Consul's wait/16 jitter) for the answer
# to travel: small, so a dead connection is noticed soon after the wait.
_MAX_SLACK = 3.0
# Connections for blocking queries (Consul resets those beyond 200 per client address).
BLOCKING_MAX = 64


class ConsulHTTPError(ConsulException):  # type: ignore[misc]
    """An HTTP answer py-consul's callback would not take, with its status, headers and body."""

    def __init__(self, code: int, headers: Mapping[str, str], body: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.headers = headers
        self.body = body


def handles_errors(callback: Callable[[base.Response], Any]) -> Callable[[base.Response], Any]:
    """Mark a callback that reads error statuses itself (they are not raised before it)."""
    callback.handles_errors = True  # type: ignore[attr-defined]
    return callback


def blocking_bound(wait: float, timeout: float) -> float:
    """The longest a blocking query with ``wait`` may take before it counts as dead."""
    return wait * 17 / 16 + min(timeout, _MAX_SLACK)


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
                # A safety net: the watch hub keeps blocking queries well below this.
                self._blocking = self._new_client(
                    httpx.Limits(
                        max_connections=BLOCKING_MAX, max_keepalive_connections=BLOCKING_MAX
                    )
                )
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

    def _bound_for(self, params: Sequence[tuple[str, Any]] | None) -> float | None:
        """The whole-request bound of a blocking query (None for a short call)."""
        wait = dict(params or ()).get("wait")
        if isinstance(wait, str) and _WAIT_PARAM.match(wait):
            # Consul adds up to wait/16 of jitter to a blocking query.
            return blocking_bound(parse_duration(wait, field="wait"), self.timeout)
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
        blocking = self._bound_for(params)
        bound = blocking or self.timeout
        try:
            # httpx bounds each phase (connect, each read); this bounds the whole call,
            # so a connection that trickles or goes silent is given up in time.
            async with asyncio.timeout(bound):
                response = await self._http(blocking is not None).request(
                    method,
                    self.uri(path, list(params) if params else None),
                    content=data or None,
                    headers=headers,
                    timeout=httpx.Timeout(bound),
                )
        except TimeoutError:
            raise httpx.ReadTimeout(f"no answer within {bound:g}s") from None
        answer = base.Response(response.status_code, response.headers, response.text)
        if response.status_code >= 400 and not getattr(callback, "handles_errors", False):
            raise ConsulHTTPError(answer.code, answer.headers, answer.body, f"HTTP {answer.code}")
        try:
            return callback(answer)
        except ConsulHTTPError:
            raise
        except (ConsulException, ValueError, TypeError, KeyError, AttributeError) as exc:
            # py-consul's decoding of an answer it did not expect (not JSON, wrong shape)
            raise ConsulHTTPError(answer.code, answer.headers, answer.body, str(exc)) from exc

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
        # The watches' shared change signals (registry_agent_consul._hub.Hub), made on first use.
        self.registry_agent_hub: Any = None
        super().__init__(**kwargs)

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> HttpxConsulClient:
        # py-consul writes its base URL as scheme://host:port: an IPv6 literal needs brackets.
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return HttpxConsulClient(host, port, scheme, verify, cert, timeout=self._timeout)
