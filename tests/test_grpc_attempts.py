"""The gRPC channels' retry rule (``registry_agent.grpc._common.Attempts``), without I/O:
a fake clock, stand-in errors carrying real gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from registry_agent import DiscoveryPolicy, NoInstanceAvailable, ServiceInstance
from registry_agent.grpc._common import Attempts

A = ServiceInstance("orders", address="10.0.0.1", port=50051, id="a")
B = ServiceInstance("orders", address="10.0.0.2", port=50051, id="b")
C = ServiceInstance("orders", address="10.0.0.3", port=50051, id="c")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class Error(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str = "connection reset") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plan(
    retries: int = 2,
    *,
    idempotent: bool = True,
    timeout: float | None = 5.0,
    wait_for_ready: bool | None = None,
    read_timeouts: bool = False,
    clock: Clock | None = None,
) -> Attempts:
    policy = DiscoveryPolicy(retries=retries, retry_read_timeouts=read_timeouts)
    return Attempts(policy, idempotent, timeout, wait_for_ready, clock or Clock())


def test_unavailable_on_an_idempotent_call_is_retried_until_the_retries_are_spent() -> None:
    attempts = plan(retries=2)
    first, second, third = Error(UNAVAILABLE), Error(UNAVAILABLE), Error(UNAVAILABLE)
    attempts.failed(A, first, UNAVAILABLE)
    attempts.failed(B, second, UNAVAILABLE)
    with pytest.raises(Error) as info:
        attempts.failed(C, third, UNAVAILABLE)
    assert info.value is third
    assert info.value.__notes__ == [
        "registry_agent.grpc: 3 instances tried (10.0.0.1:50051, 10.0.0.2:50051, 10.0.0.3:50051)"
    ]
    assert attempts.tried == [A, B, C]


def test_a_non_idempotent_call_is_retried_only_when_nothing_was_sent() -> None:
    attempts = plan(idempotent=False)
    attempts.failed(
        A, Error(UNAVAILABLE, "failed to connect to all addresses; last: x"), UNAVAILABLE
    )
    sent = Error(UNAVAILABLE, "Socket closed")
    with pytest.raises(Error) as info:
        attempts.failed(B, sent, UNAVAILABLE)
    assert info.value is sent


def test_a_deadline_is_retried_only_when_read_timeouts_are() -> None:
    with pytest.raises(Error):
        plan().failed(A, Error(DEADLINE), DEADLINE)
    kept = plan(read_timeouts=True)
    kept.failed(A, Error(DEADLINE), DEADLINE)
    assert kept.tried == [A]
    # A non-idempotent call never retries a deadline, whatever the policy says.
    with pytest.raises(Error):
        plan(idempotent=False, read_timeouts=True).failed(A, Error(DEADLINE), DEADLINE)


def test_the_deadline_bounds_every_attempt_and_ends_with_the_last_error() -> None:
    clock = Clock()
    attempts = plan(timeout=2.0, clock=clock)
    assert attempts.remaining() == pytest.approx(2.0)
    clock.now += 1.5
    assert attempts.remaining() == pytest.approx(0.5)
    first, second = Error(UNAVAILABLE), Error(UNAVAILABLE)
    attempts.failed(A, first, UNAVAILABLE)
    attempts.failed(B, second, UNAVAILABLE)
    clock.now += 0.6
    with pytest.raises(Error) as info:
        attempts.remaining()
    assert info.value is second
    assert plan(timeout=None).remaining() is None


def test_no_instance_left_raises_the_last_attempts_error_with_the_registrys_words() -> None:
    attempts = plan()
    last = Error(UNAVAILABLE)
    attempts.failed(A, last, UNAVAILABLE)
    with pytest.raises(Error) as info:
        attempts.no_instance(Error(UNAVAILABLE, "no healthy instance of 'orders' left"))
    assert info.value is last
    assert info.value.__notes__ == ["registry_agent.grpc: no healthy instance of 'orders' left"]
    # Before any attempt: the registry's own error.
    empty = Error(UNAVAILABLE, "no healthy instance of 'orders'")
    with pytest.raises(Error) as info:
        plan().no_instance(empty)
    assert info.value is empty


def test_wait_for_ready_is_dropped_on_every_known_failing_instance_while_others_are_left() -> None:
    attempts = plan(retries=3, wait_for_ready=True)
    assert attempts.wait_for_ready(A, lambda: False) is True
    assert attempts.wait_for_ready(A, lambda: True) is None  # fail fast there, go elsewhere
    refused = Error(UNAVAILABLE, "failed to connect to all addresses; Connection refused")
    attempts.failed(A, refused, UNAVAILABLE)
    # The next known failing one fails fast too (a live third may be left: a break-it
    # run saw every third call wait out its deadline on a dead second instance).
    assert attempts.wait_for_ready(B, lambda: True) is None
    attempts.failed(B, Error(UNAVAILABLE, "failed to connect; Connection refused"), UNAVAILABLE)
    assert attempts.wait_for_ready(C, lambda: False) is True
    attempts.failed(C, Error(UNAVAILABLE, "Socket closed"), UNAVAILABLE)
    # Nothing else to choose: the first dropped instance, waited for as the caller asked.
    assert attempts.no_instance(Error(UNAVAILABLE, "none left")) == A
    assert attempts.wait_for_ready(A, lambda: True) is True
    # Its deadline then carries the words of the attempt before the wait.
    late = Error(DEADLINE, "Deadline Exceeded")
    with pytest.raises(Error) as info:
        attempts.failed(A, late, DEADLINE)
    assert info.value is late
    assert info.value.__notes__[-1] == (
        "registry_agent.grpc: waited for 10.0.0.1:50051 (wait_for_ready) after an attempt"
        " failed: Socket closed"
    )
    # The caller's own value is kept when not asked for.
    assert plan(wait_for_ready=None).wait_for_ready(A, lambda: True) is None


def test_a_fast_failure_on_a_known_failing_instance_spends_no_retry() -> None:
    # A break-it run: retries=1, 2 of 3 instances dead, wait_for_ready: the last allowed
    # attempt waited out the deadline on the second dead one while the third was alive.
    attempts = plan(retries=1, wait_for_ready=True)
    refused = "failed to connect to all addresses; Connection refused"
    for dead in (A, B):
        assert attempts.wait_for_ready(dead, lambda: True) is None
        attempts.failed(dead, Error(UNAVAILABLE, refused), UNAVAILABLE)  # no raise
    assert attempts.wait_for_ready(C, lambda: False) is True
    attempts.failed(C, Error(UNAVAILABLE, "Socket closed"), UNAVAILABLE)  # the one retry
    assert attempts.no_instance(Error(UNAVAILABLE, "none left")) == A  # the last resort
    assert attempts.wait_for_ready(A, lambda: True) is True
    late = Error(DEADLINE, "Deadline Exceeded")
    with pytest.raises(Error) as info:
        attempts.failed(A, late, DEADLINE)
    assert info.value is late
    # After the last resort, nothing is waited for twice.
    with pytest.raises(Error) as info:
        attempts.no_instance(Error(UNAVAILABLE, "none left"))
    assert info.value is late
    # Without retries, too: the fast failure is free, a sent call is not.
    none = plan(retries=0, wait_for_ready=True)
    assert none.wait_for_ready(A, lambda: True) is None
    none.failed(A, Error(UNAVAILABLE, refused), UNAVAILABLE)
    assert none.wait_for_ready(B, lambda: True) is None
    sent = Error(UNAVAILABLE, "Socket closed")  # it reached B: spends the retry it lacks
    with pytest.raises(Error) as info:
        none.failed(B, sent, UNAVAILABLE)
    assert info.value is sent


def test_no_attempt_follows_once_the_channel_is_closed() -> None:
    closed = False
    attempts = Attempts(DiscoveryPolicy(retries=2), True, 5.0, None, Clock(), lambda: closed)
    attempts.failed(A, Error(UNAVAILABLE), UNAVAILABLE)
    closed = True
    own = Error(UNAVAILABLE, "Socket closed")
    with pytest.raises(Error) as info:
        attempts.failed(B, own, UNAVAILABLE)
    assert info.value is own


def test_none_left_after_failures_adds_no_note_of_its_own() -> None:
    # "no healthy instance left to try" after a TLS failure would hide the TLS error
    # behind "no instance left": the tries' note says it already.
    attempts = plan()
    tls = Error(UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED")
    attempts.failed(A, tls, UNAVAILABLE)
    exhausted = Error(UNAVAILABLE, "orders: no healthy instance left to try")
    exhausted.__cause__ = NoInstanceAvailable("no healthy instance left to try")
    with pytest.raises(Error) as info:
        attempts.no_instance(exhausted)
    assert info.value is tls
    assert not any("left to try" in note for note in getattr(tls, "__notes__", []))
