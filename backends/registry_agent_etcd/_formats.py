"""How an entry is laid out in etcd: ours, or a peer framework's (go-zero, kratos, go-micro).

Every format keeps the key layout ``[<prefix>/]<service>/<entry id>``; it chooses
the default prefix, the entry id of an instance, and the value's bytes. One
format per backend (option ``format``), used both to write and to read.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, ClassVar, Protocol

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance

__all__ = ["FORMATS", "EtcdFormat", "RegistryAgentFormat", "health_error", "load_format"]


class EtcdFormat(Protocol):
    """One way of writing an instance into etcd and reading it back.

    ``decode`` raises :class:`ValueError` (or :class:`~registry_agent.ConfigError`)
    for a value that is not an instance in this format: the backend skips it
    with one warning. ``decode(service, entry_id(i), encode(i, s, n))`` must give
    back what a reader of that format sees of ``i``; the backend's verification
    compares the bytes it wrote, so a format may lose fields (go-zero keeps only
    the address and port).
    """

    #: The option value naming it (``format=go-zero``).
    name: ClassVar[str]
    #: The key prefix when the option ``prefix`` is not given ("" for keys like ``orders.rpc/…``).
    default_prefix: ClassVar[str]
    #: False: an entry says only that the instance is there, never that it is
    #: critical; ``on_unhealthy="critical"`` is refused (see ``health_error``).
    carries_health: ClassVar[bool]

    def entry_id(self, instance: ServiceInstance) -> str:
        """The last segment of ``instance``'s key (no ``/``); stable for the instance."""
        ...

    def encode(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        """The value to store for ``instance`` (``status`` and ``note`` where it can)."""
        ...

    def decode(self, service: str, entry_id: str, value: bytes) -> InstanceHealth:
        """The instance a reader of this format sees in ``value`` at ``<service>/<entry_id>``."""
        ...


class RegistryAgentFormat:
    """Ours: a JSON object of the instance's fields plus ``status`` and ``note``."""

    name: ClassVar[str] = "registry-agent"
    default_prefix: ClassVar[str] = "/services"
    carries_health: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        del options  # no option of its own

    def entry_id(self, instance: ServiceInstance) -> str:
        return instance.id

    def encode(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        data: dict[str, Any] = {**instance.to_dict(), "status": str(status)}
        if note:
            data["note"] = note
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    def decode(self, service: str, entry_id: str, value: bytes) -> InstanceHealth:
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        instance = ServiceInstance.from_dict(data)
        if instance.service != service:
            raise ValueError(f"service {instance.service!r} under {service!r}")
        if instance.id != entry_id:
            raise ValueError(f"id {instance.id!r} does not match the key")
        status = HealthStatus(data.get("status", "passing"))
        note = data.get("note", "")
        return InstanceHealth(instance, status, note if isinstance(note, str) else "")


#: Format name -> "module:class" under this package (imported on first use).
FORMATS: dict[str, str] = {
    "registry-agent": "registry_agent_etcd._formats:RegistryAgentFormat",
    "go-zero": "registry_agent_etcd._format_gozero:GoZeroFormat",
    "kratos": "registry_agent_etcd._format_kratos:KratosFormat",
    "go-micro": "registry_agent_etcd._format_gomicro:GoMicroFormat",
}


def load_format(name: str, **options: Any) -> EtcdFormat:
    """The format called ``name``, built with its options (``scheme`` for kratos)."""
    target = FORMATS.get(name)
    if target is None:
        raise ConfigError(
            f"expected one of {', '.join(FORMATS)}, got {name!r}", field="backend.format"
        )
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    return cls(**options)  # type: ignore[no-any-return]


def health_error(fmt: EtcdFormat) -> str:
    """Why ``on_unhealthy="critical"`` cannot work with a format that carries no health."""
    return (
        f"format={fmt.name} carries presence, not health: its clients would keep calling "
        'an instance held critical. Use on_unhealthy="deregister" (the default): an '
        "unhealthy instance then leaves the registry and comes back when it recovers"
    )
