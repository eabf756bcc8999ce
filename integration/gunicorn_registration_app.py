"""A WSGI app and its gunicorn config for ``integration/test_gunicorn_registration.py``.

Used both as the app (``integration.gunicorn_registration_app:app``) and as the
config (``--config python:integration.gunicorn_registration_app``). Everything
comes from the environment the test gives gunicorn: ``GREG_REGISTRY`` (backend
URL), ``GREG_SERVICE``, ``GREG_EVENTS`` (a file the hooks append JSON lines
to), ``GREG_TTL``, ``GREG_DRAIN`` (the ``drain_delay``, default 0). The
registration hooks are the library's
(:mod:`registry_agent.integrations.gunicorn`); the others only record worker
lifetimes with a ``time.monotonic()`` stamp (one clock for all processes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from registry_agent import RetryPolicy
from registry_agent.integrations.gunicorn import registration_hooks


def record(event: str, **what: Any) -> None:
    """Append one JSON line to the event file (one write: O_APPEND keeps lines whole)."""
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.monotonic(), **what})
    fd = os.open(os.environ["GREG_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/slow?s=N`` sleeps N seconds first; every path answers with the worker's pid."""
    if environ.get("PATH_INFO") == "/slow":
        time.sleep(float(environ.get("QUERY_STRING", "s=1").partition("=")[2] or 1))
    body = json.dumps({"pid": os.getpid(), "path": environ.get("PATH_INFO")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


if "GREG_REGISTRY" in os.environ:  # imported as the config (the workers import it too)
    _when_ready, on_reload, _on_exit = registration_hooks(
        os.environ["GREG_REGISTRY"],
        os.environ["GREG_SERVICE"],
        health_path="/healthz",
        check_interval=0.5,
        check_timeout=1.0,
        ttl=float(os.environ.get("GREG_TTL", "3")),
        rise=1,
        retry=RetryPolicy(initial=0.1, cap=1.0),
        deregister_timeout=3.0,
        drain_delay=float(os.environ.get("GREG_DRAIN", "0")),
    )

    def when_ready(server: Any) -> None:
        _when_ready(server)
        record("when_ready", master=os.getpid())

    def on_exit(server: Any) -> None:
        _on_exit(server)
        record("on_exit", master=os.getpid())

    def post_fork(server: Any, worker: Any) -> None:
        record("post_fork", worker=worker.pid)

    def worker_exit(server: Any, worker: Any) -> None:
        # In the worker, right before it returns to the interpreter's exit.
        record("worker_exit", worker=worker.pid)

    def child_exit(server: Any, worker: Any) -> None:
        # In the master, once it has reaped the worker.
        record("child_exit", worker=worker.pid)
