"""Blocking facades: run the async core on a private event-loop thread.

Like httpx's ``Client`` over ``AsyncClient``: no logic lives here, only the
hop between the caller's thread and the loop thread, each bounded in time.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, TypeVar, Unpack

from registry_agent._discovery import AsyncDiscovery
from registry_agent._errors import RegistryError
from registry_agent._events import WatchEvent
from registry_agent._fork import ForkGuard
from registry_agent._health.gate import GateState
from registry_agent._models import InstanceHealth, ServiceInstance
from registry_agent._policy import DiscoveryPolicy
from registry_agent._registrar import AsyncRegistrar, BackendArg, RegistrarArgs, chain_signal
from registry_agent._retry import RetryPolicy
from registry_agent._select import Selector, Strategy
from registry_agent._status import RegistrationStatus
from registry_agent._watcher import AsyncWatcher, Backends, WatcherStats, _Consumer

__all__ = ["Discovery", "LoopThread", "Registrar", "Watcher"]

log = logging.getLogger("registry_agent")

# Bound on a hop into the loop thread for calls that do no network I/O.
_QUICK = 10.0
# A stop's hop into the loop thread is bounded by its timeout plus this; closing the
# loop thread after it by _CLOSE.
_STOP_HOP = 2.0
_CLOSE = 5.0

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread, with bounded calls into it.

    The thread exists only in the process that started it: in a child that
    inherited the object through ``fork()``, :meth:`run` raises at once and
    :meth:`close` returns at once, instead of waiting on a thread that is not there.
    """

    def __init__(self, name: str, what: str | None = None) -> None:
        self.name = name
        #: What the thread serves, as fork warnings and errors name it.
        self.what = what or name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fork: ForkGuard | None = None

    def in_child(self, action: str) -> bool:
        """True (and one warning) when the loop was started in a process we forked from."""
        return self._fork is not None and self._fork.in_child(action)

    def forked(self) -> bool:
        """True (silently) when the loop was started in a process we forked from."""
        return self._fork is not None and self._fork.forked()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (starting the thread on first use, from any thread)."""
        with self._lock:
            if self._loop is None:
                self._loop = self._start()
            return self._loop

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._fork = ForkGuard(self.what)
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        return loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop thread; its result comes through the future."""
        if self._fork is not None and self._fork.forked():
            coro.close()
            raise RegistryError(
                f"{self.what}: started in process {self._fork.pid}, this is process "
                f"{os.getpid()} (it crossed fork()): its event loop thread does not exist here; "
                "create the object after the fork (e.g. in a gunicorn post_fork hook)"
            )
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking call made from the registrar's own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop thread and wait for it, at most ``timeout`` seconds."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError (e.g. RegistrationTimeout)
            future.cancel()
            raise RegistryError(
                f"{self.name}: no answer from the event loop thread within {timeout:g}s"
            ) from None

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on the loop thread, if the loop still runs (never starts it)."""
        loop = self._loop
        if loop is None or (self._fork is not None and self._fork.forked()):
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(callback)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join its thread, within ``timeout``.

        In a forked child: forget them.
        """
        loop, self._loop = self._loop, None
        if loop is None or (self._fork is not None and self._fork.forked()):
            return

        async def shutdown() -> None:
            try:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=timeout / 2)
                await asyncio.wait_for(loop.shutdown_asyncgens(), timeout / 4)
            finally:
                loop.stop()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
        except RuntimeError:
            return  # already closed
        if self._thread is not None:
            self._thread.join(timeout)
        if not loop.is_running():
            loop.close()


# Every started Registrar and Watcher, from start() until stop()/close(): the loop
# thread keeps the async core running whether or not the app still holds the facade,
# so the facade is held too. One the app dropped stays stoppable (the exit hook below)
# and visible (RegistryCollector holds facades by weak reference only).
_running: set[Registrar | Watcher] = set()
_running_lock = threading.Lock()


def _hold(facade: Registrar | Watcher) -> None:
    with _running_lock:
        _running.add(facade)


def _release(facade: Registrar | Watcher) -> None:
    with _running_lock:
        _running.discard(facade)


# The exit hook's stop timeout for each Registrar (Registrar.stop's default).
_EXIT_STOP = 10.0


@atexit.register
def _stop_running() -> None:
    """At interpreter exit, stop every Registrar (deregistering it, within its stop
    timeout) and close every Watcher still running, dropped by the app or not. Ones
    started in another process (inherited through ``fork()``) are left alone, silently:
    their registration is that process's.

    All at once, each facade on a helper thread (each has its own loop thread), with one
    deadline for them all: the watchers first (none then sees the registrars'
    deregistrations on its way out), then the registrars, so exit takes about one stop
    timeout however many there are and whatever registry does not answer."""
    with _running_lock:
        facades = [facade for facade in _running if not facade._thread.forked()]
        _running.clear()
    watchers = [facade.close for facade in facades if isinstance(facade, Watcher)]
    registrars = [
        functools.partial(facade.stop, _EXIT_STOP)
        for facade in facades
        if isinstance(facade, Registrar)
    ]
    _all_at_once(watchers, _QUICK + 1.0)
    _all_at_once(registrars, _EXIT_STOP + _STOP_HOP + 1.0)


def _all_at_once(calls: Sequence[Callable[[], None]], within: float) -> None:
    """Run each call on a thread of its own; wait for them all, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    threads = [
        threading.Thread(target=call, name="registry-agent exit", daemon=True) for call in calls
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _quietly(what: str, call: Callable[[], object]) -> None:
    """Run one shutdown step: whatever it raises is logged, never raised."""
    try:
        call()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
        log.warning("%s failed: %s", what, reason, extra={"event": "stop_failed"})
        if not isinstance(exc, RegistryError):
            log.debug("unexpected error during %s", what, exc_info=exc)


class Registrar:
    """Blocking facade over :class:`AsyncRegistrar` for sync apps (Flask, Django, scripts).

    Takes the same arguments (``deregister_critical_after=None`` keeps the
    backend's own setting; ``backend`` may be a list of URLs and Backends: one
    entry kept in each, see :class:`AsyncRegistrar`); registration runs on a
    private event-loop thread created by :meth:`start`. With
    ``install_signal_handlers=True`` (call :meth:`start` from the main thread),
    SIGTERM/SIGINT deregister before the signal takes its usual course.

    A started registrar is held by the module from :meth:`start` until
    :meth:`stop` (its loop thread runs until then anyway): one the app no longer
    references keeps its entry registered, stays in a
    :class:`~registry_agent.RegistryCollector` it was added to, and is stopped
    (deregistered) at interpreter exit, like every registrar still running then.
    """

    def __init__(
        self,
        backend: BackendArg,
        instance: ServiceInstance,
        **kwargs: Unpack[RegistrarArgs],
    ) -> None:
        install_signal_handlers = kwargs.pop("install_signal_handlers", False)
        # The loop thread cannot take signals: this facade installs its own.
        self._async = AsyncRegistrar(backend, instance, **kwargs)
        self.install_signal_handlers = install_signal_handlers
        self._thread = LoopThread(
            f"registry-agent {instance.id}", f"Registrar({instance.service}/{instance.id})"
        )
        self._signals: list[tuple[int, Any]] = []
        # The stop is done once, by its first caller (or a helper thread when that caller
        # is the loop thread): later callers wait for _stop_done within their own bound.
        self._stop_lock = threading.Lock()
        self._stopper: threading.Thread | None = None
        self._stop_done = threading.Event()

    @property
    def instance(self) -> ServiceInstance:
        """The instance this registrar keeps registered."""
        return self._async.instance

    @property
    def state(self) -> GateState:
        """The health gate's state: starting, registered, withdrawn or stopped."""
        return self._async.state

    @property
    def registered(self) -> bool:
        """True while the registry holds our entry."""
        return self._async.registered

    @property
    def ready(self) -> bool:
        """True while the registry holds our entry as passing (what ``/readyz`` reports)."""
        return self._async.ready

    @classmethod
    def from_env(cls, instance: ServiceInstance, **kwargs: Unpack[RegistrarArgs]) -> Registrar:
        """A registrar on the backends the environment names: ``REGISTRY_AGENT_BACKEND``,
        else Consul's ``CONSUL_HTTP_ADDR``…, else etcd's ``ETCDCTL_ENDPOINTS``… (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``."""
        return cls(None, instance, **kwargs)

    def start(self, *, wait_registered: float | None = None) -> Registrar:
        """Start in the background and return at once (or wait, see AsyncRegistrar.start)."""
        timeout = None if wait_registered is None else wait_registered + 15.0
        if self.install_signal_handlers:
            # Before the wait: a SIGTERM while one registry already holds the entry
            # and another is still awaited must deregister it, not kill the process.
            self._install_signal_handlers()
        try:
            self._thread.run(self._async.start(wait_registered=wait_registered), timeout)
        except BaseException:
            _quietly("removing the signal handlers", self._remove_signal_handlers)
            self._thread.close()
            raise
        _hold(self)
        return self

    def wait_registered(self, timeout: float | None = None) -> bool:
        """Block until the entry is in the registry; False on timeout."""
        bound = None if timeout is None else timeout + 5.0
        return self._thread.run(self._async.wait_registered(timeout), bound)

    def set_backends(self, backends: BackendArg, *, timeout: float = 10.0) -> None:
        """Change the registries while running (see ``AsyncRegistrar.set_backends``): the
        ones kept are not touched, those dropped are deregistered within ``timeout``."""
        self._thread.run(self._async.set_backends(backends, timeout=timeout), timeout + 5.0)

    def update(
        self,
        *,
        tags: Iterable[str] | None = None,
        meta: Mapping[str, str | int] | None = None,
        weight: int | None = None,
    ) -> None:
        """Change the entry's tags, meta or weight in place (see ``AsyncRegistrar.update``);
        returns once validated, the registries are written in the background."""
        if self._thread._loop is None:  # not started: nothing runs yet, no thread needed
            asyncio.run(self._async.update(tags=tags, meta=meta, weight=weight))
            return
        self._thread.run(self._async.update(tags=tags, meta=meta, weight=weight), 30.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Deregister and stop within about ``timeout`` seconds; then the loop thread ends.

        Never raises: a failure is logged (the entry then goes when its TTL
        runs out). The first call does the stop; a call made meanwhile (from
        another thread, the signal handler, the exit hook) waits for that stop
        to end, at most about ``timeout`` seconds of its own. Called from the
        registrar's own loop thread (an ``on_event`` callback), it returns at
        once and the stop runs on in a helper thread. In a child process that
        inherited a started registrar through ``fork()`` it returns at once
        with a warning (the registration belongs to the parent); so does the
        ``atexit`` hook.
        """
        if self._thread.in_child("stop()"):
            _release(self)
            return
        here = threading.current_thread()
        on_loop = here is self._thread._thread
        with self._stop_lock:
            stopper = self._stopper
            if stopper is None:
                if on_loop:  # the loop cannot wait for itself: a helper thread stops it
                    self._stopper = threading.Thread(
                        target=self._stop,
                        args=(timeout,),
                        name=f"registry-agent stop {self.instance.id}",
                        daemon=True,
                    )
                    self._stopper.start()
                    return
                self._stopper = here
        if stopper is None:
            self._stop(timeout)
            return
        if stopper is here or on_loop:
            return  # a stop this very thread is making (a signal handler within it)
        bound = timeout + _STOP_HOP + _CLOSE
        if not self._stop_done.wait(bound):
            log.warning(
                "stop of %s: still running in thread %r after %gs; not waiting longer",
                self.instance.id,
                stopper.name,
                bound,
                extra={"event": "stop_failed"},
            )

    def _stop(self, timeout: float) -> None:
        """The stop itself, made once; held (so stopped at exit) until it has ended."""
        try:
            _quietly("removing the signal handlers", self._remove_signal_handlers)
            try:
                _quietly(
                    f"stop of {self.instance.id}",
                    lambda: self._thread.run(self._async.stop(timeout), timeout + _STOP_HOP),
                )
            finally:
                _quietly("stopping the loop thread", lambda: self._thread.close(_CLOSE))
        finally:
            _release(self)
            self._stop_done.set()

    def snapshot(self) -> RegistrationStatus:
        """The registration's state now, as one typed value (see ``AsyncRegistrar.snapshot``)."""
        return self._async.snapshot()

    def status(self) -> dict[str, Any]:
        """See :meth:`AsyncRegistrar.status`."""
        return self._async.status()

    def __enter__(self) -> Registrar:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Registrar({self.instance.service}/{self.instance.id}, state={self.state})"

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers needs start() from the main thread")
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
            self._signals.append((sig, previous))
        atexit.register(self.stop)

    def _remove_signal_handlers(self) -> None:
        atexit.unregister(self.stop)
        # Only the main thread may restore them: stopped from another thread, ours stay
        # (and still know what they chain to) until a signal comes.
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._signals:
                signal.signal(sig, previous)
            self._signals.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        previous = dict(self._signals).get(signum, signal.SIG_DFL)
        self.stop()  # or wait for the stop another thread is making
        self._remove_signal_handlers()
        chain_signal(signum, previous)


async def _next_event(consumer: AsyncIterator[WatchEvent]) -> WatchEvent | None:
    try:
        return await anext(consumer)
    except StopAsyncIteration:
        return None


class Watcher:
    """Blocking facade over :class:`AsyncWatcher`: ``for event in watcher`` blocks.

    Each ``for`` loop (in any thread) is a consumer of its own, as with
    :class:`AsyncWatcher`: it first gets ``added`` for what exists, then every
    change; a slow one gets coalesced events, never an unbounded queue.
    :meth:`close` (from any thread) ends every pending iteration promptly.
    ``backend`` may be a list of URLs and Backends: one merged view of them all
    (see :class:`AsyncWatcher`).

    A started watcher is held by the module from :meth:`start` (or the first
    iteration) until :meth:`close`: one the app no longer references keeps
    watching, stays in a :class:`~registry_agent.RegistryCollector` it was added
    to, and is closed at interpreter exit.
    """

    def __init__(
        self,
        backend: Backends,
        services: str | Iterable[str],
        *,
        retry: RetryPolicy | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        lag_warning: float = 10.0,
    ) -> None:
        self._async = AsyncWatcher(
            backend, services, retry=retry, on_error=on_error, lag_warning=lag_warning
        )
        names = ",".join(self._async.services)
        self._thread = LoopThread(f"registry-agent watch {names}", f"Watcher({names})")
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        # Done once close() is called: wakes every blocked iteration.
        self._closing: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def services(self) -> tuple[str, ...]:
        """The watched service names."""
        return self._async.services

    @classmethod
    def from_env(cls, services: str | Iterable[str], **kwargs: Any) -> Watcher:
        """A watcher of the backends the environment names (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``.
        ``kwargs``: the constructor's keywords."""
        return cls(None, services, **kwargs)

    def start(self) -> Watcher:
        """Start watching in the background (iterating starts it too)."""
        with self._lock:
            if not self._started and not self._closed:
                self._started = True
                self._thread.run(self._async.start(), _QUICK)
                _hold(self)
        return self

    def __iter__(self) -> Iterator[WatchEvent]:
        self.start()
        with self._lock:
            if self._closed:
                return
            consumer = self._thread.run(self._subscribe(), _QUICK)
        try:
            while True:
                with self._lock:  # never submit to a loop close() has stopped
                    if self._closed:
                        return
                    future = self._thread.submit(_next_event(consumer))
                waiting: list[concurrent.futures.Future[Any]] = [future, self._closing]
                concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
                if not future.done():
                    future.cancel()
                    return
                try:
                    event = future.result()
                except concurrent.futures.CancelledError:
                    return
                if event is None:
                    return
                yield event
        finally:
            self._thread.call_soon(consumer.close)

    async def _subscribe(self) -> _Consumer:
        return self._async._subscribe()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until every service has been read once; False on timeout."""
        self.start()
        bound = None if timeout is None else timeout + _QUICK
        return self._thread.run(self._async.wait_synced(timeout), bound)

    def snapshot(self, service: str | None = None) -> list[InstanceHealth]:
        """See :meth:`AsyncWatcher.snapshot`."""
        return self._async.snapshot(service)

    def stats(self) -> WatcherStats:
        """See :meth:`AsyncWatcher.stats` (any thread; never waits for the watch)."""
        return self._async.stats()

    def close(self) -> None:
        """Stop watching; every blocked ``for`` loop ends. Never raises.

        In a child process that inherited a started watcher through ``fork()``
        it returns at once with a warning.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _release(self)
        self._closing.set_result(None)
        if self._thread.in_child("close()"):
            return
        try:
            if self._started:
                _quietly(
                    "closing the watcher", lambda: self._thread.run(self._async.close(), _QUICK)
                )
        finally:
            _quietly("stopping the loop thread", self._thread.close)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ClosedLoopThread(LoopThread):
    """A closed Discovery's loop thread: it refuses work and never starts a thread, so
    nothing (a channel submitting straight to it either) brings the discovery back."""

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        coro.close()
        raise RuntimeError("the discovery is closed: create a new one")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        raise RuntimeError("the discovery is closed: create a new one")


class Discovery:
    """Blocking facade over :class:`AsyncDiscovery` (same arguments and methods).

    ``backend`` may be a list of URLs and Backends: instances come from one view
    merged over them all (see :class:`AsyncDiscovery`).
    """

    def __init__(
        self,
        backend: Backends,
        *,
        keep_last_nonempty: bool = False,
        sync_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        selector: Selector | None = None,
        policy: DiscoveryPolicy | None = None,
        policies: Mapping[str, DiscoveryPolicy] | None = None,
        last_known_good: str | os.PathLike[str] | None = None,
        last_known_good_max_age: float | None = None,
    ) -> None:
        self._async = AsyncDiscovery(
            backend,
            keep_last_nonempty=keep_last_nonempty,
            sync_timeout=sync_timeout,
            retry=retry,
            on_error=on_error,
            selector=selector,
            policy=policy,
            policies=policies,
            last_known_good=last_known_good,
            last_known_good_max_age=last_known_good_max_age,
        )
        self._thread = LoopThread("registry-agent discovery", "Discovery")
        self._closed = False
        self._bound = sync_timeout + _QUICK

    @classmethod
    def from_env(cls, **kwargs: Any) -> Discovery:
        """Discovery over the backends the environment names (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``.
        ``kwargs``: the constructor's keywords."""
        return cls(None, **kwargs)

    def _check_open(self) -> None:
        # Before the loop thread is touched: a closed discovery starts no new one.
        if self._closed:
            raise RuntimeError("the discovery is closed: create a new one")

    def health(self, service: str) -> list[InstanceHealth]:
        """See :meth:`AsyncDiscovery.health`."""
        self._check_open()
        return self._thread.run(self._async.health(service), self._bound)

    def instances(self, service: str, healthy_only: bool = True) -> list[ServiceInstance]:
        """See :meth:`AsyncDiscovery.instances`."""
        self._check_open()
        return self._thread.run(self._async.instances(service, healthy_only), self._bound)

    def choose(
        self,
        service: str,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        *,
        exclude: Collection[str | ServiceInstance] = (),
        policy: DiscoveryPolicy | None = None,
    ) -> ServiceInstance:
        """See :meth:`AsyncDiscovery.choose`."""
        self._check_open()
        thread = self._thread
        if (
            thread._loop is not None
            and not thread.forked()
            and threading.current_thread() is not thread._thread
        ):
            # Served from memory in this thread while the watcher's view is unchanged.
            chosen = self._async._choose_now(service, strategy, exclude, policy)
            if chosen is not None:
                return chosen
        return self._thread.run(
            self._async.choose(service, strategy, exclude=exclude, policy=policy), self._bound
        )

    @property
    def policy(self) -> DiscoveryPolicy:
        """The policy of every service without one of its own."""
        return self._async.policy

    def policy_for(self, service: str) -> DiscoveryPolicy:
        """See :meth:`AsyncDiscovery.policy_for`."""
        return self._async.policy_for(service)

    def report(
        self,
        service: str,
        instance: ServiceInstance,
        ok: bool,
        *,
        policy: DiscoveryPolicy | None = None,
    ) -> None:
        """See :meth:`AsyncDiscovery.report` (a direct, thread-safe call)."""
        self._async.report(service, instance, ok, policy=policy)

    def ejected(
        self, service: str, *, policy: DiscoveryPolicy | None = None
    ) -> list[ServiceInstance]:
        """See :meth:`AsyncDiscovery.ejected` (a direct, thread-safe call)."""
        return self._async.ejected(service, policy=policy)

    def stale(self, service: str) -> bool:
        """See :meth:`AsyncDiscovery.stale` (a direct, thread-safe call)."""
        return self._async.stale(service)

    def is_service(self, name: str) -> bool:
        """See :meth:`AsyncDiscovery.is_service`."""
        self._check_open()
        return self._thread.run(self._async.is_service(name), self._bound)

    def close(self) -> None:
        """Stop every watch and the loop thread. Never raises. Afterwards
        :meth:`health`, :meth:`instances`, :meth:`choose` and :meth:`is_service`
        raise :class:`RuntimeError` and start nothing (no new loop thread or watch);
        :meth:`report` is ignored.

        In a child process that inherited a started discovery through
        ``fork()`` it returns at once with a warning.
        """
        if self._closed:
            return
        self._closed = True
        self._async._closed = True  # report() from other threads: ignored from now on
        if self._thread.in_child("close()"):
            return
        try:
            _quietly("closing the discovery", lambda: self._thread.run(self._async.close(), _QUICK))
        finally:
            _quietly("stopping the loop thread", self._thread.close)
            self._thread = _ClosedLoopThread(self._thread.name, self._thread.what)

    def __enter__(self) -> Discovery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
