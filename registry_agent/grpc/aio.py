"""The ``grpc.aio`` discovery channel: ``DiscoveryChannel(async_discovery, "orders")``.

The same rules as :mod:`registry_agent.grpc` (one channel per endpoint, TLS
server name, retries of ``UNAVAILABLE`` for idempotent unary calls within the
call's timeout, reporting, no retry for streams), over an
:class:`~registry_agent.AsyncDiscovery`. ``await stub.Get(request)`` on a
generated stub works as on a ``grpc.aio`` channel; a streaming call picks its
instance when first read or written.

``interceptors=``: ``grpc.aio`` client interceptors, given to every per-endpoint
channel (so they run once per attempt: a retried call passes them again). The
channel belongs to the event loop of its first call; a call from another loop
raises a RuntimeError saying so (make one channel per loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Collection, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from registry_agent._errors import ConfigError, RegistryError
from registry_agent._models import ServiceInstance
from registry_agent._select import Strategy, as_strategy
from registry_agent.grpc import deadline_details, no_instance_details
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
    from registry_agent._discovery import AsyncDiscovery
    from registry_agent._policy import DiscoveryPolicy

__all__ = ["DiscoveryChannel"]


def _local_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=details,
        debug_error_string=details,
    )


def _known_failing(endpoint: Endpoint[grpc.aio.Channel]) -> bool:
    """The endpoint's last call failed, or its channel is neither READY nor CONNECTING
    (IDLE after a lost connection, TRANSIENT_FAILURE)."""
    if endpoint.failing:
        return True
    with contextlib.suppress(Exception):
        return endpoint.channel.get_state(False) not in _LIVE
    return False


_LIVE = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Retrieve a background choice's outcome (nobody may wait for it any more)."""
    if not task.cancelled():
        task.exception()


class _Core:
    """Choice, retry rule and reporting for one aio channel."""

    def __init__(
        self,
        discovery: AsyncDiscovery,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
        idempotent: bool | Collection[str],
        strategy: str | Strategy,
        policy: DiscoveryPolicy | None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
    ) -> None:
        self.discovery = discovery
        self.service = service
        self.strategy = as_strategy(strategy)
        self.policy = policy
        self.idempotent = is_idempotent_rule(idempotent)
        self.credentials = credentials
        self.options = tuple(options)
        self.interceptors = interceptors
        self.pool: Pool[grpc.aio.Channel] = Pool(self._make, self._close_later)
        self._closing: set[asyncio.Task[None]] = set()
        # The event loop of the first call: grpc.aio channels belong to one loop.
        self.loop: asyncio.AbstractEventLoop | None = None
        # True once discovery answered a choice: from then on it answers from memory.
        self.synced = False

    def check_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; a clear error when it is not the channel's own."""
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        elif loop is not self.loop:
            raise RuntimeError(
                f"registry_agent.grpc.aio.DiscoveryChannel for {self.service!r} is bound to "
                "the event loop of its first call (grpc.aio channels belong to one loop); "
                "make one DiscoveryChannel per event loop"
            )
        return loop

    def effective_policy(self) -> DiscoveryPolicy:
        return self.policy or self.discovery.policy_for(self.service)

    def _make(self, target: str) -> grpc.aio.Channel:
        server_name = self.effective_policy().server_name or self.service
        options = channel_options(self.options, server_name, self.credentials is not None)
        if self.credentials is not None:
            return grpc.aio.secure_channel(
                target, self.credentials, options=options, interceptors=self.interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=self.interceptors)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def choose(
        self, tried: Sequence[ServiceInstance], deadline: float | None
    ) -> ServiceInstance:
        """An instance not in ``tried``, chosen within ``deadline``; registry errors
        become AioRpcErrors."""
        if self.pool.due():
            with contextlib.suppress(Exception):
                keep = await self.discovery.instances(self.service)
                for channel in self.pool.prune(keep):
                    self._close_later(channel)
        try:
            return await self._choose(tuple(tried), deadline)
        except ConfigError:
            raise
        except RegistryError as exc:
            raise _local_error(
                grpc.StatusCode.UNAVAILABLE, no_instance_details(self.service, exc)
            ) from exc

    async def _choose(
        self, exclude: tuple[ServiceInstance, ...], deadline: float | None
    ) -> ServiceInstance:
        choice = self.discovery.choose(
            self.service, self.strategy, exclude=exclude, policy=self.policy
        )
        if self.synced or deadline is None:
            chosen = await choice
        else:
            # The first read of the service may take up to sync_timeout; the call
            # waits no longer than its own deadline (the read goes on for the next).
            task = asyncio.ensure_future(choice)
            task.add_done_callback(_retrieve)
            try:
                chosen = await asyncio.wait_for(
                    asyncio.shield(task), max(deadline - time.monotonic(), 0.0)
                )
            except TimeoutError:
                raise _local_error(
                    grpc.StatusCode.DEADLINE_EXCEEDED, deadline_details(self.service)
                ) from None
        self.synced = True
        return chosen

    def report(self, instance: ServiceInstance, ok: bool) -> None:
        with contextlib.suppress(Exception):
            self.discovery.report(self.service, instance, ok, policy=self.policy)

    def outcome(
        self, instance: ServiceInstance, endpoint: Endpoint[grpc.aio.Channel], ok: bool
    ) -> None:
        """Note a call's outcome: for wait_for_ready (endpoint) and ejection (discovery)."""
        endpoint.failing = not ok
        self.report(instance, ok)

    async def one(
        self, timeout: float | None = None
    ) -> tuple[ServiceInstance, Endpoint[grpc.aio.Channel]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        instance = await self.choose((), deadline)
        return instance, self.pool.acquire(instance)

    async def close(self, grace: float | None) -> None:
        for channel in self.pool.close_all():
            with contextlib.suppress(Exception):
                await channel.close(grace)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _UnaryCall(grpc.aio.UnaryUnaryCall):  # type: ignore[misc]
    """A unary call that may go to several instances in turn; awaitable like grpc.aio's."""

    def __init__(
        self, core: _Core, callables: Callables, request: Any, timeout: float | None, kw: Any
    ) -> None:
        self._core = core
        self._callables = callables
        self._request = request
        self._timeout = timeout
        self._kw = kw
        self._call: Any = None  # the attempt running or last run
        self._error: BaseException | None = None
        self._task = core.check_loop().create_task(self._run())

    async def _run(self) -> Any:
        core = self._core
        method = self._callables.method
        kw = self._kw
        plan = Attempts(
            core.policy or core.discovery.policy_for(core.service),
            core.idempotent(method),
            self._timeout,
            kw.get("wait_for_ready"),
            closed=lambda: core.pool.closed,
        )
        while True:
            plan.remaining()  # spent by the last attempt: its error, not another choice
            try:
                instance = await core.choose(plan.tried, plan.deadline)
            except grpc.aio.AioRpcError as exc:
                instance = plan.no_instance(exc)
            remaining = plan.remaining()
            endpoint = core.pool.acquire(instance)
            wfr = plan.wait_for_ready(instance, functools.partial(_known_failing, endpoint))
            try:
                self._call = self._callables.get(endpoint)(
                    self._request, timeout=remaining, **{**kw, "wait_for_ready": wfr}
                )
                result = await self._call
            except grpc.RpcError as error:
                code = code_of(error)
                core.outcome(instance, endpoint, code not in FAILURES)
                if code not in FAILURES:
                    raise
                plan.failed(instance, error, code)
                continue
            finally:
                core.pool.release(endpoint)
            core.outcome(instance, endpoint, True)
            return result

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    async def _settled(self) -> None:
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._task)

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None if self._call is None else self._call.time_remaining()

    def cancel(self) -> bool:
        if self._call is not None:
            self._call.cancel()
        return self._task.cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Any:
        await self._settled()
        return await self._call.initial_metadata() if self._call else grpc.aio.Metadata()

    async def trailing_metadata(self) -> Any:
        await self._settled()
        return await self._call.trailing_metadata() if self._call else grpc.aio.Metadata()

    async def code(self) -> grpc.StatusCode:
        await self._settled()
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        error = self._task.exception()
        if isinstance(error, grpc.RpcError):
            return error.code()
        return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN

    async def details(self) -> str:
        await self._settled()
        if self._task.cancelled():
            return "cancelled"
        error = self._task.exception()
        if isinstance(error, grpc.RpcError):
            return str(error.details())
        return "" if error is None else str(error)

    async def wait_for_connection(self) -> None:
        await self._settled()


class _StreamCall:
    """A streaming call (any of the three kinds): one instance, chosen at first use."""

    def __init__(self, core: _Core, callables: Callables, request: Any, kw: Any) -> None:
        self._core = core
        self._callables = callables
        self._request = request
        self._kw = kw
        self._started: asyncio.Task[Any] = core.check_loop().create_task(self._start())

    async def _start(self) -> Any:
        instance, endpoint = await self._core.one(self._kw.get("timeout"))
        try:
            call = self._callables.get(endpoint)(self._request, **self._kw)
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        core = self._core

        async def settle(finished: Any) -> None:
            code = None
            with contextlib.suppress(BaseException):
                code = await finished.code()
            core.outcome(instance, endpoint, code not in FAILURES)
            core.pool.release(endpoint)

        def done(finished: Any) -> None:
            task = asyncio.get_running_loop().create_task(settle(finished))
            core._closing.add(task)
            task.add_done_callback(core._closing.discard)

        call.add_done_callback(done)
        return call

    async def _inner(self) -> Any:
        return await self._started

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        call = await self._inner()
        async for item in call:
            yield item

    def __await__(self) -> Generator[Any, None, Any]:
        return self._awaited().__await__()

    async def _awaited(self) -> Any:
        return await (await self._inner())

    async def read(self) -> Any:
        return await (await self._inner()).read()

    async def write(self, request: Any) -> None:
        await (await self._inner()).write(request)

    async def done_writing(self) -> None:
        await (await self._inner()).done_writing()

    async def initial_metadata(self) -> Any:
        return await (await self._inner()).initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await (await self._inner()).trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await (await self._inner()).code()

    async def details(self) -> str:
        return str(await (await self._inner()).details())

    async def wait_for_connection(self) -> None:
        await (await self._inner()).wait_for_connection()

    def _running(self) -> Any:
        started = self._started
        if started.done() and not started.cancelled() and started.exception() is None:
            return started.result()
        return None

    def cancel(self) -> bool:
        """Cancel the call (or its start)."""
        call = self._running()
        return bool(call.cancel()) if call is not None else self._started.cancel()

    def done(self) -> bool:
        """True once the call has ended (or failed to start)."""
        call = self._running()
        return bool(call.done()) if call is not None else self._started.done()


class _MultiCallable:
    kind = ""

    def __init__(self, core: _Core, method: str, ser: Any, deser: Any, registered: Any) -> None:
        self._core = core
        self._callables = Callables(self.kind, method, ser, deser, registered)


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return _UnaryCall(self._core, self._callables, request, timeout, kwargs)


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    kind = "unary_stream"

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._callables, request, kwargs)


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._callables, request_iterator, kwargs)


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    kind = "stream_stream"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._callables, request_iterator, kwargs)


class DiscoveryChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio`` channel to every healthy instance of ``service``, for generated stubs.

    The same keywords and rules as :class:`registry_agent.grpc.DiscoveryChannel`,
    over an :class:`~registry_agent.AsyncDiscovery`, plus ``interceptors``
    (``grpc.aio`` client interceptors for every per-endpoint channel; they run
    per attempt). Use it from one event loop (that of its first call).
    """

    def __init__(
        self,
        discovery: AsyncDiscovery,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        idempotent: bool | Collection[str] = False,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        policy: DiscoveryPolicy | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        if not isinstance(service, str) or not service:
            raise ConfigError(f"expected a service name, got {service!r}", field="service")
        if interceptors is not None:
            interceptors = list(interceptors)
            for interceptor in interceptors:
                if not isinstance(interceptor, grpc.aio.ClientInterceptor):
                    raise ConfigError(
                        "expected grpc.aio client interceptors (UnaryUnaryClientInterceptor, "
                        f"...), got {interceptor!r}",
                        field="interceptors",
                    )
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
            interceptors=interceptors,
        )

    def endpoints(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` pairs this channel holds a channel to right now."""
        return self._core.pool.endpoints()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY if any endpoint's channel is, else the best of the others (IDLE when none)."""
        states = {c.get_state(try_to_connect) for c in self._core.pool.channels()}
        for state in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        ):
            if state in states:
                return state
        return grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Return once :meth:`get_state` differs from ``last_observed_state`` (polled)."""
        while self.get_state() == last_observed_state:  # noqa: ASYNC110 - many channels
            await asyncio.sleep(0.05)

    async def channel_ready(self) -> None:
        """Wait until the channel of one chosen instance is READY."""
        _, endpoint = await self._core.one()
        try:
            await endpoint.channel.channel_ready()
        finally:
            self._core.pool.release(endpoint)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        """A unary-unary multicallable (retried as :mod:`registry_agent.grpc` says)."""
        return _UnaryUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
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
    ) -> Any:
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
    ) -> Any:
        """A stream-stream multicallable: one instance per call, never retried."""
        return _StreamStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    async def close(self, grace: float | None = None) -> None:
        """Close every per-endpoint channel (``grace``: seconds for calls in flight).
        The discovery is the caller's: it stays open."""
        await self._core.close(grace)

    async def __aenter__(self) -> DiscoveryChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
