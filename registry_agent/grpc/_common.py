"""What the sync and the ``grpc.aio`` discovery channels share: targets, options, rules."""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from registry_agent._errors import ConfigError, NoInstanceAvailable
from registry_agent._models import ServiceInstance
from registry_agent._policy import DiscoveryPolicy

__all__ = [
    "Attempts",
    "Callables",
    "Endpoint",
    "Pool",
    "channel_options",
    "is_idempotent_rule",
    "never_sent",
    "note_tried",
    "retriable",
    "target_of",
]

C = TypeVar("C")

#: How often (at most) the channel compares its per-endpoint channels with the
#: healthy instances discovery holds, closing those of instances gone or unhealthy.
PRUNE_EVERY = 0.5

Options = Sequence[tuple[str, Any]]


def target_of(address: str, port: int) -> str:
    """The gRPC target for one endpoint: ``ipv4:a.b.c.d:p``, ``ipv6:[::1]:p``, or
    ``dns:///host:p`` for an address that is a host name."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return f"dns:///{address}:{port}"
    if ip.version == 6:
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{ip}:{port}"


def channel_options(options: Options, server_name: str, tls: bool) -> list[tuple[str, Any]]:
    """The caller's options plus the authority (and, over TLS, the name the
    certificate is checked against): ``server_name``, and a subchannel pool of the
    channel's own, unless the caller set them."""
    given = {name for name, _ in options}
    merged = list(options)
    if "grpc.use_local_subchannel_pool" not in given:
        # A channel made anew for an endpoint that came back must connect at once, not
        # inherit the reconnect backoff of the process-wide subchannel pool.
        merged.append(("grpc.use_local_subchannel_pool", 1))
    if "grpc.default_authority" not in given:
        merged.append(("grpc.default_authority", server_name))
    if tls and "grpc.ssl_target_name_override" not in given:
        merged.append(("grpc.ssl_target_name_override", server_name))
    return merged


def is_idempotent_rule(idempotent: bool | Collection[str]) -> Callable[[str], bool]:
    """``idempotent=True``: every method; a collection: those full method names."""
    if isinstance(idempotent, bool):
        return lambda method: idempotent
    if isinstance(idempotent, str):
        raise ConfigError(
            "expected True/False or a collection of full method names such as "
            f"'/pkg.Service/Method', got the string {idempotent!r}",
            field="idempotent",
        )
    names = frozenset(idempotent)
    for name in names:
        if not isinstance(name, str) or not name.startswith("/") or name.count("/") != 2:
            raise ConfigError(
                f"expected full method names such as '/pkg.Service/Method', got {name!r}",
                field="idempotent",
            )
    return names.__contains__


def never_sent(error: grpc.RpcError) -> bool:
    """True when an UNAVAILABLE error says no connection was made (the request never
    left this process), so that even a non-idempotent call may go elsewhere."""
    details = str(error.details() or "") if hasattr(error, "details") else ""
    return details.startswith("failed to connect to all addresses")


def words_of(error: BaseException) -> str:
    """A gRPC error's details (the text after its status), else its ``str()``."""
    details = getattr(error, "details", None)
    with contextlib.suppress(Exception):
        if callable(details) and (text := details()):
            return str(text)
    return str(error)


#: The statuses :meth:`Discovery.report` counts as a failure of the instance:
#: UNAVAILABLE (which includes a connect failure) and DEADLINE_EXCEEDED (the
#: instance did not answer in time: a read timeout, as for HTTP).
FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def code_of(error: BaseException) -> grpc.StatusCode | None:
    """The status of a gRPC error, None for anything else."""
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    try:
        found = code()
    except Exception:
        return None
    return found if isinstance(found, grpc.StatusCode) else None


def note_tried(error: BaseException, tried: Sequence[ServiceInstance]) -> None:
    """Add which instances were tried to ``error``'s notes, when more than one was."""
    if len(tried) > 1:
        where = ", ".join(f"{i.address}:{i.port}" for i in tried)
        error.add_note(f"registry_agent.grpc: {len(tried)} instances tried ({where})")


def retriable(
    error: BaseException, code: grpc.StatusCode | None, idempotent: bool, timeouts: bool
) -> bool:
    """Whether a failed attempt may go to another instance: a deadline only when read
    timeouts are retried; UNAVAILABLE for idempotent methods, or when nothing was sent."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return timeouts
    return idempotent or (isinstance(error, grpc.RpcError) and never_sent(error))


class Attempts:
    """The retry rule of one unary call, without I/O: the sync and aio channels run
    their own loop (choose an instance, call it) and ask this what comes next.

    - ``no_instance(exc)``: ``choose()`` failed: the last resort to try, or raise;
    - ``remaining()``: the time left of the call's deadline (raises the last error
      once it is spent);
    - ``wait_for_ready(instance, known_failing)``: the caller's ``wait_for_ready``,
      or None for an attempt on an instance known failing while others may be left
      (it would wait out the deadline there); the first such instance is kept as the
      last resort, waited for once no other is left;
    - ``failed(instance, error, code)``: an attempt failed with a status in
      ``FAILURES``: returns to retry elsewhere, raises ``error`` when no retry is left,
      the rule forbids one or the channel was closed (``closed()``).
    """

    def __init__(
        self,
        policy: DiscoveryPolicy,
        idempotent: bool,
        timeout: float | None,
        wait_for_ready: bool | None,
        clock: Callable[[], float] = time.monotonic,
        closed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self.retries = policy.retries
        self.idempotent = idempotent
        self.timeouts = idempotent and policy.retry_read_timeouts
        self.asked = wait_for_ready
        self.tried: list[ServiceInstance] = []
        self.last: BaseException | None = None
        self.dropped: list[ServiceInstance] = []  # tried without wait_for_ready
        self.waited = False  # the last resort: an instance known failing, waited for
        self.before: BaseException | None = None  # the last error before a wait
        self.fast = False  # this attempt goes without the wait_for_ready asked for
        self.free = 0  # such attempts that failed to connect: they spend no retry
        self.closed = closed

    def no_instance(self, exc: BaseException) -> ServiceInstance:
        """``choose()`` raised ``exc`` (a gRPC error): the instance dropped earlier as
        known failing, now to be waited for; else raise the last attempt's error (with
        ``exc``'s words as a note) or ``exc``."""
        if self.waited or not self.dropped or code_of(exc) != grpc.StatusCode.UNAVAILABLE:
            if self.last is not None:
                note_tried(self.last, self.tried)
                if not isinstance(exc.__cause__, NoInstanceAvailable):
                    # The registry's trouble (not "none left": the tries say so).
                    self.last.add_note(f"registry_agent.grpc: {words_of(exc)}")
                raise self.last from None
            raise exc
        self.waited = True
        return self.dropped[0]

    def remaining(self) -> float | None:
        """Seconds left of the call's deadline (None: no deadline)."""
        left = None if self.deadline is None else self.deadline - self.clock()
        if left is not None and left <= 0 and self.last is not None:
            note_tried(self.last, self.tried)
            raise self.last
        return left

    def wait_for_ready(
        self, instance: ServiceInstance, known_failing: Callable[[], bool]
    ) -> bool | None:
        """The ``wait_for_ready`` of the attempt on ``instance``."""
        self.fast = bool(self.asked and not self.waited and known_failing())
        if self.fast:
            # wait_for_ready on a channel known failing (or not connected) would wait
            # out the whole deadline on an instance that may be dead: this attempt goes
            # without it (a live server still answers; a dead one fails fast, which
            # spends no retry) and the next goes elsewhere; none left: the first of
            # them is waited for.
            self.dropped.append(instance)
            return None
        if self.asked:
            self.before = self.last
        return self.asked

    def failed(
        self, instance: ServiceInstance, error: BaseException, code: grpc.StatusCode | None
    ) -> None:
        """Record a failed attempt; raise ``error`` unless another instance may be tried."""
        self.tried.append(instance)
        self.last = error
        if self.fast and isinstance(error, grpc.RpcError) and never_sent(error):
            self.free += 1
        if (
            self.closed()
            or len(self.tried) - self.free > self.retries
            or not retriable(error, code, self.idempotent, self.timeouts)
        ):
            note_tried(error, self.tried)
            if self.before is not None and self.before is not error:
                # A deadline passed waiting for ready says nothing of why: the others'.
                error.add_note(
                    f"registry_agent.grpc: waited for {instance.address}:{instance.port}"
                    f" (wait_for_ready) after an attempt failed: {words_of(self.before)}"
                )
            raise error


def failed(error: BaseException) -> bool:
    """What :meth:`Discovery.report` counts as a failure: UNAVAILABLE (this includes
    a connect failure) or DEADLINE_EXCEEDED (no answer in time). Any other status
    is an answer from the server."""
    return code_of(error) in FAILURES


@dataclass(eq=False)
class Endpoint(Generic[C]):
    """One real channel to one ``address:port``, with its count of calls in flight.

    ``failing``: the last call on it ended UNAVAILABLE or DEADLINE_EXCEEDED (known
    from call outcomes, no thread watches the channel); ``instance``: the instance
    last chosen for it.
    """

    key: tuple[str, int]
    channel: C
    instance: ServiceInstance
    in_flight: int = 0
    retired: bool = False
    failing: bool = False


class Callables:
    """The per-endpoint multicallables of one discovery multicallable.

    Held by the multicallable itself (a generated stub makes its multicallables
    once), keyed weakly by endpoint: they go with the multicallable or with the
    endpoint's channel, so multicallables made per call never pile up.
    """

    __slots__ = ("__weakref__", "_args", "_made")

    def __init__(self, kind: str, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._args = (kind, method, ser, deser, registered)
        self._made: weakref.WeakKeyDictionary[Endpoint[Any], Any] = weakref.WeakKeyDictionary()

    @property
    def method(self) -> str:
        """The full method name."""
        return str(self._args[1])

    def get(self, endpoint: Endpoint[Any]) -> Any:
        """The endpoint channel's multicallable (made once per endpoint, then reused)."""
        found = self._made.get(endpoint)
        if found is None:
            kind, method, ser, deser, registered = self._args
            make = getattr(endpoint.channel, kind)
            kwargs = {"_registered_method": registered} if registered is not None else {}
            found = make(method, request_serializer=ser, response_deserializer=deser, **kwargs)
            self._made[endpoint] = found
        return found


class Pool(Generic[C]):
    """Per-endpoint channels, made on demand; thread-safe.

    An endpoint dropped by :meth:`prune` is closed once its last call in flight
    has ended (``close`` is called with the channel, from the thread or task that
    ended it); a later call to the same ``address:port`` gets a fresh channel.
    """

    def __init__(self, make: Callable[[str], C], close: Callable[[C], None]) -> None:
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, int], Endpoint[C]] = {}
        self.last_prune = time.monotonic()
        self.closed = False

    def acquire(self, instance: ServiceInstance) -> Endpoint[C]:
        """The endpoint for ``instance``, one more call in flight on it."""
        key = (instance.address, instance.port)
        with self._lock:
            if self.closed:
                raise ValueError("the discovery channel is closed")
            endpoint = self._endpoints.get(key)
            if endpoint is None:
                endpoint = Endpoint(key, self._make(target_of(*key)), instance)
                self._endpoints[key] = endpoint
            else:
                endpoint.instance = instance
            endpoint.in_flight += 1
            return endpoint

    def release(self, endpoint: Endpoint[C]) -> None:
        """One call fewer in flight; closes a retired endpoint's channel with its last call."""
        with self._lock:
            endpoint.in_flight -= 1
            close = endpoint.retired and endpoint.in_flight == 0
        if close:
            self._close(endpoint.channel)

    def due(self) -> bool:
        """True (once per :data:`PRUNE_EVERY`) when it is time to :meth:`prune`."""
        now = time.monotonic()
        if now - self.last_prune < PRUNE_EVERY:
            return False  # the common case: no lock
        with self._lock:
            if now - self.last_prune < PRUNE_EVERY or not self._endpoints:
                return False
            self.last_prune = now
            return True

    def prune(self, keep: Collection[ServiceInstance]) -> list[C]:
        """Drop the endpoints of instances not in ``keep``; returns the channels to close
        now (those with no call in flight; the others close with their last call)."""
        wanted = {(i.address, i.port) for i in keep}
        now: list[C] = []
        with self._lock:
            for key in [k for k in self._endpoints if k not in wanted]:
                endpoint = self._endpoints.pop(key)
                endpoint.retired = True
                if endpoint.in_flight == 0:
                    now.append(endpoint.channel)
        return now

    def endpoints(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` pairs holding a channel right now."""
        with self._lock:
            return list(self._endpoints)

    def channels(self) -> list[C]:
        """Every live channel."""
        with self._lock:
            return [e.channel for e in self._endpoints.values()]

    def close_all(self) -> list[C]:
        """Mark closed; returns every channel (the caller closes them)."""
        with self._lock:
            self.closed = True
            endpoints, self._endpoints = list(self._endpoints.values()), {}
        for endpoint in endpoints:
            endpoint.retired = True
        return [e.channel for e in endpoints]
