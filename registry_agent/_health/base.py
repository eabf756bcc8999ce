"""What every check shares: the result type and a run that is bounded, timed and never raises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from registry_agent._errors import ConfigError

__all__ = ["MASK", "CheckResult", "HealthCheck"]

MASK = "***"
# A detail lands in logs, /status and the registry's note: keep it short whatever a check says.
DETAIL_MAX = 500


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One run of a check: outcome, why, how long it took, and when (Unix time)."""

    ok: bool
    detail: str
    latency: float
    at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ok": self.ok, "detail": self.detail, "latency": self.latency, "at": self.at}


def positive(value: float, field: str) -> float:
    """``value`` as seconds above zero, or a :class:`ConfigError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"expected a number of seconds above zero, got {value!r}", field=field)
    return float(value)


def _shorten(text: str) -> str:
    if len(text) <= DETAIL_MAX:
        return text
    half = DETAIL_MAX // 2 - 3
    return f"{text[:half]} ... {text[-half:]}"


class HealthCheck:
    """Base class: subclasses implement :meth:`probe`; :meth:`run` bounds and times it.

    :meth:`run` never raises (cancellation of the caller excepted): a failure,
    an exception or a timeout is a failed :class:`CheckResult` whose detail is
    at most a few hundred characters and never contains the check's secrets.
    """

    def __init__(self, name: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        self.name = name
        self.interval = positive(interval, f"check {name}: interval")
        self.timeout = positive(timeout, f"check {name}: timeout")
        self._secrets: tuple[str, ...] = ()

    def _hide(self, secrets: Iterable[str]) -> None:
        """Mask these strings in every detail this check reports."""
        # Longest first, so a secret containing another is masked whole.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    async def probe(self) -> str:
        """Probe once: return a detail on success, raise on failure."""
        raise NotImplementedError

    async def run(self) -> CheckResult:
        """Run :meth:`probe` within ``timeout``; never raises (except cancellation)."""
        at = time.time()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                detail = await self.probe()
            ok = True
        except TimeoutError:
            ok, detail = False, f"timed out after {self.timeout:g}s"
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # A CancelledError nobody asked for (a check cancelled something of its own).
            ok, detail = False, str(exc) or "cancelled"
        except Exception as exc:
            ok, detail = False, str(exc) or type(exc).__name__
        return CheckResult(ok, _shorten(self._mask(detail)), time.perf_counter() - started, at)

    async def aclose(self) -> None:
        """Release what the check holds (connections); returns promptly."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, interval={self.interval:g})"
