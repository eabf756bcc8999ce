"""A loopback TCP proxy that misbehaves on demand, for fault tests.

Put it between a client and a real server and switch its behaviour while
connections are open::

    with FaultProxy("127.0.0.1", server_port) as proxy:
        backend_url = f"consul://{proxy.host}:{proxy.port}"
        proxy.blackhole()   # open connections go silent, new ones stall
        ...
        proxy.heal()

The proxy runs its own asyncio loop in a daemon thread, so it is usable from
synchronous and asynchronous tests alike; every switch takes effect before
the method returns.

Modes (:attr:`FaultProxy.mode`):

``forward``
    Normal forwarding (after construction and :meth:`~FaultProxy.heal`).
``latency``
    Every forwarded chunk, either way, is delayed.
``stall``
    New connections are accepted and never answered; open ones stop
    forwarding (held data flows again after a heal).
``blackhole``
    Every open connection goes silent for good: data is discarded, no FIN or
    RST is sent, the socket stays open until the client closes it, even after
    a heal. New connections stall.
``reset``
    Responses are cut by a TCP RST after N bytes (counted per connection from
    the switch).
``refuse``
    The listening socket is closed (connection refused) and open connections
    are reset; the same port is bound again when the mode changes.
``http``
    Every HTTP/1.1 request (head and ``Content-Length`` or chunked body) is
    answered with a fixed response; keep-alive is kept.
``garbage``
    Every request is answered with random bytes, then our side of the connection
    shuts (FIN; what the client still sends is read and dropped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import os
import socket
import struct
import threading
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

__all__ = ["FaultProxy"]

_T = TypeVar("_T")
_CHUNK: Final = 65536
_MAX_HEAD: Final = 65536
_MODES: Final = frozenset(
    {"forward", "latency", "stall", "blackhole", "reset", "refuse", "http", "garbage"}
)
_FORWARDING: Final = frozenset({"forward", "latency", "reset"})
_HOLDING: Final = frozenset({"stall", "blackhole"})


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()


class _HttpRequests:
    """Splits a byte stream into HTTP/1.1 requests (enough to answer each once)."""

    def __init__(self) -> None:
        self._buf = b""
        self._body_left = 0
        self._chunked = False

    def feed(self, data: bytes) -> int:
        """Add bytes; returns how many requests were completed."""
        self._buf += data
        done = 0
        while True:
            if self._chunked:
                end = self._buf.find(b"\r\n0\r\n\r\n")
                if end < 0 and not self._buf.startswith(b"0\r\n\r\n"):
                    self._buf = self._buf[-8:]
                    return done
                cut = 5 if end < 0 else end + 7
                self._buf = self._buf[cut:]
                self._chunked = False
                done += 1
                continue
            if self._body_left:
                taken = min(self._body_left, len(self._buf))
                self._buf = self._buf[taken:]
                self._body_left -= taken
                if self._body_left:
                    return done
                done += 1
                continue
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:  # not HTTP/1.1: answer it anyway
                    self._buf = b""
                    done += 1
                return done
            head, self._buf = self._buf[:end], self._buf[end + 4 :]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    with contextlib.suppress(ValueError):
                        length = max(0, int(value.strip()))
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
            if self._chunked:
                continue
            if length:
                self._body_left = length
                continue
            done += 1


class _Conn:
    """One client connection and, once needed, its upstream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client_r = reader
        self.client_w = writer
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        self.up_task: asyncio.Task[None] | None = None
        self.dead = False
        self.sent = 0  # bytes sent to the client since ``reset`` was armed
        self.requests = _HttpRequests()
        self.closed = False
        self.garbled = False  # garbage sent and our side shut: the rest is discarded


class FaultProxy:
    """A switchable misbehaving TCP proxy in front of ``target_host:target_port``.

    ``host``/``port`` say where to listen (a free loopback port by default);
    :attr:`host` and :attr:`port` tell clients where to connect.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._mode = "forward"
        self._delay = 0.0
        self._reset_after = 0
        self._response = b""
        self._garbage = 0
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._closed = False
        self._listen = self._bind(host, port)
        self.host: str = self._listen.getsockname()[0]
        self.port: int = self._listen.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._changed = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"faultproxy-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._serve())
        except BaseException:
            self.close()
            raise

    # -- public API -----------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The current mode name (see the module docstring)."""
        return self._mode

    @property
    def connections(self) -> int:
        """Client connections currently open (blackholed ones included)."""
        return len(self._conns)

    def latency(self, seconds: float) -> None:
        """Delay every forwarded chunk, either way, by ``seconds``."""
        if seconds < 0:
            raise ValueError("latency: seconds must be >= 0")
        self._switch("latency", delay=seconds)

    def stall(self) -> None:
        """Accept new connections but never answer; open ones stop forwarding."""
        self._switch("stall")

    def blackhole(self) -> None:
        """Silence every open connection for good; new connections stall."""
        self._switch("blackhole")

    def reset_after(self, nbytes: int) -> None:
        """Cut every response with a TCP RST after ``nbytes`` bytes."""
        if nbytes < 0:
            raise ValueError("reset_after: nbytes must be >= 0")
        self._switch("reset", reset_after=nbytes)

    def refuse(self) -> None:
        """Close the listener (connection refused) and reset open connections."""
        self._switch("refuse")

    def http(self, status: int, body: str = "", headers: Mapping[str, str] | None = None) -> None:
        """Answer every HTTP/1.1 request with this response (keep-alive kept)."""
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
        payload = body.encode()
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(payload)}"]
        given = {k.lower() for k in (headers or {})}
        if "content-type" not in given:
            lines.append("Content-Type: text/plain; charset=utf-8")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        response = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        self._switch("http", response=response)

    def garbage(self, nbytes: int = 1024) -> None:
        """Answer every request with ``nbytes`` random bytes, then close."""
        if nbytes < 1:
            raise ValueError("garbage: nbytes must be >= 1")
        self._switch("garbage", garbage=nbytes)

    def heal(self) -> None:
        """Forward normally again (blackholed connections stay dead)."""
        self._switch("forward")

    def close(self) -> None:
        """End every connection and the proxy's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        with contextlib.suppress(OSError):
            self._listen.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port},"
            f" mode={self._mode}, connections={self.connections})"
        )

    # -- loop side ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def _switch(self, mode: str, **settings: Any) -> None:
        assert mode in _MODES
        if self._closed:
            raise RuntimeError("FaultProxy is closed")
        self._call(self._apply(mode, settings))

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=self._listen)

    async def _apply(self, mode: str, settings: dict[str, Any]) -> None:
        previous = self._mode
        self._mode = mode
        self._delay = settings.get("delay", 0.0)
        if "reset_after" in settings:
            self._reset_after = settings["reset_after"]
            for conn in self._conns:
                conn.sent = 0
        self._response = settings.get("response", self._response)
        self._garbage = settings.get("garbage", self._garbage)
        if mode == "blackhole":
            for conn in self._conns:
                conn.dead = True
                self._drop_upstream(conn)
        if mode == "refuse" and previous != "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for conn in list(self._conns):
                self._end(conn, rst=True)
        elif mode != "refuse" and previous == "refuse":
            self._listen = self._bind(self.host, self.port)
            await self._serve()
        # Wake every pump waiting for a change; later waiters use a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            self._end(conn, rst=False)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _end(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if rst:
            _reset(conn.client_w)
        else:
            _close(conn.client_w)
        self._drop_upstream(conn)

    def _drop_upstream(self, conn: _Conn) -> None:
        _close(conn.up_w)
        if conn.up_task is not None and conn.up_task is not asyncio.current_task():
            conn.up_task.cancel()
        conn.up_r = conn.up_w = None
        conn.up_task = None

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        if self._closed or self._mode == "refuse":
            _reset(writer)
            return
        self._conns.add(conn)
        try:
            await self._pump_client(conn)
        except (OSError, asyncio.IncompleteReadError):
            self._end(conn, rst=True)
        except asyncio.CancelledError:
            # Only close() cancels us. Ending normally keeps asyncio's stream callback
            # (3.11) from logging the cancellation as an error.
            pass
        finally:
            if not conn.closed:
                self._end(conn, rst=False)

    async def _pump_client(self, conn: _Conn) -> None:
        while not conn.closed:
            data = await conn.client_r.read(_CHUNK)
            if not data:
                return
            await self._from_client(conn, data)

    async def _from_client(self, conn: _Conn, data: bytes) -> None:
        while not conn.closed:
            mode = self._mode
            if conn.dead or conn.garbled:
                return
            if mode in _HOLDING:
                await self._wait_change()
                continue
            if mode == "refuse":
                self._end(conn, rst=True)
                return
            if mode == "http":
                for _ in range(conn.requests.feed(data)):
                    conn.client_w.write(self._response)
                await conn.client_w.drain()
                return
            if mode == "garbage":
                if not conn.garbled:
                    conn.garbled = True
                    conn.client_w.write(os.urandom(self._garbage))
                    await conn.client_w.drain()
                    # Half-close, reading on: closing with the client's request body
                    # unread would make the kernel reset, hiding the garbage.
                    conn.client_w.write_eof()
                return
            if conn.up_w is None and not await self._connect(conn):
                return
            if mode != "forward" or self._delay:
                await self._maybe_delay()
            if self._mode != mode:
                continue  # switched while we waited: decide again
            assert conn.up_w is not None
            conn.up_w.write(data)
            await conn.up_w.drain()
            return

    async def _connect(self, conn: _Conn) -> bool:
        try:
            conn.up_r, conn.up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._end(conn, rst=True)  # the server is down: like a refused connection
            return False
        conn.up_task = asyncio.create_task(self._pump_upstream(conn, conn.up_r))
        return True

    async def _maybe_delay(self) -> None:
        if self._mode == "latency" and self._delay > 0:
            await asyncio.sleep(self._delay)

    async def _pump_upstream(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            while not conn.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    if self._mode in _FORWARDING and conn.up_r is reader:
                        self._end(conn, rst=False)  # the server closed: so do we
                    elif conn.up_r is reader:
                        conn.up_r = conn.up_w = None
                        conn.up_task = None
                    return
                if not await self._to_client(conn, data):
                    return
        except OSError:
            if conn.up_r is reader:
                self._end(conn, rst=True)

    async def _to_client(self, conn: _Conn, data: bytes) -> bool:
        """Deliver an upstream chunk; False once this connection is finished."""
        while not conn.closed:
            mode = self._mode
            if conn.dead:
                return False
            if mode in _HOLDING:
                await self._wait_change()
                continue
            if mode == "refuse":
                return False
            await self._maybe_delay()
            if self._mode != mode:
                continue
            if mode == "reset":
                left = self._reset_after - conn.sent
                if len(data) > left:
                    conn.client_w.write(data[:left])
                    await conn.client_w.drain()
                    await asyncio.sleep(0.01)  # let the kept bytes leave before the RST
                    self._end(conn, rst=True)
                    return False
                conn.sent += len(data)
            conn.client_w.write(data)
            await conn.client_w.drain()
            return True
        return False
