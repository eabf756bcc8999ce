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
