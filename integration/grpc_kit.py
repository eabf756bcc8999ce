"""Real grpcio servers for the gRPC tests: one process each, killed and started by PID.

Each server serves, with raw-bytes messages (no generated code needed):

- ``/test.Echo/Get`` and ``/test.Echo/Create``: answer ``b"<name>:" + request``;
- ``/test.Echo/Stream``: three answers ``b"<name>:<i>"``;
- ``/test.Echo/Slow``: sleeps ``float(request)`` seconds, then answers like ``Get``;
- ``/test.Control/SetHealth``: ``b"<service>=<STATUS>"`` sets the standard health
  servicer's status (SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN; an empty
  service is the server's overall health); ``b"<service>=FORGET"`` removes it
  (the health servicer then answers NOT_FOUND for it);
- ``/test.Control/Fail``: ``b"<CODE> <count>"`` makes the next ``count`` Echo calls
  fail with that status code (``UNAVAILABLE 3``);
- ``grpc.health.v1.Health`` (grpcio-health-checking's servicer): ``""`` and the
  server's name start SERVING.

Run one by hand: ``python -m integration.grpc_kit --port 50051 --name a``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from registry_agent.testing.servers import free_port, freeze_process

ROOT = Path(__file__).resolve().parent.parent

GET = "/test.Echo/Get"
CREATE = "/test.Echo/Create"
STREAM = "/test.Echo/Stream"
SLOW = "/test.Echo/Slow"
SET_HEALTH = "/test.Control/SetHealth"
FAIL = "/test.Control/Fail"


def _bytes(value: bytes) -> bytes:
    return value


def unary(channel: grpc.Channel, method: str = GET) -> Any:
    """A raw-bytes unary-unary callable on ``channel`` (sync or ``grpc.aio``)."""
    return channel.unary_unary(method, request_serializer=_bytes, response_deserializer=_bytes)


def unary_stream(channel: grpc.Channel, method: str = STREAM) -> Any:
    """A raw-bytes unary-stream callable on ``channel``."""
    return channel.unary_stream(method, request_serializer=_bytes, response_deserializer=_bytes)


# ---------------------------------------------------------------- the server process


def _serve(
    port: int, name: str, cert: str | None, key: str | None, client_ca: str | None = None
) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    health_servicer = health.HealthServicer()
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    failing: list[Any] = [grpc.StatusCode.OK, 0]
    lock = threading.Lock()

    def maybe_fail(context: grpc.ServicerContext) -> None:
        with lock:
            code, count = failing
            if count <= 0:
                return
            failing[1] = count - 1
        context.abort(code, f"{name}: failing on purpose")

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        maybe_fail(context)
        return f"{name}:".encode() + request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        maybe_fail(context)
        for i in range(3):
            yield f"{name}:{i}".encode()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        maybe_fail(context)
        time.sleep(float(request or b"0"))
        return f"{name}:".encode() + request

    def set_health(request: bytes, context: grpc.ServicerContext) -> bytes:
        service, _, status = request.decode().partition("=")
        if status == "FORGET":
            with health_servicer._lock:
                health_servicer._server_status.pop(service, None)
        else:
            health_servicer.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
        return b"ok"

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        code, _, count = request.decode().partition(" ")
        with lock:
            failing[:] = [grpc.StatusCode[code], int(count or "1")]
        return b"ok"

    def handler(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_bytes, response_serializer=_bytes
        )

    # No SO_REUSEPORT (grpc's default): a port taken by another process must fail the
    # start, not silently share its connections with it.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Get": handler(get),
                    "Create": handler(get),
                    "Slow": handler(slow),
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        stream, request_deserializer=_bytes, response_serializer=_bytes
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "test.Control", {"SetHealth": handler(set_health), "Fail": handler(fail)}
            ),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    where = f"127.0.0.1:{port}"
    if cert and key:
        credentials = grpc.ssl_server_credentials(
            [(Path(key).read_bytes(), Path(cert).read_bytes())],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None,
            require_client_auth=bool(client_ca),
        )
        server.add_secure_port(where, credentials)
    else:
        server.add_insecure_port(where)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print("ready", flush=True)
    stopped.wait()
    server.stop(grace=1).wait()


# ---------------------------------------------------------------- the test side


@dataclass
class GrpcServer:
    """One grpcio server process on ``127.0.0.1:port``."""

    name: str
    port: int = 0
    tls: tuple[str, str] | None = None  # (certificate, key) PEM files
    client_ca: str | None = None  # with tls: clients must show a certificate this CA signed
    process: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> GrpcServer:
        """Start (or start again, on the same port); returns once it serves."""
        if self.process is not None:
            self.kill()  # reaped, its pipe closed
        if not self.port:
            self.port = free_port()
        command = [sys.executable, "-m", "integration.grpc_kit", "--port", str(self.port)]
        command += ["--name", self.name]
        if self.tls:
            command += ["--cert", self.tls[0], "--key", self.tls[1]]
        if self.client_ca:
            command += ["--client-ca", self.client_ca]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ}
        )
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready" or time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(f"grpc test server {self.name} did not start: {line!r}")
        return self

    def kill(self) -> None:
        """SIGKILL the process (by its PID) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM: a graceful stop (1 s grace), then reaped; SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.kill()

    def pause(self) -> None:
        """SIGSTOP (by its PID): connections are kept and accepted, nothing is answered;
        returns once every thread has stopped."""
        assert self.process is not None
        freeze_process(self.process.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def _control(self, method: str, payload: bytes) -> None:
        with grpc.insecure_channel(self.target) as channel:
            unary(channel, method)(payload, timeout=5)

    def set_health(self, status: str, service: str = "") -> None:
        """Set the health servicer's status for ``service`` (plain-text servers only)."""
        self._control(SET_HEALTH, f"{service}={status}".encode())

    def fail_next(self, code: str, count: int = 1) -> None:
        """The next ``count`` Echo calls fail with ``code`` (plain-text servers only)."""
        self._control(FAIL, f"{code} {count}".encode())


@contextlib.contextmanager
def grpc_servers(*names: str, tls: tuple[str, str] | None = None) -> Iterator[list[GrpcServer]]:
    """Started servers, one per name, killed (by PID) on exit."""
    servers: list[GrpcServer] = []
    try:
        for name in names:
            servers.append(GrpcServer(name, tls=tls).start())
        yield servers
    finally:
        for server in servers:
            server.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--client-ca")
    args = parser.parse_args()
    _serve(args.port, args.name, args.cert, args.key, args.client_ca)
