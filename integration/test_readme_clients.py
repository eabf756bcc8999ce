"""The README's client recipes (issue 16), run as written against real registries.

Each block is read from README.md; the tests change only the registry URL, ports
and paths, run it in a subprocess with a clean environment, and check what it
printed and what the registry holds. Real grpcio servers come from
``integration/grpc_kit.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from integration.grpc_kit import grpc_servers
from integration.readme_kit import readme_block
from integration.test_readme_apps import README_URL, _run, _substitute, _url
from registry_agent import open_backend
from registry_agent.testing.servers import ServerProcess


async def _held(server: ServerProcess, service: str = "orders") -> dict[str, str]:
    """What the registry holds for ``service``: id -> status."""
    backend = open_backend(server.url)
    try:
        snapshot = await backend.list(service)
        return {h.instance.id: str(h.status) for h in snapshot.instances.values()}
    finally:
        await backend.close()


GRPC_CHECK_PROBE = """
assert registrar.wait_registered(15), registrar.status()
print(*registrar.status()["checks"])
registrar.stop()
"""


async def test_grpc_check_recipe(server: ServerProcess, tmp_path: Path) -> None:
    with grpc_servers("orders") as (grpc_server,):
        code = _substitute(
            readme_block("# readme:grpc-check"),
            [(README_URL, _url(server), 1), ("50051", str(grpc_server.port), 2)],
        )
        lines = await asyncio.to_thread(_run, code + GRPC_CHECK_PROBE, tmp_path, {})
    assert lines == [f"grpc 127.0.0.1:{grpc_server.port}/orders"]
    assert await _held(server) == {}  # stopped: gone
