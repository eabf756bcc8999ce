"""gunicorn hooks: one registration per listening address, held outside the workers.

A gunicorn config file imports the hooks::

    from registry_agent.integrations.gunicorn import registration_hooks

    when_ready, on_reload, on_exit = registration_hooks(
        "consul://127.0.0.1:8500", "orders", health_path="/healthz"
    )

What they do:

- ``when_ready`` (in the master, once it listens, before any worker is forked)
  starts a small *keeper* process: a fresh interpreter (``subprocess``, never
  ``fork``) that holds one registration per listening socket, as the master
  bound it (its real address and port; several ``bind`` entries give several
  registrations, never one per worker). The master itself runs no thread, no
  HTTP or gRPC client: what it forks stays clean for every backend (no
  ``GRPC_ENABLE_FORK_SUPPORT`` needed). Workers come and go (``max_requests``,
  a crash replaced by the master) without touching the registration.
- The registration waits for its health checks, as every registration does:
  by default a TCP connect to the bound address, or an HTTP GET of
  ``health_path`` there, served by the workers.
- On the master's SIGTERM, SIGINT or SIGQUIT the keeper deregisters FIRST
  (bounded by ``deregister_timeout``), optionally ``drain_delay`` passes, and
  only then does gunicorn close its listeners and stop its workers gracefully.
  gunicorn calls no hook before closing its listeners on these signals, so
  ``when_ready`` wraps the arbiter's ``handle_term``/``handle_int``/``handle_quit``.
- If the master dies (``kill -9``), the keeper notices (its parent changed)
  within 0.2 s, deregisters and exits.
- ``on_reload`` (SIGHUP) keeps the keeper as is when the registration did not
  change; otherwise the old one deregisters and a new one registers.
- ``on_exit`` stops a keeper still running (e.g. gunicorn halting because a
  worker failed to boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, Unpack

import registry_agent
from registry_agent._env import backends_from_env
from registry_agent._errors import ConfigError
from registry_agent._health.checks import HealthCheck, HttpCheck, TcpCheck
from registry_agent._models import ServiceInstance
from registry_agent._options import OptionArgs, RegistrationOptions

__all__ = ["GunicornHooks", "GunicornRegistration", "GunicornStartError", "registration_hooks"]

log = logging.getLogger("registry_agent.gunicorn")

#: The attribute of gunicorn's arbiter (the ``server`` the hooks receive) holding our keeper.
_KEEPER_ATTR = "_registry_agent_keeper"
#: The arbiter's handlers of the signals that stop it: wrapped to withdraw first.
_STOP_HANDLERS = ("handle_term", "handle_int", "handle_quit")
#: How often the keeper checks that the master is still its parent.
_PARENT_POLL = 0.2
#: What the keeper process runs (a fresh interpreter: nothing of the master's crosses).
_KEEPER_MAIN = "from registry_agent.integrations.gunicorn import _main; _main()"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}

#: Builds the checks of one listener from the host and port a check reaches it at.
CheckFactory = Callable[[str, int], Iterable[HealthCheck]]


class GunicornStartError(ConfigError, RuntimeError):
    """The registration cannot start (bad options, no TCP listener, the keeper failed).

    A ``RuntimeError`` too: gunicorn then prints ``Error: <message>`` and exits 1,
    without a traceback.
    """


class GunicornHooks(NamedTuple):
    """The hooks a gunicorn config assigns: ``when_ready, on_reload, on_exit = hooks``."""

    when_ready: Callable[[Any], None]
    on_reload: Callable[[Any], None]
    on_exit: Callable[[Any], None]


@dataclass(frozen=True)
class _Spec:
    """What the keeper process is told to hold (pickled to its stdin)."""

    backend: str | tuple[str, ...]
    #: Per registration: the instance (as ``ServiceInstance.to_dict``) and its checks.
    entries: tuple[tuple[dict[str, Any], tuple[HealthCheck, ...]], ...]
    options: RegistrationOptions = field(default_factory=RegistrationOptions)
    deregister_timeout: float = 5.0
    parent: int = 0
    log_level: str = "INFO"

    def key(self) -> tuple[Any, ...]:
        """Equal for equal registrations (to keep the keeper across a SIGHUP)."""
        # Checks have no equality of their own: compared by their pickled state.
        entries = tuple((data, pickle.dumps(checks)) for data, checks in self.entries)
        return (self.backend, entries, self.options, self.deregister_timeout, self.log_level)

    def instances(self) -> list[ServiceInstance]:
        """The instances to register."""
        return [ServiceInstance.from_dict(data) for data, _ in self.entries]


class GunicornRegistration:
    """Registers a gunicorn server once per listening address, from its master.

    ``backend`` is a registry URL (``"consul://127.0.0.1:8500"``,
    ``"etcd://127.0.0.1:2379"``) or a sequence of them; None (the default):
    from the environment (``REGISTRY_AGENT_BACKEND``, else Consul's or etcd's
    own variables, see :func:`~registry_agent.backends_from_env`). ``service``
    is the service name.
    Per listening socket one :class:`~registry_agent.ServiceInstance` is
    registered with the socket's real port, advertising ``address`` if given,
    else the bound host unless it is a wildcard (``0.0.0.0``/``::``), else the
    library's default address. ``id`` may be a template with ``{service}``,
    ``{address}`` and ``{port}`` (default: the library's ``service-address-port``).
    ``tags``, ``meta``, ``version`` and ``scheme`` (default ``https`` when
    gunicorn serves TLS, else ``http``) go to every instance.

    Health: ``checks`` (picklable checks such as :class:`~registry_agent.HttpCheck`,
    :class:`~registry_agent.TcpCheck`, :class:`~registry_agent.CommandCheck`, the
    same for every listener, or a function ``(host, port) -> checks`` called per
    listener); without them, a GET of ``health_path`` on the listener, or a TCP
    connect to it, every ``check_interval`` seconds (``check_timeout`` each).
    A wildcard bind is checked on loopback. The checks run in the keeper
    process, never in the master or the workers.

    ``deregister_timeout`` bounds the withdrawal on the master's stop signal;
    ``drain_delay`` then waits before gunicorn closes its listeners (for
    clients that cache discovery). ``start_timeout`` bounds the keeper's
    start. ``log_level`` is the keeper's (it logs to gunicorn's stderr). Any
    other keyword is a registration option (``ttl``, ``heartbeat``, ``fall``,
    ``rise``, ``on_unhealthy``, ``deregister_critical_after``, ``retry``).

    Invalid options raise :class:`~registry_agent.ConfigError` here, naming the
    field; what can only be known once gunicorn listens raises
    :class:`GunicornStartError` from :meth:`when_ready`.
    """

    def __init__(
        self,
        backend: str | Sequence[str] | None = None,
        service: str = "",
        *,
        address: str | None = None,
        id: str | None = None,
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        scheme: str | None = None,
        version: str = "",
        health_path: str | None = None,
        checks: Iterable[HealthCheck] | CheckFactory | None = None,
        check_interval: float = 5.0,
        check_timeout: float = 2.0,
        deregister_timeout: float = 5.0,
        drain_delay: float = 0.0,
        start_timeout: float = 30.0,
        log_level: str = "INFO",
        **options: Unpack[OptionArgs],
    ) -> None:
        if backend is None:
            # Resolved here, in the master (a ConfigError names the variable); the URLs
            # carry their secrets beside the text, pickled to the keeper with the rest.
            found = backends_from_env()
            self.backend: str | tuple[str, ...] = found[0] if len(found) == 1 else tuple(found)
        elif isinstance(backend, str):
            self.backend = backend
        elif isinstance(backend, Sequence) and backend and all(isinstance(b, str) for b in backend):
            self.backend = tuple(backend)
        else:
            raise ConfigError(
                f"expected a registry URL or a list of them, got {backend!r}", field="backend"
            )
        if health_path is not None and (
            not isinstance(health_path, str) or not health_path.startswith("/")
        ):
            raise ConfigError(
                f"expected a path starting with '/', got {health_path!r}", field="health_path"
            )
        for name, value in (
            ("check_interval", check_interval),
            ("check_timeout", check_timeout),
            ("deregister_timeout", deregister_timeout),
            ("start_timeout", start_timeout),
        ):
            _positive(name, value)
        if isinstance(drain_delay, bool) or not isinstance(drain_delay, int | float):
            raise ConfigError(f"expected seconds >= 0, got {drain_delay!r}", field="drain_delay")
        if drain_delay < 0:
            raise ConfigError(f"expected seconds >= 0, got {drain_delay!r}", field="drain_delay")
        level = log_level.upper() if isinstance(log_level, str) else log_level
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}",
                field="log_level",
            )
        if id is not None and not isinstance(id, str):
            raise ConfigError(f"expected a string, got {id!r}", field="id")
        #: The registration options (validated now: a ConfigError names the field).
        self.options = RegistrationOptions.build(options)
        self.service = service
        self.address = address
        self.id = id
        self.tags = tuple(tags)
        self.meta = dict(meta or {})
        self.scheme = scheme
        self.version = version
        self.health_path = health_path
        if checks is None or callable(checks):
            self.checks: tuple[HealthCheck, ...] | CheckFactory | None = checks
        else:
            self.checks = tuple(checks)
            for i, check in enumerate(self.checks):
                if not isinstance(check, HealthCheck):
                    raise ConfigError(
                        f"expected a HealthCheck, got {check!r}", field=f"checks[{i}]"
                    )
        self.check_interval = float(check_interval)
        self.check_timeout = float(check_timeout)
        self.deregister_timeout = float(deregister_timeout)
        self.drain_delay = float(drain_delay)
        self.start_timeout = float(start_timeout)
        self.log_level = level
        # What a listener on port 80 would register: the instance fields are checked now.
        self._instance("127.0.0.1", 80, scheme="http")

    @property
    def hooks(self) -> GunicornHooks:
        """``(when_ready, on_reload, on_exit)``, to assign in a gunicorn config file."""
        return GunicornHooks(self.when_ready, self.on_reload, self.on_exit)

    def listeners(self, server: Any) -> list[tuple[str, int]]:
        """The (host, port) of each TCP socket the master listens on (Unix sockets skipped).

        With ``reuse_port`` the master holds no socket (each worker binds its
        own): the configured ``bind`` addresses are used, which then need a port.
        """
        found: list[tuple[str, int]] = []
        sockets = list(getattr(server, "LISTENERS", None) or [])
        for listener in sockets:
            name = listener.getsockname()
            if isinstance(name, tuple) and len(name) >= 2:
                found.append((str(name[0]), int(name[1])))
            else:
                log.warning("registry-agent: not registering Unix socket %s", name)
        if not sockets:
            for bind in server.cfg.address:
                if isinstance(bind, tuple):
                    host, port = str(bind[0]), int(bind[1])
                    if port == 0:
                        raise GunicornStartError(
                            f"bind {host}:0 with reuse_port: no port to register", field="bind"
                        )
                    found.append((host, port))
        if not found:
            raise GunicornStartError(
                "gunicorn listens on no TCP address: nothing to register", field="bind"
            )
        return found

    def instances(self, server: Any) -> list[tuple[ServiceInstance, tuple[HealthCheck, ...]]]:
        """One (instance, checks) per distinct advertised address and port of ``server``."""
        scheme = self.scheme or ("https" if server.cfg.is_ssl else "http")
        entries: dict[tuple[str, int], tuple[ServiceInstance, tuple[HealthCheck, ...]]] = {}
        for host, port in self.listeners(server):
            instance = self._instance(host, port, scheme=scheme)
            if (instance.address, instance.port) in entries:
                continue  # e.g. 0.0.0.0:8000 and [::]:8000: one address to advertise
            entries[instance.address, instance.port] = (
                instance,
                self._checks(_WILDCARDS.get(host, host), port, scheme),
            )
        ids = [instance.id for instance, _ in entries.values()]
        if len(set(ids)) != len(ids):
            raise GunicornStartError(
                f"the listeners would share an id ({', '.join(ids)}): put {{port}} in it",
                field="id",
            )
        return list(entries.values())

    def when_ready(self, server: Any) -> None:
        """gunicorn's ``when_ready`` hook: start the keeper, wrap the stop signals."""
        if getattr(server, _KEEPER_ATTR, None) is not None:
            return  # already holding this master's registration
        keeper = _Keeper.start(self._spec(server), self.start_timeout, self.drain_delay)
        setattr(server, _KEEPER_ATTR, keeper)
        _wrap_stop_handlers(server)
        server.log.info(
            "registry-agent: keeper %s registers %s",
            keeper.pid,
            ", ".join(f"{i.id} ({i.address}:{i.port})" for i in keeper.spec.instances()),
        )

    def on_reload(self, server: Any) -> None:
        """gunicorn's ``on_reload`` hook (SIGHUP): re-register only if the registration changed.

        Never raises (an exception here would stop gunicorn): a reloaded config
        that cannot be registered is logged as an error, keeping the registration
        as it was; one whose keeper fails to start is logged, unregistered.
        """
        keeper: _Keeper | None = getattr(server, _KEEPER_ATTR, None)
        try:
            spec = self._spec(server)
        except ConfigError as exc:
            server.log.error("registry-agent: reloaded config not registered: %s", exc)
            return
        if keeper is not None and keeper.alive() and keeper.spec.key() == spec.key():
            keeper.drain_delay = self.drain_delay
            return
        if keeper is not None:
            took = keeper.stop(keeper.spec.deregister_timeout)
            server.log.info("registry-agent: old registration withdrawn in %.3fs", took)
        setattr(server, _KEEPER_ATTR, None)
        try:
            keeper = _Keeper.start(spec, self.start_timeout, self.drain_delay)
        except ConfigError as exc:
            server.log.error("registry-agent: reloaded config not registered: %s", exc)
            return
        setattr(server, _KEEPER_ATTR, keeper)
        _wrap_stop_handlers(server)
        server.log.info("registry-agent: keeper %s registers the reloaded config", keeper.pid)

    def on_exit(self, server: Any) -> None:
        """gunicorn's ``on_exit`` hook: withdraw if a stop signal did not already."""
        _withdraw(server, drain=False)

    def _spec(self, server: Any) -> _Spec:
        spec = _Spec(
            backend=self.backend,
            entries=tuple((i.to_dict(), checks) for i, checks in self.instances(server)),
            options=self.options,
            deregister_timeout=self.deregister_timeout,
            parent=os.getpid(),
            log_level=self.log_level,
        )
        try:
            pickle.dumps(spec)
        except Exception as exc:
            raise GunicornStartError(
                f"the keeper process cannot receive them ({exc}); give checks such as "
                "HttpCheck, TcpCheck or CommandCheck, and URLs as backends",
                field="checks",
            ) from None
        return spec

    def _instance(self, host: str, port: int, *, scheme: str) -> ServiceInstance:
        address = self.address or ("" if host in _WILDCARDS else host)
        try:
            shown = ServiceInstance(self.service, address=address, port=port).address
            ident = (
                self.id.format(service=self.service, address=shown, port=port)
                if self.id is not None
                else ""
            )
        except (KeyError, IndexError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"expected a template using {{service}}, {{address}}, {{port}}: {exc}", field="id"
            ) from None
        return ServiceInstance(
            self.service,
            address=address,
            port=port,
            id=ident,
            tags=self.tags,
            meta=self.meta,
            scheme=scheme,
            version=self.version,
        )

    def _checks(self, host: str, port: int, scheme: str) -> tuple[HealthCheck, ...]:
        if callable(self.checks):
            made = tuple(self.checks(host, port))
            for i, check in enumerate(made):
                if not isinstance(check, HealthCheck):
                    raise GunicornStartError(
                        f"the function returned {check!r}, not a HealthCheck", field=f"checks[{i}]"
                    )
            return made
        if self.checks is not None:
            return self.checks
        interval, timeout = self.check_interval, self.check_timeout
        if self.health_path is not None:
            netloc = f"[{host}]" if ":" in host else host
            url = f"{scheme}://{netloc}:{port}{self.health_path}"
            return (HttpCheck(url, interval=interval, timeout=timeout),)
        return (TcpCheck(host, port, interval=interval, timeout=timeout),)


def registration_hooks(
    backend: str | Sequence[str] | None = None, service: str = "", **kwargs: Any
) -> GunicornHooks:
    """``when_ready, on_reload, on_exit`` for a gunicorn config (see :class:`GunicornRegistration`).

    ``when_ready, on_reload, on_exit = registration_hooks("consul://127.0.0.1:8500", "orders")``;
    ``registration_hooks(service="orders")`` takes the registry from the environment.
    """
    return GunicornRegistration(backend, service, **kwargs).hooks


def _withdraw(server: Any, *, drain: bool) -> float | None:
    """Stop ``server``'s keeper (deregistering, bounded); seconds taken, or None.

    Called by the wrapped stop handlers before gunicorn closes its listeners
    (then waiting the ``drain_delay``); a no-op once done.
    """
    keeper: _Keeper | None = getattr(server, _KEEPER_ATTR, None)
    if keeper is None:
        return None
    setattr(server, _KEEPER_ATTR, None)
    took = keeper.stop(keeper.spec.deregister_timeout)
    server.log.info("registry-agent: withdrawn in %.3fs, before the listeners close", took)
    if drain and keeper.drain_delay > 0:
        time.sleep(keeper.drain_delay)
    return took


def _wrap_stop_handlers(server: Any) -> None:
    for name in _STOP_HANDLERS:
        original = getattr(server, name, None)
        if original is None or getattr(original, "_registry_agent", False):
            continue

        def handler(original: Callable[[], None] = original) -> None:
            _withdraw(server, drain=True)
            original()

        handler._registry_agent = True  # type: ignore[attr-defined]
        setattr(server, name, handler)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"expected seconds > 0, got {value!r}", field=name)


class _Keeper:
    """The master's handle on the keeper process (no thread: the master stays fork-clean)."""

    def __init__(self, process: subprocess.Popen[bytes], spec: _Spec, drain_delay: float) -> None:
        self.process = process
        self.spec = spec
        #: Seconds the stop handlers wait after the withdrawal.
        self.drain_delay = drain_delay
        self.pid = process.pid
        self._buffer = b""

    @classmethod
    def start(cls, spec: _Spec, timeout: float, drain_delay: float = 0.0) -> _Keeper:
        root = str(Path(registry_agent.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-c", _KEEPER_MAIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        keeper = cls(process, spec, drain_delay)
        assert process.stdin is not None
        try:
            process.stdin.write(pickle.dumps(spec))
            process.stdin.flush()
            message = keeper._read(time.monotonic() + timeout)
        except (OSError, ValueError) as exc:
            message = {"error": f"the keeper process failed: {exc}"}
        if message is None or "started" not in message:
            code = process.poll()
            keeper._kill()
            what = (message or {}).get("error") or (
                f"no answer within {timeout:g}s"
                if code is None
                else f"the keeper process exited with code {code} (its output is above)"
            )
            raise GunicornStartError(f"registration not started: {what}", field="backend")
        return keeper

    def alive(self) -> bool:
        """True while the keeper process runs."""
        with contextlib.suppress(ChildProcessError):
            return self.process.poll() is None
        return False

    def stop(self, timeout: float) -> float:
        """Tell the keeper to deregister and exit; wait at most about ``timeout`` seconds."""
        began = time.monotonic()
        deadline = began + timeout + 1.0
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(b"stop\n")
            self.process.stdin.flush()
            while (message := self._read(deadline)) is not None:
                if "stopped" in message:
                    break
        except (OSError, ValueError):
            pass  # the keeper is gone already (it deregistered on its own signal)
        took = time.monotonic() - began
        try:
            self.process.wait(max(0.1, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, ChildProcessError):
            log.warning("registry-agent: keeper %s did not exit in time: killed", self.pid)
            self._kill()
        self._close()
        return took

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            self.process.wait(2)
        self._close()

    def _close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """The keeper's next message, or None at its end of output or at ``deadline``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


# The keeper process ---------------------------------------------------------------------------


def _main() -> None:
    """The keeper process: hold the registrations until told to stop or the master is gone."""
    # The protocol runs on the original stdout; anything printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's SIGHUP reloads, not ours
    try:
        spec: _Spec = pickle.load(sys.stdin.buffer)
    except Exception as exc:
        _send(out, {"error": f"bad start message: {exc}"})
        sys.exit(2)
    logging.basicConfig(
        level=spec.log_level,
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per health check request would drown gunicorn's log.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    sys.exit(asyncio.run(_keep(spec, out)))


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        out.write(json.dumps(message).encode() + b"\n")


async def _keep(spec: _Spec, out: IO[bytes]) -> int:
    from registry_agent._registrar import AsyncRegistrar

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []

    def stop_for(why: str) -> None:
        reason.append(why)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop_for, signal.Signals(sig).name)

    registrars: list[AsyncRegistrar] = []
    try:
        for data, checks in spec.entries:
            instance = ServiceInstance.from_dict(data)
            registrar = AsyncRegistrar(spec.backend, instance, checks=checks, options=spec.options)
            registrars.append(registrar)
            await registrar.start()
    except Exception as exc:
        await asyncio.gather(*(r.stop(spec.deregister_timeout) for r in registrars))
        _send(out, {"error": str(exc) or type(exc).__name__})
        return 2
    _send(out, {"started": [r.instance.id for r in registrars], "pid": os.getpid()})

    def read_commands() -> None:
        why = "the master is gone (its pipe closed)"
        for line in sys.stdin.buffer:
            if line.strip() == b"stop":
                why = "told by the master"
                break
        loop.call_soon_threadsafe(stop_for, why)

    threading.Thread(target=read_commands, name="keeper stdin", daemon=True).start()

    async def watch_parent() -> None:
        # No event tells a parent's death: poll it.
        while os.getppid() == spec.parent:  # noqa: ASYNC110
            await asyncio.sleep(_PARENT_POLL)
        stop_for("the master is gone (no longer our parent)")

    watcher = asyncio.create_task(watch_parent())
    await stop.wait()
    watcher.cancel()
    began = time.monotonic()
    await asyncio.gather(*(r.stop(spec.deregister_timeout) for r in registrars))
    took = time.monotonic() - began
    logging.getLogger("registry_agent.gunicorn").info(
        "deregistered %s in %.3fs (%s)",
        ", ".join(r.instance.id for r in registrars),
        took,
        reason[0],
    )
    _send(out, {"stopped": reason[0], "took": took})
    return 0
