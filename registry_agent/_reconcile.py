"""What the registrar does next: a pure decision from desired and actual registry state."""

from __future__ import annotations

import enum

from registry_agent._health.gate import Desired
from registry_agent._models import HealthStatus

__all__ = ["Step", "next_step"]


class Step(enum.Enum):
    """One action of the reconciliation loop."""

    EXPIRED = "expired"  # no renewal succeeded for a TTL: count the entry lost
    RELEASE = "release"  # best effort: remove a lease we abandoned (no orphan for a TTL)
    REGISTER = "register"
    DEREGISTER = "deregister"
    SET_STATUS = "set_status"
    UPDATE = "update"  # write the entry again in place: new tags, meta or weight
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
    expires_at: float | None = None,
    stale_lease: bool = False,
    rewrite: bool = False,
) -> tuple[Step, float | None]:
    """The next step, and for IDLE the time to wake up (None: only on a change).

    ``actual`` is the status our entry holds in the registry, None when we
    hold no entry. ``expires_at`` is when our entry lapses unless renewed
    (last successful registration or heartbeat + TTL); past it the entry is
    counted lost whatever else is wanted. ``stale_lease`` says we abandoned a
    lease that may still be alive: it is released before registering anew.
    ``rewrite`` says the entry holds older tags or meta than wanted: it is written
    again in place (UPDATE) once its status is right, before a read-back that
    would find it "changed".
    Fixing a wrong entry comes before keeping a right one alive, and verifying
    comes before a heartbeat that would hide a lost entry.
    """
    if actual is not None and expires_at is not None and now >= expires_at:
        return Step.EXPIRED, None
    if stale_lease and actual is None:
        return Step.RELEASE, None
    wanted = desired.status
    if wanted is None:
        return (Step.DEREGISTER, None) if actual is not None else (Step.IDLE, None)
    if actual is None:
        return Step.REGISTER, None
    if actual is not wanted:
        return Step.SET_STATUS, None
    if rewrite:
        return Step.UPDATE, None
    if now >= verify_due:
        return Step.VERIFY, None
    if now >= heartbeat_due:
        return Step.HEARTBEAT, None
    wake = min(heartbeat_due, verify_due)
    return Step.IDLE, wake if expires_at is None else min(wake, expires_at)
