"""Choosing one instance among many: round robin, random, weighted (pure, seedable)."""

from __future__ import annotations

import enum
import itertools
import random
from collections.abc import Sequence

from registry_agent._errors import ConfigError
from registry_agent._models import ServiceInstance

__all__ = ["MAX_WEIGHT", "Selector", "Strategy", "weight_of"]


class Strategy(enum.StrEnum):
    """How :meth:`Selector.pick` chooses."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    WEIGHTED = "weighted"  # by the instance's meta "weight" (a whole number, default 1)


def as_strategy(value: str | Strategy) -> Strategy:
    """Parse a strategy name; raises ConfigError naming the choices."""
    if value.__class__ is Strategy:  # the common case, without the enum's lookup
        return value
    try:
        return Strategy(value)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise ConfigError(f"expected one of {choices}, got {value!r}", field="strategy") from None


#: The largest weight counted (Consul's own cap): a peer's entry may say more, and a
#: weight beyond a float's range would break the weighted choice.
MAX_WEIGHT = 65535


def weight_of(instance: ServiceInstance) -> int:
    """The meta ``weight`` as a whole number 0 to :data:`MAX_WEIGHT` (larger counts as
    the cap); 1 when absent or not a number."""
    text = instance.meta.get("weight", "1")
    try:
        return min(max(0, int(text)), MAX_WEIGHT)
    except ValueError:
        return 1


class Selector:
    """Picks instances per service; keeps one round-robin position per service."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._positions: dict[str, itertools.count[int]] = {}

    def pick(
        self, service: str, instances: Sequence[ServiceInstance], strategy: str | Strategy
    ) -> ServiceInstance | None:
        """One of ``instances`` (None when empty). Order them stably (by id) for round robin."""
        strategy = as_strategy(strategy)
        if not instances:
            return None
        if strategy is Strategy.ROUND_ROBIN:
            position = self._positions.setdefault(service, itertools.count())
            return instances[next(position) % len(instances)]
        if strategy is Strategy.RANDOM:
            return self.rng.choice(instances)
        weights = [weight_of(i) for i in instances]
        if not any(weights):
            return None  # every instance asked for no traffic
        return self.rng.choices(instances, weights=weights)[0]
