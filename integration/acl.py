"""A Consul agent with ACLs on (default deny) and a token limited to ``orders*``."""

from __future__ import annotations

from registry_agent.testing.servers import ConsulServer

#: Only the orders services: a process sharing liveness falls back to a check per registration.
ORDERS_ONLY_RULES = (
    'service_prefix "orders" { policy = "write" }\nnode_prefix "" { policy = "read" }'
)
#: The documented policy (SECURITY.md): the services plus the shared heartbeat service.
RULES = ORDERS_ONLY_RULES + '\nservice "registry-agent-heartbeat" { policy = "write" }'


class AclConsul:
    """Creates the ``orders-only`` policy and a token holding it on ``server``."""

    def __init__(self, server: ConsulServer) -> None:
        self.server = server
        policy = server.api(
            "/v1/acl/policy", method="PUT", body={"Name": "orders-only", "Rules": RULES}
        )
        token = server.api("/v1/acl/token", method="PUT", body={"Policies": [{"ID": policy["ID"]}]})
        self.token: str = token["SecretID"]

    def services(self) -> set[str]:
        """What the agent holds, read with the management token."""
        return set(self.server.api("/v1/agent/services"))
