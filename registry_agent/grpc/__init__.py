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
- ``future()`` and the streaming kinds pick one instance and are never retried
  (a stream may have delivered part of its answer; a future's caller holds it);
- each outcome is reported with ``discovery.report(service, instance, ok)``:
  ``UNAVAILABLE`` is a failure, any other status (OK, NOT_FOUND, ...) a success;
- no instance to call: a :class:`grpc.RpcError` with ``StatusCode.UNAVAILABLE``
  whose details say why (discovery's own words). When instances ran out after
  attempts, the last attempt's real error is raised, with a note of how many
  instances were tried.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from registry_agent._errors import ConfigError, NoInstanceAvailable
from registry_agent._models import ServiceInstance
from registry_agent._select import Strategy, as_strategy
from registry_agent.grpc._common import (
    Endpoint,
    Pool,
    channel_options,
    failed,
    is_idempotent_rule,
    never_sent,
)

if TYPE_CHECKING:
    from registry_agent._blocking import Discovery
    from registry_agent._policy import DiscoveryPolicy

__all__ = ["DiscoveryChannel", "NoInstanceError"]


class NoInstanceError(grpc.RpcError):  # type: ignore[misc]
    """``StatusCode.UNAVAILABLE``: discovery had no instance to call; ``details()`` says why."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        """Always ``StatusCode.UNAVAILABLE``."""
        return grpc.StatusCode.UNAVAILABLE

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
        return f"<NoInstanceError status=UNAVAILABLE details={self._details!r}>"


def no_instance_details(service: str, error: NoInstanceAvailable) -> str:
    """``"orders: no healthy instance ..."`` from discovery's own words."""
    return f"{service}: {error.message}"


def _note_tried(error: BaseException, tried: Sequence[ServiceInstance]) -> None:
    if len(tried) > 1:
        where = ", ".join(f"{i.address}:{i.port}" for i in tried)
        error.add_note(f"registry_agent.grpc: {len(tried)} instances tried ({where})")


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
        self.on_state: Callable[[], None] = lambda: None
        # Per channel: its last connectivity state and the callback watching it.
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

        def changed(state: grpc.ChannelConnectivity) -> None:
            self.states[channel] = state
            self.on_state()

        self._watching[channel] = changed
        channel.subscribe(changed, try_to_connect=False)
        return channel

    def _close_channel(self, channel: grpc.Channel) -> None:
        watching = self._watching.pop(channel, None)
        self.states.pop(channel, None)
        if watching is not None:
            with contextlib.suppress(Exception):
                channel.unsubscribe(watching)
        with contextlib.suppress(Exception):
            channel.close()

    def choose(self, tried: Sequence[ServiceInstance]) -> ServiceInstance:
        self.maybe_prune()
        return self.discovery.choose(
            self.service, self.strategy, exclude=tuple(tried), policy=self.policy
        )

    def report(self, instance: ServiceInstance, ok: bool) -> None:
        with contextlib.suppress(Exception):
            self.discovery.report(self.service, instance, ok, policy=self.policy)

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
            self.report(instance, code != grpc.StatusCode.UNAVAILABLE)
            self.pool.release(endpoint)

        return done

    def one(self) -> tuple[ServiceInstance, Endpoint[grpc.Channel]]:
        """One instance and its endpoint (for calls that are never retried)."""
        try:
            instance = self.choose(())
        except NoInstanceAvailable as exc:
            raise NoInstanceError(no_instance_details(self.service, exc)) from exc
        return instance, self.pool.acquire(instance)

    def unary(
        self,
        method: str,
        invoke: Callable[[Endpoint[grpc.Channel], float | None], Any],
        timeout: float | None,
    ) -> Any:
        """Run ``invoke(endpoint, timeout)`` with the retry rule of this channel."""
        deadline = None if timeout is None else time.monotonic() + timeout
        retries = self.effective_policy().retries
        idempotent = self.idempotent(method)
        tried: list[ServiceInstance] = []
        last: grpc.RpcError | None = None
        while True:
            try:
                instance = self.choose(tried)
            except NoInstanceAvailable as exc:
                if last is not None:
                    _note_tried(last, tried)
                    raise last from None
                raise NoInstanceError(no_instance_details(self.service, exc)) from exc
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0 and last is not None:
                _note_tried(last, tried)
                raise last
            endpoint = self.pool.acquire(instance)
            try:
                result = invoke(endpoint, remaining)
            except grpc.RpcError as error:
                if not failed(error):
                    self.report(instance, True)
                    raise
                self.report(instance, False)
                tried.append(instance)
                last = error
                if len(tried) > retries or not (idempotent or never_sent(error)):
                    _note_tried(error, tried)
                    raise
                continue
            finally:
                self.pool.release(endpoint)
            self.report(instance, True)
            return result

    def close(self) -> None:
        for channel in self.pool.close_all():
            self._close_channel(channel)


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __init__(self, core: _Core, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._core = core
        self._method = method
        self._args = ("unary_unary", method, ser, deser, registered)

    def _callable(self, endpoint: Endpoint[grpc.Channel]) -> Any:
        return endpoint.callable(*self._args)

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
        kw = _passed(metadata, credentials, wait_for_ready, compression)
        return self._core.unary(
            self._method,
            lambda endpoint, left: self._callable(endpoint)(request, timeout=left, **kw),
            timeout,
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
        kw = _passed(metadata, credentials, wait_for_ready, compression)
        return self._core.unary(
            self._method,
            lambda endpoint, left: self._callable(endpoint).with_call(request, timeout=left, **kw),
            timeout,
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
        kw = _passed(metadata, credentials, wait_for_ready, compression)
        instance, endpoint = self._core.one()
        try:
            call = self._callable(endpoint).future(request, timeout=timeout, **kw)
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        call.add_done_callback(self._core.finished(instance, endpoint))
        return call


def _passed(metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any) -> Any:
    return {
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


class _Single:
    """A multicallable whose calls go to one chosen instance (streams: never retried)."""

    kind = ""

    def __init__(self, core: _Core, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._core = core
        self._args = (self.kind, method, ser, deser, registered)

    def _start(self, attribute: str, request: Any, kwargs: dict[str, Any]) -> Any:
        instance, endpoint = self._core.one()
        try:
            call = getattr(endpoint.callable(*self._args), attribute)(request, **kwargs)
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        call.add_done_callback(self._core.finished(instance, endpoint))
        return call

    def _blocking(self, attribute: str, request: Any, kwargs: dict[str, Any]) -> Any:
        instance, endpoint = self._core.one()
        try:
            result = getattr(endpoint.callable(*self._args), attribute)(request, **kwargs)
        except grpc.RpcError as error:
            self._core.report(instance, not failed(error))
            raise
        finally:
            self._core.pool.release(endpoint)
        self._core.report(instance, True)
        return result


def _call_kwargs(
    timeout: float | None,
    metadata: Any,
    credentials: Any,
    wait_for_ready: bool | None,
    compression: Any,
) -> dict[str, Any]:
    return {"timeout": timeout, **_passed(metadata, credentials, wait_for_ready, compression)}


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
        states = {self._core.states.get(c) for c in self._core.pool.channels()}
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
        with self._lock:
            self._subscribers[callback] = None
        with contextlib.suppress(Exception):
            callback(self.state())
        if try_to_connect:
            with contextlib.suppress(grpc.RpcError):
                _, endpoint = self._core.one()
                self._core.pool.release(endpoint)
                # A subscription that asks to connect makes the endpoint's channel connect.
                endpoint.channel.subscribe(_ignore, try_to_connect=True)
                endpoint.channel.unsubscribe(_ignore)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Stop calling ``callback``."""
        with self._lock:
            self._subscribers.pop(callback, None)

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
