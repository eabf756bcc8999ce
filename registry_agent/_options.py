"""Registration options: every default and every check written once.

:class:`RegistrationOptions` is what :class:`~registry_agent.AsyncRegistrar`,
:class:`~registry_agent.Registrar` and the agent's config all build; their
keywords are typed once in :class:`OptionArgs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from registry_agent._errors import ConfigError
from registry_agent._health.gate import OnUnhealthy
from registry_agent._retry import RetryPolicy
from registry_agent._urls import parse_duration

__all__ = [
    "HEARTBEAT_FLOOR",
    "OPTION_KEYS",
    "REAP_CEILING",
    "TTL_CEILING",
    "TTL_FLOOR",
    "OptionArgs",
    "RegistrationOptions",
]

#: Shortest TTL accepted. etcd grants leases in whole seconds (and rounds a short
#: one up to its own minimum, 2 s by default); Consul reaps on a coarse timer.
#: Below a second an entry flaps on any scheduling hiccup.
TTL_FLOOR = 1.0
#: Shortest heartbeat accepted: at most 4 renewals a second per registrar.
HEARTBEAT_FLOOR = 0.25
#: Longest TTL accepted: a day. An entry of a dead instance stays listed for its TTL,
#: and much more is refused by the registries themselves (etcd: "too large lease
#: TTL"; Consul: a duration out of its range) on every retry, never up front.
TTL_CEILING = 86400.0
#: Longest ``deregister_critical_after`` accepted: a year.
REAP_CEILING = 365 * 86400.0


class OptionArgs(TypedDict, total=False):
    """The registration options as keywords (see :class:`RegistrationOptions`)."""

    ttl: float
    heartbeat: float | None
    fall: int
    rise: int
    on_unhealthy: str | OnUnhealthy
    deregister_critical_after: float | None
    retry: RetryPolicy | None


#: The option names, e.g. to pick them out of a config table.
OPTION_KEYS: frozenset[str] = frozenset(OptionArgs.__annotations__)

_DURATIONS = ("ttl", "heartbeat", "deregister_critical_after")


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistrationOptions:
    """How one instance is registered and healed; invalid values raise ``ConfigError(field=…)``.

    - ``ttl`` (10 s, at least :data:`TTL_FLOOR`, at most :data:`TTL_CEILING`): the
      registry drops (etcd) or fails (Consul) the entry when no heartbeat renewed it
      for this long.
    - ``heartbeat`` (None: ``ttl / 3``; at least :data:`HEARTBEAT_FLOOR`, at most
      ``ttl / 3``): seconds between renewals.
    - ``fall`` (3) / ``rise`` (2): failures in a row that withdraw the instance,
      passes in a row that bring it (back) in.
    - ``on_unhealthy`` (``"deregister"``): remove a withdrawn instance, or keep
      it as ``"critical"``.
    - ``deregister_critical_after`` (None: the backend's own setting): ask a
      registry that keeps critical entries (Consul) to reap them after this long;
      the backend checks its own floor (Consul: 60 s); at most :data:`REAP_CEILING`.
    - ``retry`` (:class:`RetryPolicy` defaults): the backoff of every healing path.
    """

    ttl: float = 10.0
    heartbeat: float | None = None
    fall: int = 3
    rise: int = 2
    on_unhealthy: OnUnhealthy = OnUnhealthy.DEREGISTER
    deregister_critical_after: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        ttl = _seconds(
            self.ttl, "ttl", TTL_FLOOR, "etcd leases are whole seconds", TTL_CEILING, "a day"
        )
        heartbeat = None
        if self.heartbeat is not None:
            heartbeat = _seconds(
                self.heartbeat, "heartbeat", HEARTBEAT_FLOOR, "at most 4 renewals a second"
            )
            if heartbeat > ttl / 3 + 1e-9:
                raise ConfigError(
                    f"must be at most ttl/3 ({ttl / 3:g}s) so two heartbeats can fail "
                    f"before the TTL runs out, got {heartbeat:g}s",
                    field="heartbeat",
                )
        for name in ("fall", "rise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected a whole number >= 1, got {value!r}", field=name)
        try:
            on_unhealthy = OnUnhealthy(self.on_unhealthy)
        except ValueError:
            raise ConfigError(
                f'expected "deregister" or "critical", got {self.on_unhealthy!r}',
                field="on_unhealthy",
            ) from None
        reap = self.deregister_critical_after
        if reap is not None:
            reap = _seconds(
                reap, "deregister_critical_after", 0.0, "a duration", REAP_CEILING, "a year"
            )
            if reap <= 0:
                raise ConfigError(
                    f"expected a duration above zero, got {reap:g}s",
                    field="deregister_critical_after",
                )
        retry = RetryPolicy() if self.retry is None else self.retry
        if not isinstance(retry, RetryPolicy):
            raise ConfigError(f"expected a RetryPolicy, got {retry!r}", field="retry")
        # Store the normalised values (floats, the enum, a policy for None).
        for name, value in (
            ("ttl", ttl),
            ("heartbeat", heartbeat),
            ("on_unhealthy", on_unhealthy),
            ("deregister_critical_after", reap),
            ("retry", retry),
        ):
            object.__setattr__(self, name, value)

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: ``heartbeat``, or ``ttl / 3``."""
        return self.ttl / 3 if self.heartbeat is None else self.heartbeat

    @property
    def verify_interval(self) -> float:
        """Seconds between read-backs of our own entry: one TTL."""
        return self.ttl

    def replace(self, **changes: Any) -> RegistrationOptions:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls, args: Mapping[str, Any], base: RegistrationOptions | None = None
    ) -> RegistrationOptions:
        """From keyword arguments (:class:`OptionArgs`), over ``base`` when given.

        An unknown name is a ``ConfigError``; ``retry=None`` means the default policy.
        """
        unknown = sorted(set(args) - OPTION_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown option; expected one of {', '.join(sorted(OPTION_KEYS))}",
                field=unknown[0],
            )
        given = dict(args)
        if "retry" in given and given["retry"] is None:
            given["retry"] = RetryPolicy()
        if base is None:
            return cls(**given)
        return dataclasses.replace(base, **given) if given else base

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], *, field_prefix: str = ""
    ) -> RegistrationOptions:
        """From a config table: durations as seconds or strings (``"10s"``, ``"500ms"``).

        Every error names the field under ``field_prefix`` (e.g. ``service[3].ttl``);
        an unknown key is an error too. ``retry`` is not read from a table.
        """

        def named(name: str) -> str:
            return f"{field_prefix}.{name}" if field_prefix else name

        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in OPTION_KEYS or key == "retry":
                raise ConfigError(
                    "unknown option; expected one of " + ", ".join(sorted(OPTION_KEYS - {"retry"})),
                    field=named(str(key)),
                )
            if key in _DURATIONS and value is not None:
                value = parse_duration(value, field=named(key))
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(exc.reason, field=named(exc.field or ""), source=exc.source) from None


def _seconds(
    value: object,
    name: str,
    floor: float,
    why: str,
    ceiling: float = math.inf,
    longest: str = "",
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected a number of seconds, got {value!r}", field=name)
    if value < floor:
        raise ConfigError(f"must be at least {floor:g}s ({why}), got {value:g}s", field=name)
    if value > ceiling:
        raise ConfigError(
            f"must be at most {_plain(ceiling)}s ({longest}), got {_plain(value)}s", field=name
        )
    return float(value)


def _plain(seconds: float) -> str:
    """``31536000`` rather than ``3.1536e+07`` (a huge value stays short)."""
    return f"{seconds:.0f}" if seconds == int(seconds) and seconds < 1e12 else f"{seconds:g}"
