"""What the peers' etcd formats share: presence only, and the agent's [backend] takes them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from registry_agent_etcd import EtcdBackend

from registry_agent import AsyncRegistrar, ConfigError, ServiceInstance
from registry_agent._agent.config import load_config
from registry_agent._agent.runtime import open_configured_backend, registrar_for
from registry_agent.testing.servers import EtcdServer

# format -> its default prefix, and a [backend] line of its own to check (or "")
FORMATS = {
    "go-zero": ("", ""),
    "kratos": ("/microservices", 'scheme = "grpc"'),
    "go-micro": ("/micro/registry", ""),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_on_unhealthy_critical_is_refused_at_start(etcd_server: EtcdServer, fmt: str) -> None:
    """These formats say only that an instance is there: 'critical' cannot be said."""
    inst = ServiceInstance("orders", address="127.0.0.1", port=8080, scheme="grpc")
    reg = AsyncRegistrar(f"{etcd_server.url}?format={fmt}", inst, on_unhealthy="critical")
    with pytest.raises(ConfigError) as info:
        await reg.start()
    assert info.value.field == "on_unhealthy"
    assert f"format={fmt} carries presence, not health" in str(info.value)
    assert 'on_unhealthy="deregister"' in str(info.value)
    await reg.backend.close()


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_the_agent_takes_the_format_in_its_backend_table(
    etcd_server: EtcdServer, tmp_path: Path, fmt: str
) -> None:
    prefix, extra = FORMATS[fmt]
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [backend]
            url = "{etcd_server.url}"
            format = "{fmt}"
            {extra}

            [[service]]
            name = "orders.rpc"
            address = "127.0.0.1"
            port = 8080
            scheme = "grpc"
            version = "v1"
            ttl = "3s"
            """
        )
    )
    config = load_config(path, env={})
    backend = open_configured_backend(config)
    try:
        assert isinstance(backend, EtcdBackend)
        assert (backend.format.name, backend.prefix) == (fmt, prefix)
        if extra:
            assert getattr(backend.format, "scheme", None) == "grpc"
        await registrar_for(backend, config.services[0]).validate()
    finally:
        await backend.close()
    bad = path.read_text().replace(f'format = "{fmt}"', f'format = "{fmt}x"')
    path.write_text(bad.replace(extra, "") if extra else bad)
    with pytest.raises(ConfigError) as info:
        open_configured_backend(load_config(path, env={}))
    assert info.value.field == "backend.format"
