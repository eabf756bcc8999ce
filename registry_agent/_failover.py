"""The failover rules every discovery-fed HTTP client applies (httpx sync and async, requests).

Pure: no I/O, no clock, no HTTP library. A client asks the discovery for an instance,
tells :class:`Failover` what came of the attempt (an :class:`Outcome`), and follows the
:class:`Step` it gets back: whether to report the instance to outlier ejection (and how),
and whether to try another instance. When instances run out after a real attempt, the
client raises (or returns) that attempt's own result, never "no instance left".

The rules:

- a connect failure (refused, connect timeout, TLS handshake) is retried on another
  instance while attempts remain, whatever the method: the request was not sent;
- an HTTP status in ``policy.retry_statuses`` and a read timeout (when
  ``policy.retry_read_timeouts``) are retried only for idempotent methods (GET, HEAD,
  OPTIONS, PUT, DELETE, TRACE) whose body can be sent again;
- a connection lost before the answer (reset, closed without a response) is retried
  for idempotent methods with a body that can be sent again: repeating them is safe;
- anything else is the answer (or the error) the caller gets;
- ``report`` is False for a connect failure, a read timeout, a lost connection and
  any 5xx; True for any other answer; None (nothing to report) for an error that says
  nothing about the instance (a pool timeout, a bad request built by the caller).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from registry_agent._errors import ConfigError, RegistryError
from registry_agent._models import ServiceInstance
from registry_agent._policy import DiscoveryPolicy, is_idempotent

__all__ = [
    "ClientClosed",
    "Failover",
    "NoPortLeft",
    "Outcome",
    "Routing",
    "Scope",
    "Step",
    "host_is_candidate",
    "service_host",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_POLICY = DiscoveryPolicy()


class ClientClosed(LookupError):
    """The client was closed while a call chose its next instance: no attempt follows."""


class NoPortLeft(LookupError):
    """The discovery offered an instance without a port again: nothing else is left."""


class Outcome(enum.Enum):
    """What came of one attempt on one instance."""

    #: An HTTP answer (any status; see :meth:`Failover.after` for 5xx).
    ANSWER = "answer"
    #: No connection: refused, unreachable, connect timeout, TLS handshake failure.
    CONNECT = "connect"
    #: Connected and sent, no answer in time.
    READ_TIMEOUT = "read timeout"
    #: The connection broke before the answer arrived (reset, closed without a response).
    LOST = "lost"
    #: A failure that says nothing about the instance (pool timeout, local error).
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after an attempt."""

    #: ``discovery.report(service, instance, ok=report)``; None: report nothing.
    report: bool | None
    #: Try another instance (ask the discovery with :attr:`Failover.exclude`).
    retry: bool


def host_is_candidate(host: str) -> bool:
    """True when a URL host (lower case, no port in the URL) may name a service.

    A single label (no dot), not ``localhost``, not an IP literal: ``orders`` is one,
    ``example.com``, ``localhost``, ``127.0.0.1`` and ``[::1]`` are not.
    """
    if not host or "." in host or ":" in host or host.startswith("["):
        return False
    if host == "localhost":
        return False
    # A dotless all-digit host is an IPv4 literal to most resolvers ("2130706433").
    return not host.isdigit() and not (host.startswith("0x") and _is_hex(host[2:]))


def service_host(host: str) -> str:
    """The name a URL host is looked up as: lower case, an IDNA name in its ASCII form.

    ``Orders`` is ``orders``; ``bücher`` and ``xn--bcher-kva`` are both ``xn--bcher-kva``
    (what requests sends and httpx keeps as the raw host), so both clients look up the
    same name.
    """
    host = host.lower()
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


class Failover:
    """The failover state of one request to ``service``.

    ``retries``: attempts on other instances after the first (None: ``policy.retries``).
    ``replayable``: False when the request body cannot be sent twice (a stream already
    read): then only connect failures are retried.
    """

    def __init__(
        self,
        service: str,
        method: str,
        policy: DiscoveryPolicy,
        *,
        retries: int | None = None,
        replayable: bool = True,
    ) -> None:
        self.service = service
        self.method = method.upper()
        self.policy = policy
        self.retries = policy.retries if retries is None else retries
        self.replayable = replayable
        #: Instances tried or skipped, for ``choose(exclude=...)``.
        self.exclude: tuple[ServiceInstance, ...] = ()
        #: Attempts made (instances without a port are skipped, not attempted).
        self.attempts = 0

    @property
    def idempotent(self) -> bool:
        """True when the method may be sent again on another instance."""
        return is_idempotent(self.method) and self.replayable

    def offer(self, instance: ServiceInstance) -> bool:
        """True when ``instance`` is to be attempted; False when it has no port (another
        tool's entry: skipped, which is no retry; ask again).

        Raises :class:`NoPortLeft` when a portless instance is offered a second time
        despite ``exclude`` (nothing else is left).
        """
        if instance.port:
            return True
        if instance in self.exclude:
            raise NoPortLeft(f"no healthy instance with a port ({instance.id} has none)")
        self.exclude = (*self.exclude, instance)
        return False

    def after(self, instance: ServiceInstance, outcome: Outcome, status: int | None = None) -> Step:
        """Record an attempt on ``instance`` and say what to do next.

        ``status``: the HTTP status of an :attr:`Outcome.ANSWER`.
        """
        self.attempts += 1
        self.exclude = (*self.exclude, instance)
        left = self.attempts <= self.retries
        if outcome is Outcome.ANSWER:
            if status is None:
                raise ValueError("an answer needs its status")
            failed = status >= 500
            retry = left and status in self.policy.retry_statuses and self.idempotent
            return Step(report=not failed, retry=retry)
        if outcome is Outcome.CONNECT:
            return Step(report=False, retry=left)
        if outcome is Outcome.READ_TIMEOUT:
            return Step(
                report=False, retry=left and self.policy.retry_read_timeouts and self.idempotent
            )
        if outcome is Outcome.LOST:
            return Step(report=False, retry=left and self.idempotent)
        return Step(report=None, retry=False)

    def tried(self) -> str:
        """How many instances were tried, in words (``"3 instances of orders tried"``)."""
        noun = "instance" if self.attempts == 1 else "instances"
        return f"{self.attempts} {noun} of {self.service} tried"


class Scope:
    """Which request URLs go through discovery (see the transports' ``services`` and ``others``).

    With ``services``: exactly those host names (any case, no port in the URL) are
    services; every other URL is passed through (``others="pass"``) or refused
    (``"refuse"``). Without: an http/https URL with no port whose host may name a
    service (:func:`host_is_candidate`) is a candidate, to be confirmed by the
    registry (``is_service``) before any watch starts; every other URL is "others".
    """

    def __init__(self, services: Collection[str] | None, others: str) -> None:
        if others not in ("pass", "refuse"):
            raise ConfigError(f"expected 'pass' or 'refuse', got {others!r}", field="others")
        self.others = others
        self.services: dict[str, str] | None = None
        if services is not None:
            if isinstance(services, str | bytes) or not isinstance(services, Collection):
                raise ConfigError(
                    f"expected a collection of service names, e.g. ['orders'], got {services!r}",
                    field="services",
                )
            names: dict[str, str] = {}
            for name in services:
                if not isinstance(name, str) or not name or "/" in name or ":" in name:
                    raise ConfigError(
                        f"expected service names (host names without a port), got {name!r}",
                        field="services",
                    )
                names[service_host(name)] = name
            self.services = names

    def service(self, scheme: str, host: str, port: int | None) -> tuple[str | None, bool]:
        """``(name, confirmed)``: the service a URL names (None: not one; ``confirmed``
        False: a candidate the registry must confirm).

        ``port``: the URL's port, None when it has none. The scheme's default port
        (``http://orders:80/``) counts as none: httpx drops it from the URL before a
        transport sees it, so both clients treat it alike.
        """
        if scheme not in ("http", "https"):
            return None, False
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            return None, False
        host = service_host(host)
        if self.services is not None:
            name = self.services.get(host)
            return name, name is not None
        return (host, False) if host_is_candidate(host) else (None, False)

    def refusal(self, url: str) -> str | None:
        """Why a URL that names no service is refused, or None to pass it through."""
        if self.others == "pass":
            return None
        if self.services is not None:
            listed = ", ".join(sorted(self.services.values())) or "none"
            return (
                f"{url} is not a service URL of this client (services: {listed}; "
                "a service URL is http(s)://NAME/... without a port) and others='refuse'"
            )
        return (
            f"{url} is not a service URL (http(s)://NAME/... with a single-label NAME and "
            "no port) and others='refuse'"
        )

    def unknown(self, host: str) -> str:
        """The error for a single-label host no registry lists."""
        return (
            f"no healthy instance: no registry lists a service named {host!r}, and no watch was "
            f"started for it; a single-label host is looked up as a service (in lower case: "
            f"registry names are case-sensitive, so for a service named 'Billing' pass "
            f"services=['Billing']): pass services=[...] to name the services this client "
            f"calls (others='pass' sends every other host out untouched)"
        )

    def unconfirmed(self, host: str, why: str) -> str:
        """The error for a single-label host when the registry cannot say whether it
        lists it: no watch is started for a name nobody confirmed."""
        return (
            f"cannot tell whether {host!r} is a service: {why}; no watch was started for it; "
            f"pass services=[...] to name the services this client calls (those are not "
            f"checked against the registry)"
        )


class Routing:
    """What every discovery-fed HTTP client holds and decides the same way: the
    discovery, the scoping rule, how to choose and retry, and the names the registry
    confirmed as services (not asked again). The clients only do the I/O."""

    def __init__(
        self,
        discovery: Any,
        services: Collection[str] | None,
        others: str,
        strategy: Any,
        retries: int | None,
        policy: DiscoveryPolicy | None,
    ) -> None:
        self.discovery = discovery
        self.scope = Scope(services, others)
        self.strategy = strategy
        self.retries = retries
        self.policy = policy
        self.known: set[str] = set()
        #: Set by the client's close(): a call still running makes no further attempt
        #: (it would open a connection nobody closes, through a closed pool).
        self.closed = False

    def failover(self, service: str, method: str, *, replayable: bool) -> Failover:
        """The rules for one request: the client's policy, else the discovery's for
        ``service``."""
        policy = self.policy
        if policy is None:
            policy_for = getattr(self.discovery, "policy_for", None)
            policy = policy_for(service) if callable(policy_for) else _NO_POLICY
        assert policy is not None
        return Failover(service, method, policy, retries=self.retries, replayable=replayable)

    def choose_kwargs(self, failover: Failover) -> dict[str, Any]:
        """Keywords for ``discovery.choose(service, strategy, **...)``."""
        kwargs: dict[str, Any] = {"exclude": failover.exclude}
        if self.policy is not None:
            kwargs["policy"] = self.policy
        return kwargs

    def offer(self, failover: Failover, instance: ServiceInstance, client: str) -> bool:
        """:meth:`Failover.offer`, once the client is known open: raises
        :class:`ClientClosed` when ``client`` (its name, for the words) was closed while
        the call chose, so no connection is opened through its closed pools."""
        if self.closed:
            raise ClientClosed(f"the {client} was closed")
        return failover.offer(instance)

    def after(
        self,
        failover: Failover,
        instance: ServiceInstance,
        outcome: Outcome,
        status: int | None = None,
    ) -> Step:
        """:meth:`Failover.after`, told to the discovery's outlier ejection; never a
        retry once the client is closed."""
        step = failover.after(instance, outcome, status)
        report = getattr(self.discovery, "report", None)
        if step.report is not None and callable(report):
            report(failover.service, instance, step.report, policy=failover.policy)
        if step.retry and self.closed:
            return Step(step.report, retry=False)
        return step

    def refusal(self, service: str, answer: bool | RegistryError) -> str | None:
        """``discovery.is_service(service)``'s answer (or its error) turned into the
        reason to fail the request, None when the registry confirmed the name."""
        if isinstance(answer, RegistryError):
            return f"{service}: " + self.scope.unconfirmed(
                service, f"the registry did not answer ({answer})"
            )
        if not answer:
            return f"{service}: {self.scope.unknown(service)}"
        self.known.add(service)
        return None
