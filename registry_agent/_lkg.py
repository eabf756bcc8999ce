"""Last known good on disk: the instances discovery last served, kept for a start while
the registry is down.

One JSON file per service in a directory of the caller's choosing (opt-in:
``AsyncDiscovery(..., last_known_good="/var/cache/myapp/discovery")``). A file
holds the service name, a format name and version, the time it was saved (UTC)
and the instances with their health, nothing else: no backend URL, no token,
no check output. It is written atomically (a temporary file in the same
directory, flushed to disk, then renamed over the old one), so a reader (this
process later, or another process sharing the directory) sees either the old
set or the new one, never half of one. A file that cannot be read, is not
valid, or was written for another service or by a newer format is logged
(WARNING) and ignored, never raised.

:class:`LastKnownGoodStore` is the file store (pure, blocking);
:class:`LastKnownGood` is what :class:`~registry_agent.AsyncDiscovery` uses:
it saves what discovery serves when it changed (off the event loop), and
serves a saved set, marked stale, for a service whose first read failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from registry_agent._errors import BackendUnavailable, ConfigError, RegistryError
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance

if TYPE_CHECKING:
    from registry_agent._watcher import AsyncWatcher

__all__ = ["LastKnownGood", "LastKnownGoodStore", "SavedSet", "file_name", "last_known_good"]

log = logging.getLogger("registry_agent.discovery")

#: The ``format`` every file names; a file naming another is not ours.
FORMAT = "registry-agent/last-known-good"
#: The version of the file layout written; a file with a higher one is ignored.
VERSION = 1
#: A file larger than this is not read (it is not one we wrote).
MAX_FILE_BYTES = 32 * 1024 * 1024
_SUFFIX = ".json"
_SLUG_UNSAFE = re.compile(r"[^a-z0-9_-]+")
_SLUG_MAX = 64
# How often a stale service's watch is looked at for its first answer (the single-backend
# case wakes on the answer itself).
_RECOVERY_POLL = 0.25
# How often a first read is looked at while waiting for an answer or every backend's failure.
_FIRST_READ_POLL = 0.02
# close() waits this long for a save in progress.
_CLOSE_WAIT = 5.0
# A failing save is logged again after this long.
_SAVE_WARNING_EVERY = 300.0
# A saved_at this far ahead of the clock is accepted (clocks of machines sharing a
# directory differ a little); further ahead, the file is invalid.
CLOCK_SKEW = 300.0

T = TypeVar("T")


def file_name(service: str) -> str:
    """The file name for ``service``: a readable slug and a hash of the exact name.

    ``orders`` gives ``orders.<16 hex digits>.json``. The slug (lower case, at
    most 64 characters, anything but ``a-z 0-9 _ -`` turned into ``_``) keeps it
    readable; the hash keeps names apart that a case-insensitive file system,
    or the slug, would merge (``Orders`` and ``orders``, ``a.b`` and ``a_b``).
    No name can point outside the directory (``..``, ``/``) or be hidden.
    """
    slug = _SLUG_UNSAFE.sub("_", service.lower())[:_SLUG_MAX].strip("_") or "service"
    digest = hashlib.sha256(service.encode("utf-8")).hexdigest()[:16]
    return f"{slug}.{digest}{_SUFFIX}"


def utc_text(unix_time: float) -> str:
    """``unix_time`` as ISO 8601 UTC to the second, e.g. ``2026-12-01T06:49:57Z``."""
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True, slots=True)
class SavedSet:
    """The instances of one service as a last-known-good file holds them."""

    service: str
    #: The instances with the health they had when saved, in the saved order.
    instances: tuple[InstanceHealth, ...]
    #: When the set was saved (Unix time, from the file's UTC time).
    saved_at: float
    #: The file it was read from.
    path: Path

    def age(self, now: float | None = None) -> float:
        """Seconds since the set was saved (0 for a time in the future: a clock moved)."""
        return max(0.0, (time.time() if now is None else now) - self.saved_at)

    @property
    def saved_at_text(self) -> str:
        """The save time as ISO 8601 UTC, e.g. ``2026-12-01T06:49:57Z``."""
        return utc_text(self.saved_at)


class LastKnownGoodStore:
    """One JSON file per service in ``directory``: atomic save, forgiving load.

    The directory is created (mode 0700) by the first save when missing; an
    existing one is used as it is (one writable by other users is logged once:
    whoever can write a file there chooses where this process sends traffic).
    Several processes may share the directory: writes are atomic renames of
    temporary files with unique names, the last one wins, and every reader sees
    a whole file. Files are written 0600.

    Raises :class:`ConfigError` (field ``last_known_good``) when ``directory`` is
    not a path, or names something that exists and is not a directory.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        if isinstance(directory, bytes) or not isinstance(directory, (str, os.PathLike)):
            raise ConfigError(
                f"expected a directory path (str or os.PathLike), got {directory!r}",
                field="last_known_good",
            )
        text = os.fspath(directory)
        if not isinstance(text, str) or not text or "\0" in text:
            raise ConfigError(
                f"expected a directory path, got {directory!r}", field="last_known_good"
            )
        self.directory = Path(text).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(
                f"expected a directory, but {str(self.directory)!r} is a file",
                field="last_known_good",
            )
        self._checked_directory = False

    def path_for(self, service: str) -> Path:
        """Where ``service``'s set is kept (see :func:`file_name`)."""
        return self.directory / file_name(service)

    # -- save -------------------------------------------------------------------------

    def _ensure_directory(self) -> None:
        if self._checked_directory:
            return
        try:
            self.directory.mkdir(mode=0o700, parents=False)
        except FileNotFoundError:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.directory.mkdir(mode=0o700)
                os.chmod(self.directory, 0o700)  # whatever the umask
        except FileExistsError:
            if not self.directory.is_dir():
                raise NotADirectoryError(
                    f"{str(self.directory)!r} exists and is not a directory"
                ) from None
            mode = self.directory.stat().st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
                log.warning(
                    "last known good directory %s is writable by other users: whoever can "
                    "write a file there chooses the instances served while the registry is "
                    "down (chmod 700 it, or share it with a group you trust)",
                    self.directory,
                    extra={"event": "lkg_directory_open", "path": str(self.directory)},
                )
        else:
            os.chmod(self.directory, 0o700)  # whatever the umask
        self._checked_directory = True

    def save(
        self, service: str, instances: Sequence[InstanceHealth], *, now: float | None = None
    ) -> Path:
        """Write ``instances`` (with their health) as ``service``'s set; return the path.

        Atomic: a temporary file in the directory is written and flushed to disk,
        then renamed over the old file, and the directory entry flushed. Only the
        instance fields and their status are written (never a check's output).
        Raises :class:`OSError` when the directory or file cannot be written.
        """
        saved_at = time.time() if now is None else now
        document = {
            "format": FORMAT,
            "version": VERSION,
            "service": service,
            "saved_at": datetime.fromtimestamp(saved_at, UTC).isoformat().replace("+00:00", "Z"),
            "instances": [
                {"instance": h.instance.to_dict(), "status": str(h.status)} for h in instances
            ],
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        try:
            self._ensure_directory()
            return self._write(service, data)
        except OSError:
            self._checked_directory = False  # removed meanwhile? look again next time
            raise

    def _write(self, service: str, data: bytes) -> Path:
        target = self.path_for(service)
        # A unique temporary name: two processes saving at once never write one file.
        fd, temporary = tempfile.mkstemp(
            dir=self.directory, prefix=f".{target.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._sync_directory()
        return target

    def _sync_directory(self) -> None:
        # The rename itself survives a power cut only once the directory is flushed.
        if os.name != "posix":
            return
        with contextlib.suppress(OSError):
            fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- load -------------------------------------------------------------------------

    def load(self, service: str) -> SavedSet | None:
        """``service``'s saved set, or None when there is none or it cannot be used.

        Never raises for the file's content or a read error: a file that is
        unreadable, too large, not JSON, of another format or a newer version,
        for another service, or with an invalid instance is logged (WARNING,
        with the path and what is wrong) and ignored.
        """
        path = self.path_for(service)
        try:
            raw = self._read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._ignored(service, path, f"cannot be read: {exc}")
            return None
        try:
            document = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._ignored(service, path, "not UTF-8 text")
            return None
        except json.JSONDecodeError as exc:
            self._ignored(service, path, f"not valid JSON (line {exc.lineno}, column {exc.colno})")
            return None
        except RecursionError:
            self._ignored(service, path, "nested too deeply to be a last-known-good file")
            return None
        except (ValueError, TypeError, MemoryError) as exc:
            self._ignored(service, path, f"not valid JSON ({type(exc).__name__}: {exc})")
            return None
        try:
            return self._decode(service, path, document)
        except _Foreign as exc:
            self._ignored(service, path, str(exc))
            return None
        except RecursionError:
            self._ignored(service, path, "nested too deeply to be a last-known-good file")
            return None
        except (ValueError, TypeError, MemoryError) as exc:
            self._ignored(service, path, f"not a valid set ({type(exc).__name__}: {exc})")
            return None

    def _read(self, path: Path) -> bytes:
        # A FIFO, device or socket in the file's place would block open() or read()
        # forever: refuse anything but a regular file before opening it, open without
        # blocking (a FIFO swapped in meanwhile opens at once), and look again after.
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({_kind(mode)})")
        flags = (
            os.O_RDONLY
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_BINARY", 0)
            | getattr(os, "O_NONBLOCK", 0)
        )
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"not a regular file ({_kind(mode)})")
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return data

    def _decode(self, service: str, path: Path, document: Any) -> SavedSet:
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise _Foreign(f'not a last-known-good file (no "format": {FORMAT!r})')
        version = document.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise _Foreign(f'"version" is {version!r}, expected a whole number')
        if version > VERSION:
            raise _Foreign(
                f"written in format version {version} (a newer registry-agent); "
                f"this one reads up to {VERSION}"
            )
        if version < 1:
            raise _Foreign(f'"version" is {version}, expected 1 to {VERSION}')
        if document.get("service") != service:
            raise _Foreign(
                f"holds service {document.get('service')!r}, not {service!r} (a foreign file)"
            )
        saved_at = _parse_time(document.get("saved_at"))
        if saved_at > time.time() + CLOCK_SKEW:
            raise _Foreign(
                f'"saved_at" is {document.get("saved_at")!r}, more than {CLOCK_SKEW:g}s '
                "ahead of this clock (a clock that was wrong, or a file not written by us)"
            )
        entries = document.get("instances")
        if not isinstance(entries, list):
            raise _Foreign('"instances" is not a list')
        instances = []
        seen: set[tuple[str, str]] = set()
        for number, entry in enumerate(entries):
            decoded = _decode_instance(service, number, entry)
            key = (decoded.instance.node, decoded.instance.id)
            if key in seen:  # the same instance twice: the first one counts
                continue
            seen.add(key)
            instances.append(decoded)
        return SavedSet(service, tuple(instances), saved_at, path)

    def _ignored(self, service: str, path: Path, why: str) -> None:
        log.warning(
            "last known good file for %s ignored: %s: %s",
            service,
            path,
            why,
            extra={"event": "lkg_ignored", "service": service, "path": str(path), "error": why},
        )


class _Foreign(Exception):
    """A file that parsed but is not a usable set for the service asked about."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


def _parse_time(value: object) -> float:
    if not isinstance(value, str):
        raise _Foreign(f'"saved_at" is {value!r}, expected an ISO 8601 UTC time')
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Foreign(f'"saved_at" is {value!r}, expected an ISO 8601 UTC time') from None
    if moment.tzinfo is None:
        raise _Foreign(f'"saved_at" is {value!r}: no time zone (expected UTC, ...Z)')
    result = moment.timestamp()
    if not math.isfinite(result):
        raise _Foreign(f'"saved_at" is {value!r}: out of range')
    return result


def _decode_instance(service: str, number: int, entry: object) -> InstanceHealth:
    where = f"instances[{number}]"
    if not isinstance(entry, dict):
        raise _Foreign(f"{where} is not an object")
    data = entry.get("instance")
    if not isinstance(data, dict):
        raise _Foreign(f"{where}.instance is not an object")
    try:
        status = HealthStatus(str(entry.get("status")))
    except ValueError:
        raise _Foreign(
            f"{where}.status is {entry.get('status')!r}, expected passing, warning or critical"
        ) from None
    if data.get("service") != service:
        raise _Foreign(f"{where} is an instance of {data.get('service')!r}, not {service!r}")
    try:
        instance = ServiceInstance.from_registry(
            service=service,
            # Types are checked by from_registry (a ConfigError naming the field).
            id=data.get("id"),  # type: ignore[arg-type]
            address=data.get("address"),  # type: ignore[arg-type]
            port=data.get("port"),  # type: ignore[arg-type]
            tags=data.get("tags", ()),
            meta=data.get("meta"),
            node=data.get("node", ""),
            scheme=data.get("scheme", ""),
            version=data.get("version", ""),
        )
    except (ConfigError, TypeError) as exc:
        raise _Foreign(f"{where} is not a valid instance: {exc}") from None
    return InstanceHealth(instance, status)


# -- discovery's side --------------------------------------------------------------------


def _content(instances: Sequence[InstanceHealth]) -> tuple[tuple[ServiceInstance, str, str], ...]:
    # What a file holds (the node too: it tells Consul entries apart), to compare sets.
    return tuple((h.instance, h.instance.node, str(h.status)) for h in instances)


def _all_failed(watcher: AsyncWatcher, service: str) -> bool:
    """Every backend of ``watcher`` failed ``service`` at least once and none has read it."""
    if watcher._read_by_any(service):
        return False
    return all(
        watcher._errors.get((service, member), 0) > 0 for member in range(len(watcher.backends))
    )


def _words(error: BaseException | None) -> str:
    if error is None:
        return "no answer yet"
    return error.message if isinstance(error, RegistryError) else str(error)


def tls_failure(error: BaseException) -> bool:
    """True when ``error`` is a failed TLS handshake or certificate check."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return True
        if isinstance(current, RegistryError) and current.message.startswith("TLS with "):
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable(error: BaseException | None) -> bool:
    """True when ``error`` says the registry could not be reached: no answer at all
    (None: a silent registry), a refused or reset connection, a timeout, a name that
    does not resolve, a 5xx, 429 or 503 (:class:`BackendUnavailable`). False for an
    answer that refuses us (permission denied, 401/403: :class:`Rejected`, and any
    other registry error) and for a failed TLS handshake or certificate check: a
    configuration to fix, not an outage to ride out.
    """
    if error is None:
        return True
    if not isinstance(error, BackendUnavailable):
        return False
    return not tls_failure(error)


def _daemon_call(function: Callable[[], T]) -> asyncio.Future[T]:
    """``function()`` in a daemon thread of its own, as a future of the running loop.

    Not the loop's executor: a read stuck on a hung network mount would keep
    ``asyncio.run()`` (which waits for the executor's threads) from ever ending.
    The caller bounds its wait; a thread still stuck then is left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: tuple[bool, Any]) -> None:
        if future.done():
            return
        if outcome[0]:
            future.set_result(outcome[1])
        else:
            future.set_exception(outcome[1])

    def run() -> None:
        outcome: tuple[bool, Any]
        try:
            outcome = (True, function())
        except BaseException as exc:  # handed to the loop, raised there
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="registry-agent last known good read", daemon=True).start()
    return future


class LastKnownGood:
    """Discovery's last-known-good cache over a :class:`LastKnownGoodStore` (event loop side).

    ``max_age``: a saved set older than this many seconds is not used, and one
    served stale stops being served once it is that old (logged); None (the
    default): any age.
    """

    def __init__(self, directory: str | os.PathLike[str], max_age: float | None = None) -> None:
        if max_age is not None and (
            isinstance(max_age, bool)
            or not isinstance(max_age, (int, float))
            or not math.isfinite(max_age)
            or max_age <= 0
        ):
            raise ConfigError(
                f"expected seconds > 0 or None, got {max_age!r}", field="last_known_good_max_age"
            )
        self.store = LastKnownGoodStore(directory)
        self.max_age = None if max_age is None else float(max_age)
        # Services served from a file now: the set, when serving began (monotonic), the file.
        self._stale: dict[str, tuple[list[InstanceHealth], float, SavedSet]] = {}
        # Services whose stale serving ended before the registry answered, and why.
        self._ended: dict[str, str] = {}
        self._recoveries: dict[str, asyncio.Task[None]] = {}
        # The file load of a service's episode, shared by every caller (single flight),
        # and its outcome until the registry answers.
        self._loads: dict[str, asyncio.Future[SavedSet | None]] = {}
        self._declined: set[str] = set()
        # Saving: the watcher state last looked at, the content last written, what waits.
        self._seen: dict[str, object] = {}
        self._saved: dict[str, tuple[tuple[ServiceInstance, str, str], ...]] = {}
        self._wanted: dict[str, list[InstanceHealth]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._save_warned: dict[str, float] = {}
        self._closed = False

    # -- first read ---------------------------------------------------------------------

    async def first_read(
        self,
        service: str,
        watcher: AsyncWatcher,
        timeout: float,
        errors: Mapping[str, BaseException],
    ) -> float | None:
        """Wait for ``service``'s first read; None when it is served from the file instead.

        Waits until a backend has read the service, every backend has failed it
        once (a refused connection: quick), or ``timeout``. When the registry is
        unreachable (see :func:`unreachable`: not when it refused us) and a usable
        file exists, the saved set is served as stale from now on and None
        returned. Otherwise returns the time left of ``timeout`` for the caller's
        own wait. Concurrent callers share one load of the file, one WARNING and
        one recovery task.
        """
        started = time.monotonic()
        deadline = started + timeout
        if self.stale(service, watcher):
            return None
        while (  # noqa: ASYNC110 - no event says "every backend failed"
            not watcher._read_by_any(service)
            and not _all_failed(watcher, service)
            and time.monotonic() < deadline
            and service not in self._stale
        ):
            await asyncio.sleep(_FIRST_READ_POLL)
        if watcher._read_by_any(service):
            return max(0.0, deadline - time.monotonic())
        if service in self._stale:  # another caller began serving it meanwhile
            return None
        last = errors.get(service)
        if not unreachable(last):
            return max(0.0, deadline - time.monotonic())
        saved = await self._load_once(service, timeout)
        if watcher._read_by_any(service):  # it answered meanwhile: fresh data wins
            return max(0.0, deadline - time.monotonic())
        if service in self._stale:
            return None
        if saved is None or service in self._declined or self._closed:
            return max(0.0, deadline - time.monotonic())
        age = saved.age()
        if self.max_age is not None and age > self.max_age:
            self._declined.add(service)
            log.warning(
                "last known good for %s not used: saved %s (%s ago), older than "
                "last_known_good_max_age=%gs: %s",
                service,
                saved.saved_at_text,
                _age_text(age),
                self.max_age,
                saved.path,
                extra={"event": "lkg_too_old", "service": service, "path": str(saved.path)},
            )
            return max(0.0, deadline - time.monotonic())
        if not saved.instances:
            # An empty set served stale would hide the outage behind "no instance".
            self._declined.add(service)
            log.warning(
                "last known good for %s not used: it holds no instance (saved %s): %s",
                service,
                saved.saved_at_text,
                saved.path,
                extra={"event": "lkg_empty", "service": service, "path": str(saved.path)},
            )
            return max(0.0, deadline - time.monotonic())
        note = f"stale: last known good from {saved.saved_at_text}"
        served = [InstanceHealth(h.instance, h.status, note) for h in saved.instances]
        self._stale[service] = (served, time.monotonic(), saved)
        self._ended.pop(service, None)
        why = _words(errors.get(service))
        log.warning(
            "registry unreachable for %s (%s): serving %d instance(s) from the last known "
            "good, saved %s (%s ago), marked stale until it answers: %s",
            service,
            why,
            len(served),
            saved.saved_at_text,
            _age_text(age),
            saved.path,
            extra={
                "event": "lkg_serving",
                "service": service,
                "path": str(saved.path),
                "error": why,
            },
        )
        if service not in self._recoveries:
            self._recoveries[service] = asyncio.create_task(
                self._await_answer(service, watcher), name=f"last known good {service}"
            )
        return None

    async def _load_once(self, service: str, timeout: float) -> SavedSet | None:
        """The service's file, loaded once per episode (shared), at most ``timeout`` s."""
        load = self._loads.get(service)
        if load is None:
            load = self._loads[service] = _daemon_call(lambda: self.store.load(service))
        try:
            return await asyncio.wait_for(asyncio.shield(load), timeout)
        except TimeoutError:
            if not load.done():
                load.cancel()  # the thread is left behind; its answer is ignored
                log.warning(
                    "last known good for %s not used: reading %s took longer than %gs "
                    "(a hung file system?)",
                    service,
                    self.store.path_for(service),
                    timeout,
                    extra={
                        "event": "lkg_ignored",
                        "service": service,
                        "path": str(self.store.path_for(service)),
                        "error": "read timed out",
                    },
                )
            return None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None  # the shared load was cancelled by close()
        except Exception:  # load() logs and returns None for anything it knows
            return None

    async def _await_answer(self, service: str, watcher: AsyncWatcher) -> None:
        synced = watcher._synced.get(service)
        while not watcher._read_by_any(service):
            if synced is None:
                await asyncio.sleep(_RECOVERY_POLL)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RECOVERY_POLL):
                        await synced.wait()
        self._recovered(service, watcher)

    def _recovered(self, service: str, watcher: AsyncWatcher) -> None:
        entry = self._stale.pop(service, None)
        self._ended.pop(service, None)
        self._loads.pop(service, None)
        self._declined.discard(service)
        task = self._recoveries.pop(service, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if entry is None:
            return
        fresh = watcher.snapshot(service)
        log.info(
            "registry answered for %s: %d fresh instance(s) replace the last known good "
            "(served stale for %.1fs)",
            service,
            len(fresh),
            time.monotonic() - entry[1],
            extra={"event": "lkg_fresh", "service": service},
        )
        self._offer(service, watcher, fresh)

    # -- serving ------------------------------------------------------------------------

    def stale(self, service: str, watcher: AsyncWatcher | None) -> bool:
        """True while ``service`` is served from its file (its registry not read yet)."""
        if service not in self._stale:
            return False
        return watcher is None or not watcher._read_by_any(service)

    def describe(self, service: str, errors: Mapping[str, BaseException]) -> str | None:
        """``stale: last known good from <time>; the registry is unreachable: <words>``
        while ``service`` is served stale, else None."""
        entry = self._stale.get(service)
        if entry is None:
            return None
        return (
            f"stale: last known good from {entry[2].saved_at_text}; the registry is "
            f"unreachable: {_words(errors.get(service))}"
        )

    def stale_set(self, service: str) -> list[InstanceHealth] | None:
        """The set served stale for ``service`` now, or None."""
        entry = self._stale.get(service)
        return None if entry is None else list(entry[0])

    def ended(self, service: str) -> str | None:
        """Why serving ``service`` stale stopped before the registry answered, or None."""
        return self._ended.get(service)

    def health(
        self,
        service: str,
        watcher: AsyncWatcher,
        errors: Mapping[str, BaseException] | None = None,
    ) -> list[InstanceHealth] | None:
        """What discovery serves for ``service``: the stale set until the registry
        answers, then the watcher's (saved when it changed). None when the stale set
        may no longer be served (older than ``max_age`` now, or the registry now
        refuses us) and the registry has not answered: see :meth:`ended`."""
        entry = self._stale.get(service)
        if entry is not None:
            if not watcher._read_by_any(service):
                why = self._expired(service, entry[2], (errors or {}).get(service))
                if why is None:
                    return list(entry[0])
                self._end(service, entry[2], why)
                return None
            self._recovered(service, watcher)
        elif service in self._ended:
            if not watcher._read_by_any(service):
                return None
            self._recovered(service, watcher)
        fresh = watcher.snapshot(service)
        self._offer(service, watcher, fresh)
        return fresh

    def _expired(self, service: str, saved: SavedSet, error: BaseException | None) -> str | None:
        age = saved.age()
        if self.max_age is not None and age > self.max_age:
            return (
                f"the last known good (saved {saved.saved_at_text}, {_age_text(age)} ago) is "
                f"older than last_known_good_max_age={self.max_age:g}s"
            )
        if not unreachable(error):
            return f"the registry is reachable but refuses: {_words(error)}"
        return None

    def _end(self, service: str, saved: SavedSet, why: str) -> None:
        self._stale.pop(service, None)
        self._ended[service] = why
        self._declined.add(service)
        log.warning(
            "last known good for %s no longer served: %s: %s",
            service,
            why,
            saved.path,
            extra={"event": "lkg_ended", "service": service, "path": str(saved.path)},
        )

    def _offer(self, service: str, watcher: AsyncWatcher, fresh: list[InstanceHealth]) -> None:
        """Save ``fresh`` (read from the registry) in the background when it changed."""
        if self._closed or not watcher._read_by_any(service):
            return
        state = watcher._state.get(service)
        # The watcher replaces its state object on every change: same object, same set.
        if state is not None and state is self._seen.get(service):
            return
        if state is not None:
            self._seen[service] = state
        if _content(fresh) == self._saved.get(service):
            return
        self._wanted[service] = fresh
        if service not in self._writers:
            self._writers[service] = asyncio.create_task(
                self._write(service), name=f"save last known good {service}"
            )

    async def _write(self, service: str) -> None:
        try:
            while (wanted := self._wanted.pop(service, None)) is not None:
                content = _content(wanted)
                if content == self._saved.get(service):
                    continue
                try:
                    await asyncio.to_thread(self.store.save, service, wanted)
                except OSError as exc:
                    self._save_failed(service, exc)
                    continue
                self._saved[service] = content
                self._save_warned.pop(service, None)
        finally:
            self._writers.pop(service, None)

    def _save_failed(self, service: str, exc: OSError) -> None:
        now = time.monotonic()
        last = self._save_warned.get(service)
        if last is not None and now - last < _SAVE_WARNING_EVERY:
            return
        self._save_warned[service] = now
        log.warning(
            "last known good for %s not saved (discovery goes on): %s",
            service,
            exc,
            extra={"event": "lkg_save_failed", "service": service, "error": str(exc)},
        )

    async def close(self) -> None:
        """Stop waiting for answers and loading files; let a save in progress finish
        (bounded)."""
        self._closed = True
        recoveries, self._recoveries = list(self._recoveries.values()), {}
        for task in recoveries:
            task.cancel()
        await asyncio.gather(*recoveries, return_exceptions=True)
        loads, self._loads = list(self._loads.values()), {}
        for load in loads:
            load.cancel()
        self._stale.clear()
        self._ended.clear()
        self._declined.clear()
        writers = list(self._writers.values())
        if writers:
            _done, pending = await asyncio.wait(writers, timeout=_CLOSE_WAIT)
            for task in pending:
                task.cancel()
        self._seen.clear()


def last_known_good(
    directory: str | os.PathLike[str] | None, max_age: float | None
) -> LastKnownGood | None:
    """Discovery's cache for its ``last_known_good`` / ``last_known_good_max_age``
    keywords: None when off. Raises :class:`ConfigError` naming the field."""
    if directory is None:
        if max_age is not None:
            raise ConfigError(
                "set last_known_good (a directory) too: the maximum age applies to its files",
                field="last_known_good_max_age",
            )
        return None
    return LastKnownGood(directory, max_age)
