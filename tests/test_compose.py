"""docker-compose.yml: no Docker engine runs here, so check its structure and its agent configs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from registry_agent._agent.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) == {"consul", "etcd", "sample", "agent-consul", "agent-etcd"}
    for name, service in services.items():
        image = service.get("image", "")
        assert image, f"{name} has an image"
        assert ":" in image, f"{name} pins its image"
        assert not image.endswith(":latest"), f"{name} pins its image"
        first = image.split("/")[0]
        assert "/" not in image or "." not in first, f"{name}: an image named without a host"
    assert services["consul"]["image"].startswith("hashicorp/consul:")
    assert "-dev" in services["consul"]["command"]
    assert "etcd-server" in services["etcd"]["command"]


def test_ports_bind_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_agents_wait_for_their_registry_and_the_sample() -> None:
    services = compose()["services"]
    for agent, registry in (("agent-consul", "consul"), ("agent-etcd", "etcd")):
        depends = services[agent]["depends_on"]
        assert depends[registry] == {"condition": "service_healthy"}
        assert "sample" in depends
        assert "healthcheck" in services[registry]
        assert "registry-agent run -c /agent.toml" in services[agent]["command"]
        assert services[agent]["init"] is True, f"{agent} runs under an init (zombies reaped)"
        (config,) = services[agent]["configs"]
        assert config["target"] == "/agent.toml"


def test_agent_configs_are_valid_and_point_at_compose_services() -> None:
    data = compose()
    services = data["services"]
    for name, scheme in (("agent-consul", "consul"), ("agent-etcd", "etcd")):
        text = data["configs"][name]["content"]
        config = parse_config(
            tomllib.loads(text), source=f"docker-compose.yml configs.{name}", env={}
        )
        assert config.backend.url.startswith(f"{scheme}://{scheme}:")
        (service,) = config.services
        assert service.instance.address in services
        (check,) = service.checks
        assert check.kind == "http"
        assert str(check.target).startswith(
            f"http://{service.instance.address}:{service.instance.port}/"
        )
        assert config.status_listen == ("0.0.0.0", 9750)


def test_the_compose_test_script_points_the_tests_at_the_servers() -> None:
    script = (ROOT / "integration" / "compose-tests.sh").read_text()
    assert "REGISTRY_AGENT_CONSUL_URL=consul://127.0.0.1:8500" in script
    assert "REGISTRY_AGENT_ETCD_URL=etcd://127.0.0.1:2379" in script
    ports = {p for s in compose()["services"].values() for p in s.get("ports", [])}
    assert "127.0.0.1:8500:8500" in ports
    assert "127.0.0.1:2379:2379" in ports
