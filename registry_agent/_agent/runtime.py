"""The agent runtime: every configured service on one event loop, reloadable, stoppable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from registry_agent._agent.config import AgentConfig, ServiceConfig, load_config
from registry_agent._agent.metrics import AgentMetrics
from registry_agent._agent.status import StatusServer, json_body
from registry_agent._backend import Backend
from registry_agent._errors import ConfigError
from registry_agent._plugins import open_backend
from registry_agent._registrar import AsyncRegistrar
from registry_agent._urls import parse_backend_url

__all__ = ["AgentRuntime"]

log = logging.getLogger("registry_agent.agent")


class AgentRuntime:
    """Runs the registrars of an :class:`AgentConfig` until SIGTERM/SIGINT; SIGHUP reloads."""

    def __init__(self, config: AgentConfig, *, stop_timeout: float = 10.0) -> None:
        self.config = config
        self.stop_timeout = stop_timeout
        self.started_at = time.time()
        self.reloads = 0
        self.backend: Backend | None = None
        self.registrars: dict[str, tuple[ServiceConfig, AsyncRegistrar]] = {}
        self.metrics = AgentMetrics(lambda: [reg for _, reg in self.registrars.values()])
        self.status_server: StatusServer | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Lock | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        self._reloading = asyncio.Lock()
        self._install_signals()
        await self._start_status_server()
        self.backend = self._open_backend(self.config)
        for service in self.config.services:
            await self._start_service(service)
        log.info(
            "agent running: %d service(s) on %s",
            len(self.registrars),
            parse_backend_url(self.config.backend.url, default_port=0).redacted(),
            extra={"event": "agent_started"},
        )
        await self._stop.wait()
        await self.shutdown()
        return 0

    def request_stop(self) -> None:
        """Ask :meth:`run` to deregister everything and return."""
        self._stop.set()

    async def shutdown(self) -> None:
        """Deregister every service (concurrently, within the stop timeout) and close."""
        log.info(
            "stopping: deregistering %d service(s)",
            len(self.registrars),
            extra={"event": "agent_stopping"},
        )
        registrars = [reg for _, reg in self.registrars.values()]
        await asyncio.gather(
            *(reg.stop(timeout=self.stop_timeout) for reg in registrars), return_exceptions=True
        )
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()
        if self.status_server is not None:
            await self.status_server.close()
        log.info("stopped", extra={"event": "agent_stopped"})

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))

    # -- services --------------------------------------------------------------------

    def _open_backend(self, config: AgentConfig) -> Backend:
        return open_backend(config.backend.url, **config.backend.options())

    async def _start_service(self, service: ServiceConfig) -> None:
        assert self.backend is not None
        instance = service.instance
        registrar = AsyncRegistrar(
            self.backend,
            instance,
            ttl=service.ttl,
            heartbeat=service.heartbeat,
            checks=[check.build() for check in service.checks],
            fall=service.fall,
            rise=service.rise,
            on_unhealthy=service.on_unhealthy,
            deregister_critical_after=service.deregister_critical_after,
            on_check=self.metrics.check_observer((instance.service, instance.id)),
        )
        await registrar.start()
        self.registrars[service.key] = (service, registrar)

    async def _stop_service(self, key: str) -> None:
        _, registrar = self.registrars.pop(key)
        await registrar.stop(timeout=self.stop_timeout)

    async def reload(self) -> None:
        """Re-read the file: start new services, stop removed ones, restart changed ones."""
        assert self._reloading is not None
        async with self._reloading:
            try:
                new = load_config(self.config.source)
            except ConfigError as exc:
                log.error(
                    "reload refused, keeping the running config: %s",
                    exc,
                    extra={"event": "reload_failed", "error": str(exc)},
                )
                return
            if new.backend != self.config.backend:
                log.info(
                    "backend changed: re-registering every service",
                    extra={"event": "reload_backend"},
                )
                for key in list(self.registrars):
                    await self._stop_service(key)
                old_backend, self.backend = self.backend, self._open_backend(new)
                if old_backend is not None:
                    with contextlib.suppress(Exception):
                        await old_backend.close()
            wanted = {svc.key: svc for svc in new.services}
            removed = [k for k in self.registrars if k not in wanted]
            changed = [
                k for k in self.registrars if k in wanted and self.registrars[k][0] != wanted[k]
            ]
            added = [k for k in wanted if k not in self.registrars]
            for key in removed + changed:
                await self._stop_service(key)
            for key in changed + added:
                await self._start_service(wanted[key])
            self.config = new
            self.reloads += 1
            log.info(
                "reloaded: %d added, %d changed, %d removed, %d unchanged",
                len(added),
                len(changed),
                len(removed),
                len(self.registrars) - len(added) - len(changed),
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
                "/status": lambda: json_body(200, self.status()),
                "/metrics": lambda: (200, "text/plain; version=0.0.4", self.metrics.render()),
            },
        )
        await self.status_server.start()
        log.info(
            "status server on http://%s:%d",
            host,
            self.status_server.port,
            extra={"event": "status_listening"},
        )

    def _readyz(self) -> tuple[int, str, bytes]:
        not_ready = {}
        for key, (_, reg) in self.registrars.items():
            status = reg.status()
            if status["registry_status"] != "passing":
                not_ready[key] = {
                    "state": status["state"],
                    "registered": status["registered"],
                    "why": status["last_error"] or f"health gate is {status['state']}",
                }
        if not_ready or not self.registrars:
            return json_body(503, {"ready": False, "not_ready": not_ready})
        return json_body(200, {"ready": True})

    def status(self) -> dict[str, Any]:
        """The JSON of ``/status``."""
        return {
            "agent": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "config": self.config.source,
                "reloads": self.reloads,
                "backend": parse_backend_url(self.config.backend.url, default_port=0).redacted(),
            },
            "services": [reg.status() for _, reg in self.registrars.values()],
        }
