"""The ``grpc.aio`` discovery channel: ``DiscoveryChannel(async_discovery, "orders")``.

The same rules as :mod:`registry_agent.grpc` (one channel per endpoint, TLS
server name, retries of ``UNAVAILABLE`` for idempotent unary calls within the
call's timeout, reporting, no retry for streams), over an
:class:`~registry_agent.AsyncDiscovery`. ``await stub.Get(request)`` on a
generated stub works as on a ``grpc.aio`` channel; a streaming call picks its
instance when first read or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

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
    from registry_agent._discovery import AsyncDiscovery
    from registry_agent._policy import DiscoveryPolicy

__all__ = ["DiscoveryChannel"]


def _no_instance(service: str, error: NoInstanceAvailable) -> grpc.aio.AioRpcError:
    details = f"{service}: {error.message}"
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=details,
        debug_error_string=details,
    )


def _note_tried(error: BaseException, tried: Sequence[ServiceInstance]) -> None:
    if len(tried) > 1:
        where = ", ".join(f"{i.address}:{i.port}" for i in tried)
        error.add_note(f"registry_agent.grpc: {len(tried)} instances tried ({where})")


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
    ) -> None:
        self.discovery = discovery
        self.service = service
        self.strategy = as_strategy(strategy)
        self.policy = policy
        self.idempotent = is_idempotent_rule(idempotent)
        self.credentials = credentials
        self.options = tuple(options)
        self.pool: Pool[grpc.aio.Channel] = Pool(self._make, self._close_later)
        self._closing: set[asyncio.Task[None]] = set()

    def effective_policy(self) -> DiscoveryPolicy:
        return self.policy or self.discovery.policy_for(self.service)

    def _make(self, target: str) -> grpc.aio.Channel:
        server_name = self.effective_policy().server_name or self.service
        options = channel_options(self.options, server_name, self.credentials is not None)
        if self.credentials is not None:
            return grpc.aio.secure_channel(target, self.credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def choose(self, tried: Sequence[ServiceInstance]) -> ServiceInstance:
        if self.pool.due():
            with contextlib.suppress(Exception):
                keep = await self.discovery.instances(self.service)
                for channel in self.pool.prune(keep):
                    self._close_later(channel)
        return await self.discovery.choose(
            self.service, self.strategy, exclude=tuple(tried), policy=self.policy
        )

    def report(self, instance: ServiceInstance, ok: bool) -> None:
        with contextlib.suppress(Exception):
            self.discovery.report(self.service, instance, ok, policy=self.policy)

    async def one(self) -> tuple[ServiceInstance, Endpoint[grpc.aio.Channel]]:
        try:
            instance = await self.choose(())
        except NoInstanceAvailable as exc:
            raise _no_instance(self.service, exc) from exc
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
        self, core: _Core, args: tuple[Any, ...], request: Any, timeout: float | None, kw: Any
    ) -> None:
        self._core = core
        self._args = args
        self._request = request
        self._timeout = timeout
        self._kw = kw
        self._call: Any = None  # the attempt running or last run
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> Any:
        core = self._core
        method = self._args[1]
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        retries = core.effective_policy().retries
        idempotent = core.idempotent(method)
        tried: list[ServiceInstance] = []
        last: BaseException | None = None
        while True:
            try:
                instance = await core.choose(tried)
            except NoInstanceAvailable as exc:
                if last is not None:
                    _note_tried(last, tried)
                    raise last from None
                raise _no_instance(core.service, exc) from exc
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0 and last is not None:
                _note_tried(last, tried)
                raise last
            endpoint = core.pool.acquire(instance)
            try:
                self._call = endpoint.callable(*self._args)(
                    self._request, timeout=remaining, **self._kw
                )
                result = await self._call
            except grpc.RpcError as error:
                if not failed(error):
                    core.report(instance, True)
                    raise
                core.report(instance, False)
                tried.append(instance)
                last = error
                if len(tried) > retries or not (idempotent or never_sent(error)):
                    _note_tried(error, tried)
                    raise
                continue
            finally:
                core.pool.release(endpoint)
            core.report(instance, True)
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

    def __init__(self, core: _Core, args: tuple[Any, ...], request: Any, kw: Any) -> None:
        self._core = core
        self._args = args
        self._request = request
        self._kw = kw
        self._started: asyncio.Task[Any] = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> Any:
        instance, endpoint = await self._core.one()
        try:
            call = endpoint.callable(*self._args)(self._request, **self._kw)
        except BaseException:
            self._core.pool.release(endpoint)
            raise
        core = self._core

        async def settle(finished: Any) -> None:
            code = None
            with contextlib.suppress(BaseException):
                code = await finished.code()
            core.report(instance, code != grpc.StatusCode.UNAVAILABLE)
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
        self._args = (self.kind, method, ser, deser, registered)


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return _UnaryCall(self._core, self._args, request, timeout, kwargs)


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    kind = "unary_stream"

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._args, request, kwargs)


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._args, request_iterator, kwargs)


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    kind = "stream_stream"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return _StreamCall(self._core, self._args, request_iterator, kwargs)


class DiscoveryChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio`` channel to every healthy instance of ``service``, for generated stubs.

    The same keywords and rules as :class:`registry_agent.grpc.DiscoveryChannel`,
    over an :class:`~registry_agent.AsyncDiscovery`. Make it inside the event
    loop that will use it.
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
