"""Prometheus metrics of an app's registrars and watchers, read at scrape time.

:class:`RegistryCollector` is a ``prometheus_client`` collector: give it the
registrars and watchers (blocking or async) the app runs, register it in a
registry (prometheus_client's default ``REGISTRY`` or one of your own), and expose
that registry the way prometheus_client does (``start_http_server``,
``make_wsgi_app``, ``make_asgi_app``). The agent's ``/metrics`` is this collector
over the agent's services: the same families, the same labels.

A scrape reads each registrar's :meth:`~registry_agent.AsyncRegistrar.snapshot`
and each watcher's :meth:`~registry_agent.AsyncWatcher.stats` directly, from the
scraping thread: plain attributes, no lock, no call into the event loop, no
registry request, so a scrape never waits for a registry (or for a busy loop).
Such a read may meet the loop changing a dict it iterates; it is then read again
(a registrar that still cannot be read is left out of that one scrape).

Labels: ``service``; ``instance_id`` (the instance's id: ``instance`` is
Prometheus's own target label, which it would rename ours to ``exported_instance``);
``backend`` (a backend's URL without credentials or options); and per family
``result``, ``state``, ``check`` or ``type``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry_agent._blocking import Registrar, Watcher
from registry_agent._errors import ConfigError
from registry_agent._health.checks import CheckResult, HealthCheck
from registry_agent._health.gate import GateState
from registry_agent._registrar import AsyncRegistrar
from registry_agent._status import RegistrationStatus
from registry_agent._watcher import AsyncWatcher, WatcherStats, _retried

__all__ = ["CHECK_LATENCY_BUCKETS", "LABEL_INSTANCE", "RegistryCollector"]

#: The label that carries an instance's id (never ``instance``: Prometheus's target label).
LABEL_INSTANCE = "instance_id"

#: Buckets of ``registry_agent_check_latency_seconds``.
CHECK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_IDS = ["service", LABEL_INSTANCE]

_COUNTERS = {
    "registrations": "Registrations of an instance that was not in the registry",
    "reregistrations": "Registrations again after the registry lost our entry",
    "deregistrations": "Removals from the registry (unhealthy or stopping)",
    "lease_losses": "Times the registry lost our lease, check or entry",
    "errors": "Failed registry calls (each retried with backoff)",
    "verifications": "Anti-entropy reads of our own entry",
}

AnyRegistrar = Registrar | AsyncRegistrar
AnyWatcher = Watcher | AsyncWatcher


class RegistryCollector(Collector):
    """Prometheus families of registrars and watchers, read at scrape time.

    ``registrars``: :class:`~registry_agent.Registrar` or
    :class:`~registry_agent.AsyncRegistrar` objects; ``watchers``:
    :class:`~registry_agent.Watcher` or :class:`~registry_agent.AsyncWatcher`
    objects. More can be added and removed later (:meth:`add`, :meth:`remove`,
    from any thread); they are held by weak reference, so one the app drops
    leaves the metrics with it (a stopped registrar that is still referenced shows
    ``state="stopped"`` until removed; a closed watcher is no longer shown). A
    started blocking :class:`~registry_agent.Registrar` or
    :class:`~registry_agent.Watcher` is held by registry_agent itself until
    stopped or closed, so it stays shown even when the app dropped it.
    ``registry``: register the collector
    there at once (e.g. ``prometheus_client.REGISTRY``); else call
    ``registry.register(collector)`` yourself.

    ``snapshots`` (instead of registrars, for an app that keeps its own list; the
    agent uses it) is called at each scrape for the statuses to show;
    ``backend_names`` then names the backends by their place (the status's own
    names otherwise).

    Registrars of one ``service``/``instance_id`` are shown once (the first);
    watchers of one service over the same backends are summed (their gauges:
    the largest).
    """

    def __init__(
        self,
        registrars: Iterable[AnyRegistrar] = (),
        watchers: Iterable[AnyWatcher] = (),
        *,
        snapshots: Callable[[], Iterable[RegistrationStatus]] | None = None,
        backend_names: Callable[[], Sequence[str]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._registrars: dict[int, weakref.ref[AnyRegistrar]] = {}
        self._watchers: dict[int, weakref.ref[AnyWatcher]] = {}
        self._snapshots = snapshots
        self._backend_names = backend_names
        self._latency = Histogram(
            "registry_agent_check_latency_seconds",
            "Duration of health check runs (fed by check_observer)",
            [*_IDS, "check", "result"],
            buckets=CHECK_LATENCY_BUCKETS,
            registry=None,
        )
        for registrar in registrars:
            self._add(registrar, "registrars")
        for watcher in watchers:
            self._add(watcher, "watchers")
        if registry is not None:
            registry.register(self)

    # -- what is shown -------------------------------------------------------------------

    def add(self, *items: AnyRegistrar | AnyWatcher) -> None:
        """Show these registrars and watchers too (each once however often added)."""
        for item in items:
            self._add(item, "add")

    def remove(self, *items: AnyRegistrar | AnyWatcher) -> None:
        """Stop showing these registrars and watchers (unknown ones are ignored)."""
        with self._lock:
            for item in items:
                self._registrars.pop(id(item), None)
                self._watchers.pop(id(item), None)

    def _add(self, item: object, field: str) -> None:
        if isinstance(item, Registrar | AsyncRegistrar):
            table: dict[int, Any] = self._registrars
        elif isinstance(item, Watcher | AsyncWatcher):
            table = self._watchers
        else:
            raise ConfigError(
                "expected a Registrar, AsyncRegistrar, Watcher or AsyncWatcher, got "
                f"{type(item).__name__}",
                field=field,
            )
        key = id(item)
        with self._lock:
            # Dropped by the app: gone from the table too (an id can be reused).
            table[key] = weakref.ref(item, _forget(table, key))

    def check_observer(
        self, service: str, instance_id: str
    ) -> Callable[[HealthCheck, CheckResult], None]:
        """An ``on_check`` callback (a registrar's argument) feeding
        ``registry_agent_check_latency_seconds`` for one instance."""

        def observe(check: HealthCheck, result: CheckResult) -> None:
            self._latency.labels(
                service, instance_id, check.name, "ok" if result.ok else "failed"
            ).observe(result.latency)

        return observe

    # -- the Collector protocol ------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Every family this collector yields, empty (for a registry's duplicate check)."""
        families = _RegistrarFamilies(lambda i: "")
        return [*families.families(), *self._latency.describe(), *_WatcherFamilies().families()]

    def collect(self) -> Iterator[Metric]:
        """The families now: called by the registry at each scrape."""
        names = self._backend_names() if self._backend_names is not None else None
        families = _RegistrarFamilies(
            lambda i: names[i] if names is not None and i < len(names) else ""
        )
        seen: set[tuple[str, str]] = set()
        for snap in self._statuses():
            if (snap.service, snap.instance) not in seen:
                seen.add((snap.service, snap.instance))
                families.add(snap)
        yield from families.families()
        yield from self._latency.collect()
        watched = _WatcherFamilies()
        for watcher in self._live(self._watchers):
            # A closed watcher's last reads are stale: shown, the largest-value merge
            # would hide a live watcher's numbers of the same service behind them.
            if not watcher._closed:
                watched.add(watcher.stats())
        yield from watched.families()

    def _statuses(self) -> Iterator[RegistrationStatus]:
        source = self._snapshots
        if source is not None:
            empty: list[RegistrationStatus] = []
            yield from _retried(lambda: list(source()), empty)
        for registrar in self._live(self._registrars):
            snap = _retried(registrar.snapshot, None)
            if snap is not None:
                yield snap

    def _live(self, table: dict[int, weakref.ref[Any]]) -> list[Any]:
        with self._lock:
            none: list[weakref.ref[Any]] = []
            refs = _retried(lambda: list(table.values()), none)
        return [item for item in (ref() for ref in refs) if item is not None]


def _forget(table: dict[int, Any], key: int) -> Callable[[weakref.ref[Any]], None]:
    """A weakref callback: drop the entry once its object is gone."""

    def forget(ref: weakref.ref[Any]) -> None:
        if table.get(key) is ref:
            table.pop(key, None)

    return forget


class _RegistrarFamilies:
    """The registrar families, filled one status at a time."""

    def __init__(self, backend_name: Callable[[int], str]) -> None:
        self.backend_name = backend_name
        self.counters = {
            name: CounterMetricFamily(f"registry_agent_{name}", text, labels=_IDS)
            for name, text in _COUNTERS.items()
        }
        self.heartbeats = CounterMetricFamily(
            "registry_agent_heartbeats", "Heartbeats sent", labels=[*_IDS, "result"]
        )
        self.state = GaugeMetricFamily(
            "registry_agent_service_state",
            "1 for the state each instance is in",
            labels=[*_IDS, "state"],
        )
        self.registered = GaugeMetricFamily(
            "registry_agent_registered", "1 while the registry holds the entry", labels=_IDS
        )
        self.ready = GaugeMetricFamily(
            "registry_agent_ready",
            "1 while the registry holds the entry as passing (what /readyz says)",
            labels=_IDS,
        )
        self.heartbeat_time = GaugeMetricFamily(
            "registry_agent_last_heartbeat_timestamp_seconds",
            "Unix time of the last successful renewal (absent before the first)",
            labels=_IDS,
        )
        self.check_up = GaugeMetricFamily(
            "registry_agent_check_up",
            "1 while a check is up (after rise/fall)",
            labels=[*_IDS, "check"],
        )
        per_backend = [*_IDS, "backend"]
        self.backend_counters = {
            name: CounterMetricFamily(
                f"registry_agent_backend_{name}", f"{text}, per backend", labels=per_backend
            )
            for name, text in _COUNTERS.items()
        }
        self.backend_heartbeats = CounterMetricFamily(
            "registry_agent_backend_heartbeats",
            "Heartbeats sent, per backend",
            labels=[*per_backend, "result"],
        )
        self.backend_registered = GaugeMetricFamily(
            "registry_agent_backend_registered",
            "1 while this backend holds the entry",
            labels=per_backend,
        )
        self.backend_ready = GaugeMetricFamily(
            "registry_agent_backend_ready",
            "1 while this backend holds the entry as passing",
            labels=per_backend,
        )

    def add(self, snap: RegistrationStatus) -> None:
        ids = [snap.service, snap.instance]
        for name, family in self.counters.items():
            family.add_metric(ids, snap.counters[name])
        self.heartbeats.add_metric([*ids, "ok"], snap.counters["heartbeats_ok"])
        self.heartbeats.add_metric([*ids, "failed"], snap.counters["heartbeats_failed"])
        for value in GateState:
            self.state.add_metric([*ids, value.value], 1.0 if snap.state == value.value else 0.0)
        self.registered.add_metric(ids, 1.0 if snap.registered else 0.0)
        self.ready.add_metric(ids, 1.0 if snap.ready else 0.0)
        if snap.last_heartbeat is not None:
            self.heartbeat_time.add_metric(ids, snap.last_heartbeat)
        for name, check in snap.checks.items():
            self.check_up.add_metric([*ids, name], 1.0 if check.up else 0.0)
        for backend in snap.backends:
            labels = [*ids, self.backend_name(backend.index) or backend.name]
            for name, family in self.backend_counters.items():
                family.add_metric(labels, backend.counters[name])
            self.backend_heartbeats.add_metric([*labels, "ok"], backend.counters["heartbeats_ok"])
            self.backend_heartbeats.add_metric(
                [*labels, "failed"], backend.counters["heartbeats_failed"]
            )
            self.backend_registered.add_metric(labels, 1.0 if backend.registered else 0.0)
            self.backend_ready.add_metric(labels, 1.0 if backend.ready else 0.0)

    def families(self) -> Iterator[Metric]:
        yield from self.counters.values()
        yield from (self.heartbeats, self.state, self.registered, self.ready)
        yield from (self.heartbeat_time, self.check_up)
        yield from self.backend_counters.values()
        yield from (self.backend_heartbeats, self.backend_registered, self.backend_ready)


class _Sum:
    """Samples of one family by label values: counters summed, gauges the largest."""

    def __init__(self, family: CounterMetricFamily | GaugeMetricFamily, largest: bool) -> None:
        self.family = family
        self.largest = largest
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], value: float) -> None:
        old = self.values.get(labels)
        if old is None:
            self.values[labels] = value
        else:
            self.values[labels] = max(old, value) if self.largest else old + value

    def done(self) -> Metric:
        for labels, value in self.values.items():
            self.family.add_metric(list(labels), value)
        return self.family


class _WatcherFamilies:
    """The watcher families, summed over watchers of the same services and backends."""

    def __init__(self) -> None:
        one = ["service", "backend"]

        def counter(name: str, text: str, labels: list[str]) -> _Sum:
            return _Sum(
                CounterMetricFamily(f"registry_agent_watch_{name}", text, labels=labels), False
            )

        def gauge(name: str, text: str, labels: list[str], largest: bool = True) -> _Sum:
            return _Sum(
                GaugeMetricFamily(f"registry_agent_watch_{name}", text, labels=labels), largest
            )

        self.events = counter(
            "events",
            "Events of the watch (its merged view over its backends), by type",
            [*one, "type"],
        )
        self.errors = counter("errors", "Failed reads of a service from a backend", one)
        self.instances = gauge("instances", "Instances a backend holds, as last read", one)
        self.healthy = gauge(
            "healthy_instances", "Passing instances a backend holds, as last read", one
        )
        self.synced = gauge("synced", "1 once the service has been read from the backend", one)
        self.consumers = gauge("consumers", "Loops consuming the watch now", one, largest=False)
        self.pending = gauge(
            "consumer_pending",
            "Instances whose changes the consumers have not taken yet",
            one,
            largest=False,
        )
        self.lag = gauge("consumer_lag_seconds", "How far behind the slowest consumer is", one)
        self.coalesced = counter(
            "coalesced",
            "Changes merged into one a consumer had not taken yet (a slow consumer)",
            one,
        )

    def add(self, stats: WatcherStats) -> None:
        view = ",".join(stats.backends)
        for (service, kind), count in stats.events.items():
            self.events.add((service, view, kind), count)
        for watched in stats.watched:
            labels = (watched.service, watched.backend)
            self.errors.add(labels, watched.errors)
            self.instances.add(labels, watched.instances)
            self.healthy.add(labels, watched.healthy)
            self.synced.add(labels, 1.0 if watched.synced else 0.0)
        labels = (",".join(stats.services), view)
        self.consumers.add(labels, stats.consumers)
        self.pending.add(labels, stats.pending)
        self.lag.add(labels, stats.lag)
        self.coalesced.add(labels, stats.coalesced)

    def families(self) -> Iterator[Metric]:
        for family in (
            self.events,
            self.errors,
            self.instances,
            self.healthy,
            self.synced,
            self.consumers,
            self.pending,
            self.lag,
            self.coalesced,
        ):
            yield family.done()
