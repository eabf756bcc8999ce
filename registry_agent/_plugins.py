"""Finding plugins: backends (``registry_agent.backends``, ``open_backend``) and check kinds.

A check kind is a :class:`~registry_agent.HealthCheck` subclass with a ``kind`` and a
``from_table``: the shipped ones are in ``CHECK_KINDS``, others come from the
``registry_agent.checks`` entry-point group (name: the kind's key in a check table).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from registry_agent._backend import Backend
from registry_agent._env import carried_options
from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._health.base import HealthCheck
from registry_agent._health.checks import CHECK_KINDS
from registry_agent._urls import parse_backend_url

__all__ = [
    "CHECK_ENTRY_POINT_GROUP",
    "ENTRY_POINT_GROUP",
    "available_backends",
    "backend_class",
    "check_class",
    "check_kinds",
    "open_backend",
]

ENTRY_POINT_GROUP = "registry_agent.backends"
CHECK_ENTRY_POINT_GROUP = "registry_agent.checks"

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
    both is an error); each backend documents its own. A URL from
    :func:`backends_from_env` also brings the secrets it carries. Nothing is
    connected until first use.
    """
    parsed = parse_backend_url(url, default_port=0)
    cls = backend_class(parsed.scheme)
    overlap = set(parsed.query) & set(options)
    if overlap:
        raise ConfigError(
            f"option(s) {', '.join(sorted(overlap))} given both in the URL and as keywords",
            field="backend",
        )
    # A URL read from the environment carries its secrets beside its text; a keyword wins.
    return cls.from_url(url, {**carried_options(url), **parsed.query, **options})


def check_kinds() -> list[str]:
    """The keys that name a kind of check in a config table, shipped kinds first."""
    extra = sorted(
        {ep.name for ep in entry_points(group=CHECK_ENTRY_POINT_GROUP)} - set(CHECK_KINDS)
    )
    return [*CHECK_KINDS, *extra]


def check_class(kind: str) -> type[HealthCheck]:
    """The check class of ``kind``; a :class:`ConfigError` when none is, or it is broken."""
    if kind in CHECK_KINDS:
        return CHECK_KINDS[kind]
    for ep in entry_points(group=CHECK_ENTRY_POINT_GROUP, name=kind):
        try:
            cls = ep.load()
        except Exception as exc:  # a plugin that fails to import is a setup problem to name
            raise ConfigError(f"the {kind} check kind ({ep.value}) failed to load: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, HealthCheck)):
            raise ConfigError(f"the {kind} check kind ({ep.value}) is not a HealthCheck class")
        if cls.kind != kind:
            raise ConfigError(f"the {kind} check kind ({ep.value}) says its kind is {cls.kind!r}")
        return cls
    raise ConfigError(f"no check kind {kind!r}; known kinds: {', '.join(check_kinds())}")
