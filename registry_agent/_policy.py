"""Discovery policy: which instances a client may use, which it prefers, when it retries.

Pure: no I/O, no clock. :class:`DiscoveryPolicy` filters (tags, meta), orders by
locality (tiered fallback), and carries the retry and outlier-ejection settings the
transports and the gRPC channel apply.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from registry_agent._errors import ConfigError
from registry_agent._models import ServiceInstance

__all__ = [
    "IDEMPOTENT_METHODS",
    "DiscoveryPolicy",
    "OutlierEjection",
    "is_idempotent",
    "locality_tiers",
    "max_ejections",
    "preferred",
]

#: HTTP methods retried on another instance (RFC 9110's idempotent methods).
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def is_idempotent(method: str) -> bool:
    """True for an idempotent HTTP method (GET, HEAD, OPTIONS, PUT, DELETE, TRACE), any case."""
    return method.upper() in IDEMPOTENT_METHODS


def _number(value: object, name: str, *, minimum: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"expected a number, got {value!r}", field=name)
    if math.isinf(value):
        raise ConfigError(f"expected a finite number, got {value!r}", field=name)
    if positive and value <= 0:
        raise ConfigError(f"expected a number > 0, got {value!r}", field=name)
    if value < minimum:
        raise ConfigError(f"expected a number >= {minimum:g}, got {value!r}", field=name)
    return float(value)


def _whole(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected a whole number >= {minimum}, got {value!r}", field=name)
    if value < minimum:
        raise ConfigError(f"expected a whole number >= {minimum}, got {value!r}", field=name)
    return value


@dataclass(frozen=True, slots=True)
class OutlierEjection:
    """Passive outlier ejection, Envoy's rule.

    ``consecutive_failures`` failures in a row (no success between, reported through
    :meth:`~registry_agent.AsyncDiscovery.report`) eject an endpoint (``address:port``).
    Its k-th ejection lasts ``base_time * k`` seconds, capped at ``max_time``; after
    it the endpoint is chosen again with its failure count reset. ``k`` decays by one
    for each ``base_time`` the endpoint spends un-ejected. At most
    ``max_ejected_percent`` of a service's candidates are ejected at once, but one may
    always be ejected when there are two or more; the only candidate never is, nor
    the last one not ejected.
    """

    consecutive_failures: int = 5
    base_time: float = 30.0
    max_time: float = 300.0
    max_ejected_percent: float = 50.0

    def __post_init__(self) -> None:
        _whole(self.consecutive_failures, "OutlierEjection.consecutive_failures", minimum=1)
        base = _number(self.base_time, "OutlierEjection.base_time", minimum=0, positive=True)
        top = _number(self.max_time, "OutlierEjection.max_time", minimum=0, positive=True)
        if top < base:
            raise ConfigError(
                f"expected a number >= base_time ({base:g}), got {self.max_time!r}",
                field="OutlierEjection.max_time",
            )
        percent = _number(
            self.max_ejected_percent, "OutlierEjection.max_ejected_percent", minimum=0
        )
        if percent > 100:
            raise ConfigError(
                f"expected a percentage from 0 to 100, got {self.max_ejected_percent!r}",
                field="OutlierEjection.max_ejected_percent",
            )

    def duration(self, k: int) -> float:
        """How long the k-th ejection in a row lasts: ``base_time * k``, capped at ``max_time``."""
        return min(self.base_time * max(1, k), self.max_time)


def max_ejections(candidates: int, percent: float) -> int:
    """How many of ``candidates`` may be ejected at once: ``percent`` of them rounded
    down, at least one when there are two or more, never all of them."""
    if candidates < 2:
        return 0
    return min(candidates - 1, max(1, math.floor(candidates * percent / 100.0 + 1e-9)))


def _names(value: object, name: str) -> frozenset[str]:
    if isinstance(value, str | bytes):
        raise ConfigError(
            f"expected a collection of names, e.g. ({value!r},), got the single text {value!r}",
            field=name,
        )
    if isinstance(value, Mapping) or not isinstance(value, Collection):
        raise ConfigError(f"expected a collection of names, got {value!r}", field=name)
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"expected non-empty texts, got {item!r}", field=name)
    return frozenset(value)


def _pairs(value: object, name: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping of text to text, got {value!r}", field=name)
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"expected non-empty text keys, got {key!r}", field=name)
        if not isinstance(item, str):
            raise ConfigError(f"expected a text value for {key!r}, got {item!r}", field=name)
    return MappingProxyType(dict(value))


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host_name(value: object, name: str) -> str | None:
    """None, an IP literal, or a DNS host name: labels of 1 to 63 letters, digits and
    hyphens (none at a label's start or end), 253 characters at most."""
    if value is None:
        return None
    expected = "expected a DNS host name such as 'orders.internal' (or None)"
    if not isinstance(value, str):
        raise ConfigError(f"{expected}, got {value!r}", field=name)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    host = value[:-1] if value.endswith(".") else value
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(p) for p in host.split(".")):
        raise ConfigError(
            f"{expected}, without scheme, port or wildcard, got {value!r}", field=name
        )
    return value


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


def _meta_value(instance: ServiceInstance, key: str) -> str | None:
    value = instance.meta.get(key)
    if value is None and key == "version" and instance.version:
        return instance.version  # formats that carry the version as a field of its own
    return value


@dataclass(frozen=True, slots=True, eq=False)
class DiscoveryPolicy:
    """Which instances of a service a client uses, which it prefers, and its retries.

    - ``tags``: an instance must carry every one (stored as a frozenset).
    - ``meta``: ``instance.meta[key] == value`` for each entry (``{"version": "v2"}``;
      the key ``version`` also matches the instance's own ``version`` field when its
      meta has no such key).
    - ``prefer``: locality, most important first, matched on ``instance.meta``
      (``{"zone": "eu-1a", "datacenter": "dc1"}``): the choice is among the candidates
      matching every entry; when there are none, among those matching all but the
      last; ...; finally among all candidates.
    - ``outliers``: passive outlier ejection (:class:`OutlierEjection`); None: none.
    - ``retries``: attempts on other instances after the first (transports, gRPC).
    - ``retry_statuses``: HTTP statuses retried on another instance, idempotent
      methods only (opt-in, e.g. ``(502, 503, 504)``).
    - ``retry_read_timeouts``: retry a read timeout on another instance, idempotent
      methods only (opt-in).
    - ``server_name``: the TLS server name for ``https://service/`` URLs and gRPC
      TLS; None: the service name itself.

    A filter that no instance passes is no error here: :meth:`AsyncDiscovery.choose`
    then raises :class:`~registry_agent.NoInstanceAvailable` saying why.
    Invalid values raise :class:`~registry_agent.ConfigError` naming the field.
    """

    tags: Collection[str] = ()
    meta: Mapping[str, str] = field(default_factory=_empty)
    prefer: Mapping[str, str] = field(default_factory=_empty)
    outliers: OutlierEjection | None = None
    retries: int = 2
    retry_statuses: Collection[int] = ()
    retry_read_timeouts: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _names(self.tags, "DiscoveryPolicy.tags"))
        object.__setattr__(self, "meta", _pairs(self.meta, "DiscoveryPolicy.meta"))
        object.__setattr__(self, "prefer", _pairs(self.prefer, "DiscoveryPolicy.prefer"))
        if self.outliers is not None and not isinstance(self.outliers, OutlierEjection):
            raise ConfigError(
                f"expected an OutlierEjection or None, got {self.outliers!r}",
                field="DiscoveryPolicy.outliers",
            )
        _whole(self.retries, "DiscoveryPolicy.retries", minimum=0)
        statuses = self.retry_statuses
        if isinstance(statuses, str | bytes) or not isinstance(statuses, Collection):
            raise ConfigError(
                f"expected a collection of HTTP statuses, e.g. (502, 503, 504), got {statuses!r}",
                field="DiscoveryPolicy.retry_statuses",
            )
        for status in statuses:
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise ConfigError(
                    f"expected HTTP statuses from 100 to 599, got {status!r}",
                    field="DiscoveryPolicy.retry_statuses",
                )
        object.__setattr__(self, "retry_statuses", frozenset(statuses))
        if not isinstance(self.retry_read_timeouts, bool):
            raise ConfigError(
                f"expected True or False, got {self.retry_read_timeouts!r}",
                field="DiscoveryPolicy.retry_read_timeouts",
            )
        _host_name(self.server_name, "DiscoveryPolicy.server_name")

    def _key(self) -> tuple[object, ...]:
        # prefer's order is part of it (most important first); meta's is not.
        return (
            self.tags,
            frozenset(self.meta.items()),
            tuple(self.prefer.items()),
            self.outliers,
            self.retries,
            self.retry_statuses,
            self.retry_read_timeouts,
            self.server_name,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiscoveryPolicy):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def filters(self) -> bool:
        """True when the policy filters instances (tags or meta)."""
        return bool(self.tags or self.meta)

    def matches(self, instance: ServiceInstance) -> bool:
        """True when ``instance`` carries every tag and every meta entry asked for."""
        if self.tags and not all(tag in instance.tags for tag in self.tags):
            return False
        return all(_meta_value(instance, k) == v for k, v in self.meta.items())

    def describe(self) -> str:
        """The filter in words, e.g. ``"tags canary, meta version=v2"`` (empty: none)."""
        parts = []
        if self.tags:
            parts.append("tags " + ",".join(sorted(self.tags)))
        if self.meta:
            parts.append("meta " + ",".join(f"{k}={v}" for k, v in sorted(self.meta.items())))
        return ", ".join(parts)

    def retries_status(self, method: str, status: int) -> bool:
        """True when an answer with ``status`` to ``method`` is retried on another instance."""
        return status in self.retry_statuses and is_idempotent(method)

    def retries_read_timeout(self, method: str) -> bool:
        """True when a read timeout of ``method`` is retried on another instance."""
        return self.retry_read_timeouts and is_idempotent(method)

    def tls_server_name(self, service: str) -> str:
        """The TLS server name for ``service``: ``server_name`` or the service name."""
        return self.server_name or service


def _in_locality(instance: ServiceInstance, entries: Sequence[tuple[str, str]]) -> bool:
    return all(instance.meta.get(k) == v for k, v in entries)


def locality_tiers(
    instances: Sequence[ServiceInstance], prefer: Mapping[str, str]
) -> list[list[ServiceInstance]]:
    """The tiers of ``instances`` by ``prefer``, best first: those matching every entry,
    then all but the last, ..., then all of them (each tier keeps the input order;
    a tier may be empty; there are ``len(prefer) + 1`` of them)."""
    entries = list(prefer.items())
    return [
        [i for i in instances if _in_locality(i, entries[:level])]
        for level in range(len(entries), -1, -1)
    ]


def preferred(
    instances: Sequence[ServiceInstance], prefer: Mapping[str, str]
) -> list[ServiceInstance]:
    """The best non-empty locality tier of ``instances`` (see :func:`locality_tiers`)."""
    entries = list(prefer.items())
    for level in range(len(entries), 0, -1):
        tier = [i for i in instances if _in_locality(i, entries[:level])]
        if tier:
            return tier
    return list(instances)
