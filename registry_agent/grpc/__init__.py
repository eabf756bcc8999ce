"""A gRPC channel fed by discovery: ``DiscoveryChannel(discovery, "orders")``.

Needs the ``grpc`` extra (``pip install 'registry-agent[grpc]'``); importing
``registry_agent`` alone never imports grpc. :mod:`registry_agent.grpc.aio` holds
the ``grpc.aio`` twin.

How it works:

- one real channel per endpoint (``ipv4:address:port``), made on first use with
  the given ``credentials`` and ``options``; the authority and, over TLS, the
  name the server's certificate must carry is ``policy.server_name`` or the
  service name (``grpc.default_authority``, ``grpc.ssl_target_name_override``);
- every call asks ``discovery.choose(service, strategy, exclude=tried,
  policy=...)`` (served from the watch's memory, so an instance that goes
  offline or away is not chosen again as soon as the registry says so); the
  channels of instances gone or unhealthy are closed once their calls in flight
  end (checked at most every 0.5 s, on calls);
- unary-unary calls (``__call__`` and ``with_call``) that end ``UNAVAILABLE`` on
  an idempotent method (``idempotent=True``, or its full name in the collection)
  go to another instance, at most ``policy.retries`` more times, within the
  call's own ``timeout``. A non-idempotent call is retried only when the error
  says no connection was made ("failed to connect to all addresses": the
  request never left this process), never after it may have reached a server;
- ``DEADLINE_EXCEEDED`` is retried only for idempotent methods with
  ``policy.retry_read_timeouts`` and only while the call's deadline leaves time
  (a server that answered DEADLINE_EXCEEDED itself). The call's ``timeout`` is
  one deadline for all its attempts, as in grpc: there is no per-attempt
  deadline, so a call that waited out its deadline on a hung instance fails;
- ``future()`` and the streaming kinds pick one instance and are never retried
  (a stream may have delivered part of its answer; a future's caller holds it);
- each outcome is reported with ``discovery.report(service, instance, ok)``:
  ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` (no answer in time: a read timeout)
  are failures, any other status (OK, NOT_FOUND, ...) a success. With
  ``policy.outliers`` an instance that hangs is ejected after that many
  deadlines in a row, and later calls go to the others;
- ``wait_for_ready=True``: an attempt on an instance whose last call failed, or
  whose channel is not READY or CONNECTING, goes without it (a live server still
  answers; a dead one fails at once) when another attempt may follow, and the
  next attempt goes elsewhere; when only that instance is left the call waits
  for it as asked;
- discovery's first read of the service (up to its ``sync_timeout``) is waited
  for no longer than the call's ``timeout``: then ``DEADLINE_EXCEEDED``;
- no instance to call, or a registry error: a :class:`grpc.RpcError` with
  ``StatusCode.UNAVAILABLE`` whose details say why (discovery's own words, e.g.
  "orders: no healthy instance matching tags canary (3 healthy do not match)").
  When instances ran out after attempts, the last attempt's real error is
  raised, with notes of how many instances were tried and why none was left;
- no thread per endpoint: connectivity is asked when needed; only while a
  callback is subscribed to this channel does grpc watch each endpoint's channel.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from registry_agent._errors import ConfigError, NoInstanceAvailable, RegistryError
from registry_agent._models import ServiceInstance
from registry_agent._select import Strategy, as_strategy
from registry_agent.grpc._common import (
    FAILURES,
    Attempts,
    Callables,
    Endpoint,
    Pool,
    channel_options,
    code_of,
    is_idempotent_rule,
)

if TYPE_CHECKING:
    from registry_agent._blocking import Discovery
    from registry_agent._policy import DiscoveryPolicy

__all__ = ["DiscoveryChannel", "LocalRpcError", "NoInstanceError"]

_LIVE = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING)

_STATES = {
    0: grpc.ChannelConnectivity.IDLE,
    1: grpc.ChannelConnectivity.CONNECTING,
    2: grpc.ChannelConnectivity.READY,
    3: grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    4: grpc.ChannelConnectivity.SHUTDOWN,
}


class LocalRpcError(grpc.RpcError):  # type: ignore[misc]
    """A :class:`grpc.RpcError` raised by the discovery channel itself (no server
    answered): ``code()`` and ``details()`` as a grpc user expects."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The status: UNAVAILABLE (no instance, the registry's trouble) or
        DEADLINE_EXCEEDED (the call's deadline passed while discovery waited)."""
        return self._code

    def details(self) -> str:
        """Why no instance could be called."""
        return self._details

    def initial_metadata(self) -> tuple[()]:
        """Empty: no server was called."""
        return ()

    def trailing_metadata(self) -> tuple[()]:
        """Empty: no server was called."""
        return ()

    def debug_error_string(self) -> str:
        """The same as :meth:`details`."""
        return self._details

    def __str__(self) -> str:
        return f"<{type(self).__name__} status={self._code.name} details={self._details!r}>"


class NoInstanceError(LocalRpcError):
    """``StatusCode.UNAVAILABLE``: discovery had no instance to call, or the registry
    failed; ``details()`` says why in discovery's own words."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)


def no_instance_details(service: str, error: RegistryError) -> str:
    """``"orders: no healthy instance ... (2 ejected as outliers)"``: discovery's own
    words (a registry error names its backend too)."""
    if isinstance(error, NoInstanceAvailable):
        return f"{service}: {error.message}"
    return f"{service}: {error}"


def deadline_details(service: str) -> str:
    """The details of a call whose deadline passed while discovery waited."""
    return (
        f"{service}: the call's deadline passed while discovery waited for the "
        "registry's first answer"
    )


class _Core:
    """Choice, retry rule and reporting, shared by every multicallable of a channel."""

    def __init__(
        self,
        discovery: Discovery,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
        idempotent: bool | Collection[str],
        strategy: str | Strategy,
        policy: DiscoveryPolicy | None,
    ) -> None:
        self.discovery = discovery
        self.service = service
        self.strategy = as_strategy(strategy)
        self.policy = policy
        self.idempotent = is_idempotent_rule(idempotent)
        self.credentials = credentials
        self.options = tuple(options)
        self.pool: Pool[grpc.Channel] = Pool(self._make, self._close_channel)
        # True once discovery answered a choice: from then on it answers from memory.
        self.synced = False
        self.on_state: Callable[[], None] = lambda: None
        # Connectivity is watched (one grpc polling thread per channel) only while the
        # DiscoveryChannel has subscribers; calls need no watching.
        self._watch_lock = threading.Lock()
        self.watching = False
        self.states: dict[grpc.Channel, grpc.ChannelConnectivity] = {}
        self._watching: dict[grpc.Channel, Callable[[grpc.ChannelConnectivity], None]] = {}

    def effective_policy(self) -> DiscoveryPolicy:
        return self.policy or self.discovery.policy_for(self.service)

    def _make(self, target: str) -> grpc.Channel:
        server_name = self.effective_policy().server_name or self.service
        tls = self.credentials is not None
        options = channel_options(self.options, server_name, tls)
        if self.credentials is not None:
            channel = grpc.secure_channel(target, self.credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if self.watching:
            self._watch(channel)
        return channel

    def _watch(self, channel: grpc.Channel) -> None:
        with self._watch_lock:
            if channel in self._watching:
                return

            def changed(state: grpc.ChannelConnectivity) -> None:
                self.states[channel] = state
                self.on_state()

            self._watching[channel] = changed
        channel.subscribe(changed, try_to_connect=False)

    def _unwatch(self, channel: grpc.Channel) -> None:
        with self._watch_lock:
            watching = self._watching.pop(channel, None)
            self.states.pop(channel, None)
        if watching is not None:
            with contextlib.suppress(Exception):
                channel.unsubscribe(watching)

    def watch(self, on: bool) -> None:
        """Start (or stop) watching the connectivity of every endpoint's channel."""
        self.watching = on
        for channel in self.pool.channels():
            if on:
                self._watch(channel)
            else:
                self._unwatch(channel)

    def state_of(self, channel: grpc.Channel) -> grpc.ChannelConnectivity | None:
        """The channel's connectivity: the watched state, else asked (no thread)."""
        state = self.states.get(channel)
        if state is not None:
            return state
        with contextlib.suppress(Exception):
            number = channel._channel.check_connectivity_state(False)
            return _STATES.get(number)
        return None

    def _close_channel(self, channel: grpc.Channel) -> None:
        self._unwatch(channel)
        with contextlib.suppress(Exception):
            channel.close()

    def choose(self, tried: Sequence[ServiceInstance], deadline: float | None) -> ServiceInstance:
        """An instance not in ``tried``, chosen within ``deadline``; registry errors
        become RpcErrors."""
        self.maybe_prune()
        try:
            return self._choose(tuple(tried), deadline)
        except ConfigError:
            raise
        except RegistryError as exc:
            raise NoInstanceError(no_instance_details(self.service, exc)) from exc

    def _choose(
        self, exclude: tuple[ServiceInstance, ...], deadline: float | None
    ) -> ServiceInstance:
        discovery = self.discovery
        thread = getattr(discovery, "_thread", None)
        inner = getattr(discovery, "_async", None)
        if self.synced or deadline is None or thread is None or inner is None:
            chosen = discovery.choose(
                self.service, self.strategy, exclude=exclude, policy=self.policy
            )
            self.synced = True
            return chosen
        # Discovery.choose() waits up to sync_timeout for the first read of the
        # service; a call waits no longer than its own deadline. The read goes on
        # (it serves the next call); only this call stops waiting.
        future = thread.submit(
            inner.choose(self.service, self.strategy, exclude=exclude, policy=self.policy)
        )
        try:
            chosen = future.result(max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            if future.done():
                raise
            raise LocalRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, deadline_details(self.service)
            ) from None
        self.synced = True
        return chosen  # type: ignore[no-any-return]

    def known_failing(self, endpoint: Endpoint[grpc.Channel]) -> bool:
        """The endpoint's last call failed, or its channel is neither READY nor CONNECTING
        (IDLE after a lost connection, TRANSIENT_FAILURE)."""
        if endpoint.failing:
            return True
        return self.state_of(endpoint.channel) not in _LIVE

    def report(self, instance: ServiceInstance, ok: bool) -> None:
        with contextlib.suppress(Exception):
            self.discovery.report(self.service, instance, ok, policy=self.policy)

    def outcome(
        self, instance: ServiceInstance, endpoint: Endpoint[grpc.Channel], ok: bool
    ) -> None:
        """Note a call's outcome: for wait_for_ready (endpoint) and ejection (discovery)."""
        endpoint.failing = not ok
        self.report(instance, ok)

    def maybe_prune(self) -> None:
        if not self.pool.due():
            return
        try:
            keep = self.discovery.instances(self.service)
        except Exception:
            return  # the registry's trouble: keep every channel for now
        for channel in self.pool.prune(keep):
            self._close_channel(channel)

    def finished(self, instance: ServiceInstance, endpoint: Endpoint[grpc.Channel]) -> Any:
        """A done callback for a call on ``endpoint``: reports and releases."""

        def done(call: Any) -> None:
            try:
                code = call.code()
            except Exception:
                code = None
            self.outcome(instance, endpoint, code not in FAILURES)
            self.pool.release(endpoint)

        return done

    def one(self, timeout: float | None) -> tuple[ServiceInstance, Endpoint[grpc.Channel]]:
        """One instance and its endpoint (for calls that are never retried)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        instance = self.choose((), deadline)
        return instance, self.pool.acquire(instance)

    def unary(
        self,
        method: str,
        invoke: Callable[[Endpoint[grpc.Channel], float | None, bool | None], Any],
        timeout: float | None,
        wait_for_ready: bool | None,
    ) -> Any:
        """Run ``invoke(endpoint, timeout, wait_for_ready)`` with the retry rule of this
        channel."""
        plan = Attempts(
            self.policy or self.discovery.policy_for(self.service),
            self.idempotent(method),
            timeout,
            wait_for_ready,
            closed=lambda: self.pool.closed,
        )
        while True:
            plan.remaining()  # spent by the last attempt: its error, not another choice
            try:
                instance = self.choose(plan.tried, plan.deadline)
            except LocalRpcError as exc:
                instance = plan.no_instance(exc)
            remaining = plan.remaining()
            endpoint = self.pool.acquire(instance)
            wfr = plan.wait_for_ready(instance, functools.partial(self.known_failing, endpoint))
            try:
                result = invoke(endpoint, remaining, wfr)
            except grpc.RpcError as error:
                code = code_of(error)
                self.outcome(instance, endpoint, code not in FAILURES)
                if code not in FAILURES:
                    raise
                plan.failed(instance, error, code)
                continue
            finally:
                self.pool.release(endpoint)
            self.outcome(instance, endpoint, True)
            return result

    def close(self) -> None:
        for channel in self.pool.close_all():
            self._close_channel(channel)


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __init__(self, core: _Core, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._core = core
        self._method = method
        self._callable = Callables("unary_unary", method, ser, deser, registered).get

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """The response; ``UNAVAILABLE`` retried as :class:`DiscoveryChannel` says."""
        kw = _passed(metadata, credentials, compression)
        return self._core.unary(
            self._method,
            lambda endpoint, left, wfr: self._callable(endpoint)(
                request, timeout=left, wait_for_ready=wfr, **kw
            ),
            timeout,
            wait_for_ready,
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """``(response, call)``; retried like :meth:`__call__`."""
        kw = _passed(metadata, credentials, compression)
        return self._core.unary(
            self._method,
            lambda endpoint, left, wfr: self._callable(endpoint).with_call(
                request, timeout=left, wait_for_ready=wfr, **kw
            ),
            timeout,
            wait_for_ready,
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A future on one chosen instance: never retried, its outcome reported."""
        kw = _passed(metadata, credentials, compression)
        instance, endpoint = self._core.one(timeout)
        try:
            call = self._callable(endpoint).future(
                request, timeout=timeout, wait_for_ready=wait_for_ready, **kw
            )
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        call.add_done_callback(self._core.finished(instance, endpoint))
        return call


def _passed(metadata: Any, credentials: Any, compression: Any) -> dict[str, Any]:
    return {"metadata": metadata, "credentials": credentials, "compression": compression}


class _Single:
    """A multicallable whose calls go to one chosen instance (streams: never retried)."""

    kind = ""

    def __init__(self, core: _Core, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._core = core
        self._callable = Callables(self.kind, method, ser, deser, registered).get

    def _start(self, attribute: str, request: Any, kwargs: dict[str, Any]) -> Any:
        instance, endpoint = self._core.one(kwargs.get("timeout"))
        try:
            call = getattr(self._callable(endpoint), attribute)(request, **kwargs)
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        call.add_done_callback(self._core.finished(instance, endpoint))
        return call

    def _blocking(self, attribute: str, request: Any, kwargs: dict[str, Any]) -> Any:
        instance, endpoint = self._core.one(kwargs.get("timeout"))
        try:
            result = getattr(self._callable(endpoint), attribute)(request, **kwargs)
        except grpc.RpcError as error:
            self._core.outcome(instance, endpoint, code_of(error) not in FAILURES)
            raise
        finally:
            self._core.pool.release(endpoint)
        self._core.outcome(instance, endpoint, True)
        return result


def _call_kwargs(
    timeout: float | None,
    metadata: Any,
    credentials: Any,
    wait_for_ready: bool | None,
    compression: Any,
) -> dict[str, Any]:
    return {
        "timeout": timeout,
        "wait_for_ready": wait_for_ready,
        **_passed(metadata, credentials, compression),
    }


class _UnaryStream(_Single, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    kind = "unary_stream"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """The responses (an iterator that is also a ``grpc.Call``), from one instance."""
        kw = _call_kwargs(timeout, metadata, credentials, wait_for_ready, compression)
        return self._start("__call__", request, kw)


class _StreamStream(_Single, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    kind = "stream_stream"

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """The responses (an iterator that is also a ``grpc.Call``), from one instance."""
        kw = _call_kwargs(timeout, metadata, credentials, wait_for_ready, compression)
        return self._start("__call__", request_iterator, kw)


class _StreamUnary(_Single, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    kind = "stream_unary"

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """The response, from one instance (never retried)."""
        kw = _call_kwargs(timeout, metadata, credentials, wait_for_ready, compression)
        return self._blocking("__call__", request_iterator, kw)

    def with_call(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """``(response, call)``, from one instance (never retried)."""
        kw = _call_kwargs(timeout, metadata, credentials, wait_for_ready, compression)
        return self._blocking("with_call", request_iterator, kw)

    def future(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """A future on one instance (never retried)."""
        kw = _call_kwargs(timeout, metadata, credentials, wait_for_ready, compression)
        return self._start("future", request_iterator, kw)


def _ignore(_: grpc.ChannelConnectivity) -> None:
    pass


_STATE_ORDER = (
    grpc.ChannelConnectivity.READY,
    grpc.ChannelConnectivity.CONNECTING,
    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    grpc.ChannelConnectivity.IDLE,
    grpc.ChannelConnectivity.SHUTDOWN,
)


class DiscoveryChannel(grpc.Channel):  # type: ignore[misc]
    """A :class:`grpc.Channel` to every healthy instance of ``service``, for generated stubs.

    ``discovery``: a blocking :class:`registry_agent.Discovery`. ``credentials``:
    ``grpc.ssl_channel_credentials(...)`` for TLS (the certificate must name
    ``policy.server_name`` or the service), None for plain text. ``options``:
    channel options for every per-endpoint channel. ``idempotent``: True (every
    method may be retried on another instance after UNAVAILABLE) or the full
    method names that may (``{"/orders.Orders/Get"}``). ``strategy``: how
    instances are chosen. ``policy``: a :class:`DiscoveryPolicy` for this
    channel (None: ``discovery.policy_for(service)``); its ``retries`` bounds the
    attempts on other instances, its ``server_name`` names the TLS server.

    The module docstring says what is retried and what is reported.
    """

    def __init__(
        self,
        discovery: Discovery,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        idempotent: bool | Collection[str] = False,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        policy: DiscoveryPolicy | None = None,
    ) -> None:
        if not isinstance(service, str) or not service:
            raise ConfigError(f"expected a service name, got {service!r}", field="service")
        self.discovery = discovery
        self.service = service
        self._core = _Core(
            discovery,
            service,
            credentials=credentials,
            options=options,
            idempotent=idempotent,
            strategy=strategy,
            policy=policy,
        )
        self._core.on_state = self._state_changed
        self._subscribers: dict[Callable[[grpc.ChannelConnectivity], None], Any] = {}
        self._lock = threading.Lock()
        self._last_state: grpc.ChannelConnectivity | None = None

    def endpoints(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` pairs this channel holds a channel to right now."""
        return self._core.pool.endpoints()

    def state(self) -> grpc.ChannelConnectivity:
        """READY if any endpoint's channel is, else the best of the others (IDLE when none)."""
        states = {self._core.state_of(c) for c in self._core.pool.channels()}
        for state in _STATE_ORDER:
            if state in states:
                return state
        return grpc.ChannelConnectivity.IDLE

    def _state_changed(self) -> None:
        state = self.state()
        with self._lock:
            if state == self._last_state:
                return
            self._last_state = state
            callbacks = list(self._subscribers)
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback(state)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Call ``callback`` with the channel's overall state (see :meth:`state`) now and
        on each change. ``try_to_connect``: connect to one instance at once."""
        state = self.state()
        with self._lock:
            self._subscribers[callback] = None
            self._last_state = state
        # Only now is each endpoint's connectivity watched (grpc runs a polling
        # thread per watched channel), until the last subscriber leaves.
        self._core.watch(True)
        with contextlib.suppress(Exception):
            callback(state)
        if try_to_connect:
            with contextlib.suppress(grpc.RpcError):
                _, endpoint = self._core.one(None)
                self._core.pool.release(endpoint)
                # A subscription that asks to connect makes the endpoint's channel connect.
                endpoint.channel.subscribe(_ignore, try_to_connect=True)
                endpoint.channel.unsubscribe(_ignore)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Stop calling ``callback``."""
        with self._lock:
            self._subscribers.pop(callback, None)
            last = not self._subscribers
        if last:
            self._core.watch(False)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        """A unary-unary multicallable (retried as the class docstring says)."""
        return _UnaryUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable:
        """A unary-stream multicallable: one instance per call, never retried."""
        return _UnaryStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable:
        """A stream-unary multicallable: one instance per call, never retried."""
        return _StreamUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable:
        """A stream-stream multicallable: one instance per call, never retried."""
        return _StreamStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def close(self) -> None:
        """Close every per-endpoint channel (calls in flight are cancelled). The
        discovery is the caller's: it stays open."""
        self._core.close()
        with self._lock:
            self._subscribers.clear()

    def __enter__(self) -> DiscoveryChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
