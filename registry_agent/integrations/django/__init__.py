"""Django: an app that registers the site while ``manage.py runserver`` serves it.

::

    INSTALLED_APPS = [..., "registry_agent.integrations.django"]
    REGISTRY_AGENT = {
        "backend": "consul://127.0.0.1:8500",
        "service": "orders",
        "health_path": "/healthz",
    }

**When it registers.** When ``runserver``'s server starts serving, in the
process that serves: the autoreloader's child, never its parent (which only
watches files), or the only process with ``--noreload``. The port and, when
the server is bound to one address, the address come from the server unless
the settings say otherwise. Never for any other management command
(``migrate``, ``check``, ``shell``, ``test`` and its live servers,
``collectstatic``…): the server hook is armed only when the command is
``runserver`` (``sys.argv[1]``, as ``manage.py``, ``django-admin`` and
``python -m django`` give it) and only the dev server's ``serve_forever``
registers, which the reloader's parent never reaches.

Under a production server, registration is the server's business, not the
app's: gunicorn (several workers on one port) takes
:mod:`registry_agent.integrations.gunicorn`'s hooks; uvicorn serving
``asgi.py`` takes :func:`asgi_app` (``application = asgi_app(get_asgi_application())``),
which registers from the same settings (``port`` required there).

**When it leaves.** On SIGTERM/SIGINT and when the autoreloader restarts or
stops its child: deregistered first, then ``drain_delay`` seconds, then the
listening socket closes and the requests in flight complete (at most
``drain_timeout`` seconds); SIGTERM then takes its usual course. The
autoreloader's parent, stopped, gives its child that long instead of killing it.

**Settings** (``settings.REGISTRY_AGENT``, a dict): ``backend`` (a URL or a list
of them; default: the environment's, ``REGISTRY_AGENT_BACKEND``, else
``CONSUL_HTTP_ADDR``…, else ``ETCDCTL_ENDPOINTS``…, see
:func:`~registry_agent.backends_from_env`; required only to register: with none
set, ``migrate``, ``check`` and the other commands run as usual, ``runserver``
prints one line, ``Error: …``, and exits with status 1 before its server
accepts, and :func:`asgi_app`'s lifespan startup fails with that message),
``service`` (required), ``address``, ``port``, ``id``,
``tags``, ``meta``, ``scheme``, ``version``, ``checks`` (a list of checks),
``health_path`` (adds an ``HttpCheck`` of that path on the served port), the
registration options ``ttl``, ``heartbeat``, ``rise``, ``fall``,
``on_unhealthy``, ``deregister_critical_after``, and ``drain_delay`` (0),
``drain_timeout`` (30 s), ``stop_timeout`` (10 s), ``enabled`` (True). A bad
value is a :class:`~registry_agent.ConfigError` naming
``settings.REGISTRY_AGENT["port"]`` (etc., or the environment variable),
reported by the system check ``registry_agent.E001``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from registry_agent._errors import ConfigError
from registry_agent._models import ServiceInstance
from registry_agent.integrations._devserver import (
    ChildSignals,
    ServedRegistration,
    Settings,
    graceful_call,
    parse_settings,
    refuse_to_serve,
    stop_active,
)

__all__ = ["asgi_app", "load_settings"]

_lock = threading.Lock()


def _name(key: str) -> str:
    return f'settings.REGISTRY_AGENT["{key}"]'


def load_settings() -> Settings:
    """``settings.REGISTRY_AGENT``, checked: a bad value raises a ConfigError naming its key."""
    from django.conf import settings

    values = getattr(settings, "REGISTRY_AGENT", None)
    if values is None:
        raise ConfigError(
            "required by the app registry_agent.integrations.django: a dict such as "
            '{"backend": "consul://127.0.0.1:8500", "service": "orders"}',
            field="settings.REGISTRY_AGENT",
        )
    if not isinstance(values, dict):
        raise ConfigError(f"expected a dict, got {values!r}", field="settings.REGISTRY_AGENT")
    if not values.get("service"):
        raise ConfigError("required: the service name to register", field=_name("service"))
    return parse_settings(values, _name)


def _is_runserver() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "runserver"


def _check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Django system check: a bad ``settings.REGISTRY_AGENT`` as an error naming the key."""
    from django.core.checks import Error

    try:
        load_settings()
    except ConfigError as exc:
        return [Error(str(exc), id="registry_agent.E001")]
    return []


def _arm() -> None:
    """At Django's startup: check the settings; for ``runserver``, hook its server.

    Bad settings do not raise here (Django would print a traceback): the system
    check ``registry_agent.E001`` reports them, which stops ``runserver``,
    ``migrate``, ``check``… with the message alone.
    """
    from django.core import checks

    checks.register(_check_settings)
    try:
        settings = load_settings()
    except ConfigError:
        return
    if not settings.enabled or not _is_runserver():
        return
    from django.core.servers import basehttp
    from django.utils import autoreload

    with _lock:
        original = basehttp.WSGIServer.serve_forever
        if getattr(original, "_registry_agent", False):
            return

        def serve_forever(self: Any, poll_interval: float = 0.5) -> None:
            _serve(settings, self, lambda: original(self, poll_interval))

        serve_forever._registry_agent = True  # type: ignore[attr-defined]
        basehttp.WSGIServer.serve_forever = serve_forever

        if os.environ.get(autoreload.DJANGO_AUTORELOAD_ENV) == "true":
            # The child: its main thread ends the process (SIGTERM, a reload) while the
            # server runs in "django-main-thread"; deregister and drain before it exits.
            start_django = autoreload.start_django

            def start_and_stop(*args: Any, **kwargs: Any) -> None:
                ChildSignals().install()  # over autoreload's sys.exit(0), set just before
                try:
                    start_django(*args, **kwargs)
                finally:
                    stop_active()  # a reload (exit 3) or Ctrl+C: deregister, then drain

            autoreload.start_django = start_and_stop
        else:
            grace = settings.grace

            def restart_with_reloader() -> int:
                # Django's own loop, with graceful_call in place of subprocess.run.
                new_environ = {**os.environ, autoreload.DJANGO_AUTORELOAD_ENV: "true"}
                args = [str(a) for a in autoreload.get_child_arguments()]
                while True:
                    code = graceful_call(args, new_environ, grace)
                    if code != 3:
                        return code

            autoreload.restart_with_reloader = restart_with_reloader


def _serve(settings: Settings, server: Any, serve_forever: Callable[[], None]) -> None:
    try:
        settings.require_backend()
    except ConfigError as exc:
        refuse_to_serve(server, exc, 1)  # one line, before the server accepts
    host, port = server.socket.getsockname()[:2]
    registrar = settings.make_registrar(str(host), int(port))
    served = ServedRegistration(
        registrar,
        server,
        drain_delay=settings.drain_delay,
        drain_timeout=settings.drain_timeout,
        stop_timeout=settings.stop_timeout,
    )
    server.application = served.in_flight.wrap(server.application)
    served.serve(serve_forever)


def asgi_app(application: Any) -> Any:
    """``application`` (Django's ASGI app) with a lifespan that registers from the settings.

    For uvicorn (one process) serving ``asgi.py``: on SIGTERM/SIGINT the instance
    leaves discovery first, then uvicorn drains (see
    :func:`registry_agent.integrations.starlette.registry_lifespan`). ``port`` is
    required in the settings (the app cannot see where uvicorn listens).

    The app cannot see uvicorn's host either: the advertised address is
    ``address`` or, without it, the address of the default route, and the check
    (``health_path``'s, else a TCP connection) probes that address, so an entry
    nobody can reach never passes. Serving on loopback only (uvicorn's default
    ``--host 127.0.0.1``) takes ``"address": "127.0.0.1"``.
    """
    from registry_agent.integrations.starlette import registry_lifespan

    settings = load_settings()
    instance, checks = _asgi_registration(settings)
    kwargs: dict[str, Any] = {"options": settings.options, "stop_timeout": settings.stop_timeout}
    if checks:
        kwargs["checks"] = checks
    missing: ConfigError | None = None
    lifespan: Any = None
    try:
        backend = settings.require_backend()
    except ConfigError as exc:
        missing = exc  # the server's startup fails with it: importing asgi.py does not
    else:
        lifespan = registry_lifespan(backend, instance, drain_delay=settings.drain_delay, **kwargs)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        if missing is not None:
            await receive()
            await send({"type": "lifespan.startup.failed", "message": str(missing)})
            return
        await _run_lifespan(lifespan, receive, send)

    return app


def _asgi_registration(settings: Settings) -> tuple[ServiceInstance, list[Any]]:
    """The instance and checks under an ASGI server: ``port`` required, checks on the
    advertised address (not loopback: the server's bind host is unknown here)."""
    if "port" not in settings.instance:
        raise ConfigError(
            "required under an ASGI server: the port it listens on", field=_name("port")
        )
    instance = settings.make_instance()
    return instance, settings.checks_for(instance.address, instance.port)


async def _run_lifespan(lifespan: Any, receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    context = lifespan(None)
    try:
        await context.__aenter__()
    except BaseException as exc:
        await send({"type": "lifespan.startup.failed", "message": str(exc)})
        return
    await send({"type": "lifespan.startup.complete"})
    message = await receive()
    try:
        await context.__aexit__(None, None, None)
    except BaseException as exc:
        await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})
