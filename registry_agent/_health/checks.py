"""Health checks: HTTP, TCP, a command, or any callable, each bounded by its timeout.

A check never raises: every outcome, a hang or an exception included, is a
:class:`CheckResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from registry_agent._errors import ConfigError

__all__ = [
    "CallableCheck",
    "CheckResult",
    "CommandCheck",
    "HealthCheck",
    "HttpCheck",
    "TcpCheck",
    "as_check",
]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One run of a check: outcome, why, how long it took, and when (Unix time)."""

    ok: bool
    detail: str
    latency: float
    at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ok": self.ok, "detail": self.detail, "latency": self.latency, "at": self.at}


def _positive(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"expected a number of seconds above zero, got {value!r}", field=field)
    return float(value)


class HealthCheck:
    """Base class: subclasses implement :meth:`probe`; :meth:`run` bounds and times it."""

    def __init__(self, name: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        self.name = name
        self.interval = _positive(interval, f"check {name}: interval")
        self.timeout = _positive(timeout, f"check {name}: timeout")

    async def probe(self) -> str:
        """Probe once: return a detail on success, raise on failure."""
        raise NotImplementedError

    async def run(self) -> CheckResult:
        """Run :meth:`probe` within ``timeout``; never raises (except cancellation)."""
        at = time.time()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                detail = await self.probe()
            ok = True
        except TimeoutError:
            ok, detail = False, f"timed out after {self.timeout:g}s"
        except Exception as exc:
            ok, detail = False, str(exc) or type(exc).__name__
        return CheckResult(ok, detail, time.perf_counter() - started, at)

    async def aclose(self) -> None:
        """Release what the check holds (connections)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, interval={self.interval:g})"


class HttpCheck(HealthCheck):
    """Passes when ``url`` answers with a status in ``expect_status`` (and ``body`` agrees).

    ``body`` is an optional predicate on the decoded JSON body.
    """

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
            raise ConfigError(f"expected an http:// or https:// URL, got {url!r}", field="http")
        super().__init__(name or f"http {url}", interval=interval, timeout=timeout)
        self.url = url
        self.method = method
        self.expect_status = expect_status
        self.headers = dict(headers or {})
        self.body = body
        self._client: httpx.AsyncClient | None = None

    async def probe(self) -> str:
        if self._client is None:
            # No redirects followed, no proxies from the environment: probe the target itself.
            self._client = httpx.AsyncClient(trust_env=False)
        response = await self._client.request(
            self.method, self.url, headers=self.headers, timeout=self.timeout
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


class TcpCheck(HealthCheck):
    """Passes when a TCP connection to ``host:port`` opens."""

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


class CommandCheck(HealthCheck):
    """Passes when ``argv`` exits 0. On timeout its whole process group is killed and reaped."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(
                f'expected a list of strings like ["pg_isready", "-q"], got {argv!r}',
                field="command",
            )
        super().__init__(name or f"command {argv[0]}", interval=interval, timeout=timeout)
        self.argv = list(argv)

    async def probe(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = await proc.communicate()
        except BaseException:
            # Timeout or cancellation: kill the group (children too), then reap.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        text = output.decode(errors="replace").strip()[-200:]
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}" + (f": {text}" if text else ""))
        return text or "exit 0"


class CallableCheck(HealthCheck):
    """Passes when ``func()`` returns a true value or None; a false one or an exception fails.

    Async functions are awaited; plain ones run in a worker thread so they
    never block the event loop (a hung one is abandoned after ``timeout``).
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

    async def probe(self) -> str:
        if inspect.iscoroutinefunction(self.func):
            result = await self.func()
        else:
            result = await asyncio.to_thread(self.func)
            if inspect.isawaitable(result):
                result = await result
        if result is not None and not result:
            raise RuntimeError(f"returned {result!r}")
        return "ok" if result is None or result is True else str(result)


def as_check(obj: HealthCheck | Callable[[], bool | Awaitable[bool | None] | None]) -> HealthCheck:
    """A :class:`HealthCheck` as is; a callable wrapped in :class:`CallableCheck`."""
    if isinstance(obj, HealthCheck):
        return obj
    return CallableCheck(obj)
