"""A shared lease's renewals and read-backs are counted for every registration they cover.

The backend credits them (``Registration.credit``, through the lane's listener
``tally``); the heartbeats a shared lease answers from memory then count nothing,
so a registration counts each shared renewal once, as it counts its own without
shared liveness. The real backends are in integration/test_shared_counters.py.
"""

from __future__ import annotations

import pytest

from registry_agent import BackendUnavailable, Lease, ServiceInstance
from registry_agent._health.gate import Desired
from registry_agent._options import RegistrationOptions
from registry_agent._reconcile import Step
from registry_agent._registration import CREDITED, Registration

INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)


def registered(*, shared: bool) -> Registration:
    """A registration holding a (shared) lease, at time 0 of a fake clock."""
    reg = Registration(RegistrationOptions(ttl=3.0), INSTANCE, "memory")
    assert reg.next(Desired.PASSING, 0.0) is Step.REGISTER
    reg.succeeded(Step.REGISTER, 0.0, Lease(INSTANCE, 3.0, "h", "memory", shared=shared))
    return reg


def heartbeat(reg: Registration, now: float, *, ok: bool = True) -> None:
    """Ask for a heartbeat now (as the shared lease's news does) and report it."""
    reg.heartbeat_now(now)
    assert reg.next(Desired.PASSING, now) is Step.HEARTBEAT
    if ok:
        reg.succeeded(Step.HEARTBEAT, now)
    else:
        reg.failed(Step.HEARTBEAT, BackendUnavailable("renewals fail"), now)


@pytest.mark.parametrize("counter", CREDITED)
def test_each_credit_counts_once(counter: str) -> None:
    reg = registered(shared=True)
    before = reg.counters.to_dict()
    for _ in range(3):
        reg.credit(counter)
    after = reg.counters.to_dict()
    assert after[counter] == before[counter] + 3
    assert {k: v for k, v in after.items() if k != counter} == {
        k: v for k, v in before.items() if k != counter
    }


def test_an_unknown_counter_is_ignored_and_keeps_memory_heartbeats_counted() -> None:
    reg = registered(shared=True)
    reg.credit("registrations")
    reg.credit("nonsense")
    assert reg.counters.registrations == 1
    heartbeat(reg, 1.0)
    assert reg.counters.heartbeats_ok == 1  # no real credit yet: the old count stays


def test_credited_shared_lease_does_not_count_its_memory_heartbeats() -> None:
    reg = registered(shared=True)
    reg.credit("heartbeats_ok")
    heartbeat(reg, 1.0)  # answered from memory after news: renews nothing
    assert reg.counters.heartbeats_ok == 1
    reg.credit("heartbeats_failed")
    heartbeat(reg, 2.0, ok=False)  # the shared renewal's failure, told as news
    assert reg.counters.heartbeats_failed == 1
    assert reg.counters.errors == 1  # the step still failed
    heartbeat(reg, 3.0)
    assert reg.counters.heartbeats_ok == 1


def test_a_backend_that_credits_nothing_keeps_the_memory_count() -> None:
    reg = registered(shared=True)
    heartbeat(reg, 1.0)
    heartbeat(reg, 2.0, ok=False)
    assert (reg.counters.heartbeats_ok, reg.counters.heartbeats_failed) == (1, 1)


def test_own_heartbeats_count_even_after_a_credit() -> None:
    # A shared lease lost, registered again on a lease of its own: its heartbeats count.
    reg = registered(shared=False)
    reg.credit("heartbeats_ok")
    assert reg.next(Desired.PASSING, 1.0) is Step.HEARTBEAT
    reg.succeeded(Step.HEARTBEAT, 1.0)
    assert reg.counters.heartbeats_ok == 2
