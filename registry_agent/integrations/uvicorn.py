"""uvicorn ``--workers N``: one registration per listening address, held by the supervisor.

uvicorn's supervisor binds the socket and spawns N worker processes that share it.
A registration in each worker under one address would drop the entry whenever one
worker stops (its deregistration removes what the others still serve). :func:`run`
is the launcher to use instead of ``uvicorn app:app --workers N``: it runs uvicorn's
own supervisor (:class:`uvicorn.supervisors.Multiprocess`) with one blocking
:class:`~registry_agent.Registrar` in the supervisor process. A worker that dies
or is killed is replaced by the supervisor while the others go on answering, and
the entry stays. On SIGTERM/SIGINT the launcher withdraws the instance first,
waits ``drain_delay``, and only then lets the supervisor stop its workers (each
drains its in-flight requests).

The default check (:func:`answering_check`) sends one HTTP request to the bound
address and passes on any HTTP answer: a worker serves. (A TCP connect would pass
even with no worker alive, as the supervisor's own listening socket completes it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import threading
from collections.abc import Mapping
from typing import Any, Unpack

from registry_agent._address import advertised_address
from registry_agent._blocking import Registrar
from registry_agent._errors import ConfigError
from registry_agent._health.checks import CallableCheck
from registry_agent._models import ServiceInstance
from registry_agent._registrar import BackendArg, RegistrarArgs, chain_signal
from registry_agent.integrations.starlette import _seconds, check_arguments

__all__ = ["answering_check", "run"]

log = logging.getLogger("registry_agent.integrations")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
_RUN_KEYWORDS = frozenset(
    {"workers", "host", "port", "drain_delay", "stop_timeout", "health_path", "uvicorn_options"}
)


def _default_address(instance: ServiceInstance) -> bool:
    """True when ``instance`` advertises the library's default address (it was built
    without one, or with that same address)."""
    try:
        return instance.address == advertised_address()
    except ConfigError:  # no default route: the address was given
        return False


def _advertise_bound_host(instance: ServiceInstance, host: str) -> ServiceInstance:
    """The instance to register for a server bound to ``host``: an instance built
    without an address advertises the bound host (unless it is a wildcard), as the
    default route's address would reach nothing there."""
    if host in _WILDCARDS or instance.address == host or not _default_address(instance):
        return instance
    default_id = f"{instance.service}-{instance.address}-{instance.port}".replace(":", "_")
    moved = dataclasses.replace(
        instance, address=host, id="" if instance.id == default_id else instance.id
    )
    log.info(
        "%s: advertising %s, the host uvicorn binds, instead of the default route's %s",
        moved.id,
        host,
        instance.address,
        extra={"event": "advertised_address", "service": instance.service},
    )
    return moved


def answering_check(
    host: str,
    port: int,
    *,
    path: str = "/",
    tls: bool = False,
    interval: float = 1.0,
    timeout: float = 2.0,
) -> CallableCheck:
    """Passes when ``GET path`` on ``host:port`` gets any HTTP answer (a 404 too): a
    worker serves. ``tls``: over TLS, without verifying our own certificate."""
    target = _WILDCARDS.get(host, host)
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    shown = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {shown}\r\nUser-Agent: registry-agent\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    async def answering() -> str:
        reader, writer = await asyncio.open_connection(target, port, ssl=context)
        try:
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not line.startswith(b"HTTP/"):
            raise RuntimeError(f"no HTTP answer from {shown}: {line[:60]!r}")
        return line.decode("latin-1").strip()

    return CallableCheck(answering, interval=interval, timeout=timeout, name="answering")


class _SupervisorSignals:
    """SIGTERM/SIGINT in the supervisor: withdraw (on a thread of its own, so the
    supervisor goes on replacing workers), wait ``drain_delay``, then give the signal
    to the supervisor's own handler. A second signal goes to it at once."""

    def __init__(self, registrar: Registrar, drain_delay: float, stop_timeout: float) -> None:
        self.registrar = registrar
        self.drain_delay = drain_delay
        self.stop_timeout = stop_timeout
        self._previous: dict[int, Any] = {}
        self._lock = threading.RLock()  # a signal may come while the main thread holds it
        self._thread: threading.Thread | None = None
        self._hurry = threading.Event()
        self._handed_on = False

    def install(self) -> None:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)

    def _on_signal(self, sig: int, frame: Any) -> None:
        with self._lock:
            first = self._thread is None
            if first:
                self._thread = threading.Thread(
                    target=self._withdraw_then_hand_on,
                    args=(sig,),
                    name="registry-agent withdraw",
                    daemon=True,
                )
        if first:
            log.info(
                "signal %s: withdrawing %s before the workers stop",
                signal.Signals(sig).name,
                self.registrar.instance.id,
                extra={"event": "withdraw_on_signal", "service": self.registrar.instance.service},
            )
            assert self._thread is not None
            self._thread.start()
            return
        self._hurry.set()
        self._hand_on(sig)

    def _withdraw_then_hand_on(self, sig: int) -> None:
        try:
            self.registrar.stop(self.stop_timeout)
            if self.drain_delay > 0:
                self._hurry.wait(self.drain_delay)
        finally:
            self._hand_on(sig)

    def _hand_on(self, sig: int) -> None:
        with self._lock:
            if self._handed_on:
                return
            self._handed_on = True
        # The supervisor's handler only queues the signal (any thread may call it); its
        # loop acts on it within half a second. Later signals go to it directly.
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(sig, None)
        elif threading.current_thread() is threading.main_thread():
            chain_signal(sig, previous)
        else:
            os.kill(os.getpid(), sig)

    def finish(self) -> None:
        self._hurry.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout + 1.0)
        self.uninstall()


def run(
    app: str,
    backend: BackendArg,
    instance: ServiceInstance,
    *,
    workers: int = 2,
    host: str = "127.0.0.1",
    port: int | None = None,
    drain_delay: float = 0.0,
    stop_timeout: float = 10.0,
    health_path: str = "/",
    uvicorn_options: Mapping[str, Any] | None = None,
    **kwargs: Unpack[RegistrarArgs],
) -> None:
    """Serve ``app`` (an import string, ``"package.module:app"``) with uvicorn's
    supervisor and ``workers`` processes on ``host:port``, keeping ``instance``
    registered in ``backend`` once for them all; returns when uvicorn has stopped.

    ``port`` defaults to the instance's port. An instance built without an address
    advertises ``host`` (unless it is ``0.0.0.0``/``::``: then the default route's
    address): the default route's address reaches nothing when uvicorn binds one
    address only. A specific ``host`` other than the advertised address is logged
    as a WARNING. ``uvicorn_options``: more keywords of
    :class:`uvicorn.Config` (``timeout_graceful_shutdown``, ``ssl_keyfile``, …).
    ``checks`` and every other keyword of :class:`~registry_agent.Registrar` go to
    the registrar; without ``checks``, :func:`answering_check` on ``health_path``
    at the advertised address (the loopback for a wildcard ``host``), once a second.
    On SIGTERM/SIGINT: withdraw, wait ``drain_delay`` seconds, then
    the supervisor stops its workers, which drain. The app itself must not register
    (no ``registry_lifespan`` in it): the launcher does it for all workers.

    Bad arguments raise :class:`~registry_agent.ConfigError`; call it from the main
    thread (it installs signal handlers), under ``if __name__ == "__main__":``
    (workers are spawned: they import the app by its name).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if "install_signal_handlers" in kwargs:
        raise ConfigError(
            "run() hooks the signals itself (withdraw, drain_delay, then the supervisor)",
            field="install_signal_handlers",
        )
    check_arguments(instance, dict(kwargs), _RUN_KEYWORDS, excluded="install_signal_handlers")
    if not isinstance(app, str) or ":" not in app:
        raise ConfigError(
            f"expected the app as an import string like 'package.module:app' "
            f"(the workers import it), got {app!r}",
            field="app",
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"expected a number of workers >= 1, got {workers!r}", field="workers")
    port = instance.port if port is None else port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"expected a port 1-65535, got {port!r}", field="port")
    if not isinstance(health_path, str) or not health_path.startswith("/"):
        raise ConfigError(
            f"expected a path like '/health', got {health_path!r}", field="health_path"
        )
    if not isinstance(host, str):
        raise ConfigError(f"expected an IP address or host name, got {host!r}", field="host")
    delay = _seconds(drain_delay, "drain_delay", positive=False)
    bound = _seconds(stop_timeout, "stop_timeout", positive=True)
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("registry_agent.integrations.uvicorn.run() needs the main thread")
    options = dict(uvicorn_options or {})
    for taken in ("app", "host", "port", "workers", "reload", "uds", "fd"):
        if taken in options:
            raise ConfigError(
                f"{taken!r} is run()'s own argument (uds/fd/reload are not supported)",
                field=f"uvicorn_options.{taken}",
            )
    instance = _advertise_bound_host(instance, host)
    if host not in _WILDCARDS and instance.address != host:
        log.warning(
            "%s advertises %s while uvicorn listens on %s only: peers reach it only if "
            "something forwards there (else bind host=%r or '0.0.0.0'); the default check "
            "probes the advertised address",
            instance.id,
            instance.address,
            host,
            instance.address,
            extra={"event": "advertised_address", "service": instance.service},
        )
    args: dict[str, Any] = dict(kwargs)
    if "checks" not in args:
        tls = bool(options.get("ssl_certfile") or options.get("ssl_context_factory"))
        # What is advertised; for a wildcard bind, the loopback (the server is there).
        probe = host if host in _WILDCARDS else instance.address
        args["checks"] = [answering_check(probe, port, path=health_path, tls=tls)]
    registrar = Registrar(backend, instance, **args)  # ConfigError before anything binds

    config = uvicorn.Config(app, host=host, port=port, workers=workers, **options)
    sock = config.bind_socket()
    try:
        supervisor = Multiprocess(config, sockets=[sock])  # sets its own signal handlers
        signals = _SupervisorSignals(registrar, delay, bound)
        signals.install()  # over the supervisor's: withdraw first, then hand on
        try:
            registrar.start()
            with contextlib.suppress(KeyboardInterrupt):
                supervisor.run()
        finally:
            signals.finish()
            registrar.stop(bound)
    finally:
        sock.close()
