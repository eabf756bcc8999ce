"""The agent runtime: every configured service on one event loop, reloadable, stoppable.

Starting, reloading and stopping take turns (one lock): a SIGTERM that comes
during a reload waits for it, then deregisters everything, including what the
reload just started; a SIGHUP after a SIGTERM does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from registry_agent._agent.config import AgentConfig, ServiceConfig, load_config
from registry_agent._agent.logs import remember_secrets
from registry_agent._agent.metrics import AgentMetrics
from registry_agent._agent.reaper import OrphanReaper, become_subreaper
from registry_agent._agent.status import (
    StatusServer,
    iso_time,
    iso_times,
    json_body,
    readiness,
)
from registry_agent._backend import Backend
from registry_agent._errors import ConfigError, RegistryError, Rejected
from registry_agent._health.checks import CheckResult, HealthCheck
from registry_agent._registrar import AsyncRegistrar
from registry_agent._status import RegistrationStatus

__all__ = [
    "AgentRuntime",
    "close_backends",
    "open_configured_backend",
    "open_configured_backends",
    "registrar_for",
    "updates_in_place",
    "validate_services",
]

log = logging.getLogger("registry_agent.agent")

# The same complaint from the event loop is logged at most this often.
_LOOP_ERRORS_EVERY = 60.0


def open_configured_backend(config: AgentConfig) -> Backend:
    """The (first) backend of ``config``, opened (not connected) exactly as ``run`` does.

    Options the backend refuses raise :class:`ConfigError` naming the file.
    """
    return open_configured_backends(config)[0]


def open_configured_backends(config: AgentConfig) -> list[Backend]:
    """Every backend of ``config`` in the file's order, opened (not connected) as ``run``
    does. Options a backend refuses raise :class:`ConfigError` naming the file and table."""
    try:
        return [backend.open() for backend in config.backends]
    except ConfigError as exc:
        raise ConfigError(exc.reason, field=exc.field, source=config.source) from None


async def close_backends(backends: Sequence[Backend]) -> None:
    """Close each of ``backends``, whatever the others do."""
    for backend in backends:
        with contextlib.suppress(Exception):
            await backend.close()


def registrar_for(
    backend: Backend | Sequence[Backend],
    service: ServiceConfig,
    on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
) -> AsyncRegistrar:
    """The registrar of one configured service (not started), on each of the backends.

    Every service of the agent is on the same backend objects, so they share each
    one's liveness where the backend can (one renewal and one read-back per TTL for
    all of them). With several backends the service is registered in each, each
    entry healed on its own.
    """
    given: Backend | list[Backend] = backend if isinstance(backend, Backend) else list(backend)
    if isinstance(given, list) and len(given) == 1:
        given = given[0]
    return AsyncRegistrar(
        given,
        service.instance,
        options=service.options,
        checks=[check.build() for check in service.checks],
        on_check=on_check,
        shared_liveness=True,
    )


async def validate_services(config: AgentConfig, backend: Backend | Sequence[Backend]) -> None:
    """Refuse, naming the file and the service, what the registrar or a backend would.

    ``run`` and ``check`` both call it before anything starts, and a reload
    before it touches the running services: the same errors, up front.
    ``backend``: the backends of ``config`` (:func:`open_configured_backends`).
    """
    for i, service in enumerate(config.services):
        where = f"service[{i}]"
        try:
            await registrar_for(backend, service).validate()
        except ConfigError as exc:
            field = f"{where}.{exc.field}" if exc.field else where
            raise ConfigError(exc.reason, field=field, source=config.source) from None
        except Rejected as exc:
            raise ConfigError(exc.message, field=where, source=config.source) from None


def updates_in_place(old: ServiceConfig, new: ServiceConfig) -> bool:
    """Whether a reload turns ``old`` into ``new`` by rewriting its entry in place
    (``AsyncRegistrar.update``): only the tags, meta or weight differ. The identity
    (name, id, address, port), scheme, version, registration options and checks are
    the same; any of them changed restarts the service (a new gate, new counters)."""
    a, b = old.instance, new.instance
    same = (a.service, a.id, a.address, a.port, a.scheme, a.version) == (
        b.service,
        b.id,
        b.address,
        b.port,
        b.scheme,
        b.version,
    )
    return same and old.options == new.options and old.checks == new.checks and old != new


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AgentRuntime:
    """Runs the registrars of an :class:`AgentConfig` until SIGTERM/SIGINT; SIGHUP reloads."""

    def __init__(self, config: AgentConfig, *, stop_timeout: float = 10.0) -> None:
        self.config = config
        self.stop_timeout = stop_timeout
        self.started_at = time.time()
        self.reloads = 0
        #: The open backends, in the config's order (empty until ``run``).
        self.backends: list[Backend] = []
        self.registrars: dict[str, tuple[ServiceConfig, AsyncRegistrar]] = {}
        self.metrics = AgentMetrics(lambda: self.snapshots().values(), self.backend_names)
        self.status_server: StatusServer | None = None
        self.reaper = OrphanReaper()
        self.subreaper = False
        self._stop = asyncio.Event()
        self._stopping = False
        # Start, reload and stop take turns.
        self._turn: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_errors: dict[str, float] = {}

    @property
    def backend(self) -> Backend | None:
        """The first (or only) backend, None before ``run``."""
        return self.backends[0] if self.backends else None

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self.backends = [backend]

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        self._turn = asyncio.Lock()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._install_signals()
        self.subreaper = become_subreaper() or os.getpid() == 1
        if self.subreaper:
            self._spawn(self.reaper.run())
        self.backends = open_configured_backends(self.config)
        try:
            await validate_services(self.config, self.backends)
        except BaseException:
            await close_backends(self.backends)
            raise
        try:
            await self._start_status_server()
            async with self._turn:
                for service in self.config.services:
                    if self._stopping:
                        break
                    await self._start_service(service)
            log.info(
                "agent running: %d service(s) on %s",
                len(self.registrars),
                ", ".join(self.backend_names()),
                extra={"event": "agent_started"},
            )
            await self._stop.wait()
        finally:
            # Also after a failed start: what did start is deregistered.
            await self.shutdown()
        return 0

    def request_stop(self) -> None:
        """Ask :meth:`run` to deregister everything and return."""
        self._stopping = True
        self._stop.set()

    async def shutdown(self) -> None:
        """Deregister every service (concurrently, within the stop timeout) and close.

        Waits for a reload in flight first, so what it registers is deregistered too.
        """
        self._stopping = True
        assert self._turn is not None
        async with self._turn:
            log.info(
                "stopping: deregistering %d service(s)",
                len(self.registrars),
                extra={"event": "agent_stopping"},
            )
            registrars = [reg for _, reg in self.registrars.values()]
            results = await asyncio.gather(
                *(reg.stop(timeout=self.stop_timeout) for reg in registrars),
                return_exceptions=True,
            )
            for reg, result in zip(registrars, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning(
                        "%s: stop failed: %s",
                        reg.instance.id,
                        result,
                        extra={"event": "stop_failed", "error": str(result)},
                    )
            self.registrars.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.subreaper:
            # Adopted zombies would otherwise go to an init that may never wait() for them.
            await self.reaper.final()
        await close_backends(self.backends)
        if self.status_server is not None:
            await self.status_server.close()
        log.info("stopped", extra={"event": "agent_stopped"})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # e.g. "socket.accept() out of system resource" once per attempt: once a minute is plenty.
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = f"{message}|{type(exc).__name__}"
        now = time.monotonic()
        if now - self._loop_errors.get(key, -_LOOP_ERRORS_EVERY) < _LOOP_ERRORS_EVERY:
            return
        self._loop_errors[key] = now
        log.error(
            "%s%s (repeats are not logged for %gs)",
            message,
            f": {exc}" if exc else "",
            _LOOP_ERRORS_EVERY,
            extra={"event": "loop_error"},
        )

    # -- services --------------------------------------------------------------------

    async def _start_service(self, service: ServiceConfig) -> None:
        assert self.backends
        instance = service.instance
        registrar = registrar_for(
            self.backends,
            service,
            self.metrics.check_observer((instance.service, instance.id)),
        )
        # Known before it starts: whatever happens next, stop() will find it.
        self.registrars[service.key] = (service, registrar)
        await registrar.start()

    async def _stop_service(self, key: str) -> None:
        _, registrar = self.registrars.pop(key)
        await registrar.stop(timeout=self.stop_timeout)

    async def _update_service(self, key: str, service: ServiceConfig) -> tuple[str, bool]:
        """Rewrite ``key``'s entry in place with ``service``'s tags and meta (see
        AsyncRegistrar.update); ``(key, False)`` when refused and it was stopped, to be
        started again."""
        _, registrar = self.registrars[key]
        try:
            await registrar.update(tags=service.instance.tags, meta=service.instance.meta)
        except (RegistryError, RuntimeError) as exc:
            log.warning(
                "reload: %s could not be updated in place (%s): restarting it",
                key,
                exc,
                extra={"event": "reload_failed", "error": str(exc)},
            )
            await self._stop_service(key)
            return key, False
        self.registrars[key] = (service, registrar)
        log.info(
            "reload: %s updated in place (tags, meta or weight)",
            key,
            extra={"event": "reload_updated", "service": service.instance.service},
        )
        return key, True

    async def _move_service(self, key: str, backends: list[Backend]) -> tuple[str, bool]:
        """Keep ``key`` registered in ``backends`` (see AsyncRegistrar.set_backends);
        ``(key, False)`` when that failed and it was stopped, to be started again."""
        _, registrar = self.registrars[key]
        try:
            await registrar.set_backends(backends, timeout=self.stop_timeout)
        except (RegistryError, RuntimeError) as exc:
            log.warning(
                "reload: %s could not change backends (%s): restarting it",
                key,
                exc,
                extra={"event": "reload_failed", "error": str(exc)},
            )
            await self._stop_service(key)
            return key, False
        return key, True

    async def _backends_for(self, new: AgentConfig) -> tuple[list[Backend], list[Backend]]:
        """The backends of ``new``, and those of them opened here: a running backend whose
        table did not change is kept (its connections and shared liveness go on)."""
        running = list(zip(self.config.backends, self.backends, strict=False))
        backends: list[Backend] = []
        opened: list[Backend] = []
        for config in new.backends:
            found = next((i for i, (old, _) in enumerate(running) if old == config), None)
            if found is not None:
                backends.append(running.pop(found)[1])
                continue
            try:
                backend = config.open()
            except ConfigError as exc:
                await close_backends(opened)
                raise ConfigError(exc.reason, field=exc.field, source=new.source) from None
            opened.append(backend)
            backends.append(backend)
        return backends, opened

    async def reload(self) -> None:
        """Re-read the file: start new services, stop removed ones, restart changed ones.

        A new ``[[backend]]`` list moves every unchanged service to it: kept in the
        backends that stay (no deregistration, no gap), registered in the new ones,
        removed from the dropped ones.
        """
        assert self._turn is not None
        try:
            await self._turn.acquire()
        except asyncio.CancelledError:
            # The stop held the turn, finished, and cancelled us while we waited.
            log.info("reload skipped: stopping", extra={"event": "reload_skipped"})
            raise
        try:
            await self._reload_in_turn()
        finally:
            self._turn.release()

    async def _reload_in_turn(self) -> None:
        if self._stopping:
            log.info("reload skipped: stopping", extra={"event": "reload_skipped"})
            return
        new_backends: list[Backend] = []
        opened: list[Backend] = []
        try:
            new = load_config(self.config.source, backend_from_env=True)
            remember_secrets(new.secrets())
            if new.backends != self.config.backends:
                new_backends, opened = await self._backends_for(new)
            await validate_services(new, new_backends or self.backends)
        except Exception as exc:  # a ConfigError, or a bug the new file runs into
            await close_backends(opened)
            error = str(exc)
            if not isinstance(exc, ConfigError):
                error = f"unexpected {type(exc).__name__}: {error}"
            log.error(
                "reload refused, keeping the running config: %s",
                error,
                extra={"event": "reload_failed", "error": error},
            )
            return
        wanted = {svc.key: svc for svc in new.services}
        removed = [k for k in self.registrars if k not in wanted]
        changed = [k for k in self.registrars if k in wanted and self.registrars[k][0] != wanted[k]]
        # Only tags, meta or weight changed: rewritten in place (no gap, counters kept).
        live = [k for k in changed if updates_in_place(self.registrars[k][0], wanted[k])]
        changed = [k for k in changed if k not in live]
        added = [k for k in wanted if k not in self.registrars]
        unchanged = len(self.registrars) - len(removed) - len(changed) - len(live)
        await asyncio.gather(*(self._stop_service(key) for key in removed + changed))
        updated = await asyncio.gather(*(self._update_service(key, wanted[key]) for key in live))
        changed += [key for key, ok in updated if not ok]
        live = [key for key, ok in updated if ok]
        if new_backends:
            # Kept backends are the same objects: an unchanged service stays registered
            # there (no gap for a watcher), is added to the new ones, removed from the rest.
            log.info(
                "backends changed: %d unchanged service(s) moved to the new list",
                len(self.registrars),
                extra={"event": "reload_backend"},
            )
            moved = await asyncio.gather(
                *(self._move_service(key, new_backends) for key in list(self.registrars))
            )
            changed += [key for key, ok in moved if not ok]
            old_backends, self.backends = self.backends, new_backends
            await close_backends([b for b in old_backends if not any(b is n for n in new_backends)])
        started = failed = 0
        for key in changed + added:
            if self._stopping:
                # The stop that waits for us deregisters what we started.
                log.info(
                    "reload interrupted by stop: %d of %d service(s) started, %d removed; "
                    "the stop deregisters every one",
                    started,
                    len(changed) + len(added),
                    len(removed) + len(changed),
                    extra={"event": "reload_interrupted"},
                )
                return
            try:
                await self._start_service(wanted[key])
                started += 1
            except RegistryError as exc:
                failed += 1
                log.error(
                    "reload: %s not started: %s",
                    key,
                    exc,
                    extra={"event": "reload_failed", "error": str(exc)},
                )
        self.config = new
        self.reloads += 1
        log.info(
            "reloaded: %d added, %d changed, %d removed, %d unchanged%s%s",
            len(added),
            len(changed),
            len(removed),
            unchanged,
            f", {len(live)} updated in place" if live else "",
            f", {failed} failed to start" if failed else "",
            extra={"event": "reloaded"},
        )

    # -- status ------------------------------------------------------------------------

    async def _start_status_server(self) -> None:
        if self.config.status_listen is None:
            return
        host, port = self.config.status_listen
        self.status_server = StatusServer(
            host,
            port,
            {
                "/healthz": lambda: json_body(200, {"status": "alive", "pid": os.getpid()}),
                "/readyz": self._readyz,
                "/status": lambda: json_body(200, self._scrub(self.status())),
                "/metrics": lambda: (
                    200,
                    "text/plain; version=0.0.4",
                    self._scrub_text(self.metrics.render()),
                ),
            },
            token=self.config.status_token,
        )
        try:
            await self.status_server.start()
        except OSError as exc:  # the port is taken, or the address is not ours
            raise ConfigError(
                f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}",
                field="status.listen",
                source=self.config.source,
            ) from None
        log.info(
            "status server on http://%s:%d%s",
            host,
            self.status_server.port,
            " (bearer token required but for /healthz)" if self.config.status_token else "",
            extra={"event": "status_listening"},
        )
        if not _is_loopback(host):
            log.warning(
                "status server listens beyond loopback on %s: anyone who can reach it %s",
                host,
                "needs the bearer token (but for /healthz)"
                if self.config.status_token
                else "can read /status and /metrics; set [status] token to require one",
                extra={"event": "status_exposed"},
            )

    def _secrets(self) -> list[str]:
        found = self.config.secrets()
        # Also the services of a reload cut short by a stop (self.config is the old file).
        for service, _ in self.registrars.values():
            for check in service.checks:
                found += check.secrets()
        return sorted(set(found), key=len, reverse=True)

    def _scrub(self, data: Any) -> Any:
        """``data`` with every credential masked in its strings (whatever rendered them)."""
        secrets = self._secrets()

        def mask(value: Any) -> Any:
            if isinstance(value, str):
                for secret in secrets:
                    value = value.replace(secret, "***")
                return value
            if isinstance(value, dict):
                return {mask(k): mask(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [mask(v) for v in value]
            return value

        return mask(data) if secrets else data

    def _scrub_text(self, body: bytes) -> bytes:
        for secret in self._secrets():
            # Prometheus label values escape backslashes, quotes and newlines.
            escaped = secret.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            for form in {secret, escaped}:
                body = body.replace(form.encode(), b"***")
        return body

    def backend_names(self) -> list[str]:
        """How /status and /metrics name each backend, in the config's order: its URL
        without credentials or options (``(backend[i])`` added where two would read alike)."""
        urls = [backend.redacted() for backend in self.config.backends]
        return [u if urls.count(u) == 1 else f"{u} (backend[{i}])" for i, u in enumerate(urls)]

    def snapshots(self) -> dict[str, RegistrationStatus]:
        """Every running service's status now (by service key): what /status, /readyz and
        /metrics read, so they never disagree."""
        return {key: reg.snapshot() for key, (_, reg) in self.registrars.items()}

    def _readyz(self) -> tuple[int, str, bytes]:
        code, body = readiness(self.snapshots(), self.backend_names())
        return json_body(code, self._scrub(body))

    def status(self) -> dict[str, Any]:
        """The JSON of ``/status``."""
        return {
            "agent": {
                "pid": os.getpid(),
                "started_at": iso_time(self.started_at),
                "config": self.config.source,
                "reloads": self.reloads,
                "backend": self.config.backend.redacted(),
                "backends": self.backend_names(),
                "subreaper": self.subreaper,
                "orphans_reaped": self.reaper.reaped,
                "status_connections": self.status_server.connections if self.status_server else 0,
            },
            "services": [self._service_status(snap) for snap in self.snapshots().values()],
        }

    def _service_status(self, snap: RegistrationStatus) -> dict[str, Any]:
        shown = iso_times(snap.to_dict())
        names = self.backend_names()
        for backend in shown.get("backends", ()):
            if backend["index"] < len(names):
                backend["name"] = names[backend["index"]]
        return shown
