"""The Django app config of ``registry_agent.integrations.django`` (see that package)."""

from __future__ import annotations

from django.apps import AppConfig

from registry_agent.integrations.django import _arm


class RegistryAgentConfig(AppConfig):  # type: ignore[misc]  # django ships no types
    """Reads ``settings.REGISTRY_AGENT`` at startup; arms registration for ``runserver``."""

    name = "registry_agent.integrations.django"
    label = "registry_agent"
    verbose_name = "registry-agent"
    default = True

    def ready(self) -> None:
        """Check the settings (a ConfigError names the key); arm ``runserver``'s server."""
        _arm()
