"""The ``registry-agent`` command line: run, check, init, watch, list, services, backends.

Every command ends with one of the :class:`ExitCode` values, and says what went
wrong in one line on stderr (never a traceback, never a secret).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import select
import signal
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from registry_agent import (
    BackendUnavailable,
    ConfigError,
    EventType,
    InstanceHealth,
    RegistryError,
    ServiceInstance,
    WatchEvent,
    __version__,
    available_backends,
)
from registry_agent._agent.config import AgentConfig, BackendConfig, load_config, parse_config
from registry_agent._agent.logs import configure_logging
from registry_agent._agent.runtime import (
    AgentRuntime,
    close_backends,
    open_configured_backends,
    validate_services,
)
from registry_agent._backend import Backend
from registry_agent._env import backends_from_env, carried_options
from registry_agent._errors import BackendNotFound
from registry_agent._models import _check_name
from registry_agent._plugins import open_backend
from registry_agent._urls import parse_backend_url
from registry_agent._watcher import AsyncWatcher


class ExitCode(enum.IntEnum):
    """How every ``registry-agent`` command exits (the README's table)."""

    #: Done: the file is valid and every check passed, the registry answered, a
    #: watch ended by ``--count``/``--once`` or by SIGTERM.
    OK = 0
    #: Ran, and the answer is bad: a check failed, a registry was unreachable or
    #: refused the request, a watch stopped on an unexpected error.
    FAILED = 1
    #: Bad input, nothing was done: arguments, config file, backend URL or option,
    #: no backend given nor in the environment, ``init``'s file exists.
    USAGE = 2
    #: Stopped by Ctrl-C (SIGINT) before the end (``run`` and ``watch`` exit 0 on it).
    INTERRUPTED = 130
    #: The reader of the output went away (``registry-agent watch … | head -1``): nothing
    #: more is printed, nothing said on stderr; 128 + SIGPIPE, as a Unix tool killed by it.
    BROKEN_PIPE = 141


# The names earlier versions used.
EXIT_ERROR = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE

_DEFAULT_TIMEOUT = 5.0
_DEFAULT_INIT_BACKEND = "consul://127.0.0.1:8500"
# Services counted at once by `services` (one list request each).
_COUNT_CONCURRENCY = 8


def _print(line: str) -> None:
    print(line, flush=True)


def _url_secrets(urls: str | Sequence[str] | None) -> list[str]:
    """Credentials backend URLs carry, to mask in any message we print."""
    found: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls or ():
        # From the environment, a token or password rides beside the URL's text.
        found += [value for value in carried_options(url).values() if value]
        try:
            found += BackendConfig(url).secrets()
        except Exception:
            continue
    return found


def _masked(text: str, secrets: Sequence[str]) -> str:
    """``text`` on one line, every secret in it replaced by ``***``."""
    text = " ".join(text.split())
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class _LibraryNotes(logging.Handler):
    """Prints on stderr the library's log records a command shows (by their ``event``):
    entries ``list``/``watch`` skipped as unreadable (otherwise they would just be
    missing), and in ``watch`` its failures and recoveries, already rate-limited by
    the watcher itself (a line when a failure episode starts, a reminder at most every
    30 s while it lasts, a line when it ends)."""

    def __init__(self, secrets: Sequence[str], events: Iterable[str]) -> None:
        super().__init__(logging.DEBUG)
        self.secrets = secrets
        self.events = frozenset(events)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) not in self.events:
            return
        print(
            f"registry-agent: {_masked(record.getMessage(), self.secrets)}",
            file=sys.stderr,
            flush=True,
        )


def _fail(exc: BaseException, secrets: Sequence[str] = ()) -> None:
    """One line on stderr: the problem, never a traceback, never a secret."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, RegistryError | _UsageError):
        # Not ours: name its kind, the message alone may be cryptic ("'NoneType' …").
        text = f"unexpected {type(exc).__name__}: {text}"
    print(f"registry-agent: {_masked(text, secrets)}", file=sys.stderr, flush=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 2) -> list[str]:
    """Lines of a table whose columns are as wide as their widest cell."""
    return _Columns(header, rows, gap).lines([header, *rows])


class _Columns:
    """Column widths from the content; for a stream, widths grow with the rows seen."""

    def __init__(
        self, header: Sequence[str], rows: Iterable[Sequence[str]] = (), gap: int = 2
    ) -> None:
        self.widths = [len(cell) for cell in header]
        self.gap = " " * gap
        for row in rows:
            self.fit(row)

    def fit(self, row: Sequence[str]) -> None:
        self.widths = [max(w, len(cell)) for w, cell in zip(self.widths, row, strict=True)]

    def line(self, row: Sequence[str]) -> str:
        self.fit(row)
        return self.gap.join(
            cell.ljust(w) for cell, w in zip(row, self.widths, strict=True)
        ).rstrip()

    def lines(self, rows: Iterable[Sequence[str]]) -> list[str]:
        return [self.line(row) for row in rows]


class _StreamColumns(_Columns):
    """Columns sized once, for a stream whose later rows are not known yet: every row
    lines up with the header. A cell wider than its column pushes only what follows it
    on its line, by what it overflows (one space after it at least), and the columns
    after it take their places again as soon as a cell leaves room."""

    def __init__(self, widths: Sequence[int], gap: int = 2) -> None:
        self.widths = list(widths)
        self.gap = " " * gap

    def line(self, row: Sequence[str]) -> str:
        text = ""
        start = 0  # where this column starts on every line
        for i, (cell, width) in enumerate(zip(row, self.widths, strict=True)):
            if i:
                text += " " * max(start - len(text), 1)
            text += cell
            start += width + len(self.gap)
        return text.rstrip()


# -- backends ------------------------------------------------------------------------


def _backend_urls(given: Sequence[str] | None) -> list[str]:
    """``--backend`` as given, else from the environment (``REGISTRY_AGENT_BACKEND``,
    then Consul's and etcd's own variables)."""
    if given:
        return list(given)
    return list(backends_from_env())


def _open(url: str, request_timeout: float | None) -> Backend:
    # A timeout in the URL counts as given: --timeout only adds one (default 5s) when it is not.
    if request_timeout is None and "timeout" in parse_backend_url(url, default_port=0).query:
        return open_backend(url)
    return open_backend(
        url, timeout=_DEFAULT_TIMEOUT if request_timeout is None else request_timeout
    )


def _place(field: str | None, i: int, count: int) -> str:
    """``backend`` (one backend) or ``backend[i]`` (one of several), with the option."""
    field = field or "backend"
    return f"backend[{i}]" + field.removeprefix("backend") if count > 1 else field


def _open_all(urls: list[str], request_timeout: float | None) -> list[Backend]:
    """The backends of ``--backend`` (repeated): errors name ``backend[i]`` when several."""
    opened: list[Backend] = []
    for i, url in enumerate(urls):
        try:
            opened.append(_open(url, request_timeout))
        except ConfigError as exc:
            if len(urls) == 1:
                raise
            raise ConfigError(exc.reason, field=_place(exc.field, i, len(urls))) from None
        except BackendNotFound as exc:  # a scheme no installed backend serves: bad input
            raise ConfigError(exc.message, field=_place("backend", i, len(urls))) from None
    return opened


async def _close_all(backends: Iterable[Backend]) -> None:
    for backend in backends:
        with contextlib.suppress(Exception):
            await backend.close()


def _redacted(url: str) -> str:
    try:
        return parse_backend_url(url, default_port=0).redacted()
    except ConfigError:
        return "?"


# -- list ----------------------------------------------------------------------------


async def _list(urls: list[str], service: str, as_json: bool, request_timeout: float | None) -> int:
    _check_name(service, "service")
    backends = _open_all(urls, request_timeout)
    try:
        if len(backends) == 1:
            snapshot = await backends[0].list(service)
            rows = [snapshot.instances[key] for key in sorted(snapshot.instances)]
        else:
            # One merged view, as a Watcher/Discovery over these registries shows it.
            rows = await _merged_list(backends, service, request_timeout or _DEFAULT_TIMEOUT)
    finally:
        await _close_all(backends)
    if as_json:
        for health in rows:
            _print(
                json.dumps(
                    {
                        **health.instance.to_dict(),
                        "healthy": health.healthy,
                        "status": str(health.status),
                    },
                    ensure_ascii=False,
                )
            )
        return ExitCode.OK
    if not rows:
        _print(f"no instances of {service}")
        return ExitCode.OK
    # Consul ids are unique per agent only: with nodes known, the node tells same ids apart.
    nodes = any(health.instance.node for health in rows)
    versions = any(health.instance.version for health in rows)
    header = ["ID", *(["NODE"] if nodes else []), "ADDRESS"]
    header += [*(["VERSION"] if versions else []), "STATUS", "TAGS"]
    table = []
    for health in rows:
        inst = health.instance
        row = [inst.id, *([inst.node or "-"] if nodes else []), _host_port(inst)]
        row += [*([inst.version or "-"] if versions else []), str(health.status)]
        table.append([*row, ",".join(inst.tags)])
    for line in _table(header, table):
        _print(line)
    return ExitCode.OK


async def _merged_list(
    backends: list[Backend], service: str, timeout: float
) -> list[InstanceHealth]:
    failures: list[str] = []

    def on_error(_: str, exc: BaseException) -> None:
        failures.append(" ".join(str(exc).split()) or type(exc).__name__)

    watcher = AsyncWatcher(backends, [service], on_error=on_error)
    try:
        if not await watcher.wait_synced(timeout) and not watcher._read_by_any(service):
            raise BackendUnavailable(
                f"no registry answered within {timeout:g}s"
                + (f": {failures[-1]}" if failures else ""),
                service=service,
            )
        for failure in dict.fromkeys(failures):
            print(f"registry-agent: {failure} (listed without it)", file=sys.stderr, flush=True)
        return watcher.snapshot(service)
    finally:
        await watcher.close()


def _host_port(instance: ServiceInstance) -> str:
    """``host:port``, IPv6 in brackets (``[::1]:9000``), after ``scheme://`` when the
    instance says what it serves; the address alone without a port."""
    if not instance.port:
        return instance.address
    address = f"[{instance.address}]" if ":" in instance.address else instance.address
    scheme = f"{instance.scheme}://" if instance.scheme else ""
    return f"{scheme}{address}:{instance.port}"


# -- services ------------------------------------------------------------------------


async def _count(backend: Backend, names: list[str]) -> list[tuple[str, int, int]]:
    """Per name: instances and healthy instances, one ``list`` each (a few at a time)."""
    limit = asyncio.Semaphore(_COUNT_CONCURRENCY)

    async def one(name: str) -> tuple[str, int, int]:
        async with limit:
            snapshot = await backend.list(name)
        healthy = sum(1 for health in snapshot.instances.values() if health.healthy)
        return name, len(snapshot.instances), healthy

    return list(await asyncio.gather(*(one(name) for name in names)))


async def _services(urls: list[str], as_json: bool, request_timeout: float | None) -> int:
    backends = _open_all(urls, request_timeout)
    rows: list[tuple[str, int, int, int]] = []  # service, backend number, instances, healthy
    errors: list[BaseException] = []
    try:
        for i, backend in enumerate(backends):
            lister = getattr(backend, "services", None)
            if lister is None:
                scheme = getattr(backend, "scheme", type(backend).__name__)
                raise ConfigError(
                    f"the {scheme} backend cannot list services (it has no services() method)",
                    field=_place("backend", i, len(urls)),
                )
            try:
                names = [str(name) for name in await lister()]
                counted = await _count(backend, names)
            except Exception as exc:
                if len(backends) == 1:
                    raise
                errors.append(exc)
                print(
                    f"registry-agent: backend[{i}]: "
                    f"{_masked(str(exc) or type(exc).__name__, _url_secrets(urls))} "
                    "(listed without it)",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            rows += [(name, i, total, ok) for name, total, ok in counted]
    finally:
        await _close_all(backends)
    if errors and len(errors) == len(backends):
        raise errors[0]
    rows.sort()
    if as_json:
        for name, i, total, ok in rows:
            data = {
                "service": name,
                "instances": total,
                "healthy": ok,
                "backend": _redacted(urls[i]),
            }
            _print(json.dumps(data, ensure_ascii=False))
        return ExitCode.OK
    if not rows:
        _print("no services")
        return ExitCode.OK
    several = len(backends) > 1
    header = ["SERVICE", *(["REGISTRY"] if several else []), "INSTANCES", "HEALTHY"]
    table = [
        [name, *([_redacted(urls[i])] if several else []), str(total), str(ok)]
        for name, i, total, ok in rows
    ]
    for line in _table(header, table):
        _print(line)
    return ExitCode.OK


# -- watch ---------------------------------------------------------------------------

_WATCH_HEADER = ("TIME", "EVENT", "SERVICE", "ID", "ADDRESS", "HEALTH")


def _health_cell(event: WatchEvent) -> str:
    # A deleted instance has no health: it is gone, not unhealthy.
    if event.type is EventType.DELETED:
        return "-"
    return "healthy" if event.healthy else "unhealthy"


def _event_cells(event: WatchEvent) -> list[str]:
    inst = event.instance
    return [
        time.strftime("%H:%M:%S"),
        str(event.type),
        inst.service,
        inst.id,
        _host_port(inst),
        _health_cell(event),
    ]


# Sized up front: "HH:MM:SS", the longest event type, "unhealthy".
_TIME_WIDTH = 8
_EVENT_WIDTH = max(len(str(kind)) for kind in EventType)
_HEALTH_WIDTH = len("unhealthy")
# A default id is "<service>-<address>-<port>": room for an IPv4 address and any port.
_ID_TAIL = len("-255.255.255.255-65535")
_ADDRESS_WIDTH = len("255.255.255.255:65535")
# Room left in the ID and ADDRESS columns beyond the widest cell of the first read.
_WATCH_SLACK = 6


def _watch_columns(services: Sequence[str], first: Sequence[Sequence[str]]) -> _StreamColumns:
    """The columns of a streamed ``watch``: fixed where the values are known (time,
    event, service, health), from the first read with room to spare for ids and
    addresses, so rows printed later line up with the header."""
    ids = max((len(row[3]) for row in first), default=0)
    addresses = max((len(row[4]) for row in first), default=0)
    longest_service = max(len(name) for name in services)
    widths = [
        max(_TIME_WIDTH, len(_WATCH_HEADER[0])),
        max(_EVENT_WIDTH, len(_WATCH_HEADER[1])),
        max(longest_service, len(_WATCH_HEADER[2])),
        max(ids + _WATCH_SLACK, longest_service + _ID_TAIL),
        max(addresses + _WATCH_SLACK, _ADDRESS_WIDTH),
        _HEALTH_WIDTH,
    ]
    return _StreamColumns(widths)


def _event_line(event: WatchEvent, as_json: bool, columns: _Columns | None = None) -> str:
    if as_json:
        # The event's own JSON shape, stamped with when we printed it.
        return json.dumps({**event.to_dict(), "ts": round(time.time(), 3)}, ensure_ascii=False)
    return (columns or _Columns(_WATCH_HEADER)).line(_event_cells(event))


def _current_events(watcher: AsyncWatcher) -> list[WatchEvent]:
    """What a new consumer of ``watcher`` gets first: ``added`` for every instance it
    holds now, followed by ``offline`` for one that is not healthy."""
    events: list[WatchEvent] = []
    for service in watcher.services:
        index = watcher._index.get(service, 0)
        for health in watcher.snapshot(service):
            inst, status = health.instance, health.status
            events.append(WatchEvent(EventType.ADDED, inst, health.healthy, status, None, index))
            if not health.healthy:
                events.append(WatchEvent(EventType.OFFLINE, inst, False, status, None, index))
    return events


async def _watch(
    urls: list[str],
    services: list[str],
    as_json: bool,
    request_timeout: float | None,
    count: int | None = None,
    once: bool = False,
) -> int:
    failures: list[str] = []

    def on_error(_: str, exc: BaseException) -> None:
        # Said on stderr by the watcher's own (rate-limited) log records; kept for --once.
        failures.append(" ".join(str(exc).split()) or type(exc).__name__)

    backends = _open_all(urls, request_timeout)
    watcher = AsyncWatcher(backends, services, on_error=on_error)
    timeout = request_timeout or _DEFAULT_TIMEOUT
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError):  # main() called off the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)

    async def body() -> None:
        # --once: the columns fit the rows. A stream: sized at the first read, fixed after.
        synced = await watcher.wait_synced(timeout)
        if once:
            if not synced and not any(watcher._read_by_any(s) for s in services):
                raise BackendUnavailable(
                    f"no registry answered within {timeout:g}s"
                    + (f": {failures[-1]}" if failures else ""),
                    service=services[0] if len(services) == 1 else None,
                )
            if not all(watcher._read_by_all(s) for s in services):  # as `list` says it
                for failure in dict.fromkeys(failures):
                    print(f"registry-agent: {failure} (listed without it)", file=sys.stderr)
                sys.stderr.flush()
            events = _current_events(watcher)
            columns = _Columns(_WATCH_HEADER, [_event_cells(e) for e in events])
            if not as_json:
                _print(columns.line(_WATCH_HEADER))
            for event in events:
                _print(_event_line(event, as_json, columns))
            return
        first = [_event_cells(e) for e in _current_events(watcher)]
        columns = _watch_columns(services, first)
        if not as_json:
            _print(columns.line(_WATCH_HEADER))
        seen = 0
        async for event in watcher:
            _print(_event_line(event, as_json, columns))
            seen += 1
            if count is not None and seen >= count:
                return

    task = asyncio.create_task(body())
    stopped = asyncio.create_task(stop.wait())
    gone = asyncio.Event()
    pipe = _notice_reader_gone(loop, gone.set)
    reader_gone = asyncio.create_task(gone.wait())
    try:
        # Until a signal, the end (--count, --once), a failure of the watch itself, or
        # the reader of stdout going away while no event comes.
        await asyncio.wait({task, stopped, reader_gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        reader_gone.cancel()
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if pipe is not None:
            loop.remove_reader(pipe)
        for sig in handled:
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await watcher.close()
        await _close_all(backends)
    if isinstance(outcome, Exception):
        raise outcome
    if gone.is_set():
        raise BrokenPipeError(errno.EPIPE, "the reader of stdout went away")
    return ExitCode.OK


def _notice_reader_gone(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> int | None:
    """When stdout is a pipe, call ``callback`` once its reader goes away, as ``tail -f``
    does: a watch waiting for events would otherwise only find out at its next line. The
    write end of a pipe polls as an error then. Returns the descriptor watched, if any."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except (OSError, ValueError):  # not a real file (tests), closed
        return None

    def check() -> None:
        poll = select.poll()
        poll.register(fd, 0)  # no events asked: only errors and hang-ups are reported
        if poll.poll(0):
            callback()
        # Done either way: a pipe opened for reading too would report data on end.
        loop.remove_reader(fd)

    try:
        loop.add_reader(fd, check)
    except (OSError, ValueError, NotImplementedError, RuntimeError):
        return None
    return fd


# -- run, check and init -------------------------------------------------------------


async def _check_results(config: AgentConfig) -> list[dict[str, Any]]:
    """Every service with the result of each of its checks, run once."""
    # Opened (never connected) and checked exactly as `run` does: the same errors come out.
    backends = open_configured_backends(config)
    try:
        await validate_services(config, backends)
    finally:
        await close_backends(backends)
    services: list[dict[str, Any]] = []
    for service in config.services:
        results: list[dict[str, Any]] = []
        for check_config in service.checks:
            check = check_config.build()
            try:
                result = await check.run()
            finally:
                await check.aclose()
            results.append(
                {
                    "name": check.name,
                    "kind": check_config.kind,
                    "ok": result.ok,
                    "latency_ms": round(result.latency * 1000, 3),
                    "detail": result.detail,
                }
            )
        services.append(
            {"service": service.instance.service, "id": service.instance.id, "checks": results}
        )
    return services


def _one_line(text: str) -> str:
    """A check's detail in a table row: its line breaks shown as `` ⏎ ``, tabs as spaces
    (both would break the table; ``--json`` keeps the text as it is)."""
    lines = text.strip().splitlines()
    return " ⏎ ".join(line.replace("\t", " ").strip() for line in lines)


async def _check(config: AgentConfig, as_json: bool) -> int:
    services = await _check_results(config)
    failing = sum(not c["ok"] for s in services for c in s["checks"])
    if as_json:
        summary = {
            "config": config.source,
            "valid": True,
            "ok": not failing,
            "failing": failing,
            "services": services,
        }
        _print(json.dumps(summary, ensure_ascii=False))
        return ExitCode.FAILED if failing else ExitCode.OK
    rows = []
    for service in services:
        for c in service["checks"]:
            mark = "ok" if c["ok"] else "FAIL"
            latency = f"{c['latency_ms']:.1f} ms"
            rows.append([mark, service["id"], c["name"], latency, _one_line(c["detail"])])
        if not service["checks"]:
            rows.append(["ok", service["id"], "(no checks: registers at once)", "", ""])
    for line in _table(["", "SERVICE", "CHECK", "LATENCY", "DETAIL"], rows, gap=1)[1:]:
        _print(line)
    _print(f"{config.source}: valid; {len(services)} service(s), {failing} check(s) failing")
    return ExitCode.FAILED if failing else ExitCode.OK


def _run(config: AgentConfig, log_format: str | None, log_level: str | None) -> int:
    configure_logging(
        log_format or config.log_format, log_level or config.log_level, config.secrets()
    )
    return asyncio.run(AgentRuntime(config).run())


_SAMPLE = """\
# agent.toml: the services `registry-agent run -c {path}` registers, and where.
# Check it with `registry-agent check -c {path}` (validates, runs every check once).
# Durations: "10s", "500ms", "1m" or a number of seconds. Unknown keys are errors.
# Environment variables override the file: REGISTRY_AGENT_BACKEND, REGISTRY_AGENT_TOKEN,
# REGISTRY_AGENT_TOKEN_FILE, REGISTRY_AGENT_STATUS_LISTEN, REGISTRY_AGENT_LOG_LEVEL, ...

[backend]
url = {url}
# or etcd://127.0.0.1:2379 (a cluster: etcd://10.0.0.5:2379,10.0.0.6:2379)
# token_file = "/run/secrets/consul-token"   # a Consul ACL token (or REGISTRY_AGENT_TOKEN)
# etcd: user = "...", password_file = "...", prefix = "/services",
#       format = "go-zero" (or "kratos", "go-micro": their clients find the service too)
# TLS: ca_file = "ca.pem", cert_file = "client.pem", key_file = "client-key.pem"
# Several registries at once: [[backend]] tables instead (each a url and its options).

[status]
listen = "127.0.0.1:9750"            # /healthz /readyz /status /metrics; "off": none
# token_file = "/run/secrets/status-token"   # then a Bearer token is required (not on /healthz)

[log]
format = "text"                      # or "json"
level = "info"                       # debug, info, warning, error

[[service]]
name = {name}
port = {port}
# id = "{id_example}"                 # default "<name>-<address>-<port>": stable across restarts
# address = "10.0.0.5"               # the address clients dial (see the README for the default)
# tags = ["v1"]
# meta = {{ team = "payments" }}
# scheme = "http"                    # what it serves: http, https, grpc, grpcs
# version = "1.4.2"
ttl = "10s"                          # the entry lapses this long after renewals stop
on_unhealthy = "deregister"          # or "critical": kept in the registry, marked failing
gate = {{ fall = 3, rise = 2 }}        # failures in a row to withdraw, successes to register

[[service.check]]
http = {health_url}
# or tcp = "127.0.0.1:{port}", command = ["pg_isready"], grpc = "127.0.0.1:{port}"
interval = "2s"
timeout = "1s"
"""


def _sample(path: str, url: str, name: str, port: int) -> str:
    # JSON strings are TOML basic strings: quotes and backslashes escaped the same way.
    return _SAMPLE.format(
        path=path,
        url=json.dumps(url),
        name=json.dumps(name),
        port=port,
        id_example=f"{name}-1",
        health_url=json.dumps(f"http://127.0.0.1:{port}/healthz"),
    )


def _init_credentials(url: str) -> None:
    """``init`` writes ``--backend`` into the file as it is: a password or token in it
    would sit there in plain text, so it is refused, pointing to where it goes instead."""
    try:
        parsed = parse_backend_url(url, default_port=0)
    except ConfigError:
        return  # said by the loader, with the field
    held = ["password" if parsed.password else ""] + [
        key
        for key, value in parsed.query.items()
        if value
        and not key.endswith("_file")
        and any(w in key for w in ("token", "password", "secret"))
    ]
    for what in filter(None, held):
        kind = "password" if "password" in what else "token"
        where = "user:password@" if what == "password" and parsed.password else f"?{what}="
        raise ConfigError(
            f"holds a {kind} ({where}), which init would write into the file in plain text; "
            f"leave it out and give it at run time: {kind}_file in [backend], or "
            f"REGISTRY_AGENT_{kind.upper()}_FILE or REGISTRY_AGENT_{kind.upper()}",
            field="--backend",
        )


def _init(path: str, force: bool, url: str | None, name: str, port: int) -> int:
    _check_name(name, "--service")
    url = url or _DEFAULT_INIT_BACKEND
    _init_credentials(url)
    to_stdout = path == "-"
    text = _sample("agent.toml" if to_stdout else Path(path).name, url, name, port)
    # What is written loads: a bad --backend URL is refused before any file is made.
    try:
        base = Path.cwd() if to_stdout else Path(path).parent
        parse_config(tomllib.loads(text), source=path, env={}, base=base)
    except ConfigError as exc:
        if not to_stdout:
            raise
        raise ConfigError(exc.reason, field=exc.field) from None  # not a file named "-"
    if to_stdout:  # `registry-agent init - > agent.toml`, `… | ssh host 'cat > agent.toml'`
        sys.stdout.write(text)
        sys.stdout.flush()
        return ExitCode.OK
    try:
        with open(path, "w" if force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise ConfigError("exists; pass --force to overwrite it", source=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot write the file: {exc.strerror}", source=path) from None
    _print(f"wrote {path}; check it with: registry-agent check -c {path}")
    return ExitCode.OK


# -- parser --------------------------------------------------------------------------


class _UsageError(Exception):
    """Arguments argparse refused: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("registry-agent").strip()
        where = f"{command}: " if command else ""
        raise _UsageError(f"{where}{message} (see {self.prog} --help)")


def _positive(kind: type[int] | type[float]) -> Any:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {text!r}")
    return int(text)


def _add_backend_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--backend",
        action="append",
        metavar="URL",
        help="consul://host:port or etcd://host:port; several: one merged view. Default: "
        "REGISTRY_AGENT_BACKEND, else CONSUL_HTTP_ADDR…, else ETCDCTL_ENDPOINTS…",
    )
    cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    cmd.add_argument(
        "--timeout",
        type=_positive(float),
        help="seconds per request (default: the URL's timeout option, or 5)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="registry-agent",
        description="Self-healing service registration for Consul and etcd.",
        epilog="exit status: 0 ok; 1 a check failed or a registry could not be read; "
        "2 bad arguments, config or URL; 130 interrupted; 141 the output's reader went away",
    )
    parser.add_argument("--version", action="version", version=f"registry-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="register the services of a config file until stopped")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="agent.toml")
    run.add_argument("--log-format", choices=["text", "json"], help="default: from the file, text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="validate a config file and run every check once")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    check.add_argument("--json", action="store_true", help="the result as one JSON object")

    init = commands.add_parser("init", help="write a commented sample agent.toml")
    init.add_argument(
        "path",
        nargs="?",
        default="agent.toml",
        metavar="PATH",
        help="default: agent.toml; -: stdout",
    )
    init.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    init.add_argument("--backend", metavar="URL", help=f"default: {_DEFAULT_INIT_BACKEND}")
    init.add_argument("--service", default="web", metavar="NAME", help="default: web")
    init.add_argument("--port", type=_port, default=8080, help="default: 8080")

    watch = commands.add_parser("watch", help="print one line per event")
    watch.add_argument("service", nargs="+")
    _add_backend_options(watch)
    ending = watch.add_mutually_exclusive_group()
    ending.add_argument("--count", type=_positive(int), metavar="N", help="exit after N events")
    ending.add_argument(
        "--once", action="store_true", help="print the current instances as events and exit"
    )

    listing = commands.add_parser("list", help="print the instances of a service")
    listing.add_argument("service")
    _add_backend_options(listing)

    services = commands.add_parser("services", help="print the services a registry holds")
    _add_backend_options(services)

    commands.add_parser("backends", help="print the installed backend schemes")
    return parser


def _dispatch(args: argparse.Namespace, secrets: list[str]) -> int:
    if args.command == "backends":
        _print("\n".join(available_backends()))
        return ExitCode.OK
    if args.command == "init":
        return _init(args.path, args.force, args.backend, args.service, args.port)
    if args.command in ("list", "watch", "services"):
        urls = _backend_urls(args.backend)
        secrets += _url_secrets(urls)
        if args.command == "list":
            return asyncio.run(_list(urls, args.service, args.json, args.timeout))
        if args.command == "services":
            return asyncio.run(_services(urls, args.json, args.timeout))
        return asyncio.run(
            _watch(urls, args.service, args.json, args.timeout, args.count, args.once)
        )
    try:
        config = load_config(args.config, backend_from_env=True)
    except ConfigError as exc:
        if args.command == "check" and args.json:
            data = {"config": args.config, "valid": False, "error": _masked(str(exc), secrets)}
            _print(json.dumps({**data, "field": exc.field}, ensure_ascii=False))
        raise
    secrets += config.secrets()
    if args.command == "check":
        return asyncio.run(_check(config, args.json))
    return _run(config, args.log_format, args.log_level)


def _quiet_stdout() -> None:
    """After the reader of stdout went away: what is left in its buffer, and anything
    printed later, goes nowhere (the interpreter's final flush would otherwise say
    "Exception ignored … BrokenPipeError" on stderr)."""
    with contextlib.suppress(OSError, ValueError):  # not a real file (tests), closed
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``registry-agent`` console script; returns an :class:`ExitCode`."""
    # gRPC core logs to stderr by itself (a gRPC check's failed handshakes), bypassing the
    # agent's log format and level: silenced before a check imports grpc, unless set.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        _fail(exc)
        return ExitCode.USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else ExitCode.OK
    secrets = _url_secrets(getattr(args, "backend", None))
    if args.command != "run":
        # What goes wrong is said once, by the command itself: no library log lines around it.
        logging.getLogger().addHandler(logging.NullHandler())
    events = {"skip_foreign"}
    if args.command == "watch" and not args.once:
        events |= {"watch_failed", "watch_resumed"}
    notes = _LibraryNotes(secrets, events)
    library = logging.getLogger("registry_agent")
    watcher_log = logging.getLogger("registry_agent.watcher")
    watcher_level = watcher_log.level
    if args.command in ("list", "watch", "services"):
        library.addHandler(notes)
        if "watch_resumed" in events and not watcher_log.isEnabledFor(logging.INFO):
            watcher_log.setLevel(logging.INFO)  # "resumed" ends a failure episode
    try:
        return _dispatch(args, secrets)
    except BrokenPipeError:
        _quiet_stdout()
        return ExitCode.BROKEN_PIPE
    except ConfigError as exc:
        _fail(exc, secrets)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a registry error, or anything a client library raised
        _fail(exc, secrets)
        return ExitCode.FAILED
    finally:
        library.removeHandler(notes)
        watcher_log.setLevel(watcher_level)
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
