"""One typed status of a registration: what ``status()``, ``/status``, ``/readyz`` and
``/metrics`` all read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from registry_agent._health.base import CheckResult

__all__ = ["CheckStatus", "RegistrationCounters", "RegistrationStatus"]


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


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """One health check: whether the gate counts it up, and its last result (None: not run yet)."""

    up: bool
    last: CheckResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"up": …}`` plus the last result's fields."""
        return {"up": self.up, **(self.last.to_dict() if self.last is not None else {})}


@dataclass(frozen=True, slots=True)
class RegistrationStatus:
    """A registrar's state at one moment (see ``AsyncRegistrar.status`` for each field)."""

    service: str
    instance: str
    backend: str
    #: The health gate's state: starting, registered, withdrawn or stopped.
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

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict ``status()`` returns (and ``/status`` serves)."""
        return {
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


def frozen_mapping(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy, for the mappings a status holds."""
    return MappingProxyType(dict(values))
