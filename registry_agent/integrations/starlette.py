"""Starlette / FastAPI: register for as long as the app serves, leave discovery first on shutdown.

``FastAPI(lifespan=registry_lifespan(backend, instance))`` (or ``Starlette(lifespan=…)``)
starts an :class:`~registry_agent.AsyncRegistrar` on the app's own event loop at
startup and keeps it in ``app.state.registrar``. By default it registers once a TCP
connection to the instance's own address and port opens (the server listens only
after the lifespan's startup), so the entry never appears before the app serves.

Shutdown order. A server such as uvicorn runs the lifespan's shutdown only after it
has stopped accepting and drained its in-flight requests: deregistering there
would leave the instance in discovery for the whole drain, with the port already
refusing connections. So on SIGTERM/SIGINT (in the main thread) this helper
withdraws the instance first, waits ``drain_delay`` seconds (clients that cached the
instance stop sending to it; the server still accepts meanwhile), and only then
hands the signal to the server's own handler, which stops accepting, drains the
in-flight requests and runs the lifespan shutdown. A second signal meanwhile
skips the rest and goes to the server at once (uvicorn: a second Ctrl+C forces
the exit). A server whose signal handlers belong to the event loop (hypercorn's
``loop.add_signal_handler``) keeps them: the instance is then withdrawn at the
lifespan's shutdown, as it is for any shutdown that comes without a signal
(uvicorn's ``--limit-max-requests``).

The module imports nothing from Starlette: it works for any ASGI app whose
lifespan is ``lifespan(app)`` returning an async context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Unpack

from registry_agent._errors import ConfigError
from registry_agent._health.checks import HealthCheck, TcpCheck
from registry_agent._models import ServiceInstance
from registry_agent._registrar import AsyncRegistrar, BackendArg, RegistrarArgs, chain_signal

__all__ = ["Lifespan", "registry_lifespan", "serving_check"]

log = logging.getLogger("registry_agent.integrations")

#: What ``Starlette(lifespan=…)`` and ``FastAPI(lifespan=…)`` take: ``lifespan(app)``
#: returning an async context manager (which may yield the lifespan state).
Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Every keyword the registrar takes (the options included).
_REGISTRAR_KEYWORDS = frozenset(RegistrarArgs.__optional_keys__ | RegistrarArgs.__required_keys__)
_LIFESPAN_KEYWORDS = frozenset(
    {"lifespan", "drain_delay", "handle_signals", "stop_timeout", "wait_registered"}
)

#: Seconds without a registration, the checks failing, before one WARNING says why.
UNREGISTERED_WARNING_AFTER = 10.0


def serving_check(
    instance: ServiceInstance, *, interval: float = 1.0, timeout: float = 1.0
) -> TcpCheck:
    """The default check: a TCP connection to the instance's own address and port opens.

    A server that listens only after its lifespan startup (uvicorn, hypercorn) passes
    it once it serves. Where the advertised address is not reachable from the app
    itself (a port mapped by Docker), give ``checks`` of your own (an
    :class:`~registry_agent.HttpCheck` on a health endpoint).
    """
    return TcpCheck(
        instance.address or "127.0.0.1",
        instance.port,
        interval=interval,
        timeout=timeout,
        name="serving",
    )


def _seconds(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected a number of seconds, got {value!r}", field=name)
    if value < 0 or (positive and value == 0):
        bound = "greater than 0" if positive else "0 or more"
        raise ConfigError(f"expected {bound} seconds, got {value!r}", field=name)
    return float(value)


def check_arguments(
    instance: object, kwargs: dict[str, Any], own: Iterable[str], *, excluded: str
) -> None:
    """The arguments every launcher here checks first: a ServiceInstance, known
    keywords only (all of them listed when one is not), ``checks`` a list."""
    if not isinstance(instance, ServiceInstance):
        raise ConfigError(
            f"expected a ServiceInstance(service, address=..., port=...), got {instance!r}",
            field="instance",
        )
    accepted = (_REGISTRAR_KEYWORDS - {excluded}) | set(own)
    unknown = sorted(set(kwargs) - accepted - {excluded})
    if unknown:
        raise ConfigError(
            f"unknown keyword; expected one of {', '.join(sorted(accepted))}", field=unknown[0]
        )
    checks = kwargs.get("checks", ())
    if (
        isinstance(checks, HealthCheck | str | bytes)
        or callable(checks)
        or not isinstance(checks, Iterable)
    ):
        raise ConfigError(
            f"expected a list of checks (checks=[HttpCheck(...)]), got {checks!r}",
            field="checks",
        )


def uvicorn_config() -> Any | None:
    """The :class:`uvicorn.Config` of the uvicorn server running this code, when one
    does (read from the calling thread's stack); None otherwise."""
    if "uvicorn.server" not in sys.modules:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_globals.get("__name__") == "uvicorn.server":
            return getattr(frame.f_locals.get("self"), "config", None)
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _uvicorn_worker() -> bool:
    """True in a worker process of uvicorn's multiprocess supervisor (``--workers N``,
    or its ``Multiprocess`` run by hand). A ``--reload`` child is not one: it is the
    only server process, replaced when the code changes."""
    if multiprocessing.parent_process() is None or "uvicorn.supervisors.multiprocess" not in (
        sys.modules
    ):
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (
            code.co_name == "target"
            and frame.f_globals.get("__name__") == "uvicorn.supervisors.multiprocess"
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _refuse_uvicorn_workers(instance: ServiceInstance) -> None:
    if _uvicorn_worker():
        raise ConfigError(
            f"registry_lifespan cannot run in a worker of 'uvicorn --workers': every worker "
            f"would register {instance.id} and the first to stop would remove it for all; "
            f"serve the app with registry_agent.integrations.uvicorn.run(...) (one "
            f"registration held by the supervisor, the app without registry_lifespan) "
            f"or without --workers",
            field="workers",
        )


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _warn_if_unregistered(
    registrar: AsyncRegistrar, after: float, bound: tuple[str, int] | None
) -> None:
    """One WARNING when, ``after`` seconds on, the entry was never registered because
    its checks fail (the registry's own errors are logged by the registrar)."""
    await asyncio.sleep(after)
    if registrar.registered or registrar.gate.healthy:
        return
    instance = registrar.instance
    where = _shown(instance.address, instance.port)
    listens = ""
    if bound is not None and bound[0] != instance.address:
        listens = f"; uvicorn listens on {_shown(*bound)}"
    log.warning(
        "%s is not registered after %gs: its checks fail (%s); a check probing the "
        "advertised address means %s is not reachable from here%s: give "
        "ServiceInstance(address=...) where peers reach the server, or checks=[...]",
        instance.id,
        after,
        registrar.failing_checks(),
        where,
        listens,
        extra={"event": "not_registered", "service": instance.service},
    )


def _loop_owned(previous: object, loop: asyncio.AbstractEventLoop, sig: int) -> bool:
    """True when the event loop already owns ``sig`` (``loop.add_signal_handler``, as
    hypercorn does): taking it over would leave the server deaf to the signal."""
    if getattr(previous, "__name__", "") == "_sighandler_noop":
        return True
    handlers = getattr(loop, "_signal_handlers", None)
    return isinstance(handlers, dict) and sig in handlers


class ShutdownSignals:
    """SIGTERM/SIGINT: withdraw the instance, wait ``drain_delay``, then hand the signal on.

    Installed on the running loop (main thread only) over the handlers the server
    set; handing a signal on restores them first, so any later signal goes straight
    to the server.
    """

    def __init__(self, registrar: AsyncRegistrar, drain_delay: float, stop_timeout: float) -> None:
        self.registrar = registrar
        self.drain_delay = drain_delay
        self.stop_timeout = stop_timeout
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._handed_on = False

    @property
    def installed(self) -> tuple[int, ...]:
        """The signals hooked now."""
        return tuple(self._previous)

    def install(self) -> bool:
        """Hook SIGTERM and SIGINT on the running loop; False when none could be hooked
        (not the main thread, no signal support, or the loop's own handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if previous is None or _loop_owned(previous, loop, sig):
                continue
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            self._previous[sig] = previous
        return bool(self._previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        loop, previous = self._loop, dict(self._previous)
        self._previous.clear()
        if loop is None or threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in previous.items():
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)  # leaves SIG_DFL: put the server's back
                signal.signal(sig, handler)

    def _on_signal(self, sig: int) -> None:
        if self._task is None:
            log.info(
                "signal %s: withdrawing %s before the server drains",
                signal.Signals(sig).name,
                self.registrar.instance.id,
                extra={"event": "withdraw_on_signal", "service": self.registrar.instance.service},
            )
            assert self._loop is not None
            self._task = self._loop.create_task(self._withdraw_then_hand_on(sig))
            return
        # A second signal while withdrawing or waiting: on to the server at once.
        self._hurry.set()
        self._hand_on(sig)

    async def _withdraw_then_hand_on(self, sig: int) -> None:
        try:
            await self.registrar.stop(self.stop_timeout)
            if self.drain_delay > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.drain_delay):
                        await self._hurry.wait()
        finally:
            self._hand_on(sig)

    def _hand_on(self, sig: int) -> None:
        if self._handed_on:
            return
        self._handed_on = True
        previous = self._previous.get(sig, signal.SIG_DFL)
        self.uninstall()
        chain_signal(sig, previous)

    async def finish(self) -> None:
        """At the lifespan's shutdown: unhook, and let a withdrawal under way end (bounded)."""
        if not self._handed_on:
            self.uninstall()
        task = self._task
        if task is not None and not task.done():
            self._hurry.set()
            await asyncio.wait([task], timeout=self.stop_timeout + 1.0)


def registry_lifespan(
    backend: BackendArg,
    instance: ServiceInstance,
    *,
    lifespan: Lifespan | None = None,
    drain_delay: float = 0.0,
    handle_signals: bool = True,
    stop_timeout: float = 10.0,
    wait_registered: float | None = None,
    **kwargs: Unpack[RegistrarArgs],
) -> Lifespan:
    """A lifespan for ``FastAPI(lifespan=…)`` / ``Starlette(lifespan=…)`` that keeps
    ``instance`` registered in ``backend`` while the app serves.

    ``lifespan``: the app's own lifespan, wrapped: it starts first (the instance
    registers once it has set up what it needs) and ends last (after the instance
    has left discovery); the state it yields is passed on as is. The registrar is
    ``app.state.registrar`` (an :class:`~registry_agent.AsyncRegistrar`, on the
    app's own loop: ``status()``, ``ready`` for a readiness endpoint).

    ``checks`` (and every other keyword of :class:`~registry_agent.AsyncRegistrar`
    except ``install_signal_handlers``) go to the registrar. Without ``checks``,
    :func:`serving_check`: the instance registers once its own address and port
    accept connections (``rise`` passes of it, one a second).

    ``handle_signals`` (default True): on SIGTERM/SIGINT withdraw first, then wait
    ``drain_delay`` seconds, then hand the signal to the server (see the module's
    docstring); the server then drains. Otherwise, or where the server's loop owns
    the signals, the instance is withdrawn at the lifespan's shutdown.
    ``stop_timeout`` bounds the deregistration; ``wait_registered`` (seconds) holds
    the startup until the entry is in the registry (failing the startup on timeout).
    When the checks keep the entry out for :data:`UNREGISTERED_WARNING_AFTER`
    seconds (10), one WARNING says what they report (with the default check: the
    advertised address is not reachable from here, and where uvicorn listens).

    Raises :class:`~registry_agent.ConfigError` at once for bad arguments, and at the
    lifespan's startup in a worker of ``uvicorn --workers N`` (every worker would
    register the same instance, and the first to stop would remove it for all):
    use :func:`registry_agent.integrations.uvicorn.run` there. ``--reload`` is fine.
    """
    if "install_signal_handlers" in kwargs:
        raise ConfigError(
            "registry_lifespan hooks the signals itself (withdraw, drain_delay, then the "
            "server's own handler): use handle_signals=True/False",
            field="install_signal_handlers",
        )
    check_arguments(instance, dict(kwargs), _LIFESPAN_KEYWORDS, excluded="install_signal_handlers")
    delay = _seconds(drain_delay, "drain_delay", positive=False)
    bound = _seconds(stop_timeout, "stop_timeout", positive=True)
    if wait_registered is not None:
        _seconds(wait_registered, "wait_registered", positive=True)
    if lifespan is not None and not callable(lifespan):
        raise ConfigError(
            f"expected the app's lifespan function, got {lifespan!r}", field="lifespan"
        )
    args: dict[str, Any] = dict(kwargs)
    if "checks" not in args:
        args["checks"] = [serving_check(instance)]
    # Built now: a bad backend URL or option fails where the app is defined. An app
    # whose lifespan runs more than once (tests) gets a fresh registrar each time.
    first: list[AsyncRegistrar] = [AsyncRegistrar(backend, instance, **args)]

    def next_registrar() -> AsyncRegistrar:
        if first:
            return first.pop()
        fresh = dict(args)
        fresh["checks"] = [serving_check(instance)] if "checks" not in kwargs else args["checks"]
        return AsyncRegistrar(backend, instance, **fresh)

    @asynccontextmanager
    async def registered(app: Any) -> AsyncIterator[Any]:
        _refuse_uvicorn_workers(instance)
        registrar = next_registrar()
        async with AsyncExitStack() as stack:
            state = None
            if lifespan is not None:
                state = await stack.enter_async_context(lifespan(app))
            app_state = getattr(app, "state", None)
            if app_state is not None:
                app_state.registrar = registrar
            config = uvicorn_config()
            listening = None if config is None else (str(config.host), int(config.port))
            await registrar.start(wait_registered=wait_registered)
            warner = asyncio.get_running_loop().create_task(
                _warn_if_unregistered(registrar, UNREGISTERED_WARNING_AFTER, listening)
            )
            signals = ShutdownSignals(registrar, delay, bound)
            if handle_signals:
                signals.install()
            try:
                yield state
            finally:
                warner.cancel()
                await signals.finish()
                await registrar.stop(bound)

    return registered
