"""The agent's status server: /healthz, /readyz, /status, /metrics. GET only, small and strict.

It cannot be starved by its own clients: at most ``max_connections`` at once
(a new one evicts the oldest that has not finished sending its request), a
request head must arrive within ``head_timeout`` seconds, and the complaints
about it are logged once a minute, not once a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from registry_agent._status import RegistrationStatus

__all__ = ["StatusServer", "iso_time", "iso_times", "readiness"]

log = logging.getLogger("registry_agent.status")

_MAX_REQUEST = 8192
_HEAD_TIMEOUT = 5.0
_MAX_CONNECTIONS = 64
_COMPLAIN_EVERY = 60.0
Handler = Callable[[], tuple[int, str, bytes]]


def json_body(status: int, data: Any) -> tuple[int, str, bytes]:
    """A JSON response."""
    return status, "application/json", (json.dumps(data, indent=2, default=str) + "\n").encode()


def iso_time(seconds: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC to the millisecond (``2026-12-01T03:40:00.123Z``);
    None stays None."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iso_times(service: dict[str, Any]) -> dict[str, Any]:
    """A service's ``status()`` dict with its times in ISO 8601 (what ``/status`` shows):
    ``last_heartbeat``, each check's ``at``, each backend's ``last_heartbeat``."""
    shown = dict(service)
    shown["last_heartbeat"] = iso_time(shown.get("last_heartbeat"))
    shown["checks"] = {
        name: {**check, "at": iso_time(check["at"])} if "at" in check else check
        for name, check in shown.get("checks", {}).items()
    }
    if "backends" in shown:
        shown["backends"] = [
            {**backend, "last_heartbeat": iso_time(backend.get("last_heartbeat"))}
            for backend in shown["backends"]
        ]
    return shown


def readiness(
    snapshots: Mapping[str, RegistrationStatus], backend_names: Sequence[str] = ()
) -> tuple[int, dict[str, Any]]:
    """What ``/readyz`` answers for these statuses (by key: the agent's service keys):
    ``(200, {"ready": True})`` when every one is ready, else 503 with why each one is
    not (``not_ready``: state, registered, registry_status, why, and each backend's
    reason when there are several, named by ``backend_names`` or their own names);
    503 with ``why`` when there are none."""
    if not snapshots:
        return 503, {"ready": False, "not_ready": {}, "why": "no services running"}

    def name(index: int, own: str) -> str:
        return backend_names[index] if index < len(backend_names) else own

    not_ready = {
        key: {
            "state": snap.state,
            "registered": snap.registered,
            "registry_status": snap.registry_status,
            "why": snap.not_ready_reason,
            # Several backends: ready while any one holds it passing; each one's reason.
            **(
                {"backends": {name(b.index, b.name): b.not_ready_reason for b in snap.backends}}
                if len(snap.backends) > 1
                else {}
            ),
        }
        for key, snap in snapshots.items()
        if not snap.ready
    }
    if not_ready:
        return 503, {"ready": False, "not_ready": not_ready}
    return 200, {"ready": True}


class StatusServer:
    """Serves ``routes`` (path -> handler) on ``host:port``: HTTP/1.1, one request a connection.

    With ``token``, every path but those in ``open_paths`` needs
    ``Authorization: Bearer <token>`` (401 otherwise). ``redact`` is applied
    to every response body (secrets out of whatever a handler rendered).
    """

    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, Handler],
        *,
        token: str | None = None,
        open_paths: Collection[str] = ("/healthz",),
        max_connections: int = _MAX_CONNECTIONS,
        head_timeout: float = _HEAD_TIMEOUT,
        redact: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.token = token
        self.open_paths = frozenset(open_paths)
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.redact = redact
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        # Open connections in arrival order -> True while still reading the request head.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._pending = 0  # accepted, not yet in _open
        self._handlers: set[asyncio.Task[None]] = set()
        self.evicted = 0
        self.timed_out = 0
        self._complained = 0.0
        self._unreported = 0

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._open)

    async def start(self) -> None:
        """Bind and serve; the chosen port is in ``self.port`` (for port 0)."""
        listener = socket.create_server((self.host, self.port), backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = asyncio.get_running_loop().create_task(self._accept(listener))

    async def close(self) -> None:
        """Stop serving."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        if self._listener is not None:
            self._listener.close()
        for writer in list(self._open):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 2)

    async def _accept(self, listener: socket.socket) -> None:
        # One accept at a time, room made before the next: open sockets never pass the cap
        # (a server that accepts in batches holds hundreds before any handler runs).
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: wait, never spin
                self._complain(f"accept failed: {exc}")
                await asyncio.sleep(0.1)
                continue
            evicted = self.evicted
            if not self._make_room():
                conn.close()
                continue
            if self.evicted != evicted:
                # abort() closes the evicted socket on a later loop turn; a burst of
                # ready accepts never yields, so let it close before the next accept.
                await asyncio.sleep(0)
            self._pending += 1
            task = loop.create_task(self._handle(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _make_room(self) -> bool:
        """Evict the oldest connection still idling on its request if we are full."""
        if len(self._open) + self._pending < self.max_connections:
            return True
        idle = next((w for w, reading in self._open.items() if reading), None)
        self.evicted += 1
        self._complain()
        if idle is None:
            return False  # every slot is busy answering: refuse the newcomer
        self._open.pop(idle)
        idle.transport.abort()
        return True

    def _complain(self, problem: str | None = None) -> None:
        self._unreported += 1
        now = time.monotonic()
        if now - self._complained < _COMPLAIN_EVERY:
            return
        self._complained = now
        log.warning(
            "status server: %s; next report in %gs at most",
            problem
            or f"{self._unreported} connection(s) closed over the cap of {self.max_connections} "
            "open at once (clients that connect and send nothing?)",
            _COMPLAIN_EVERY,
            extra={"event": "status_overloaded"},
        )
        self._unreported = 0

    async def _handle(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=_MAX_REQUEST)
        except OSError:
            conn.close()
            return
        finally:
            self._pending -= 1
        self._open[writer] = True
        try:
            await self._serve(reader, writer)
        except Exception:
            # A handler bug or a client gone mid-write: one line, rate-limited, no traceback flood.
            now = time.monotonic()
            if now - self._complained >= _COMPLAIN_EVERY:
                self._complained = now
                log.warning("status request failed", exc_info=True)
        finally:
            self._open.pop(writer, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read keeps nothing open
            else:
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self.timed_out += 1
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        if writer not in self._open:
            return  # evicted meanwhile
        self._open[writer] = False
        try:
            status, content_type, body, extra = self._respond(head)
        except Exception:
            log.exception("status request failed")
            status, content_type, body, extra = 500, "text/plain", b"internal error\n", {}
        if self.redact is not None:
            body = self.redact(body)
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
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(payload)
            async with asyncio.timeout(self.head_timeout):
                await writer.drain()

    def _authorized(self, head: bytes) -> bool:
        if self.token is None:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, given = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(given.strip(), self.token.encode())
        return False

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
            return 405, "text/plain", b"only GET and HEAD\n", {"Allow": "GET, HEAD"}
        if path not in self.open_paths and not self._authorized(head):
            return (
                401,
                "text/plain",
                b"a bearer token is required: Authorization: Bearer <[status] token>\n",
                {"WWW-Authenticate": 'Bearer realm="registry-agent"'},
            )
        status, content_type, body = handler()
        return status, content_type, body, {}
