"""The ``registry-agent`` command line: run, check, watch, list, backends.

Exit codes: 0 success, 1 a runtime failure (a check failed, the registry
could not be read), 2 bad input (config file, URL, arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence

from registry_agent import (
    BackendUnavailable,
    ConfigError,
    InstanceHealth,
    RegistryError,
    ServiceInstance,
    WatchEvent,
    __version__,
    available_backends,
)
from registry_agent._agent.config import AgentConfig, BackendConfig, load_config
from registry_agent._agent.logs import configure_logging
from registry_agent._agent.runtime import (
    AgentRuntime,
    close_backends,
    open_configured_backends,
    validate_services,
)
from registry_agent._backend import Backend
from registry_agent._plugins import open_backend
from registry_agent._urls import parse_backend_url
from registry_agent._watcher import AsyncWatcher

EXIT_ERROR = 1
EXIT_USAGE = 2


def _print(line: str) -> None:
    print(line, flush=True)


def _url_secrets(urls: str | Sequence[str] | None) -> list[str]:
    """Credentials backend URLs carry, to mask in any message we print."""
    found: list[str] = []
    for url in [urls] if isinstance(urls, str) else urls or ():
        try:
            found += BackendConfig(url).secrets()
        except Exception:
            continue
    return found


class _SkippedEntries(logging.Handler):
    """Says on stderr which registry entries ``list``/``watch`` skipped as unreadable
    (a peer's value in another format, garbage): otherwise they would just be missing."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__(logging.WARNING)
        self.secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) != "skip_foreign":
            return
        text = " ".join(record.getMessage().split())
        for secret in self.secrets:
            text = text.replace(secret, "***")
        print(f"registry-agent: {text}", file=sys.stderr, flush=True)


def _fail(exc: BaseException, secrets: Sequence[str] = ()) -> None:
    """One line on stderr: the problem, never a traceback, never a secret."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, RegistryError):
        # Not ours: name its kind, the message alone may be cryptic ("'NoneType' …").
        text = f"unexpected {type(exc).__name__}: {text}"
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    print(f"registry-agent: {text}", file=sys.stderr, flush=True)


# -- list ----------------------------------------------------------------------------


def _open(url: str, request_timeout: float | None) -> Backend:
    # A timeout in the URL counts as given: --timeout only adds one (default 5s) when it is not.
    if request_timeout is None and "timeout" in parse_backend_url(url, default_port=0).query:
        return open_backend(url)
    return open_backend(url, timeout=5.0 if request_timeout is None else request_timeout)


def _open_all(urls: list[str], request_timeout: float | None) -> list[Backend]:
    """The backends of ``--backend`` (repeated): errors name ``backend[i]`` when several."""
    opened: list[Backend] = []
    for i, url in enumerate(urls):
        try:
            opened.append(_open(url, request_timeout))
        except ConfigError as exc:
            if len(urls) == 1:
                raise
            field = exc.field or "backend"
            where = f"backend[{i}]" + field.removeprefix("backend")
            raise ConfigError(exc.reason, field=where) from None
    return opened


async def _list(urls: list[str], service: str, as_json: bool, request_timeout: float | None) -> int:
    backends = _open_all(urls, request_timeout)
    try:
        if len(backends) == 1:
            snapshot = await backends[0].list(service)
            rows = [snapshot.instances[key] for key in sorted(snapshot.instances)]
        else:
            # One merged view, as a Watcher/Discovery over these registries shows it.
            rows = await _merged_list(backends, service, request_timeout or 5.0)
    finally:
        for backend in backends:
            with contextlib.suppress(Exception):
                await backend.close()
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
        return 0
    if not rows:
        _print(f"no instances of {service}")
        return 0
    # Consul ids are unique per agent only: with nodes known, the node tells same ids apart.
    nodes = any(health.instance.node for health in rows)
    node_header = f"{'NODE':20} " if nodes else ""
    versions = any(health.instance.version for health in rows)
    version_header = f"{'VERSION':12} " if versions else ""
    _print(f"{'ID':30} {node_header}{'ADDRESS':22} {version_header}{'STATUS':9} TAGS")
    for health in rows:
        inst = health.instance
        node = f"{inst.node or '-':20} " if nodes else ""
        version = f"{inst.version or '-':12} " if versions else ""
        _print(
            f"{inst.id:30} {node}{_host_port(inst):22} {version}{health.status!s:9} "
            f"{','.join(inst.tags)}"
        )
    return 0


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


# -- watch ---------------------------------------------------------------------------


def _event_line(event: WatchEvent, as_json: bool) -> str:
    inst = event.instance
    if as_json:
        # The event's own JSON shape, stamped with when we printed it.
        return json.dumps({**event.to_dict(), "ts": round(time.time(), 3)}, ensure_ascii=False)
    stamp = time.strftime("%H:%M:%S")
    health = "healthy" if event.healthy else "unhealthy"
    return (
        f"{stamp}  {event.type!s:8} {inst.service:16} {inst.id:30} {_host_port(inst):22} {health}"
    )


async def _watch(
    urls: list[str], services: list[str], as_json: bool, request_timeout: float | None
) -> int:
    secrets = _url_secrets(urls)

    def on_error(service: str, exc: BaseException) -> None:
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in secrets:
            text = text.replace(secret, "***")
        print(f"registry-agent: watch {service}: {text} (retrying)", file=sys.stderr, flush=True)

    backends = _open_all(urls, request_timeout)
    watcher = AsyncWatcher(backends, services, on_error=on_error)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not as_json:
        _print(f"{'TIME':8}  {'EVENT':8} {'SERVICE':16} {'ID':30} {'ADDRESS':22} HEALTH")

    async def pump() -> None:
        async for event in watcher:
            _print(_event_line(event, as_json))

    task = asyncio.create_task(pump())
    stopped = asyncio.create_task(stop.wait())
    # Until a signal, or until the watch itself fails (its error is the one line we print).
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(Exception):
        await watcher.close()
    for backend in backends:
        with contextlib.suppress(Exception):
            await backend.close()
    if isinstance(outcome, Exception):
        raise outcome
    return 0


# -- run and check -------------------------------------------------------------------


async def _check(config: AgentConfig) -> int:
    # Opened (never connected) and checked exactly as `run` does: the same errors come out.
    backends = open_configured_backends(config)
    try:
        await validate_services(config, backends)
    finally:
        await close_backends(backends)
    failed = 0
    for service in config.services:
        for check_config in service.checks:
            check = check_config.build()
            result = await check.run()
            await check.aclose()
            failed += not result.ok
            mark = "ok  " if result.ok else "FAIL"
            _print(
                f"{mark} {service.instance.id:30} {check.name:40} {result.latency * 1000:7.1f} ms"
                f"  {result.detail}"
            )
        if not service.checks:
            _print(f"ok   {service.instance.id:30} (no checks: registers at once)")
    _print(f"{config.source}: valid; {len(config.services)} service(s), {failed} check(s) failing")
    return EXIT_ERROR if failed else 0


def _run(config: AgentConfig, log_format: str | None, log_level: str | None) -> int:
    configure_logging(
        log_format or config.log_format, log_level or config.log_level, config.secrets()
    )
    return asyncio.run(AgentRuntime(config).run())


# -- parser --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-agent",
        description="Self-healing service registration for Consul and etcd.",
    )
    parser.add_argument("--version", action="version", version=f"registry-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="register the services of a config file until stopped")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="agent.toml")
    run.add_argument("--log-format", choices=["text", "json"], help="default: from the file, text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="validate a config file and run every check once")
    check.add_argument("-c", "--config", required=True, metavar="FILE")

    for name, help_text in (
        ("watch", "print one line per event"),
        ("list", "print the instances of a service"),
    ):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("service", nargs="+" if name == "watch" else None)
        cmd.add_argument(
            "--backend",
            required=True,
            action="append",
            metavar="URL",
            help="consul://host:port or etcd://host:port; several: one merged view",
        )
        cmd.add_argument("--json", action="store_true", help="one JSON object per line")
        cmd.add_argument(
            "--timeout", type=float, help="seconds (default: the URL's timeout option, or 5)"
        )

    commands.add_parser("backends", help="print the installed backend schemes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``registry-agent`` console script."""
    args = _parser().parse_args(argv)
    secrets = _url_secrets(getattr(args, "backend", None))
    if args.command != "run":
        # What goes wrong is said once, by the command itself: no library log lines around it.
        logging.getLogger().addHandler(logging.NullHandler())
    skipped = _SkippedEntries(secrets)
    if args.command in ("list", "watch"):
        logging.getLogger("registry_agent").addHandler(skipped)
    try:
        if args.command == "backends":
            _print("\n".join(available_backends()))
            return 0
        if args.command == "list":
            return asyncio.run(_list(args.backend, args.service, args.json, args.timeout))
        if args.command == "watch":
            return asyncio.run(_watch(args.backend, args.service, args.json, args.timeout))
        config = load_config(args.config)
        secrets += config.secrets()
        if args.command == "check":
            return asyncio.run(_check(config))
        return _run(config, args.log_format, args.log_level)
    except ConfigError as exc:
        _fail(exc, secrets)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a registry error, or anything a client library raised
        _fail(exc, secrets)
        return EXIT_ERROR
    finally:
        logging.getLogger("registry_agent").removeHandler(skipped)
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
