"""A check that runs a command: bounded output, its whole process tree killed, always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from registry_agent._errors import ConfigError
from registry_agent._health.base import HealthCheck
from registry_agent._urls import Table, as_str_list, as_str_map

__all__ = ["RUN_MARK", "SAFE_ENV", "CommandCheck", "command_env"]

#: Variables a command check inherits from the agent (plus every ``LC_*``); nothing else.
SAFE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
#: Output kept for the detail (the tail); the rest is read and dropped as it comes.
OUTPUT_KEEP = 4096
#: After the command exits, how long its leftovers may keep writing before they are cut.
_AFTER_EXIT = 0.2
#: How long to wait for a killed process to be reaped before leaving it to a background task.
_REAP_WAIT = 1.0

#: Walks of the process tree on timeout before killing what was found.
_TREE_ROUNDS = 8
_PROC = Path("/proc")

#: A variable set in each run's environment (``<our pid>.<run>``; not ``REGISTRY_AGENT_*``,
#: which the agent reads as its settings, should a check run one): what a run leaves
#: running is found by it once the run ends, daemons that left its process tree
#: (``setsid`` and a double fork: their parent gone, they belong to init) included.
RUN_MARK = "RA_CHECK_RUN"
_runs = itertools.count(1)

_reaping: set[asyncio.Task[int]] = set()


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A command check's environment: :data:`SAFE_ENV` and ``LC_*`` of ours, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    env.update(extra or {})
    return env


class _Tail(asyncio.Protocol):
    """Keeps the last :data:`OUTPUT_KEEP` bytes of a pipe, drops the rest as it arrives."""

    def __init__(self) -> None:
        self.tail = b""
        self.size = 0
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        self.tail = (self.tail + data[-OUTPUT_KEEP:])[-OUTPUT_KEEP:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait briefly for a killed process; if it lingers (D state), a background task reaps it."""
    waiter = asyncio.ensure_future(proc.wait())
    _reaping.add(waiter)
    waiter.add_done_callback(_reaping.discard)
    await asyncio.wait({waiter}, timeout=_REAP_WAIT)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _parents() -> dict[int, int] | None:
    """pid -> parent pid of every process, from ``/proc/*/stat``; None without a Linux /proc."""
    if not _PROC.is_dir():
        return None
    parents: dict[int, int] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/stat", "rb") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = stat.read().rpartition(b")")[2].split()
            parents[int(entry.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return parents


def _descendants(pid: int, parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant, those that left it included.

    A ``setsid`` child escapes the group but keeps its parent link: the tree
    is frozen (SIGSTOP, so nothing forks or exits meanwhile) and walked
    through ``/proc`` parent links until no new descendant shows up, then
    killed. Without ``/proc`` (not Linux) only the group is killed.
    """

    def descendants() -> set[int] | None:
        parents = _parents()
        return None if parents is None else _descendants(pid, parents)

    _kill_group(pid, signal.SIGSTOP)
    try:
        _freeze_then_kill(descendants)
    finally:  # whatever the walk met, nothing is left stopped
        _kill_group(pid)


def _freeze_then_kill(find: Callable[[], set[int] | None]) -> None:
    """SIGSTOP what ``find()`` returns (None: it cannot look) until no new process shows
    up (so none forks or exits meanwhile), then SIGKILL them all."""
    frozen: set[int] = set()
    try:
        for _ in range(_TREE_ROUNDS):
            found = find()
            new = set() if found is None else found - frozen
            if not new:
                break
            for child in new:
                _kill(child, signal.SIGSTOP)
            frozen |= new
    finally:
        for child in frozen:
            _kill(child, signal.SIGKILL)


def _marked(entry: bytes) -> set[int]:
    """Processes whose environment holds ``entry`` (``NAME=value``); empty without /proc."""
    found: set[int] = set()
    if not _PROC.is_dir():
        return found
    for proc in os.scandir(_PROC):
        if not proc.name.isdigit():
            continue
        try:
            with open(f"{proc.path}/environ", "rb") as environ:
                if entry in environ.read().split(b"\0"):
                    found.add(int(proc.name))
        except OSError:
            continue  # gone meanwhile, a zombie, or not ours to read
    return found


def _kill_marked(entry: bytes) -> None:
    """SIGKILL every process carrying a run's mark (frozen first, looked for again)."""
    _freeze_then_kill(lambda: _marked(entry))


class CommandCheck(HealthCheck):
    """Passes when ``argv`` exits 0; its output (stdout and stderr) is the detail.

    The command runs in a session of its own with no stdin. On timeout, or
    when the check is cancelled, its whole process tree is killed with
    SIGKILL: its process group, and on Linux every descendant found through
    ``/proc``, those that left the group with ``setsid`` included; when it
    exits, whatever it left running in its group is killed too. Either way,
    on Linux, so is every process still carrying the run's
    :data:`RUN_MARK` variable: daemons that left the tree (``setsid`` and a
    double fork) are found by it (one that clears its environment is not). The command is
    always waited for, so it never stays a zombie of ours. Output is read as
    it comes and only its last 4 KiB are kept: a command printing gigabytes
    costs no memory.

    Environment: the command does **not** inherit the agent's environment,
    which may hold registry credentials (``CONSUL_HTTP_TOKEN``,
    ``REGISTRY_AGENT_*``, ``ETCD_PASSWORD``…). It gets only ``PATH``,
    ``HOME``, ``USER``, ``LOGNAME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``
    and ``TMPDIR`` from the agent, plus the ``env`` mapping given here, which
    wins over them, and :data:`RUN_MARK`.
    """

    kind: ClassVar[str | None] = "command"
    example: ClassVar[str] = 'command = ["…"]'

    @classmethod
    def from_table(cls, table: Table) -> CommandCheck:
        """``command = ["argv0", "arg"…]`` and ``env = {NAME = "value"}``."""
        argv = table.require("command", as_str_list)
        env = table.get("env", as_str_map, {})
        options = cls.common_options(table)
        with table.naming_fields():
            return cls(argv, env=env, **options)

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        name: str | None = None,
    ) -> None:
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(
                f'expected a list of strings like ["pg_isready", "-q"], got {argv!r}',
                field="command",
            )
        super().__init__(name or f"command {argv[0]}", interval=interval, timeout=timeout)
        if env is not None and (
            not isinstance(env, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            or any(not k or "=" in k or "\0" in k for k in env)
        ):
            raise ConfigError(
                'expected a table of names to strings like {PGHOST = "db"}, got a '
                f"{type(env).__name__}",
                field=f"check {self.name}: env",
            )
        self.argv = list(argv)
        self.env = dict(env or {})

    async def probe(self) -> str:
        loop = asyncio.get_running_loop()
        mark = f"{os.getpid()}.{next(_runs)}"
        read_fd, write_fd = os.pipe()
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=write_fd,
                    stderr=write_fd,
                    start_new_session=True,
                    env={**command_env(self.env), RUN_MARK: mark},
                )
            finally:
                os.close(write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport: asyncio.BaseTransport | None = None
        try:
            transport, tail = await loop.connect_read_pipe(_Tail, pipe)
            code = await proc.wait()
            # Leftovers in its group may hold the pipe open: kill them, take what they wrote.
            _kill_group(proc.pid)
            _kill_marked(f"{RUN_MARK}={mark}".encode())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_AFTER_EXIT):
                    await asyncio.shield(tail.closed)
        except BaseException:
            _kill_tree(proc.pid)
            _kill_marked(f"{RUN_MARK}={mark}".encode())
            await _reap(proc)
            raise
        finally:
            if transport is not None:
                transport.close()
            pipe.close()
        text = tail.tail.decode(errors="replace").strip()[-200:]
        if code != 0:
            why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
            raise RuntimeError(why + (f": {text}" if text else ""))
        return text or "exit 0"
