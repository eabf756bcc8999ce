"""The health gate, exhaustively: every transition, hysteresis, no clock needed."""

from __future__ import annotations

import itertools

import pytest

from registry_agent import ConfigError, GateState, OnUnhealthy
from registry_agent._health.gate import Desired, HealthGate, desired_registration

S, R, W, X = GateState.STARTING, GateState.REGISTERED, GateState.WITHDRAWN, GateState.STOPPED


def run(gate: HealthGate, results: str, check: str = "a") -> list[GateState]:
    """Feed 'P'/'F' results; return the state after each."""
    states = []
    for r in results:
        gate.observe(check, r == "P")
        states.append(gate.state)
    return states


def test_no_checks_means_ready_at_once() -> None:
    assert HealthGate([]).state is R


@pytest.mark.parametrize(
    ("rise", "fall", "results", "expected"),
    [
        # readiness: rise passes in a row, failures reset the count
        (2, 3, "P", [S]),
        (2, 3, "PP", [S, R]),
        (2, 3, "PFP", [S, S, S]),
        (2, 3, "PFPP", [S, S, S, R]),
        (1, 1, "P", [R]),
        (3, 1, "FFFPPP", [S, S, S, S, S, R]),
        # withdrawal: fall failures in a row
        (1, 3, "PFF", [R, R, R]),
        (1, 3, "PFFF", [R, R, R, W]),
        (1, 3, "PFFPFF", [R, R, R, R, R, R]),
        (1, 1, "PF", [R, W]),
        # return: rise passes in a row
        (2, 1, "PPFP", [S, R, W, W]),
        (2, 1, "PPFPP", [S, R, W, W, R]),
        (2, 1, "PPFPFPP", [S, R, W, W, W, W, R]),
        # flapping never withdraws with fall=2
        (1, 2, "PFPFPFPF", [R] * 8),
    ],
)
def test_transitions(rise: int, fall: int, results: str, expected: list[GateState]) -> None:
    assert run(HealthGate(["a"], rise=rise, fall=fall), results) == expected


def test_observe_returns_only_changes() -> None:
    gate = HealthGate(["a"], rise=2, fall=2)
    assert [
        gate.observe("a", ok) for ok in (True, True, True, False, False, False, True, True)
    ] == [
        None,
        R,
        None,
        None,
        W,
        None,
        None,
        R,
    ]


def test_every_check_must_be_up() -> None:
    gate = HealthGate(["a", "b"], rise=1, fall=1)
    gate.observe("a", True)
    assert gate.state is S
    gate.observe("b", True)
    assert gate.state is R
    gate.observe("b", False)
    assert gate.state is W
    assert gate.check_up("a")
    assert not gate.check_up("b")
    gate.observe("a", True)  # a passing check does not bring back a down one
    assert gate.state is W
    gate.observe("b", True)
    assert gate.state is R


def test_stop_is_final_from_every_state() -> None:
    for prefix in ("", "PP", "PPFFF"):
        gate = HealthGate(["a"], rise=2, fall=3)
        run(gate, prefix)
        assert gate.stop() is X
        assert gate.stop() is None
        assert run(gate, "PPPFFF") == [X] * 6


@pytest.mark.parametrize("results", ["".join(p) for p in itertools.product("PF", repeat=8)])
def test_invariants_over_every_sequence_of_eight(results: str) -> None:
    gate = HealthGate(["a"], rise=2, fall=3)
    states = run(gate, results)
    for i, state in enumerate(states):
        window = results[: i + 1]
        if state is R:
            assert "PP" in window  # never registered before rise passes
        if state is W:
            assert "FFF" in window  # never withdrawn without fall failures
        if i and states[i - 1] is R and state is W:
            assert window.endswith("FFF")
        if i and states[i - 1] is W and state is R:
            assert window.endswith("PP")


@pytest.mark.parametrize(
    ("state", "policy", "desired"),
    [
        (S, OnUnhealthy.DEREGISTER, Desired.ABSENT),
        (S, OnUnhealthy.CRITICAL, Desired.ABSENT),
        (R, OnUnhealthy.DEREGISTER, Desired.PASSING),
        (R, OnUnhealthy.CRITICAL, Desired.PASSING),
        (W, OnUnhealthy.DEREGISTER, Desired.ABSENT),
        (W, OnUnhealthy.CRITICAL, Desired.CRITICAL),
        (X, OnUnhealthy.DEREGISTER, Desired.ABSENT),
        (X, OnUnhealthy.CRITICAL, Desired.ABSENT),
    ],
)
def test_desired_registration(state: GateState, policy: OnUnhealthy, desired: Desired) -> None:
    assert desired_registration(state, policy) is desired


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2), (1.5, 2), (True, 2)])
def test_bad_rise_fall(rise: object, fall: object) -> None:
    with pytest.raises(ConfigError):
        HealthGate(["a"], rise=rise, fall=fall)  # type: ignore[arg-type]
