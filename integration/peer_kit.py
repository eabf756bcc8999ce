"""What the tests of the peers' etcd formats share: etcdctl, a dialable instance, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import pytest

from registry_agent import RetryPolicy
from registry_agent.testing.servers import EtcdServer, find_binary

TTL = 3.0
RETRY = RetryPolicy(initial=0.1, cap=1.0)
MARGIN = 2.0  # scheduling slack on a busy 2-core machine


def etcdctl(server: EtcdServer, *args: str) -> str:
    """Run the real etcdctl (API v3) against ``server``; its stdout."""
    done = subprocess.run(
        [find_binary("etcdctl"), f"--endpoints=127.0.0.1:{server.client_port}", *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        timeout=10,
        check=True,
    )
    return done.stdout.decode()


async def dial(hostport: str) -> bytes:
    """Connect to ``host:port`` (``[ipv6]:port``) as the peers' clients do, and read."""
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 5)
    try:
        return await asyncio.wait_for(reader.read(16), 5)
    finally:
        writer.close()


async def until(condition: Callable[[], object], within: float) -> float:
    """Seconds until the awaited ``condition()`` is true (fails after ``within`` + 10 s)."""
    started = time.monotonic()
    while time.monotonic() - started < within + 10:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"not true within {within + 10:.1f}s")


@contextlib.asynccontextmanager
async def listening() -> AsyncIterator[int]:
    """A TCP server on a free loopback port answering ``hello``: the instance we register."""

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
