"""What the registrar does next: a pure decision from desired and actual registry state."""

from __future__ import annotations

import enum

from registry_agent._health.gate import Desired
from registry_agent._models import HealthStatus

__all__ = ["Step", "next_step"]


class Step(enum.Enum):
    """One action of the reconciliation loop."""

    REGISTER = "register"
    DEREGISTER = "deregister"
    SET_STATUS = "set_status"
    VERIFY = "verify"
    HEARTBEAT = "heartbeat"
    IDLE = "idle"


def next_step(
    desired: Desired,
    actual: HealthStatus | None,
    *,
    now: float,
    heartbeat_due: float,
    verify_due: float,
) -> tuple[Step, float | None]:
    """The next step, and for IDLE the time to wake up (None: only on a change).

    ``actual`` is the status our entry holds in the registry, None when we
    hold no entry. Fixing a wrong entry comes before keeping a right one alive,
    and verifying comes before a heartbeat that would hide a lost entry.
    """
    wanted = desired.status
    if wanted is None:
        return (Step.DEREGISTER, None) if actual is not None else (Step.IDLE, None)
    if actual is None:
        return Step.REGISTER, None
    if actual is not wanted:
        return Step.SET_STATUS, None
    if now >= verify_due:
        return Step.VERIFY, None
    if now >= heartbeat_due:
        return Step.HEARTBEAT, None
    return Step.IDLE, min(heartbeat_due, verify_due)
