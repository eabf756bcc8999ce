"""One typed status of a registration: what ``status()``, ``/status``, ``/readyz`` and
``/metrics`` all read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from registry_agent._health.base import CheckResult

__all__ = ["BackendStatus", "CheckStatus", "RegistrationCounters", "RegistrationStatus"]


@dataclass(slots=True)
class RegistrationCounters:
    """What a registrar has done since it was created (monotonic counts)."""

    registrations: int = 0
    reregistrations: int = 0
    deregistrations: int = 0
    heartbeats_ok: int = 0
    heartbeats_failed: int = 0
    verifications: int = 0
    lease_losses: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def total(cls, many: Iterable[RegistrationCounters]) -> RegistrationCounters:
        """The sums of several registrations' counters (one per backend)."""
        summed = cls()
        for counters in many:
            for f in fields(cls):
                setattr(summed, f.name, getattr(summed, f.name) + getattr(counters, f.name))
        return summed


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """One health check: whether the gate counts it up, and its last result (None: not run yet)."""

    up: bool
    last: CheckResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"up": …}`` plus the last result's fields."""
        return {"up": self.up, **(self.last.to_dict() if self.last is not None else {})}


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One backend of a registrar: what it holds of our entry (``status()["backends"]``)."""

    #: Its place in the registrar's list of backends.
    index: int
    #: Its name in events and logs: the URL without credentials or options, or a
    #: Backend object's repr (``(backend[i])`` added when a name repeats).
    name: str
    #: Its URL scheme, e.g. ``consul``.
    backend: str
    registered: bool
    registry_status: str | None
    registry_note: str | None
    ready: bool
    not_ready_reason: str | None
    last_heartbeat: float | None
    last_error: str | None
    counters: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["counters"] = dict(self.counters)
        return data


@dataclass(frozen=True, slots=True)
class RegistrationStatus:
    """A registrar's state at one moment (see ``AsyncRegistrar.status`` for each field)."""

    service: str
    instance: str
    backend: str
    #: starting (not started yet, or no registry has taken the entry yet), registered
    #: (the health gate lets the entry in; ``registered`` says whether a registry holds
    #: it now), withdrawn (held out or critical: unhealthy) or stopped.
    state: str
    #: The registry holds our entry (False once renewals have failed for a TTL).
    registered: bool
    #: Our entry's health as the registry reports it; None when not registered.
    registry_status: str | None
    #: The registry's note on our entry when it is not passing.
    registry_note: str | None
    #: The registry holds our entry as passing.
    ready: bool
    #: Why not ready; None when ready.
    not_ready_reason: str | None
    #: Wall-clock time of the last successful renewal (ours, or the shared one).
    last_heartbeat: float | None
    last_error: str | None
    checks: Mapping[str, CheckStatus]
    counters: Mapping[str, int]
    #: Each backend's own state, in the registrar's order (one for a single backend).
    backends: tuple[BackendStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict ``status()`` returns (and ``/status`` serves); a
        ``backends`` list only when there are several (one backend: as it always was)."""
        shown = {
            "service": self.service,
            "instance": self.instance,
            "backend": self.backend,
            "state": self.state,
            "registered": self.registered,
            "registry_status": self.registry_status,
            "registry_note": self.registry_note,
            "ready": self.ready,
            "not_ready_reason": self.not_ready_reason,
            "last_heartbeat": self.last_heartbeat,
            "last_error": self.last_error,
            "checks": {name: check.to_dict() for name, check in self.checks.items()},
            "counters": dict(self.counters),
        }
        if len(self.backends) > 1:
            shown["backends"] = [backend.to_dict() for backend in self.backends]
        return shown


def frozen_mapping(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy, for the mappings a status holds."""
    return MappingProxyType(dict(values))
