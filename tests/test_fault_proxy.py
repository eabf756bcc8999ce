"""The fault proxy against tiny local echo and HTTP servers: every mode, switched live."""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from registry_agent.testing.faultproxy import FaultProxy

QUIET = 0.5  # how long "nothing arrives" is watched for


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


class _Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"upstream"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Threading(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    with _Threading(("127.0.0.1", 0), _Echo) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1]
        server.shutdown()


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        yield proxy


@pytest.fixture
def connect(echo: FaultProxy) -> Iterator[Callable[[], socket.socket]]:
    opened: list[socket.socket] = []

    def open_one() -> socket.socket:
        sock = socket.create_connection((echo.host, echo.port), timeout=5)
        opened.append(sock)
        return sock

    yield open_one
    for sock in opened:
        sock.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def assert_silent(sock: socket.socket, within: float = QUIET) -> None:
    """Nothing (no data, no FIN, no RST) arrives on ``sock`` for ``within`` seconds."""
    sock.settimeout(within)
    with pytest.raises(TimeoutError):
        sock.recv(1)


def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_forwards_and_counts_connections(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    assert echo.mode == "forward"
    sock = connect()
    sock.sendall(b"hello")
    assert recv_exactly(sock, 5) == b"hello"
    assert echo.connections == 1
    sock.close()
    until(lambda: echo.connections == 0)


def test_latency_delays_each_direction(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    sock = connect()
    echo.latency(0.2)
    assert echo.mode == "latency"
    started = time.monotonic()
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    took = time.monotonic() - started
    print(f"round trip with 0.2 s latency: {took:.3f} s")
    assert 0.4 <= took < 2.0
    echo.heal()
    started = time.monotonic()
    sock.sendall(b"y")
    assert recv_exactly(sock, 1) == b"y"
    assert time.monotonic() - started < 0.2


def test_stall_holds_open_and_new_connections_until_heal(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    old = connect()
    old.sendall(b"a")
    assert recv_exactly(old, 1) == b"a"
    echo.stall()
    old.sendall(b"b")
    new = connect()  # accepted...
    new.sendall(b"c")
    assert_silent(old)  # ...but nobody answers
    assert_silent(new)
    echo.heal()
    assert recv_exactly(old, 1) == b"b"
    assert recv_exactly(new, 1) == b"c"


def test_blackhole_silences_open_connections_for_good(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    old = connect()
    old.sendall(b"a")
    assert recv_exactly(old, 1) == b"a"
    echo.blackhole()
    old.sendall(b"lost")
    assert_silent(old)
    new = connect()
    new.sendall(b"n")
    assert_silent(new)
    echo.heal()
    old.sendall(b"still lost")
    assert_silent(old)  # no data, and no FIN/RST either: recv would return b"" or raise
    assert recv_exactly(new, 1) == b"n"  # a connection made during the blackhole only stalled
    fresh = connect()
    fresh.sendall(b"ok")
    assert recv_exactly(fresh, 2) == b"ok"
    assert echo.connections == 3
    old.close()
    until(lambda: echo.connections == 2)


def test_reset_after_cuts_responses_with_rst(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    sock = connect()
    sock.sendall(b"warm")
    assert recv_exactly(sock, 4) == b"warm"
    echo.reset_after(100)
    assert echo.mode == "reset"
    sock.sendall(b"z" * 1000)
    sock.settimeout(5)
    got = b""

    def read_to_the_end() -> None:
        nonlocal got
        while chunk := sock.recv(65536):
            got += chunk

    with pytest.raises(ConnectionResetError):
        read_to_the_end()
    assert got == b"z" * 100


def test_refuse_resets_open_connections_and_rebinds_on_heal(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    sock = connect()
    sock.sendall(b"a")
    assert recv_exactly(sock, 1) == b"a"
    port = echo.port
    echo.refuse()
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        sock.recv(1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((echo.host, echo.port), timeout=5).close()
    echo.heal()
    assert echo.port == port
    again = connect()
    again.sendall(b"b")
    assert recv_exactly(again, 1) == b"b"


def test_http_answers_every_request_and_keeps_the_connection(http_port: int) -> None:
    with FaultProxy("127.0.0.1", http_port) as proxy:
        client = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        try:
            client.request("GET", "/v1/x")
            first = client.getresponse()
            assert (first.status, first.read()) == (200, b"upstream")
            proxy.http(429, "slow down", {"Retry-After": "1"})  # switched on the open connection
            client.request("PUT", "/v1/x", body=b"{" + b"a" * 5000 + b"}")
            answer = client.getresponse()
            assert answer.status == 429
            assert answer.getheader("Retry-After") == "1"
            assert answer.read() == b"slow down"
            client.request(
                "GET",
                "/v1/y",
                headers={"Transfer-Encoding": "chunked"},
                body=iter([b"abc"]),
                encode_chunked=True,
            )
            chunked = client.getresponse()
            assert chunked.status == 429
            chunked.read()
            proxy.http(500, "No cluster leader")
            client.request("GET", "/v1/z")
            leader = client.getresponse()
            assert (leader.status, leader.reason, leader.read()) == (
                500,
                "Internal Server Error",
                b"No cluster leader",
            )
            assert proxy.connections == 1  # keep-alive all along
            proxy.heal()
            client.request("GET", "/v1/x")
            healed = client.getresponse()
            assert (healed.status, healed.read()) == (200, b"upstream")
        finally:
            client.close()


def test_garbage_answers_random_bytes_then_closes(
    echo: FaultProxy, connect: Callable[[], socket.socket]
) -> None:
    sock = connect()
    echo.garbage(1024)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    got = recv_exactly(sock, 4096)  # the garbage, then EOF
    assert len(got) == 1024
    assert got != b"GET / HTTP/1.1\r\n\r\n"[: len(got)]
    # What the client still sends is dropped, never answered with a reset.
    sock.sendall(b"the rest of a request body")
    assert sock.recv(16) == b""
    assert echo.connections == 1
    sock.close()
    until(lambda: echo.connections == 0)


def test_server_down_resets_the_client(echo_port: int) -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
        with sock:
            sock.sendall(b"a")
            with pytest.raises(ConnectionResetError):
                sock.recv(1)


def test_close_ends_connections_and_the_thread(echo_port: int) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port)
    proxy.blackhole()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        until(lambda: proxy.connections == 1)
        proxy.close()
        sock.settimeout(5)
        assert sock.recv(1) == b""
    assert not proxy._thread.is_alive()
    proxy.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        proxy.heal()


def test_bad_arguments_name_themselves(echo: FaultProxy) -> None:
    with pytest.raises(ValueError, match="latency"):
        echo.latency(-1)
    with pytest.raises(ValueError, match="reset_after"):
        echo.reset_after(-1)
    with pytest.raises(ValueError, match="garbage"):
        echo.garbage(0)
    assert echo.mode == "forward"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
