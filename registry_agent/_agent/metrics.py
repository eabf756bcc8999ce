"""Prometheus metrics of the agent: :class:`registry_agent.metrics.RegistryCollector` over
its services, read at scrape time from each registration's typed status (the same value
/status and /readyz read).

The ``registry_agent_<name>`` families are per service instance, summed over its
backends (``registered``/``ready``: in any backend); the ``registry_agent_backend_<name>``
families say the same per backend, labelled ``backend`` (its URL without credentials
or options).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest

from registry_agent._health.checks import CheckResult, HealthCheck
from registry_agent._status import RegistrationStatus
from registry_agent.metrics import RegistryCollector

__all__ = ["AgentMetrics"]


class AgentMetrics:
    """The agent's metrics: ``snapshots()`` gives every registration's status at scrape time,
    ``backend_names()`` the ``backend`` label of each backend by its place (the registrar's
    own name where it has none); ``check_observer`` feeds the latency histogram."""

    def __init__(
        self,
        snapshots: Callable[[], Iterable[RegistrationStatus]],
        backend_names: Callable[[], Sequence[str]] = list,
    ) -> None:
        self.registry = CollectorRegistry()
        self.collector = RegistryCollector(
            snapshots=snapshots, backend_names=backend_names, registry=self.registry
        )

    def check_observer(
        self, registrar_instance: tuple[str, str]
    ) -> Callable[[HealthCheck, CheckResult], None]:
        """An ``on_check`` callback recording latency for one service instance."""
        return self.collector.check_observer(*registrar_instance)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
