"""A readiness endpoint an app can mount: ready while the registry holds its entries as passing.

:func:`make_asgi_app` and :func:`make_wsgi_app` answer as the agent's ``/readyz``
does, for the registrars given (blocking or async): ``200 {"ready": true}`` when
every one is ready, else ``503`` with each one's reason (``not_ready``, keyed
``service/instance_id``), and ``503`` when there are none. Mount them at the
path the platform probes (e.g. ``/readyz``). GET and HEAD only (405 otherwise).

Each request reads the registrars' :meth:`~registry_agent.AsyncRegistrar.snapshot`
directly (no registry request, no call into their event loop), so the probe
answers at once even while a registry does not.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from typing import Any

from registry_agent._agent.status import readiness as _readiness
from registry_agent._blocking import Registrar
from registry_agent._errors import ConfigError
from registry_agent._registrar import AsyncRegistrar
from registry_agent._status import RegistrationStatus
from registry_agent._watcher import _retried

__all__ = ["ASGIApp", "WSGIApp", "make_asgi_app", "make_wsgi_app", "readiness"]

AnyRegistrar = Registrar | AsyncRegistrar
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
#: An ASGI application (scope, receive, send).
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
#: A WSGI application (environ, start_response).
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Registrars = Iterable[AnyRegistrar] | Callable[[], Iterable[AnyRegistrar]]


def readiness(registrars: Registrars) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, JSON body)`` of the readiness of ``registrars`` now (a list, or a
    function returning them at each call): what the apps below answer."""
    listed = registrars() if callable(registrars) else registrars
    snapshots: dict[str, RegistrationStatus] = {}
    for registrar in listed:
        snap = _retried(registrar.snapshot, None)
        if snap is None:  # still changing under us after several reads: not ready
            return 503, {"ready": False, "not_ready": {}, "why": "status unreadable, try again"}
        snapshots.setdefault(f"{snap.service}/{snap.instance}", snap)
    return _readiness(snapshots)


def _source(registrars: Registrars) -> Registrars:
    """The registrars as given (a list the app changes later is read at each request),
    checked once; a one-shot iterable is kept as a tuple."""
    if callable(registrars):
        return registrars
    kept = registrars if isinstance(registrars, Collection) else tuple(registrars)
    for i, item in enumerate(kept):
        if not isinstance(item, Registrar | AsyncRegistrar):
            raise ConfigError(
                f"expected a Registrar or AsyncRegistrar, got {type(item).__name__}",
                field=f"registrars[{i}]",
            )
    return kept


def _response(registrars: Registrars, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
    if method not in ("GET", "HEAD"):
        return 405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")], b"only GET and HEAD\n"
    code, body = readiness(registrars)
    data = (json.dumps(body, indent=2, default=str) + "\n").encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ]
    return code, headers, b"" if method == "HEAD" else data


def make_asgi_app(registrars: Registrars) -> ASGIApp:
    """An ASGI app answering readiness for ``registrars``: Starlette's or FastAPI's
    ``Route("/readyz", make_asgi_app([registrar]))`` (an app object, not a function, so
    a route serves it as ASGI), or ``app.mount``."""
    return _ReadinessASGI(_source(registrars))


class _ReadinessASGI:
    """The ASGI app of :func:`make_asgi_app` (a class: Starlette routes a function
    endpoint as a request handler, an object as an ASGI app)."""

    def __init__(self, registrars: Registrars) -> None:
        self.registrars = registrars

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":  # served on its own: nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        code, headers, body = _response(self.registrars, scope.get("method", "GET"))
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})


_REASONS = {200: "OK", 405: "Method Not Allowed", 503: "Service Unavailable"}


def make_wsgi_app(registrars: Registrars) -> WSGIApp:
    """A WSGI app answering readiness for ``registrars`` (e.g. Werkzeug's
    ``DispatcherMiddleware(app, {"/readyz": make_wsgi_app([registrar])})``)."""
    source = _source(registrars)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        code, headers, body = _response(source, environ.get("REQUEST_METHOD", "GET"))
        start_response(f"{code} {_REASONS.get(code, '')}".strip(), headers)
        return [body]

    return app
