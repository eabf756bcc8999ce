"""The agent's status server: /healthz, /readyz, /status, /metrics. GET only, small and strict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

__all__ = ["StatusServer"]

log = logging.getLogger("registry_agent.status")

_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0
Handler = Callable[[], tuple[int, str, bytes]]


def json_body(status: int, data: Any) -> tuple[int, str, bytes]:
    """A JSON response."""
    return status, "application/json", (json.dumps(data, indent=2, default=str) + "\n").encode()


class StatusServer:
    """Serves ``routes`` (path -> handler) on ``host:port``: HTTP/1.1, one request a connection."""

    def __init__(self, host: str, port: int, routes: dict[str, Handler]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and serve; the chosen port is in ``self.port`` (for port 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, extra = self._respond(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        except Exception:
            log.exception("status request failed")
            status, content_type, body, extra = 500, "text/plain", b"internal error\n", {}
        reason = HTTPStatus(status).phrase
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
            "Cache-Control": "no-store",
            **extra,
        }
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if not head.startswith(b"HEAD "):
            payload += body
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
        writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        if len(head) > _MAX_REQUEST:
            return 431, "text/plain", b"request too large\n", {}
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request\n", {}
        method, target, _ = parts
        path = target.split("?", 1)[0]
        handler = self.routes.get(path)
        if handler is None:
            known = ", ".join(sorted(self.routes))
            return 404, "text/plain", f"not found; try {known}\n".encode(), {}
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n", {"Allow": "GET, HEAD"}
        status, content_type, body = handler()
        return status, content_type, body, {}
