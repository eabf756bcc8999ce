"""The healing rules as tables: Registration on a fake clock, no asyncio, no sleeping.

Each row is a history of (step, outcome, at) entries (at: seconds on the fake
clock) driven through ``next``/``succeeded``/``failed``; the row states the
events the last entry produced and the pause after it. TTL 3 s: a heartbeat
every 1 s, a read-back every 3 s; the default RetryPolicy (0.2 s doubling, jitter 0.5).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from registry_agent import (
    BackendUnavailable,
    HealthStatus,
    InstanceHealth,
    Lease,
    LeaseLost,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    Throttled,
)
from registry_agent._health.gate import Desired, GateState
from registry_agent._options import RegistrationOptions
from registry_agent._reconcile import Step
from registry_agent._registration import (
    Change,
    Event,
    Failed,
    HeldElsewhere,
    RegistrarEventKind,
    Registration,
    Renewed,
    Sleep,
)

INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)
K = RegistrarEventKind
REGISTER, HEARTBEAT, VERIFY = Step.REGISTER, Step.HEARTBEAT, Step.VERIFY
SET_STATUS, EXPIRED, RELEASE = Step.SET_STATUS, Step.EXPIRED, Step.RELEASE
DEREGISTER = Step.DEREGISTER


@dataclass(frozen=True)
class Outcome:
    """What one step did; ``news`` entries are not steps but what the backend or probe said."""

    name: str
    arg: Any = None


OK = Outcome("ok")
SHARED = Outcome("shared")  # REGISTER answered with a shared lease
LOST = Outcome("lost")
DOWN = Outcome("down")
REJECTED = Outcome("rejected")
MISSING = Outcome("missing")  # VERIFY: no entry
CHANGED = Outcome("changed")  # VERIFY: someone else's entry under our id


def throttled(retry_after: float | None) -> Outcome:
    return Outcome("throttled", retry_after)


def found(status: HealthStatus) -> Outcome:
    return Outcome("found", status)


RENEWAL_NEWS = "renewal news"  # the shared renewal failed, recovered or was lost
VERIFY_NEWS = "verify news"  # the shared read found our entry wrong (or the connection came back)
ABSENT = "absent"  # the gate withdrew the instance: desired absent from then on


def drive(
    history: list[tuple[Any, Outcome | None, float]], ttl: float = 3.0
) -> tuple[Registration, list[Change], float | None]:
    reg = Registration(
        RegistrationOptions(ttl=ttl, retry=RetryPolicy(rng=random.Random(5))), INSTANCE, "test"
    )
    desired = Desired.PASSING
    changes: list[Change] = []
    pause: float | None = None
    for what, outcome, at in history:
        if what == RENEWAL_NEWS:
            reg.heartbeat_now(at)
            continue
        if what == VERIFY_NEWS:
            reg.verify_now(at)
            continue
        if what == ABSENT:
            desired = Desired.ABSENT
            continue
        action = reg.next(desired, at, "" if desired is Desired.PASSING else "unhealthy: db")
        assert action == what, f"at {at}: expected {what}, got {action}"
        assert isinstance(action, Step)
        changes, pause = outcome_of(reg, action, outcome, at)
    return reg, changes, pause


def outcome_of(
    reg: Registration, step: Step, outcome: Outcome | None, at: float
) -> tuple[list[Change], float | None]:
    context = {"backend": "test", "service": INSTANCE.service, "instance": INSTANCE.id}
    if outcome is None or outcome is OK:
        result: object = None
        if step is REGISTER:
            result = Lease(INSTANCE, reg.options.ttl, 1, "test")
        if step is VERIFY:
            result = InstanceHealth(INSTANCE, reg.actual or HealthStatus.PASSING)
        return reg.succeeded(step, at, result)
    if outcome is SHARED:
        return reg.succeeded(step, at, Lease(INSTANCE, reg.options.ttl, 7, "test", shared=True))
    if outcome.name == "found":
        return reg.succeeded(step, at, InstanceHealth(INSTANCE, outcome.arg, "held"))
    if outcome is MISSING:
        return reg.succeeded(step, at, None)
    if outcome is CHANGED:
        other = ServiceInstance("orders", address="10.0.0.9", port=1, id=INSTANCE.id)
        return reg.succeeded(step, at, InstanceHealth(other, HealthStatus.PASSING))
    error = {
        "lost": LeaseLost("lease not found", **context),
        "down": BackendUnavailable("connection refused", **context),
        "rejected": Rejected("permission denied", **context),
        "throttled": Throttled("429", retry_after=outcome.arg, **context),
    }[outcome.name]
    return reg.failed(step, error, at)


def slept(action: Step | Sleep) -> float | None:
    assert isinstance(action, Sleep), action
    return action.seconds


def events(changes: list[Change]) -> list[RegistrarEventKind]:
    return [c.kind for c in changes if isinstance(c, Event)]


@pytest.mark.parametrize(
    ("history", "expected", "pause"),
    [
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, OK, 1), (HEARTBEAT, LOST, 2)],
            [K.LEASE_LOST],
            None,
            id="the entry held a while, then was lost: news, register again at once",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, LOST, 1), (REGISTER, OK, 1), (HEARTBEAT, LOST, 2)],
            [K.LEASE_LOST],
            (0.1, 0.2),
            id="lost again right after re-registering: back off (retry 1)",
        ),
        pytest.param(
            [
                (REGISTER, OK, 0),
                (HEARTBEAT, LOST, 1),
                (REGISTER, OK, 1),
                (HEARTBEAT, LOST, 2),
                (REGISTER, OK, 2.2),
                (HEARTBEAT, LOST, 3.2),
            ],
            [K.LEASE_LOST],
            (0.2, 0.4),
            id="third loss in a row: retry 2",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, LOST, 1), (REGISTER, OK, 1)],
            [K.REREGISTERED],
            None,
            id="a lost entry comes back as reregistered",
        ),
        pytest.param(
            [(REGISTER, DOWN, 0)],
            [K.BACKEND_UNAVAILABLE],
            (0.1, 0.2),
            id="first failure: unavailable announced, retry 1",
        ),
        pytest.param(
            [(REGISTER, DOWN, 0), (REGISTER, DOWN, 0.2), (REGISTER, DOWN, 0.6)],
            [],
            (0.4, 0.8),
            id="third failure in a row: no new event, retry 3",
        ),
        pytest.param(
            [(REGISTER, DOWN, 0), (REGISTER, DOWN, 0.2), (REGISTER, OK, 0.6)],
            [K.REGISTERED, K.BACKEND_RECOVERED],
            None,
            id="recovered announced once, after the step that worked",
        ),
        pytest.param(
            [(REGISTER, throttled(5.0), 0)],
            [K.BACKEND_UNAVAILABLE],
            (5.0, 5.5),
            id="throttled: the server's Retry-After, plus up to 10 %",
        ),
        pytest.param(
            [(REGISTER, DOWN, 0), (REGISTER, DOWN, 0.2), (REGISTER, throttled(None), 0.6)],
            [],
            (0.4, 0.8),
            id="throttled without Retry-After: short, at most answered_cap",
        ),
        pytest.param(
            [(REGISTER, REJECTED, 0)],
            [K.BACKEND_UNAVAILABLE],
            (5.0, 10.0),
            id="rejected: the slow cap",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, DOWN, 2.95)],
            [K.BACKEND_UNAVAILABLE],
            (0.0, 0.05),
            id="a failed heartbeat never sleeps past our entry's expiry",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, DOWN, 1), (HEARTBEAT, DOWN, 1.2), (EXPIRED, None, 3)],
            [K.LEASE_LOST],
            None,
            id="a TTL without renewal: the entry counts as lost",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (HEARTBEAT, OK, 1), (HEARTBEAT, OK, 2), (VERIFY, OK, 3)],
            [],
            None,
            id="verify before a heartbeat when both are due",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (VERIFY_NEWS, None, 0.5), (VERIFY, OK, 0.5)],
            [],
            None,
            id="verify at once when the connection comes back",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (VERIFY_NEWS, None, 0.5), (VERIFY, MISSING, 0.5)],
            [K.LEASE_LOST],
            None,
            id="verification finds the entry missing: lost",
        ),
        pytest.param(
            [
                (REGISTER, OK, 0),
                (VERIFY_NEWS, None, 0.5),
                (VERIFY, CHANGED, 0.5),
                (RELEASE, None, 0.5),
                (REGISTER, OK, 0.5),
            ],
            [K.REREGISTERED],
            None,
            id="changed by someone else: release our lease first, then register",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (VERIFY_NEWS, None, 0.5), (VERIFY, DOWN, 0.5)],
            [K.BACKEND_UNAVAILABLE],
            (0.1, 0.2),
            id="a failed read is retried within a heartbeat",
        ),
        pytest.param(
            [
                (REGISTER, OK, 0),
                (VERIFY_NEWS, None, 0.5),
                (VERIFY, found(HealthStatus.CRITICAL), 0.5),
                (SET_STATUS, OK, 0.5),
            ],
            [K.STATUS_CHANGED],
            None,
            id="our entry turned critical (frozen process): write our status again",
        ),
        pytest.param(
            [(REGISTER, OK, 0), (ABSENT, None, 0.5), (DEREGISTER, OK, 0.5)],
            [K.DEREGISTERED],
            None,
            id="withdrawn: deregistered",
        ),
        pytest.param(
            [(REGISTER, SHARED, 0), (RENEWAL_NEWS, None, 2), (HEARTBEAT, OK, 2)],
            [],
            None,
            id="shared lease: a heartbeat only when the backend has news",
        ),
        pytest.param(
            [(REGISTER, SHARED, 0), (RENEWAL_NEWS, None, 2), (HEARTBEAT, DOWN, 2)],
            [K.BACKEND_UNAVAILABLE],
            (0.1, 0.2),
            id="shared renewals failing: unavailable, asked again with backoff",
        ),
        pytest.param(
            [
                (REGISTER, SHARED, 0),
                (RENEWAL_NEWS, None, 2),
                (HEARTBEAT, DOWN, 2),
                (HEARTBEAT, OK, 2.2),
            ],
            [K.BACKEND_RECOVERED],
            None,
            id="shared renewals recovered",
        ),
        pytest.param(
            [
                (REGISTER, SHARED, 0),
                (RENEWAL_NEWS, None, 2),
                (HEARTBEAT, LOST, 2),
                (REGISTER, SHARED, 2),
            ],
            [K.REREGISTERED],
            None,
            id="shared lease lost: register again at once",
        ),
        pytest.param(
            [
                (REGISTER, SHARED, 0),
                (VERIFY_NEWS, None, 5),
                (VERIFY, MISSING, 5),
                (REGISTER, OK, 5),
            ],
            [K.REREGISTERED],
            None,
            id="shared verification found our entry missing: no release, register again",
        ),
    ],
)
def test_healing_rules(
    history: list[tuple[Any, Outcome | None, float]],
    expected: list[RegistrarEventKind],
    pause: tuple[float, float] | None,
) -> None:
    _, changes, slept = drive(history)
    assert events(changes) == expected
    if pause is None:
        assert slept is None
    else:
        assert slept is not None
        assert pause[0] <= slept <= pause[1]


def test_idle_sleeps_until_the_next_heartbeat_or_read() -> None:
    reg, _, _ = drive([(REGISTER, OK, 0)])
    assert slept(reg.next(Desired.PASSING, 0.4)) == pytest.approx(0.6)
    reg, _, _ = drive([(REGISTER, OK, 0), (HEARTBEAT, OK, 1), (HEARTBEAT, OK, 2)])
    assert slept(reg.next(Desired.PASSING, 2.5)) == pytest.approx(0.5)  # the read-back at 3


def test_a_shared_lease_runs_no_timers() -> None:
    reg, _, _ = drive([(REGISTER, SHARED, 0)])
    assert reg.next(Desired.PASSING, 1000) == Sleep(None)  # until the backend has news
    assert reg.expires_at is None
    assert reg.registered(10**6)
    reg, _, _ = drive([(REGISTER, SHARED, 0), (VERIFY_NEWS, None, 5), (VERIFY, OK, 5)])
    assert reg.next(Desired.PASSING, 1000) == Sleep(None)


def test_a_shared_lease_counts_as_held_for_a_ttl_after_its_last_shared_renewal() -> None:
    # The backend may still wait on a call before it tells its members the shared
    # liveness is lost; what the registry holds is known from its last renewal.
    reg, _, _ = drive([(REGISTER, SHARED, 100)])
    ttl = reg.options.ttl
    reg.shared_renewed(95)  # renewed before we joined: our registration counts from 100
    assert reg.registered(100 + ttl - 0.01)
    assert not reg.registered(100 + ttl)
    reg.shared_renewed(108)
    assert reg.registered(108 + ttl - 0.01)
    assert not reg.registered(108 + ttl)
    ready, why = reg.readiness(108 + ttl, GateState.REGISTERED, stopping=False, failing="")
    assert not ready
    assert why is not None
    assert why.startswith("entry lost (no heartbeat succeeded for")
    # An own lease is timed by its own heartbeats, never by this.
    own, _, _ = drive([(REGISTER, OK, 0)])
    own.shared_renewed(-1000)
    assert own.registered(1)


def test_failures_are_loud_once_per_kind_and_reminded_every_30s() -> None:
    history: list[tuple[Any, Outcome | None, float]] = [(REGISTER, DOWN, t) for t in (0, 1, 2)]
    reg, _, _ = drive(history)
    louds = []
    for at, outcome in ((3, DOWN), (33.5, DOWN), (34, throttled(1)), (35, throttled(1))):
        action = reg.next(Desired.PASSING, at)
        assert action is REGISTER
        changes, _ = outcome_of(reg, action, outcome, at)
        louds += [c.loud for c in changes if isinstance(c, Failed)]
    assert louds == [False, True, True, False]


def test_the_lost_reason_and_counters() -> None:
    reg, changes, _ = drive(
        [(REGISTER, OK, 0), (HEARTBEAT, DOWN, 1), (HEARTBEAT, DOWN, 1.2), (EXPIRED, None, 3)]
    )
    (lost,) = [c for c in changes if isinstance(c, Event)]
    assert lost.detail.startswith("no heartbeat succeeded for 3s (the TTL)")
    assert "last error: connection refused" in lost.detail
    assert not reg.registered(3)
    assert reg.stale is not None  # our own lease may still live: released before re-registering
    counters = reg.counters.to_dict()
    assert counters["registrations"] == 1
    assert counters["heartbeats_failed"] == 2
    assert counters["errors"] == 2
    assert counters["lease_losses"] == 1
    ready, why = reg.readiness(3, GateState.REGISTERED, stopping=False, failing="")
    assert not ready
    assert why is not None
    assert why.startswith("entry lost (no heartbeat succeeded")


def test_held_elsewhere_is_reported_once_and_its_end_once() -> None:
    held = found(HealthStatus.CRITICAL)
    reg, changes, _ = drive(
        [
            (REGISTER, OK, 0),
            (VERIFY_NEWS, None, 0.5),
            (VERIFY, held, 0.5),  # differs once: maybe our own TTL check; write it again
            (SET_STATUS, OK, 0.5),
            (VERIFY, held, 0.5),  # still, right after our write: someone else holds it
        ]
    )
    assert changes == [HeldElsewhere(HealthStatus.CRITICAL, HealthStatus.PASSING, "held")]
    ready, why = reg.readiness(1, GateState.REGISTERED, stopping=False, failing="")
    assert not ready
    assert why == "the registry holds our entry as critical: held"
    assert slept(reg.next(Desired.PASSING, 0.6)) == pytest.approx(0.4)  # no rewrite loop
    reg.verify_now(0.6)
    assert reg.next(Desired.PASSING, 0.6) is VERIFY
    changes, _ = outcome_of(reg, VERIFY, held, 0.6)
    assert changes == []  # said once
    reg.verify_now(0.7)
    assert reg.next(Desired.PASSING, 0.7) is VERIFY
    changes, _ = outcome_of(reg, VERIFY, OK, 0.7)
    assert [type(c).__name__ for c in changes] == ["HeldAgain"]


def test_a_shared_lease_held_elsewhere_keeps_reading_back_until_released() -> None:
    """The backend's shared read compares with what we wrote, so it cannot tell us when
    someone else (Consul maintenance mode) lets go of our entry: we read that back ourselves."""
    held = found(HealthStatus.CRITICAL)
    reg, changes, _ = drive(
        [
            (REGISTER, SHARED, 0),
            (VERIFY_NEWS, None, 1),
            (VERIFY, held, 1),
            (SET_STATUS, OK, 1),
            (VERIFY, held, 1),
        ]
    )
    assert [type(c).__name__ for c in changes] == ["HeldElsewhere"]
    assert slept(reg.next(Desired.PASSING, 2)) == pytest.approx(reg.options.verify_interval - 1)
    assert reg.next(Desired.PASSING, 1 + reg.options.verify_interval) is VERIFY
    changes, _ = outcome_of(reg, VERIFY, OK, 1 + reg.options.verify_interval)
    assert [type(c).__name__ for c in changes] == ["HeldAgain"]
    assert reg.next(Desired.PASSING, 1000) == Sleep(None)  # released: the backend's read again


def test_a_rejection_is_kept_until_a_step_succeeds() -> None:
    reg, _, _ = drive([(REGISTER, REJECTED, 0)])
    assert reg.rejection is not None
    ready, why = reg.readiness(0, GateState.REGISTERED, stopping=False, failing="")
    assert not ready
    assert why == f"rejected by the registry: {reg.rejection}"
    reg, changes, _ = drive([(REGISTER, REJECTED, 0), (REGISTER, OK, 8)])
    assert reg.rejection is None
    assert Renewed() in changes


def test_a_shared_lease_lost_after_failing_renewals_reads_like_an_expiry() -> None:
    _, changes, _ = drive(
        [(REGISTER, SHARED, 0), (RENEWAL_NEWS, None, 1), (HEARTBEAT, DOWN, 1), (HEARTBEAT, LOST, 2)]
    )
    (lost,) = [c for c in changes if isinstance(c, Event)]
    assert lost.kind is K.LEASE_LOST
    assert lost.detail.startswith("no heartbeat succeeded for 3s (the TTL)")
    assert "last error: connection refused" in lost.detail
    assert lost.detail.endswith(
        "[lease not found (backend=test, service=orders, instance=orders-127.0.0.1-8080)]"
    )
