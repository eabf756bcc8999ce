"""go-zero's etcd layout: key ``<service>/<id in decimal>``, value the bare ``host:port``.

Read from zeromicro/go-zero (v1.0.0 to v1.10.3; the layout has not changed):

- ``core/discov/publisher.go`` (``Publisher.register``): a publisher grants a
  lease and puts ``makeEtcdKey(key, id)`` = ``<key>/<id as %d>`` with its value,
  attached to that lease. ``id`` is the lease id, or the publisher's ``WithId``
  option when above 0 (``WithId`` exists since v1.0.0; zrpc's ``Etcd.ID``
  setting passes it since v1.5.1). Since v1.9.0 a publisher also puts its key
  back when it sees it deleted.
- ``zrpc/internal/rpcpubserver.go`` (``NewRpcPubServer``; ``rpcx/server.go`` in
  v1.0.0, ``zrpc/server.go`` in v1.1.0, same rule): the value is the
  server's ``ListenOn`` (``0.0.0.0`` or an empty host replaced by ``POD_IP`` or
  the host's internal IP), and the key its ``Etcd.Key``, e.g. ``orders.rpc``.
- ``core/discov/internal/registry.go`` (``cluster.load``/``watch``) and
  ``core/discov/subscriber.go``: readers get every key under ``<key>/`` and use
  the distinct values as endpoints; ``zrpc/resolver/internal/discovbuilder.go``
  hands each one to gRPC as an address. The key's last segment is never read.

So an entry holds presence and an address: no tags, meta, version, scheme or
health. A value we cannot use as an address (no port, JSON, a URL) is refused,
and so is the unspecified address ``0.0.0.0``/``::`` (:func:`refuse_unspecified`):
go-zero itself never publishes it (since 0452dba, ``figureOutListenOn`` puts
``POD_IP`` or the internal IP in its place; the first releases published
``ListenOn`` as is), and no client can dial it.

Two keys holding one value (two publishers of one ``host:port``) are kept as
two entries, though go-zero's ``container`` lists the value once (its
``values`` map: value -> keys; the value leaves when its last key does): the
keys are distinct publishers with their own leases, and one of them going
must read as ``deleted`` while the other stays. A consequence: our
``Discovery.choose()`` weights such an endpoint twice where go-zero's
round-robin weights it once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any, ClassVar

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance

__all__ = ["GoZeroFormat", "entry_number", "refuse_unspecified", "split_hostport"]

# What a go-zero value may hold as its host outside brackets: a DNS name or an IPv4 address.
_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")
# Every character of host:port or [ipv6%zone]:port; anything else (JSON, a URL) is not one.
_HOSTPORT = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_INT63 = (1 << 63) - 1


def entry_number(instance_id: str) -> int:
    """A positive 63-bit number for ``instance_id``: always the same, unique in practice.

    go-zero's key ends with its lease id. Our process shares one lease among its
    entries and gets a new one after a loss, so that id would neither tell our
    entries apart nor stay put; like go-zero's ``WithId`` we give the key a
    fixed id instead, from a hash of the instance id (a collision needs about
    3e9 instances of one service).
    """
    digest = hashlib.sha256(instance_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") & _INT63 or 1


def _check_host(host: str) -> bool:
    """Whether ``host`` is a name, an IPv4 or an IPv6 address (bare, zone allowed)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOST.match(host))


def refuse_unspecified(address: str, format_name: str) -> None:
    """Raise :class:`ConfigError` naming ``address`` when it is ``0.0.0.0``, ``::`` (any
    spelling): a listening socket's wildcard, which a peer's client cannot dial."""
    try:
        unspecified = ipaddress.ip_address(address.strip("[]").partition("%")[0]).is_unspecified
    except ValueError:
        return
    if unspecified:
        own = (  # what the peer's own servers publish instead
            "go-zero itself replaces 0.0.0.0 by POD_IP or the host's internal IP"
            if format_name == "go-zero"
            else f"{format_name} servers publish their own IP"
        )
        raise ConfigError(
            f"format={format_name} publishes the address clients dial, and {address!r} "
            f"(every interface) is not one: register the instance's own IP or host name "
            f"({own})",
            field="address",
        )


def split_hostport(value: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or ``[ipv6]:port``, as Go's ``net.SplitHostPort``
    reads them; raises :class:`ValueError` saying what is wrong."""
    if not _HOSTPORT.match(value):
        raise ValueError(f"expected host:port (a host name or IP address, a port), got {value!r}")
    if value.startswith("["):
        # Go's net.SplitHostPort takes any host in brackets ("[10.0.0.5]:80" too).
        host, sep, port = value[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(
                f"expected [ipv6]:port (an IPv6 address needs brackets), got {value!r}"
            )
    if not _check_host(host):
        raise ValueError(f"expected a host name or IP address before the port, got {value!r}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port 1-65535 after the host, got {value!r}")
    return host, int(port)


class GoZeroFormat:
    """go-zero's discov/zrpc entries: presence and ``host:port`` only."""

    name: ClassVar[str] = "go-zero"
    default_prefix: ClassVar[str] = ""
    carries_health: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        del options  # no option of its own

    def entry_id(self, instance: ServiceInstance) -> str:
        return str(entry_number(instance.id))

    def encode(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        """``host:port`` (``[ipv6]:port``, like Go's ``net.JoinHostPort``); everything else
        is lost. Raises :class:`ConfigError` for an address go-zero clients cannot dial
        (``0.0.0.0``/``::`` among them)."""
        del status, note  # presence only: the backend refuses a non-passing status
        address = instance.address
        refuse_unspecified(address, self.name)
        if not _check_host(address):
            raise ConfigError(
                "format=go-zero stores host:port, which go-zero clients dial: expected a "
                f"host name, an IPv4 or a bare IPv6 address, got {address!r}",
                field="address",
            )
        host = f"[{address}]" if ":" in address else address
        return f"{host}:{instance.port}".encode()

    def decode(self, service: str, entry_id: str, value: bytes) -> InstanceHealth:
        """The endpoint a go-zero client reads: id from the key, address and port from
        the value; no tags, meta, scheme or version, always passing."""
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"expected an ASCII host:port, got {value[:64]!r}") from None
        host, port = split_hostport(text)
        instance = ServiceInstance.from_registry(
            service=service, id=entry_id, address=host, port=port
        )
        return InstanceHealth(instance, HealthStatus.PASSING)
