"""The health gate: a pure state machine from check results to a registration decision.

No I/O and no clock: it counts consecutive results per check (hysteresis)
and says whether the instance should be in the registry.

::

    STARTING --every check up (rise passes each)--> REGISTERED
    REGISTERED --any check down (fall failures)--> WITHDRAWN
    WITHDRAWN --every check up again------------> REGISTERED
    any --stop()--> STOPPED (final)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from registry_agent._errors import ConfigError
from registry_agent._models import HealthStatus

__all__ = ["Desired", "GateState", "HealthGate", "OnUnhealthy", "desired_registration"]


class GateState(enum.StrEnum):
    """Where an instance stands with respect to its health checks."""

    STARTING = "starting"  # not ready yet: never registered
    REGISTERED = "registered"  # healthy: should be in the registry, passing
    WITHDRAWN = "withdrawn"  # was ready, now unhealthy
    STOPPED = "stopped"  # stop() called: out of the registry for good


class OnUnhealthy(enum.StrEnum):
    """What a withdrawn instance becomes in the registry."""

    DEREGISTER = "deregister"  # removed
    CRITICAL = "critical"  # kept, marked critical (watchers see it offline)


class Desired(enum.Enum):
    """What the registry should hold for the instance."""

    ABSENT = "absent"
    PASSING = "passing"
    CRITICAL = "critical"

    @property
    def status(self) -> HealthStatus | None:
        """The health status to register with, or None when absent."""
        return {"passing": HealthStatus.PASSING, "critical": HealthStatus.CRITICAL}.get(self.value)


def desired_registration(state: GateState, on_unhealthy: OnUnhealthy) -> Desired:
    """The registry entry a gate state calls for."""
    if state is GateState.REGISTERED:
        return Desired.PASSING
    if state is GateState.WITHDRAWN and on_unhealthy is OnUnhealthy.CRITICAL:
        return Desired.CRITICAL
    return Desired.ABSENT


@dataclass(slots=True)
class _Counter:
    up: bool = False
    passes: int = 0
    failures: int = 0


class HealthGate:
    """Hysteresis over named checks: ``rise`` passes bring a check up, ``fall`` failures down.

    Every check starts down, so an instance registers only after each check
    has passed ``rise`` times in a row. With no checks, it is ready at once.
    """

    def __init__(self, checks: Iterable[str], *, rise: int = 2, fall: int = 3) -> None:
        for name, value in (("rise", rise), ("fall", fall)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected a whole number >= 1, got {value!r}", field=name)
        self.rise = rise
        self.fall = fall
        self._checks = {name: _Counter() for name in checks}
        self.state = GateState.STARTING if self._checks else GateState.REGISTERED

    @property
    def healthy(self) -> bool:
        """True when every check is up."""
        return all(c.up for c in self._checks.values())

    def check_up(self, name: str) -> bool:
        """Whether one check is currently up."""
        return self._checks[name].up

    def observe(self, name: str, ok: bool) -> GateState | None:
        """Record one result of check ``name``; returns the new state if it changed."""
        if self.state is GateState.STOPPED:
            return None
        counter = self._checks[name]
        if ok:
            counter.passes += 1
            counter.failures = 0
            if not counter.up and counter.passes >= self.rise:
                counter.up = True
        else:
            counter.failures += 1
            counter.passes = 0
            if counter.up and counter.failures >= self.fall:
                counter.up = False
        return self._settle()

    def _settle(self) -> GateState | None:
        healthy = self.healthy
        new = self.state
        if healthy and self.state in (GateState.STARTING, GateState.WITHDRAWN):
            new = GateState.REGISTERED
        elif not healthy and self.state is GateState.REGISTERED:
            new = GateState.WITHDRAWN
        if new is self.state:
            return None
        self.state = new
        return new

    def stop(self) -> GateState | None:
        """Enter STOPPED (final); returns it unless already stopped."""
        if self.state is GateState.STOPPED:
            return None
        self.state = GateState.STOPPED
        return self.state
