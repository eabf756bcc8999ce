"""One registration tied to one socketserver-based HTTP server (werkzeug's, Django's runserver).

Shared by the Flask and Django integrations. The registration starts when the
server starts serving (its socket is listening) in the process that serves, and
ends in this order on SIGTERM/SIGINT or interpreter exit:

1. deregister (the instance leaves discovery),
2. wait ``drain_delay`` seconds (clients still holding the old list catch up),
3. stop accepting and close the listening socket,
4. wait, at most ``drain_timeout`` seconds, for the requests in flight,
5. SIGTERM then takes its usual course (the process ends by it); SIGINT ends
   the serve loop quietly, as the servers themselves do. A second signal
   meanwhile ends the process at once.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from registry_agent._backend import Backend
from registry_agent._blocking import Registrar
from registry_agent._env import ENV_BACKEND, backends_from_env, env_names_backend
from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._health.base import HealthCheck
from registry_agent._health.checks import HttpCheck
from registry_agent._models import ServiceInstance
from registry_agent._options import OPTION_KEYS, RegistrationOptions
from registry_agent._registrar import BackendArg, chain_signal
from registry_agent._urls import parse_duration

log = logging.getLogger("registry_agent")

WSGIApp = Callable[..., Iterable[bytes]]


class InFlight:
    """Counts WSGI requests in flight; :meth:`wait_idle` waits for them to end."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @property
    def count(self) -> int:
        """Requests in flight now."""
        return self._count

    def _enter(self) -> None:
        with self._idle:
            self._count += 1

    def _leave(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wrap(self, app: WSGIApp) -> WSGIApp:
        """A WSGI app counting each request until its response is closed."""

        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            self._enter()
            try:
                body = app(environ, start_response)
            except BaseException:
                self._leave()
                raise
            return _Closing(body, self._leave)

        return counted

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still were after ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class _Closing:
    """A WSGI response body that calls ``done`` once, when the server closes it."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class ServedRegistration:
    """Runs one server's ``serve_forever`` with ``registrar`` registered while it serves.

    ``serve`` is called in place of the server's own ``serve_forever`` (from the
    thread that serves: the main thread, or a reloader's serving thread).
    """

    def __init__(
        self,
        registrar: Registrar,
        server: socketserver.BaseServer,
        *,
        drain_delay: float,
        drain_timeout: float,
        stop_timeout: float = 10.0,
    ) -> None:
        self.registrar = registrar
        self.server = server
        self.drain_delay = drain_delay
        self.drain_timeout = drain_timeout
        self.stop_timeout = stop_timeout
        self.in_flight = InFlight()
        self._lock = threading.Lock()
        self._serving_thread: threading.Thread | None = None
        self._served = threading.Event()
        self._stopper: threading.Thread | None = None
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    def serve(self, serve_forever: Callable[[], None]) -> None:
        """Register, serve until shut down, then close and drain (see the module doc)."""
        self._serving_thread = threading.current_thread()
        close = self.server.server_close
        # Another thread closing the server (werkzeug's reloader closes it from the main
        # thread as the process ends) first takes the instance out of discovery.
        self.server.server_close = self._guarded_close(close)  # type: ignore[method-assign]
        in_main = self._serving_thread is threading.main_thread()
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        # A reloader's serving thread is not the main thread: the main thread ends the
        # process (werkzeug: closing the server first; Django: at exit).
        atexit.register(self.stop)
        with _active_lock:
            _active.append(self)
        started = time.monotonic()
        self.registrar.start()
        log.info(
            "registering %s while the server on port %s serves",
            self.registrar.instance.id,
            self.registrar.instance.port,
            extra={"event": "server_started"},
        )
        try:
            serve_forever()
        finally:
            try:
                self.begin_stop(wait=True)  # deregistered before the port closes
                close()  # no new connection from here on
                if not self.in_flight.wait_idle(self.drain_timeout):
                    log.warning(
                        "%d request(s) still in flight after drain_timeout=%gs; exiting anyway",
                        self.in_flight.count,
                        self.drain_timeout,
                        extra={"event": "drain_timeout"},
                    )
                if self._stopper is not None:
                    self._stopper.join(self.stop_timeout + self.drain_delay + 5.0)
                self.registrar.stop(self.stop_timeout)  # no-op once stopped
            finally:
                self._served.set()
                atexit.unregister(self.stop)
                with _active_lock:
                    _active.remove(self)
                if in_main:
                    for signum, previous in self._previous.items():
                        with contextlib.suppress(ValueError, TypeError):
                            signal.signal(signum, previous)
            log.debug("served for %.1fs", time.monotonic() - started)
        if self._signal == signal.SIGTERM:
            chain_signal(signal.SIGTERM, self._previous.get(signal.SIGTERM, signal.SIG_DFL))

    def _on_signal(self, signum: int, frame: Any) -> None:
        # On the main thread, which is also the serving thread: shutdown() would wait
        # for the serve loop this very thread runs. A helper thread does the steps.
        if self._signal is not None:
            # A second signal while stopping (a second Ctrl+C): exit now, as by default.
            log.warning("second signal %d while stopping: exiting now", signum)
            chain_signal(signum, signal.SIG_DFL)
            return
        self._signal = signum
        self.begin_stop(wait=False)

    def begin_stop(self, *, wait: bool) -> None:
        """Deregister, wait ``drain_delay``, then end the serve loop (once; from any thread).

        The main thread may be interrupted anywhere by a reloader's ``sys.exit``
        SIGTERM handler: the stopper is recorded only once it has started, and a
        second one (harmless: every step is idempotent) is started if it was not.
        """
        with self._lock:
            if self._stopper is None:
                stopper = threading.Thread(
                    target=self._stop_steps, name="registry-agent server stop", daemon=True
                )
                stopper.start()
                self._stopper = stopper
        stopper_now = self._stopper
        if wait and stopper_now is not None:
            stopper_now.join(self.stop_timeout + self.drain_delay + 5.0)

    def _stop_steps(self) -> None:
        self.registrar.stop(self.stop_timeout)
        if self.drain_delay > 0:
            time.sleep(self.drain_delay)
        if not self._served.is_set():
            self.server.shutdown()  # ends serve_forever's loop (returns once it has)

    def _guarded_close(self, close: Callable[[], None]) -> Callable[[], None]:
        def guarded() -> None:
            if threading.current_thread() is not self._serving_thread:
                self.stop()
            close()

        return guarded

    def stop(self) -> None:
        """From a thread other than the serving one: the full stop, waiting for the drain."""
        if threading.current_thread() is self._serving_thread:
            self.begin_stop(wait=False)
            return
        if threading.current_thread() is threading.main_thread():
            # A reloader's child: its SIGTERM handler raises SystemExit, and SIGTERM often
            # comes twice (the process group's, then the parent passing it on). Once
            # stopping, a repeat must not cut the bounded stop short.
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, _ignore)
        self.begin_stop(wait=True)
        self._served.wait(self.drain_timeout + 5.0)


def _ignore(signum: int, frame: Any) -> None:
    log.debug("signal %d ignored: already stopping", signum)


_active_lock = threading.Lock()
_active: list[ServedRegistration] = []


def stop_active() -> None:
    """The full stop of every registration whose server serves in this process."""
    with _active_lock:
        running = list(_active)
    for served in running:
        served.stop()


class ChildSignals:
    """SIGTERM in a reloader's child, installed from its main thread over the reloader's own.

    werkzeug's and Django's reloaders make SIGTERM ``sys.exit(0)`` in the main thread,
    which Python drops when it lands in a ``__del__`` (the child then runs on, still
    registered). This handler raises nothing: a thread stops the registrations
    (deregister, drain), then hands the signal back to the main thread, where the
    reloader's own handler ends the process. Repeats meanwhile are ignored.
    """

    def __init__(self) -> None:
        self._previous: Any = signal.SIG_DFL
        self._stopping = False
        self._stopped = threading.Event()

    def install(self) -> None:
        """From the main thread, after the reloader set its own handler."""
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        if self._stopped.is_set():
            chain_signal(signum, self._previous)
        elif not self._stopping:
            self._stopping = True
            threading.Thread(
                target=self._stop_then_exit, name="registry-agent reloader stop", daemon=True
            ).start()

    def _stop_then_exit(self) -> None:
        try:
            stop_active()
        finally:
            self._stopped.set()
            _thread.interrupt_main(signal.SIGTERM)


def graceful_call(args: list[str], env: dict[str, str], grace: float) -> int:
    """Run a reloader's child and return its exit status, as ``subprocess.call`` does.

    Except when the parent is told to stop (SIGTERM made ``SystemExit``, or
    ``KeyboardInterrupt``): ``subprocess.call`` then kills the child at once
    (SIGKILL), before it can deregister. Here the child gets SIGTERM (unless a
    terminal's Ctrl-C already reached it; again every 2 s, should one be lost)
    and ``grace`` seconds to finish, then SIGKILL.
    """
    with subprocess.Popen(args, env=env, close_fds=False) as child:
        try:
            return child.wait()
        except BaseException as exc:
            deadline = time.monotonic() + grace
            resend = not isinstance(exc, KeyboardInterrupt)
            while child.poll() is None and time.monotonic() < deadline:
                if resend:
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(min(2.0, max(0.0, deadline - time.monotonic())))
                resend = True
            if child.poll() is None:
                child.kill()
            raise


# ---------------------------------------------------------------- settings

#: Keys of the instance (ServiceInstance fields) a framework's settings may give.
INSTANCE_KEYS = ("service", "address", "port", "id", "tags", "meta", "scheme", "version")
#: Every key the Flask and Django settings accept (option keys: RegistrationOptions).
SETTING_KEYS: frozenset[str] = frozenset(
    {*INSTANCE_KEYS, "backend", "checks", "health_path", "drain_delay", "drain_timeout"}
    | {"enabled", "stop_timeout"}
    | (OPTION_KEYS - {"retry"})
)


@dataclass(frozen=True)
class Settings:
    """Validated integration settings; ``port``/``address`` may be left to the server.

    ``backend`` is None when neither the settings nor the environment name one:
    commands that never register (a test client, ``migrate``) need none; a server
    that starts serving gets :meth:`require_backend`'s ConfigError.
    """

    backend: BackendArg | None
    service: str
    instance: dict[str, Any]
    checks: tuple[HealthCheck | Callable[[], Any], ...]
    health_path: str
    options: RegistrationOptions
    drain_delay: float
    drain_timeout: float
    stop_timeout: float
    enabled: bool
    #: The setting that names the backend, for the error when none is given.
    backend_setting: str = "backend"

    def require_backend(self) -> BackendArg:
        """The backend; none given (settings nor environment): a ConfigError naming both."""
        if self.backend is None:
            raise _no_backend(self.backend_setting)
        return self.backend

    @property
    def grace(self) -> float:
        """Seconds a stopping server may take: deregistration, drain delay, drain, margin."""
        return self.stop_timeout + self.drain_delay + self.drain_timeout + 5.0

    def make_instance(self, host: str = "", port: int = 0) -> ServiceInstance:
        """The instance for a server bound to ``host``:``port`` (settings take precedence)."""
        fields = dict(self.instance)
        fields.setdefault("port", port)
        if "address" not in fields and host not in _WILDCARDS:
            fields["address"] = host
        return ServiceInstance(self.service, **fields)

    def checks_for(self, host: str, port: int) -> list[HealthCheck | Callable[[], Any]]:
        """The checks, with ``health_path``'s HttpCheck on ``host``:``port`` (loopback if any)."""
        checks = list(self.checks)
        if self.health_path:
            local = "::1" if host == "::" else ("127.0.0.1" if host in _WILDCARDS else host)
            if ":" in local:
                local = f"[{local}]"
            interval = min(2.0, self.options.ttl / 3)
            checks.append(HttpCheck(f"http://{local}:{port}{self.health_path}", interval=interval))
        return checks

    def make_registrar(self, host: str, port: int) -> Registrar:
        """The registrar for a server bound to ``host``:``port``."""
        instance = self.make_instance(host, port)
        checks = self.checks_for(host, instance.port)
        return Registrar(self.require_backend(), instance, checks=checks, options=self.options)


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _no_backend(setting: str) -> ConfigError:
    return ConfigError(
        "required to register: a registry URL such as 'consul://127.0.0.1:8500' or a list "
        f"of them; or, in the environment, {ENV_BACKEND}, or Consul's CONSUL_HTTP_ADDR, "
        "or etcd's ETCDCTL_ENDPOINTS (none is set)",
        field=setting,
    )


def _backend_from_env() -> BackendArg | None:
    """No backend in the settings: the environment's (``backends_from_env``), as they are.

    The URLs carry their secrets beside the text (:class:`EnvBackendURL`). Nothing
    set: None (required only when a server starts serving); a bad variable: its
    ConfigError, naming the variable.
    """
    if not env_names_backend():
        return None
    found = backends_from_env()
    return found[0] if len(found) == 1 else found


def refuse_to_serve(server: socketserver.BaseServer, error: ConfigError, code: int) -> NoReturn:
    """A server that cannot register: ``Error: …`` on stderr, its socket closed, exit ``code``.

    Called before the server accepts. From the main thread by ``SystemExit``; from a
    reloader's serving thread (where ``SystemExit`` would end that thread alone, the
    process left running without serving) by ``os._exit``, as Django's runserver
    does for a port in use. The reloader's parent then exits with the same status.
    """
    with contextlib.suppress(OSError):
        server.server_close()
    sys.stderr.write(f"Error: {error}\n")
    sys.stderr.flush()
    if threading.current_thread() is threading.main_thread():
        raise SystemExit(code)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(code)


def parse_settings(
    values: Mapping[str, Any], name: Callable[[str], str], *, default_service: str = ""
) -> Settings:
    """Validate ``values`` (the flat keys of :data:`SETTING_KEYS`); errors name ``name(key)``."""
    unknown = sorted(str(key) for key in values if key not in SETTING_KEYS)
    if unknown:
        raise ConfigError(
            "unknown key; expected one of " + ", ".join(sorted(SETTING_KEYS)),
            field=name(unknown[0]),
        )
    backend = values.get("backend")
    from_env = not backend
    if from_env:
        backend = _backend_from_env()
    if backend is not None and (
        not isinstance(backend, str)
        and not (
            isinstance(backend, list | tuple) and all(isinstance(b, str | Backend) for b in backend)
        )
        and not isinstance(backend, Backend)
    ):
        raise ConfigError(
            f"expected a registry URL or a list of them, got {backend!r}", field=name("backend")
        )
    service = values.get("service", default_service)
    instance: dict[str, Any] = {}
    for key in INSTANCE_KEYS[1:]:
        if values.get(key) not in (None, ""):
            instance[key] = (
                tuple(values[key])
                if key == "tags" and isinstance(values[key], list)
                else values[key]
            )
    # Validate now (at import or app creation), with placeholders for what the server says.
    try:
        ServiceInstance(service, **{"address": "127.0.0.1", "port": 1, **instance})
    except ConfigError as exc:
        raise ConfigError(exc.reason, field=name(exc.field or "service")) from None
    except TypeError as exc:
        raise ConfigError(f"invalid value ({exc})", field=name("service")) from None
    checks = values.get("checks") or ()
    if not isinstance(checks, list | tuple) or not all(
        isinstance(c, HealthCheck) or callable(c) for c in checks
    ):
        raise ConfigError(
            "expected a list of checks (HttpCheck, TcpCheck, CommandCheck or callables), "
            f"got {checks!r}",
            field=name("checks"),
        )
    health_path = values.get("health_path") or ""
    if not isinstance(health_path, str) or (health_path and not health_path.startswith("/")):
        raise ConfigError(
            f"expected a path starting with '/', e.g. '/healthz', got {health_path!r}",
            field=name("health_path"),
        )
    option_table = {k: v for k, v in values.items() if k in OPTION_KEYS}
    try:
        options = RegistrationOptions.from_mapping(option_table)
    except ConfigError as exc:
        raise ConfigError(exc.reason, field=name(exc.field or "ttl")) from None
    # The backend URL(s), checked now (building a registrar opens no connection).
    try:
        if backend is not None:
            instance_check = ServiceInstance(service, address="127.0.0.1", port=1)
            Registrar(backend, instance_check, options=options)
    except ConfigError as exc:
        if from_env:  # backends_from_env's error names the variable
            raise
        raise ConfigError(exc.reason, field=name("backend")) from None
    except BackendNotFound as exc:
        raise ConfigError(str(exc), field=name("backend")) from None
    seconds: dict[str, float] = {}
    for key, default in (("drain_delay", 0.0), ("drain_timeout", 30.0), ("stop_timeout", 10.0)):
        value = values.get(key, default)
        seconds[key] = parse_duration(value, field=name(key))
    enabled = values.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"expected True or False, got {enabled!r}", field=name("enabled"))
    return Settings(
        backend=list(backend) if isinstance(backend, tuple) else backend,
        backend_setting=name("backend"),
        service=service,
        instance=instance,
        checks=tuple(checks),
        health_path=health_path,
        options=options,
        drain_delay=seconds["drain_delay"],
        drain_timeout=seconds["drain_timeout"],
        stop_timeout=seconds["stop_timeout"],
        enabled=enabled,
    )
