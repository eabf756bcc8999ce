"""Gunicorn config: hooks that only record worker lifetimes (for the preloaded app)."""

from __future__ import annotations

from typing import Any

from integration.gunicorn_app._common import record


def post_fork(server: Any, worker: Any) -> None:
    record("post_fork", worker=worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    # Called in the worker, right before it returns to the interpreter's exit (atexit).
    record("worker_exit", worker=worker.pid)


def child_exit(server: Any, worker: Any) -> None:
    # Called in the master once it has reaped the worker.
    record("child_exit", worker=worker.pid)
