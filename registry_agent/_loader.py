"""The agent's file for apps: ``load_registrars`` turns an agent.toml into registrars.

The file is read by the agent's own loader (``_agent.config.load_config``): the
same tables, the same checks, the same errors naming the file and the field,
the same ``REGISTRY_AGENT_*`` overrides. Each service is validated as the agent
validates it before it starts (what a backend refuses is an error naming
``service[i]``), and becomes a registrar with the service's options and checks
on every ``[backend]``/``[[backend]]`` table; with neither table, on the
backends the environment names (:func:`~registry_agent.backends_from_env`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from registry_agent._blocking import Registrar
from registry_agent._env import EnvBackendURL
from registry_agent._health.checks import CheckResult, HealthCheck
from registry_agent._registrar import AsyncRegistrar, RegistrarEvent

if TYPE_CHECKING:
    from registry_agent._agent.config import AgentConfig

__all__ = ["load_registrars"]


@overload
def load_registrars(
    path: str | os.PathLike[str],
    *,
    blocking: Literal[False] = False,
    env: Mapping[str, str] | None = None,
    on_event: Callable[[RegistrarEvent], None] | None = None,
    on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
    install_signal_handlers: bool = False,
) -> list[AsyncRegistrar]: ...


@overload
def load_registrars(
    path: str | os.PathLike[str],
    *,
    blocking: Literal[True],
    env: Mapping[str, str] | None = None,
    on_event: Callable[[RegistrarEvent], None] | None = None,
    on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
    install_signal_handlers: bool = False,
) -> list[Registrar]: ...


def load_registrars(
    path: str | os.PathLike[str],
    *,
    blocking: bool = False,
    env: Mapping[str, str] | None = None,
    on_event: Callable[[RegistrarEvent], None] | None = None,
    on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
    install_signal_handlers: bool = False,
) -> list[AsyncRegistrar] | list[Registrar]:
    """One registrar per ``[[service]]`` of the agent.toml at ``path``, not started.

    ``blocking=False``: :class:`AsyncRegistrar` objects (start them on your event
    loop); ``True``: :class:`~registry_agent.Registrar` objects (each on its own
    loop thread). ``env`` (default ``os.environ``): the variables read, as the
    agent reads them: ``REGISTRY_AGENT_*`` overrides, and the backends when the
    file has no ``[backend]`` table. ``on_event``, ``on_check`` and
    ``install_signal_handlers`` are given to every registrar.

    Each registrar has the service's instance, registration options and checks,
    on every backend of the file (registered in each, healed on its own); it owns
    its backends (opened from the file's tables, closed by its ``stop()``), so the
    services of one file do not share one liveness as in the agent. ``[status]``
    and ``[log]`` are the agent's: read and checked, not used here.

    Raises :class:`~registry_agent.ConfigError` naming the file and the field
    (``orders.toml: service[0].port: …``) or the variable (``environment:
    CONSUL_HTTP_ADDR: …``), as ``registry-agent check`` does.
    """
    # The agent's modules, imported when used: `import registry_agent` stays light.
    from registry_agent._agent.config import load_config

    config = load_config(path, env=env, backend_from_env=True)
    _validate(config)
    made: list[Any] = []
    for service in config.services:
        kwargs: dict[str, Any] = {
            "options": service.options,
            "checks": [check.build() for check in service.checks],
            "on_event": on_event,
            "on_check": on_check,
            "install_signal_handlers": install_signal_handlers,
        }
        backends = _backend_urls(config)
        cls: type[AsyncRegistrar] | type[Registrar] = Registrar if blocking else AsyncRegistrar
        made.append(cls(backends, service.instance, **kwargs))
    return made


def _backend_urls(config: AgentConfig) -> list[str]:
    """The file's backends as URLs the registrar opens and owns, each with its table's
    options beside it (never in the URL's text)."""
    return [EnvBackendURL(backend.url, backend.options()) for backend in config.backends]


def _validate(config: AgentConfig) -> None:
    """What the agent refuses before it starts (``validate_services``), refused here.

    No I/O; run on a loop of its own in a worker thread, so that it works whether
    or not the caller runs an event loop."""

    from registry_agent._agent.runtime import (
        close_backends,
        open_configured_backends,
        validate_services,
    )

    async def check() -> None:
        backends = open_configured_backends(config)
        try:
            await validate_services(config, backends)
        finally:
            await close_backends(backends)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry-agent-load") as pool:
        pool.submit(asyncio.run, check()).result()
