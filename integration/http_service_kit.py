"""Real HTTP(S) service instances for the transport and adapter tests: processes on 127.0.0.1
started and killed by PID, registered in a real registry through a Registrar.

Each answers ``"<port> <Host header> <method>"`` (HTTP/1.1, keep-alive). Its mode is set
at run time through ``/_mode/<mode>`` on its own port: ``ok``, ``503`` (every answer a
503), ``slow`` (answers after 3 s), ``reset`` (resets the connection instead).
``python integration/http_service_kit.py PORT [CERT KEY]`` runs one (TLS with a
certificate and key).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from registry_agent import Discovery, Registrar, ServiceInstance
from registry_agent.testing.servers import free_port

SLOW = 3.0  # seconds a "slow" instance takes to answer


class HttpService:
    """One instance: a process serving on ``port``, optionally registered as ``instance``."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.registrars: list[Registrar] = []

    def start(self) -> HttpService:
        args = [sys.executable, str(Path(__file__).resolve()), str(self.port), *(self.tls or ())]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service on {self.port} exited: {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"the service on {self.port} did not listen within 10 s")

    def mode(self, mode: str) -> None:
        """Set what it answers (``ok``, ``503``, ``slow``, ``reset``); plain HTTP only."""
        assert self.tls is None, "set modes on plain HTTP instances"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_mode/{mode}", timeout=5) as r:
            assert r.status == 200

    def kill(self) -> None:
        """SIGKILL, and reap it (by PID: only the process this kit started)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def register(self, url: str, name: str = "orders", **fields: object) -> ServiceInstance:
        """Register it in the registry at ``url`` as an instance of ``name``; waits."""
        instance = ServiceInstance(name, address="127.0.0.1", port=self.port, **fields)  # type: ignore[arg-type]
        self.registrars.append(Registrar(url, instance).start(wait_registered=10))
        return instance

    def close(self) -> None:
        while self.registrars:
            self.registrars.pop().stop()
        self.kill()


@contextlib.contextmanager
def services(count: int, tls: tuple[str, str] | None = None) -> Iterator[list[HttpService]]:
    """``count`` started instances, closed (deregistered, killed) on the way out."""
    started: list[HttpService] = []
    try:
        for _ in range(count):
            started.append(HttpService(tls).start())
        yield started
    finally:
        for service in started:
            service.close()


def wait_for(condition: object, timeout: float, what: str) -> float:
    """Poll ``condition()`` every 50 ms until true; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s")


def register_all(inst: list[HttpService], url: str, discovery: Discovery) -> None:
    """Register each of ``inst`` as ``orders`` and wait (15 s) until ``discovery`` sees all."""
    for service in inst:
        service.register(url)
    wait_for(lambda: len(discovery.instances("orders")) == len(inst), 15, f"{len(inst)} healthy")


@contextlib.contextmanager
def fleet(url: str, count: int = 2, then: str = "ok") -> Iterator[Discovery]:
    """A Discovery that has seen ``count`` instances of ``orders``, each then ``killed`` or
    switched to a mode (``ok``, ``slow``, ``503``, ``reset``); all closed on the way out."""
    with services(count) as inst, Discovery(url) as discovery:
        register_all(inst, url, discovery)
        for service in inst:
            service.kill() if then == "killed" else service.mode(then)
        yield discovery


def close_mid_call(call: Callable[[], object], close: Callable[[], object]) -> BaseException:
    """Run ``call`` in a thread, ``close`` its client 0.3 s in, and return what the call
    raised (it must end within 4 * SLOW and raise)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:
            raised.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    time.sleep(0.3)
    close()
    caller.join(4 * SLOW)
    assert not caller.is_alive(), "the call outlived its closed client"
    assert raised, "the call succeeded after its client was closed"
    return raised[0]


# The server process.

_mode = "ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, each keep-alive answer
    # waited ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        global _mode
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/_mode/"):
            _mode = self.path.removeprefix("/_mode/")
            status = 200
        elif _mode == "503":
            status = 503
        elif _mode == "reset":  # no answer: the connection reset (RST, not FIN)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        else:
            if _mode == "slow":
                time.sleep(SLOW)
            status = 200
        port = self.server.server_port  # type: ignore[attr-defined]
        body = f"{port} {self.headers.get('Host')} {self.command}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _answer


def _serve(port: int, cert: str | None, key: str | None) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    if cert and key:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), *(sys.argv[2:4] if len(sys.argv) >= 4 else (None, None)))
