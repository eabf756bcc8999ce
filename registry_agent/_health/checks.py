"""Health checks: HTTP, TCP, a command, gRPC health, or any callable, each bounded by its timeout.

A check never raises: every outcome, a hang or an exception included, is a
:class:`CheckResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Container, Mapping
from typing import Any, ClassVar

import httpx

from registry_agent._errors import ConfigError
from registry_agent._health.base import MASK, CheckResult, HealthCheck
from registry_agent._health.command import CommandCheck
from registry_agent._health.grpc_check import GrpcCheck, split_host_port
from registry_agent._health.solo_thread import SoloThread
from registry_agent._urls import Table, as_choice, as_str, as_str_map

__all__ = [
    "CHECK_KINDS",
    "CallableCheck",
    "CheckResult",
    "CommandCheck",
    "GrpcCheck",
    "HealthCheck",
    "HttpCheck",
    "TcpCheck",
    "as_check",
]

# Up to the last "@": a malformed URL may hold an unescaped "/" or "@" in its password.
_USERINFO = re.compile(r"(?<=://).*@")


def _mask_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of a URL in it masked, for error messages."""
    return _USERINFO.sub(f"{MASK}@", text)


# Header names whose value is a credential (``Authorization``, ``X-Api-Key``…).
_SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "cookie", "password")

# Query parameters whose value is a credential (``?access_token=…``, ``?api_key=…``,
# ``?pass=…``, ``?jwt=…``, AWS's ``X-Amz-Credential``/``X-Amz-Signature``).
_SECRET_PARAM = re.compile(
    r"token|pass|pwd|secret|key|auth|signature|sig$|jwt|credential|session|cookie",
    re.IGNORECASE,
)


def _mask_query(query: str) -> tuple[str, list[str]]:
    """``query`` with credential values masked, and those values."""
    shown, secrets = [], []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if eq and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
            # Shown masked always; masked in details when long enough not to garble them.
            secrets += [v for v in (value, urllib.parse.unquote_plus(value)) if len(v) >= 4]
            part = f"{name}={MASK}"
        shown.append(part)
    return "&".join(shown), secrets


def _split_credentials(url: str) -> tuple[str, str, httpx.BasicAuth | None, tuple[str, ...]]:
    """(URL to request, URL to show, basic auth, secrets to mask) for ``url``."""
    parts = urllib.parse.urlsplit(url)
    query, secrets = _mask_query(parts.query)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    auth = None
    shown_netloc = hostport
    if at:
        user, colon, password = userinfo.partition(":")
        # A lone user name is often a token: mask it whole.
        secret = password if colon else user
        secrets += [secret, urllib.parse.unquote(secret)]
        shown_netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
        auth = httpx.BasicAuth(urllib.parse.unquote(user), urllib.parse.unquote(password))
    bare = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    shown = urllib.parse.urlunsplit(parts._replace(netloc=shown_netloc, query=query))
    return bare, shown, auth, tuple(secrets)


class HttpCheck(HealthCheck):
    """Passes when ``url`` answers with a status in ``expect_status`` (and ``body`` agrees).

    ``body`` is an optional predicate on the decoded JSON body. Credentials in
    the URL (``http://user:password@host/``) are sent as basic auth and never
    shown: :attr:`url`, the default name, ``repr`` and every result detail
    read ``http://user:***@host/``. Query parameters named like a credential
    (``access_token``, ``api_key``, ``password``, ``secret``, ``sig``…) are sent
    as given and shown as ``***`` too, and so are the values of headers named
    like one (``Authorization``, ``X-Api-Key``, ``Cookie``…).
    """

    kind: ClassVar[str | None] = "http"
    example: ClassVar[str] = 'http = "http://…"'

    @classmethod
    def from_table(cls, table: Table) -> HttpCheck:
        """``http = "URL"``, ``method``, ``expect_status = 200`` or ``"200-399"``, ``headers``."""
        url = table.require("http", as_str)
        method = table.get("method", as_choice("GET", "HEAD", "POST"), "GET")
        low, high = table.get("expect_status", _status_range, (200, 399))
        headers = table.get("headers", as_str_map, {})
        options = cls.common_options(table)
        with table.naming_fields():
            return cls(
                url,
                method=method,
                expect_status=range(low, high + 1),
                headers=headers,
                **options,
            )

    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        expect_status: Container[int] = range(200, 400),
        headers: Mapping[str, str] | None = None,
        body: Callable[[Any], bool] | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            shown = _mask_userinfo(url) if isinstance(url, str) else url
            raise ConfigError(f"expected an http:// or https:// URL, got {shown!r}", field="http")
        try:
            target, shown, self._auth, secrets = _split_credentials(url)
            httpx.URL(target)
        except (ValueError, httpx.InvalidURL) as exc:
            # The parser's reason may quote part of a malformed password: give it only without one.
            why = "a malformed URL (escape / @ : in credentials as %2F %40 %3A)"
            raise ConfigError(
                f"{why if '@' in url else exc} in {_mask_userinfo(url)!r}", field="http"
            ) from None
        super().__init__(name or f"http {shown}", interval=interval, timeout=timeout)
        self.headers = dict(headers or {})
        header_secrets = [
            value
            for key, value in self.headers.items()
            if any(word in key.lower() for word in _SECRET_HEADER_WORDS)
        ]
        self._hide([*secrets, *header_secrets])
        self._target = target
        #: The URL as it may be shown: credentials masked.
        self.url = shown
        self.method = method
        self.expect_status = expect_status
        self.body = body
        self._client: httpx.AsyncClient | None = None

    async def probe(self) -> str:
        try:
            return await self._request()
        except Exception as exc:
            text = str(exc)
            if self._mask(text) != text:
                # The server echoed a credential back (httpx quotes what it could not parse).
                raise RuntimeError(self._mask(text)) from None
            raise

    async def _request(self) -> str:
        if self._client is None:
            # No redirects followed, no proxies from the environment: probe the target itself.
            self._client = httpx.AsyncClient(trust_env=False)
        response = await self._client.request(
            self.method, self._target, headers=self.headers, auth=self._auth, timeout=self.timeout
        )
        if response.status_code not in self.expect_status:
            raise RuntimeError(f"HTTP {response.status_code}")
        if self.body is not None and not self.body(response.json()):
            raise RuntimeError(f"HTTP {response.status_code}: body check failed")
        return f"HTTP {response.status_code}"

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _status_range(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        if low.strip().isdigit() and high.strip().isdigit():
            return int(low), int(high)
    raise ConfigError(
        f'expected a status like 200 or a range like "200-399", got {value!r}', field=field
    )


class TcpCheck(HealthCheck):
    """Passes when a TCP connection to ``host:port`` opens."""

    kind: ClassVar[str | None] = "tcp"
    example: ClassVar[str] = 'tcp = "host:port"'

    @classmethod
    def from_table(cls, table: Table) -> TcpCheck:
        """``tcp = "host:port"`` (an IPv6 host in brackets: ``"[::1]:5432"``)."""
        target = table.require("tcp", as_str)
        try:
            host, port = split_host_port(target, "tcp", "127.0.0.1:8080")
        except ConfigError as exc:
            raise table.error("tcp", exc.reason) from None
        options = cls.common_options(table)
        with table.naming_fields():
            return cls(host, port, **options)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"expected a port 1-65535, got {port!r}", field="tcp")
        super().__init__(name or f"tcp {host}:{port}", interval=interval, timeout=timeout)
        self.host = host
        self.port = port

    async def probe(self) -> str:
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return f"connected to {self.host}:{self.port}"


class CallableCheck(HealthCheck):
    """Passes when ``func()`` returns a true value or None; a false one or an exception fails.

    Async functions are awaited on the loop. Plain ones run on a daemon
    thread of the check's own, never the loop's default executor: a hung one
    is abandoned after ``timeout`` (nothing ever waits for it, exit included)
    and, while it is still hung, later runs fail at once ("previous run still
    running") instead of starting more threads.
    """

    def __init__(
        self,
        func: Callable[[], Any],
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        if not callable(func):
            raise ConfigError(f"expected a callable, got {func!r}", field="checks")
        label = getattr(func, "__qualname__", None) or repr(func)
        super().__init__(name or f"call {label}", interval=interval, timeout=timeout)
        self.func = func
        self._thread = SoloThread(self.name)

    async def probe(self) -> str:
        if inspect.iscoroutinefunction(self.func):
            result = await self.func()
        else:
            result = await self._thread.call(self.func)
            if inspect.isawaitable(result):
                result = await result
        if result is not None and not result:
            raise RuntimeError(f"returned {result!r}")
        return "ok" if result is None or result is True else str(result)


#: The kinds of check a config table can name, by key: the one registry the agent reads
#: (plus the ``registry_agent.checks`` entry points, see ``_plugins.check_class``).
CHECK_KINDS: Mapping[str, type[HealthCheck]] = {
    cls.kind: cls for cls in (HttpCheck, TcpCheck, CommandCheck, GrpcCheck) if cls.kind
}


def as_check(obj: HealthCheck | Callable[[], bool | Awaitable[bool | None] | None]) -> HealthCheck:
    """A :class:`HealthCheck` as is; a callable wrapped in :class:`CallableCheck`."""
    if isinstance(obj, HealthCheck):
        return obj
    return CallableCheck(obj)
