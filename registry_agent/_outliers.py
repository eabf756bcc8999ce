"""Passive outlier ejection: per endpoint failure counts and ejections (Envoy's rule).

Pure apart from the clock, which is injectable. Thread-safe: one lock guards
everything (``report()`` runs in callers' threads while ``choose()`` runs on the
discovery's loop). Memory stays bounded: endpoints not seen (reported or offered
to choose) for ``forget_after`` seconds are forgotten, and never more than
``max_endpoints`` are kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
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
        # Per service, how many candidates choose() last offered (the percent cap's base).
        self._candidates: dict[str, int] = {}
        self._size = 0
        self._swept = clock()

    @property
    def size(self) -> int:
        """How many endpoints are tracked."""
        with self._lock:
            return self._size

    def report(
        self, service: str, instance: ServiceInstance, ok: bool, rule: OutlierEjection
    ) -> bool:
        """Count one outcome of a call to ``instance``; True when it ejected the endpoint.

        A success resets the failure count; ``rule.consecutive_failures`` failures in a
        row eject the endpoint unless the percent cap forbids it (then the next failure
        asks again). Outcomes reported while the endpoint is ejected are ignored.
        """
        with self._lock:
            now = self.clock()
            states = self._services.setdefault(service, {})
            key = _endpoint(instance)
            state = states.get(key)
            if state is None:
                self._sweep(now)
                states = self._services.setdefault(service, {})
                state = states[key] = _State(instance, seen=now, calm_since=now)
                self._size += 1
            state.instance = instance
            state.seen = now
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
            # The cap's base: the candidates choose() last offered. Never offered (no
            # choice made yet): no cap here, split() applies it at the first choice.
            candidates = self._candidates.get(service)
            ejected = sum(1 for s in states.values() if s.ejected(now))
            if candidates is not None and ejected >= max_ejections(
                candidates, rule.max_ejected_percent
            ):
                return False
            state.k += 1
            state.until = now + rule.duration(state.k)
            state.failures = 0
            return True

    def split(
        self, service: str, eligible: Sequence[ServiceInstance], rule: OutlierEjection
    ) -> tuple[list[ServiceInstance], list[ServiceInstance]]:
        """``eligible`` parted into (usable, ejected), each in the input order.

        ``eligible`` is every instance the service offers for choice (healthy, passing
        the filter, with a port). When more are ejected than the percent cap allows of
        them now (the service shrank), those whose ejection ends first are usable again.
        """
        with self._lock:
            now = self.clock()
            self._candidates[service] = len(eligible)
            states = self._services.get(service)
            if not states:
                return list(eligible), []
            out: list[tuple[float, int]] = []
            for index, instance in enumerate(eligible):
                state = states.get(_endpoint(instance))
                if state is None:
                    continue
                state.seen = now
                state.expire(now)
                state.decay(rule.base_time, now)
                if state.until is not None:
                    out.append((state.until, index))
            allowed = max_ejections(len(eligible), rule.max_ejected_percent)
            out.sort(reverse=True)  # latest-ending first: those stay out
            ejected = {index for _, index in out[:allowed]}
            return (
                [i for n, i in enumerate(eligible) if n not in ejected],
                [i for n, i in enumerate(eligible) if n in ejected],
            )

    def ejected(self, service: str) -> list[ServiceInstance]:
        """The instances of ``service`` ejected now, ordered by address and port."""
        with self._lock:
            now = self.clock()
            states = self._services.get(service, {})
            return [states[k].instance for k in sorted(states) if states[k].ejected(now)]

    def state(self, service: str, instance: ServiceInstance) -> tuple[int, int, float | None]:
        """(failures in a row, ejection multiplier, ejected until) of an endpoint (tests)."""
        with self._lock:
            found = self._services.get(service, {}).get(_endpoint(instance))
            if found is None:
                return (0, 0, None)
            found.expire(self.clock())
            return (found.failures, found.k, found.until)

    def _sweep(self, now: float) -> None:
        """Forget endpoints unseen for ``forget_after`` (not ejected); at the bound of
        ``max_endpoints``, the least recently seen down to nine tenths of it. Runs at
        most every quarter of ``forget_after`` unless at the bound (before an insert)."""
        if self._size < self.max_endpoints and now - self._swept < self.forget_after / 4:
            return
        self._swept = now
        for service in list(self._services):
            states = self._services[service]
            for key in [k for k, s in states.items() if not s.ejected(now)]:
                if now - states[key].seen > self.forget_after:
                    del states[key]
                    self._size -= 1
            if not states:
                del self._services[service]
                self._candidates.pop(service, None)
        if self._size >= self.max_endpoints:
            # Down to nine tenths: the next sort is many inserts away.
            keep = self.max_endpoints * 9 // 10
            everything = sorted(
                (state.seen, service, key)
                for service, states in self._services.items()
                for key, state in states.items()
            )
            for _, service, key in everything[: self._size - keep]:
                del self._services[service][key]
                self._size -= 1
                if not self._services[service]:
                    del self._services[service]
                    self._candidates.pop(service, None)
