"""The failover rules shared by the httpx transports and the requests adapter (pure).

A tiny fake chooser plays the discovery: it offers instances not yet excluded, in order.
"""

from __future__ import annotations

import pytest

from registry_agent import ConfigError, DiscoveryPolicy, NoInstanceAvailable, ServiceInstance
from registry_agent._failover import (
    Failover,
    NoPortLeft,
    Outcome,
    Scope,
    Step,
    host_is_candidate,
)


def inst(n: int, port: int | None = None) -> ServiceInstance:
    return ServiceInstance.from_registry(
        service="orders", address=f"10.0.0.{n}", port=9000 + n if port is None else port, id=f"o{n}"
    )


class Chooser:
    """Offers the first instance not excluded; raises NoInstanceAvailable when none is left."""

    def __init__(self, *pool: ServiceInstance) -> None:
        self.pool = list(pool)

    def choose(self, exclude: tuple[ServiceInstance, ...]) -> ServiceInstance:
        for instance in self.pool:
            if instance not in exclude:
                return instance
        raise NoInstanceAvailable("no healthy instance left to try", service="orders")


def run(
    failover: Failover, chooser: Chooser, outcomes: list[tuple[Outcome, int | None]]
) -> tuple[list[str], list[Step], str]:
    """Drive a failover with scripted outcomes; returns the ids tried, the steps, and how
    it ended: "done" (a step said no retry) or "none left"."""
    tried: list[str] = []
    steps: list[Step] = []
    script = iter(outcomes)
    while True:
        try:
            instance = chooser.choose(failover.exclude)
        except NoInstanceAvailable:
            return tried, steps, "none left"
        if not failover.offer(instance):
            continue
        outcome, status = next(script)
        tried.append(instance.id)
        step = failover.after(instance, outcome, status)
        steps.append(step)
        if not step.retry:
            return tried, steps, "done"


POOL = (inst(1), inst(2), inst(3), inst(4))


def test_connect_failures_are_retried_for_any_method_up_to_retries() -> None:
    for method in ("GET", "POST", "PATCH"):
        failover = Failover("orders", method, DiscoveryPolicy(retries=2))
        tried, steps, end = run(failover, Chooser(*POOL), [(Outcome.CONNECT, None)] * 3)
        assert tried == ["o1", "o2", "o3"]
        assert end == "done"
        assert [s.retry for s in steps] == [True, True, False]
        assert all(s.report is False for s in steps)
        assert failover.tried() == "3 instances of orders tried"


def test_instances_running_out_end_the_retries_with_the_last_real_error() -> None:
    failover = Failover("orders", "GET", DiscoveryPolicy(retries=5))
    tried, steps, end = run(failover, Chooser(inst(1), inst(2)), [(Outcome.CONNECT, None)] * 2)
    assert tried == ["o1", "o2"]
    assert end == "none left"
    assert steps[-1].retry is True  # wanted another: the client raises the last error
    assert failover.attempts == 2
    assert failover.tried() == "2 instances of orders tried"


def test_retries_keyword_overrides_the_policy() -> None:
    failover = Failover("orders", "GET", DiscoveryPolicy(retries=3), retries=0)
    _, steps, end = run(failover, Chooser(*POOL), [(Outcome.CONNECT, None)])
    assert end == "done"
    assert steps == [Step(report=False, retry=False)]


def test_statuses_are_retried_only_when_opted_in_and_idempotent() -> None:
    opted = DiscoveryPolicy(retry_statuses=(502, 503))
    for method in ("GET", "head", "PUT", "DELETE", "OPTIONS", "TRACE"):
        failover = Failover("orders", method, opted)
        tried, steps, _ = run(
            failover, Chooser(*POOL), [(Outcome.ANSWER, 503), (Outcome.ANSWER, 200)]
        )
        assert tried == ["o1", "o2"], method
        assert steps == [Step(report=False, retry=True), Step(report=True, retry=False)]
    for method in ("POST", "PATCH"):
        failover = Failover("orders", method, opted)
        tried, steps, _ = run(failover, Chooser(*POOL), [(Outcome.ANSWER, 503)])
        assert (tried, steps) == (["o1"], [Step(report=False, retry=False)]), method
    # Not in the list, or not opted in: the answer, reported as a failure (5xx).
    for policy, status in ((opted, 500), (DiscoveryPolicy(), 503)):
        failover = Failover("orders", "GET", policy)
        _, steps, _ = run(failover, Chooser(*POOL), [(Outcome.ANSWER, status)])
        assert steps == [Step(report=False, retry=False)]


def test_a_status_under_500_is_a_success_even_when_listed() -> None:
    failover = Failover("orders", "GET", DiscoveryPolicy(retry_statuses=(429,)))
    tried, steps, _ = run(failover, Chooser(*POOL), [(Outcome.ANSWER, 429), (Outcome.ANSWER, 404)])
    assert tried == ["o1", "o2"]
    assert steps == [Step(report=True, retry=True), Step(report=True, retry=False)]


def test_status_retries_stop_at_retries_and_the_last_answer_stands() -> None:
    failover = Failover("orders", "GET", DiscoveryPolicy(retries=1, retry_statuses=(503,)))
    tried, steps, end = run(failover, Chooser(*POOL), [(Outcome.ANSWER, 503)] * 2)
    assert tried == ["o1", "o2"]
    assert end == "done"
    assert steps[-1].retry is False


def test_read_timeouts_are_retried_only_when_opted_in_and_idempotent() -> None:
    plain = Failover("orders", "GET", DiscoveryPolicy())
    assert run(plain, Chooser(*POOL), [(Outcome.READ_TIMEOUT, None)])[1] == [
        Step(report=False, retry=False)
    ]
    opted = DiscoveryPolicy(retry_read_timeouts=True)
    tried, _, _ = run(
        Failover("orders", "GET", opted),
        Chooser(*POOL),
        [(Outcome.READ_TIMEOUT, None), (Outcome.ANSWER, 200)],
    )
    assert tried == ["o1", "o2"]
    post = Failover("orders", "POST", opted)
    assert run(post, Chooser(*POOL), [(Outcome.READ_TIMEOUT, None)])[0] == ["o1"]


def test_a_body_that_cannot_be_sent_again_is_retried_on_connect_failures_only() -> None:
    policy = DiscoveryPolicy(retry_statuses=(503,), retry_read_timeouts=True)
    failover = Failover("orders", "PUT", policy, replayable=False)
    assert not failover.idempotent
    assert failover.after(inst(1), Outcome.ANSWER, 503).retry is False
    assert Failover("orders", "PUT", policy, replayable=False).after(
        inst(1), Outcome.READ_TIMEOUT
    ) == Step(report=False, retry=False)
    assert Failover("orders", "PUT", policy, replayable=False).after(
        inst(1), Outcome.CONNECT
    ) == Step(report=False, retry=True)


def test_a_lost_connection_is_retried_for_idempotent_methods() -> None:
    assert Failover("orders", "GET", DiscoveryPolicy()).after(inst(1), Outcome.LOST) == Step(
        report=False, retry=True
    )
    assert Failover("orders", "POST", DiscoveryPolicy()).after(inst(1), Outcome.LOST) == Step(
        report=False, retry=False
    )


def test_a_local_failure_reports_nothing_and_is_not_retried() -> None:
    step = Failover("orders", "GET", DiscoveryPolicy()).after(inst(1), Outcome.LOCAL)
    assert step == Step(report=None, retry=False)


def test_an_answer_needs_its_status() -> None:
    with pytest.raises(ValueError, match="status"):
        Failover("orders", "GET", DiscoveryPolicy()).after(inst(1), Outcome.ANSWER)


def test_instances_without_a_port_are_skipped_and_that_is_no_retry() -> None:
    failover = Failover("orders", "GET", DiscoveryPolicy(), retries=0)
    chooser = Chooser(inst(1, port=0), inst(2, port=0), inst(3))
    tried, _steps, end = run(failover, chooser, [(Outcome.ANSWER, 200)])
    assert tried == ["o3"]
    assert end == "done"
    assert failover.attempts == 1
    assert [i.id for i in failover.exclude] == ["o1", "o2", "o3"]
    stubborn = Failover("orders", "GET", DiscoveryPolicy())
    assert stubborn.offer(inst(1, port=0)) is False
    with pytest.raises(NoPortLeft, match="o1 has none"):
        stubborn.offer(inst(1, port=0))


def test_same_id_on_two_nodes_is_excluded_by_instance_not_id() -> None:
    a = ServiceInstance("orders", address="10.0.0.1", port=8080, id="orders-8080")
    b = ServiceInstance("orders", address="10.0.0.2", port=8080, id="orders-8080")
    failover = Failover("orders", "GET", DiscoveryPolicy())
    tried, _, _ = run(failover, Chooser(a, b), [(Outcome.CONNECT, None), (Outcome.ANSWER, 200)])
    assert tried == ["orders-8080", "orders-8080"]
    assert failover.exclude == (a, b)


@pytest.mark.parametrize(
    ("host", "candidate"),
    [
        ("orders", True),
        ("orders-v2", True),
        ("example.com", False),
        ("orders.", False),
        ("localhost", False),
        ("127.0.0.1", False),
        ("::1", False),
        ("[::1]", False),
        ("2130706433", False),
        ("0x7f000001", False),
        ("", False),
    ],
)
def test_the_single_label_rule(host: str, candidate: bool) -> None:
    assert host_is_candidate(host) is candidate


def test_scope_without_services_finds_candidates_to_confirm() -> None:
    scope = Scope(None, "pass")
    assert scope.service("http", "orders", None) == ("orders", False)
    assert scope.service("https", "orders", None) == ("orders", False)
    assert scope.service("http", "orders", 8080) == (None, False)
    assert scope.service("http", "example.com", None) == (None, False)
    assert scope.service("ftp", "orders", None) == (None, False)
    assert scope.refusal("http://example.com/") is None
    assert "services=" in scope.unknown("intranet")
    assert "intranet" in scope.unknown("intranet")


def test_scope_with_services_is_exact_and_confirmed() -> None:
    scope = Scope(["Orders", "billing.internal"], "refuse")
    assert scope.service("http", "orders", None) == ("Orders", True)
    assert scope.service("http", "billing.internal", None) == ("billing.internal", True)
    assert scope.service("http", "orders.example.com", None) == (None, False)
    assert scope.service("http", "users", None) == (None, False)  # a candidate, but not listed
    # The scheme's default port counts as none (httpx drops it before a transport sees it).
    assert scope.service("http", "orders", 80) == ("Orders", True)
    assert scope.service("https", "orders", 443) == ("Orders", True)
    assert scope.service("https", "orders", 80) == (None, False)
    assert scope.service("http", "orders", 8080) == (None, False)
    why = scope.refusal("http://users/")
    assert why is not None
    assert "http://users/" in why
    assert "Orders, billing.internal" in why
    assert "others='refuse'" in why


@pytest.mark.parametrize(
    ("services", "others", "field"),
    [
        ("orders", "pass", "services"),
        (["orders:80"], "pass", "services"),
        ([""], "pass", "services"),
        ([3], "pass", "services"),
        (None, "drop", "others"),
    ],
)
def test_scope_bad_input_names_the_field(services: object, others: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Scope(services, others)  # type: ignore[arg-type]
    assert caught.value.field == field
