"""Flask: register while the development server (``flask run``, ``app.run()``) serves.

::

    app = Flask(__name__)
    app.config["REGISTRY_AGENT_BACKEND"] = "consul://127.0.0.1:8500"
    RegistryAgent(app, service="orders", health_path="/healthz")

**When it registers.** When a werkzeug server serving this app starts serving
(``flask run``, ``app.run()``, ``werkzeug.serving.run_simple(app)``), in the
process that serves: with ``--reload``/``debug=True`` that is the reloader's
child, never its parent (which only watches files). The port and, when the
server is bound to one address, the address come from the server unless the
settings say otherwise. Nothing registers otherwise: importing the app, its
test client, ``flask shell`` or any other CLI command, a script that builds the
app. A script that serves the app by other means calls :meth:`RegistryAgent.start`.

**When it leaves.** On SIGTERM/SIGINT and at exit: deregistered first, then
``drain_delay`` seconds, then the listening socket closes and the requests in
flight complete (at most ``drain_timeout`` seconds); SIGTERM then takes its usual
course. Under gunicorn use :mod:`registry_agent.integrations.gunicorn` instead
(one registration per listening address, kept while workers restart).

**Settings** (``app.config["REGISTRY_AGENT_<KEY>"]``, or the same names as
keywords of :class:`RegistryAgent`, which take precedence): ``BACKEND`` (a URL
or a list of them; default: the environment's, ``REGISTRY_AGENT_BACKEND``, else
``CONSUL_HTTP_ADDR``…, else ``ETCDCTL_ENDPOINTS``…, see
:func:`~registry_agent.backends_from_env`; required only to register: with none
set, the test client and CLI commands work, and a server that starts serving
prints one line, ``Error: …``, and exits with status 2 before it accepts),
``SERVICE`` (default: the app's name),
``ADDRESS``, ``PORT``, ``ID``, ``TAGS``, ``META``, ``SCHEME``, ``VERSION``,
``CHECKS`` (a list of checks), ``HEALTH_PATH`` (adds an ``HttpCheck`` of that
path on the served port), the registration options ``TTL``, ``HEARTBEAT``,
``RISE``, ``FALL``, ``ON_UNHEALTHY``, ``DEREGISTER_CRITICAL_AFTER``, and
``DRAIN_DELAY`` (0), ``DRAIN_TIMEOUT`` (30 s), ``STOP_TIMEOUT`` (10 s),
``ENABLED`` (True; False: never registers). A bad value is a ``ConfigError``
naming ``app.config["REGISTRY_AGENT_<KEY>"]`` (or the keyword, or the
environment variable), raised by :meth:`RegistryAgent.init_app`; under
``flask run`` (any click command) it is one line, ``Error: …``, exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import click
from flask import Flask
from werkzeug import _reloader, serving

from registry_agent._blocking import Registrar
from registry_agent._errors import ConfigError
from registry_agent.integrations._devserver import (
    SETTING_KEYS,
    ChildSignals,
    ServedRegistration,
    Settings,
    graceful_call,
    parse_settings,
    refuse_to_serve,
)

__all__ = ["RegistryAgent"]

log = logging.getLogger("registry_agent")

_EXTENSION = "registry_agent"
_PREFIX = "REGISTRY_AGENT_"


class RegistryAgent:
    """Flask extension: the app registered while a werkzeug server serves it.

    ``RegistryAgent(app, **settings)`` or ``ext = RegistryAgent(**settings)`` then
    ``ext.init_app(app)``. See the module documentation for the settings and
    when it registers.
    """

    def __init__(self, app: Flask | None = None, **settings: Any) -> None:
        unknown = sorted(k for k in settings if k not in SETTING_KEYS)
        if unknown:
            raise _for_cli(
                ConfigError(
                    "unknown keyword; expected one of " + ", ".join(sorted(SETTING_KEYS)),
                    field=f"RegistryAgent({unknown[0]}=…)",
                )
            )
        self._given = dict(settings)
        self.app: Flask | None = None
        self.settings: Settings | None = None
        self._lock = threading.Lock()
        self._manual: Registrar | None = None
        self._served: ServedRegistration | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and check the settings; arm registration for when a server serves ``app``.

        A bad value raises a :class:`~registry_agent.ConfigError`; under a click
        command (``flask run``, ``flask routes``…) it is also a click error, which
        the command line shows as one line (``Error: …``, exit status 2) instead
        of a traceback.
        """
        try:
            self._init_app(app)
        except ConfigError as exc:
            raise _for_cli(exc) from None

    def _init_app(self, app: Flask) -> None:
        values: dict[str, Any] = {}
        for key in SETTING_KEYS:
            config_key = _PREFIX + key.upper()
            if config_key in app.config:
                values[key] = app.config[config_key]
        values.update(self._given)
        given = self._given

        def name(key: str) -> str:
            if key in given:
                return f"RegistryAgent({key}=…)"
            return f'app.config["{_PREFIX}{key.upper()}"]'

        unknown = sorted(
            k
            for k in app.config
            if k.startswith(_PREFIX) and k[len(_PREFIX) :].lower() not in SETTING_KEYS
        )
        if unknown:
            raise ConfigError(
                "unknown setting; expected REGISTRY_AGENT_ and one of "
                + ", ".join(sorted(k.upper() for k in SETTING_KEYS)),
                field=f'app.config["{unknown[0]}"]',
            )
        self.settings = parse_settings(values, name, default_service=app.name)
        if "gunicorn" in sys.modules and self.settings.enabled:
            log.info(
                "the Flask extension registers under flask run/app.run only; under gunicorn "
                "use registry_agent.integrations.gunicorn's hooks (one registration per "
                "listening address)",
                extra={"event": "not_registering"},
            )
        self.app = app
        app.extensions[_EXTENSION] = self
        _patch_werkzeug(self.settings.grace)

    @property
    def registrar(self) -> Registrar | None:
        """The running registrar (while a server serves, or after :meth:`start`), else None."""
        if self._served is not None:
            return self._served.registrar
        return self._manual

    def start(
        self, *, port: int | None = None, address: str = "", wait_registered: float | None = None
    ) -> Registrar:
        """Register now, for an app served by other means (``port``: where it serves).

        Returns the started :class:`~registry_agent.Registrar`; :meth:`stop`
        deregisters it. Signal handlers are not installed (call ``stop``).
        """
        settings = self._require()
        with self._lock:
            if self._manual is None:
                if port is None and "port" not in settings.instance:
                    raise ConfigError(
                        "required to register without a server: start(port=…) or the setting",
                        field='app.config["REGISTRY_AGENT_PORT"]',
                    )
                self._manual = settings.make_registrar(address, port or 0)
                self._manual.start(wait_registered=wait_registered)
            return self._manual

    def stop(self) -> None:
        """Deregister what :meth:`start` registered (never raises)."""
        with self._lock:
            manual, self._manual = self._manual, None
        if manual is not None:
            manual.stop(self._require().stop_timeout)

    def _require(self) -> Settings:
        if self.settings is None:
            raise RuntimeError("RegistryAgent.init_app(app) was not called")
        return self.settings

    def _serve(self, server: serving.BaseWSGIServer, serve_forever: Any) -> None:
        settings = self._require()
        try:
            settings.require_backend()
        except ConfigError as exc:
            refuse_to_serve(server, exc, 2)  # one line, before the server accepts
        bound = server.socket.getsockname()
        if isinstance(bound, tuple):
            host, port = str(bound[0]), int(bound[1])
        else:
            host, port = "", 0  # a unix socket: the settings must give address and port
        registrar = settings.make_registrar(host, port)
        served = ServedRegistration(
            registrar,
            server,
            drain_delay=settings.drain_delay,
            drain_timeout=settings.drain_timeout,
            stop_timeout=settings.stop_timeout,
        )
        server.app = served.in_flight.wrap(server.app)
        self._served = served
        try:
            served.serve(serve_forever)
        finally:
            self._served = None


# Both declare ``message`` (click's as Final): the same text here.
class _CommandLineConfigError(ConfigError, click.ClickException):  # type: ignore[misc]
    """A ConfigError that click shows as ``Error: <message>`` and exit status 2."""

    exit_code = 2

    def __init__(self, error: ConfigError) -> None:
        ConfigError.__init__(self, error.reason, field=error.field, source=error.source)
        click.ClickException.__init__(self, str(error))


def _for_cli(error: ConfigError) -> ConfigError:
    """``error``, made a click error too when raised under a click command (flask's CLI)."""
    if click.get_current_context(silent=True) is None:
        return error
    return _CommandLineConfigError(error)


def _extension_for(app: object) -> RegistryAgent | None:
    """The extension of the Flask app ``app`` is, or wraps (debugger, middleware)."""
    for _ in range(16):
        if isinstance(app, Flask):
            ext = app.extensions.get(_EXTENSION)
            if isinstance(ext, RegistryAgent) and ext.settings is not None:
                return ext if ext.settings.enabled else None
            return None
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


_patched = threading.Lock()


def _patch_werkzeug(grace: float) -> None:
    """Once per process: werkzeug servers serving an app with the extension register it.

    And werkzeug's reloader gives its child ``grace`` seconds to deregister when it
    is stopped, instead of killing it at once.
    """
    with _patched:
        _patch_reloader(grace)
        original = serving.BaseWSGIServer.serve_forever
        if getattr(original, "_registry_agent", False):
            return

        def serve_forever(self: serving.BaseWSGIServer, poll_interval: float = 0.5) -> None:
            ext = _extension_for(self.app)
            if ext is None:
                original(self, poll_interval)
                return
            ext._serve(self, lambda: original(self, poll_interval))

        serve_forever._registry_agent = True  # type: ignore[attr-defined]
        serving.BaseWSGIServer.serve_forever = serve_forever  # type: ignore[method-assign]


def _patch_reloader(grace: float) -> None:
    loop = _reloader.ReloaderLoop
    if getattr(loop.restart_with_reloader, "_registry_agent", False):
        return
    # The child's main thread runs the loop's run() right after werkzeug made SIGTERM
    # sys.exit(0): our handler goes over it there.
    classes: set[type[_reloader.ReloaderLoop]] = {loop, *_reloader.reloader_loops.values()}
    for cls in classes:
        if "run" in cls.__dict__:
            cls.run = _with_child_signals(cls.__dict__["run"])  # type: ignore[method-assign,assignment]

    def restart_with_reloader(self: _reloader.ReloaderLoop) -> int:
        # werkzeug's own loop, with graceful_call in place of subprocess.call.
        while True:
            _reloader._log("info", f" * Restarting with {self.name}")  # type: ignore[attr-defined]
            args = _reloader._get_args_for_reloading()
            new_environ = os.environ.copy()
            new_environ["WERKZEUG_RUN_MAIN"] = "true"
            exit_code = graceful_call(args, new_environ, grace)
            if exit_code != 3:
                return exit_code

    restart_with_reloader._registry_agent = True  # type: ignore[attr-defined]
    loop.restart_with_reloader = restart_with_reloader  # type: ignore[method-assign]


def _with_child_signals(run: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_with_signals(self: Any) -> None:
        ChildSignals().install()
        run(self)

    return run_with_signals
