"""What every check shares: the result type and a run that is bounded, timed and never raises."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from registry_agent._errors import ConfigError
from registry_agent._urls import Table, as_duration, as_str

__all__ = ["INTERVAL_FLOOR", "MASK", "TIMEOUT_FLOOR", "CheckResult", "HealthCheck"]

MASK = "***"
# A detail lands in logs, /status and the registry's note: keep it short whatever a check says.
DETAIL_MAX = 500
#: The shortest ``interval`` a check accepts (at most 100 runs a second).
INTERVAL_FLOOR = 0.01
#: The shortest ``timeout`` a check accepts (a probe needs time to be answered).
TIMEOUT_FLOOR = 0.01
#: The longest ``interval`` or ``timeout`` a check accepts: one day (asyncio's timers
#: fail on absurd values, so a typo would fail every run instead of being refused).
SECONDS_CEILING = 86400.0


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
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ConfigError(f"expected a number of seconds above zero, got {value!r}", field=field)
    return float(value)


def seconds_at_least(value: float, floor: float, why: str, field: str) -> float:
    """``value`` as seconds, at least ``floor``; else a :class:`ConfigError` naming ``field``."""
    seconds = positive(value, field)
    if seconds < floor:
        raise ConfigError(f"must be at least {floor:g}s ({why}), got {seconds:g}s", field=field)
    if seconds > SECONDS_CEILING:
        raise ConfigError(
            f"must be at most {SECONDS_CEILING:g}s (one day), got {seconds:g}s", field=field
        )
    return seconds


def raised(exc: BaseException) -> str:
    """What a check's SystemExit, KeyboardInterrupt or other BaseException says, as a detail."""
    text = str(exc)
    return f"raised {type(exc).__name__}" + (f": {text}" if text else "")


# Line breaks shown as " ⏎ ", a tab as a space, every other control character escaped
# ("\x1b"): a detail is one line in the log and on a terminal, whatever a check prints
# (a forged log line, a terminal's escape sequences).
_CONTROLS = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    0x09: " ",
    0x0A: " ⏎ ",
    0x0D: "",
    0x2028: " ⏎ ",
    0x2029: " ⏎ ",
}


def _as_detail(text: str) -> str:
    """``text`` as a detail: one line, printable, at most :data:`DETAIL_MAX` characters."""
    text = text.translate(_CONTROLS)
    if len(text) <= DETAIL_MAX:
        return text
    half = DETAIL_MAX // 2 - 3
    return f"{text[:half]} ... {text[-half:]}"


class HealthCheck:
    """Base class: subclasses implement :meth:`probe`; :meth:`run` bounds and times it.

    :meth:`run` never raises (cancellation of the caller excepted): a failure,
    any exception (``SystemExit`` and ``KeyboardInterrupt`` from the check's
    code included) or a timeout is a failed :class:`CheckResult` whose detail is
    at most a few hundred characters and never contains the check's secrets.
    """

    #: The key that names this kind of check in a config table (``http = "…"``), and
    #: ``example``, how that key reads in an error message; None: not configurable.
    kind: ClassVar[str | None] = None
    example: ClassVar[str] = ""

    @classmethod
    def from_table(cls, table: Table) -> HealthCheck:
        """Build from a config table holding the key :attr:`kind`.

        Read every key this kind takes with ``table.get``/``table.require`` (the
        caller refuses the others); the constructor validates, inside
        ``table.naming_fields()`` so its errors name the key.
        """
        raise NotImplementedError(f"{cls.__name__} has no config table")

    @staticmethod
    def common_options(table: Table) -> dict[str, Any]:
        """``name``, ``interval`` and ``timeout`` from ``table``, as constructor keywords."""
        options: dict[str, Any] = {
            "interval": table.get("interval", as_duration, 5.0),
            "timeout": table.get("timeout", as_duration, 2.0),
        }
        name = table.get("name", as_str)
        if name is not None and not name.strip():
            raise table.error("name", "is empty: leave it out for the default name")
        if name:
            options["name"] = name
        return options

    def __init__(self, name: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        self.name = name
        self.interval = seconds_at_least(
            interval, INTERVAL_FLOOR, "at most 100 runs a second", f"check {name}: interval"
        )
        self.timeout = seconds_at_least(
            timeout, TIMEOUT_FLOOR, "a probe needs time to be answered", f"check {name}: timeout"
        )
        self._secrets: tuple[str, ...] = ()

    def _hide(self, secrets: Iterable[str]) -> None:
        """Mask these strings in every detail this check reports."""
        # Longest first, so a secret containing another is masked whole.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def secrets(self) -> tuple[str, ...]:
        """The credentials this check carries (masked in every detail it reports)."""
        return self._secrets

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
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt from an async check's own code: raised on
            # the loop, it would end the whole application's loop. It is the check failing.
            ok, detail = False, raised(exc)
        return CheckResult(ok, _as_detail(self._mask(detail)), time.perf_counter() - started, at)

    async def aclose(self) -> None:
        """Release what the check holds (connections); returns promptly."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, interval={self.interval:g})"
