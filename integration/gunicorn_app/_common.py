"""What both app modules and both configs share: settings, the event file, the WSGI app."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from registry_agent import RetryPolicy

URL = os.environ.get("GUNI_REGISTRY", "")
SERVICE = os.environ.get("GUNI_SERVICE", "")
PORT = int(os.environ.get("GUNI_PORT", "0") or 0)
TTL = float(os.environ.get("GUNI_TTL", "3"))
RETRY = RetryPolicy(initial=0.1, cap=1.0)

# The library's warnings (e.g. "crossed fork()") on stderr, where the test reads them.
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")


def record(event: str, **what: Any) -> None:
    """Append one JSON line to the event file (one write: O_APPEND keeps lines whole)."""
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.monotonic(), **what})
    fd = os.open(os.environ["GUNI_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer with the worker's pid, so the test knows who served it."""
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
