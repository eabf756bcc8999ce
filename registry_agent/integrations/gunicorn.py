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
  Another SIGTERM, SIGINT or SIGQUIT during the drain cuts it short (the later
  signal's handler runs: SIGINT/SIGQUIT still stop quickly).
  gunicorn calls no hook before closing its listeners on these signals, so
  ``when_ready`` wraps the arbiter's ``handle_term``/``handle_int``/``handle_quit``.
  With a ``drain_delay``, a SIGTERM sent to the whole process group (systemd's
  ``KillMode=control-group``, ``tini -g``) does not stop the workers at once:
  their ``handle_exit`` (sync, gthread, gevent, eventlet workers) waits until
  the master has withdrawn and drained (at most ``drain_delay`` +
  ``deregister_timeout`` + 1 s); a SIGTERM from the master alone (a reload)
  waits at most 0.5 s.
- If the master dies (``kill -9``), the keeper notices (its parent changed)
  within 0.2 s, deregisters and exits.
- If the keeper dies (``kill -9``, the OOM killer), the master notices it on
  its next loop (gunicorn's arbiter runs ``manage_workers`` about every second,
  and the keeper is reaped before gunicorn's ``waitpid(-1)`` can take its
  status) and starts another, after a jittered backoff (0.25-0.5 s first,
  doubling to at most 30 s, never giving up). A stop signal that finds no
  keeper running deregisters the known ids with a one-shot process (bounded by
  ``deregister_timeout``): Consul's entries are removed; an etcd entry left with
  the dead keeper's lease, within its ``ttl``.
- ``on_reload`` (SIGHUP) keeps the keeper as is when the registration did not
  change; when only the tags or meta changed, the keeper updates its entries
  in place (no gap in discovery); otherwise (another address, port, id,
  checks, backend or option) the old one deregisters and a new one registers.
  A SIGHUP that finds the keeper dead (or waiting out its restart backoff)
  never withdraws the entries: a keeper is started at once, with the reloaded
  tags/meta; one still starting is sent them once it has started. An update
  the keeper did not answer in time is sent again (backoff 1 s doubling to
  30 s); a keeper that dies during one is restarted with the new tags/meta.
- ``on_exit`` stops a keeper still running (e.g. gunicorn halting because a
  worker failed to boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
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
#: The attribute of the arbiter holding the stop flag its workers share (see _StopFlag).
_FLAG_ATTR = "_registry_agent_stop_flag"
#: How long a worker's SIGTERM waits for the master to show it is stopping too (the
#: whole process group signalled) before it is taken as the master's own (a reload).
_STOPPING_NOTICE = 0.5
#: The arbiter's methods wrapped to supervise the keeper (see :func:`_wrap_arbiter`).
_SUPERVISED = ("reap_workers", "manage_workers")
#: Restarting a dead keeper: the first delay, the longest (jittered: half to all of it),
#: and how long a keeper must have run for its death to start the backoff over.
_RESTART_FIRST = 0.5
_RESTART_CAP = 30.0
_RESTART_RESET = 60.0
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
    #: Only deregister the entries' ids (a stop signal found no keeper running), then exit.
    deregister_only: bool = False

    def key(self, *, live: bool = True) -> tuple[Any, ...]:
        """Equal for equal registrations (to keep the keeper across a SIGHUP).

        ``live=False`` leaves out what a running keeper can change in place
        (each entry's tags and meta).
        """
        # Checks have no equality of their own: compared by their pickled state.
        entries = tuple(
            (
                json.dumps(
                    {k: v for k, v in data.items() if live or k not in ("tags", "meta")},
                    sort_keys=True,
                    default=repr,
                ),
                pickle.dumps(checks),
            )
            for data, checks in self.entries
        )
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
    clients that cache discovery), the workers serving on even when the
    SIGTERM reached them too (sent to the whole process group).
    ``start_timeout`` bounds the keeper's start. ``log_level`` is the
    keeper's (it logs to gunicorn's stderr). Any other keyword is a
    registration option (``ttl``, ``heartbeat``, ``fall``, ``rise``,
    ``on_unhealthy``, ``deregister_critical_after``, ``retry``).

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
        _wrap_arbiter(server)
        self._defer_workers_exit(server)
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
        self._defer_workers_exit(server)  # gunicorn's reload set its worker class again
        try:
            spec = self._spec(server)
        except ConfigError as exc:
            server.log.error("registry-agent: reloaded config not registered: %s", exc)
            return
        if keeper is not None and keeper.spec.key(live=False) == spec.key(live=False):
            # The same entries (maybe other tags/meta): never withdrawn for that.
            keeper.drain_delay = self.drain_delay
            keeper.wanted = spec
            _hold_wanted(server, keeper, reload=True)
            return
        if keeper is not None:
            _stop_keeper(server, keeper, "old registration withdrawn")
        setattr(server, _KEEPER_ATTR, None)
        try:
            keeper = _Keeper.start(spec, self.start_timeout, self.drain_delay)
        except ConfigError as exc:
            server.log.error("registry-agent: reloaded config not registered: %s", exc)
            return
        setattr(server, _KEEPER_ATTR, keeper)
        _wrap_arbiter(server)
        server.log.info("registry-agent: keeper %s registers the reloaded config", keeper.pid)

    def on_exit(self, server: Any) -> None:
        """gunicorn's ``on_exit`` hook: withdraw if a stop signal did not already."""
        _withdraw(server, drain=False)
        _raise_flag(server, _RELEASED)

    def _defer_workers_exit(self, server: Any) -> None:
        """With a ``drain_delay``: workers a SIGTERM reaches with their master (systemd's
        ``KillMode=control-group``, ``tini -g``, ``kill -TERM -<pgid>``) keep serving
        until the master has withdrawn and drained (at most ``drain_delay`` +
        ``deregister_timeout`` + 1 s), instead of stopping while the master still
        accepts. Done by a subclass of gunicorn's worker class whose ``handle_exit``
        waits (the sync, gthread, gevent and eventlet workers stop through it; a
        uvicorn worker handles its signals itself and is not deferred).
        """
        cls = getattr(server, "worker_class", None)
        if self.drain_delay <= 0 or not isinstance(cls, type):
            return
        if getattr(cls, "_registry_agent", False):
            return
        if getattr(server, _FLAG_ATTR, None) is None:
            # Shared with the workers it forks: the master's stop, as they see it.
            setattr(server, _FLAG_ATTR, mmap.mmap(-1, 1))
        flag: mmap.mmap = getattr(server, _FLAG_ATTR)
        bound = self.drain_delay + self.deregister_timeout + 1.0
        server.worker_class = _deferring(cls, flag, bound)

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


def _withdraw(server: Any, *, drain: bool) -> int | None:
    """Stop ``server``'s keeper (deregistering, bounded), then wait its ``drain_delay``
    if ``drain``; the stop signal that cut the drain short, or None.

    Called by the wrapped stop handlers before gunicorn closes its listeners;
    a no-op once done.
    """
    keeper: _Keeper | None = getattr(server, _KEEPER_ATTR, None)
    if keeper is None:
        return None
    setattr(server, _KEEPER_ATTR, None)
    _stop_keeper(server, keeper, "withdrawn", " before the listeners close")
    if drain and keeper.drain_delay > 0:
        return _drain(server, keeper.drain_delay)
    return None


#: The master's stop signals and the arbiter's handler of each.
_STOP_SIGNALS = {
    signal.SIGTERM: "handle_term",
    signal.SIGINT: "handle_int",
    signal.SIGQUIT: "handle_quit",
}


def _drain(server: Any, delay: float) -> int | None:
    """Wait ``delay`` seconds, in small steps, unless another stop signal arrives
    (returned; the arbiter queues its signals): a second SIGTERM, SIGINT or SIGQUIT
    cuts the drain. Other signals queued meanwhile are queued again, in order."""
    queued: Any = getattr(server, "SIG_QUEUE", None)
    deadline = time.monotonic() + delay
    others: list[Any] = []
    cut: int | None = None
    try:
        while (left := deadline - time.monotonic()) > 0:
            if hasattr(queued, "get"):
                try:
                    sig = queued.get(timeout=min(left, 0.1))
                except Exception:  # queue.Empty
                    continue
            elif isinstance(queued, list) and queued:
                sig = queued.pop(0)
            else:
                time.sleep(min(left, 0.05))
                continue
            if sig in _STOP_SIGNALS:
                cut = sig
                server.log.info(
                    "registry-agent: %s during the drain: cut short, %.1fs early",
                    signal.Signals(sig).name,
                    deadline - time.monotonic(),
                )
                break
            others.append(sig)
    finally:
        for sig in others:
            if hasattr(queued, "put_nowait"):
                queued.put_nowait(sig)
            elif isinstance(queued, list):
                queued.append(sig)
    return cut


def _stop_keeper(server: Any, keeper: _Keeper, done: str, when: str = "") -> float:
    """Withdraw ``keeper``'s entries: told to it if it runs, else by a one-shot process.

    Logs what happened (``done``, ``when``: the words of the log line); seconds taken.
    """
    began = time.monotonic()
    if keeper.state == "running" and keeper.alive():
        took = keeper.stop(keeper.spec.deregister_timeout)
        if keeper.confirmed:
            server.log.info("registry-agent: %s in %.3fs,%s", done, took, when)
            return took
        # It died just now (the signal came before its SIGCHLD), or hung and was killed.
    what = keeper.describe_exit()
    if keeper.process.poll() is None:
        keeper.stop(keeper.spec.deregister_timeout)  # one still starting
    keeper._close()
    ids = ", ".join(i.id for i in keeper.spec.instances())
    result = _deregister_once(keeper.spec)
    took = time.monotonic() - began
    if result is None:
        server.log.info(
            "registry-agent: no keeper running (%s): %s %s by a one-shot process in %.3fs,%s",
            what,
            done,
            ids,
            took,
            when,
        )
    else:
        server.log.error(
            "registry-agent: no keeper running (%s): %s NOT withdrawn (%.3fs): %s",
            what,
            ids,
            took,
            result,
        )
    return took


def _deregister_once(spec: _Spec) -> str | None:
    """Deregister ``spec``'s ids from a one-shot process; None, or what went wrong."""
    once = replace(spec, deregister_only=True, parent=os.getpid())
    try:
        keeper = _Keeper.spawn(once)
    except OSError as exc:
        return f"the one-shot process did not start: {exc}"
    # Its interpreter's start (bounded by start_timeout's default) and the deregistration.
    deadline = time.monotonic() + 10.0 + spec.deregister_timeout
    message: dict[str, Any] | None = None
    try:
        while (message := keeper._read(deadline)) is not None and "stopped" not in message:
            pass
    except (OSError, ValueError) as exc:
        message = {"stopped": "", "errors": [str(exc)]}
    keeper._kill()
    if message is None:
        return "no answer in time"
    errors: list[str] = message.get("errors") or []
    return "; ".join(errors) or None


def _hold_wanted(server: Any, keeper: _Keeper, *, reload: bool) -> None:
    """Bring ``keeper`` to hold ``keeper.wanted`` (whose ids are those it holds).

    On a SIGHUP (``reload``): a running keeper is sent the new tags/meta and waited
    for (bounded); a dead one (or waiting out its backoff) is restarted now, with
    the wanted spec; a starting one gets them once started. From the arbiter's
    loop: an answer still due is read without waiting, an update that got none is
    sent again (backoff), a keeper that started with older tags/meta is sent them.
    """
    now = time.monotonic()
    if keeper.state == "running" and not keeper.alive():
        keeper.died(now)
        server.log.error(
            "registry-agent: keeper %s %s: a new keeper starts now",
            keeper.pid,
            keeper.describe_exit(),
        )
    if keeper.state == "dead":
        if reload:
            keeper.retry_at = now  # the arbiter's loop, run right after the reload
        return
    if keeper.state == "starting":
        return  # the supervisor sends it what changed once it has started
    if keeper.pending is not None:
        if reload:
            keeper.pending = None  # superseded: its answer, if any, is skipped
        else:
            outcome = keeper.poll_update(now)
            if outcome is not None:
                _updated(server, keeper, outcome)
            return
    if keeper.wanted.key() == keeper.spec.key() or (not reload and now < keeper.update_at):
        return
    keeper.send_update(keeper.wanted)
    if reload:
        assert keeper.pending is not None
        outcome = keeper.poll_update(keeper.pending[2])
        if outcome is not None:
            _updated(server, keeper, outcome)


def _updated(server: Any, keeper: _Keeper, outcome: tuple[str, str]) -> None:
    """Log a tags/meta update's outcome and act on it (see :meth:`_Keeper.poll_update`)."""
    what, detail = outcome
    now = time.monotonic()
    if what == "updated":
        keeper.update_failures = 0
        server.log.info("registry-agent: keeper %s updated tags/meta in place", keeper.pid)
    elif what == "died":
        keeper.died(now)
        keeper.retry_at = now
        server.log.error(
            "registry-agent: tags/meta not updated: %s; a new keeper starts now with them",
            detail,
        )
    elif what == "failed":
        # Refused (the registry's answer): kept as held; a restart starts with that too.
        keeper.wanted = keeper.spec
        server.log.error("registry-agent: reloaded tags/meta not updated: %s", detail)
    else:
        delay = min(_RESTART_CAP, 1.0 * 2**keeper.update_failures)
        keeper.update_failures += 1
        keeper.update_at = now + delay
        server.log.error(
            "registry-agent: reloaded tags/meta not updated yet: %s; sent again in %.0fs",
            detail,
            delay,
        )


def _supervise(server: Any) -> None:
    """Run by the arbiter's loop (about every second): restart a keeper that died."""
    keeper: _Keeper | None = getattr(server, _KEEPER_ATTR, None)
    if keeper is None:
        return
    now = time.monotonic()
    if keeper.state == "starting":
        outcome = keeper.poll_started(now)
        if outcome is None:
            return
        if outcome == "started":
            server.log.info(
                "registry-agent: keeper %s restarted, registers %s",
                keeper.pid,
                ", ".join(i.id for i in keeper.spec.instances()),
            )
            return
        keeper._kill()
        keeper.died(now)
        server.log.error(
            "registry-agent: keeper %s did not start (%s): retried in %.1fs",
            keeper.pid,
            outcome,
            keeper.retry_at - now,
        )
        return
    if keeper.state == "running":
        if keeper.alive():
            _hold_wanted(server, keeper, reload=False)
            return
        keeper.died(now)
        server.log.error(
            "registry-agent: keeper %s %s: its entries are held by no one; "
            "a new keeper starts in %.1fs",
            keeper.pid,
            keeper.describe_exit(),
            keeper.retry_at - now,
        )
        return
    if now < keeper.retry_at:
        return
    try:
        successor = _Keeper.spawn(keeper.wanted, keeper.drain_delay)
    except OSError as exc:
        keeper.died(now)
        server.log.error("registry-agent: keeper not restarted (%s): retried later", exc)
        return
    successor.failures = keeper.failures
    successor.start_deadline = now + keeper.start_timeout
    successor.start_timeout = keeper.start_timeout
    setattr(server, _KEEPER_ATTR, successor)


def _wrap_arbiter(server: Any) -> None:
    """Wrap the arbiter's stop handlers (withdraw first) and loop (supervise the keeper)."""
    for name in _STOP_HANDLERS:
        original = getattr(server, name, None)
        if original is None or getattr(original, "_registry_agent", False):
            continue

        def handler(original: Callable[[], None] = original) -> None:
            _raise_flag(server, _STOPPING)
            cut = _withdraw(server, drain=True)
            _raise_flag(server, _RELEASED)
            if cut is not None:
                # The later signal wins (SIGINT/SIGQUIT after a SIGTERM: the quick stop).
                getattr(server, _STOP_SIGNALS[signal.Signals(cut)])()
                return
            original()

        handler._registry_agent = True  # type: ignore[attr-defined]
        setattr(server, name, handler)
    for name in _SUPERVISED:
        original = getattr(server, name, None)
        if original is None or getattr(original, "_registry_agent", False):
            continue
        if name == "reap_workers":

            def reap(original: Callable[[], None] = original) -> None:
                # Reap the keeper first: gunicorn's waitpid(-1) would take its status
                # (and free its pid for another process to reuse).
                keeper: _Keeper | None = getattr(server, _KEEPER_ATTR, None)
                if keeper is not None:
                    keeper.process.poll()
                original()

            wrapped: Callable[[], None] = reap
        else:

            def manage(original: Callable[[], None] = original) -> None:
                original()
                _supervise(server)

            wrapped = manage
        wrapped._registry_agent = True  # type: ignore[attr-defined]
        setattr(server, name, wrapped)


#: The stop flag's values: running, stopping (withdrawing, draining), released.
_RUNNING, _STOPPING, _RELEASED = 0, 1, 2


def _raise_flag(server: Any, value: int) -> None:
    flag: mmap.mmap | None = getattr(server, _FLAG_ATTR, None)
    if flag is not None and flag[0] < value:
        flag[0] = value


def _deferring(cls: Any, flag: mmap.mmap, bound: float) -> type:
    """``cls`` (a gunicorn worker class) whose SIGTERM waits for the master's withdrawal."""

    def handle_exit(self: Any, sig: int, frame: Any) -> None:
        state = getattr(self, "_registry_agent_exit", "")
        if state == "released" or flag[0] == _RELEASED or os.getppid() != self.ppid:
            cls.handle_exit(self, sig, frame)
            return
        if state == "waiting":
            return
        self._registry_agent_exit = "waiting"

        def wait() -> None:
            began = time.monotonic()
            # A SIGTERM to the whole group reaches the master too: it shows it at once.
            while flag[0] == _RUNNING and time.monotonic() - began < _STOPPING_NOTICE:
                time.sleep(0.02)
            while (
                flag[0] == _STOPPING
                and time.monotonic() - began < bound
                and os.getppid() == self.ppid
            ):
                time.sleep(0.02)
            self._registry_agent_exit = "released"
            os.kill(os.getpid(), signal.SIGTERM)  # gunicorn's handler, in the main thread

        threading.Thread(target=wait, name="registry-agent drain", daemon=True).start()

    subclass = type(cls.__name__, (cls,), {"handle_exit": handle_exit, "_registry_agent": True})
    subclass.__module__ = cls.__module__
    return subclass


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
        self._eof = False
        #: Whether the keeper said it stopped (see :meth:`stop`).
        self.confirmed = False
        #: "starting" (no answer yet), "running" (registering), "dead" (to restart).
        self.state = "starting"
        self.started_at = 0.0
        self.start_timeout = 30.0
        self.start_deadline = 0.0
        #: Deaths in a row (restart backoff) and when to start a successor.
        self.failures = 0
        self.retry_at = 0.0
        #: What the master wants held: ``spec`` is what the keeper confirmed holding. A
        #: SIGHUP changing only tags/meta sets it; a restarted keeper is started with it.
        self.wanted = spec
        #: The update sent and not answered yet: (its number, its spec, its deadline).
        self.pending: tuple[int, _Spec, float] | None = None
        self._sent = 0
        #: A tags/meta update that got no answer is sent again at ``update_at`` (backoff).
        self.update_at = 0.0
        self.update_failures = 0

    @classmethod
    def spawn(cls, spec: _Spec, drain_delay: float = 0.0) -> _Keeper:
        """Start the keeper process and send it ``spec``; it answers later."""
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
        except (OSError, ValueError):
            pass  # it died at once: told by its answer (none) and exit code
        return keeper

    @classmethod
    def start(cls, spec: _Spec, timeout: float, drain_delay: float = 0.0) -> _Keeper:
        """Start a keeper and wait (at most ``timeout``) until it holds its registrations."""
        keeper = cls.spawn(spec, drain_delay)
        keeper.start_timeout = timeout
        outcome = keeper.poll_started(time.monotonic() + timeout)
        if outcome != "started":
            keeper._kill()
            raise GunicornStartError(f"registration not started: {outcome}", field="backend")
        return keeper

    def poll_started(self, deadline: float) -> str | None:
        """Waiting until ``deadline`` for the keeper's answer: ``"started"`` (state
        running), what went wrong, or None (no answer yet, ``start_deadline`` not passed)."""
        try:
            message = self._read(deadline)
        except (OSError, ValueError) as exc:
            return f"the keeper process failed: {exc}"
        if message is not None and "started" in message:
            self.state = "running"
            self.started_at = time.monotonic()
            return "started"
        if message is not None:
            return str(message.get("error") or message)
        code = self.process.poll()
        if code is None and self._eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(1.0)
        if code is not None or self._eof:
            return f"the keeper process exited with code {code} (its output is above)"
        if time.monotonic() < max(deadline, self.start_deadline):
            return None
        return f"no answer within {self.start_timeout:g}s"

    def died(self, now: float) -> None:
        """Mark this keeper dead and set when its successor starts (jittered backoff)."""
        if self.state == "running" and now - self.started_at >= _RESTART_RESET:
            self.failures = 0
        delay = min(_RESTART_CAP, _RESTART_FIRST * 2**self.failures)
        self.failures += 1
        self.retry_at = now + random.uniform(delay / 2, delay)
        self.state = "dead"
        self._close()

    def describe_exit(self) -> str:
        """How the keeper process ended (or that it still runs)."""
        code = self.process.poll()
        if code is None and self._eof:  # its pipe closed: it is exiting, not yet reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=1.0)
        if code is None:
            return "still starting" if self.state == "starting" else "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
            return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def alive(self) -> bool:
        """True while the keeper process runs (and its pipe to us is open)."""
        if self.process.poll() is not None:
            return False
        if self.state != "running" or self._eof:
            return not self._eof
        # A pid can be reused once someone else reaped it: the pipe tells the truth.
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        with contextlib.suppress(OSError, ValueError):
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._eof = True
                    return False
                self._buffer += chunk
        return True

    def send_update(self, spec: _Spec) -> None:
        """Send the running keeper ``spec``'s tags and meta (answer: :meth:`poll_update`)."""
        self._sent += 1
        entries = [
            {"id": data["id"], "tags": data.get("tags", []), "meta": data.get("meta", {})}
            for data, _ in spec.entries
        ]
        self.pending = (self._sent, spec, time.monotonic() + spec.deregister_timeout + 1.0)
        try:
            assert self.process.stdin is not None
            command = {"update": entries, "seq": self._sent}
            self.process.stdin.write(json.dumps(command).encode() + b"\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            self._eof = True  # its pipe is closed: it died (told by poll_update)

    def poll_update(self, until: float) -> tuple[str, str] | None:
        """The pending update's outcome, waiting at most until ``until``: None (no answer
        yet, its deadline not passed), or ``(outcome, detail)``: ``"updated"`` (``spec``
        now holds it), ``"failed"`` (the keeper's errors), ``"died"``, ``"timeout"``."""
        assert self.pending is not None
        seq, spec, deadline = self.pending
        message: dict[str, Any] | None = None
        try:
            while (message := self._read(min(until, deadline))) is not None:
                # An answer to an earlier update (that timed out) is not this one's.
                if "updated" in message and message.get("seq") == seq:
                    break
        except (OSError, ValueError):
            self._eof = True
            message = None
        if message is None:
            if self._eof or self.process.poll() is not None:
                self.pending = None
                return "died", f"the keeper {self.describe_exit()} before it answered"
            if time.monotonic() < deadline:
                return None
            self.pending = None
            return "timeout", f"no answer from the keeper within {spec.deregister_timeout + 1:g}s"
        self.pending = None
        if message.get("errors"):
            return "failed", "; ".join(message["errors"])
        self.spec = replace(spec, parent=self.spec.parent)
        return "updated", ""

    def stop(self, timeout: float) -> float:
        """Tell the keeper to deregister and exit; wait at most about ``timeout`` seconds.

        ``confirmed`` then tells whether the keeper said it stopped (told now, or on
        a signal of its own): not when it was killed, or did not answer in time.
        """
        began = time.monotonic()
        deadline = began + timeout + 1.0
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(b"stop\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass  # the keeper is gone already: what it said last is still in the pipe
        with contextlib.suppress(OSError, ValueError):
            while (message := self._read(deadline)) is not None:
                if "stopped" in message:
                    self.confirmed = True
                    break
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
            if self._eof:
                return None
            left = max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self._eof = True
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
    # Commands come on fd 0, read unbuffered: no bytes of them hide in a buffer, and the
    # reader thread holds no buffer lock that would abort the interpreter's exit.
    commands = os.fdopen(0, "rb", buffering=0, closefd=False)
    try:
        spec: _Spec = pickle.load(commands)
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
    if spec.deregister_only:
        sys.exit(asyncio.run(_deregister_only(spec, out)))
    sys.exit(asyncio.run(_keep(spec, out)))


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        out.write(json.dumps(message).encode() + b"\n")


async def _deregister_only(spec: _Spec, out: IO[bytes]) -> int:
    """Remove ``spec``'s entries by id (their keeper died), each bounded; tell the master."""
    from registry_agent._backend import Lease
    from registry_agent._errors import LeaseLost
    from registry_agent._plugins import open_backend

    began = time.monotonic()
    urls = (spec.backend,) if isinstance(spec.backend, str) else spec.backend
    errors: list[str] = []
    gone: list[str] = []
    for url in urls:
        try:
            backend = open_backend(url)
        except Exception as exc:
            errors.append(f"{url}: {exc}")
            continue
        try:
            if getattr(backend, "scheme", "") == "etcd":
                # An etcd entry lives on its lease, kept alive by the dead keeper only: it
                # leaves within its ttl. (Its lease id died with the keeper.)
                continue
            for instance in spec.instances():
                lease = Lease(instance, ttl=spec.options.ttl, handle=0, backend=url)
                try:
                    await asyncio.wait_for(backend.deregister(lease), spec.deregister_timeout)
                except LeaseLost:
                    pass
                except Exception as exc:
                    errors.append(f"{instance.id}: {exc or type(exc).__name__}")
                    continue
                gone.append(instance.id)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backend.close(), 1.0)
    took = time.monotonic() - began
    logging.getLogger("registry_agent.gunicorn").info(
        "one-shot: deregistered %s in %.3fs", ", ".join(gone) or "nothing", took
    )
    _send(out, {"stopped": "one-shot", "took": took, "errors": errors})
    return 0


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

    async def update(entries: list[dict[str, Any]], seq: object) -> None:
        errors: list[str] = []
        by_id = {r.instance.id: r for r in registrars}
        for entry in entries:
            registrar = by_id.get(entry["id"])
            if registrar is None:
                errors.append(f"{entry['id']}: not held by this keeper")
                continue
            try:
                await registrar.update(tags=entry["tags"], meta=entry["meta"])
            except Exception as exc:
                errors.append(f"{entry['id']}: {exc}")
        logging.getLogger("registry_agent.gunicorn").info(
            "updated tags/meta of %s%s",
            ", ".join(e["id"] for e in entries),
            f" ({'; '.join(errors)})" if errors else "",
        )
        _send(out, {"updated": [e["id"] for e in entries], "errors": errors, "seq": seq})

    def read_commands() -> None:
        why = "the master is gone (its pipe closed)"
        pending = b""
        while why.startswith("the master is gone"):
            try:
                chunk = os.read(0, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                if line.strip() == b"stop":
                    why = "told by the master"
                    break
                if line.startswith(b"{"):
                    command = json.loads(line)
                    asyncio.run_coroutine_threadsafe(
                        update(command["update"], command.get("seq")), loop
                    )
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
