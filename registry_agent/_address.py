"""The address an instance advertises: chosen on purpose, never a silent host name.

:func:`advertised_address` picks one of this host's addresses:

- by default, the address the kernel uses on the **default route**: IPv4 first,
  IPv6 when there is only an IPv6 default route. Found without sending a packet:
  the default route is read from the kernel's table (``/proc/net/route``,
  ``/proc/net/ipv6_route`` on Linux), then a UDP socket is ``connect()``-ed to a
  documentation address (RFC 5737 / RFC 3849) that no other route covers and
  ``getsockname()`` says which source address the kernel picked. A UDP
  ``connect()`` only looks the route up; nothing goes on the wire. That source
  is the kernel's choice even when it belongs to another interface than the
  route's (Linux takes one from any interface when the route's has none).
  When the main table has no default route, the same lookup still runs: a
  default in another table chosen by a policy rule (``ip rule``) or a split
  default (``0.0.0.0/1`` + ``128.0.0.0/1``, as VPNs install it) answers it, and
  its source is taken when it is routable. Loopback, unspecified and link-local
  addresses are never a default;
- ``network="10.0.0.0/8"`` (IPv4 or IPv6 CIDR): the first address of this host
  inside it (routable ones before loopback and link-local ones);
- ``interface="eth1"``: that interface's first routable address (IPv4 first),
  else its loopback one, else its IPv4 link-local one (``169.254.x.x``; an IPv6
  link-local address, useless without its zone, never); with ``network`` too,
  its first address inside the network;
- ``env="POD_IP"`` or ``env=("POD_IP", "HOST_IP")``: the first of these
  environment variables that is set (an IP address; a comma-separated list such
  as Kubernetes' ``POD_IPS`` gives its first; an IPv4-mapped IPv6 address
  ``::ffff:10.0.0.1`` gives the IPv4 one; unspecified, multicast, broadcast and
  IPv6 link-local addresses are refused).

Listing the interfaces' addresses (for ``network`` and ``interface``) uses
:func:`psutil.net_if_addrs`; the default route needs only the standard library.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from registry_agent._errors import ConfigError
from registry_agent._urls import Table, as_str

__all__ = ["advertised_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Interface name -> its addresses, in the host's order.
Interfaces = Mapping[str, Sequence[str]]

#: Documentation addresses a UDP socket is connect()-ed to, to learn the source
#: address of the default route; the first one no other route covers is used.
_PROBES_V4 = ("192.0.2.1", "198.51.100.1", "203.0.113.1")
_PROBES_V6 = ("2001:db8::1", "3fff::1", "2001:db8:ffff::1")
#: Linux's route tables (main table) by IP version.
_ROUTE_TABLES = {4: Path("/proc/net/route"), 6: Path("/proc/net/ipv6_route")}
_RTF_UP = 0x0001
#: Routes this wide (shorter prefixes) are parts of a split default, as VPNs install
#: them (0.0.0.0/1 and 128.0.0.0/1; ::/3 and 2000::/4): not a network of their own.
_WIDE_PREFIX = 8
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_RTF_REJECT = 0x0200

_HOW = (
    "choose the address to advertise: give it (address=), or pick one of this host's "
    'addresses by network (network="10.0.0.0/8"), by interface (interface="eth1") or from '
    'an environment variable (env="POD_IP")'
)


@dataclass(frozen=True)
class Route:
    """One family's default route as the kernel answers it.

    ``interface`` is where it leaves (empty when the platform does not say) and
    ``source`` the address the kernel sends from on it (empty when unknown: then
    the interface's first address is taken).
    """

    interface: str = ""
    source: str = ""


@dataclass(frozen=True)
class Routes:
    """Given default routes of both families (``None``: no such route), answering as
    :func:`default_route` does: ``routes(4)``, ``routes(6)``."""

    v4: Route | None = None
    v6: Route | None = None

    def __call__(self, version: int) -> Route | None:
        return self.v4 if version == 4 else self.v6


def advertised_address(
    *,
    network: str | None = None,
    interface: str | None = None,
    env: str | Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The address of this host to advertise, as a string.

    With no argument, the address of the default route (IPv4 first, IPv6 when
    only IPv6 has one), found without sending a packet. ``network`` (a CIDR
    such as ``"10.0.0.0/8"`` or ``"fd00::/8"``) takes the first address of this
    host inside it; ``interface`` (``"eth1"``) that interface's first routable
    address (IPv4 first; its IPv4 link-local one only when it has nothing
    else); both together, that interface's first address inside the network.
    ``env`` names an environment variable (or several, tried in order) holding
    the address, as container platforms set them (Kubernetes' downward API:
    ``POD_IP``, ``HOST_IP``); ``environ`` replaces :data:`os.environ`.

    Raises :class:`ConfigError` naming ``network``, ``interface`` or ``env`` when
    the choice finds nothing (the message lists this host's addresses), and
    naming ``address`` when nothing was chosen and there is no default route,
    saying how to choose. The host name is never used.
    """
    return choose_address(
        network=network,
        interface=interface,
        env=env,
        environ=os.environ if environ is None else environ,
        interfaces=host_interfaces,
        routes=default_route,
    )


def choose_address(
    *,
    network: str | None,
    interface: str | None,
    env: str | Sequence[str] | None,
    environ: Mapping[str, str],
    interfaces: Callable[[], Interfaces],
    routes: Callable[[int], Route | None],
) -> str:
    """:func:`advertised_address` on given facts: ``interfaces()`` lists the host's
    addresses and ``routes(4)`` / ``routes(6)`` answer its default route of that IP
    version (each called only when needed: no IPv6 lookup when IPv4 has an answer)."""
    if env is not None:
        if network is not None or interface is not None:
            raise ConfigError(
                "give env alone: the variable's value is the address "
                "(network and interface choose among this host's own)",
                field="env",
            )
        return _from_env(env, environ)
    if network is not None or interface is not None:
        wanted = _network(network) if network is not None else None
        if interface is not None and (not isinstance(interface, str) or not interface):
            raise ConfigError(
                f"expected an interface name such as eth1, got {interface!r}", field="interface"
            )
        return _from_interfaces(interfaces(), wanted, interface)
    return _from_routes(routes, interfaces)


#: The agent's [[service]] keys for advertised_address's parameters.
AGENT_KEYS = {"network": "address_network", "interface": "address_interface", "env": "address_env"}
_HOW_AGENT = (
    'choose the address to advertise: set address = "10.0.0.5", or pick one of this '
    'host\'s addresses by address_network = "10.0.0.0/8", address_interface = "eth1" or '
    'address_env = "POD_IP"'
)


def address_from_table(table: Table, environ: Mapping[str, str]) -> str:
    """The address of an agent ``[[service]]`` table: ``address`` as given, else the one
    ``address_network`` / ``address_interface`` / ``address_env`` choose (the keys of
    :func:`advertised_address`'s parameters), else the default route's. Errors name
    the key (``service[0].address_network``) and the file."""
    for key in sorted(table.table):
        # A misspelt choice must not fall back to the default route silently.
        if key.startswith("address") and key != "address" and key not in AGENT_KEYS.values():
            raise table.error(
                key, f"unknown key; expected address or {', '.join(AGENT_KEYS.values())}"
            )
    address: str = table.get("address", as_str, "")
    network: str | None = table.get(AGENT_KEYS["network"], as_str)
    interface: str | None = table.get(AGENT_KEYS["interface"], as_str)
    env: str | tuple[str, ...] | None = table.get(AGENT_KEYS["env"], _as_names)
    if address:
        for parameter, value in (("network", network), ("interface", interface), ("env", env)):
            if value is not None:
                key = AGENT_KEYS[parameter]
                raise table.error(key, f"give address or {key}, not both")
        return address
    try:
        return advertised_address(network=network, interface=interface, env=env, environ=environ)
    except ConfigError as exc:
        key = AGENT_KEYS.get(exc.field or "", "address")
        raise table.error(key, exc.reason.replace(_HOW, _HOW_AGENT)) from None


def _as_names(value: object, field: str) -> str | tuple[str, ...]:
    """An environment variable's name, or a list of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(
        f'expected a variable name such as "POD_IP" or a list of them, got {value!r}',
        field=field,
    )


def _network(value: object) -> IPNetwork:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return ipaddress.ip_network(value.strip(), strict=False)
    raise ConfigError(
        f'expected a network in CIDR form such as "10.0.0.0/8" or "fd00::/8", got {value!r}',
        field="network",
    )


def _ip(text: str) -> IPAddress | None:
    """``text`` as an address (an IPv6 zone ``%eth0`` dropped), or None."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _routable(address: IPAddress) -> bool:
    """Whether ``address`` can be a default: not loopback, unspecified, link-local, multicast."""
    return not (
        address.is_loopback
        or address.is_unspecified
        or address.is_link_local
        or address.is_multicast
    )


def _from_env(env: str | Sequence[str], environ: Mapping[str, str]) -> str:
    names = [env] if isinstance(env, str) else list(env)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(
            f'expected an environment variable name such as "POD_IP" (or a list), got {env!r}',
            field="env",
        )
    for name in names:
        value = environ.get(name, "").strip()
        if not value:
            continue
        first = value.split(",", 1)[0].strip()
        address = _ip(first)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        why = "not an IP address" if address is None else _not_advertisable(address, first)
        if why:
            raise ConfigError(
                f"{name}={value!r} is not an address to advertise ({why}): expected an IP "
                "address such as 10.1.2.3 or fd00::5",
                field="env",
            )
        return str(address)
    raise ConfigError(
        f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} not set "
        "(on Kubernetes, set it from the downward API, e.g. fieldRef: status.podIP)",
        field="env",
    )


def _not_advertisable(address: IPAddress, text: str) -> str:
    """Why ``address`` (written ``text``) cannot be given to others to reach this
    instance, or empty when it can."""
    if "%" in text:
        return "an address with a zone is only meaningful on this host"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address == _BROADCAST:
        return "broadcast"
    if address.version == 6 and address.is_link_local:
        return "IPv6 link-local, of no use without its zone"
    return ""


def _from_interfaces(found: Interfaces, network: IPNetwork | None, interface: str | None) -> str:
    if interface is not None and interface not in found:
        raise ConfigError(
            f"this host has no interface {interface!r}; it has {_describe(found)}",
            field="interface",
        )
    names = [interface] if interface is not None else list(found)
    candidates: list[IPAddress] = []
    for name in names:
        addresses = [a for a in (_ip(text) for text in found[name]) if a is not None]
        # An interface's IPv4 addresses come first (its order within a family kept).
        candidates += sorted(addresses, key=lambda a: a.version)
    if network is not None:
        candidates = [a for a in candidates if a.version == network.version and a in network]
    else:
        # An IPv6 link-local address is of no use without its zone (%eth0).
        candidates = [a for a in candidates if not (a.is_link_local and a.version == 6)]
    # Routable addresses first, then loopback, then link-local (169.254.x.x, which
    # an interface may carry beside its real address): the host's order otherwise.
    candidates.sort(key=lambda a: 2 if a.is_link_local else 1 if a.is_loopback else 0)
    if candidates:
        return str(candidates[0])
    where = f"on {interface} " if interface is not None else ""
    inside = f"inside {network} " if network is not None else ""
    raise ConfigError(
        f"this host has no address {where}{inside}(it has {_describe(found)})",
        field="network" if network is not None else "interface",
    )


def _from_routes(
    routes: Callable[[int], Route | None], interfaces: Callable[[], Interfaces]
) -> str:
    found = False
    for family in (4, 6):
        route = routes(family)
        if route is None:
            continue
        found = True
        source = _ip(route.source) if route.source else None
        if source is not None and source.version == family and _routable(source):
            return str(source)
        if route.interface or source is not None:
            with contextlib.suppress(OSError, ImportError):
                found_interfaces = interfaces()
                # No interface said (the route was found by the lookup alone): the
                # one holding the kernel's source address, e.g. 169.254.1.1 beside
                # the interface's routable 192.168.7.7.
                name = route.interface or _holder(source, found_interfaces)
                for text in found_interfaces.get(name, ()):
                    address = _ip(text)
                    if address is not None and address.version == family and _routable(address):
                        return str(address)
    if not found:
        what = "this host has no default route to take the address from"
    else:
        what = "this host's default route has no address to advertise (only loopback or link-local)"
    try:
        listed = f" (it has {_describe(interfaces())})"
    except (OSError, ImportError):
        listed = ""
    raise ConfigError(f"{what}{listed}; {_HOW}", field="address")


def _holder(address: IPAddress | None, found: Interfaces) -> str:
    """The interface that has ``address``, or empty."""
    for name, addresses in found.items():
        if any(_ip(text) == address for text in addresses):
            return name
    return ""


def _describe(found: Interfaces) -> str:
    parts = [
        f"{name} {', '.join(a.split('%', 1)[0] for a in addresses)}"
        for name, addresses in found.items()
        if addresses
    ]
    return "; ".join(parts) or "no addresses"


# -- facts from the running host ----------------------------------------------------------


def host_interfaces() -> Interfaces:
    """This host's interfaces and their IP addresses, by interface index (psutil)."""
    import psutil  # only network/interface choices need it

    families = (socket.AF_INET, socket.AF_INET6)
    listed = {
        name: [entry.address for entry in entries if entry.family in families]
        for name, entries in psutil.net_if_addrs().items()
    }

    def index(name: str) -> int:
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return 1 << 30

    return {name: listed[name] for name in sorted(listed, key=index)}


def default_route(family: int) -> Route | None:
    """This host's default route of IP version ``family`` (4 or 6) with the source
    address the kernel would use on it, or None.

    Without a default route in the main table, the route the kernel still finds
    towards a documentation address (a default in a policy-routing table, a split
    default) answers, with its source and no interface."""
    table = _ROUTE_TABLES.get(family, Path("/nonexistent"))
    probes = _PROBES_V4 if family == 4 else _PROBES_V6
    try:
        text = table.read_text()
    except OSError:
        # No Linux route table (macOS, BSD, Windows): ask the kernel for the route to
        # the first documentation address; it has none when there is no default route.
        source = _source_towards(probes[0])
        return Route(source=source) if source else None
    parse = parse_route_v4 if family == 4 else parse_route_v6
    defaults, others = parse(text)
    # A probe covered by a network's own route would answer that network's address;
    # the wide halves of a split default do not count (they are the default).
    networks = [net for net in others if net.prefixlen >= _WIDE_PREFIX]
    probe = next((p for p in probes if not _covered(p, networks)), None)
    source = _source_towards(probe) if probe else ""
    if defaults:
        return Route(interface=defaults[0], source=source)
    # No default in the main table, yet the kernel may route everywhere: a default
    # in another table chosen by a policy rule (ip rule), or a split default
    # (0.0.0.0/1 + 128.0.0.0/1). The route lookup towards the probe found it.
    return Route(source=source) if source else None


def _covered(probe: str, networks: Iterable[IPNetwork]) -> bool:
    address = ipaddress.ip_address(probe)
    return any(address.version == net.version and address in net for net in networks)


def _source_towards(target: str) -> str:
    """The source address the kernel picks for ``target``: a UDP socket's ``connect()``
    only looks up the route, it sends nothing. Empty when there is no route."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            return str(sock.getsockname()[0]).split("%", 1)[0]
    except OSError:
        return ""


def parse_route_v4(text: str) -> tuple[list[str], list[IPNetwork]]:
    """``/proc/net/route``: the default routes' interfaces (lowest metric first) and
    every other route's network."""
    defaults: list[tuple[int, str]] = []
    others: list[IPNetwork] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination = _hex_v4(fields[1])
            flags, metric = int(fields[3], 16), int(fields[6])
            mask = _hex_v4(fields[7])
        except ValueError:
            continue
        if not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        if mask == "0.0.0.0" and destination == "0.0.0.0":
            # "*": no device, a blackhole route (sends nowhere, yet no reject flag).
            if fields[0] not in ("lo", "*"):
                defaults.append((metric, fields[0]))
            continue
        with contextlib.suppress(ValueError):
            others.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    return [name for _, name in sorted(defaults, key=lambda d: d[0])], others


def _hex_v4(text: str) -> str:
    # The kernel prints the address as a host-order integer: native byte order restores it.
    return socket.inet_ntoa(struct.pack("=I", int(text, 16)))


def parse_route_v6(text: str) -> tuple[list[str], list[IPNetwork]]:
    """``/proc/net/ipv6_route``: the default routes' interfaces (lowest metric first)
    and every other route's network (unreachable routes left out)."""
    defaults: list[tuple[int, str]] = []
    others: list[IPNetwork] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or len(fields[0]) != 32:
            continue
        try:
            destination = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            length, metric, flags = int(fields[1], 16), int(fields[5], 16), int(fields[8], 16)
        except ValueError:
            continue
        if not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        if length == 0:
            if fields[9] != "lo":
                defaults.append((metric, fields[9]))
            continue
        with contextlib.suppress(ValueError):
            others.append(ipaddress.IPv6Network(f"{destination}/{length}", strict=False))
    return [name for _, name in sorted(defaults, key=lambda d: d[0])], others
