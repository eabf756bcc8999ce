"""Passive outlier ejection: per endpoint failure counts and ejections (Envoy's rule).

Pure apart from the clock, which is injectable. Thread-safe: one lock guards
everything (``report()`` runs in callers' threads while ``choose()`` runs on the
discovery's loop). Memory stays bounded: endpoints not seen (reported or offered
to choose) for ``forget_after`` seconds are forgotten, and never more than
``max_endpoints`` are kept (the least recently seen go first, one per insert: no
call pays for a sort of them all).

The percent cap counts only the ejected endpoints among a service's *current*
candidates: an ejected endpoint that left (deregistered, moved to another address
or port) holds no slot. The candidates are given by the caller (what ``choose()``
would weigh now) or, failing that, those the last :meth:`OutlierTracker.split`
for the same service and policy offered; they are kept per (service, policy key),
so a choice under one policy (a canary filter) never moves another's cap.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from registry_agent._models import ServiceInstance
from registry_agent._policy import OutlierEjection, max_ejections

__all__ = ["OutlierTracker"]

Endpoint = tuple[str, int]


def _endpoint(instance: ServiceInstance) -> Endpoint:
    return (instance.address, instance.port)


@dataclass(slots=True)
class _State:
    instance: ServiceInstance
    seen: float
    # Failures in a row since the last success or the end of the last ejection.
    failures: int = 0
    # The ejection multiplier: the next ejection lasts base_time * (k + 1).
    k: int = 0
    # Ejected until then (monotonic seconds); None: not ejected.
    until: float | None = None
    # Un-ejected since then: k decays by one per base_time from here.
    calm_since: float = 0.0

    def expire(self, now: float) -> None:
        if self.until is not None and now >= self.until:
            self.calm_since = self.until
            self.until = None
            self.failures = 0

    def decay(self, base_time: float, now: float) -> None:
        if self.until is None and self.k > 0:
            steps = int((now - self.calm_since) // base_time)
            if steps > 0:
                self.k = max(0, self.k - steps)
                self.calm_since += steps * base_time

    def ejected(self, now: float) -> bool:
        return self.until is not None and now < self.until


class OutlierTracker:
    """Failure counts and ejections per service and endpoint (``address``, ``port``)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        forget_after: float = 600.0,
        max_endpoints: int = 10_000,
    ) -> None:
        self.clock = clock
        self.forget_after = forget_after
        self.max_endpoints = max_endpoints
        self._lock = threading.Lock()
        self._services: dict[str, dict[Endpoint, _State]] = {}
        # Every tracked (service, endpoint), least recently seen first.
        self._order: OrderedDict[tuple[str, Endpoint], None] = OrderedDict()
        # Per (service, policy key), the endpoints split() last offered, in its order.
        self._candidates: dict[tuple[str, Hashable], tuple[Endpoint, ...]] = {}
        # Per service, when its latest-ending ejection ends: none is ejected from then on.
        self._ejecting: dict[str, float] = {}
        self._swept = clock()

    @property
    def size(self) -> int:
        """How many endpoints are tracked."""
        with self._lock:
            return len(self._order)

    def _touch(self, service: str, key: Endpoint, state: _State, now: float) -> None:
        state.seen = now
        self._order.move_to_end((service, key))

    def _base(
        self, service: str, key: Hashable, candidates: Iterable[ServiceInstance] | None
    ) -> tuple[Endpoint, ...] | None:
        if candidates is not None:
            return tuple(_endpoint(i) for i in candidates)
        return self._candidates.get((service, key))

    def report(
        self,
        service: str,
        instance: ServiceInstance,
        ok: bool,
        rule: OutlierEjection,
        *,
        key: Hashable = None,
        candidates: Sequence[ServiceInstance] | None = None,
    ) -> bool:
        """Count one outcome of a call to ``instance``; True when it ejected the endpoint.

        A success resets the failure count; ``rule.consecutive_failures`` failures in a
        row eject the endpoint unless the percent cap forbids it (then the next failure
        asks again). Outcomes reported while the endpoint is ejected are ignored.

        The cap's base: ``candidates`` (what choose() would weigh now), else those the
        last :meth:`split` with the same ``key`` offered; neither known (no choice made
        yet): no cap here, :meth:`split` applies it at the first choice. Only ejected
        endpoints among them count; an endpoint not among them takes no slot.
        """
        with self._lock:
            now = self.clock()
            endpoint = _endpoint(instance)
            state = self._services.get(service, {}).get(endpoint)
            if state is None:
                self._sweep(now)
                state = self._services.setdefault(service, {})[endpoint] = _State(
                    instance, seen=now, calm_since=now
                )
                self._order[(service, endpoint)] = None
            state.instance = instance
            self._touch(service, endpoint, state, now)
            state.expire(now)
            state.decay(rule.base_time, now)
            if state.until is not None:
                return False
            if ok:
                state.failures = 0
                return False
            state.failures += 1
            if state.failures < rule.consecutive_failures:
                return False
            base = self._base(service, key, candidates)
            if base is not None and endpoint in base:
                states = self._services[service]
                out = sum(
                    1 for e in set(base) if (s := states.get(e)) is not None and s.ejected(now)
                )
                if out >= max_ejections(len(base), rule.max_ejected_percent):
                    return False
            state.k += 1
            state.until = until = now + rule.duration(state.k)
            if until > self._ejecting.get(service, until - 1):
                self._ejecting[service] = until
            state.failures = 0
            return True

    def _parted(
        self, service: str, endpoints: Sequence[Endpoint], rule: OutlierEjection, now: float
    ) -> set[int]:
        """The indexes of ``endpoints`` left out now (lock held): the ejected ones, those
        whose ejection ends last first, at most the percent cap of them."""
        states = self._services.get(service)
        if not states:
            return set()
        out: list[tuple[float, int]] = []
        for index, endpoint in enumerate(endpoints):
            state = states.get(endpoint)
            if state is None:
                continue
            # state.expire(now) then state.decay(...), without the calls when idle.
            until = state.until
            if until is not None:
                if now < until:
                    out.append((until, index))
                    continue
                state.expire(now)
            if state.k > 0:
                state.decay(rule.base_time, now)
        allowed = max_ejections(len(endpoints), rule.max_ejected_percent)
        out.sort(reverse=True)  # latest-ending first: those stay out
        return {index for _, index in out[:allowed]}

    def split(
        self,
        service: str,
        eligible: Sequence[ServiceInstance],
        rule: OutlierEjection,
        *,
        key: Hashable = None,
        endpoints: tuple[Endpoint, ...] | None = None,
    ) -> tuple[Sequence[ServiceInstance], list[ServiceInstance]]:
        """``eligible`` parted into (usable, ejected), each in the input order.

        ``eligible`` is every instance the service offers for choice under the policy
        ``key`` (healthy, passing the filter, with a port); it becomes that policy's
        cap base for :meth:`report`. When more are ejected than the percent cap allows
        of them now (the service shrank), those whose ejection ends first are usable.
        ``endpoints``: those of ``eligible`` in its order, when the caller keeps them.
        When none is ejected, ``usable`` is ``eligible`` itself (not a copy).
        """
        with self._lock:
            now = self.clock()
            if endpoints is None:
                endpoints = tuple(_endpoint(i) for i in eligible)
            self._candidates[(service, key)] = endpoints
            states = self._services.get(service)
            if not states:
                return eligible, []
            order = self._order
            for endpoint in endpoints:  # seen: self._touch(), inlined (once per choice)
                state = states.get(endpoint)
                if state is not None:
                    state.seen = now
                    order.move_to_end((service, endpoint))
            ending = self._ejecting.get(service)
            if ending is None or ending <= now:  # no ejection lasts until now
                return eligible, []
            ejected = self._parted(service, endpoints, rule, now)
            if not ejected:
                return eligible, []
            return (
                [i for n, i in enumerate(eligible) if n not in ejected],
                [i for n, i in enumerate(eligible) if n in ejected],
            )

    def ejected(
        self,
        service: str,
        rule: OutlierEjection | None = None,
        *,
        key: Hashable = None,
        candidates: Sequence[ServiceInstance] | None = None,
    ) -> list[ServiceInstance]:
        """The instances of ``service`` a choice would leave out now, by address and port.

        Without ``rule``: every endpoint ejected now (no cap applied). With it: those
        :meth:`split` would leave out of ``candidates`` (else of the last split's with
        ``key``, else of every endpoint tracked for the service).
        """
        with self._lock:
            now = self.clock()
            states = self._services.get(service, {})
            if rule is None:
                return [states[k].instance for k in sorted(states) if states[k].ejected(now)]
            if candidates is not None:
                endpoints: Sequence[Endpoint] = [_endpoint(i) for i in candidates]
                pool: list[ServiceInstance | None] = list(candidates)
            else:
                endpoints = self._candidates.get((service, key)) or sorted(states)
                pool = [states[e].instance if e in states else None for e in endpoints]
            out = self._parted(service, endpoints, rule, now)
            found = [i for n, i in enumerate(pool) if n in out and i is not None]
            return sorted(found, key=_endpoint)

    def state(self, service: str, instance: ServiceInstance) -> tuple[int, int, float | None]:
        """(failures in a row, ejection multiplier, ejected until) of an endpoint (tests)."""
        with self._lock:
            found = self._services.get(service, {}).get(_endpoint(instance))
            if found is None:
                return (0, 0, None)
            found.expire(self.clock())
            return (found.failures, found.k, found.until)

    def _forget(self, service: str, endpoint: Endpoint) -> None:
        del self._order[(service, endpoint)]
        states = self._services[service]
        del states[endpoint]
        if not states:
            del self._services[service]
            self._ejecting.pop(service, None)
            for pair in [p for p in self._candidates if p[0] == service]:
                del self._candidates[pair]

    def _sweep(self, now: float) -> None:
        """Before an insert (lock held): forget endpoints unseen for ``forget_after`` (not
        ejected: those move to the back) from the least recently seen on, at most every
        quarter of ``forget_after``; at ``max_endpoints``, the least recently seen one."""
        if now - self._swept >= self.forget_after / 4:
            self._swept = now
            for _ in range(len(self._order)):
                service, endpoint = next(iter(self._order))
                state = self._services[service][endpoint]
                if now - state.seen <= self.forget_after:
                    break
                if state.ejected(now):
                    self._order.move_to_end((service, endpoint))
                else:
                    self._forget(service, endpoint)
        while len(self._order) >= self.max_endpoints:
            service, endpoint = next(iter(self._order))
            self._forget(service, endpoint)
