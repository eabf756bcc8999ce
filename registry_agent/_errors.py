"""The exception tree of registry-agent.

::

    RegistryError                  every error raised by this package
    ├── ConfigError                bad input from the user: a field, a URL, a file
    ├── BackendNotFound            no backend for a URL scheme, or its extra is missing
    ├── NoInstanceAvailable        discovery found no (healthy) instance to choose
    └── BackendError               a backend call failed
        ├── BackendUnavailable     the registry could not be reached: retry
        │   └── Throttled          it answered 429/503: retry after ``retry_after``
        ├── LeaseLost              our lease/check is gone: register again
        ├── RevisionCompacted      a watch cannot resume from its revision: re-list
        └── Rejected               the registry refused the request: do not retry as is

Every error carries the ``service``, ``instance`` and ``backend`` it concerns
when they are known, so a log line or a test can name them.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "ConfigError",
    "LeaseLost",
    "NoInstanceAvailable",
    "RegistryError",
    "Rejected",
    "RevisionCompacted",
    "Throttled",
]


class RegistryError(Exception):
    """Base class of every error raised by registry-agent."""

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        instance: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.service = service
        self.instance = instance
        self.backend = backend

    def __str__(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (
                ("backend", self.backend),
                ("service", self.service),
                ("instance", self.instance),
            )
            if value
        ]
        return f"{self.message} ({', '.join(where)})" if where else self.message


class ConfigError(RegistryError, ValueError):
    """Invalid user input; ``field`` names what is wrong, ``source`` where it came from."""

    def __init__(
        self, message: str, *, field: str | None = None, source: str | None = None
    ) -> None:
        prefix = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        #: What is wrong, without the source and field prefix.
        self.reason = message
        self.field = field
        self.source = source


class BackendNotFound(RegistryError):
    """No backend is registered for a URL scheme, or its optional dependency is missing."""


class NoInstanceAvailable(RegistryError, LookupError):
    """Discovery has no (healthy) instance of the service to offer."""


class BackendError(RegistryError):
    """A call to the registry failed."""


class BackendUnavailable(BackendError):
    """The registry could not be reached or did not answer in time. Safe to retry."""


class Throttled(BackendUnavailable):
    """The registry is shedding load (HTTP 429/503, gRPC RESOURCE_EXHAUSTED): retry later.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **context: str | None):
        super().__init__(message, **context)
        self.retry_after = retry_after


class LeaseLost(BackendError):
    """Our lease (etcd) or TTL check (Consul) no longer exists: register again."""


class RevisionCompacted(BackendError):
    """A change stream cannot resume from the requested revision: list again and diff."""

    def __init__(self, message: str, *, compacted_revision: int, **context: str | None) -> None:
        super().__init__(message, **context)
        self.compacted_revision = compacted_revision


class Rejected(BackendError):
    """The registry refused the request (permission, validation).

    Retrying the same request unchanged won't help.
    """
