"""Backoff policy and the reconcile decision: pure functions, no sleeping."""

from __future__ import annotations

import random

import pytest
import tenacity

from registry_agent import ConfigError, HealthStatus, RetryPolicy
from registry_agent._health.gate import Desired
from registry_agent._reconcile import Step, next_step


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(initial=0.2, cap=10.0, jitter=0.5, rng=random.Random(7))
    for attempt in range(1, 200):
        base = min(10.0, 0.2 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert len(set(delays)) > 1  # jittered, not in step


def test_backoff_forever_never_overflows() -> None:
    policy = RetryPolicy()
    assert 5.0 <= policy.delay(10**6) <= 10.0


def test_no_jitter_is_exact() -> None:
    policy = RetryPolicy(initial=1, cap=5, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_policy_is_a_tenacity_wait_strategy() -> None:
    policy = RetryPolicy(initial=0.5, cap=1, jitter=0)
    calls = 0
    slept: list[float] = []

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise OSError("not yet")
        return "ok"

    retrying = tenacity.Retrying(wait=policy.wait, sleep=slept.append)
    assert retrying(flaky) == "ok"
    assert slept == [0.5, 1, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": 5, "cap": 1},
        {"multiplier": 0.5},
        {"jitter": 1},
        {"jitter": -0.1},
    ],
)
def test_bad_policies(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


P, C = HealthStatus.PASSING, HealthStatus.CRITICAL


@pytest.mark.parametrize(
    ("desired", "actual", "now", "expected"),
    [
        (Desired.ABSENT, None, 0, (Step.IDLE, None)),
        (Desired.ABSENT, P, 0, (Step.DEREGISTER, None)),
        (Desired.ABSENT, C, 0, (Step.DEREGISTER, None)),
        (Desired.PASSING, None, 0, (Step.REGISTER, None)),
        (Desired.CRITICAL, None, 0, (Step.REGISTER, None)),
        (Desired.PASSING, C, 0, (Step.SET_STATUS, None)),
        (Desired.CRITICAL, P, 0, (Step.SET_STATUS, None)),
        (Desired.PASSING, P, 0, (Step.IDLE, 10.0)),
        (Desired.PASSING, P, 10, (Step.HEARTBEAT, None)),
        (Desired.PASSING, P, 30, (Step.VERIFY, None)),  # both due: verify first
        (Desired.CRITICAL, C, 12, (Step.HEARTBEAT, None)),
    ],
)
def test_next_step(
    desired: Desired, actual: HealthStatus | None, now: float, expected: tuple[Step, float | None]
) -> None:
    assert next_step(desired, actual, now=now, heartbeat_due=10.0, verify_due=30.0) == expected


@pytest.mark.parametrize(
    ("actual", "now", "expires_at", "stale", "expected"),
    [
        (P, 5, 5.0, False, (Step.EXPIRED, None)),  # no renewal for a TTL: lost
        (P, 4.9, 5.0, False, (Step.IDLE, 5.0)),  # wake up when it would lapse
        (P, 40, 50.0, False, (Step.VERIFY, None)),
        (None, 5, None, True, (Step.RELEASE, None)),  # release the abandoned lease first
        (None, 5, None, False, (Step.REGISTER, None)),
        (C, 5, 5.0, True, (Step.EXPIRED, None)),
    ],
)
def test_next_step_expiry_and_release(
    actual: HealthStatus | None,
    now: float,
    expires_at: float | None,
    stale: bool,
    expected: tuple[Step, float | None],
) -> None:
    desired = Desired.PASSING if actual is not C else Desired.CRITICAL
    assert (
        next_step(
            desired,
            actual,
            now=now,
            heartbeat_due=10.0,
            verify_due=30.0,
            expires_at=expires_at,
            stale_lease=stale,
        )
        == expected
    )


def test_an_expired_entry_is_lost_even_when_we_want_it_gone() -> None:
    step, _ = next_step(
        Desired.ABSENT, P, now=6, heartbeat_due=10, verify_due=30, expires_at=5, stale_lease=False
    )
    assert step is Step.EXPIRED
    step, _ = next_step(
        Desired.ABSENT, None, now=6, heartbeat_due=10, verify_due=30, stale_lease=True
    )
    assert step is Step.RELEASE


def test_answered_honours_retry_after_with_a_little_jitter() -> None:
    policy = RetryPolicy(initial=0.2, cap=10.0, rng=random.Random(3))
    delays = [policy.answered(50, retry_after=1.0) for _ in range(200)]
    assert all(1.0 <= d <= 1.1 for d in delays)
    assert len(set(delays)) > 1
    assert 30.0 <= policy.answered(1, retry_after=3600) <= 33.0  # capped
    assert 0.2 <= policy.answered(1, retry_after=0) <= 0.22  # never a tight loop


def test_answered_without_retry_after_stays_low_while_unreachable_grows() -> None:
    policy = RetryPolicy(initial=0.2, cap=10.0, rng=random.Random(5))
    assert all(policy.answered(n) <= policy.answered_cap for n in range(1, 100))
    assert policy.delay(20) >= 5.0  # an unreachable server still backs off to the cap
    assert all(5.0 <= policy.slowest() <= 10.0 for _ in range(50))


def test_bad_answered_cap() -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(answered_cap=0)
