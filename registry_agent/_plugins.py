"""Finding backends: the ``registry_agent.backends`` entry-point group and ``open_backend``."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from registry_agent._backend import Backend
from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._urls import parse_backend_url

__all__ = ["ENTRY_POINT_GROUP", "available_backends", "backend_class", "open_backend"]

ENTRY_POINT_GROUP = "registry_agent.backends"

# Backends shipped in this distribution: found even when the package metadata
# is missing (running from a source tree), and named in install hints.
_BUILTIN = {
    "memory": ("registry_agent.testing.memory:MemoryBackend", None),
    "consul": ("registry_agent_consul:ConsulBackend", "consul"),
    "etcd": ("registry_agent_etcd:EtcdBackend", "etcd"),
}


def _targets() -> dict[str, str]:
    found = {name: target for name, (target, _) in _BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def available_backends() -> list[str]:
    """URL schemes with a registered backend (installed or not)."""
    return sorted(_targets())


def backend_class(scheme: str) -> type[Backend]:
    """The backend class registered for ``scheme``.

    Raises :class:`BackendNotFound` with the list of schemes when none is, and
    with the ``pip install`` hint when its optional dependency is missing.
    """
    targets = _targets()
    if scheme not in targets:
        raise BackendNotFound(
            f"no backend for scheme {scheme!r}; installed backends: {', '.join(sorted(targets))}",
            backend=scheme,
        )
    module_name, _, attr = targets[scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _BUILTIN.get(scheme, (None, None))[1]
        hint = (
            f"pip install 'registry-agent[{extra}]'"
            if extra
            else f"install the package that provides {module_name}"
        )
        raise BackendNotFound(
            f"the {scheme} backend needs a package that is not installed "
            f"({exc.name or exc}): {hint}",
            backend=scheme,
        ) from None
    cls: type[Backend] = getattr(module, attr)
    return cls


def open_backend(url: str, **options: Any) -> Backend:
    """Open a backend from a URL: ``consul://host:port``, ``etcd://host:port``, ``memory://``.

    Options come from the URL's query string and from keywords (one name in
    both is an error); each backend documents its own. Nothing is connected until first use.
    """
    parsed = parse_backend_url(url, default_port=0)
    cls = backend_class(parsed.scheme)
    overlap = set(parsed.query) & set(options)
    if overlap:
        raise ConfigError(
            f"option(s) {', '.join(sorted(overlap))} given both in the URL and as keywords",
            field="backend",
        )
    return cls.from_url(url, {**parsed.query, **options})
