"""Service instances and their health, the values every backend speaks."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from registry_agent._address import advertised_address
from registry_agent._errors import ConfigError

__all__ = ["HealthStatus", "InstanceHealth", "ServiceInstance", "ServiceSnapshot"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAX_NAME = 256
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
#: The schemes every format knows; others (``ws``, ``tcp``…) pass where a format can carry them.
SCHEMES = ("http", "https", "grpc", "grpcs")


class HealthStatus(enum.StrEnum):
    """Health of a registered instance as the registry reports it."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"

    @classmethod
    def worst(cls, statuses: Iterable[HealthStatus]) -> HealthStatus:
        """The least healthy of ``statuses`` (passing when there are none)."""
        order = (cls.CRITICAL, cls.WARNING)
        found = set(statuses)
        for status in order:
            if status in found:
                return status
        return cls.PASSING


def _check_scheme(value: object) -> None:
    if not isinstance(value, str) or (value and not _SCHEME.match(value)):
        raise ConfigError(
            f"expected a lower-case URL scheme such as {', '.join(SCHEMES)} (or empty), "
            f"got {value!r}",
            field="scheme",
        )


def _check_version(value: object) -> None:
    if (
        not isinstance(value, str)
        or len(value) > _MAX_NAME
        or not value.isprintable()
        or any(c.isspace() for c in value)
    ):
        raise ConfigError(
            f"expected a version without spaces (at most {_MAX_NAME} characters), got {value!r}",
            field="version",
        )


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", field=what)
    if len(value) > _MAX_NAME or not _NAME.match(value):
        raise ConfigError(
            f"expected letters, digits, '_', '.' or '-' (at most {_MAX_NAME}), got {value!r}",
            field=what,
        )
    return value


def weight_text(value: object, what: str = "meta.weight") -> str:
    """An integer weight (``3``) as the meta text it is kept as (``"3"``); a text weight
    is kept when it is one (ASCII digits only: ``"3"``); a bool, a negative number, any
    other text (``"-1"``, ``" 3"``, ``"3.0"``) or anything else is a ConfigError naming
    ``what``."""
    if isinstance(value, str):
        if value.isascii() and value.isdigit():
            return value
        raise ConfigError(f"expected a whole number >= 0, got {value!r}", field=what)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"expected a whole number >= 0, got {value!r}", field=what)
    return str(value)


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One instance of a service: immutable, hashable, validated on creation.

    ``id`` defaults to ``"{service}-{address}-{port}"``, stable across restarts.
    ``address`` defaults to :func:`~registry_agent.advertised_address`'s default:
    the address of the default route (a :class:`ConfigError` naming ``address``
    where there is none), never the host name; a literal is kept as given.

    ``scheme`` says what the instance serves (``http``, ``https``, ``grpc``,
    ``grpcs``; empty: not said, read as ``http`` by most peers) and ``version``
    its release (empty: none). Both are carried by every format that can; the
    README's "Mixed fleets" table says what each format keeps.

    ``meta["weight"]`` is the instance's weight for weighted choice (and Consul's
    native ``Weights``): an integer is accepted and kept as its text (``3`` becomes
    ``"3"``), a text weight must be ASCII digits (``"3"``); a bool, a negative number
    or other text (``"-1"``, ``"3.0"``, ``"abc"``) is a :class:`ConfigError` naming
    ``meta.weight``. Instances read from a registry (:meth:`from_registry`,
    :meth:`from_dict`) keep a peer's text weight as it is: weighted choice reads it
    leniently (text that is no number counts as 1).

    ``node`` is where the registry holds the instance, set on instances read from
    a registry whose ids are unique per node only (Consul: per agent); empty
    otherwise. It is not part of equality or the hash: it says where an entry
    is, not what was registered (a snapshot's keys tell entries apart).
    """

    service: str
    address: str = ""
    port: int = 0
    id: str = ""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    node: str = ""
    scheme: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        _check_name(self.service, "service")
        _check_scheme(self.scheme)
        _check_version(self.version)
        if not isinstance(self.node, str) or not self.node.isprintable():
            raise ConfigError(f"expected a node name, got {self.node!r}", field="node")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"expected an integer 1-65535, got {self.port!r}", field="port")
        if self.port == 0:
            raise ConfigError("expected an integer 1-65535 (the port is required)", field="port")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"expected an integer 1-65535, got {self.port}", field="port")
        address = self.address or advertised_address()
        if (
            not isinstance(address, str)
            or not address.isprintable()
            or any(c.isspace() for c in address)
        ):
            raise ConfigError(
                f"expected a host name or IP address, got {address!r}", field="address"
            )
        object.__setattr__(self, "address", address)
        if not self.id:
            object.__setattr__(
                self, "id", f"{self.service}-{address}-{self.port}".replace(":", "_")
            )
        _check_name(self.id, "id")
        tags = self.tags
        if isinstance(tags, str) or not isinstance(tags, Iterable):
            raise ConfigError(f"expected a list of strings, got {tags!r}", field="tags")
        tags = tuple(tags)
        for i, tag in enumerate(tags):
            if not isinstance(tag, str):
                raise ConfigError(f"expected a string, got {tag!r}", field=f"tags[{i}]")
        object.__setattr__(self, "tags", tags)
        if not isinstance(self.meta, Mapping):
            raise ConfigError(f"expected a mapping of strings, got {self.meta!r}", field="meta")
        if "weight" in self.meta:
            object.__setattr__(
                self, "meta", {**self.meta, "weight": weight_text(self.meta["weight"])}
            )
        for key, value in self.meta.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"expected non-empty string keys, got {key!r}", field="meta")
            if not isinstance(value, str):
                raise ConfigError(f"expected a string value, got {value!r}", field=f"meta.{key}")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __hash__(self) -> int:
        return hash((self.service, self.id, self.address, self.port, self.tags, self._meta_items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServiceInstance):
            return NotImplemented
        return (
            self.service == other.service
            and self.id == other.id
            and self.address == other.address
            and self.port == other.port
            and self.tags == other.tags
            and self.scheme == other.scheme
            and self.version == other.version
            and dict(self.meta) == dict(other.meta)
        )

    def _meta_items(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.meta.items()))

    @classmethod
    def from_registry(
        cls,
        *,
        service: str,
        id: str,
        address: str,
        port: int,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        node: str = "",
        scheme: str = "",
        version: str = "",
    ) -> ServiceInstance:
        """An instance as a registry holds it, checked only for its types.

        What another tool registered may break our rules for what we write (an
        id with ``:`` or spaces, no port: ``port`` 0); it is still an instance.
        Raises :class:`ConfigError` naming the field when a value has the wrong type.
        """
        for name, value in (("service", service), ("id", id), ("address", address)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"expected a non-empty string, got {value!r}", field=name)
        if not address.isprintable() or any(c.isspace() for c in address):
            raise ConfigError(
                f"expected a host name or IP address, got {address!r}", field="address"
            )  # nothing could connect to it: not an instance
        if not isinstance(node, str):
            raise ConfigError(f"expected a string, got {node!r}", field="node")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"expected an integer 0-65535, got {port!r}", field="port")
        if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags):
            raise ConfigError(f"expected a list of strings, got {tags!r}", field="tags")
        if not isinstance(scheme, str) or not isinstance(version, str):
            raise ConfigError(
                f"expected strings, got scheme={scheme!r} version={version!r}", field="scheme"
            )
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ConfigError(f"expected a mapping of strings, got {meta!r}", field="meta")
        instance = object.__new__(cls)
        fields: tuple[tuple[str, object], ...] = (
            ("service", service),
            ("address", address),
            ("port", port),
            ("id", id),
            ("tags", tuple(tags)),
            ("meta", MappingProxyType(dict(meta))),
            ("node", node),
            ("scheme", scheme.lower()),
            ("version", version),
        )
        for attribute, content in fields:
            object.__setattr__(instance, attribute, content)
        return instance

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the instance fields (``node``, ``scheme``, ``version`` only
        when set)."""
        data: dict[str, Any] = {
            "service": self.service,
            "id": self.id,
            "address": self.address,
            "port": self.port,
            "tags": list(self.tags),
            "meta": dict(self.meta),
        }
        if self.node:
            data["node"] = self.node
        if self.scheme:
            data["scheme"] = self.scheme
        if self.version:
            data["version"] = self.version
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceInstance:
        """Build an instance from :meth:`to_dict` output; raises :class:`ConfigError`.

        Checked as the constructor checks, but for a text ``meta["weight"]``: what
        :meth:`to_dict` wrote may be a peer's entry read from a registry (the etcd
        format reads its entries back with this), whose weight is kept as it is.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected an object, got {type(data).__name__}")
        known = {"service", "id", "address", "port", "tags", "meta", "node", "scheme", "version"}
        if "service" not in data:
            raise ConfigError("missing: every instance names its service", field="service")
        fields = {key: data[key] for key in known if key in data}
        meta = fields.get("meta")
        weight = meta.get("weight") if isinstance(meta, Mapping) else None
        if not isinstance(weight, str) or (weight.isascii() and weight.isdigit()):
            return cls(**fields)
        assert isinstance(meta, Mapping)
        instance = cls(**{**fields, "meta": {k: v for k, v in meta.items() if k != "weight"}})
        object.__setattr__(instance, "meta", MappingProxyType(dict(meta)))
        return instance


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    """A registered instance with the health the registry reports for it."""

    instance: ServiceInstance
    status: HealthStatus = HealthStatus.PASSING
    #: Free text from the registry (Consul check output); not part of equality.
    note: str = field(default="", compare=False)

    @property
    def healthy(self) -> bool:
        """True only when the registry says ``passing``."""
        return self.status is HealthStatus.PASSING


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """Every instance of one service at one registry index (Consul) or revision (etcd)."""

    service: str
    index: int
    instances: Mapping[str, InstanceHealth] = field(default_factory=lambda: MappingProxyType({}))

    def healthy(self) -> list[ServiceInstance]:
        """The passing instances, ordered by id."""
        return [h.instance for _, h in sorted(self.instances.items()) if h.healthy]
