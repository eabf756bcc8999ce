"""The backends a registrar or a watcher is given: what a list of them may hold, and
which registry each one writes to (two backends of one registrar must not share one).

A backend may say what decides whether two backend objects write the same
entries with a read-only ``registry_identity`` property (a hashable tuple, e.g.
``("etcd", ("127.0.0.1:2379",), "/services/")``). Two lanes writing one entry
would overwrite each other forever (lease lost, registered again, every few
seconds), so a registrar or the agent refuses them. A backend without the
property (a third-party one) is compared as before: by its URL or its object.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Hashable
from typing import Any

from registry_agent._backend import Backend
from registry_agent._env import backends_from_env
from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._plugins import open_backend
from registry_agent._registration import scrub_credentials

__all__ = [
    "describe_identity",
    "identity_of",
    "listed_backends",
    "open_listed",
    "registry_address",
]


_IPV4_SHORTHAND = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")


def registry_address(host: str, port: int) -> str:
    """``host:port`` as a registry identity holds it, without DNS: the host lower-cased
    (no trailing dot), an IP address in its canonical form, and ``localhost`` as
    127.0.0.1 (the loopback a client reaches by that name; name ``[::1]`` to mean IPv6)."""
    name = host.lower().rstrip(".")
    if name == "localhost":
        name = "127.0.0.1"
    with contextlib.suppress(ValueError):  # a name, not an address
        address = ipaddress.ip_address(name)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        name = address.compressed
    if _IPV4_SHORTHAND.match(name):
        # The shorthands a resolver takes for IPv4 (127.1, 0x7f000001, 2130706433).
        with contextlib.suppress(OSError):
            name = socket.inet_ntoa(socket.inet_aton(name))
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def identity_of(backend: Any, fallback: Hashable) -> tuple[Hashable, bool]:
    """``(identity, said)``: the backend's ``registry_identity`` (``said`` True), or
    ``fallback`` (how the caller compared before: a URL, an object) when it has none."""
    identity = getattr(backend, "registry_identity", None)
    if identity is None:
        return fallback, False
    try:
        hash(identity)
    except TypeError:
        return fallback, False
    return identity, True


def describe_identity(identity: Hashable) -> str:
    """A ``registry_identity`` as a short text: ``etcd 127.0.0.1:2379 /services/``."""
    if isinstance(identity, tuple):
        return " ".join(_part(part) for part in identity)
    return _part(identity)


def _part(part: object) -> str:
    if isinstance(part, tuple | frozenset):
        return ",".join(sorted(str(item) for item in part))
    if part == "":
        return '""'
    return str(part)


def listed_backends(backend: object) -> list[Any]:
    """``backend`` as a list: one URL (``str``) or :class:`Backend`, or the items of a
    non-empty list or tuple of them; ``None``: the URLs the environment names
    (:func:`backends_from_env`). Anything else (a number, bytes, a dict, a set, a
    generator, a nested list) is a :class:`ConfigError` naming ``backend`` or
    ``backend[i]``, saying what was expected and what was given."""
    if backend is None:
        return list(backends_from_env())
    if isinstance(backend, list | tuple):
        given = list(backend)
        if not given:
            empty = f"an empty {type(backend).__name__}"
            raise ConfigError(f"{_EXPECTED}, got {empty}", field="backend")
        for i, item in enumerate(given):
            _check_item(item, f"backend[{i}]", nested=True)
        return given
    _check_item(backend, "backend", nested=False)
    return [backend]


_EXPECTED = "expected a backend URL (str) or Backend object, or a non-empty list of them"


def _check_item(item: object, where: str, *, nested: bool) -> None:
    if isinstance(item, str) or (isinstance(item, Backend) and not isinstance(item, type)):
        return
    expected = "expected a backend URL (str) or Backend object" if nested else _EXPECTED
    hint = ""
    if isinstance(item, bytes | bytearray):
        hint = " (decode the URL to str)"
    elif isinstance(item, list | tuple) and nested:
        hint = " (a list inside the list: give one flat list)"
    raise ConfigError(f"{expected}, got {_shown(item)}{hint}", field=where)


def _shown(item: object) -> str:
    """What was given, for an error: its type and a short repr (credentials masked)."""
    if item is None:
        return "None"
    if isinstance(item, type):
        return f"the class {item.__name__} (give an instance)"
    text = scrub_credentials(repr(item))
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(item).__name__} {text}"


def open_listed(url: str, where: str | None) -> Backend:
    """Open ``url`` (not connecting). ``where`` (``backend[1]``, one of several) names
    it in errors, keeping the option the backend named: ``backend[1]: format: …``."""
    try:
        return open_backend(url)
    except ConfigError as exc:
        if where is None:
            raise
        option = (exc.field or "").removeprefix("backend").removeprefix(".")
        raise ConfigError(
            f"{option}: {exc.reason}" if option else exc.reason, field=where
        ) from None
    except BackendNotFound as exc:
        if where is None:
            raise
        raise BackendNotFound(f"{where}: {exc.message}", backend=exc.backend) from None
