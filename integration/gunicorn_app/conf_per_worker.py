"""Gunicorn config for the recommended pattern: one Registrar per worker.

The registrar is created and started in ``post_fork`` (in the worker, after the
fork: its loop thread and connection are the worker's own), under an id that
carries the worker's pid, and stopped in ``worker_exit``, which deregisters it.
Gunicorn owns the signals, so the registrar installs none.
"""

from __future__ import annotations

import time
from typing import Any

from integration.gunicorn_app._common import PORT, RETRY, SERVICE, TTL, URL, record
from registry_agent import Registrar, ServiceInstance


def instance_for(pid: int) -> ServiceInstance:
    """The entry a worker registers: the port it serves and its pid."""
    return ServiceInstance(
        SERVICE, address="127.0.0.1", port=PORT, id=f"{SERVICE}-{pid}", meta={"pid": str(pid)}
    )


def post_fork(server: Any, worker: Any) -> None:
    record("post_fork", worker=worker.pid)
    worker.registrar = Registrar(URL, instance_for(worker.pid), ttl=TTL, retry=RETRY)
    worker.registrar.start(wait_registered=20)
    record("registered", worker=worker.pid, id=worker.registrar.instance.id)


def worker_exit(server: Any, worker: Any) -> None:
    record("worker_exit", worker=worker.pid)
    registrar = getattr(worker, "registrar", None)
    if registrar is not None:
        began = time.monotonic()
        registrar.stop()
        record("deregistered", worker=worker.pid, took=time.monotonic() - began)


def child_exit(server: Any, worker: Any) -> None:
    record("child_exit", worker=worker.pid)
