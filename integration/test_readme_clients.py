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
from integration.http_service_kit import services
from integration.readme_kit import readme_block
from integration.test_readme_apps import README_URL, _run, _substitute, _url
from registry_agent import AsyncRegistrar, ServiceInstance, open_backend
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


async def test_last_known_good_recipe(server: ServerProcess, tmp_path: Path) -> None:
    """Run once with the registry up (nothing printed: fresh, saved), once with it stopped."""
    folder = tmp_path / "lkg"
    code = _substitute(
        readme_block("# readme:last-known-good"),
        [(README_URL, _url(server), 1), ("/var/cache/myapp/discovery", str(folder), 1)],
    )
    code += "\nprint(orders.address, orders.port)\ndiscovery.close()\n"
    instance = ServiceInstance("orders", address="127.0.0.1", port=8080, id="orders-1")
    async with AsyncRegistrar(server.url, instance, ttl=10) as registrar:
        assert await registrar.wait_registered(10)
        lines = await asyncio.to_thread(_run, code, tmp_path, {})
        assert lines == ["127.0.0.1 8080"]
        server.stop()
        try:
            lines = await asyncio.to_thread(_run, code, tmp_path, {})
        finally:
            server.start()
    assert len(lines) == 2, lines
    assert lines[0].startswith("serving the last known good: stale: last known good from 20")
    assert lines[1] == "127.0.0.1 8080"


async def test_grpc_channel_recipes(server: ServerProcess, tmp_path: Path) -> None:
    """The sync and the aio block, each against one real grpcio server registered as orders."""
    with grpc_servers("orders") as (grpc_server,):
        instance = ServiceInstance(
            "orders", address="127.0.0.1", port=grpc_server.port, id="orders-1", scheme="grpc"
        )
        async with AsyncRegistrar(server.url, instance, ttl=10) as registrar:
            assert await registrar.wait_registered(10)
            blocks = [readme_block("# readme:grpc-sync"), readme_block("# readme:grpc-aio")]
            for block in blocks:
                code = _substitute(block, [(README_URL, _url(server), 1)])
                lines = await asyncio.to_thread(_run, code, tmp_path, {})
                assert lines == ["SERVING"], block


async def test_discovery_policy_recipe(server: ServerProcess, tmp_path: Path) -> None:
    code = _substitute(
        readme_block("# readme:discovery-policy"), [("etcd://127.0.0.1:2379", _url(server), 1)]
    )
    lines = await asyncio.to_thread(_run, code, tmp_path, {})
    assert lines == [
        "8081",
        "8083",
        "[8081]",
        "eu-1b",
        "no healthy instance matching meta version=v3 (3 healthy do not match)",
    ]
    assert await _held(server) == {}  # every registrar stopped


def test_http_client_recipes(server: ServerProcess, tmp_path: Path) -> None:
    """The httpx (sync and async) and requests blocks against one real HTTP instance."""
    with services(1) as (instance,):
        instance.register(server.url, meta={"version": "v2", "zone": "eu-1a"})
        expected = f"{instance.port} orders GET"
        httpx_code = _substitute(
            readme_block("# readme:httpx-policy"), [(README_URL, _url(server), 2)]
        )
        assert _run(httpx_code, tmp_path, {}) == [expected, expected]
        requests_code = _substitute(
            readme_block("# readme:requests"), [(README_URL, _url(server), 1)]
        )
        assert _run(requests_code, tmp_path, {}) == [expected]
