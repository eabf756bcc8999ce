"""Prometheus metrics of the agent, read at scrape time from each registration's typed status
(the same value /status and /readyz read).

The ``registry_agent_<name>`` families are per service instance, summed over its
backends (``registered``/``ready``: in any backend); the ``registry_agent_backend_<name>``
families say the same per backend, labelled ``backend`` (its URL without credentials
or options).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry_agent._health.checks import CheckResult, HealthCheck
from registry_agent._health.gate import GateState
from registry_agent._status import RegistrationStatus

__all__ = ["AgentMetrics"]

_COUNTERS = {
    "registrations": "Registrations of an instance that was not in the registry",
    "reregistrations": "Registrations again after the registry lost our entry",
    "deregistrations": "Removals from the registry (unhealthy or stopping)",
    "lease_losses": "Times the registry lost our lease, check or entry",
    "errors": "Failed registry calls (each retried with backoff)",
    "verifications": "Anti-entropy reads of our own entry",
}


class _StatusCollector(Collector):
    def __init__(
        self,
        snapshots: Callable[[], Iterable[RegistrationStatus]],
        backend_names: Callable[[], Sequence[str]],
    ) -> None:
        self.snapshots = snapshots
        self.backend_names = backend_names

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "instance"]
        counters = {
            name: CounterMetricFamily(f"registry_agent_{name}", help_text, labels=labels)
            for name, help_text in _COUNTERS.items()
        }
        heartbeats = CounterMetricFamily(
            "registry_agent_heartbeats", "Heartbeats sent", labels=[*labels, "result"]
        )
        state = GaugeMetricFamily(
            "registry_agent_service_state",
            "1 for the state each service is in",
            labels=[*labels, "state"],
        )
        registered = GaugeMetricFamily(
            "registry_agent_registered", "1 while the registry holds the entry", labels=labels
        )
        ready = GaugeMetricFamily(
            "registry_agent_ready",
            "1 while the registry holds the entry as passing (what /readyz says)",
            labels=labels,
        )
        check_up = GaugeMetricFamily(
            "registry_agent_check_up",
            "1 while a check is up (after rise/fall)",
            labels=[*labels, "check"],
        )
        per_backend = _BackendFamilies([*labels, "backend"], self.backend_names())
        for snap in self.snapshots():
            per_backend.add(snap)
            ids = [snap.service, snap.instance]
            for name, family in counters.items():
                family.add_metric(ids, snap.counters[name])
            heartbeats.add_metric([*ids, "ok"], snap.counters["heartbeats_ok"])
            heartbeats.add_metric([*ids, "failed"], snap.counters["heartbeats_failed"])
            for value in GateState:
                state.add_metric([*ids, value.value], 1.0 if snap.state == value.value else 0.0)
            registered.add_metric(ids, 1.0 if snap.registered else 0.0)
            ready.add_metric(ids, 1.0 if snap.ready else 0.0)
            for name, check in snap.checks.items():
                check_up.add_metric([*ids, name], 1.0 if check.up else 0.0)
        yield from counters.values()
        yield from (heartbeats, state, registered, ready, check_up)
        yield from per_backend.families()


class _BackendFamilies:
    """The per-backend families: each backend of each registration, labelled ``backend``."""

    def __init__(self, labels: list[str], names: Sequence[str]) -> None:
        self.names = names
        self.counters = {
            name: CounterMetricFamily(
                f"registry_agent_backend_{name}", f"{help_text}, per backend", labels=labels
            )
            for name, help_text in _COUNTERS.items()
        }
        self.heartbeats = CounterMetricFamily(
            "registry_agent_backend_heartbeats",
            "Heartbeats sent, per backend",
            labels=[*labels, "result"],
        )
        self.registered = GaugeMetricFamily(
            "registry_agent_backend_registered",
            "1 while this backend holds the entry",
            labels=labels,
        )
        self.ready = GaugeMetricFamily(
            "registry_agent_backend_ready",
            "1 while this backend holds the entry as passing",
            labels=labels,
        )

    def add(self, snap: RegistrationStatus) -> None:
        for backend in snap.backends:
            name = self.names[backend.index] if backend.index < len(self.names) else backend.name
            ids = [snap.service, snap.instance, name]
            for name, family in self.counters.items():
                family.add_metric(ids, backend.counters[name])
            self.heartbeats.add_metric([*ids, "ok"], backend.counters["heartbeats_ok"])
            self.heartbeats.add_metric([*ids, "failed"], backend.counters["heartbeats_failed"])
            self.registered.add_metric(ids, 1.0 if backend.registered else 0.0)
            self.ready.add_metric(ids, 1.0 if backend.ready else 0.0)

    def families(self) -> Iterator[Metric]:
        yield from self.counters.values()
        yield from (self.heartbeats, self.registered, self.ready)


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
        self.registry.register(_StatusCollector(snapshots, backend_names))
        self.check_latency = Histogram(
            "registry_agent_check_latency_seconds",
            "Duration of health check runs",
            ["service", "instance", "check", "result"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def check_observer(
        self, registrar_instance: tuple[str, str]
    ) -> Callable[[HealthCheck, CheckResult], None]:
        """An ``on_check`` callback recording latency for one service instance."""
        service, instance = registrar_instance

        def observe(check: HealthCheck, result: CheckResult) -> None:
            self.check_latency.labels(
                service, instance, check.name, "ok" if result.ok else "failed"
            ).observe(result.latency)

        return observe

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
