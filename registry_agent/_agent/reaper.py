"""Orphan reaping: the agent adopts what its command checks leave behind, and reaps it.

As PID 1 in a container, or as a child subreaper (``PR_SET_CHILD_SUBREAPER``
on Linux), every orphaned descendant becomes our child; nobody else will
``wait()`` for it, so each one that exits would stay a zombie forever.

asyncio waits for its own subprocesses pid by pid, and reaps them the moment
they exit. Reaping with ``waitpid(-1)`` would steal their exit status, so we
only reap a zombie child seen in two scans in a row: asyncio's own children
never stay zombies that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
from pathlib import Path

__all__ = ["OrphanReaper", "become_subreaper", "children", "zombie_children"]

log = logging.getLogger("registry_agent.agent")

_PR_SET_CHILD_SUBREAPER = 36
# Scans of the final pass at exit: a zombie is reaped once seen in two of them.
_FINAL_SCAN_EVERY = 0.05


def become_subreaper() -> bool:
    """Make orphaned descendants our children (Linux); True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def zombie_children(parent: int | None = None) -> set[tuple[int, int]]:
    """(pid, start time) of every zombie whose parent is ``parent`` (default: us)."""
    return {(pid, start) for pid, (state, start) in children(parent).items() if state == "Z"}


def children(parent: int | None = None) -> dict[int, tuple[str, int]]:
    """pid → (state, start time) of every child of ``parent`` (default: us)."""
    parent = os.getpid() if parent is None else parent
    found: dict[int, tuple[str, int]] = {}
    try:
        # Children are listed per thread that forked (or adopted) them.
        pids = {
            int(pid)
            for task in Path(f"/proc/{parent}/task").iterdir()
            for pid in (task / "children").read_text().split()
        }
    except (OSError, ValueError):
        # Kernels without the children files: scan every process.
        pids = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[1] == parent:
            found[pid] = (stat[0], stat[2])
    return found


def _have_proc() -> bool:
    return os.path.exists("/proc/self/stat")


class OrphanReaper:
    """Reaps adopted orphans every ``interval`` seconds, while :meth:`run` runs."""

    def __init__(self, interval: float = 1.0, exit_grace: float = 1.0) -> None:
        self.interval = interval
        #: How long :meth:`final` waits for adopted orphans still running at exit.
        self.exit_grace = exit_grace
        self.reaped = 0
        self._seen: set[tuple[int, int]] = set()

    def scan(self) -> int:
        """Reap the zombies already seen by the previous scan; returns how many."""
        try:
            # One cheap look (nothing reaped) before reading /proc: usually there is no zombie.
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            peek = None  # no children at all
        if peek is None:
            self._seen = set()
            return 0
        zombies = zombie_children()
        reaped = 0
        for pid, _ in zombies & self._seen:
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
        self._seen = zombies
        self.reaped += reaped
        return reaped

    async def run(self) -> None:
        """Scan until cancelled."""
        if not _have_proc():
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                count = self.scan()
            except Exception as exc:  # never let reaping take the agent down
                log.debug("orphan scan failed: %s", exc)
                continue
            if count:
                log.debug("reaped %d orphaned process(es)", count, extra={"event": "reaped"})

    async def final(self) -> int:
        """At exit: reap every adopted zombie, and the orphans that exit within the grace.

        Called once the checks are stopped, so the children left are adopted
        orphans (asyncio reaps its own at once: the seen-twice rule, with scans
        50 ms apart here, still leaves them alone). Orphans still running after
        the grace are left to init, alive: a zombie is never left behind.
        """
        if not _have_proc():
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.exit_grace
        before = self.reaped
        left: dict[int, tuple[str, int]] = {}
        zombies = 0
        while True:
            try:
                self.scan()
                left = children()
            except Exception as exc:  # never let reaping keep the agent from exiting
                log.debug("final orphan scan failed: %s", exc)
                break
            zombies = sum(state == "Z" for state, _ in left.values())
            # Past the grace only zombies keep us, two scans more at most.
            if not left or (loop.time() >= deadline and not zombies):
                break
            if loop.time() >= deadline + 2 * _FINAL_SCAN_EVERY:
                break
            await asyncio.sleep(_FINAL_SCAN_EVERY)
        count = self.reaped - before
        if count or left:
            log.debug(
                "at exit: reaped %d orphaned process(es), %d still running left to init",
                count,
                len(left) - zombies,
                extra={"event": "reaped"},
            )
        return count
