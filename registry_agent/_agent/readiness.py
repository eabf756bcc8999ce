"""Readiness of one registration: does the registry hold our entry as passing, right now?

One function, read by /readyz, /status and /metrics alike, so they never disagree.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["readiness"]


def readiness(status: dict[str, Any], ttl: float, now: float | None = None) -> tuple[bool, str]:
    """``(ready, reason)`` from a registrar's ``status()`` and its TTL.

    Ready means the registry holds our entry as passing. Besides what the
    registrar says, an entry whose last successful heartbeat is older than the
    TTL is taken as lost: the registry has expired it by now, whatever we last heard.
    """
    now = time.time() if now is None else now
    if "ready" in status:  # the registrar's own verdict, from what it read back
        if status["ready"]:
            return True, ""
        return False, str(status.get("not_ready_reason") or _why(status))
    if status.get("registry_status") != "passing" or not status.get("registered"):
        return False, _why(status)
    last = status.get("last_heartbeat")
    if isinstance(last, int | float) and now - last > ttl:
        error = status.get("last_error")
        return False, (
            f"no successful heartbeat for {now - last:.1f}s (ttl {ttl:g}s): "
            "the registry has expired our entry" + (f"; last error: {error}" if error else "")
        )
    return True, ""


def _why(status: dict[str, Any]) -> str:
    error = status.get("last_error")
    if error:
        return str(error)
    state = status.get("state")
    if state == "registered":
        registry = status.get("registry_status")
        return f"registry holds our entry as {registry}" if registry else "not registered yet"
    return f"health gate is {state}"
