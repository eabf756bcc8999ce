"""The pattern users write wrongly: a Registrar created AND started at import.

Run with ``gunicorn --preload``, this module is imported once, in the master:
the registrar (its loop thread, its connection, its lease) lives there and is
copied into every worker by fork(). Its atexit hook then runs in each worker
as it exits; it must return at once there (the registration is the master's).
"""

from __future__ import annotations

import os

from integration.gunicorn_app._common import PORT, RETRY, SERVICE, TTL, URL, app, record
from registry_agent import Registrar, ServiceInstance

__all__ = ["app", "registrar"]

registrar = Registrar(
    URL,
    ServiceInstance(SERVICE, address="127.0.0.1", port=PORT, id=f"{SERVICE}-master"),
    ttl=TTL,
    retry=RETRY,
    install_signal_handlers=True,  # the atexit hook: what made every worker exit hang
).start(wait_registered=20)
record("registered", id=registrar.instance.id, master=os.getpid())
