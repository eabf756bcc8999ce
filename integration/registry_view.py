"""What a registry holds, read directly through a backend of our own (not the one under test)."""

from __future__ import annotations

from registry_agent import HealthStatus, open_backend


async def registry_health(url: str, service: str) -> dict[str, HealthStatus]:
    """Instance id -> health of ``service`` as the registry at ``url`` holds it now."""
    backend = open_backend(url)
    try:
        snapshot = await backend.list(service)
    finally:
        await backend.close()
    return {h.instance.id: h.status for h in snapshot.instances.values()}
