"""Against real servers: set_backends() with a rotated token (the same URL text, other
carried credentials) keeps the entry with the new token, so revoking the old one breaks
nothing; `watch --once` names the registry it could not read, as `list` does."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from integration.acl import AclConsul
from registry_agent import AsyncRegistrar, ServiceInstance, backends_from_env
from registry_agent._cli import main
from registry_agent.testing.servers import ConsulServer, free_port

ENV_NAMES = (
    "REGISTRY_AGENT_BACKEND",
    "REGISTRY_AGENT_TOKEN",
    "REGISTRY_AGENT_TOKEN_FILE",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "ETCDCTL_ENDPOINTS",
)


@pytest.fixture(autouse=True)
def no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def _new_token(acl: AclConsul) -> tuple[str, str]:
    """(SecretID, AccessorID) of a new token holding the orders-only policy."""
    policy = acl.server.api("/v1/acl/policy/name/orders-only")
    made = acl.server.api("/v1/acl/token", method="PUT", body={"Policies": [{"ID": policy["ID"]}]})
    return made["SecretID"], made["AccessorID"]


async def test_set_backends_with_a_rotated_token_uses_it(acl: AclConsul) -> None:
    old, old_accessor = _new_token(acl)
    new, _ = _new_token(acl)
    url = acl.server.url

    def carrying(token: str) -> list[str]:
        return backends_from_env({"REGISTRY_AGENT_BACKEND": url, "REGISTRY_AGENT_TOKEN": token})

    instance = ServiceInstance("orders", address="127.0.0.1", port=9810, id="orders-rot")
    registrar = AsyncRegistrar(carrying(old), instance, ttl=5)
    try:
        await registrar.start(wait_registered=15)
        assert "orders-rot" in acl.services()
        await registrar.set_backends(carrying(new), timeout=10)
        # The old token is revoked: the entry is kept (re-registered) with the new one.
        acl.server.api(f"/v1/acl/token/{old_accessor}", method="DELETE")
        deadline = time.monotonic() + 15
        while "orders-rot" not in acl.services():
            assert time.monotonic() < deadline, "not registered again with the new token"
            await asyncio.sleep(0.1)
    finally:
        await registrar.stop(timeout=5)
    # Deregistered with the new token (the old one, revoked, is refused: the entry stays).
    assert "orders-rot" not in acl.services()


def test_watch_once_names_the_registry_it_could_not_read(
    consul_server: ConsulServer, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"etcd://127.0.0.1:{free_port()}"
    service = f"w{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    code = main(["watch", service, "--backend", consul_server.url, "--backend", dead, "--once"])
    took = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 0
    assert out.split() == ["TIME", "EVENT", "SERVICE", "ID", "ADDRESS", "HEALTH"]
    (line,) = err.splitlines()
    assert line.startswith("registry-agent: etcd at 127.0.0.1:"), err
    assert line.endswith("(listed without it)"), err
    assert took < 15
    # Both registries read: nothing on stderr.
    code = main(["watch", service, "--backend", consul_server.url, "--once"])
    assert code == 0
    assert capsys.readouterr().err == ""
