"""First-run demo: real local servers, one registration each, listed by the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from registry_agent import ServiceInstance, open_backend
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess


def cli(*args: str) -> None:
    print(f"$ registry-agent {' '.join(args)}")
    subprocess.run([sys.executable, "-m", "registry_agent", *args], check=True)


async def demo(server: ServerProcess) -> None:
    print(f"\n== {server.name} dev server at {server.url} (pid {server.pid})")
    backend = open_backend(server.url)
    orders = ServiceInstance(
        "orders", address="127.0.0.1", port=8080, tags=("v1",), meta={"version": "1.4.2"}
    )
    lease = await backend.register(orders, ttl=10)
    print(f"registered {orders.id} with a {lease.ttl:g}s TTL")
    await backend.heartbeat(lease)
    cli("list", "orders", "--backend", server.url)
    await backend.deregister(lease)
    print(f"deregistered {orders.id}")
    cli("list", "orders", "--backend", server.url)
    await backend.close()


def main() -> None:
    for server in (ConsulServer(), EtcdServer()):
        with server:
            asyncio.run(demo(server))
    print("\nservers stopped; done.")


if __name__ == "__main__":
    main()
