"""Helpers for the registry_agent.grpc tests on top of integration/grpc_kit.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from integration.grpc_kit import GrpcServer, grpc_servers


def _close_pipe(server: GrpcServer) -> None:
    if server.process is not None and server.process.stdout is not None:
        server.process.stdout.close()


@contextlib.contextmanager
def started_servers(*names: str, tls: tuple[str, str] | None = None) -> Iterator[list[GrpcServer]]:
    """:func:`grpc_servers`, with each process's stdout pipe closed at the end (an
    unclosed pipe is a ResourceWarning, an error under this suite's filters)."""
    with grpc_servers(*names, tls=tls) as servers:
        try:
            yield servers
        finally:
            for server in servers:
                server.kill()
                _close_pipe(server)


def restart(server: GrpcServer) -> None:
    """Start a killed server again on its port, closing the old process's pipe."""
    _close_pipe(server)
    server.start()
