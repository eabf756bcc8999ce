"""Jittered exponential backoff: the one retry policy every healing path uses."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import tenacity

from registry_agent._errors import ConfigError

__all__ = ["RetryPolicy"]


class _EqualJitterWait(tenacity.wait.wait_base):
    """A tenacity wait strategy: ``base = min(cap, initial * multiplier^(n-1))``,
    then a uniform draw in ``[base * (1 - jitter), base]``.

    Keeping a floor (unlike full jitter) means a retry never comes back at once,
    while the spread still keeps a fleet of agents from retrying in step.
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        p = self.policy
        exponent = max(0, retry_state.attempt_number - 1)
        # Cap the exponent first: multiplier**n overflows a float long before "forever" ends.
        base = p.cap if exponent > 64 else min(p.cap, p.initial * p.multiplier**exponent)
        return base * (1.0 - p.jitter * self.rng.random())


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before retry number ``attempt`` (1-based). Healing retries forever.

    ``initial`` seconds before the first retry, growing by ``multiplier`` up to
    ``cap``; each delay is drawn in ``[d * (1 - jitter), d]``.
    """

    initial: float = 0.2
    cap: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    #: Longest wait between retries while the server answers (429/5xx): it is up,
    #: so come back soon (within ``answered_cap`` of it recovering).
    answered_cap: float = 1.0
    #: Longest ``Retry-After`` honoured: a server asking for more is retried sooner.
    retry_after_cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ConfigError(
                f"expected 0 < initial <= cap, got initial={self.initial}, cap={self.cap}",
                field="retry",
            )
        if self.multiplier < 1:
            raise ConfigError(f"expected a multiplier >= 1, got {self.multiplier}", field="retry")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"expected 0 <= jitter < 1, got {self.jitter}", field="retry")
        if not 0 < self.answered_cap <= self.retry_after_cap:
            raise ConfigError(
                f"expected 0 < answered_cap <= retry_after_cap, got answered_cap="
                f"{self.answered_cap}, retry_after_cap={self.retry_after_cap}",
                field="retry",
            )

    @property
    def wait(self) -> tenacity.wait.wait_base:
        """This policy as a tenacity wait strategy (for ``tenacity.AsyncRetrying``)."""
        return _EqualJitterWait(self, self.rng)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1 for the first retry)."""
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = max(1, attempt)
        return float(self.wait(state))

    def slowest(self) -> float:
        """A delay at the cap, jittered: for errors no quick retry can fix (``Rejected``)."""
        return self.cap * (1.0 - self.jitter * self.rng.random())

    def answered(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt`` when the server answered but refused.

        A server that answers (429, 503) is reachable: honour its ``retry_after``
        (at most ``retry_after_cap``, at least ``initial``, plus up to 10 % so a
        fleet does not come back in step), else back off from ``initial`` but
        never beyond ``answered_cap``, so the first retry after it recovers
        comes within about ``answered_cap``.
        """
        if retry_after is not None and retry_after >= 0:
            wait = min(max(retry_after, self.initial), self.retry_after_cap)
            return wait * (1.0 + 0.1 * self.rng.random())
        exponent = min(max(0, attempt - 1), 64)
        base = min(self.answered_cap, self.cap, self.initial * self.multiplier**exponent)
        return base * (1.0 - self.jitter * self.rng.random())
